//! Multi-head scaled-dot-product attention over tiny per-frame sequences (CLS pooling attends over
//! the L+1 layer tokens of one frame). Inputs are already projected: q [n, sq, h*dh], k and v
//! [n, sk, h*dh]; heads are contiguous dh-slices of the feature axis, as in nn.MultiheadAttention.

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

/// Returns (out [n, sq, h*dh], probs [n, h, sq, sk]).
pub fn forward<R: Real>(q: &[R], k: &[R], v: &[R], n: usize, g: &AttnGeom) -> (Vec<R>, Vec<R>) {
    let w = g.width();
    let scale = R::from_f64(1.0 / (g.head_dim as f64).sqrt());
    let mut out = vec![R::ZERO; n * g.sq * w];
    let mut probs = vec![R::ZERO; n * g.heads * g.sq * g.sk];
    out.par_chunks_mut(g.sq * w)
        .zip(probs.par_chunks_mut(g.heads * g.sq * g.sk))
        .enumerate()
        .for_each(|(f, (of, pf))| {
            let (qf, kf, vf) = (&q[f * g.sq * w..], &k[f * g.sk * w..], &v[f * g.sk * w..]);
            for h in 0..g.heads {
                let hs = h * g.head_dim;
                for i in 0..g.sq {
                    let p = &mut pf[(h * g.sq + i) * g.sk..(h * g.sq + i + 1) * g.sk];
                    let qi = &qf[i * w + hs..i * w + hs + g.head_dim];
                    for (j, pj) in p.iter_mut().enumerate() {
                        let kj = &kf[j * w + hs..j * w + hs + g.head_dim];
                        *pj = qi.iter().zip(kj).map(|(&a, &b)| a * b).sum::<R>() * scale;
                    }
                    let scores = p.to_vec();
                    super::softmax::softmax_row(&scores, p);
                    let o = &mut of[i * w + hs..i * w + hs + g.head_dim];
                    for (j, &pj) in p.iter().enumerate() {
                        for (a, &b) in o.iter_mut().zip(&vf[j * w + hs..j * w + hs + g.head_dim]) {
                            *a += pj * b;
                        }
                    }
                }
            }
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
    let scale = R::from_f64(1.0 / (g.head_dim as f64).sqrt());
    let results: Vec<(Vec<R>, Vec<R>, Vec<R>)> = (0..n)
        .into_par_iter()
        .map(|f| {
            let (qf, kf, vf) = (&q[f * g.sq * w..], &k[f * g.sk * w..], &v[f * g.sk * w..]);
            let of = &dout[f * g.sq * w..];
            let pf = &probs[f * g.heads * g.sq * g.sk..];
            let mut dq = vec![R::ZERO; g.sq * w];
            let mut dk = vec![R::ZERO; g.sk * w];
            let mut dv = vec![R::ZERO; g.sk * w];
            let mut ds = vec![R::ZERO; g.sk];
            for h in 0..g.heads {
                let hs = h * g.head_dim;
                for i in 0..g.sq {
                    let p = &pf[(h * g.sq + i) * g.sk..(h * g.sq + i + 1) * g.sk];
                    let doi = &of[i * w + hs..i * w + hs + g.head_dim];
                    // dP = dO V^T, dS = P * (dP - sum(P * dP)).
                    for (j, d) in ds.iter_mut().enumerate() {
                        *d = doi
                            .iter()
                            .zip(&vf[j * w + hs..j * w + hs + g.head_dim])
                            .map(|(&a, &b)| a * b)
                            .sum();
                    }
                    let dot: R = p.iter().zip(&ds).map(|(&a, &b)| a * b).sum();
                    for (j, d) in ds.iter_mut().enumerate() {
                        *d = p[j] * (*d - dot) * scale;
                    }
                    for j in 0..g.sk {
                        let (pj, dsj) = (p[j], ds[j]);
                        for e in 0..g.head_dim {
                            dv[j * w + hs + e] += pj * doi[e];
                            dk[j * w + hs + e] += dsj * qf[i * w + hs + e];
                            dq[i * w + hs + e] += dsj * kf[j * w + hs + e];
                        }
                    }
                }
            }
            (dq, dk, dv)
        })
        .collect();
    let mut dq = Vec::with_capacity(n * g.sq * w);
    let mut dk = Vec::with_capacity(n * g.sk * w);
    let mut dv = Vec::with_capacity(n * g.sk * w);
    for (a, b, c) in results {
        dq.extend(a);
        dk.extend(b);
        dv.extend(c);
    }
    (dq, dk, dv)
}
