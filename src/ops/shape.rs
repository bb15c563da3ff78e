//! Data-movement ops: concatenation along the feature axis, picking one layer out of the stack,
//! prepending a token, the channel-major flatten that ends HConv, and a matrix transpose.

use super::Real;

/// Concatenates row-aligned matrices [rows, w_i] into [rows, sum w_i].
pub fn concat_cols<R: Real>(parts: &[&[R]], widths: &[usize], rows: usize) -> Vec<R> {
    let total: usize = widths.iter().sum();
    let mut y = Vec::with_capacity(rows * total);
    for r in 0..rows {
        for (p, &w) in parts.iter().zip(widths) {
            y.extend_from_slice(&p[r * w..(r + 1) * w]);
        }
    }
    y
}

/// The inverse of [`concat_cols`]: splits [rows, sum w_i] back into its parts.
pub fn split_cols<R: Real>(x: &[R], widths: &[usize], rows: usize) -> Vec<Vec<R>> {
    let total: usize = widths.iter().sum();
    let mut parts: Vec<Vec<R>> = widths
        .iter()
        .map(|&w| Vec::with_capacity(rows * w))
        .collect();
    for r in 0..rows {
        let mut off = r * total;
        for (p, &w) in parts.iter_mut().zip(widths) {
            p.extend_from_slice(&x[off..off + w]);
            off += w;
        }
    }
    parts
}

/// [n, l, d] -> [n, d]: hidden state `layer` of every frame.
pub fn select_layer<R: Real>(x: &[R], l: usize, d: usize, layer: usize) -> Vec<R> {
    x.chunks_exact(l * d)
        .flat_map(|f| f[layer * d..(layer + 1) * d].iter().copied())
        .collect()
}

pub fn select_layer_backward<R: Real>(dy: &[R], l: usize, d: usize, layer: usize) -> Vec<R> {
    let n = dy.len() / d;
    let mut dx = vec![R::ZERO; n * l * d];
    for (f, g) in dx.chunks_exact_mut(l * d).zip(dy.chunks_exact(d)) {
        f[layer * d..(layer + 1) * d].copy_from_slice(g);
    }
    dx
}

/// [n, l, d] and a token [d] -> [n, l+1, d] with the token first in every frame.
pub fn prepend_token<R: Real>(x: &[R], l: usize, d: usize, token: &[R]) -> Vec<R> {
    let n = x.len() / (l * d);
    let mut y = Vec::with_capacity(n * (l + 1) * d);
    for f in x.chunks_exact(l * d) {
        y.extend_from_slice(token);
        y.extend_from_slice(f);
    }
    y
}

/// Gradients of [`prepend_token`]: (dx [n, l, d], dtoken [d] summed over frames).
pub fn prepend_token_backward<R: Real>(dy: &[R], l: usize, d: usize) -> (Vec<R>, Vec<R>) {
    let mut dx = Vec::with_capacity(dy.len() / (l + 1) * l);
    let mut dtok = vec![R::ZERO; d];
    for f in dy.chunks_exact((l + 1) * d) {
        for (a, &g) in dtok.iter_mut().zip(&f[..d]) {
            *a += g;
        }
        dx.extend_from_slice(&f[d..]);
    }
    (dx, dtok)
}

/// [n, l, c] -> [n, c*l] with out[c*l_len + l] = x[l, c]: PyTorch's `view(B*T, -1)` of a
/// (channels, length) conv output, i.e. HConv's channel-major flatten.
pub fn flatten_channel_major<R: Real>(x: &[R], l: usize, c: usize) -> Vec<R> {
    let mut y = vec![R::ZERO; x.len()];
    for (xf, yf) in x.chunks_exact(l * c).zip(y.chunks_exact_mut(l * c)) {
        for li in 0..l {
            for ci in 0..c {
                yf[ci * l + li] = xf[li * c + ci];
            }
        }
    }
    y
}

pub fn flatten_channel_major_backward<R: Real>(dy: &[R], l: usize, c: usize) -> Vec<R> {
    let mut dx = vec![R::ZERO; dy.len()];
    for (gf, df) in dy.chunks_exact(l * c).zip(dx.chunks_exact_mut(l * c)) {
        for li in 0..l {
            for ci in 0..c {
                df[li * c + ci] = gf[ci * l + li];
            }
        }
    }
    dx
}

/// [rows, cols] -> [cols, rows], in 32 x 32 blocks (a naive column walk strides through memory a
/// whole row per element).
pub fn transpose<R: Real>(x: &[R], rows: usize, cols: usize) -> Vec<R> {
    assert_eq!(
        x.len(),
        rows * cols,
        "transpose: {rows} x {cols} from {}",
        x.len()
    );
    const B: usize = 32;
    let mut y = vec![R::ZERO; x.len()];
    for r0 in (0..rows).step_by(B) {
        for c0 in (0..cols).step_by(B) {
            for r in r0..(r0 + B).min(rows) {
                for c in c0..(c0 + B).min(cols) {
                    y[c * rows + r] = x[r * cols + c];
                }
            }
        }
    }
    y
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transpose_moves_every_element_across_ragged_blocks() {
        for (rows, cols) in [(1, 1), (3, 70), (33, 31), (64, 96)] {
            let x: Vec<f64> = (0..rows * cols).map(|i| i as f64).collect();
            let y = transpose(&x, rows, cols);
            for r in 0..rows {
                for c in 0..cols {
                    assert_eq!(
                        y[c * rows + r],
                        x[r * cols + c],
                        "{rows} x {cols} at ({r}, {c})"
                    );
                }
            }
            assert_eq!(transpose(&y, cols, rows), x);
        }
    }
}
