//! CLS pooling: per frame, the L layer vectors are a token sequence; a learnable CLS vector is put
//! in front and one pre-LN transformer layer (nn.TransformerEncoderLayer with norm_first=True,
//! batch_first, no dropout) runs over the L+1 tokens; the CLS token's output is the feature.
//!
//!   h = x + out_proj(MHA(LN1(x)));  y = h + ffn2(act(ffn1(LN2(h))));  out = y[CLS]
//!
//! Only the CLS row of the output is used, and tokens only interact through attention, so only the
//! CLS query is computed (keys/values for all L+1 tokens): exactly equal, (L+1)x less work.
//! Sizes are not in the paper [our choice]: heads and FFN size are configurable; the CLS vector is
//! initialised N(0, 0.02^2); q/k/v weights xavier-uniform as nn.MultiheadAttention, their biases 0.

use super::{Interface, InterfaceConfig, InterfaceKind};
use crate::autograd::{ParamId, ParamStore, Tape, Var};
use crate::error::{Error, Result};
use crate::models::nn::{LayerNorm, Linear};
use crate::rng::Rng;
use crate::tensor::Tensor;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClsActivation {
    Relu,
    Gelu,
}

pub struct ClsPool {
    cfg: InterfaceConfig,
    heads: usize,
    activation: ClsActivation,
    pub cls: ParamId,
    pub ln1: LayerNorm,
    pub q: Linear,
    pub k: Linear,
    pub v: Linear,
    pub out_proj: Linear,
    pub ln2: LayerNorm,
    pub ffn1: Linear,
    pub ffn2: Linear,
}

impl ClsPool {
    pub fn new(
        cfg: InterfaceConfig,
        store: &mut ParamStore,
        prefix: &str,
        rng: &mut Rng,
    ) -> Result<Self> {
        let InterfaceKind::ClsPool {
            heads,
            ffn_dim,
            activation,
        } = cfg.kind
        else {
            return Err(Error::Config("ClsPool::new needs a ClsPool config".into()));
        };
        let d = cfg.dim;
        if heads == 0 || !d.is_multiple_of(heads) {
            return Err(Error::Config(format!(
                "CLS pooling: D = {d} is not divisible by {heads} heads"
            )));
        }
        if ffn_dim == 0 {
            return Err(Error::Config("CLS pooling: ffn_dim must be >= 1".into()));
        }
        let cls = store.add(
            &format!("{prefix}cls"),
            Tensor::from_vec((0..d).map(|_| 0.02 * rng.normal()).collect(), &[d])?,
        )?;
        let ln1 = LayerNorm::new(store, &format!("{prefix}ln1"), d)?;
        let mut qkv = |name: &str, rng: &mut Rng| -> Result<Linear> {
            let l = Linear::new(store, &format!("{prefix}attn.{name}"), d, d, true, rng)?;
            // xavier_uniform over the packed [3D, D] in_proj_weight: bound sqrt(6 / (D + 3D)).
            let bound = (6.0 / (4 * d) as f64).sqrt();
            store.set_value(
                l.weight,
                Tensor::from_vec(rng.uniform_vec(d * d, bound), &[d, d])?,
            )?;
            store.set_value(l.bias.expect("has bias"), Tensor::zeros(&[d]))?;
            Ok(l)
        };
        let (q, k, v) = (
            qkv("q_proj", rng)?,
            qkv("k_proj", rng)?,
            qkv("v_proj", rng)?,
        );
        let out_proj = Linear::new(store, &format!("{prefix}attn.out_proj"), d, d, true, rng)?;
        store.set_value(out_proj.bias.expect("has bias"), Tensor::zeros(&[d]))?;
        let ln2 = LayerNorm::new(store, &format!("{prefix}ln2"), d)?;
        let ffn1 = Linear::new(store, &format!("{prefix}ffn1"), d, ffn_dim, true, rng)?;
        let ffn2 = Linear::new(store, &format!("{prefix}ffn2"), ffn_dim, d, true, rng)?;
        Ok(ClsPool {
            cfg,
            heads,
            activation,
            cls,
            ln1,
            q,
            k,
            v,
            out_proj,
            ln2,
            ffn1,
            ffn2,
        })
    }
}

impl Interface for ClsPool {
    fn config(&self) -> &InterfaceConfig {
        &self.cfg
    }
    fn output_dim(&self) -> usize {
        self.cfg.dim
    }
    fn forward_checked(&self, tape: &mut Tape, store: &ParamStore, stack: Var) -> Result<Var> {
        let (n, d) = (tape.shape(stack)[0], self.cfg.dim);
        let cls = tape.param(store, self.cls);
        let tokens = tape.prepend_token(stack, cls)?;
        let u = self.ln1.forward(tape, store, tokens)?;
        let u_cls = tape.select_layer(u, 0)?;
        let q = self.q.forward(tape, store, u_cls)?;
        let q = tape.reshape(q, &[n, 1, d])?;
        let k = self.k.forward(tape, store, u)?;
        let v = self.v.forward(tape, store, u)?;
        let a = tape.attention(q, k, v, self.heads)?;
        let a = tape.reshape(a, &[n, d])?;
        let a = self.out_proj.forward(tape, store, a)?;
        let x_cls = tape.select_layer(tokens, 0)?;
        let h = tape.add(x_cls, a)?;
        let f = self.ln2.forward(tape, store, h)?;
        let f = self.ffn1.forward(tape, store, f)?;
        let f = match self.activation {
            ClsActivation::Relu => tape.relu(f)?,
            ClsActivation::Gelu => tape.gelu(f)?,
        };
        let f = self.ffn2.forward(tape, store, f)?;
        tape.add(h, f)
    }
}
