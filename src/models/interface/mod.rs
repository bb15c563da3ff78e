//! Interfaces: a frame-major hidden-state stack [frames, L, D] -> features [frames, D'].
//! None of them mixes frames, so they need no batch offsets. Every interface can first apply the
//! per-layer, no-affine LayerNorm of s3prl's `normalize` option (default off, as in SUPERB).

mod cls_pool;
mod concat_proj;
mod group_ws;
mod hconv;
mod pca_concat;
mod single_layer;
mod weighted_sum;

pub use cls_pool::{ClsActivation, ClsPool};
pub use concat_proj::ConcatProj;
pub use group_ws::{group_sizes, GroupWs};
pub use hconv::{hconv_plan, hconv_plan_at_depth, hconv_plan_for, HConv, HConvPlan};
pub use pca_concat::{PcaBasis, PcaConcat, PcaFit, PCA_FIT_FRAMES};
pub use single_layer::SingleLayer;
pub use weighted_sum::WeightedSum;

use crate::autograd::{ParamStore, Tape, Var};
use crate::error::{Error, Result};
use crate::rng::Rng;

/// The layer weights a weighted sum applies: softmax of its logits, by the same routine as its
/// forward.
fn softmax_weights(logits: &[f32]) -> Vec<f32> {
    crate::ops::softmax::softmax_forward(logits, logits.len())
}

#[derive(Clone, Debug, PartialEq)]
pub enum InterfaceKind {
    /// s3prl's softmax-weighted sum (L parameters).
    WeightedSum,
    /// Hierarchical convolution over the layer axis (the paper: kernel 5, stride 3, depth
    /// floor(log_stride L); `depth` Some(n) asks for n convs instead).
    HConv {
        kernel: usize,
        stride: usize,
        depth: Option<usize>,
    },
    /// Concatenate the L layers, project to `out_dim`.
    ConcatProj { out_dim: usize },
    /// `groups` contiguous layer groups, a weighted sum in each, concatenated, projected to `out_dim`.
    GroupWs { groups: usize, out_dim: usize },
    /// One hidden state; negative counts from the end (-1 = last), as in the official config.
    SingleLayer { layer: isize },
    /// A learnable CLS token + one pre-LN transformer layer over the L+1 layer tokens of each frame.
    ClsPool {
        heads: usize,
        ffn_dim: usize,
        activation: ClsActivation,
    },
    /// Each layer projected onto its top `components` principal directions (fitted on training
    /// features, not trained), the layers concatenated.
    PcaConcat { components: usize },
}

#[derive(Clone, Debug, PartialEq)]
pub struct InterfaceConfig {
    /// L: hidden states per frame (transformer layers + 1).
    pub layers: usize,
    /// D: upstream feature dimension.
    pub dim: usize,
    /// Per-layer no-affine LayerNorm before the interface (s3prl `normalize`).
    pub normalize: bool,
    pub kind: InterfaceKind,
}

impl InterfaceConfig {
    pub fn new(layers: usize, dim: usize, kind: InterfaceKind) -> Self {
        InterfaceConfig {
            layers,
            dim,
            normalize: false,
            kind,
        }
    }

    /// The paper's HConv: kernel 5, stride 3.
    pub fn hconv(layers: usize, dim: usize) -> Self {
        Self::new(
            layers,
            dim,
            InterfaceKind::HConv {
                kernel: 5,
                stride: 3,
                depth: None,
            },
        )
    }

    pub fn weighted_sum(layers: usize, dim: usize) -> Self {
        Self::new(layers, dim, InterfaceKind::WeightedSum)
    }
}

pub trait Interface: Send + Sync {
    fn config(&self) -> &InterfaceConfig;
    /// D': the feature size handed to the head.
    fn output_dim(&self) -> usize;
    /// The interface proper, on an already checked and (optionally) normalized stack.
    fn forward_checked(&self, tape: &mut Tape, store: &ParamStore, stack: Var) -> Result<Var>;
    /// PCA + Concat, the one interface fitted on data before training.
    fn as_pca(&self) -> Option<&PcaConcat> {
        None
    }
    /// The layer weights a researcher reads off a weighted sum (softmax of the logits), as
    /// (first layer, weights) per sum: one for WS, one per group for GroupWS; None for
    /// interfaces without explicit layer weights.
    fn layer_weights(&self, _store: &ParamStore) -> Option<Vec<(usize, Vec<f32>)>> {
        None
    }

    /// stack [frames, L, D] -> [frames, D'].
    fn forward(&self, tape: &mut Tape, store: &ParamStore, stack: Var) -> Result<Var> {
        let cfg = self.config();
        let s = tape.shape(stack).to_vec();
        if s.len() != 3 || s[1] != cfg.layers || s[2] != cfg.dim {
            return Err(Error::shape(
                "interface input (hidden-state stack)",
                format!(
                    "[frames, {}, {}] (L = {} layers, D = {})",
                    cfg.layers, cfg.dim, cfg.layers, cfg.dim
                ),
                format!("{s:?}"),
            ));
        }
        if let Some(i) = tape.value(stack).first_non_finite() {
            let (frame, layer) = (i / (cfg.layers * cfg.dim), (i / cfg.dim) % cfg.layers);
            return Err(Error::value(
                "interface input (hidden-state stack)",
                format!("NaN or Inf at frame {frame}, layer {layer}: check the upstream's input audio and weights"),
            ));
        }
        let stack = if cfg.normalize {
            tape.layer_norm(stack, None, 1e-5)?
        } else {
            stack
        };
        self.forward_checked(tape, store, stack)
    }
}

/// Builds an interface, registering its parameters under `prefix` (e.g. "interface.").
pub fn build(
    cfg: &InterfaceConfig,
    store: &mut ParamStore,
    prefix: &str,
    rng: &mut Rng,
) -> Result<Box<dyn Interface>> {
    if cfg.layers == 0 || cfg.dim == 0 {
        return Err(Error::Config(format!(
            "interface needs L >= 1 and D >= 1, got L = {}, D = {}",
            cfg.layers, cfg.dim
        )));
    }
    Ok(match &cfg.kind {
        InterfaceKind::WeightedSum => Box::new(WeightedSum::new(cfg.clone(), store, prefix)?),
        InterfaceKind::HConv { .. } => Box::new(HConv::new(cfg.clone(), store, prefix, rng)?),
        InterfaceKind::ConcatProj { .. } => {
            Box::new(ConcatProj::new(cfg.clone(), store, prefix, rng)?)
        }
        InterfaceKind::GroupWs { .. } => Box::new(GroupWs::new(cfg.clone(), store, prefix, rng)?),
        InterfaceKind::SingleLayer { .. } => Box::new(SingleLayer::new(cfg.clone())?),
        InterfaceKind::ClsPool { .. } => Box::new(ClsPool::new(cfg.clone(), store, prefix, rng)?),
        InterfaceKind::PcaConcat { .. } => Box::new(PcaConcat::new(cfg.clone(), store, prefix)?),
    })
}
