//! Means over the valid frames of each utterance of a packed batch (`offsets` = cu_seqlens): mean
//! pooling, and centering (each frame minus its utterance's mean).

use super::Real;

/// x: [frames, c], offsets: [B+1] -> [B, c]. Every utterance must have at least one frame
/// (checked when the [`crate::batch::PackedBatch`] is built).
pub fn mean_forward<R: Real>(x: &[R], c: usize, offsets: &[usize]) -> Vec<R> {
    let b = offsets.len() - 1;
    let mut y = vec![R::ZERO; b * c];
    for u in 0..b {
        let (s, e) = (offsets[u], offsets[u + 1]);
        let yr = &mut y[u * c..(u + 1) * c];
        for t in s..e {
            for (o, &v) in yr.iter_mut().zip(&x[t * c..(t + 1) * c]) {
                *o += v;
            }
        }
        let inv = R::ONE / R::from_f64((e - s) as f64);
        yr.iter_mut().for_each(|o| *o *= inv);
    }
    y
}

pub fn mean_backward<R: Real>(dy: &[R], c: usize, offsets: &[usize]) -> Vec<R> {
    let frames = *offsets.last().unwrap_or(&0);
    let mut dx = vec![R::ZERO; frames * c];
    for u in 0..offsets.len() - 1 {
        let (s, e) = (offsets[u], offsets[u + 1]);
        let inv = R::ONE / R::from_f64((e - s) as f64);
        for t in s..e {
            for (o, &g) in dx[t * c..(t + 1) * c]
                .iter_mut()
                .zip(&dy[u * c..(u + 1) * c])
            {
                *o = g * inv;
            }
        }
    }
    dx
}

/// Each utterance's frames minus its mean frame: ESPnet's `UtteranceMVN` with only the means
/// normalized (ML-SUPERB's feature normalization). The map is linear and self-adjoint, so it is
/// also its own backward: the gradient of x - mean(x) is g - mean(g).
pub fn center<R: Real>(x: &[R], c: usize, offsets: &[usize]) -> Vec<R> {
    let means = mean_forward(x, c, offsets);
    let mut y = x.to_vec();
    for u in 0..offsets.len() - 1 {
        let m = &means[u * c..(u + 1) * c];
        for row in y[offsets[u] * c..offsets[u + 1] * c].chunks_exact_mut(c) {
            for (o, &mu) in row.iter_mut().zip(m) {
                *o -= mu;
            }
        }
    }
    y
}
