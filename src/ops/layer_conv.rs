//! HConv's convolution over the LAYER axis of a frame-major stack: for every frame independently,
//! a Conv1d whose channels are the feature dimension and whose length is the layer axis.
//!
//! Layout: x [n, l_in, c_in] (channels contiguous), weight [c_out, c_in, k] (PyTorch Conv1d),
//! bias [c_out], y [n, l_out, c_out], zero padding `pad` on both ends, l_out = (l_in + 2*pad - k)/s + 1.
//! Computed without im2col: one GEMM per output position over all frames, reading each frame's
//! window in place (a contiguous run of layers) and skipping the taps that land in the padding.

use super::gemm::{gemm_strided, zeros_to_accumulate_into};
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

/// The taps of output position `lo` that land on a layer (the rest read zero padding):
/// `(k0, k1, li0)`, taps k0..k1 reading layers li0..li0 + (k1 - k0), which lie contiguously in a
/// frame's [l_in, c_in] rows. Empty (k1 <= k0) for a window wholly in the padding.
fn taps_on_layers(g: &ConvGeom, lo: usize) -> (usize, usize, usize) {
    let start = lo * g.stride;
    let k0 = g.pad.saturating_sub(start);
    let k1 = g.kernel.min((g.l_in + g.pad).saturating_sub(start));
    (k0, k1, (start + k0).saturating_sub(g.pad))
}

/// PyTorch's [c_out, c_in, k] weight as a [c_out, (k, c_in)] GEMM operand: its columns in the
/// order a window's layers lie in a frame (tap-major), so a run of taps is a run of columns.
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
    let (lo_n, win) = (g.l_out(), g.window());
    let wm = weight_as_matrix(w, g);
    let mut y = Vec::with_capacity(n * lo_n * g.c_out);
    for _ in 0..n * lo_n {
        y.extend_from_slice(b);
    }
    // One GEMM per output position over every frame: its window's layers are one contiguous run
    // of each frame (row stride l_in * c_in), so no im2col copy, and K spans only the taps that
    // reach a layer (HuBERT-Base's first conv: 21 of its 25 (position, tap) pairs).
    for lo in 0..lo_n {
        let (k0, k1, li0) = taps_on_layers(g, lo);
        // No frames: nothing to slice the views from (they would start past the empty buffers).
        if k1 <= k0 || n == 0 {
            continue;
        }
        gemm_strided(
            (n, (k1 - k0) * g.c_in, g.c_out),
            (&x[li0 * g.c_in..], g.l_in * g.c_in, 1),
            (&wm[k0 * g.c_in..], 1, win),
            R::ONE,
            (&mut y[lo * g.c_out..], lo_n * g.c_out),
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

/// Returns (dx if `need_dx`, dweight [c_out, c_in, k], dbias [c_out]), one GEMM per output
/// position for each (as the forward): dW's columns of the taps that reach a layer take
/// dy[:, lo]^T · x[:, window]; dx's window rows take dy[:, lo] · W[:, taps] (windows overlap when
/// the stride is below the kernel: each adds onto what the previous ones left).
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
    let mut dwm = zeros_to_accumulate_into(g.c_out * win);
    let mut dx = need_dx.then(|| zeros_to_accumulate_into(n * g.l_in * g.c_in));
    for lo in 0..lo_n {
        let (k0, k1, li0) = taps_on_layers(g, lo);
        if k1 <= k0 || n == 0 {
            continue;
        }
        let taps = (k1 - k0) * g.c_in;
        let dy_at = (&dy[lo * g.c_out..], lo_n * g.c_out);
        gemm_strided(
            (g.c_out, n, taps),
            (dy_at.0, 1, dy_at.1),
            (&x[li0 * g.c_in..], g.l_in * g.c_in, 1),
            R::ONE,
            (&mut dwm[k0 * g.c_in..], win),
        );
        if let Some(dx) = dx.as_mut() {
            gemm_strided(
                (n, g.c_out, taps),
                (dy_at.0, dy_at.1, 1),
                (&wm[k0 * g.c_in..], win, 1),
                R::ONE,
                (&mut dx[li0 * g.c_in..], g.l_in * g.c_in),
            );
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
