//! Resampling along the time axis: each output frame a fixed mix of up to four input frames of its
//! utterance. SpecAugment's time warp (ESPnet's `time_warp`, ML-SUPERB's recipe) stretches an
//! utterance's frames before a random center and squeezes those after it (or the reverse) with
//! PyTorch's bicubic `F.interpolate` (align_corners=False). Over a (time, feature) plane whose
//! feature size is kept, bicubic interpolation is exactly 1-D along time (the feature taps are
//! 0, 1, 0, 0), so a warp is a linear map of frames, and its backward is the transposed map.

use super::Real;

/// Four (input frame, weight) taps per output frame; frames are indices into the packed batch.
pub type Taps = [(usize, f32); 4];

/// PyTorch's cubic convolution weights (A = -0.75) for the fractional offset `t` in [0, 1).
fn cubic_weights(t: f32) -> [f32; 4] {
    const A: f32 = -0.75;
    let near = |x: f32| ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0;
    let far = |x: f32| ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A;
    [far(t + 1.0), near(t), near(1.0 - t), far(2.0 - t)]
}

/// Taps resampling frames first..first + len_in to len_out frames as PyTorch's bicubic
/// interpolation with align_corners=False: source position (i + 0.5) len_in / len_out - 0.5
/// (not clamped, for cubic), taps at floor - 1 ..= floor + 2 clamped into the input, computed in
/// f32 as PyTorch's CPU kernel for f32 input.
pub fn bicubic_taps(first: usize, len_in: usize, len_out: usize) -> Vec<Taps> {
    let scale = len_in as f32 / len_out as f32;
    (0..len_out)
        .map(|i| {
            let real = scale * (i as f32 + 0.5) - 0.5;
            let floor = real.floor();
            let w = cubic_weights(real - floor);
            let base = floor as i64 - 1;
            let mut taps = [(0, 0.0); 4];
            for (k, tap) in taps.iter_mut().enumerate() {
                let j = (base + k as i64).clamp(0, len_in as i64 - 1) as usize;
                *tap = (first + j, w[k]);
            }
            taps
        })
        .collect()
}

/// SpecAugment's time warp of one utterance at frames first..first + len: frames before `center`
/// resampled to `warped` frames, the rest to len - warped. 0 < center < len, 0 < warped < len.
pub fn time_warp_taps(first: usize, len: usize, center: usize, warped: usize) -> Vec<Taps> {
    let mut taps = bicubic_taps(first, center, warped);
    taps.extend(bicubic_taps(first + center, len - center, len - warped));
    taps
}

/// y[j] = sum_k w_k x[frame_k] over rows of width `c`.
pub fn mix_forward<R: Real>(x: &[R], c: usize, taps: &[Taps]) -> Vec<R> {
    let mut y = vec![R::ZERO; taps.len() * c];
    for (row, t) in y.chunks_exact_mut(c).zip(taps) {
        for &(frame, w) in t {
            let w = R::from_f64(w as f64);
            for (o, &v) in row.iter_mut().zip(&x[frame * c..(frame + 1) * c]) {
                *o += w * v;
            }
        }
    }
    y
}

/// The transposed map: dx[frame_k] += w_k dy[j]; `frames` input rows.
pub fn mix_backward<R: Real>(dy: &[R], c: usize, taps: &[Taps], frames: usize) -> Vec<R> {
    let mut dx = vec![R::ZERO; frames * c];
    for (row, t) in dy.chunks_exact(c).zip(taps) {
        for &(frame, w) in t {
            let w = R::from_f64(w as f64);
            for (o, &g) in dx[frame * c..(frame + 1) * c].iter_mut().zip(row) {
                *o += w * g;
            }
        }
    }
    dx
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_size_resampling_is_the_identity_and_weights_sum_to_one() {
        for (i, t) in bicubic_taps(3, 9, 9).iter().enumerate() {
            let picked: Vec<_> = t.iter().filter(|(_, w)| *w != 0.0).collect();
            assert_eq!(picked, vec![&(3 + i, 1.0)]);
        }
        for (n_in, n_out) in [(7, 12), (12, 7), (5, 9)] {
            for t in bicubic_taps(0, n_in, n_out) {
                let s: f32 = t.iter().map(|(_, w)| w).sum();
                assert!((s - 1.0).abs() < 1e-6, "{s}");
                assert!(t.iter().all(|&(f, _)| f < n_in));
            }
        }
    }
}
