//! Concat + Proj: the L hidden states of a frame concatenated layer-major ([L*D], as torch.cat of
//! the layers along features), then one Linear to `out_dim`.

use super::{Interface, InterfaceConfig, InterfaceKind};
use crate::autograd::{ParamStore, Tape, Var};
use crate::error::{Error, Result};
use crate::models::nn::Linear;
use crate::rng::Rng;

pub struct ConcatProj {
    cfg: InterfaceConfig,
    pub proj: Linear,
}

impl ConcatProj {
    pub fn new(
        cfg: InterfaceConfig,
        store: &mut ParamStore,
        prefix: &str,
        rng: &mut Rng,
    ) -> Result<Self> {
        let InterfaceKind::ConcatProj { out_dim } = cfg.kind else {
            return Err(Error::Config(
                "ConcatProj::new needs a ConcatProj config".into(),
            ));
        };
        let proj = Linear::new(
            store,
            &format!("{prefix}proj"),
            cfg.layers * cfg.dim,
            out_dim,
            true,
            rng,
        )?;
        Ok(ConcatProj { cfg, proj })
    }
}

impl Interface for ConcatProj {
    fn config(&self) -> &InterfaceConfig {
        &self.cfg
    }
    fn output_dim(&self) -> usize {
        self.proj.out_features
    }
    fn forward_checked(&self, tape: &mut Tape, store: &ParamStore, stack: Var) -> Result<Var> {
        let n = tape.shape(stack)[0];
        let flat = tape.reshape(stack, &[n, self.cfg.layers * self.cfg.dim])?;
        self.proj.forward(tape, store, flat)
    }
}
