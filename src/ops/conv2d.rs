//! 2-D convolution over each utterance's (time, feature) plane, with a weight [c_out, k * k *
//! c_in]: PyTorch's Conv2d weight [c_out, c_in, k, k] permuted to [c_out, k, k, c_in]. Two ways:
//! im2col patches (the gather of every k x k window into one row, so that the convolution is one
//! GEMM, `ops::linear`; any stride, cheap for few input channels) and, at stride 1, k * k GEMMs
//! of shifted input rows with no patches (for many channels, where the patches would be k * k
//! times the input). ESPnet's `Conv2dSubsampling2` (ML-SUPERB's downstream) is one of each.
//!
//! Layout: a frame is [freq, channels] (channels fastest), so a convolution's output rows
//! [(frame, freq), c_out] are directly the next one's input. A patch row is ordered (time offset,
//! feature offset, channel): k * k contiguous channel vectors, so the gather and its adjoint move
//! whole vectors (PyTorch's (channel, time, feature) order would gather single floats 9 apart).
//! Windows never cross utterances: an utterance of t frames gives (t - k) / stride + 1, as an
//! unpadded Conv2d.

use super::gemm::{gemm_strided, zeros_to_accumulate_into};
use super::Real;
use rayon::prelude::*;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PatchGeom {
    /// Features per frame (the plane's second axis).
    pub freq: usize,
    pub channels: usize,
    pub kernel: usize,
    pub stride: usize,
}

impl PatchGeom {
    /// Output positions along an axis of `len` (None: the kernel does not fit).
    pub fn out_len(&self, len: usize) -> Option<usize> {
        (self.kernel >= 1 && self.stride >= 1 && len >= self.kernel)
            .then(|| (len - self.kernel) / self.stride + 1)
    }

    pub fn patch_width(&self) -> usize {
        self.channels * self.kernel * self.kernel
    }

    fn frame_width(&self) -> usize {
        self.freq * self.channels
    }
}

/// The output offsets (cu_seqlens) for input `offsets`; None when an utterance is shorter than
/// the kernel or the feature axis is.
pub fn out_offsets(offsets: &[usize], g: &PatchGeom) -> Option<Vec<usize>> {
    g.out_len(g.freq)?;
    let mut out = vec![0];
    for w in offsets.windows(2) {
        out.push(out.last()? + g.out_len(w[1] - w[0])?);
    }
    Some(out)
}

/// x [frames, freq, channels] -> patches [out frames * out freq, k * k * channels]; returns them
/// and the output offsets. The input must fit ([`out_offsets`] is Some).
pub fn patches_forward<R: Real>(x: &[R], offsets: &[usize], g: &PatchGeom) -> (Vec<R>, Vec<usize>) {
    let outs = out_offsets(offsets, g).expect("patches_forward: checked by the caller");
    let of = g.out_len(g.freq).expect("checked");
    let (pw, fw, k, c) = (g.patch_width(), g.frame_width(), g.kernel, g.channels);
    // The first input frame of each output frame.
    let mut frames = Vec::with_capacity(*outs.last().unwrap_or(&0));
    for u in 0..offsets.len() - 1 {
        for t in 0..outs[u + 1] - outs[u] {
            frames.push(offsets[u] + t * g.stride);
        }
    }
    let mut y = vec![R::ZERO; frames.len() * of * pw];
    y.par_chunks_mut(of * pw)
        .zip(&frames)
        .for_each(|(yr, &first)| {
            for f in 0..of {
                let row = &mut yr[f * pw..(f + 1) * pw];
                for dt in 0..k {
                    // The k windows' features are adjacent in the frame: one copy of k * c.
                    let src = (first + dt) * fw + f * g.stride * c;
                    row[dt * k * c..(dt + 1) * k * c].copy_from_slice(&x[src..src + k * c]);
                }
            }
        });
    (y, outs)
}

/// The gradient of [`patches_forward`]: each patch element's gradient added back to the input
/// element it was gathered from.
pub fn patches_backward<R: Real>(
    dy: &[R],
    offsets: &[usize],
    outs: &[usize],
    g: &PatchGeom,
) -> Vec<R> {
    let of = g.out_len(g.freq).expect("checked");
    let (pw, fw, k, c) = (g.patch_width(), g.frame_width(), g.kernel, g.channels);
    let total = *offsets.last().unwrap_or(&0);
    let mut dx = vec![R::ZERO; total * fw];
    // Utterances own disjoint input frames, so they scatter in parallel.
    let parts = super::split_mut(&mut dx, offsets.windows(2).map(|w| (w[1] - w[0]) * fw));
    parts.into_par_iter().enumerate().for_each(|(u, dxu)| {
        for t in 0..outs[u + 1] - outs[u] {
            let r = outs[u] + t;
            for f in 0..of {
                let row = &dy[(r * of + f) * pw..(r * of + f + 1) * pw];
                for dt in 0..k {
                    let dst = (t * g.stride + dt) * fw + f * g.stride * c;
                    let dst = &mut dxu[dst..dst + k * c];
                    for (o, &v) in dst.iter_mut().zip(&row[dt * k * c..(dt + 1) * k * c]) {
                        *o += v;
                    }
                }
            }
        }
    });
    dx
}

/// A stride-1 convolution computed without patches: for each of the k * k window offsets
/// (dt, df), one GEMM of the input rows shifted by dt * freq + df against that offset's [c_out,
/// c_in] slice of the weight, accumulated into an output that spans every feature position of a
/// frame (freq per output frame, the last k - 1 of which wrap into the next frame and are
/// dropped). Same result as [`patches_forward`] times the weight, without the k * k-fold copy of
/// the input (the ML-SUPERB head's second convolution: 333 MB of patches at 8 x 250 frames).
/// x [frames, freq, c_in], w [c_out, k * k * c_in], b [c_out] -> ([frames' * freq', c_out], the
/// output offsets). The input must fit ([`out_offsets`] is Some, with `g.stride` 1).
pub fn shifted_forward<R: Real>(
    x: &[R],
    offsets: &[usize],
    g: &PatchGeom,
    w: &[R],
    b: &[R],
    c_out: usize,
) -> (Vec<R>, Vec<usize>) {
    assert_eq!(g.stride, 1, "shifted_forward: stride 1 only");
    let outs = out_offsets(offsets, g).expect("shifted_forward: checked by the caller");
    let (f, of, c, k) = (
        g.freq,
        g.out_len(g.freq).expect("checked"),
        g.channels,
        g.kernel,
    );
    let mut y = Vec::with_capacity(outs.last().copied().unwrap_or(0) * of * c_out);
    for u in 0..offsets.len() - 1 {
        let t_out = outs[u + 1] - outs[u];
        // Every feature position of each output frame; the last k - 1 positions of the last
        // frame would read past the utterance, so they are left out.
        let rows = t_out * f - (k - 1);
        let mut wide = zeros_to_accumulate_into(t_out * f * c_out);
        for (dt, df) in (0..k).flat_map(|dt| (0..k).map(move |df| (dt, df))) {
            let first = (offsets[u] + dt) * f + df;
            let tap = (dt * k + df) * c;
            // rows x c from row `first` stay inside the utterance: rows was cut so.
            gemm_strided(
                (rows, c, c_out),
                (&x[first * c..], c, 1),
                (&w[tap..], 1, k * k * c),
                R::ONE,
                (&mut wide[..rows * c_out], c_out),
            );
        }
        for t in 0..t_out {
            for row in wide[t * f * c_out..(t * f + of) * c_out].chunks_exact(c_out) {
                y.extend(row.iter().zip(b).map(|(&v, &bias)| v + bias));
            }
        }
    }
    (y, outs)
}

/// The gradients (dx, dw [c_out, k * k * c_in], db) of [`shifted_forward`].
#[allow(clippy::too_many_arguments)]
pub fn shifted_backward<R: Real>(
    x: &[R],
    offsets: &[usize],
    outs: &[usize],
    g: &PatchGeom,
    w: &[R],
    c_out: usize,
    dy: &[R],
    need_dx: bool,
) -> (Option<Vec<R>>, Vec<R>, Vec<R>) {
    let (f, of, c, k) = (
        g.freq,
        g.out_len(g.freq).expect("checked"),
        g.channels,
        g.kernel,
    );
    let mut dx = need_dx.then(|| zeros_to_accumulate_into(x.len()));
    let mut dw = zeros_to_accumulate_into(w.len());
    let mut db = vec![R::ZERO; c_out];
    for row in dy.chunks_exact(c_out) {
        for (a, &v) in db.iter_mut().zip(row) {
            *a += v;
        }
    }
    for u in 0..offsets.len() - 1 {
        let t_out = outs[u + 1] - outs[u];
        let rows = t_out * f - (k - 1);
        // The output gradient spread over every feature position, zero at the dropped ones.
        let mut wide = vec![R::ZERO; t_out * f * c_out];
        for t in 0..t_out {
            let src = &dy[(outs[u] + t) * of * c_out..(outs[u] + t + 1) * of * c_out];
            wide[t * f * c_out..(t * f + of) * c_out].copy_from_slice(src);
        }
        for (dt, df) in (0..k).flat_map(|dt| (0..k).map(move |df| (dt, df))) {
            let first = (offsets[u] + dt) * f + df;
            let tap = (dt * k + df) * c;
            // dw[:, tap..tap + c] += wide^T x_shifted (dw's column block has row stride k k c).
            gemm_strided(
                (c_out, rows, c),
                (&wide[..rows * c_out], 1, c_out),
                (&x[first * c..], c, 1),
                R::ONE,
                (&mut dw[tap..], k * k * c),
            );
            if let Some(dx) = dx.as_mut() {
                // dx_shifted += wide w[:, tap..tap + c]
                gemm_strided(
                    (rows, c_out, c),
                    (&wide[..rows * c_out], c_out, 1),
                    (&w[tap..], k * k * c, 1),
                    R::ONE,
                    (&mut dx[first * c..], c),
                );
            }
        }
    }
    (dx, dw, db)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A direct Conv2d (no bias) of one utterance, PyTorch's weight layout: x [t, freq, c_in],
    /// w [c_out, c_in, k, k] -> [t', f', c_out].
    fn direct(x: &[f64], t: usize, g: &PatchGeom, w: &[f64], c_out: usize) -> Vec<f64> {
        let (k, s) = (g.kernel, g.stride);
        let (ot, of) = (g.out_len(t).unwrap(), g.out_len(g.freq).unwrap());
        let mut y = vec![0.0; ot * of * c_out];
        for i in 0..ot {
            for j in 0..of {
                for o in 0..c_out {
                    let mut acc = 0.0;
                    for c in 0..g.channels {
                        for a in 0..k {
                            for b in 0..k {
                                acc += w[((o * g.channels + c) * k + a) * k + b]
                                    * x[((i * s + a) * g.freq + j * s + b) * g.channels + c];
                            }
                        }
                    }
                    y[(i * of + j) * c_out + o] = acc;
                }
            }
        }
        y
    }

    #[test]
    fn patches_times_weight_is_the_direct_convolution_per_utterance() {
        let g = PatchGeom {
            freq: 7,
            channels: 2,
            kernel: 3,
            stride: 2,
        };
        let lengths = [5usize, 8, 3];
        let offsets = [0, 5, 13, 16];
        let x: Vec<f64> = (0..16 * 14)
            .map(|i| ((i * 37 % 23) as f64 - 11.0) / 7.0)
            .collect();
        let c_out = 3;
        let w: Vec<f64> = (0..c_out * g.patch_width())
            .map(|i| ((i * 11 % 17) as f64 - 8.0) / 5.0)
            .collect();
        let (p, outs) = patches_forward(&x, &offsets, &g);
        assert_eq!(outs, vec![0, 2, 5, 6]);
        let pw = g.patch_width();
        // PyTorch's [c_out, c_in, k, k] permuted to the patches' [c_out, k, k, c_in].
        let (k, ci) = (g.kernel, g.channels);
        let mut wp = vec![0.0; w.len()];
        for o in 0..c_out {
            for c in 0..ci {
                for a in 0..k {
                    for b in 0..k {
                        wp[((o * k + a) * k + b) * ci + c] = w[((o * ci + c) * k + a) * k + b];
                    }
                }
            }
        }
        for (u, &t) in lengths.iter().enumerate() {
            let xu = &x[offsets[u] * 14..offsets[u + 1] * 14];
            let want = direct(xu, t, &g, &w, c_out);
            let rows = &p[outs[u] * 3 * pw..outs[u + 1] * 3 * pw];
            for (r, patch) in rows.chunks_exact(pw).enumerate() {
                for o in 0..c_out {
                    let got: f64 = patch.iter().zip(&wp[o * pw..]).map(|(a, b)| a * b).sum();
                    assert!((got - want[r * c_out + o]).abs() < 1e-12, "utt {u} row {r}");
                }
            }
        }
        // The backward is the forward's adjoint: <P x, d> = <x, P^T d>.
        let d: Vec<f64> = (0..p.len()).map(|i| ((i * 29 % 13) as f64) - 6.0).collect();
        let dx = patches_backward(&d, &offsets, &outs, &g);
        let lhs: f64 = p.iter().zip(&d).map(|(a, b)| a * b).sum();
        let rhs: f64 = x.iter().zip(&dx).map(|(a, b)| a * b).sum();
        assert!(
            (lhs - rhs).abs() < 1e-9 * lhs.abs().max(1.0),
            "{lhs} vs {rhs}"
        );
    }

    #[test]
    fn shifted_gemms_equal_patches_times_the_weight_forward_and_backward() {
        use crate::ops::linear;
        let g = PatchGeom {
            freq: 7,
            channels: 3,
            kernel: 3,
            stride: 1,
        };
        let offsets = [0usize, 5, 13, 16];
        let c_out = 4;
        let x: Vec<f64> = (0..16 * 21)
            .map(|i| ((i * 37 % 23) as f64 - 11.0) / 7.0)
            .collect();
        let w: Vec<f64> = (0..c_out * g.patch_width())
            .map(|i| ((i * 11 % 17) as f64 - 8.0) / 5.0)
            .collect();
        let b = [0.5, -1.0, 0.25, 2.0];
        let (p, outs) = patches_forward(&x, &offsets, &g);
        let rows = p.len() / g.patch_width();
        let want = linear::forward(&p, rows, g.patch_width(), &w, c_out, Some(&b));
        let (got, outs2) = shifted_forward(&x, &offsets, &g, &w, &b, c_out);
        assert_eq!(outs, outs2);
        assert_eq!(got.len(), want.len());
        for (a, e) in got.iter().zip(&want) {
            assert!((a - e).abs() < 1e-12, "{a} vs {e}");
        }
        let dy: Vec<f64> = (0..want.len())
            .map(|i| ((i * 29 % 13) as f64) - 6.0)
            .collect();
        let (dp, dw, db) = linear::backward(&p, rows, g.patch_width(), &w, c_out, &dy, true);
        let dx = patches_backward(&dp.unwrap(), &offsets, &outs, &g);
        let (dx2, dw2, db2) = shifted_backward(&x, &offsets, &outs, &g, &w, c_out, &dy, true);
        for (name, a, e) in [("dx", dx2.unwrap(), dx), ("dw", dw2, dw), ("db", db2, db)] {
            assert_eq!(a.len(), e.len(), "{name}");
            for (a, e) in a.iter().zip(&e) {
                assert!((a - e).abs() < 1e-9, "{name}: {a} vs {e}");
            }
        }
    }

    #[test]
    fn too_short_utterances_or_features_do_not_fit() {
        let g = PatchGeom {
            freq: 80,
            channels: 1,
            kernel: 3,
            stride: 2,
        };
        assert_eq!(out_offsets(&[0, 3, 5], &g), None);
        assert_eq!(out_offsets(&[0, 3, 8], &g), Some(vec![0, 1, 3]));
        let narrow = PatchGeom { freq: 2, ..g };
        assert_eq!(out_offsets(&[0, 9], &narrow), None);
    }
}
