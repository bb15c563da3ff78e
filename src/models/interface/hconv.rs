//! HConv, the official design (atosystem/SSL_Interface): per frame, Conv1d over the layer axis with
//! the feature dimension as channels; n = floor(log_stride L) convs, each kernel k, stride s,
//! zero padding floor(k/2), bias, ReLU after every conv; every conv maps D -> D channels except the
//! last, which maps D -> floor(D / L_last); the remaining layer axis is flattened channel-major.
//! L < stride gives zero convs: the output is the channel-major flatten of the D x L stack.
//! A depth other than the official rule can be asked for ([`hconv_plan_at_depth`]): the
//! kernel / stride / depth sweeps the paper leaves open.

use super::{Interface, InterfaceConfig, InterfaceKind};
use crate::autograd::{ParamId, ParamStore, Tape, Var};
use crate::error::{Error, Result};
use crate::ops::layer_conv::ConvGeom;
use crate::rng::Rng;
use crate::tensor::Tensor;

/// The conv stack HConv builds for (L, D, kernel, stride).
#[derive(Clone, Debug, PartialEq)]
pub struct HConvPlan {
    pub convs: Vec<ConvGeom>,
    /// Layer-axis length after the last conv.
    pub l_last: usize,
    /// Channels after the last conv (D when there is no conv).
    pub c_last: usize,
}

impl HConvPlan {
    pub fn output_dim(&self) -> usize {
        self.l_last * self.c_last
    }
    pub fn num_params(&self) -> usize {
        self.convs
            .iter()
            .map(|g| g.c_out * g.c_in * g.kernel + g.c_out)
            .sum()
    }
}

/// The official depth rule, floor(ln L / ln s) in f64, kept float on purpose: it is what the
/// reference code computes. It equals the integer rule (largest n with s^n <= L) for every L <= 1000
/// and s in 2..=5 except L = 243, s = 3, where rounding gives 4 instead of 5 (so does the official code).
fn depth(layers: usize, stride: usize) -> usize {
    ((layers as f64).ln() / (stride as f64).ln()).floor() as usize
}

/// The official plan: floor(log_stride L) convs.
pub fn hconv_plan(layers: usize, dim: usize, kernel: usize, stride: usize) -> Result<HConvPlan> {
    if stride < 2 {
        return Err(Error::Config(format!(
            "HConv stride must be >= 2 (depth is floor(log_stride L)), got {stride}"
        )));
    }
    plan(layers, dim, kernel, stride, depth(layers, stride))
}

/// The plan with `convs` convs instead of the official depth (at least 1; the layer axis stops
/// shrinking at length 1, so deeper stacks keep convolving one position). The last conv still maps
/// to floor(D / L_last) channels.
pub fn hconv_plan_at_depth(
    layers: usize,
    dim: usize,
    kernel: usize,
    stride: usize,
    convs: usize,
) -> Result<HConvPlan> {
    if stride == 0 || convs == 0 {
        return Err(Error::Config(format!(
            "HConv with an explicit depth needs stride >= 1 and depth >= 1, got stride {stride}, depth {convs}"
        )));
    }
    plan(layers, dim, kernel, stride, convs)
}

/// The plan for [`InterfaceKind::HConv`]'s fields.
pub fn hconv_plan_for(
    layers: usize,
    dim: usize,
    kernel: usize,
    stride: usize,
    depth: Option<usize>,
) -> Result<HConvPlan> {
    match depth {
        None => hconv_plan(layers, dim, kernel, stride),
        Some(n) => hconv_plan_at_depth(layers, dim, kernel, stride, n),
    }
}

fn plan(layers: usize, dim: usize, kernel: usize, stride: usize, n: usize) -> Result<HConvPlan> {
    if kernel == 0 {
        return Err(Error::Config("HConv kernel size must be >= 1".into()));
    }
    // Past this the windows are mostly padding, and a mistyped kernel (k100000) would abort on
    // its weights' allocation instead of saying so.
    if n > 0 && kernel > 2 * layers + 1 {
        return Err(Error::Config(format!(
            "HConv kernel {kernel} over {layers} layers: a kernel wider than 2 L + 1 = {} reads only padding beyond it; use at most {}",
            2 * layers + 1,
            2 * layers + 1
        )));
    }
    let pad = kernel / 2;
    let mut convs = Vec::with_capacity(n);
    let mut l = layers;
    for i in 0..n {
        let g0 = ConvGeom {
            l_in: l,
            c_in: dim,
            c_out: dim,
            kernel,
            stride,
            pad,
        };
        let l_out = g0.l_out();
        let c_out = if i == n - 1 { dim / l_out } else { dim };
        if c_out == 0 {
            return Err(Error::Config(format!(
                "HConv: the last conv would have floor(D / L_last) = floor({dim} / {l_out}) = 0 channels; use a larger D or stride"
            )));
        }
        convs.push(ConvGeom { c_out, ..g0 });
        l = l_out;
    }
    let c_last = convs.last().map_or(dim, |g| g.c_out);
    Ok(HConvPlan {
        convs,
        l_last: l,
        c_last,
    })
}

pub struct HConv {
    cfg: InterfaceConfig,
    pub plan: HConvPlan,
    /// (weight [c_out, c_in, k], bias [c_out]) per conv.
    pub convs: Vec<(ParamId, ParamId)>,
}

impl HConv {
    pub fn new(
        cfg: InterfaceConfig,
        store: &mut ParamStore,
        prefix: &str,
        rng: &mut Rng,
    ) -> Result<Self> {
        let InterfaceKind::HConv {
            kernel,
            stride,
            depth,
        } = cfg.kind
        else {
            return Err(Error::Config("HConv::new needs an HConv config".into()));
        };
        let plan = hconv_plan_for(cfg.layers, cfg.dim, kernel, stride, depth)?;
        let mut convs = Vec::new();
        for (i, g) in plan.convs.iter().enumerate() {
            // PyTorch Conv1d default: weight and bias ~ U(±1/sqrt(c_in * k)).
            let bound = 1.0 / ((g.c_in * g.kernel) as f64).sqrt();
            let w = Tensor::from_vec(
                rng.uniform_vec(g.c_out * g.c_in * g.kernel, bound),
                &[g.c_out, g.c_in, g.kernel],
            )?;
            let b = Tensor::from_vec(rng.uniform_vec(g.c_out, bound), &[g.c_out])?;
            convs.push((
                store.add(&format!("{prefix}conv{i}.weight"), w)?,
                store.add(&format!("{prefix}conv{i}.bias"), b)?,
            ));
        }
        Ok(HConv { cfg, plan, convs })
    }
}

impl Interface for HConv {
    fn config(&self) -> &InterfaceConfig {
        &self.cfg
    }
    fn output_dim(&self) -> usize {
        self.plan.output_dim()
    }
    fn forward_checked(&self, tape: &mut Tape, store: &ParamStore, stack: Var) -> Result<Var> {
        let mut h = stack;
        for (g, &(w, b)) in self.plan.convs.iter().zip(&self.convs) {
            let (w, b) = (tape.param(store, w), tape.param(store, b));
            h = tape.layer_conv(h, w, b, g.stride, g.pad)?;
            h = tape.relu(h)?;
        }
        tape.flatten_channel_major(h)
    }
}
