//! Elementwise activations: ReLU and the exact (erf) GELU used by HuBERT/WavLM and `nn.GELU()`.

use super::Real;

pub fn relu_forward<R: Real>(x: &[R]) -> Vec<R> {
    x.iter()
        .map(|&v| if v > R::ZERO { v } else { R::ZERO })
        .collect()
}

/// Takes the forward OUTPUT (y > 0 exactly where x > 0), so x need not be kept.
pub fn relu_backward<R: Real>(y: &[R], dy: &[R]) -> Vec<R> {
    y.iter()
        .zip(dy)
        .map(|(&y, &g)| if y > R::ZERO { g } else { R::ZERO })
        .collect()
}

/// `x * 0.5 * (1 + erf(x / sqrt(2)))`, in PyTorch's CPU operation order.
pub fn gelu_forward<R: Real>(x: &[R]) -> Vec<R> {
    let mut y = x.to_vec();
    gelu_in_place(&mut y);
    y
}

/// [`gelu_forward`] overwriting its input.
pub fn gelu_in_place<R: Real>(x: &mut [R]) {
    R::gelu_slice(x)
}

/// d/dx GELU = Phi(x) + x * phi(x).
pub fn gelu_backward<R: Real>(x: &[R], dy: &[R]) -> Vec<R> {
    let half = R::from_f64(0.5);
    let inv_sqrt2 = R::from_f64(std::f64::consts::FRAC_1_SQRT_2);
    let inv_sqrt_2pi =
        R::from_f64(0.5 * std::f64::consts::FRAC_2_SQRT_PI * std::f64::consts::FRAC_1_SQRT_2);
    x.iter()
        .zip(dy)
        .map(|(&v, &g)| {
            let cdf = half * (R::ONE + (v * inv_sqrt2).erf());
            let pdf = (-half * v * v).exp() * inv_sqrt_2pi;
            g * (cdf + v * pdf)
        })
        .collect()
}
