//! Softmax + cross-entropy + dlogits fused in one pass over each row (as llm.c does), with
//! PyTorch's 'mean' (over the batch) and 'sum' reductions.

use super::Real;
use crate::ops::ctc::Reduction;

/// logits [b, c], labels [b] (already checked < c). Returns (loss, dlogits for dloss = 1).
pub fn forward_backward<R: Real>(
    logits: &[R],
    c: usize,
    labels: &[usize],
    reduction: Reduction,
) -> (R, Vec<R>) {
    let b = labels.len();
    let scale = match reduction {
        Reduction::Mean => R::ONE / R::from_f64(b as f64),
        Reduction::Sum => R::ONE,
    };
    let mut total = R::ZERO;
    let mut grad = vec![R::ZERO; b * c];
    for ((row, g), &y) in logits
        .chunks_exact(c)
        .zip(grad.chunks_exact_mut(c))
        .zip(labels)
    {
        let m = row.iter().fold(R::NEG_INFINITY, |a, &v| a.max(v));
        let s: R = row.iter().map(|&v| (v - m).exp()).sum();
        let lse = s.ln() + m;
        total += lse - row[y];
        for (gi, &v) in g.iter_mut().zip(row) {
            *gi = (v - m).exp() / s * scale;
        }
        g[y] -= scale;
    }
    (total * scale, grad)
}
