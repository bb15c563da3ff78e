//! torch.nn.utils.clip_grad_norm_: total = ||(||g_1||, ..., ||g_n||)||_2,
//! coef = min(max_norm / (total + 1e-6), 1), every gradient *= coef. Returns the total norm.

use crate::autograd::ParamStore;
use crate::error::{Error, Result};
use rayon::prelude::*;

pub fn clip_grad_norm(store: &mut ParamStore, max_norm: f64) -> Result<f64> {
    if max_norm.is_nan() || max_norm <= 0.0 {
        return Err(Error::Config(format!(
            "clip_grad_norm: max_norm must be > 0, got {max_norm}"
        )));
    }
    let norms: Vec<f64> = store.iter().map(|p| sum_squares(&p.grad).sqrt()).collect();
    // Per-tensor norms are f32 tensors in torch; round them as it does before the outer norm.
    let total = norms
        .iter()
        .map(|&n| (n as f32 as f64).powi(2))
        .sum::<f64>()
        .sqrt() as f32 as f64;
    let coef = (max_norm / (total + 1e-6)).min(1.0) as f32;
    let ids: Vec<_> = store.ids().collect();
    // A coefficient of 1 leaves every gradient as it is (g * 1 == g, NaN and -0 included).
    if coef != 1.0 {
        for id in ids {
            (store.get_mut(id).grad.par_iter_mut()).for_each(|g| *g *= coef);
        }
    }
    Ok(total)
}

/// The sum of squares in f64, in a fixed order whatever the thread count: 64K-element chunks in
/// parallel, each over 8 lanes (so that the loop vectorizes) added in lane order, the chunks'
/// sums then in chunk order. 42M gradients (s3prl's ASR head): ~42 ms one element at a time.
fn sum_squares(g: &[f32]) -> f64 {
    const CHUNK: usize = 1 << 16;
    let chunk_sums: Vec<f64> = g
        .par_chunks(CHUNK)
        .map(|c| {
            let mut lanes = [0f64; 8];
            let blocks = c.chunks_exact(8);
            let tail = blocks.remainder();
            for b in blocks {
                for (lane, &x) in lanes.iter_mut().zip(b) {
                    *lane += (x as f64) * (x as f64);
                }
            }
            lanes.iter().sum::<f64>() + tail.iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>()
        })
        .collect();
    chunk_sums.iter().sum()
}
