//! WeightedSum, exactly s3prl's Featurizer: logits w = zeros(L), out = sum_l softmax(w)_l * h_l.

use super::{softmax_weights, Interface, InterfaceConfig};
use crate::autograd::{ParamId, ParamStore, Tape, Var};
use crate::error::Result;
use crate::tensor::Tensor;

pub struct WeightedSum {
    cfg: InterfaceConfig,
    pub weights: ParamId,
}

impl WeightedSum {
    pub fn new(cfg: InterfaceConfig, store: &mut ParamStore, prefix: &str) -> Result<Self> {
        let weights = store.add(&format!("{prefix}weights"), Tensor::zeros(&[cfg.layers]))?;
        Ok(WeightedSum { cfg, weights })
    }
}

impl Interface for WeightedSum {
    fn config(&self) -> &InterfaceConfig {
        &self.cfg
    }
    fn output_dim(&self) -> usize {
        self.cfg.dim
    }
    fn forward_checked(&self, tape: &mut Tape, store: &ParamStore, stack: Var) -> Result<Var> {
        let w = tape.param(store, self.weights);
        tape.layer_weighted_sum(stack, w, 0)
    }
    fn layer_weights(&self, store: &ParamStore) -> Option<Vec<(usize, Vec<f32>)>> {
        Some(vec![(
            0,
            softmax_weights(&store.value(self.weights).to_vec()),
        )])
    }
}
