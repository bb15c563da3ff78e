//! Single layer: one hidden state of the stack (the common baseline; no parameters).

use super::{Interface, InterfaceConfig, InterfaceKind};
use crate::autograd::{ParamStore, Tape, Var};
use crate::error::{Error, Result};

pub struct SingleLayer {
    cfg: InterfaceConfig,
    /// The resolved, non-negative layer index.
    pub layer: usize,
}

impl SingleLayer {
    pub fn new(cfg: InterfaceConfig) -> Result<Self> {
        let InterfaceKind::SingleLayer { layer } = cfg.kind else {
            return Err(Error::Config(
                "SingleLayer::new needs a SingleLayer config".into(),
            ));
        };
        let l = cfg.layers as isize;
        let resolved = if layer < 0 { l + layer } else { layer };
        if !(0..l).contains(&resolved) {
            return Err(Error::Config(format!("single-layer interface: layer {layer} does not exist in a stack of {l} layers (valid: 0..{l} or -{l}..-1)")));
        }
        Ok(SingleLayer {
            cfg,
            layer: resolved as usize,
        })
    }
}

impl Interface for SingleLayer {
    fn config(&self) -> &InterfaceConfig {
        &self.cfg
    }
    fn output_dim(&self) -> usize {
        self.cfg.dim
    }
    fn forward_checked(&self, tape: &mut Tape, _store: &ParamStore, stack: Var) -> Result<Var> {
        tape.select_layer(stack, self.layer)
    }
}
