//! torch.nn.utils.clip_grad_norm_: total = ||(||g_1||, ..., ||g_n||)||_2,
//! coef = min(max_norm / (total + 1e-6), 1), every gradient *= coef. Returns the total norm.

use crate::autograd::ParamStore;
use crate::error::{Error, Result};

pub fn clip_grad_norm(store: &mut ParamStore, max_norm: f64) -> Result<f64> {
    if max_norm.is_nan() || max_norm <= 0.0 {
        return Err(Error::Config(format!(
            "clip_grad_norm: max_norm must be > 0, got {max_norm}"
        )));
    }
    let norms: Vec<f64> = store
        .iter()
        .map(|p| {
            p.grad
                .iter()
                .map(|&g| (g as f64) * (g as f64))
                .sum::<f64>()
                .sqrt()
        })
        .collect();
    // Per-tensor norms are f32 tensors in torch; round them as it does before the outer norm.
    let total = norms
        .iter()
        .map(|&n| (n as f32 as f64).powi(2))
        .sum::<f64>()
        .sqrt() as f32 as f64;
    let coef = (max_norm / (total + 1e-6)).min(1.0) as f32;
    let ids: Vec<_> = store.ids().collect();
    for id in ids {
        store.get_mut(id).grad.iter_mut().for_each(|g| *g *= coef);
    }
    Ok(total)
}
