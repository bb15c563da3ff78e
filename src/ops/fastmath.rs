//! f32 `exp` and `erf` written as straight-line arithmetic and bit casts, so loops over them
//! auto-vectorize (the libm versions are opaque calls: ~13% of an upstream forward went to them).
//!
//! - `exp_f32`: Cephes' expf (Cody-Waite reduction, degree-6 polynomial), < 2 ulp; results that
//!   would be denormal (x < -87.3) flush to 0.
//! - `erf_f32`: Abramowitz & Stegun 7.1.26 for |x| >= 0.5 and the Maclaurin series below;
//!   |error| < 2.5e-7 (tested against f64 erf on a fine grid).
//!
//! f64 keeps libm (the finite-difference gradient checks need its accuracy).

const LOG2E: f32 = std::f32::consts::LOG2_E;
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
/// Adding then subtracting 1.5 * 2^23 rounds to the nearest integer with plain adds.
const ROUND_MAGIC: f32 = 12_582_912.0;

#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    // Branch-free (selects), so loops vectorize. Results below the smallest normal float
    // (x < -87.3) flush to 0: an absolute error under 1.2e-38. NaN propagates.
    let y = exp_core(x.clamp(-87.3, 88.0));
    if x < -87.3 {
        0.0
    } else if x > 88.0 {
        f32::INFINITY
    } else {
        y
    }
}

/// The bits of ROUND_MAGIC: a float k + ROUND_MAGIC (|k| < 2^22, integer) has bits MAGIC_BITS + k.
const ROUND_MAGIC_BITS: i32 = 0x4b40_0000;

#[inline(always)]
fn exp_core(x: f32) -> f32 {
    let shifted = x * LOG2E + ROUND_MAGIC;
    let n = shifted - ROUND_MAGIC;
    // n as an integer, read off the shifted float's bits: `n as i32` is a saturating,
    // NaN-checking cast that LLVM does one lane at a time, which cost the GELU and softmax loops
    // their vectorization. (The same n: x is clamped to [-87.3, 88], so |n| <= 127.)
    let ni = shifted.to_bits() as i32 - ROUND_MAGIC_BITS;
    let r = x - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_2e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 0.166_666_65;
    p = p * r + 0.5;
    (p * r * r + r + 1.0) * f32::from_bits(((ni + 127) << 23) as u32)
}

#[inline(always)]
pub fn erf_f32(x: f32) -> f32 {
    let a = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let r =
        (((1.061_405_4 * t - 1.453_152) * t + 1.421_413_8) * t - 0.284_496_74) * t + 0.254_829_6;
    let large = (1.0 - r * t * exp_core((-a * a).max(-87.0))).copysign(x);
    // Near 0 the formula is 1 - (nearly 1): its cancellation costs ~4 ulp there, so |x| < 0.5 uses
    // the Maclaurin series 2/sqrt(pi) * sum (-1)^n x^(2n+1) / (n! (2n+1)) (truncation < 1e-9).
    let z = x * x;
    let series = x
        * std::f32::consts::FRAC_2_SQRT_PI
        * (1.0
            + z * (-1.0 / 3.0
                + z * (1.0 / 10.0
                    + z * (-1.0 / 42.0
                        + z * (1.0 / 216.0 + z * (-1.0 / 1320.0 + z * (1.0 / 9360.0)))))));
    if a < 0.5 {
        series
    } else {
        large
    }
}

/// Cephes' tanhf: an odd polynomial below |x| = 0.625, 1 - 2 / (exp(2|x|) + 1) above, +-1 past
/// |x| = 44 (where exp(2|x|) would overflow: tanh is 1 in f32 from |x| ~ 9). Branch-free.
#[inline(always)]
pub fn tanh_f32(x: f32) -> f32 {
    let a = x.abs();
    let z = x * x;
    let small =
        ((((-5.704_988_7e-3 * z + 2.063_909e-2) * z - 5.373_971_6e-2) * z + 1.333_144_2e-1) * z
            - 3.333_328e-1)
            * z
            * x
            + x;
    // A select, not f32::min: NaN must stay NaN.
    let clamped = if a > 44.0 { 44.0 } else { a };
    let large = (1.0 - 2.0 / (exp_core(2.0 * clamped) + 1.0)).copysign(x);
    if a < 0.625 {
        small
    } else {
        large
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_within_two_ulp_and_handles_the_ends() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let want = (x as f64).exp();
            let got = exp_f32(x) as f64;
            worst = worst.max(((got - want) / want).abs());
            x += 0.0137;
        }
        assert!(worst < 2.5e-7, "exp relative error {worst:.3e}");
        assert_eq!(exp_f32(-200.0), 0.0);
        assert_eq!(exp_f32(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_f32(100.0), f32::INFINITY);
        assert!(exp_f32(f32::NAN).is_nan());
        assert_eq!(exp_f32(0.0), 1.0);
        assert_eq!(exp_f32(-95.0), 0.0, "denormal results flush to zero");
    }

    #[test]
    fn tanh_is_within_three_ulp() {
        let mut worst = 0f64;
        let mut x = -12.0f32;
        while x < 12.0 {
            let want = (x as f64).tanh();
            let got = tanh_f32(x) as f64;
            if want != 0.0 {
                worst = worst.max(((got - want) / want).abs());
            }
            x += 0.000_731;
        }
        assert!(worst < 3.6e-7, "tanh relative error {worst:.3e}");
        assert_eq!(tanh_f32(0.0), 0.0);
        assert_eq!(tanh_f32(1e-30), 1e-30);
        assert_eq!(tanh_f32(100.0), 1.0);
        assert_eq!(tanh_f32(f32::NEG_INFINITY), -1.0);
        assert!(tanh_f32(f32::NAN).is_nan());
    }

    #[test]
    fn erf_is_within_abramowitz_stegun_bound() {
        let mut worst = 0f64;
        let mut x = -7.0f32;
        while x < 7.0 {
            worst = worst.max((erf_f32(x) as f64 - libm::erf(x as f64)).abs());
            x += 0.00071;
        }
        assert!(worst < 2.5e-7, "erf absolute error {worst:.3e}");
        assert_eq!(erf_f32(0.0), 0.0);
        assert!(erf_f32(f32::NAN).is_nan());
        assert_eq!(erf_f32(f32::INFINITY), 1.0);
    }
}

/// Runtime CPU dispatch: the same inlined loop compiled for AVX-512, AVX2+FMA, or the baseline.
/// Rust never contracts a*b+c into an FMA on its own, so all three give identical bits.
macro_rules! dispatch {
    ($(#[$doc:meta])* $name:ident => $generic:ident ($($arg:ident : $ty:ty),*)) => {
        $(#[$doc])*
        pub fn $name($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            {
                if std::arch::is_x86_feature_detected!("avx512f") {
                    #[target_feature(enable = "avx512f")]
                    unsafe fn wide($($arg: $ty),*) {
                        $generic($($arg),*)
                    }
                    // SAFETY: the CPU has AVX-512F (checked just above).
                    return unsafe { wide($($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                    #[target_feature(enable = "avx2,fma")]
                    unsafe fn avx2($($arg: $ty),*) {
                        $generic($($arg),*)
                    }
                    // SAFETY: the CPU has AVX2 and FMA (checked just above).
                    return unsafe { avx2($($arg),*) };
                }
            }
            $generic($($arg),*)
        }
    };
}

#[inline(always)]
fn gelu_generic(x: &mut [f32]) {
    for v in x.iter_mut() {
        *v = *v * 0.5 * (1.0 + erf_f32(*v * std::f32::consts::FRAC_1_SQRT_2));
    }
}

/// Lanes of the softmax's partial max and sum: one AVX-512 register of f32.
const LANES: usize = 16;

#[inline(always)]
fn softmax_row_generic(x: &[f32], y: &mut [f32]) {
    assert_eq!(x.len(), y.len(), "softmax_row: x and y differ in length");
    // The max lane-wise, then across lanes: exact in any order.
    let body = x.len() - x.len() % LANES;
    let mut lane_max = [f32::NEG_INFINITY; LANES];
    for c in x[..body].chunks_exact(LANES) {
        for i in 0..LANES {
            lane_max[i] = lane_max[i].max(c[i]);
        }
    }
    let m = x[body..]
        .iter()
        .chain(&lane_max)
        .fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    // The sum as LANES partial sums added in a fixed order: the same bits on every CPU, and a
    // loop that vectorizes (one running sum is a chain of dependent adds).
    let mut lane_sum = [0f32; LANES];
    let (y_body, y_tail) = y.split_at_mut(body);
    for (o, c) in y_body
        .chunks_exact_mut(LANES)
        .zip(x[..body].chunks_exact(LANES))
    {
        for i in 0..LANES {
            let e = exp_f32(c[i] - m);
            o[i] = e;
            lane_sum[i] += e;
        }
    }
    let mut s = 0f32;
    for (o, &v) in y_tail.iter_mut().zip(&x[body..]) {
        *o = exp_f32(v - m);
        s += *o;
    }
    let s = lane_sum.iter().fold(s, |a, &b| a + b);
    let inv = 1.0 / s;
    for o in y.iter_mut() {
        *o *= inv;
    }
}

dispatch!(
    /// In-place exact GELU, x * 0.5 * (1 + erf(x / sqrt(2))).
    gelu_slice => gelu_generic(x: &mut [f32])
);
dispatch!(
    /// One softmax row, y = exp(x - max x) / sum: x and y of the same length.
    softmax_row => softmax_row_generic(x: &[f32], y: &mut [f32])
);
