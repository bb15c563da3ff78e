//! Building blocks with PyTorch's parameter layout, names and default initialisation.

use crate::autograd::{ParamId, ParamStore, Tape, Var};
use crate::error::Result;
use crate::rng::Rng;
use crate::tensor::Tensor;

/// `nn.Linear`: weight [out, in] and bias [out], both ~ U(±1/sqrt(in)) (PyTorch's default).
#[derive(Clone, Debug)]
pub struct Linear {
    pub weight: ParamId,
    pub bias: Option<ParamId>,
    pub in_features: usize,
    pub out_features: usize,
}

impl Linear {
    pub fn new(
        store: &mut ParamStore,
        name: &str,
        in_f: usize,
        out_f: usize,
        bias: bool,
        rng: &mut Rng,
    ) -> Result<Self> {
        let bound = 1.0 / (in_f as f64).sqrt();
        let weight = store.add(
            &format!("{name}.weight"),
            Tensor::from_vec(rng.uniform_vec(out_f * in_f, bound), &[out_f, in_f])?,
        )?;
        let bias = if bias {
            Some(store.add(
                &format!("{name}.bias"),
                Tensor::from_vec(rng.uniform_vec(out_f, bound), &[out_f])?,
            )?)
        } else {
            None
        };
        Ok(Linear {
            weight,
            bias,
            in_features: in_f,
            out_features: out_f,
        })
    }

    pub fn forward(&self, tape: &mut Tape, store: &ParamStore, x: Var) -> Result<Var> {
        let w = tape.param(store, self.weight);
        let b = self.bias.map(|b| tape.param(store, b));
        tape.linear(x, w, b)
    }
}

/// `nn.LayerNorm(dim)`: weight ones, bias zeros, eps 1e-5.
#[derive(Clone, Debug)]
pub struct LayerNorm {
    pub weight: ParamId,
    pub bias: ParamId,
    pub eps: f64,
}

impl LayerNorm {
    pub fn new(store: &mut ParamStore, name: &str, dim: usize) -> Result<Self> {
        let weight = store.add(
            &format!("{name}.weight"),
            Tensor::from_vec(vec![1.0; dim], &[dim])?,
        )?;
        let bias = store.add(&format!("{name}.bias"), Tensor::zeros(&[dim]))?;
        Ok(LayerNorm {
            weight,
            bias,
            eps: 1e-5,
        })
    }

    pub fn forward(&self, tape: &mut Tape, store: &ParamStore, x: Var) -> Result<Var> {
        let w = tape.param(store, self.weight);
        let b = tape.param(store, self.bias);
        tape.layer_norm(x, Some((w, b)), self.eps)
    }
}
