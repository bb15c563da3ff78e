//! Optimizers and gradient utilities, exactly as torch.optim / torch.nn.utils.

mod adam;
mod clip;

pub use adam::{Adam, AdamConfig};
pub use clip::clip_grad_norm;
