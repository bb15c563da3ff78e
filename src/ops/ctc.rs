//! Connectionist temporal classification in log space (blank = 0 by default), with PyTorch's
//! `ctc_loss` semantics: 'mean' divides each utterance's loss by its target length (min 1) and then
//! averages over the batch; 'sum' adds them; `zero_infinity` turns an impossible alignment's infinite
//! loss (and its gradient) into zero, but leaves a NaN loss (from NaN log-probabilities) NaN.
//!
//! The gradient returned is the true derivative w.r.t. the log-probabilities. (PyTorch's own
//! `ctc_loss` backward returns the logit gradient assuming a preceding log_softmax; composed with
//! log_softmax both give the same gradient w.r.t. the logits, which is what the tests compare.)

use super::Real;
use rayon::prelude::*;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reduction {
    Mean,
    Sum,
}

pub struct CtcResult<R> {
    /// Negative log-likelihood per utterance (0 where zero_infinity removed an infinite one).
    pub per_utterance: Vec<R>,
    /// The reduced loss.
    pub loss: R,
    /// d loss / d log_probs, packed like the input.
    pub grad: Vec<R>,
}

#[inline]
fn lse2<R: Real>(a: R, b: R) -> R {
    let m = a.max(b);
    if m == R::NEG_INFINITY {
        return m;
    }
    m + ((a - m).exp() + (b - m).exp()).ln()
}

#[inline]
fn lse3<R: Real>(a: R, b: R, c: R) -> R {
    let m = a.max(b).max(c);
    if m == R::NEG_INFINITY {
        return m;
    }
    m + ((a - m).exp() + (b - m).exp() + (c - m).exp()).ln()
}

/// One utterance: log_probs [t, v], target labels. Returns (nll, grad [t, v]).
pub fn utterance<R: Real>(lp: &[R], v: usize, target: &[usize], blank: usize) -> (R, Vec<R>) {
    let t_len = lp.len() / v;
    let s_len = 2 * target.len() + 1;
    let ext = |s: usize| {
        if s.is_multiple_of(2) {
            blank
        } else {
            target[s / 2]
        }
    };
    // A skip from s-2 to s is allowed onto a label that differs from the label two back.
    let can_skip = |s: usize| s >= 2 && s % 2 == 1 && ext(s) != ext(s - 2);
    let ninf = R::NEG_INFINITY;
    let mut alpha = vec![ninf; t_len * s_len];
    let mut beta = vec![ninf; t_len * s_len];
    alpha[0] = lp[blank];
    if s_len > 1 {
        alpha[1] = lp[ext(1)];
    }
    for t in 1..t_len {
        let (prev, cur) = alpha.split_at_mut(t * s_len);
        let prev = &prev[(t - 1) * s_len..];
        for s in 0..s_len {
            let a = prev[s];
            let b = if s >= 1 { prev[s - 1] } else { ninf };
            let c = if can_skip(s) { prev[s - 2] } else { ninf };
            cur[s] = lse3(a, b, c) + lp[t * v + ext(s)];
        }
    }
    let last = (t_len - 1) * s_len;
    let nll = -if s_len > 1 {
        lse2(alpha[last + s_len - 1], alpha[last + s_len - 2])
    } else {
        alpha[last]
    };
    beta[last + s_len - 1] = lp[(t_len - 1) * v + ext(s_len - 1)];
    if s_len > 1 {
        beta[last + s_len - 2] = lp[(t_len - 1) * v + ext(s_len - 2)];
    }
    for t in (0..t_len - 1).rev() {
        let (cur, next) = beta.split_at_mut((t + 1) * s_len);
        let cur = &mut cur[t * s_len..];
        for s in 0..s_len {
            let a = next[s];
            let b = if s + 1 < s_len { next[s + 1] } else { ninf };
            let c = if s + 2 < s_len && can_skip(s + 2) {
                next[s + 2]
            } else {
                ninf
            };
            cur[s] = lse3(a, b, c) + lp[t * v + ext(s)];
        }
    }
    let mut grad = vec![R::ZERO; t_len * v];
    if !nll.is_finite() {
        return (nll, grad);
    }
    let mut acc = vec![ninf; v];
    for t in 0..t_len {
        acc.iter_mut().for_each(|a| *a = ninf);
        for s in 0..s_len {
            let c = ext(s);
            acc[c] = lse2(acc[c], alpha[t * s_len + s] + beta[t * s_len + s]);
        }
        for c in 0..v {
            if acc[c] != ninf {
                grad[t * v + c] = -(acc[c] - lp[t * v + c] + nll).exp();
            }
        }
    }
    (nll, grad)
}

/// A packed batch: log_probs [frames, v] with `input_offsets` (cu_seqlens), targets concatenated
/// with `target_offsets`. Inputs must already be validated (see `crate::loss::ctc_loss`).
#[allow(clippy::too_many_arguments)]
pub fn forward_backward<R: Real>(
    lp: &[R],
    v: usize,
    input_offsets: &[usize],
    targets: &[usize],
    target_offsets: &[usize],
    blank: usize,
    reduction: Reduction,
    zero_infinity: bool,
) -> CtcResult<R> {
    let b = input_offsets.len() - 1;
    let per: Vec<(R, Vec<R>)> = (0..b)
        .into_par_iter()
        .map(|u| {
            let x = &lp[input_offsets[u] * v..input_offsets[u + 1] * v];
            utterance(
                x,
                v,
                &targets[target_offsets[u]..target_offsets[u + 1]],
                blank,
            )
        })
        .collect();
    let mut per_utterance = Vec::with_capacity(b);
    let mut grad = Vec::with_capacity(lp.len());
    let mut loss = R::ZERO;
    for (u, (nll, mut g)) in per.into_iter().enumerate() {
        let weight = match reduction {
            Reduction::Mean => {
                let tl = (target_offsets[u + 1] - target_offsets[u]).max(1);
                R::ONE / R::from_f64((tl * b) as f64)
            }
            Reduction::Sum => R::ONE,
        };
        // Only an infinite loss (an impossible alignment) is zeroed: a NaN one (NaN log-probs, a
        // diverged model) stays NaN with a NaN gradient, as in PyTorch, so that it is seen.
        let nll = if zero_infinity && -nll == R::NEG_INFINITY {
            R::ZERO
        } else {
            nll
        };
        if nll.is_finite() {
            g.iter_mut().for_each(|x| *x *= weight);
        } else {
            // Without zero_infinity an impossible alignment has no gradient: report NaN rather
            // than a plausible-looking number (the loss itself is +inf).
            g.iter_mut().for_each(|x| *x = R::from_f64(f64::NAN));
        }
        loss += nll * weight;
        per_utterance.push(nll);
        grad.extend(g);
    }
    CtcResult {
        per_utterance,
        loss,
        grad,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Brute force: enumerate every path of length T over V symbols and sum those that collapse to
    /// the target.
    fn brute_force(lp: &[f64], v: usize, target: &[usize]) -> f64 {
        let t = lp.len() / v;
        let mut total = 0.0;
        let mut path = vec![0usize; t];
        loop {
            let mut collapsed = Vec::new();
            let mut prev = usize::MAX;
            for &c in &path {
                if c != prev && c != 0 {
                    collapsed.push(c);
                }
                prev = c;
            }
            if collapsed == target {
                total += path
                    .iter()
                    .enumerate()
                    .map(|(i, &c)| lp[i * v + c])
                    .sum::<f64>()
                    .exp();
            }
            let mut i = 0;
            loop {
                if i == t {
                    return -total.ln();
                }
                path[i] += 1;
                if path[i] < v {
                    break;
                }
                path[i] = 0;
                i += 1;
            }
        }
    }

    #[test]
    fn matches_brute_force_enumeration() {
        let v = 3;
        for (t, target) in [
            (4usize, vec![1usize, 1]),
            (5, vec![1, 2, 1]),
            (3, vec![2]),
            (4, vec![]),
            (3, vec![1, 1]),
        ] {
            let raw: Vec<f64> = (0..t * v)
                .map(|i| ((i * 7 + 3) % 11) as f64 * 0.3)
                .collect();
            let lp = crate::ops::softmax::log_softmax_forward(&raw, v);
            let (nll, _) = utterance(&lp, v, &target, 0);
            let bf = brute_force(&lp, v, &target);
            assert!(
                (nll - bf).abs() < 1e-10,
                "T={t} target={target:?}: {nll} vs {bf}"
            );
        }
    }

    #[test]
    fn impossible_alignment_is_infinite() {
        let lp = crate::ops::softmax::log_softmax_forward(&[0.1f64, 0.2, 0.3, 0.4, 0.5, 0.6], 3);
        // "1 1" needs a blank between the repeats: 3 frames, only 2 given.
        let (nll, _) = utterance(&lp, 3, &[1, 1], 0);
        assert!(nll.is_infinite());
    }
}
