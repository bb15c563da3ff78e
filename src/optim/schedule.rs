//! Learning-rate schedules: the rate of optimizer step `step` (0-based) of `total`, as a pure
//! function of the step, so a resumed run follows exactly the same rates.
//!
//! Warm-up is linear from lr / warmup to lr over the first `warmup` steps (as
//! transformers' get_*_schedule_with_warmup at step + 1); then constant, linear decay to 0 at
//! `total`, or half-cosine decay to 0 at `total`.

use crate::error::{Error, Result};

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Decay {
    Constant,
    Linear,
    Cosine,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Schedule {
    pub lr: f64,
    pub warmup: u64,
    pub decay: Decay,
    pub total: u64,
}

impl Schedule {
    pub fn constant(lr: f64) -> Self {
        Schedule {
            lr,
            warmup: 0,
            decay: Decay::Constant,
            total: 1,
        }
    }

    /// `name`: constant, linear or cosine.
    pub fn parse(name: &str, lr: f64, warmup: u64, total: u64) -> Result<Self> {
        let decay = match name {
            "constant" => Decay::Constant,
            "linear" => Decay::Linear,
            "cosine" => Decay::Cosine,
            other => {
                return Err(Error::Config(format!(
                    "unknown schedule '{other}': use constant, linear or cosine"
                )))
            }
        };
        if !(lr.is_finite() && lr > 0.0) {
            return Err(Error::Config(format!(
                "the learning rate must be a positive number, got {lr}"
            )));
        }
        if warmup > total {
            return Err(Error::Config(format!(
                "warm-up ({warmup} steps) is longer than the run ({total} steps)"
            )));
        }
        Ok(Schedule {
            lr,
            warmup,
            decay,
            total,
        })
    }

    pub fn lr_at(&self, step: u64) -> f64 {
        if step < self.warmup {
            return self.lr * (step + 1) as f64 / self.warmup as f64;
        }
        let span = self.total.saturating_sub(self.warmup).max(1) as f64;
        let progress = ((step - self.warmup) as f64 / span).min(1.0);
        match self.decay {
            Decay::Constant => self.lr,
            Decay::Linear => self.lr * (1.0 - progress),
            Decay::Cosine => self.lr * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_decay() {
        let s = Schedule::parse("linear", 1.0, 4, 14).unwrap();
        let lrs: Vec<f64> = (0..14).map(|t| s.lr_at(t)).collect();
        assert_eq!(&lrs[..5], &[0.25, 0.5, 0.75, 1.0, 1.0]);
        assert!((lrs[9] - 0.5).abs() < 1e-12 && (lrs[13] - 0.1).abs() < 1e-12);
        let c = Schedule::parse("cosine", 2.0, 0, 10).unwrap();
        assert_eq!(c.lr_at(0), 2.0);
        assert!((c.lr_at(5) - 1.0).abs() < 1e-12);
        assert_eq!(Schedule::constant(3.0).lr_at(1000), 3.0);
        assert!(Schedule::parse("step", 1.0, 0, 10).is_err());
        assert!(Schedule::parse("linear", 1.0, 11, 10).is_err());
        assert!(Schedule::parse("linear", f64::NAN, 0, 10).is_err());
    }
}
