//! GroupWS #k: the L layers split into k contiguous groups, a softmax-weighted sum inside each
//! (logits zero-initialised, as WS), the k results concatenated and projected to `out_dim`.
//! The paper gives no split rule for L not divisible by k [our choice]: numpy.array_split's, i.e.
//! sizes differ by at most one and the larger groups come first (13 into 3 -> 5, 4, 4).

use super::{softmax_weights, Interface, InterfaceConfig, InterfaceKind};
use crate::autograd::{ParamId, ParamStore, Tape, Var};
use crate::error::{Error, Result};
use crate::models::nn::Linear;
use crate::rng::Rng;
use crate::tensor::Tensor;

/// (first layer, size) of each group.
pub fn group_sizes(layers: usize, groups: usize) -> Vec<(usize, usize)> {
    let (base, extra) = (layers / groups, layers % groups);
    let mut first = 0;
    (0..groups)
        .map(|g| {
            let size = base + usize::from(g < extra);
            let r = (first, size);
            first += size;
            r
        })
        .collect()
}

pub struct GroupWs {
    cfg: InterfaceConfig,
    pub groups: Vec<(usize, ParamId)>,
    pub proj: Linear,
}

impl GroupWs {
    pub fn new(
        cfg: InterfaceConfig,
        store: &mut ParamStore,
        prefix: &str,
        rng: &mut Rng,
    ) -> Result<Self> {
        let InterfaceKind::GroupWs { groups: k, out_dim } = cfg.kind else {
            return Err(Error::Config("GroupWs::new needs a GroupWs config".into()));
        };
        if k == 0 || k > cfg.layers {
            return Err(Error::Config(format!(
                "GroupWS needs 1 <= groups <= L; got {k} groups for L = {}",
                cfg.layers
            )));
        }
        let mut groups = Vec::new();
        for (g, (first, size)) in group_sizes(cfg.layers, k).into_iter().enumerate() {
            groups.push((
                first,
                store.add(&format!("{prefix}group{g}.weights"), Tensor::zeros(&[size]))?,
            ));
        }
        let proj = Linear::new(
            store,
            &format!("{prefix}proj"),
            k * cfg.dim,
            out_dim,
            true,
            rng,
        )?;
        Ok(GroupWs { cfg, groups, proj })
    }
}

impl Interface for GroupWs {
    fn config(&self) -> &InterfaceConfig {
        &self.cfg
    }
    fn output_dim(&self) -> usize {
        self.proj.out_features
    }
    fn forward_checked(&self, tape: &mut Tape, store: &ParamStore, stack: Var) -> Result<Var> {
        let mut parts = Vec::with_capacity(self.groups.len());
        for &(first, w) in &self.groups {
            let w = tape.param(store, w);
            parts.push(tape.layer_weighted_sum(stack, w, first)?);
        }
        let cat = tape.concat_cols(&parts)?;
        self.proj.forward(tape, store, cat)
    }
    fn layer_weights(&self, store: &ParamStore) -> Option<Vec<(usize, Vec<f32>)>> {
        Some(
            (self.groups.iter())
                .map(|&(first, w)| (first, softmax_weights(&store.value(w).to_vec())))
                .collect(),
        )
    }
}
