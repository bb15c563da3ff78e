//! Adam and AdamW as torch.optim's single-tensor implementation (foreach=False, the CPU default):
//!
//!   Adam:  g += wd * p                     AdamW: p *= 1 - lr * wd
//!   m.lerp_(g, 1 - b1);  v = b2 * v + (1 - b2) * g * g
//!   denom = sqrt(v) / sqrt(1 - b2^t) + eps;  p -= lr / (1 - b1^t) * m / denom
//!
//! Scalars (bias corrections, step size) are computed in f64 as Python does and rounded to f32 when
//! they meet a tensor, as PyTorch's CPU kernels do.

use crate::autograd::ParamStore;
use crate::error::{Error, Result};
use rayon::prelude::*;

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// true: AdamW (decoupled decay); false: Adam (L2 added to the gradient).
    pub decoupled: bool,
}

impl AdamConfig {
    /// torch.optim.Adam defaults.
    pub fn adam(lr: f64) -> Self {
        AdamConfig {
            lr,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            decoupled: false,
        }
    }
    /// torch.optim.AdamW defaults (weight_decay 0.01).
    pub fn adamw(lr: f64) -> Self {
        AdamConfig {
            lr,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
            decoupled: true,
        }
    }

    fn validate(&self) -> Result<()> {
        let ok = self.lr >= 0.0
            && (0.0..1.0).contains(&self.beta1)
            && (0.0..1.0).contains(&self.beta2)
            && self.eps >= 0.0
            && self.weight_decay >= 0.0;
        if ok {
            Ok(())
        } else {
            Err(Error::Config(format!("Adam hyper-parameters out of range: {self:?} (need lr >= 0, 0 <= betas < 1, eps >= 0, weight_decay >= 0)")))
        }
    }

    /// The scalars of update `step` (1-based), computed in f64 and rounded to f32: what the CPU
    /// loop below and the device kernels (kernels/adamw.cu) both read, so both paths take the
    /// same step.
    pub fn scalars(&self, step: u64) -> Result<AdamScalars> {
        if step == 0 {
            return Err(Error::Config("Adam: steps count from 1".into()));
        }
        let t = step as f64;
        Ok(AdamScalars {
            step_size: (self.lr / (1.0 - self.beta1.powf(t))) as f32,
            bc2_sqrt: (1.0 - self.beta2.powf(t)).sqrt() as f32,
            one_minus_beta1: (1.0 - self.beta1) as f32,
            beta2: self.beta2 as f32,
            one_minus_beta2: (1.0 - self.beta2) as f32,
            eps: self.eps as f32,
            weight_decay: if self.decoupled {
                0.0
            } else {
                self.weight_decay as f32
            },
            decay: if self.decoupled {
                (1.0 - self.lr * self.weight_decay) as f32
            } else {
                1.0
            },
        })
    }
}

/// One Adam / AdamW update's scalars (see [`AdamConfig::scalars`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamScalars {
    /// lr / (1 - beta1^t).
    pub step_size: f32,
    /// sqrt(1 - beta2^t).
    pub bc2_sqrt: f32,
    pub one_minus_beta1: f32,
    pub beta2: f32,
    pub one_minus_beta2: f32,
    pub eps: f32,
    /// Adam's L2 term added to the gradient (0 for AdamW).
    pub weight_decay: f32,
    /// AdamW's p *= 1 - lr * wd (1 for Adam).
    pub decay: f32,
}

/// Optimizer state: step count and first/second moments per parameter (fp32).
#[derive(Clone, Debug)]
pub struct Adam {
    pub config: AdamConfig,
    pub step: u64,
    pub exp_avg: Vec<Vec<f32>>,
    pub exp_avg_sq: Vec<Vec<f32>>,
}

impl Adam {
    pub fn new(config: AdamConfig, store: &ParamStore) -> Result<Self> {
        config.validate()?;
        // Written zeros: the first step reads and writes every moment (see the helper).
        let zeros = || {
            store
                .iter()
                .map(|p| crate::ops::gemm::zeros_to_accumulate_into::<f32>(p.value.numel()))
                .collect()
        };
        Ok(Adam {
            config,
            step: 0,
            exp_avg: zeros(),
            exp_avg_sq: zeros(),
        })
    }

    pub fn set_lr(&mut self, lr: f64) {
        self.config.lr = lr;
    }

    /// One update of every parameter from its accumulated gradient.
    pub fn step(&mut self, store: &mut ParamStore) -> Result<()> {
        if self.exp_avg.len() != store.len() {
            return Err(Error::Config(format!(
                "optimizer was built for {} parameters but the store has {}",
                self.exp_avg.len(),
                store.len()
            )));
        }
        self.step += 1;
        let s = self.config.scalars(self.step)?;
        for (i, id) in store.ids().collect::<Vec<_>>().into_iter().enumerate() {
            let p = store.get_mut(id);
            if p.frozen {
                continue;
            }
            // The chunks below pair values with gradients and moments: lengths that differ would
            // leave part of the parameter unstepped.
            let numel = p.value.numel();
            if p.grad.len() != numel || self.exp_avg[i].len() != numel {
                return Err(Error::shape(
                    format!("gradient / moments of parameter '{}'", p.name),
                    format!("{numel} values"),
                    format!("{} and {}", p.grad.len(), self.exp_avg[i].len()),
                ));
            }
            let grad = std::mem::take(&mut p.grad);
            let (m, v) = (&mut self.exp_avg[i], &mut self.exp_avg_sq[i]);
            // In place, elementwise, so chunks run in parallel with the same result bit for bit;
            // a 42M-parameter head (s3prl's ASR) took ~250 ms a step in one thread with copies.
            const CHUNK: usize = 1 << 15;
            (p.value.f32_data_mut().par_chunks_mut(CHUNK))
                .zip(grad.par_chunks(CHUNK))
                .zip(m.par_chunks_mut(CHUNK))
                .zip(v.par_chunks_mut(CHUNK))
                .for_each(|(((value, grad), m), v)| update(&s, value, grad, m, v));
            p.grad = grad;
        }
        Ok(())
    }
}

/// One Adam / AdamW update of a run of parameters with their gradients and moments.
fn update(s: &AdamScalars, value: &mut [f32], grad: &[f32], m: &mut [f32], v: &mut [f32]) {
    for j in 0..value.len() {
        let mut g = grad[j];
        if s.decay != 1.0 {
            value[j] *= s.decay;
        }
        if s.weight_decay != 0.0 {
            g += s.weight_decay * value[j];
        }
        // torch.lerp with weight < 0.5: self + weight * (end - self).
        m[j] += s.one_minus_beta1 * (g - m[j]);
        v[j] = v[j] * s.beta2 + s.one_minus_beta2 * g * g;
        let denom = v[j].sqrt() / s.bc2_sqrt + s.eps;
        value[j] += -s.step_size * (m[j] / denom);
    }
}
