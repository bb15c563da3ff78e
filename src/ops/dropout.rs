//! Seeded inverted dropout. The keep decision for element i is a pure function of (seed, i): a
//! counter-based hash, so the mask needs no storage, is reproducible across runs and resumes, and a
//! GPU kernel can regenerate the same mask from the same counter.

use super::Real;

/// SplitMix64 finaliser over (seed, index): a well-mixed 64-bit hash.
#[inline]
fn mix(seed: u64, i: u64) -> u64 {
    let mut z = seed ^ i.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Whether element `i` survives dropout with drop probability `p`.
#[inline]
pub fn keep(seed: u64, i: u64, p: f64) -> bool {
    // Top 53 bits -> uniform in [0, 1).
    let u = (mix(seed, i) >> 11) as f64 * (1.0 / (1u64 << 53) as f64);
    u >= p
}

/// y = x * keep / (1 - p). p == 0 is the identity; p == 1 zeroes everything.
pub fn forward<R: Real>(x: &[R], p: f64, seed: u64) -> Vec<R> {
    scale_by_mask(x, p, seed)
}

/// The same mask and scale applied to the gradient.
pub fn backward<R: Real>(dy: &[R], p: f64, seed: u64) -> Vec<R> {
    scale_by_mask(dy, p, seed)
}

fn scale_by_mask<R: Real>(x: &[R], p: f64, seed: u64) -> Vec<R> {
    if p <= 0.0 {
        return x.to_vec();
    }
    if p >= 1.0 {
        return vec![R::ZERO; x.len()];
    }
    let scale = R::from_f64(1.0 / (1.0 - p));
    x.iter()
        .enumerate()
        .map(|(i, &v)| {
            if keep(seed, i as u64, p) {
                v * scale
            } else {
                R::ZERO
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keep_rate_matches_p_and_is_reproducible() {
        let n = 200_000;
        let kept = (0..n).filter(|&i| keep(7, i, 0.3)).count();
        let rate = kept as f64 / n as f64;
        assert!((rate - 0.7).abs() < 0.005, "keep rate {rate}");
        let a: Vec<f32> = forward(&vec![1.0f32; 1000], 0.5, 11);
        let b: Vec<f32> = forward(&vec![1.0f32; 1000], 0.5, 11);
        let c: Vec<f32> = forward(&vec![1.0f32; 1000], 0.5, 12);
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert!(a.iter().all(|&v| v == 0.0 || v == 2.0));
    }
}
