//! Recognition metrics: greedy CTC decoding (s3prl: argmax, unique_consecutive, drop the blank)
//! and edit-distance error rates (PER / CER / WER); verification's cosine scores and equal error
//! rate.

/// Greedy CTC decoding of log-probabilities [frames, v].
pub fn ctc_greedy_decode(log_probs: &[f32], v: usize, blank: usize) -> Vec<usize> {
    let mut out = Vec::new();
    let mut prev = usize::MAX;
    for row in log_probs.chunks_exact(v) {
        let best = row
            .iter()
            .enumerate()
            .fold(
                (0, f32::NEG_INFINITY),
                |b, (i, &x)| if x > b.1 { (i, x) } else { b },
            )
            .0;
        if best != prev && best != blank {
            out.push(best);
        }
        prev = best;
    }
    out
}

/// Levenshtein distance (substitutions, insertions and deletions all cost 1).
pub fn edit_distance<T: PartialEq>(hyp: &[T], reference: &[T]) -> usize {
    let mut prev: Vec<usize> = (0..=reference.len()).collect();
    let mut cur = vec![0; reference.len() + 1];
    for (i, h) in hyp.iter().enumerate() {
        cur[0] = i + 1;
        for (j, r) in reference.iter().enumerate() {
            cur[j + 1] = (prev[j] + usize::from(h != r))
                .min(prev[j + 1] + 1)
                .min(cur[j] + 1);
        }
        std::mem::swap(&mut prev, &mut cur);
    }
    prev[reference.len()]
}

/// Errors accumulated over a test set; `rate()` is errors / reference length (0 for no reference).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ErrorRate {
    pub errors: usize,
    pub reference_len: usize,
}

impl ErrorRate {
    pub fn add<T: PartialEq>(&mut self, hyp: &[T], reference: &[T]) {
        self.errors += edit_distance(hyp, reference);
        self.reference_len += reference.len();
    }
    pub fn rate(&self) -> f64 {
        if self.reference_len == 0 {
            0.0
        } else {
            self.errors as f64 / self.reference_len as f64
        }
    }
}

/// The words of a character-token sequence: the runs between word separators (`|`, the chars
/// task's space), empty runs dropped, as s3prl's WER splits decoded text on whitespace.
pub fn words_of(chars: &[String], separator: &str) -> Vec<String> {
    chars
        .split(|c| c == separator)
        .filter(|w| !w.is_empty())
        .map(|w| w.concat())
        .collect()
}

/// Cosine similarity of two embeddings (0 when either is all zeros).
pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum();
    let na: f64 = a.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
    if na == 0.0 || nb == 0.0 {
        0.0
    } else {
        dot / (na * nb)
    }
}

/// The equal error rate of verification `scores` (higher = more likely the same speaker) with
/// `targets` (true = same speaker), as s3prl computes it: sklearn's ROC curve (one point per
/// distinct score, from the highest), then the false-positive rate where the linearly
/// interpolated curve meets tpr = 1 - fpr (scipy's brentq on interp1d). None without at least
/// one target and one nontarget trial.
pub fn equal_error_rate(scores: &[f64], targets: &[bool]) -> Option<f64> {
    let positives = targets.iter().filter(|&&t| t).count();
    let negatives = targets.len() - positives;
    if positives == 0 || negatives == 0 || scores.len() != targets.len() {
        return None;
    }
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&x, &y| scores[y].total_cmp(&scores[x]));
    let (mut tp, mut fp) = (0usize, 0usize);
    let (mut f0, mut t0) = (0f64, 0f64);
    let mut i = 0;
    while i < order.len() {
        // Every trial scoring this value crosses the threshold together.
        let s = scores[order[i]];
        while i < order.len() && scores[order[i]] == s {
            if targets[order[i]] {
                tp += 1;
            } else {
                fp += 1;
            }
            i += 1;
        }
        let (f1, t1) = (fp as f64 / negatives as f64, tp as f64 / positives as f64);
        let (g0, g1) = (1.0 - f0 - t0, 1.0 - f1 - t1);
        if g1 <= 0.0 {
            // g falls from g0 > 0 to g1 <= 0 along this segment.
            let alpha = g0 / (g0 - g1);
            return Some(f0 + alpha * (f1 - f0));
        }
        (f0, t0) = (f1, t1);
    }
    unreachable!("the curve ends at (1, 1), where 1 - fpr - tpr = -1")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_split_at_separators_and_skip_empty_runs() {
        let t = |s: &str| s.chars().map(|c| c.to_string()).collect::<Vec<_>>();
        assert_eq!(words_of(&t("ab|c"), "|"), ["ab", "c"]);
        assert_eq!(words_of(&t("|ab||c|"), "|"), ["ab", "c"]);
        assert!(words_of(&t("||"), "|").is_empty());
        let mut wer = ErrorRate::default();
        wer.add(&words_of(&t("the|cat"), "|"), &words_of(&t("the|hat"), "|"));
        assert_eq!((wer.errors, wer.reference_len), (1, 2));
    }

    #[test]
    fn edit_distance_cases() {
        assert_eq!(edit_distance(&[1, 2, 3], &[1, 2, 3]), 0);
        assert_eq!(edit_distance(&[1, 3], &[1, 2, 3]), 1);
        assert_eq!(edit_distance(&[1, 2, 4, 3], &[1, 2, 3]), 1);
        assert_eq!(edit_distance::<u8>(&[], &[1, 2]), 2);
        assert_eq!(
            edit_distance(
                &"kitten".chars().collect::<Vec<_>>(),
                &"sitting".chars().collect::<Vec<_>>()
            ),
            3
        );
    }

    #[test]
    fn greedy_decode_collapses_repeats_and_drops_blanks() {
        // frames argmax: 1 1 0 1 2 2 0 -> 1 1 2
        let v = 3;
        let hot = |c: usize| {
            (0..v)
                .map(|i| if i == c { 0.0 } else { -5.0 })
                .collect::<Vec<f32>>()
        };
        let lp: Vec<f32> = [1, 1, 0, 1, 2, 2, 0].iter().flat_map(|&c| hot(c)).collect();
        assert_eq!(ctc_greedy_decode(&lp, v, 0), vec![1, 1, 2]);
    }
}
