//! Softmax and log-softmax over the last dimension, max-subtracted for stability.

use super::Real;

pub fn softmax_forward<R: Real>(x: &[R], d: usize) -> Vec<R> {
    let mut y = vec![R::ZERO; x.len()];
    for (xr, yr) in x.chunks_exact(d).zip(y.chunks_exact_mut(d)) {
        softmax_row(xr, yr);
    }
    y
}

pub(crate) fn softmax_row<R: Real>(x: &[R], y: &mut [R]) {
    R::softmax_row(x, y)
}

/// Takes the forward output y: dx = y * (dy - sum(dy * y)).
pub fn softmax_backward<R: Real>(y: &[R], dy: &[R], d: usize) -> Vec<R> {
    let mut dx = vec![R::ZERO; y.len()];
    for ((yr, gr), dr) in y
        .chunks_exact(d)
        .zip(dy.chunks_exact(d))
        .zip(dx.chunks_exact_mut(d))
    {
        let dot: R = yr.iter().zip(gr).map(|(&a, &b)| a * b).sum();
        for ((o, &yv), &g) in dr.iter_mut().zip(yr).zip(gr) {
            *o = yv * (g - dot);
        }
    }
    dx
}

pub fn log_softmax_forward<R: Real>(x: &[R], d: usize) -> Vec<R> {
    let mut y = vec![R::ZERO; x.len()];
    for (xr, yr) in x.chunks_exact(d).zip(y.chunks_exact_mut(d)) {
        let m = xr.iter().fold(R::NEG_INFINITY, |a, &b| a.max(b));
        let lse = xr.iter().map(|&v| (v - m).exp()).sum::<R>().ln() + m;
        for (o, &v) in yr.iter_mut().zip(xr) {
            *o = v - lse;
        }
    }
    y
}

/// Takes the forward output y: dx = dy - exp(y) * sum(dy).
pub fn log_softmax_backward<R: Real>(y: &[R], dy: &[R], d: usize) -> Vec<R> {
    let mut dx = vec![R::ZERO; y.len()];
    for ((yr, gr), dr) in y
        .chunks_exact(d)
        .zip(dy.chunks_exact(d))
        .zip(dx.chunks_exact_mut(d))
    {
        let s: R = gr.iter().copied().sum();
        for ((o, &yv), &g) in dr.iter_mut().zip(yr).zip(gr) {
            *o = g - yv.exp() * s;
        }
    }
    dx
}
