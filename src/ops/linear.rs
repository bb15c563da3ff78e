//! Linear layer, PyTorch layout: `y[r,o] = sum_i x[r,i] * w[o,i] + b[o]`, weight stored [out, in].

use super::gemm::{gemm, gemm_strided, Trans};
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

/// Each layer of a frame-major stack x [n, l, d] through a Linear of its own, the outputs side by
/// side: y[:, li * k..(li + 1) * k] = x[:, li, :] W_li^T + b_li, with w [l, k, d] and b [l, k]
/// -> y [n, l * k]. One GEMM per layer reads the stack in place (row stride l * d) and writes
/// its column block of y, so no layer is copied out and nothing is concatenated.
pub fn per_layer_forward<R: Real>(
    x: &[R],
    (n, l, d): (usize, usize, usize),
    w: &[R],
    b: &[R],
    k: usize,
) -> Vec<R> {
    // b is [l, k]: exactly one output row's biases.
    let mut y = Vec::with_capacity(n * l * k);
    for _ in 0..n {
        y.extend_from_slice(b);
    }
    // Without frames the layers' views would start past the empty buffers.
    if n == 0 {
        return y;
    }
    for li in 0..l {
        gemm_strided(
            (n, d, k),
            (&x[li * d..], l * d, 1),
            (&w[li * k * d..], 1, d),
            R::ONE,
            (&mut y[li * k..], l * k),
        );
    }
    y
}

/// The stack's gradient [n, l, d] of [`per_layer_forward`] (its weights are constants):
/// dx[:, li, :] = dy[:, li * k..(li + 1) * k] W_li.
pub fn per_layer_backward_input<R: Real>(
    dy: &[R],
    (n, l, d): (usize, usize, usize),
    w: &[R],
    k: usize,
) -> Vec<R> {
    let mut dx = vec![R::ZERO; n * l * d];
    if n == 0 {
        return dx;
    }
    for li in 0..l {
        gemm_strided(
            (n, k, d),
            (&dy[li * k..], l * k, 1),
            (&w[li * k * d..], d, 1),
            R::ZERO,
            (&mut dx[li * d..], l * d),
        );
    }
    dx
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
