//! Linear layer, PyTorch layout: `y[r,o] = sum_i x[r,i] * w[o,i] + b[o]`, weight stored [out, in].

use super::gemm::{gemm, Trans};
use super::Real;

/// x: [rows, in_f], w: [out_f, in_f], b: [out_f] -> y: [rows, out_f].
pub fn forward<R: Real>(
    x: &[R],
    rows: usize,
    in_f: usize,
    w: &[R],
    out_f: usize,
    b: Option<&[R]>,
) -> Vec<R> {
    let mut y = match b {
        Some(b) => {
            let mut y = Vec::with_capacity(rows * out_f);
            for _ in 0..rows {
                y.extend_from_slice(b);
            }
            y
        }
        None => vec![R::ZERO; rows * out_f],
    };
    let beta = if b.is_some() { R::ONE } else { R::ZERO };
    gemm(rows, in_f, out_f, x, Trans::N, w, Trans::T, beta, &mut y);
    y
}

/// Gradients of [`forward`]: dx (only if `need_dx`), dw [out_f, in_f], db [out_f].
pub fn backward<R: Real>(
    x: &[R],
    rows: usize,
    in_f: usize,
    w: &[R],
    out_f: usize,
    dy: &[R],
    need_dx: bool,
) -> (Option<Vec<R>>, Vec<R>, Vec<R>) {
    let dx = need_dx.then(|| {
        let mut dx = vec![R::ZERO; rows * in_f];
        gemm(
            rows,
            out_f,
            in_f,
            dy,
            Trans::N,
            w,
            Trans::N,
            R::ZERO,
            &mut dx,
        );
        dx
    });
    let mut dw = vec![R::ZERO; out_f * in_f];
    gemm(
        out_f,
        rows,
        in_f,
        dy,
        Trans::T,
        x,
        Trans::N,
        R::ZERO,
        &mut dw,
    );
    (dx, dw, column_sums(dy, rows, out_f))
}

/// Sum over rows of a [rows, cols] matrix (the bias gradient).
pub fn column_sums<R: Real>(m: &[R], rows: usize, cols: usize) -> Vec<R> {
    let mut s = vec![R::ZERO; cols];
    for r in 0..rows {
        for (acc, &v) in s.iter_mut().zip(&m[r * cols..(r + 1) * cols]) {
            *acc += v;
        }
    }
    s
}
