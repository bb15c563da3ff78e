//! HConv's convolution over the LAYER axis of a frame-major stack: for every frame independently,
//! a Conv1d whose channels are the feature dimension and whose length is the layer axis.
//!
//! Layout: x [n, l_in, c_in] (channels contiguous), weight [c_out, c_in, k] (PyTorch Conv1d),
//! bias [c_out], y [n, l_out, c_out], zero padding `pad` on both ends, l_out = (l_in + 2*pad - k)/s + 1.
//! Computed as im2col + GEMM over chunks of frames, so memory stays bounded for any frame count.

use super::gemm::{gemm, Trans};
use super::Real;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvGeom {
    pub l_in: usize,
    pub c_in: usize,
    pub c_out: usize,
    pub kernel: usize,
    pub stride: usize,
    pub pad: usize,
}

impl ConvGeom {
    pub fn l_out(&self) -> usize {
        (self.l_in + 2 * self.pad - self.kernel) / self.stride + 1
    }
    fn window(&self) -> usize {
        self.kernel * self.c_in
    }
}

/// Frames per im2col chunk: ~19k floats per frame at 13x768 keeps a chunk near 20 MB.
const CHUNK_FRAMES: usize = 256;

/// cols[(f, lo), (k, c)] = x[f, lo*s - pad + k, c], zero outside [0, l_in).
fn im2col<R: Real>(x: &[R], g: &ConvGeom, f0: usize, nf: usize, cols: &mut Vec<R>) {
    let (lo_n, win) = (g.l_out(), g.window());
    cols.clear();
    cols.resize(nf * lo_n * win, R::ZERO);
    for f in 0..nf {
        let frame = &x[(f0 + f) * g.l_in * g.c_in..(f0 + f + 1) * g.l_in * g.c_in];
        for lo in 0..lo_n {
            let row = &mut cols[(f * lo_n + lo) * win..(f * lo_n + lo + 1) * win];
            for k in 0..g.kernel {
                let li = (lo * g.stride + k) as isize - g.pad as isize;
                if li >= 0 && (li as usize) < g.l_in {
                    let li = li as usize;
                    row[k * g.c_in..(k + 1) * g.c_in]
                        .copy_from_slice(&frame[li * g.c_in..(li + 1) * g.c_in]);
                }
            }
        }
    }
}

/// PyTorch's [c_out, c_in, k] weight as a [c_out, (k, c_in)] GEMM operand matching `im2col`.
fn weight_as_matrix<R: Real>(w: &[R], g: &ConvGeom) -> Vec<R> {
    let mut m = vec![R::ZERO; g.c_out * g.window()];
    for o in 0..g.c_out {
        for c in 0..g.c_in {
            for k in 0..g.kernel {
                m[o * g.window() + k * g.c_in + c] = w[(o * g.c_in + c) * g.kernel + k];
            }
        }
    }
    m
}

pub fn forward<R: Real>(x: &[R], n: usize, w: &[R], b: &[R], g: &ConvGeom) -> Vec<R> {
    if n == 1 {
        return forward_single(x, w, b, g);
    }
    let lo_n = g.l_out();
    let wm = weight_as_matrix(w, g);
    let mut y = vec![R::ZERO; n * lo_n * g.c_out];
    let mut cols = Vec::new();
    for f0 in (0..n).step_by(CHUNK_FRAMES) {
        let nf = CHUNK_FRAMES.min(n - f0);
        im2col(x, g, f0, nf, &mut cols);
        let yc = &mut y[f0 * lo_n * g.c_out..(f0 + nf) * lo_n * g.c_out];
        for row in yc.chunks_exact_mut(g.c_out) {
            row.copy_from_slice(b);
        }
        gemm(
            nf * lo_n,
            g.window(),
            g.c_out,
            &cols,
            Trans::N,
            &wm,
            Trans::T,
            R::ONE,
            yc,
        );
    }
    y
}

/// One long sequence (an upstream's conv over time): window `lo` is the contiguous run of rows
/// lo*s .. lo*s+k of the (zero-padded) input, so the conv is ONE GEMM reading the input through a
/// row stride of s*c_in: no im2col copy at all.
fn forward_single<R: Real>(x: &[R], w: &[R], b: &[R], g: &ConvGeom) -> Vec<R> {
    let (lo_n, win) = (g.l_out(), g.window());
    let padded;
    let src: &[R] = if g.pad == 0 {
        x
    } else {
        let mut p = vec![R::ZERO; (g.l_in + 2 * g.pad) * g.c_in];
        p[g.pad * g.c_in..(g.pad + g.l_in) * g.c_in].copy_from_slice(x);
        padded = p;
        &padded
    };
    let wm = weight_as_matrix(w, g);
    let mut y = Vec::with_capacity(lo_n * g.c_out);
    for _ in 0..lo_n {
        y.extend_from_slice(b);
    }
    // SAFETY: the last window read ends at ((lo_n-1)*s + k) * c_in <= (l_in + 2*pad) * c_in =
    // src.len() by the definition of lo_n; wm is [c_out, win] read transposed; y is [lo_n, c_out].
    unsafe {
        R::gemm_raw(
            lo_n,
            win,
            g.c_out,
            R::ONE,
            src,
            (g.stride * g.c_in) as isize,
            1,
            &wm,
            1,
            win as isize,
            R::ONE,
            &mut y,
            g.c_out as isize,
        )
    };
    y
}

/// Returns (dx if `need_dx`, dweight [c_out, c_in, k], dbias [c_out]).
pub fn backward<R: Real>(
    x: &[R],
    n: usize,
    w: &[R],
    g: &ConvGeom,
    dy: &[R],
    need_dx: bool,
) -> (Option<Vec<R>>, Vec<R>, Vec<R>) {
    let (lo_n, win) = (g.l_out(), g.window());
    let wm = weight_as_matrix(w, g);
    let mut dwm = vec![R::ZERO; g.c_out * win];
    let mut dx = need_dx.then(|| vec![R::ZERO; n * g.l_in * g.c_in]);
    let mut cols = Vec::new();
    let mut dcols = Vec::new();
    for f0 in (0..n).step_by(CHUNK_FRAMES) {
        let nf = CHUNK_FRAMES.min(n - f0);
        let rows = nf * lo_n;
        let dyc = &dy[f0 * lo_n * g.c_out..(f0 + nf) * lo_n * g.c_out];
        im2col(x, g, f0, nf, &mut cols);
        gemm(
            g.c_out,
            rows,
            win,
            dyc,
            Trans::T,
            &cols,
            Trans::N,
            R::ONE,
            &mut dwm,
        );
        if let Some(dx) = dx.as_mut() {
            dcols.clear();
            dcols.resize(rows * win, R::ZERO);
            gemm(
                rows,
                g.c_out,
                win,
                dyc,
                Trans::N,
                &wm,
                Trans::N,
                R::ZERO,
                &mut dcols,
            );
            // col2im: scatter-add every window back onto the layers it read.
            for f in 0..nf {
                let dframe = &mut dx[(f0 + f) * g.l_in * g.c_in..(f0 + f + 1) * g.l_in * g.c_in];
                for lo in 0..lo_n {
                    let row = &dcols[(f * lo_n + lo) * win..(f * lo_n + lo + 1) * win];
                    for k in 0..g.kernel {
                        let li = (lo * g.stride + k) as isize - g.pad as isize;
                        if li >= 0 && (li as usize) < g.l_in {
                            let li = li as usize;
                            let dst = &mut dframe[li * g.c_in..(li + 1) * g.c_in];
                            for (a, &v) in dst.iter_mut().zip(&row[k * g.c_in..(k + 1) * g.c_in]) {
                                *a += v;
                            }
                        }
                    }
                }
            }
        }
    }
    let mut dw = vec![R::ZERO; w.len()];
    for o in 0..g.c_out {
        for c in 0..g.c_in {
            for k in 0..g.kernel {
                dw[(o * g.c_in + c) * g.kernel + k] = dwm[o * win + k * g.c_in + c];
            }
        }
    }
    let db = super::linear::column_sums(dy, n * lo_n, g.c_out);
    (dx, dw, db)
}
