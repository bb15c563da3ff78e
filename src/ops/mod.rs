//! CPU reference ops: one op family per file, each a plain forward and backward over slices.
//!
//! Every op is generic over [`Real`] so the same code runs in f32 (the engine) and in f64 (the
//! finite-difference gradient checks). These are the references the CUDA kernels are tested against.

pub mod activation;
pub mod attention;
pub mod conv2d;
pub mod cross_entropy;
pub mod ctc;
pub mod device;
pub mod dropout;
pub mod fastmath;
pub mod gemm;
pub mod layer_conv;
pub mod layer_sum;
pub mod layernorm;
pub mod linear;
pub mod lstm;
pub mod pooling;
pub mod resample;
pub mod shape;
pub mod softmax;
pub mod speaker;
pub mod symmetric_eigen;

use std::fmt::Debug;
use std::iter::Sum;
use std::ops::{Add, AddAssign, Div, Mul, MulAssign, Neg, Sub, SubAssign};

/// Splits `x` into consecutive mutable pieces of the given lengths (one per utterance of a packed
/// batch, to fill in parallel).
pub(crate) fn split_mut<R>(mut x: &mut [R], lengths: impl Iterator<Item = usize>) -> Vec<&mut [R]> {
    let mut parts = Vec::new();
    for n in lengths {
        let (a, b) = std::mem::take(&mut x).split_at_mut(n);
        parts.push(a);
        x = b;
    }
    parts
}

/// The float types the reference ops compute in.
pub trait Real:
    Copy
    + Debug
    + Default
    + PartialOrd
    + Send
    + Sync
    + Sum
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
    + Neg<Output = Self>
    + AddAssign
    + SubAssign
    + MulAssign
    + 'static
{
    const ZERO: Self;
    const ONE: Self;
    const NEG_INFINITY: Self;
    fn from_f64(v: f64) -> Self;
    fn to_f64(self) -> f64;
    fn exp(self) -> Self;
    fn ln(self) -> Self;
    fn sqrt(self) -> Self;
    fn erf(self) -> Self;
    fn tanh(self) -> Self;
    fn max(self, o: Self) -> Self;
    fn is_finite(self) -> bool;
    /// In-place GELU over a slice (f32: vectorized with runtime CPU dispatch).
    fn gelu_slice(x: &mut [Self]) {
        let half = Self::from_f64(0.5);
        let inv_sqrt2 = Self::from_f64(std::f64::consts::FRAC_1_SQRT_2);
        for v in x.iter_mut() {
            *v = *v * half * (Self::ONE + (*v * inv_sqrt2).erf());
        }
    }
    /// One softmax row, y = exp(x - max x) / sum (f32: vectorized with runtime CPU dispatch).
    fn softmax_row(x: &[Self], y: &mut [Self]) {
        let m = x.iter().fold(Self::NEG_INFINITY, |a, &b| a.max(b));
        for (o, &v) in y.iter_mut().zip(x) {
            *o = (v - m).exp();
        }
        let s: Self = y.iter().copied().sum();
        let inv = Self::ONE / s;
        for o in y.iter_mut() {
            *o *= inv;
        }
    }
    /// `c[m,n] = a[m,k] · b[n,k]^T` where m is a few rows (a recurrence's step): f32 reads each
    /// row of b once ([`gemm::gemm_nt_few_rows`]) where that beats the `gemm` crate.
    fn gemm_nt_rows(m: usize, k: usize, n: usize, a: &[Self], b: &[Self], c: &mut [Self]) {
        gemm::gemm(m, k, n, a, gemm::Trans::N, b, gemm::Trans::T, Self::ZERO, c)
    }
    /// C[m,n] = alpha * A·B + beta * C with explicit element strides (C's column stride is 1).
    ///
    /// # Safety
    /// Every index the strides reach must lie inside its slice: `a[i*rsa + p*csa]` for i < m,
    /// p < k; `b[p*rsb + j*csb]` for p < k, j < n; `c[i*rsc + j]` for i < m, j < n. Prefer the
    /// checked [`gemm::gemm`].
    #[allow(clippy::too_many_arguments)]
    unsafe fn gemm_raw(
        m: usize,
        k: usize,
        n: usize,
        alpha: Self,
        a: &[Self],
        rsa: isize,
        csa: isize,
        b: &[Self],
        rsb: isize,
        csb: isize,
        beta: Self,
        c: &mut [Self],
        rsc: isize,
    );
}

macro_rules! impl_real {
    ($t:ty, $erf:path, $exp:path, $tanh:path, { $($extra:item)* }) => {
        impl Real for $t {
            const ZERO: Self = 0.0;
            const ONE: Self = 1.0;
            const NEG_INFINITY: Self = <$t>::NEG_INFINITY;
            #[inline]
            fn from_f64(v: f64) -> Self {
                v as $t
            }
            #[inline]
            fn to_f64(self) -> f64 {
                self as f64
            }
            #[inline]
            fn exp(self) -> Self {
                $exp(self)
            }
            #[inline]
            fn ln(self) -> Self {
                <$t>::ln(self)
            }
            #[inline]
            fn sqrt(self) -> Self {
                <$t>::sqrt(self)
            }
            #[inline]
            fn erf(self) -> Self {
                $erf(self)
            }
            #[inline]
            fn tanh(self) -> Self {
                $tanh(self)
            }
            #[inline]
            fn max(self, o: Self) -> Self {
                <$t>::max(self, o)
            }
            #[inline]
            fn is_finite(self) -> bool {
                <$t>::is_finite(self)
            }
            $($extra)*
            unsafe fn gemm_raw(
                m: usize,
                k: usize,
                n: usize,
                alpha: Self,
                a: &[Self],
                rsa: isize,
                csa: isize,
                b: &[Self],
                rsb: isize,
                csb: isize,
                beta: Self,
                c: &mut [Self],
                rsc: isize,
            ) {
                if m == 0 || n == 0 {
                    return;
                }
                // Small products are not worth waking the thread pool for.
                let par = if m * n * k < 1 << 18 {
                    ::gemm::Parallelism::None
                } else {
                    ::gemm::Parallelism::Rayon(0)
                };
                // SAFETY: the caller upholds the bounds contract of `Real::gemm_raw`.
                // gemm's convention: dst = alpha * dst + beta * lhs * rhs; read_dst = false ignores dst.
                unsafe {
                    ::gemm::gemm(
                        m,
                        n,
                        k,
                        c.as_mut_ptr(),
                        1,
                        rsc,
                        beta != Self::ZERO,
                        a.as_ptr(),
                        csa,
                        rsa,
                        b.as_ptr(),
                        csb,
                        rsb,
                        beta,
                        alpha,
                        false,
                        false,
                        false,
                        par,
                    )
                }
            }
        }
    };
}

impl_real!(
    f32,
    fastmath::erf_f32,
    fastmath::exp_f32,
    fastmath::tanh_f32,
    {
        fn gelu_slice(x: &mut [f32]) {
            fastmath::gelu_slice(x)
        }
        fn softmax_row(x: &[f32], y: &mut [f32]) {
            fastmath::softmax_row(x, y)
        }
        fn gemm_nt_rows(m: usize, k: usize, n: usize, a: &[f32], b: &[f32], c: &mut [f32]) {
            // Measured on the 2-core VM: 4-8x the gemm crate at m = 8, even at m = 32, behind it
            // from m = 64 at k = 1024 (gemm's packing of b pays off there). Only on FMA hardware.
            if m <= 32 && gemm::few_rows_is_fast() {
                gemm::gemm_nt_few_rows(m, k, n, a, b, c)
            } else {
                gemm::gemm(m, k, n, a, gemm::Trans::N, b, gemm::Trans::T, 0.0, c)
            }
        }
    }
);
impl_real!(f64, libm::erf, f64::exp, f64::tanh, {});
