//! Multi-head scaled-dot-product attention, over tiny per-frame sequences (CLS pooling attends
//! over the L+1 layer tokens of one frame: q [n, sq, h*dh], k and v [n, sk, h*dh]) or over each
//! utterance's frames of a packed batch (the ML-SUPERB head's self-attention, with dropout on the
//! probabilities). Inputs are already projected; heads are contiguous dh-slices of the feature
//! axis, as in nn.MultiheadAttention and ESPnet's MultiHeadedAttention.

use super::gemm::zeros_to_accumulate_into;
use super::Real;
use rayon::prelude::*;

#[derive(Clone, Copy, Debug)]
pub struct AttnGeom {
    pub sq: usize,
    pub sk: usize,
    pub heads: usize,
    pub head_dim: usize,
}

impl AttnGeom {
    fn width(&self) -> usize {
        self.heads * self.head_dim
    }
}

/// Dropout on the attention probabilities (ESPnet's `attention_dropout_rate`): probability `p`,
/// and the keep decision of probability element i of the whole call is `dropout::keep(seed, i)`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ProbDropout {
    pub p: f64,
    pub seed: u64,
}

/// One short sequence's attention: q [sq, w], k and v [sk, w] (rows w = heads * head_dim
/// apart); writes out [sq, w] and probs [heads, sq, sk].
#[allow(clippy::too_many_arguments)]
fn sequence_forward<R: Real>(
    qf: &[R],
    kf: &[R],
    vf: &[R],
    sq: usize,
    sk: usize,
    heads: usize,
    head_dim: usize,
    of: &mut [R],
    pf: &mut [R],
) {
    let w = heads * head_dim;
    let scale = R::from_f64(1.0 / (head_dim as f64).sqrt());
    let mut scores = vec![R::ZERO; sk];
    for h in 0..heads {
        let hs = h * head_dim;
        for i in 0..sq {
            let row = (h * sq + i) * sk;
            let p = &mut pf[row..row + sk];
            let qi = &qf[i * w + hs..i * w + hs + head_dim];
            for (j, s) in scores.iter_mut().enumerate() {
                let kj = &kf[j * w + hs..j * w + hs + head_dim];
                *s = qi.iter().zip(kj).map(|(&a, &b)| a * b).sum::<R>() * scale;
            }
            super::softmax::softmax_row(&scores, p);
            let o = &mut of[i * w + hs..i * w + hs + head_dim];
            for (j, &pj) in p.iter().enumerate() {
                for (a, &b) in o.iter_mut().zip(&vf[j * w + hs..j * w + hs + head_dim]) {
                    *a += pj * b;
                }
            }
        }
    }
}

/// A probability after dropout: kept and scaled by 1 / (1 - p), or 0.
#[inline]
fn dropped<R: Real>(v: R, d: ProbDropout, index: u64) -> R {
    if d.p <= 0.0 {
        v
    } else if d.p < 1.0 && super::dropout::keep(d.seed, index, d.p) {
        v * R::from_f64(1.0 / (1.0 - d.p))
    } else {
        R::ZERO
    }
}

/// The gradients of [`sequence_forward`], added into dq [sq, w], dk and dv [sk, w].
#[allow(clippy::too_many_arguments)]
fn sequence_backward<R: Real>(
    (qf, kf, vf): (&[R], &[R], &[R]),
    pf: &[R],
    of: &[R],
    sq: usize,
    sk: usize,
    heads: usize,
    head_dim: usize,
    (dq, dk, dv): (&mut [R], &mut [R], &mut [R]),
) {
    let w = heads * head_dim;
    let scale = R::from_f64(1.0 / (head_dim as f64).sqrt());
    let mut ds = vec![R::ZERO; sk];
    for h in 0..heads {
        let hs = h * head_dim;
        for i in 0..sq {
            let row = (h * sq + i) * sk;
            let p = &pf[row..row + sk];
            let doi = &of[i * w + hs..i * w + hs + head_dim];
            // dP = dO V^T, dS = P * (dP - sum(P * dP)).
            for (j, d) in ds.iter_mut().enumerate() {
                *d = doi
                    .iter()
                    .zip(&vf[j * w + hs..j * w + hs + head_dim])
                    .map(|(&a, &b)| a * b)
                    .sum();
            }
            let dot: R = p.iter().zip(&ds).map(|(&a, &b)| a * b).sum();
            for (j, d) in ds.iter_mut().enumerate() {
                *d = p[j] * (*d - dot) * scale;
            }
            for j in 0..sk {
                let (pj, dsj) = (p[j], ds[j]);
                for e in 0..head_dim {
                    dv[j * w + hs + e] += pj * doi[e];
                    dk[j * w + hs + e] += dsj * qf[i * w + hs + e];
                    dq[i * w + hs + e] += dsj * kf[j * w + hs + e];
                }
            }
        }
    }
}

/// The dropout multipliers (0 or 1 / (1 - p)) of one head's [t, t] probabilities starting at
/// probability index `base` of the call.
fn drop_multipliers<R: Real>(drop: Option<(ProbDropout, u64)>, len: usize) -> Option<Vec<R>> {
    drop.map(|(d, base)| {
        (0..len)
            .map(|i| dropped(R::ONE, d, base + i as u64))
            .collect()
    })
}

/// One head's probabilities as applied to V: times the dropout multipliers, or as they are.
fn applied<'a, R: Real>(p: &'a [R], mult: &Option<Vec<R>>) -> std::borrow::Cow<'a, [R]> {
    match mult {
        Some(m) => p.iter().zip(m).map(|(&a, &b)| a * b).collect(),
        None => std::borrow::Cow::Borrowed(p),
    }
}

/// [`sequence_forward`] for self-attention over t frames, as matrix products (the ML-SUPERB
/// head's utterances are hundreds of frames long).
#[allow(clippy::too_many_arguments)]
fn self_attention_forward<R: Real>(
    (qf, kf, vf): (&[R], &[R], &[R]),
    t: usize,
    heads: usize,
    head_dim: usize,
    of: &mut [R],
    pf: &mut [R],
    drop: Option<(ProbDropout, u64)>,
) {
    let w = heads * head_dim;
    let scale = R::from_f64(1.0 / (head_dim as f64).sqrt());
    let mut scores = vec![R::ZERO; t];
    for h in 0..heads {
        let (hs, p) = (h * head_dim, &mut pf[h * t * t..(h + 1) * t * t]);
        // S = Q_h K_h^T, then each row's softmax of S * scale.
        super::gemm::gemm_strided(
            (t, head_dim, t),
            (&qf[hs..], w, 1),
            (&kf[hs..], 1, w),
            R::ZERO,
            (p, t),
        );
        for row in p.chunks_exact_mut(t) {
            for (s, &v) in scores.iter_mut().zip(row.iter()) {
                *s = v * scale;
            }
            super::softmax::softmax_row(&scores, row);
        }
        let mult = drop_multipliers::<R>(drop.map(|(d, b)| (d, b + (h * t * t) as u64)), t * t);
        let applied = applied(p, &mult);
        // O_h = P V_h.
        super::gemm::gemm_strided(
            (t, t, head_dim),
            (&applied, t, 1),
            (&vf[hs..], w, 1),
            R::ZERO,
            (&mut of[hs..], w),
        );
    }
}

/// The gradients of [`self_attention_forward`], added into dq, dk, dv [t, w].
#[allow(clippy::too_many_arguments)]
fn self_attention_backward<R: Real>(
    (qf, kf, vf): (&[R], &[R], &[R]),
    pf: &[R],
    of: &[R],
    t: usize,
    heads: usize,
    head_dim: usize,
    (dq, dk, dv): (&mut [R], &mut [R], &mut [R]),
    drop: Option<(ProbDropout, u64)>,
) {
    let w = heads * head_dim;
    let scale = R::from_f64(1.0 / (head_dim as f64).sqrt());
    let mut ds = vec![R::ZERO; t * t];
    for h in 0..heads {
        let (hs, p) = (h * head_dim, &pf[h * t * t..(h + 1) * t * t]);
        let mult = drop_multipliers::<R>(drop.map(|(d, b)| (d, b + (h * t * t) as u64)), t * t);
        let applied = applied(p, &mult);
        // dV_h += P_applied^T dO_h; dP_applied = dO_h V_h^T.
        super::gemm::gemm_strided(
            (t, t, head_dim),
            (&applied, 1, t),
            (&of[hs..], w, 1),
            R::ONE,
            (&mut dv[hs..], w),
        );
        super::gemm::gemm_strided(
            (t, head_dim, t),
            (&of[hs..], w, 1),
            (&vf[hs..], 1, w),
            R::ZERO,
            (&mut ds, t),
        );
        // Through the dropout, then the softmax: dS = P * (dP - sum(P * dP)) * scale.
        for (i, row) in ds.chunks_exact_mut(t).enumerate() {
            if let Some(m) = &mult {
                row.iter_mut()
                    .zip(&m[i * t..(i + 1) * t])
                    .for_each(|(d, &b)| *d *= b);
            }
            let pr = &p[i * t..(i + 1) * t];
            let dot: R = pr.iter().zip(row.iter()).map(|(&a, &b)| a * b).sum();
            for (d, &pj) in row.iter_mut().zip(pr) {
                *d = pj * (*d - dot) * scale;
            }
        }
        // dQ_h += dS K_h; dK_h += dS^T Q_h.
        super::gemm::gemm_strided(
            (t, t, head_dim),
            (&ds, t, 1),
            (&kf[hs..], w, 1),
            R::ONE,
            (&mut dq[hs..], w),
        );
        super::gemm::gemm_strided(
            (t, t, head_dim),
            (&ds, 1, t),
            (&qf[hs..], w, 1),
            R::ONE,
            (&mut dk[hs..], w),
        );
    }
}

/// Returns (out [n, sq, h*dh], probs [n, h, sq, sk]).
pub fn forward<R: Real>(q: &[R], k: &[R], v: &[R], n: usize, g: &AttnGeom) -> (Vec<R>, Vec<R>) {
    let w = g.width();
    let mut out = vec![R::ZERO; n * g.sq * w];
    let mut probs = vec![R::ZERO; n * g.heads * g.sq * g.sk];
    out.par_chunks_mut(g.sq * w)
        .zip(probs.par_chunks_mut(g.heads * g.sq * g.sk))
        .enumerate()
        .for_each(|(f, (of, pf))| {
            let (qf, kf, vf) = (&q[f * g.sq * w..], &k[f * g.sk * w..], &v[f * g.sk * w..]);
            sequence_forward(qf, kf, vf, g.sq, g.sk, g.heads, g.head_dim, of, pf);
        });
    (out, probs)
}

/// Returns (dq, dk, dv) given the forward's probabilities.
pub fn backward<R: Real>(
    q: &[R],
    k: &[R],
    v: &[R],
    probs: &[R],
    dout: &[R],
    n: usize,
    g: &AttnGeom,
) -> (Vec<R>, Vec<R>, Vec<R>) {
    let w = g.width();
    let mut dq = zeros_to_accumulate_into(n * g.sq * w);
    let mut dk = zeros_to_accumulate_into(n * g.sk * w);
    let mut dv = zeros_to_accumulate_into(n * g.sk * w);
    dq.par_chunks_mut(g.sq * w)
        .zip(dk.par_chunks_mut(g.sk * w))
        .zip(dv.par_chunks_mut(g.sk * w))
        .enumerate()
        .for_each(|(f, ((dqf, dkf), dvf))| {
            let inputs = (&q[f * g.sq * w..], &k[f * g.sk * w..], &v[f * g.sk * w..]);
            let pf = &probs[f * g.heads * g.sq * g.sk..];
            let of = &dout[f * g.sq * w..];
            let grads = (dqf, dkf, dvf);
            sequence_backward(inputs, pf, of, g.sq, g.sk, g.heads, g.head_dim, grads);
        });
    (dq, dk, dv)
}

/// Where each utterance's probabilities start in a packed call's probs ([heads, t, t] each).
fn prob_offsets(offsets: &[usize], heads: usize) -> Vec<usize> {
    let mut out = vec![0];
    for w in offsets.windows(2) {
        let t = w[1] - w[0];
        out.push(out.last().copied().unwrap_or(0) + heads * t * t);
    }
    out
}

/// Self-attention within each utterance of a packed batch (a padded batch with its key padding
/// masked, as ESPnet's encoder): q, k, v [frames, heads * head_dim] already projected, `offsets`
/// the utterances' cu_seqlens. Returns (out [frames, w], probs: per utterance [heads, t, t],
/// before dropout).
pub fn packed_forward<R: Real>(
    (q, k, v): (&[R], &[R], &[R]),
    offsets: &[usize],
    heads: usize,
    head_dim: usize,
    drop: Option<ProbDropout>,
) -> (Vec<R>, Vec<R>) {
    let w = heads * head_dim;
    let po = prob_offsets(offsets, heads);
    let mut out = vec![R::ZERO; q.len()];
    let mut probs = vec![R::ZERO; *po.last().unwrap_or(&0)];
    let lens: Vec<usize> = offsets.windows(2).map(|o| o[1] - o[0]).collect();
    let outs = super::split_mut(&mut out, lens.iter().map(|t| t * w));
    let ps = super::split_mut(&mut probs, lens.iter().map(|t| heads * t * t));
    outs.into_par_iter()
        .zip(ps)
        .enumerate()
        .for_each(|(u, (of, pf))| {
            let (s, t) = (offsets[u] * w, lens[u]);
            let drop = drop.map(|d| (d, po[u] as u64));
            self_attention_forward(
                (&q[s..], &k[s..], &v[s..]),
                t,
                heads,
                head_dim,
                of,
                pf,
                drop,
            );
        });
    (out, probs)
}

/// The gradients (dq, dk, dv) of [`packed_forward`] (the same `drop`).
#[allow(clippy::too_many_arguments)]
pub fn packed_backward<R: Real>(
    (q, k, v): (&[R], &[R], &[R]),
    probs: &[R],
    dout: &[R],
    offsets: &[usize],
    heads: usize,
    head_dim: usize,
    drop: Option<ProbDropout>,
) -> (Vec<R>, Vec<R>, Vec<R>) {
    let w = heads * head_dim;
    let po = prob_offsets(offsets, heads);
    let (mut dq, mut dk, mut dv) = (
        zeros_to_accumulate_into(q.len()),
        zeros_to_accumulate_into(q.len()),
        zeros_to_accumulate_into(q.len()),
    );
    let lens: Vec<usize> = offsets.windows(2).map(|o| o[1] - o[0]).collect();
    let sizes = || lens.iter().map(|t| t * w);
    let (dqs, dks, dvs) = (
        super::split_mut(&mut dq, sizes()),
        super::split_mut(&mut dk, sizes()),
        super::split_mut(&mut dv, sizes()),
    );
    dqs.into_par_iter()
        .zip(dks)
        .zip(dvs)
        .enumerate()
        .for_each(|(u, ((dqu, dku), dvu))| {
            let (s, t) = (offsets[u] * w, lens[u]);
            let drop = drop.map(|d| (d, po[u] as u64));
            self_attention_backward(
                (&q[s..], &k[s..], &v[s..]),
                &probs[po[u]..],
                &dout[s..],
                t,
                heads,
                head_dim,
                (dqu, dku, dvu),
                drop,
            );
        });
    (dq, dk, dv)
}
