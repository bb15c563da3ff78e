//! 2-D convolution over each utterance's (time, feature) plane, as im2col patches: the gather of
//! every k x k window into one row, so that the convolution itself is a GEMM (`ops::linear`) with
//! a weight [c_out, k * k * c_in]: PyTorch's Conv2d weight [c_out, c_in, k, k] permuted to
//! [c_out, k, k, c_in]. ESPnet's `Conv2dSubsampling2` (ML-SUPERB's downstream) is two such
//! convolutions.
//!
//! Layout: a frame is [freq, channels] (channels fastest), so a convolution's output rows
//! [(frame, freq), c_out] are directly the next one's input. A patch row is ordered (time offset,
//! feature offset, channel): k * k contiguous channel vectors, so the gather and its adjoint move
//! whole vectors (PyTorch's (channel, time, feature) order would gather single floats 9 apart).
//! Windows never cross utterances: an utterance of t frames gives (t - k) / stride + 1, as an
//! unpadded Conv2d.

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
