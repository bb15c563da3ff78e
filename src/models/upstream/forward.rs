//! The f32 forward pass of one utterance (see the parity checklist in encoders.md §5).

use super::{Dense, EncoderLayer, FeatNorm, Norm, Upstream};
use crate::ops::{self, layer_conv::ConvGeom, Real};
use rayon::prelude::*;

fn linear(x: &[f32], rows: usize, d: &Dense) -> Vec<f32> {
    let mut y = Vec::with_capacity(rows * d.out_f);
    for _ in 0..rows {
        y.extend_from_slice(&d.b);
    }
    let (n, t) = (ops::gemm::Trans::N, 1.0);
    ops::gemm::gemm(rows, d.in_f, d.out_f, x, n, &d.w_t, n, t, &mut y);
    y
}

fn layer_norm(x: &[f32], dim: usize, n: &Norm, eps: f64) -> Vec<f32> {
    ops::layernorm::forward(x, dim, Some((&n.w, &n.b)), eps).0
}

fn gelu_in_place(x: &mut [f32]) {
    x.par_chunks_mut(1 << 14)
        .for_each(ops::activation::gelu_in_place);
}

fn add_in_place(a: &mut [f32], b: &[f32]) {
    a.iter_mut().zip(b).for_each(|(x, y)| *x += y);
}

/// GroupNorm with one group per channel over a time-major [t, c] signal: each channel normalised
/// over all its t samples (biased variance), then affine.
fn channel_norm(x: &mut [f32], c: usize, n: &Norm, eps: f64) {
    let t = x.len() / c;
    let mut mean = vec![0f64; c];
    let mut sq = vec![0f64; c];
    for row in x.chunks_exact(c) {
        for (j, &v) in row.iter().enumerate() {
            mean[j] += v as f64;
        }
    }
    mean.iter_mut().for_each(|m| *m /= t as f64);
    for row in x.chunks_exact(c) {
        for (j, &v) in row.iter().enumerate() {
            sq[j] += (v as f64 - mean[j]).powi(2);
        }
    }
    let scale: Vec<f32> = sq
        .iter()
        .zip(&n.w)
        .map(|(&s, &w)| w / ((s / t as f64 + eps).sqrt() as f32))
        .collect();
    let m32: Vec<f32> = mean.iter().map(|&m| m as f32).collect();
    for row in x.chunks_exact_mut(c) {
        for j in 0..c {
            row[j] = (row[j] - m32[j]) * scale[j] + n.b[j];
        }
    }
}

/// WavLM's bucket of a relative distance (key - query), in torch's f32 operation order.
pub fn relative_position_bucket(rel: i64, num_buckets: usize, max_distance: usize) -> usize {
    let nb = (num_buckets / 2) as i64;
    let mut bucket = if rel > 0 { nb } else { 0 };
    let n = rel.abs();
    let max_exact = nb / 2;
    if n < max_exact {
        bucket += n;
    } else {
        let ratio = (n as f32 / max_exact as f32).ln();
        let large = ratio / ((max_distance as f64 / max_exact as f64).ln() as f32)
            * (nb - max_exact) as f32;
        let large = (max_exact as f32 + large) as i64;
        bucket += large.min(nb - 1);
    }
    bucket as usize
}

impl Upstream {
    /// One waveform -> its hidden states, frame-major [t, L, D].
    pub(super) fn forward_one(&self, wave: &[f32]) -> Vec<f32> {
        let cfg = &self.config;
        // Feature encoder: convs over time on a time-major [t, channels] signal.
        let mut x = wave.to_vec();
        let mut t = wave.len();
        for (i, conv) in self.convs.iter().enumerate() {
            let g = ConvGeom {
                l_in: t,
                c_in: conv.c_in,
                c_out: conv.c_out,
                kernel: conv.kernel,
                stride: conv.stride,
                pad: 0,
            };
            let mut y = ops::layer_conv::forward(&x, 1, &conv.w, &conv.b, &g);
            t = g.l_out();
            if let Some(n) = &conv.norm {
                // nn.GroupNorm / nn.LayerNorm defaults: eps 1e-5 (not config.layer_norm_eps).
                match cfg.feat_norm {
                    FeatNorm::Group if i == 0 => channel_norm(&mut y, conv.c_out, n, 1e-5),
                    FeatNorm::Layer => y = layer_norm(&y, conv.c_out, n, 1e-5),
                    FeatNorm::Group => {}
                }
            }
            gelu_in_place(&mut y);
            x = y;
        }
        let c_feat = self.convs.last().map_or(1, |c| c.c_out);
        if let Some(n) = &self.proj_ln {
            x = layer_norm(&x, c_feat, n, cfg.layer_norm_eps);
        }
        let d = cfg.hidden_size;
        let mut h = linear(&x, t, &self.proj);
        let pos = self.positional_conv(&h, t);
        add_in_place(&mut h, &pos);
        let l = cfg.num_states();
        let mut states = vec![0f32; t * l * d];
        let mut put = |layer: usize, h: &[f32]| {
            for (f, row) in h.chunks_exact(d).enumerate() {
                states[(f * l + layer) * d..(f * l + layer + 1) * d].copy_from_slice(row);
            }
        };
        let eps = cfg.layer_norm_eps;
        if !cfg.stable_layer_norm {
            h = layer_norm(&h, d, &self.enc_ln, eps);
        }
        put(0, &h);
        let bias = self.rel_embed.as_ref().map(|e| self.position_bias(e, t));
        let n_layers = self.layers.len();
        for (i, layer) in self.layers.iter().enumerate() {
            if cfg.stable_layer_norm {
                let u = layer_norm(&h, d, &layer.ln1, eps);
                add_in_place(&mut h, &self.attention(layer, &u, t, bias.as_deref()));
                let u = layer_norm(&h, d, &layer.ln2, eps);
                add_in_place(&mut h, &self.feed_forward(layer, &u, t));
            } else {
                let mut a = self.attention(layer, &h, t, bias.as_deref());
                add_in_place(&mut a, &h);
                h = layer_norm(&a, d, &layer.ln1, eps);
                let mut f = self.feed_forward(layer, &h, t);
                add_in_place(&mut f, &h);
                h = layer_norm(&f, d, &layer.ln2, eps);
            }
            if cfg.stable_layer_norm && i == n_layers - 1 {
                // Pre-LN: the encoder's final LayerNorm applies to the last state only.
                put(i + 1, &layer_norm(&h, d, &self.enc_ln, eps));
            } else {
                put(i + 1, &h);
            }
        }
        states
    }

    /// Grouped Conv1d over time (kernel k, padding k/2), the extra frame of an even kernel
    /// dropped, then GELU.
    fn positional_conv(&self, h: &[f32], t: usize) -> Vec<f32> {
        let cfg = &self.config;
        let (d, k, groups) = (cfg.hidden_size, cfg.pos_conv_kernel, cfg.pos_conv_groups);
        let cg = d / groups;
        let per_group: Vec<Vec<f32>> = (0..groups)
            .into_par_iter()
            .map(|g| {
                let xg: Vec<f32> = h
                    .chunks_exact(d)
                    .flat_map(|row| row[g * cg..(g + 1) * cg].iter().copied())
                    .collect();
                let geom = ConvGeom {
                    l_in: t,
                    c_in: cg,
                    c_out: cg,
                    kernel: k,
                    stride: 1,
                    pad: k / 2,
                };
                let w = &self.pos_w[g * cg * cg * k..(g + 1) * cg * cg * k];
                ops::layer_conv::forward(&xg, 1, w, &self.pos_b[g * cg..(g + 1) * cg], &geom)
            })
            .collect();
        let mut out = vec![0f32; t * d];
        for (g, y) in per_group.iter().enumerate() {
            for f in 0..t {
                out[f * d + g * cg..f * d + (g + 1) * cg].copy_from_slice(&y[f * cg..(f + 1) * cg]);
            }
        }
        gelu_in_place(&mut out);
        out
    }

    /// WavLM layer 0's ungated bias [h, t, t]: bias[h, i, j] = E[bucket(j - i), h].
    fn position_bias(&self, embed: &[f32], t: usize) -> Vec<f32> {
        let (h, nb, md) = (
            self.config.num_heads,
            self.config.num_buckets,
            self.config.max_bucket_distance,
        );
        let buckets: Vec<usize> = (0..2 * t - 1)
            .map(|r| relative_position_bucket(r as i64 - (t as i64 - 1), nb, md))
            .collect();
        let mut bias = vec![0f32; h * t * t];
        bias.par_chunks_mut(t * t).enumerate().for_each(|(hi, b)| {
            for i in 0..t {
                for j in 0..t {
                    b[i * t + j] = embed[buckets[j + t - 1 - i] * h + hi];
                }
            }
        });
        bias
    }

    fn feed_forward(&self, layer: &EncoderLayer, u: &[f32], t: usize) -> Vec<f32> {
        let mut m = linear(u, t, &layer.ffn1);
        gelu_in_place(&mut m);
        linear(&m, t, &layer.ffn2)
    }

    /// Multi-head self-attention over the utterance (no mask: it is run at its own length), with
    /// WavLM's gated relative-position bias added to the scaled scores when `bias` is given.
    fn attention(
        &self,
        layer: &EncoderLayer,
        u: &[f32],
        t: usize,
        bias: Option<&[f32]>,
    ) -> Vec<f32> {
        let (d, h) = (self.config.hidden_size, self.config.num_heads);
        let dh = d / h;
        let q = linear(u, t, &layer.q);
        let k = linear(u, t, &layer.k);
        let v = linear(u, t, &layer.v);
        let scale = (dh as f32).powf(-0.5);
        let heads: Vec<Vec<f32>> = (0..h)
            .into_par_iter()
            .map(|hi| {
                let mut s = vec![0f32; t * t];
                // s = scale * q_h k_h^T: q_h is [t, dh] at column hi*dh with row stride d; k_h
                // likewise.
                // SAFETY: the largest index read is (t-1)*d + hi*dh + dh-1 < t*d = q.len() = k.len(),
                // and s is t*t.
                unsafe {
                    f32::gemm_raw(
                        t,
                        dh,
                        t,
                        scale,
                        &q[hi * dh..],
                        d as isize,
                        1,
                        &k[hi * dh..],
                        1,
                        d as isize,
                        0.0,
                        &mut s,
                        t as isize,
                    )
                };
                if let (Some(b), Some(gate)) = (bias, layer.gate.as_ref()) {
                    for i in 0..t {
                        let ui = &u[i * d + hi * dh..i * d + (hi + 1) * dh];
                        let z: Vec<f32> = (0..8)
                            .map(|r| {
                                gate.b[r]
                                    + ui.iter()
                                        .zip(&gate.w[r * dh..(r + 1) * dh])
                                        .map(|(a, b)| a * b)
                                        .sum::<f32>()
                            })
                            .collect();
                        let sig = |x: f32| 1.0 / (1.0 + (-x).exp());
                        let (ga, gb) = (
                            sig(z[0] + z[1] + z[2] + z[3]),
                            sig(z[4] + z[5] + z[6] + z[7]),
                        );
                        let g = ga * (gb * gate.c[hi] - 1.0) + 2.0;
                        let brow = &b[(hi * t + i) * t..(hi * t + i + 1) * t];
                        s[i * t..(i + 1) * t]
                            .iter_mut()
                            .zip(brow)
                            .for_each(|(x, &pb)| *x += g * pb);
                    }
                }
                let p = ops::softmax::softmax_forward(&s, t);
                let mut o = vec![0f32; t * dh];
                // SAFETY: p is t*t, v_h reads at most (t-1)*d + hi*dh + dh-1 < v.len(), o is t*dh.
                unsafe {
                    f32::gemm_raw(
                        t,
                        t,
                        dh,
                        1.0,
                        &p,
                        t as isize,
                        1,
                        &v[hi * dh..],
                        d as isize,
                        1,
                        0.0,
                        &mut o,
                        dh as isize,
                    )
                };
                o
            })
            .collect();
        let mut merged = vec![0f32; t * d];
        for (hi, o) in heads.iter().enumerate() {
            for i in 0..t {
                merged[i * d + hi * dh..i * d + (hi + 1) * dh]
                    .copy_from_slice(&o[i * dh..(i + 1) * dh]);
            }
        }
        linear(&merged, t, &layer.o)
    }
}
