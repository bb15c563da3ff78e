//! Softmax-weighted sum over the layer axis of a frame-major stack [n, L, d] (s3prl's Featurizer),
//! optionally over a contiguous layer range only (GroupWS uses one range per group).

use super::softmax::softmax_row;
use super::Real;
use rayon::prelude::*;

/// Frames per parallel task: large enough that scheduling is noise.
const FRAMES_PER_TASK: usize = 64;

/// out[n, :] = sum_{j} softmax(w)[j] * x[n, first + j, :], j < w.len().
pub fn forward<R: Real>(x: &[R], l: usize, d: usize, first: usize, w: &[R]) -> Vec<R> {
    let n = x.len() / (l * d);
    let mut p = vec![R::ZERO; w.len()];
    softmax_row(w, &mut p);
    let mut y = vec![R::ZERO; n * d];
    y.par_chunks_mut(FRAMES_PER_TASK * d)
        .enumerate()
        .for_each(|(ci, yc)| {
            for (fi, yr) in yc.chunks_exact_mut(d).enumerate() {
                let f = ci * FRAMES_PER_TASK + fi;
                let frame = &x[f * l * d..(f + 1) * l * d];
                for (j, &pj) in p.iter().enumerate() {
                    let row = &frame[(first + j) * d..(first + j + 1) * d];
                    for (o, &v) in yr.iter_mut().zip(row) {
                        *o += pj * v;
                    }
                }
            }
        });
    y
}

/// Gradient w.r.t. the layer logits `w`; also dx [n, L, d] when `need_dx` (zero outside the range).
pub fn backward<R: Real>(
    x: &[R],
    l: usize,
    d: usize,
    first: usize,
    w: &[R],
    dy: &[R],
    need_dx: bool,
) -> (Vec<R>, Option<Vec<R>>) {
    let n = x.len() / (l * d);
    let k = w.len();
    let mut p = vec![R::ZERO; k];
    softmax_row(w, &mut p);
    // dp[j] = sum_{n,d} dy[n,d] * x[n, first+j, d]; summed per chunk, then in chunk order, so the
    // result does not depend on the thread count.
    let partials: Vec<Vec<R>> = (0..n.div_ceil(FRAMES_PER_TASK))
        .into_par_iter()
        .map(|ci| {
            let mut dp = vec![R::ZERO; k];
            for f in ci * FRAMES_PER_TASK..((ci + 1) * FRAMES_PER_TASK).min(n) {
                let g = &dy[f * d..(f + 1) * d];
                for (j, acc) in dp.iter_mut().enumerate() {
                    let row = &x[(f * l + first + j) * d..(f * l + first + j + 1) * d];
                    *acc += row.iter().zip(g).map(|(&a, &b)| a * b).sum::<R>();
                }
            }
            dp
        })
        .collect();
    let mut dp = vec![R::ZERO; k];
    for part in &partials {
        for (a, &b) in dp.iter_mut().zip(part) {
            *a += b;
        }
    }
    let dot: R = p.iter().zip(&dp).map(|(&a, &b)| a * b).sum();
    let dw: Vec<R> = p.iter().zip(&dp).map(|(&pj, &g)| pj * (g - dot)).collect();
    let dx = need_dx.then(|| {
        let mut dx = vec![R::ZERO; n * l * d];
        dx.par_chunks_mut(l * d)
            .zip(dy.par_chunks(d))
            .for_each(|(df, g)| {
                for (j, &pj) in p.iter().enumerate() {
                    for (o, &gv) in df[(first + j) * d..(first + j + 1) * d].iter_mut().zip(g) {
                        *o = pj * gv;
                    }
                }
            });
        dx
    });
    (dw, dx)
}
