//! The speaker-verification head's ops (SUPERB SV, s3prl's x-vector): a TDNN layer's temporal
//! context gathered within each utterance of a packed batch, statistics pooling (mean and
//! unbiased standard deviation over each utterance's frames), and the rows' L2 normalization that
//! AM-softmax and cosine scoring use. Forward and backward, generic over [`Real`].

use super::Real;

/// Frames an utterance of `frames` keeps after a TDNN layer of `context` frames `dilation` apart
/// (a valid convolution: no padding), or None when it is too short for one window.
pub fn context_frames(frames: usize, context: usize, dilation: usize) -> Option<usize> {
    let span = (context - 1) * dilation;
    frames.checked_sub(span).filter(|&f| f > 0)
}

/// x [frames, c] packed by `offsets` -> [frames', context * c]: output frame t of an utterance is
/// its input frames t, t + dilation, ..., t + (context - 1) dilation side by side (as F.unfold
/// lays out a (context, c) window). Returns the output and its offsets. Every utterance must have
/// at least one window ([`context_frames`]).
pub fn time_context_forward<R: Real>(
    x: &[R],
    c: usize,
    offsets: &[usize],
    context: usize,
    dilation: usize,
) -> (Vec<R>, Vec<usize>) {
    let mut out_offsets = vec![0];
    for u in 0..offsets.len() - 1 {
        let kept = context_frames(offsets[u + 1] - offsets[u], context, dilation)
            .expect("checked by the caller: every utterance has a window");
        out_offsets.push(out_offsets[u] + kept);
    }
    let width = context * c;
    let mut y = vec![R::ZERO; out_offsets[offsets.len() - 1] * width];
    for u in 0..offsets.len() - 1 {
        for t in 0..out_offsets[u + 1] - out_offsets[u] {
            let row = &mut y[(out_offsets[u] + t) * width..(out_offsets[u] + t + 1) * width];
            for j in 0..context {
                let src = offsets[u] + t + j * dilation;
                row[j * c..(j + 1) * c].copy_from_slice(&x[src * c..(src + 1) * c]);
            }
        }
    }
    (y, out_offsets)
}

/// The gradient of [`time_context_forward`]: each window's slices added back to their frames.
pub fn time_context_backward<R: Real>(
    dy: &[R],
    c: usize,
    offsets: &[usize],
    out_offsets: &[usize],
    context: usize,
    dilation: usize,
) -> Vec<R> {
    let width = context * c;
    let mut dx = vec![R::ZERO; offsets[offsets.len() - 1] * c];
    for u in 0..offsets.len() - 1 {
        for t in 0..out_offsets[u + 1] - out_offsets[u] {
            let row = &dy[(out_offsets[u] + t) * width..(out_offsets[u] + t + 1) * width];
            for j in 0..context {
                let dst = offsets[u] + t + j * dilation;
                for (o, &g) in dx[dst * c..(dst + 1) * c].iter_mut().zip(&row[j * c..]) {
                    *o += g;
                }
            }
        }
    }
    dx
}

/// x [frames, c] -> [utterances, 2c]: each utterance's mean, then its standard deviation with
/// the n - 1 denominator (torch.std). Every utterance needs at least 2 frames.
pub fn stats_pool_forward<R: Real>(x: &[R], c: usize, offsets: &[usize]) -> Vec<R> {
    let b = offsets.len() - 1;
    let mut y = vec![R::ZERO; b * 2 * c];
    for u in 0..b {
        let (s, e) = (offsets[u], offsets[u + 1]);
        let n = R::from_f64((e - s) as f64);
        let (mean, std) = y[u * 2 * c..(u + 1) * 2 * c].split_at_mut(c);
        for t in s..e {
            for (m, &v) in mean.iter_mut().zip(&x[t * c..(t + 1) * c]) {
                *m += v;
            }
        }
        mean.iter_mut().for_each(|m| *m = *m / n);
        for t in s..e {
            for ((q, &v), &m) in std.iter_mut().zip(&x[t * c..(t + 1) * c]).zip(mean.iter()) {
                *q += (v - m) * (v - m);
            }
        }
        let dof = R::from_f64((e - s - 1) as f64);
        std.iter_mut().for_each(|q| *q = (*q / dof).sqrt());
    }
    y
}

/// The gradient of [`stats_pool_forward`] given its output `y`: d mean / dx = 1 / n,
/// d std / dx_t = (x_t - mean) / ((n - 1) std), and 0 where the std is 0 (a feature constant over
/// the utterance, e.g. a ReLU unit silent throughout it), as torch's std backward masks it.
pub fn stats_pool_backward<R: Real>(
    dy: &[R],
    x: &[R],
    y: &[R],
    c: usize,
    offsets: &[usize],
) -> Vec<R> {
    let mut dx = vec![R::ZERO; x.len()];
    for u in 0..offsets.len() - 1 {
        let (s, e) = (offsets[u], offsets[u + 1]);
        let n = R::from_f64((e - s) as f64);
        let dof = R::from_f64((e - s - 1) as f64);
        let (mean, std) = y[u * 2 * c..(u + 1) * 2 * c].split_at(c);
        let (dmean, dstd) = dy[u * 2 * c..(u + 1) * 2 * c].split_at(c);
        for t in s..e {
            let xr = &x[t * c..(t + 1) * c];
            for (k, o) in dx[t * c..(t + 1) * c].iter_mut().enumerate() {
                *o = dmean[k] / n;
                if std[k] != R::ZERO {
                    *o += dstd[k] * (xr[k] - mean[k]) / (dof * std[k]);
                }
            }
        }
    }
    dx
}

/// F.normalize(x, dim=-1): each row of x [rows, c] divided by max(||row||, 1e-12).
pub fn l2_normalize_forward<R: Real>(x: &[R], c: usize) -> Vec<R> {
    let eps = R::from_f64(1e-12);
    let mut y = vec![R::ZERO; x.len()];
    for (xr, yr) in x.chunks_exact(c).zip(y.chunks_exact_mut(c)) {
        let norm = xr.iter().map(|&v| v * v).sum::<R>().sqrt();
        let d = if norm > eps { norm } else { eps };
        for (o, &v) in yr.iter_mut().zip(xr) {
            *o = v / d;
        }
    }
    y
}

/// The gradient of [`l2_normalize_forward`]: (g - y (y . g)) / ||x|| above the clamp, g / eps
/// below it.
pub fn l2_normalize_backward<R: Real>(dy: &[R], x: &[R], c: usize) -> Vec<R> {
    let eps = R::from_f64(1e-12);
    let mut dx = vec![R::ZERO; x.len()];
    for ((xr, gr), or) in x
        .chunks_exact(c)
        .zip(dy.chunks_exact(c))
        .zip(dx.chunks_exact_mut(c))
    {
        let norm = xr.iter().map(|&v| v * v).sum::<R>().sqrt();
        if norm > eps {
            let dot = xr.iter().zip(gr).map(|(&v, &g)| v * g).sum::<R>() / norm;
            for ((o, &v), &g) in or.iter_mut().zip(xr).zip(gr) {
                *o = (g - v / norm * dot) / norm;
            }
        } else {
            for (o, &g) in or.iter_mut().zip(gr) {
                *o = g / eps;
            }
        }
    }
    dx
}
