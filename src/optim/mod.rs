//! Optimizers and gradient utilities, exactly as torch.optim / torch.nn.utils, and learning-rate
//! schedules.

mod adam;
mod clip;
mod schedule;

pub use adam::{Adam, AdamConfig, AdamScalars};
pub use clip::clip_grad_norm;
pub use schedule::{Decay, Schedule};
