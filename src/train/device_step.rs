//! A whole training step of an interface + head pair on a device backend (the GPU, or the kernel
//! emulator): stack -> interface -> head -> loss -> backward -> clip -> AdamW, with no host
//! round-trip but the loss value coming down (and the batch's offsets and targets going up). The
//! forward is recorded on a [`DeviceTape`] and the backward is the tape's.
//!
//! Interfaces: WeightedSum and GroupWS (the fused layer-sum kernels, each group writing its slice
//! of the concatenation the projection reads), HConv (the layer-axis conv kernels), Concat + Proj
//! (a Linear over the frame-major stack, which already is the concatenation) and the single layer
//! (a gather), each with s3prl's optional per-layer `normalize` (fused into the layer sums, a
//! row-LayerNorm pass over the frozen stack for the others). Heads: the PR head with log-softmax +
//! CTC, and the utterance classifier (Linear -> masked mean pooling -> Linear) with the fused
//! softmax cross-entropy. CLS pooling runs its pre-LN transformer layer on the existing kernels
//! (LayerNorm, Linear, activation) around a fused attention of the one CLS query over each frame's
//! tokens (kernels/attention.cu); the CLS token is the same in every frame, so its LayerNorm,
//! query, key and value are computed once and their gradients summed over the frames.
//! The ML-SUPERB head (SpecAugment, centering, Linear, Conv2dSubsampling2 as Linear layers over
//! im2col patches, positions, two pre-LN transformer blocks on the packed self-attention, CTC
//! summed / utterances) draws its dropout and SpecAugment masks from the seeds the CPU pair's
//! would (the same micro-batch seed, drawn in the same order; the masks' randomness stays on the
//! host and goes up as taps, spans and seeds), so both paths train alike. The SUPERB ASR head runs
//! its input products on the tensor-core Linear and each bidirectional layer's recurrences on
//! kernels/lstm.cu (fp32), with the CPU head's dropout masks.
//!
//! Parameters live on the device as fp32 master weights in the kernels' layouts (HConv weights
//! tap-major, Linear weights [out, in]) with bf16 copies that the AdamW kernel refreshes, plus
//! fp32 gradients and Adam moments; the compute is bf16 with fp32 accumulation (logits,
//! log-probabilities and the loss gradients fp32). A [`DevicePair`] is built from a CPU [`Pair`]
//! (its parameters AND optimizer state, so a resumed run continues on the device) and written
//! back into one ([`DevicePair::write_to`]) for checkpoints and evaluation on the CPU; both paths
//! can be compared step by step.

use crate::autograd::{DVar, DeviceParam, DeviceTape};
use crate::batch::PackedBatch;
use crate::error::{Error, Result};
use crate::models::asr_head;
use crate::models::interface::{
    group_sizes, hconv_plan_for, ClsActivation, HConvPlan, InterfaceKind,
};
use crate::models::mlsuperb_head::{self, MlSuperbHeadConfig, TrainingSeeds};
use crate::ops::conv2d::PatchGeom;
use crate::ops::ctc::Reduction;
use crate::ops::device;
use crate::ops::device::{DeviceSpecMask, DeviceTimeWarp};
use crate::ops::layer_conv::ConvGeom;
use crate::optim::AdamConfig;
use crate::runtime::{Backend, Buf};
use crate::tensor::Tensor;
use crate::train::side_by_side::{
    class_labels, ctc_utterance_losses, decode_outputs, micro_seed, Head, HeadKind, Pair, Scored,
};
use half::bf16;

/// Whether the device step and its kernels have been verified on a real GPU (scripts/gpu_check.sh,
/// recorded in RESULTS.md). Until then `--device auto` keeps training on the CPU when a GPU is
/// present and says how to opt in (`--device cuda`). On an H200 (2026-11-27) the whole-step tests
/// and the demo followed the CPU, but most kernel tests at real sizes have not run on a GPU yet.
pub const VERIFIED_ON_GPU: bool = false;

/// The GPU `--device auto` should train on: a usable one, once the device step is verified on
/// GPUs; otherwise None, with a note on stderr when a GPU was there.
pub fn auto_backend() -> Option<Backend> {
    let be = Backend::cuda().ok()?;
    if VERIFIED_ON_GPU {
        return Some(be);
    }
    eprintln!(
        "note: {} is usable, but the device step's kernels have not all been verified on a GPU yet, so this runs on the CPU; --device cuda runs it on the GPU",
        be.name()
    );
    None
}

/// How a parameter's values are ordered on the device.
#[derive(Clone, Debug)]
enum Layout {
    /// As in the CPU store.
    Plain,
    /// An HConv conv weight: PyTorch's [c_out, c_in, k] on the CPU, tap-major [c_out, k, c_in] on
    /// the device (the implicit GEMM's row order).
    TapMajor(ConvGeom),
    /// The ML-SUPERB head's `embed.out` weight: its inputs channel-major (c * freq + f, torch's
    /// transpose(1, 2).view) on the CPU, frame-major (f * channels + c, the convolution's rows
    /// as they are) on the device, so no transpose runs.
    FreqMajor { freq: usize, channels: usize },
}

/// Weight columns permuted from channel-major to frequency-major (or back, `to_device` false).
fn permute_columns(v: &[f32], freq: usize, channels: usize, to_device: bool) -> Vec<f32> {
    let cols = freq * channels;
    let mut out = vec![0f32; v.len()];
    for (src, dst) in v.chunks_exact(cols).zip(out.chunks_exact_mut(cols)) {
        for f in 0..freq {
            for c in 0..channels {
                let (cm, fm) = (c * freq + f, f * channels + c);
                if to_device {
                    dst[fm] = src[cm];
                } else {
                    dst[cm] = src[fm];
                }
            }
        }
    }
    out
}

impl Layout {
    fn to_device(&self, v: &[f32]) -> Vec<f32> {
        match self {
            Layout::Plain => v.to_vec(),
            Layout::TapMajor(g) => device::hconv_weight_tap_major(v, g),
            Layout::FreqMajor { freq, channels } => permute_columns(v, *freq, *channels, true),
        }
    }
    fn to_cpu(&self, v: &[f32]) -> Vec<f32> {
        match self {
            Layout::Plain => v.to_vec(),
            Layout::TapMajor(g) => device::hconv_weight_grad_to_torch(v, g),
            Layout::FreqMajor { freq, channels } => permute_columns(v, *freq, *channels, false),
        }
    }
}

/// One trained parameter on the device: the tape's buffers (master, bf16 copy, gradient, in the
/// kernel layout) plus the Adam moments and where it lives in the CPU pair.
/// (The buffers are private: the optimizer's tensor table holds their addresses.)
struct TrainedParam {
    param: DeviceParam,
    /// Its index in the CPU pair's store (and optimizer state).
    store_index: usize,
    layout: Layout,
    m: Buf<f32>,
    v: Buf<f32>,
}

/// A Linear layer's (weight [out, in], bias [out]) as indices into [`DevicePair::params`].
#[derive(Clone, Copy, Debug)]
struct Lin {
    weight: usize,
    bias: usize,
}

enum DeviceInterface {
    WeightedSum {
        weights: usize,
    },
    /// (first layer, layer count, weights) per group, then the projection of the concatenation.
    GroupWs {
        groups: Vec<(usize, usize, usize)>,
        proj: Lin,
    },
    /// (weight, bias) per conv.
    HConv {
        plan: HConvPlan,
        convs: Vec<(usize, usize)>,
    },
    ConcatProj {
        proj: Lin,
    },
    SingleLayer {
        layer: usize,
    },
    ClsPool(ClsParams),
    /// The fitted projections as one block-diagonal Linear over the frame-major stack:
    /// weight bf16 [L k, L D], bias fp32 [L k] (minus each layer's projected mean). The dense
    /// matrix costs L times the FLOPs of per-layer products, Concat + Proj's cost, and reuses its
    /// tensor-core Linear; nothing is trained, so no backward is recorded.
    PcaConcat {
        weight: Buf<bf16>,
        bias: Buf<f32>,
        out: usize,
    },
}

/// CLS pooling's parameters (indices into [`DevicePair::params`]).
struct ClsParams {
    heads: usize,
    gelu: bool,
    cls: usize,
    /// (weight, bias) of the two LayerNorms.
    ln1: (usize, usize),
    ln2: (usize, usize),
    q: Lin,
    k: Lin,
    v: Lin,
    out_proj: Lin,
    ffn1: Lin,
    ffn2: Lin,
}

/// The head's parameters (indices into [`DevicePair::params`]).
enum DeviceHead {
    /// The PR head and the utterance classifier: Linear(D', hidden) -> Linear(hidden, V or C).
    TwoLayer {
        proj: Lin,
        out: Lin,
    },
    Speaker(SpeakerParams),
    MlSuperb(Box<MlSuperbParams>),
    Asr(AsrParams),
}

/// The SUPERB ASR head (see [`crate::models::asr_head::AsrHead`]).
struct AsrParams {
    dropout: f64,
    projector: Lin,
    /// Per layer, the forward and the reverse direction.
    layers: Vec<[LstmParams; 2]>,
    linear: Lin,
}

/// One LSTM direction: its input Linear (weight_ih, bias_ih), bias_hh and weight_hh.
#[derive(Clone, Copy)]
struct LstmParams {
    input: Lin,
    bias_hh: usize,
    weight_hh: usize,
}

/// The LSTM direction `prefix` + `weight_ih_l0` + `suffix` and its siblings through `add`.
fn lstm_direction(
    add: &mut dyn FnMut(&str, Layout) -> Result<usize>,
    prefix: &str,
    suffix: &str,
) -> Result<LstmParams> {
    let mut named = |what: &str| add(&format!("{prefix}{what}_l0{suffix}"), Layout::Plain);
    Ok(LstmParams {
        input: Lin {
            weight: named("weight_ih")?,
            bias: named("bias_ih")?,
        },
        bias_hh: named("bias_hh")?,
        weight_hh: named("weight_hh")?,
    })
}

/// The ML-SUPERB transformer CTC head (see [`crate::models::mlsuperb_head::MlSuperbHead`]).
struct MlSuperbParams {
    config: MlSuperbHeadConfig,
    geoms: (PatchGeom, PatchGeom),
    preencoder: Lin,
    conv1: Lin,
    conv2: Lin,
    /// Its weight frequency-major ([`Layout::FreqMajor`]).
    embed_out: Lin,
    blocks: Vec<BlockParams>,
    after_norm: (usize, usize),
    ctc_lo: Lin,
}

/// One pre-LN transformer block of the ML-SUPERB head.
struct BlockParams {
    norm1: (usize, usize),
    q: Lin,
    k: Lin,
    v: Lin,
    out: Lin,
    norm2: (usize, usize),
    w_1: Lin,
    w_2: Lin,
}

/// The x-vector head (see [`crate::models::head::SpeakerHead`]).
struct SpeakerParams {
    connector: Lin,
    /// (layer, context, dilation) per TDNN.
    tdnn: Vec<(Lin, usize, usize)>,
    utter1: Lin,
    utter2: Lin,
    /// AM-softmax's speaker vectors [speakers, width].
    am: usize,
    /// The cosines' Linear has no bias: zeros [speakers].
    zero_bias: Buf<f32>,
    speakers: usize,
    scale: f32,
    margin: f32,
}

pub struct DevicePair {
    pub name: String,
    params: Vec<TrainedParam>,
    /// Every parameter's buffers for the one-launch AdamW.
    adam: device::AdamTensors,
    interface: DeviceInterface,
    head: HeadKind,
    head_params: DeviceHead,
    layers: usize,
    dim: usize,
    normalize: bool,
    optimizer: AdamConfig,
    clip: Option<f64>,
    /// Optimizer steps taken (continuing the CPU pair's count).
    pub steps: u64,
    /// The CPU pair's mask seed and micro-batch count (dropout and SpecAugment draw as the CPU's).
    seed: u64,
    micro: u64,
}

/// The bf16 device copy of a host stack [frames, L, D], refused when it holds NaN or Inf (named
/// by frame and layer, as the CPU interfaces do).
pub fn upload_stack(be: &Backend, stack: &Tensor) -> Result<Buf<bf16>> {
    let s = stack.shape();
    if s.len() != 3 {
        return Err(Error::shape(
            "device stack",
            "[frames, L, D]",
            format!("{s:?}"),
        ));
    }
    if let Some(i) = stack.first_non_finite() {
        let (frame, layer) = (i / (s[1] * s[2]), (i / s[2]) % s[1]);
        return Err(Error::value(
            "interface input (hidden-state stack)",
            format!("NaN or Inf at frame {frame}, layer {layer}: check the upstream's input audio and weights"),
        ));
    }
    // A real batch is ~10^8 values: convert on every core.
    use rayon::prelude::*;
    let convert = |v: &[f32]| -> Vec<bf16> { v.par_iter().map(|&x| bf16::from_f32(x)).collect() };
    let x16 = match stack.f32s() {
        Ok(v) => convert(v),
        // An f16 / bf16 feature cache: widen first (exact), then round as the f32 path does.
        Err(_) => convert(&stack.to_vec()),
    };
    be.upload(&x16)
}

/// Puts the CPU pair's parameter `name` (value and Adam moments, in `layout`) on the device;
/// returns its index in `params`.
fn add_param(
    be: &Backend,
    pair: &Pair,
    params: &mut Vec<TrainedParam>,
    name: &str,
    layout: Layout,
) -> Result<usize> {
    let refuse = |what: String| Error::Config(format!("'{}' on the device: {what}", pair.name));
    let id = pair
        .store
        .id(name)
        .ok_or_else(|| refuse(format!("the pair has no parameter '{name}'")))?;
    let index = id.0;
    let values = layout.to_device(&pair.store.value(id).to_vec());
    let moment = |m: &[Vec<f32>]| -> Result<Vec<f32>> {
        match m.get(index) {
            Some(v) if v.len() == values.len() => Ok(layout.to_device(v)),
            _ => Err(refuse(format!(
                "the optimizer state does not match parameter '{name}'"
            ))),
        }
    };
    let (m, v) = (
        moment(&pair.optimizer.exp_avg)?,
        moment(&pair.optimizer.exp_avg_sq)?,
    );
    let shape = match &layout {
        Layout::Plain | Layout::FreqMajor { .. } => pair.store.value(id).shape().to_vec(),
        Layout::TapMajor(g) => vec![g.c_out, g.kernel * g.c_in],
    };
    params.push(TrainedParam {
        param: DeviceParam::upload(be, name, &values, &shape)?,
        store_index: index,
        layout,
        m: be.upload(&m)?,
        v: be.upload(&v)?,
    });
    Ok(params.len() - 1)
}

/// A Linear layer `name` (weight and bias) through `add`.
fn lin(add: &mut dyn FnMut(&str, Layout) -> Result<usize>, name: &str) -> Result<Lin> {
    Ok(Lin {
        weight: add(&format!("{name}.weight"), Layout::Plain)?,
        bias: add(&format!("{name}.bias"), Layout::Plain)?,
    })
}

/// A LayerNorm `name`'s (weight, bias) through `add`.
fn norm(add: &mut dyn FnMut(&str, Layout) -> Result<usize>, name: &str) -> Result<(usize, usize)> {
    let l = lin(add, name)?;
    Ok((l.weight, l.bias))
}

impl DevicePair {
    /// The device copy of a CPU pair: its current parameters, optimizer state (moments and step
    /// count) and settings.
    pub fn from_pair(be: &Backend, pair: &Pair) -> Result<Self> {
        let cfg = pair.interface.config().clone();
        let (layers, dim) = (cfg.layers, cfg.dim);
        let refuse = |what: String| Error::Config(format!("'{}' on the device: {what}", pair.name));
        let mut params: Vec<TrainedParam> = Vec::new();
        let mut add = |name: &str, layout: Layout| add_param(be, pair, &mut params, name, layout);
        let interface = match &cfg.kind {
            InterfaceKind::WeightedSum => DeviceInterface::WeightedSum {
                weights: add("interface.weights", Layout::Plain)?,
            },
            InterfaceKind::GroupWs { groups, .. } => {
                let mut gs = Vec::new();
                for (g, (first, size)) in group_sizes(layers, *groups).into_iter().enumerate() {
                    gs.push((
                        first,
                        size,
                        add(&format!("interface.group{g}.weights"), Layout::Plain)?,
                    ));
                }
                DeviceInterface::GroupWs {
                    groups: gs,
                    proj: lin(&mut add, "interface.proj")?,
                }
            }
            InterfaceKind::HConv {
                kernel,
                stride,
                depth,
            } => {
                let plan = hconv_plan_for(layers, dim, *kernel, *stride, *depth)?;
                if plan.convs.is_empty() {
                    return Err(refuse(format!(
                        "HConv over {layers} layers with stride {stride} has no conv (only the flatten), which has no device kernel yet; use the CPU"
                    )));
                }
                let mut convs = Vec::new();
                for (i, g) in plan.convs.iter().enumerate() {
                    convs.push((
                        add(&format!("interface.conv{i}.weight"), Layout::TapMajor(*g))?,
                        add(&format!("interface.conv{i}.bias"), Layout::Plain)?,
                    ));
                }
                DeviceInterface::HConv { plan, convs }
            }
            InterfaceKind::ConcatProj { .. } => DeviceInterface::ConcatProj {
                proj: lin(&mut add, "interface.proj")?,
            },
            InterfaceKind::SingleLayer { layer } => {
                let l = layers as isize;
                let resolved = if *layer < 0 { l + layer } else { *layer };
                if !(0..l).contains(&resolved) {
                    return Err(refuse(format!("layer {layer} is not in a stack of {l}")));
                }
                DeviceInterface::SingleLayer {
                    layer: resolved as usize,
                }
            }
            InterfaceKind::PcaConcat { components } => {
                let k = *components;
                let pca = pair
                    .interface
                    .as_pca()
                    .ok_or_else(|| refuse("a PCA + Concat config without its interface".into()))?;
                if pca.fitted_frames(&pair.store) == 0 {
                    return Err(refuse("PCA + Concat is not fitted yet".into()));
                }
                let value = |name: &str| -> Result<Vec<f32>> {
                    let id = pair
                        .store
                        .id(name)
                        .ok_or_else(|| refuse(format!("the pair has no fitted value '{name}'")))?;
                    Ok(pair.store.value(id).to_vec())
                };
                let (mean, basis) = (value("interface.mean")?, value("interface.components")?);
                let (rows, cols) = (layers * k, layers * dim);
                let mut weight = vec![bf16::ZERO; rows * cols];
                let mut bias = vec![0f32; rows];
                for l in 0..layers {
                    for j in 0..k {
                        let w = &basis[(l * k + j) * dim..(l * k + j + 1) * dim];
                        let row = (l * k + j) * cols + l * dim;
                        for (o, &x) in weight[row..row + dim].iter_mut().zip(w) {
                            *o = bf16::from_f32(x);
                        }
                        let mu = &mean[l * dim..(l + 1) * dim];
                        bias[l * k + j] = -w.iter().zip(mu).map(|(a, b)| a * b).sum::<f32>();
                    }
                }
                DeviceInterface::PcaConcat {
                    weight: be.upload(&weight)?,
                    bias: be.upload(&bias)?,
                    out: rows,
                }
            }
            InterfaceKind::ClsPool {
                heads, activation, ..
            } => {
                if layers + 1 > 96 {
                    return Err(refuse(format!(
                        "CLS pooling's device attention takes at most 95 layer tokens, not {layers}"
                    )));
                }
                let p = "interface.";
                DeviceInterface::ClsPool(ClsParams {
                    heads: *heads,
                    gelu: *activation == ClsActivation::Gelu,
                    cls: add("interface.cls", Layout::Plain)?,
                    ln1: norm(&mut add, &format!("{p}ln1"))?,
                    q: lin(&mut add, &format!("{p}attn.q_proj"))?,
                    k: lin(&mut add, &format!("{p}attn.k_proj"))?,
                    v: lin(&mut add, &format!("{p}attn.v_proj"))?,
                    out_proj: lin(&mut add, &format!("{p}attn.out_proj"))?,
                    ln2: norm(&mut add, &format!("{p}ln2"))?,
                    ffn1: lin(&mut add, &format!("{p}ffn1"))?,
                    ffn2: lin(&mut add, &format!("{p}ffn2"))?,
                })
            }
        };
        // The shapes come with the parameters; the tape checks that they chain.
        let kind = pair.head_kind();
        let head_params = match &pair.head {
            Head::Speaker(h) => {
                let mut tdnn = Vec::new();
                for (i, &(_, context, dilation)) in h.tdnn.iter().enumerate() {
                    tdnn.push((lin(&mut add, &format!("head.tdnn{i}"))?, context, dilation));
                }
                DeviceHead::Speaker(SpeakerParams {
                    connector: lin(&mut add, "head.connector")?,
                    tdnn,
                    utter1: lin(&mut add, "head.utter1")?,
                    utter2: lin(&mut add, "head.utter2")?,
                    am: add("head.amsoftmax.weight", Layout::Plain)?,
                    zero_bias: be.zeros::<f32>(h.speakers)?,
                    speakers: h.speakers,
                    scale: h.config.scale,
                    margin: h.config.margin,
                })
            }
            Head::MlSuperb(h) => {
                let preencoder = lin(&mut add, "head.preencoder")?;
                let conv1 = lin(&mut add, "head.embed.conv1")?;
                let conv2 = lin(&mut add, "head.embed.conv2")?;
                let embed_out = Lin {
                    weight: add(
                        "head.embed.out.weight",
                        Layout::FreqMajor {
                            freq: h.conv_out_features(),
                            channels: h.config.width,
                        },
                    )?,
                    bias: add("head.embed.out.bias", Layout::Plain)?,
                };
                let mut blocks = Vec::new();
                for i in 0..h.config.blocks {
                    let b = format!("head.encoders.{i}.");
                    blocks.push(BlockParams {
                        norm1: norm(&mut add, &format!("{b}norm1"))?,
                        q: lin(&mut add, &format!("{b}self_attn.linear_q"))?,
                        k: lin(&mut add, &format!("{b}self_attn.linear_k"))?,
                        v: lin(&mut add, &format!("{b}self_attn.linear_v"))?,
                        out: lin(&mut add, &format!("{b}self_attn.linear_out"))?,
                        norm2: norm(&mut add, &format!("{b}norm2"))?,
                        w_1: lin(&mut add, &format!("{b}feed_forward.w_1"))?,
                        w_2: lin(&mut add, &format!("{b}feed_forward.w_2"))?,
                    });
                }
                DeviceHead::MlSuperb(Box::new(MlSuperbParams {
                    config: h.config,
                    geoms: h.conv_geoms(),
                    preencoder,
                    conv1,
                    conv2,
                    embed_out,
                    blocks,
                    after_norm: norm(&mut add, "head.after_norm")?,
                    ctc_lo: lin(&mut add, "head.ctc_lo")?,
                }))
            }
            Head::Asr(h) => {
                let projector = lin(&mut add, "head.projector")?;
                let mut layers = Vec::new();
                for i in 0..h.rnns.len() {
                    let p = format!("head.rnns.{i}.layer.");
                    layers.push([
                        lstm_direction(&mut add, &p, "")?,
                        lstm_direction(&mut add, &p, "_reverse")?,
                    ]);
                }
                DeviceHead::Asr(AsrParams {
                    dropout: h.config.dropout,
                    projector,
                    layers,
                    linear: lin(&mut add, "head.linear")?,
                })
            }
            Head::Pr(_) | Head::Classifier(_) => DeviceHead::TwoLayer {
                proj: lin(&mut add, "head.proj")?,
                out: lin(&mut add, "head.out")?,
            },
        };
        let trained: Vec<&str> = (pair.store.iter())
            .filter(|q| !q.frozen)
            .map(|q| q.name.as_str())
            .collect();
        if params.len() != trained.len() {
            let known: Vec<&str> = params.iter().map(|p| p.param.name.as_str()).collect();
            let missing: Vec<&str> = trained.into_iter().filter(|n| !known.contains(n)).collect();
            return Err(refuse(format!(
                "the device step does not train {missing:?}; use --device cpu"
            )));
        }
        let adam = device::AdamTensors::new(
            be,
            &params
                .iter()
                .map(|p| {
                    (
                        &p.param.master,
                        &p.param.grad,
                        &p.m,
                        &p.v,
                        Some(&p.param.copy),
                    )
                })
                .collect::<Vec<_>>(),
        )?;
        Ok(DevicePair {
            name: pair.name.clone(),
            params,
            adam,
            interface,
            head: kind,
            head_params,
            layers,
            dim,
            normalize: cfg.normalize,
            optimizer: pair.optimizer.config,
            clip: pair.clip,
            steps: pair.optimizer.step,
            seed: pair.seed,
            micro: pair.micro,
        })
    }

    /// Copies the parameters, Adam moments and step count back into `pair` (the CPU pair this
    /// one was built from): what checkpoints and CPU evaluation read.
    pub fn write_to(&self, be: &Backend, pair: &mut Pair) -> Result<()> {
        for p in &self.params {
            let id = pair.store.id(&p.param.name).ok_or_else(|| {
                Error::Config(format!(
                    "'{}': the CPU pair has no parameter '{}'",
                    pair.name, p.param.name
                ))
            })?;
            let shape = pair.store.value(id).shape().to_vec();
            let value = p.layout.to_cpu(&be.download(&p.param.master)?);
            pair.store.set_value(id, Tensor::from_vec(value, &shape)?)?;
            pair.optimizer.exp_avg[p.store_index] = p.layout.to_cpu(&be.download(&p.m)?);
            pair.optimizer.exp_avg_sq[p.store_index] = p.layout.to_cpu(&be.download(&p.v)?);
        }
        pair.optimizer.step = self.steps;
        pair.steps = self.steps;
        pair.micro = self.micro;
        Ok(())
    }

    /// Every parameter's accumulated gradient, named and in the CPU store's layout (to compare
    /// with the CPU path's).
    pub fn gradients(&self, be: &Backend) -> Result<Vec<(String, Vec<f32>)>> {
        self.params
            .iter()
            .map(|p| {
                let q = &p.param;
                Ok((q.name.clone(), p.layout.to_cpu(&be.download(&q.grad)?)))
            })
            .collect()
    }

    fn check_stack(&self, x0: &Buf<bf16>, n: usize) -> Result<()> {
        if x0.len() != n * self.layers * self.dim {
            return Err(Error::shape(
                "device stack",
                format!("{n} frames x {} x {} elements", self.layers, self.dim),
                format!("{}", x0.len()),
            ));
        }
        Ok(())
    }

    /// Parameter `i` on `tape`, in its device layout.
    fn var<'t>(&'t self, tape: &mut DeviceTape<'t>, i: usize) -> Result<DVar> {
        tape.param(&self.params[i].param)
    }

    fn linear<'t>(
        &'t self,
        tape: &mut DeviceTape<'t>,
        x: DVar,
        l: Lin,
        out_f32: bool,
    ) -> Result<DVar> {
        let (w, b) = (self.var(tape, l.weight)?, self.var(tape, l.bias)?);
        tape.linear(x, w, b, out_f32)
    }

    fn layer_norm_to_bf16<'t>(
        &'t self,
        tape: &mut DeviceTape<'t>,
        x: DVar,
        (w, b): (usize, usize),
        eps: f64,
    ) -> Result<DVar> {
        let (w, b) = (self.var(tape, w)?, self.var(tape, b)?);
        tape.layer_norm_to(x, Some((w, b)), eps, true)
    }

    fn linear_relu<'t>(&'t self, tape: &mut DeviceTape<'t>, x: DVar, l: Lin) -> Result<DVar> {
        let (w, b) = (self.var(tape, l.weight)?, self.var(tape, l.bias)?);
        tape.linear_relu(x, w, b)
    }

    /// Records the interface and the head on `tape`, reading the bf16 stack `x0` [frames, L, D];
    /// returns the head's fp32 output (CTC logits per frame, or class logits per utterance; the
    /// speaker head's AM-softmax logits need the batch's `speakers`, its embeddings none) and the
    /// batch of its rows (the ML-SUPERB head subsamples frames). `train`: the micro-batch's mask
    /// seed (dropout, SpecAugment), None in evaluation.
    fn forward<'t>(
        &'t self,
        tape: &mut DeviceTape<'t>,
        x0: &'t Buf<bf16>,
        batch: &PackedBatch,
        speakers: Option<&[usize]>,
        train: Option<u64>,
    ) -> Result<(DVar, PackedBatch)> {
        let feats = self.features(tape, x0, batch)?;
        let same = |v: DVar| Ok((v, batch.clone()));
        let (proj, out) = match &self.head_params {
            DeviceHead::TwoLayer { proj, out } => (*proj, *out),
            DeviceHead::MlSuperb(h) => return self.mlsuperb_forward(tape, h, feats, batch, train),
            DeviceHead::Asr(h) => return same(self.asr_forward(tape, h, feats, batch, train)?),
            DeviceHead::Speaker(s) => {
                let e = self.speaker_embed(tape, s, feats, batch)?;
                let Some(labels) = speakers else {
                    return same(e);
                };
                let e = tape.to_bf16(e)?;
                let h = self.linear(tape, e, s.utter2, true)?;
                let h = tape.activation(h, false)?;
                let xn = tape.l2_normalize(h)?;
                let xn = tape.to_bf16(xn)?;
                let w = self.var(tape, s.am)?;
                let wn = tape.l2_normalize(w)?;
                let wn = tape.to_bf16(wn)?;
                let zero = tape.constant_f32(&s.zero_bias, &[s.speakers])?;
                let cos = tape.linear(xn, wn, zero, true)?;
                return same(tape.am_margin(cos, labels, s.scale, s.margin)?);
            }
        };
        match self.head {
            HeadKind::Ctc { .. } => {
                let h = self.linear(tape, feats, proj, false)?;
                same(self.linear(tape, h, out, true)?)
            }
            _ => {
                let h = self.linear(tape, feats, proj, true)?;
                let pooled = tape.mean_pool(h, batch)?;
                let pooled = tape.to_bf16(pooled)?;
                same(self.linear(tape, pooled, out, true)?)
            }
        }
    }

    /// The ASR head over the interface's bf16 features [frames, D'] -> fp32 logits [frames, V], as
    /// the CPU head's forward (the same dropout masks): the projector, per layer both directions'
    /// input Linear (fp32 out, + bias_hh) and their recurrences, dropout, the output Linear.
    fn asr_forward<'t>(
        &'t self,
        tape: &mut DeviceTape<'t>,
        h: &AsrParams,
        feats: DVar,
        batch: &PackedBatch,
        train: Option<u64>,
    ) -> Result<DVar> {
        let seeds = train.map(|seed| asr_head::dropout_seeds(seed, h.layers.len()));
        let mut x = self.linear(tape, feats, h.projector, false)?;
        for (i, [forward, reverse]) in h.layers.iter().enumerate() {
            // pre = x W_ih^T + (b_ih + b_hh), as the CPU's LSTM adds its biases: the sum of the
            // two [4H] vectors as the GEMM's bias, where adding b_hh after it took a pass over
            // the fp32 [frames, 4H] (0.26 GB at 32 x 500 frames) each way, per direction.
            let pre = |tape: &mut DeviceTape<'t>, d: &LstmParams| -> Result<DVar> {
                let w = self.var(tape, d.input.weight)?;
                let (b_ih, b_hh) = (self.var(tape, d.input.bias)?, self.var(tape, d.bias_hh)?);
                let bias = tape.add(b_ih, b_hh)?;
                tape.linear(x, w, bias, true)
            };
            let (pf, pr) = (pre(tape, forward)?, pre(tape, reverse)?);
            let w = (
                self.var(tape, forward.weight_hh)?,
                self.var(tape, reverse.weight_hh)?,
            );
            let mut y = tape.bilstm((pf, pr), w, batch)?;
            if let Some(seeds) = &seeds {
                if h.dropout > 0.0 {
                    y = tape.dropout(y, h.dropout, seeds[i])?;
                }
            }
            x = tape.to_bf16(y)?;
        }
        self.linear(tape, x, h.linear, true)
    }

    /// The ML-SUPERB head over the interface's bf16 features [frames, D'], as the CPU head's
    /// forward (the same seeds drawn in the same order, so the same dropout and SpecAugment
    /// masks): -> (fp32 logits [frames', V], the batch of frames').
    fn mlsuperb_forward<'t>(
        &'t self,
        tape: &mut DeviceTape<'t>,
        h: &MlSuperbParams,
        feats: DVar,
        batch: &PackedBatch,
        train: Option<u64>,
    ) -> Result<(DVar, PackedBatch)> {
        const EPS: f64 = 1e-12;
        let c = &h.config;
        mlsuperb_head::check_lengths(batch)?;
        let be = tape.backend();
        let seeds = train.map(|seed| TrainingSeeds::draw(seed, h.blocks.len()));
        let mut x = tape.to_f32(feats)?;
        if let (Some(spec), Some(seeds)) = (&c.specaug, &seeds) {
            let (n, d) = (batch.total_frames(), tape.shape(x)[1]);
            if spec.time_warp_window > 0 {
                let taps = mlsuperb_head::time_warp(spec.time_warp_window, batch, seeds.warp);
                x = tape.time_warp(x, DeviceTimeWarp::upload(be, &taps, n)?)?;
            }
            let spans = mlsuperb_head::specaug_spans(spec, batch, d, seeds.mask);
            x = tape.spec_mask(x, DeviceSpecMask::upload(be, &spans, batch, d)?)?;
        }
        let x = tape.utterance_center(x, batch)?;
        let x = tape.to_bf16(x)?;
        let x = self.linear(tape, x, h.preencoder, false)?;
        // Conv2dSubsampling2: each convolution a Linear over im2col patches, then ReLU.
        let (g1, g2) = h.geoms;
        // Their ReLU and the rounding to bf16 in the GEMM's epilogue (at 32 x 500 frames the two
        // convs' outputs are 0.3 GB each in fp32).
        let (p1, b1) = tape.conv2d_patches(x, batch, g1)?;
        let y = self.linear_relu(tape, p1, h.conv1)?;
        let y = tape.reshape(y, &[b1.total_frames(), g2.freq * g2.channels])?;
        let (p2, b2) = tape.conv2d_patches(y, &b1, g2)?;
        let y = self.linear_relu(tape, p2, h.conv2)?;
        let rows = tape.shape(y)[0];
        let y = tape.reshape(y, &[b2.total_frames(), rows / b2.total_frames() * c.width])?;
        let y = self.linear(tape, y, h.embed_out, true)?;
        let mut x = tape.scale_add_positions(y, &b2, (c.width as f32).sqrt())?;
        let dropout = |tape: &mut DeviceTape<'t>, v: DVar, p: f64, seed: Option<u64>| match seed {
            Some(seed) if p > 0.0 => tape.dropout(v, p, seed),
            _ => Ok(v),
        };
        x = dropout(tape, x, c.dropout, seeds.as_ref().map(|s| s.positions))?;
        for (i, blk) in h.blocks.iter().enumerate() {
            let [attn, attn_out, ffn, ffn_out] = TrainingSeeds::block(seeds.as_ref(), i);
            let y = self.layer_norm_to_bf16(tape, x, blk.norm1, EPS)?;
            let q = self.linear(tape, y, blk.q, true)?;
            let k = self.linear(tape, y, blk.k, true)?;
            let v = self.linear(tape, y, blk.v, true)?;
            let attn_drop = c.attention_dropout_with(attn);
            let a = tape.packed_self_attention((q, k, v), &b2, c.heads, attn_drop)?;
            let a = tape.to_bf16(a)?;
            let a = self.linear(tape, a, blk.out, true)?;
            let a = dropout(tape, a, c.dropout, attn_out)?;
            x = tape.add(x, a)?;
            let y = self.layer_norm_to_bf16(tape, x, blk.norm2, EPS)?;
            // Without dropout between them (evaluation, or p = 0) the ReLU and the cast go into
            // the GEMM's epilogue; dropout applies to the fp32 activation, as on the CPU.
            let f = match (ffn, c.dropout > 0.0) {
                (Some(_), true) => {
                    let f = self.linear(tape, y, blk.w_1, true)?;
                    let f = tape.activation(f, false)?;
                    let f = dropout(tape, f, c.dropout, ffn)?;
                    tape.to_bf16(f)?
                }
                _ => self.linear_relu(tape, y, blk.w_1)?,
            };
            let f = self.linear(tape, f, blk.w_2, true)?;
            let f = dropout(tape, f, c.dropout, ffn_out)?;
            x = tape.add(x, f)?;
        }
        let x = self.layer_norm_to_bf16(tape, x, h.after_norm, EPS)?;
        Ok((self.linear(tape, x, h.ctc_lo, true)?, b2))
    }

    /// The x-vector up to its embedding (fp32 [utterances, width]), as the CPU head: connector,
    /// TDNN windows + Linear + ReLU five times, statistics pooling, Linear + ReLU.
    fn speaker_embed<'t>(
        &'t self,
        tape: &mut DeviceTape<'t>,
        s: &SpeakerParams,
        feats: DVar,
        batch: &PackedBatch,
    ) -> Result<DVar> {
        let mut h = self.linear(tape, feats, s.connector, false)?;
        let mut b = batch.clone();
        for (i, &(layer, context, dilation)) in s.tdnn.iter().enumerate() {
            let (window, next) = tape.time_context(h, &b, context, dilation)?;
            // The last layer's output stays fp32 for the statistics; the others go on in bf16,
            // their ReLU and rounding in the GEMM's epilogue.
            h = if i + 1 == s.tdnn.len() {
                let z = self.linear(tape, window, layer, true)?;
                tape.activation(z, false)?
            } else {
                self.linear_relu(tape, window, layer)?
            };
            b = next;
        }
        let pooled = tape.stats_pool(h, &b)?;
        let pooled = tape.to_bf16(pooled)?;
        let e = self.linear(tape, pooled, s.utter1, true)?;
        tape.activation(e, false)
    }

    /// The interface's features (bf16 [frames, D']) of the bf16 stack `x0`.
    fn features<'t>(
        &'t self,
        tape: &mut DeviceTape<'t>,
        x0: &'t Buf<bf16>,
        batch: &PackedBatch,
    ) -> Result<DVar> {
        let n = batch.total_frames();
        let (l, d) = (self.layers, self.dim);
        let stack = tape.input(x0, &[n, l, d])?;
        // The layer sums fuse `normalize`; the other interfaces read a normalized copy.
        let fused_norm = matches!(
            self.interface,
            DeviceInterface::WeightedSum { .. } | DeviceInterface::GroupWs { .. }
        );
        let x = if self.normalize && !fused_norm {
            tape.normalize_layers(stack)?
        } else {
            stack
        };
        let feats = match &self.interface {
            DeviceInterface::WeightedSum { weights } => {
                let w = self.var(tape, *weights)?;
                tape.layer_sums(x, &[(0, l, w)], self.normalize)?
            }
            DeviceInterface::GroupWs { groups, proj } => {
                let mut gs = Vec::new();
                for &(first, size, w) in groups {
                    gs.push((first, size, self.var(tape, w)?));
                }
                let cat = tape.layer_sums(x, &gs, self.normalize)?;
                self.linear(tape, cat, *proj, false)?
            }
            DeviceInterface::HConv { plan, convs } => {
                let mut h = x;
                for (i, (g, &(w, b))) in plan.convs.iter().zip(convs).enumerate() {
                    let (w, b) = (self.var(tape, w)?, self.var(tape, b)?);
                    h = tape.hconv_conv(h, w, b, *g, i + 1 == plan.convs.len())?;
                }
                h
            }
            DeviceInterface::ConcatProj { proj } => {
                // The frame-major stack already is the concatenation.
                let flat = tape.reshape(x, &[n, l * d])?;
                self.linear(tape, flat, *proj, false)?
            }
            DeviceInterface::SingleLayer { layer } => tape.select_layer(x, *layer as i64)?,
            DeviceInterface::ClsPool(c) => {
                let y = self.cls_forward(tape, c, x)?;
                tape.to_bf16(y)?
            }
            DeviceInterface::PcaConcat { weight, bias, out } => {
                let flat = tape.reshape(x, &[n, l * d])?;
                let w = tape.input(weight, &[*out, l * d])?;
                let b = tape.constant_f32(bias, &[*out])?;
                tape.linear(flat, w, b, false)?
            }
        };
        Ok(feats)
    }

    /// CLS pooling as the CPU interface computes it (pre-LN transformer layer, CLS query only):
    /// u = LN1(tokens); q = Wq u_cls; K, V = Wk u, Wv u; attn = softmax(q K^T / sqrt(dh)) V;
    /// h = cls + out_proj(attn); y = h + ffn2(act(ffn1(LN2(h)))). The CLS token is the same in
    /// every frame, so its LN1, query, key and value are computed once (their gradients summed
    /// over the frames by the attention's backward). Returns y (fp32 [n, D]).
    fn cls_forward<'t>(
        &'t self,
        tape: &mut DeviceTape<'t>,
        c: &ClsParams,
        x: DVar,
    ) -> Result<DVar> {
        let (l, d) = (self.layers, self.dim);
        let n = tape.shape(x)[0];
        // The stack's rows normalized from bf16 straight into bf16 (208,000 x 768 at 32 x 500
        // frames of 13 layers: a cast each side of an fp32 LayerNorm moved five times the bytes).
        let rows = tape.reshape(x, &[n * l, d])?;
        let u = self.layer_norm_to_bf16(tape, rows, c.ln1, 1e-5)?;
        let cls = tape.param_as(&self.params[c.cls].param, &[1, d])?;
        let u_cls = self.layer_norm_to_bf16(tape, cls, c.ln1, 1e-5)?;
        let q = self.linear(tape, u_cls, c.q, true)?;
        let k_cls = self.linear(tape, u_cls, c.k, false)?;
        let v_cls = self.linear(tape, u_cls, c.v, false)?;
        let k = self.linear(tape, u, c.k, false)?;
        let v = self.linear(tape, u, c.v, false)?;
        let attn = tape.cls_attention(q, k_cls, v_cls, k, v, l, c.heads)?;
        let o = self.linear(tape, attn, c.out_proj, true)?;
        let h = tape.add_row(o, cls)?;
        let g = self.layer_norm_to_bf16(tape, h, c.ln2, 1e-5)?;
        let z = self.linear(tape, g, c.ffn1, true)?;
        let act = tape.activation(z, c.gelu)?;
        let act = tape.to_bf16(act)?;
        let f = self.linear(tape, act, c.ffn2, true)?;
        tape.add(h, f)
    }

    /// What a device failure (out of memory, a launch that failed) inside `what` on `batch`
    /// becomes: the same error with the pair, the work and the batch's sizes, so that a user
    /// knows which run and which batch; other errors name their tensor already.
    fn device_context(&self, what: &str, batch: &PackedBatch) -> impl Fn(Error) -> Error {
        let context = format!(
            "'{}' {what} on {} utterances ({} frames of a {} x {} stack)",
            self.name,
            batch.num_utterances(),
            batch.total_frames(),
            self.layers,
            self.dim
        );
        move |e: Error| e.in_device_context(&context)
    }

    /// Adds the gradients of one micro-batch's mean loss times `scale` (1 / micro-batches when
    /// accumulating) to the parameters' gradients; returns that (unscaled) loss. `x0`: the bf16
    /// stack [frames, L, D] on the device; `targets` as [`Pair::accumulate`].
    pub fn accumulate_on(
        &mut self,
        be: &Backend,
        x0: &Buf<bf16>,
        batch: &PackedBatch,
        targets: &[Vec<usize>],
        scale: f32,
    ) -> Result<f32> {
        let context = self.device_context(&format!("training step {}", self.steps + 1), batch);
        self.accumulate_micro_batch(be, x0, batch, targets, scale)
            .map_err(context)
    }

    fn accumulate_micro_batch(
        &mut self,
        be: &Backend,
        x0: &Buf<bf16>,
        batch: &PackedBatch,
        targets: &[Vec<usize>],
        scale: f32,
    ) -> Result<f32> {
        self.check_stack(x0, batch.total_frames())?;
        let seed = micro_seed(self.seed, self.steps, self.micro);
        self.micro += 1;
        let this: &Self = self;
        let mut tape = DeviceTape::new(be);
        let loss = match (this.head, &this.head_params) {
            (_, DeviceHead::MlSuperb(_)) => {
                // ESPnet's CTC: the summed loss over the batch, divided by its utterances.
                let (out, b) = this.forward(&mut tape, x0, batch, None, Some(seed))?;
                let per_utterance = 1.0 / b.num_utterances() as f32;
                tape.ctc_loss_reduced(out, &b, targets, Reduction::Sum, per_utterance)?
            }
            (HeadKind::Ctc { .. }, _) => {
                // The seed draws the ASR head's dropout masks; the PR head has none.
                let (out, _) = this.forward(&mut tape, x0, batch, None, Some(seed))?;
                tape.ctc_loss(out, batch, targets)?
            }
            (HeadKind::Classify { .. }, _) => {
                let (out, _) = this.forward(&mut tape, x0, batch, None, None)?;
                tape.cross_entropy(out, &class_labels(targets)?)?
            }
            (HeadKind::Speaker { .. }, _) => {
                let labels = class_labels(targets)?;
                let (out, _) = this.forward(&mut tape, x0, batch, Some(&labels), None)?;
                tape.cross_entropy(out, &labels)?
            }
        };
        let value = tape.loss_value(loss)?;
        if !value.is_finite() {
            return Err(Error::value(
                "training loss",
                format!(
                    "'{}' produced {value} at step {} on the device: lower the learning rate",
                    this.name,
                    this.steps + 1
                ),
            ));
        }
        tape.backward(loss, scale)?;
        Ok(value)
    }

    /// Clips the accumulated gradients (their global norm in two launches), takes one AdamW /
    /// Adam step at learning rate `lr` (refreshing the bf16 copies, clearing the gradients) in
    /// one launch.
    pub fn apply(&mut self, be: &Backend, lr: f64) -> Result<()> {
        let context = format!("'{}' optimizer step {}", self.name, self.steps + 1);
        self.optimizer_step(be, lr)
            .map_err(|e| e.in_device_context(&context))
    }

    fn optimizer_step(&mut self, be: &Backend, lr: f64) -> Result<()> {
        let scale = match self.clip {
            Some(max_norm) => {
                Some(device::clip_coefficient_table(be, &self.adam, max_norm as f32)?.1)
            }
            None => None,
        };
        self.steps += 1;
        self.micro = 0;
        let cfg = AdamConfig {
            lr,
            ..self.optimizer
        };
        // One launch for every parameter; each gradient is zeroed as it is consumed.
        device::adam_step_multi(be, &cfg, self.steps, &self.adam, scale.as_ref(), true)
    }

    /// One optimizer step on a packed batch (`stack` f32 [frames, L, D] on the host, sent up as
    /// bf16) at the configured learning rate; returns the mean loss.
    pub fn train_step(
        &mut self,
        be: &Backend,
        stack: &Tensor,
        batch: &PackedBatch,
        targets: &[Vec<usize>],
    ) -> Result<f32> {
        let n = batch.total_frames();
        if stack.shape() != [n, self.layers, self.dim] {
            return Err(Error::shape(
                "device step stack",
                format!("[{n}, {}, {}]", self.layers, self.dim),
                format!("{:?}", stack.shape()),
            ));
        }
        self.train_step_on(be, &upload_stack(be, stack)?, batch, targets)
    }

    /// [`Self::train_step`] on a bf16 stack already on the device ([frames, L, D], e.g. an upstream
    /// run there, or a benchmark's).
    pub fn train_step_on(
        &mut self,
        be: &Backend,
        x0: &Buf<bf16>,
        batch: &PackedBatch,
        targets: &[Vec<usize>],
    ) -> Result<f32> {
        let loss = self.accumulate_on(be, x0, batch, targets, 1.0)?;
        self.apply(be, self.optimizer.lr)?;
        Ok(loss)
    }

    /// Greedy CTC hypotheses or the predicted class per utterance, as [`Pair::decode`]; only the
    /// head's output comes down.
    pub fn decode_on(
        &self,
        be: &Backend,
        x0: &Buf<bf16>,
        batch: &PackedBatch,
    ) -> Result<Vec<Vec<usize>>> {
        Ok(self.decode_scored_on(be, x0, batch, None)?.0)
    }

    /// [`Self::decode_on`] and, for a CTC head given `targets`, each utterance's loss as
    /// [`Pair::decode_scored`] (from the log-probabilities that come down for the decoding).
    pub fn decode_scored_on(
        &self,
        be: &Backend,
        x0: &Buf<bf16>,
        batch: &PackedBatch,
        targets: Option<&[Vec<usize>]>,
    ) -> Result<Scored> {
        let context = self.device_context("evaluation", batch);
        self.decode_scored(be, x0, batch, targets).map_err(context)
    }

    fn decode_scored(
        &self,
        be: &Backend,
        x0: &Buf<bf16>,
        batch: &PackedBatch,
        targets: Option<&[Vec<usize>]>,
    ) -> Result<Scored> {
        self.check_stack(x0, batch.total_frames())?;
        let mut tape = DeviceTape::no_grad(be);
        let (mut out, out_batch) = self.forward(&mut tape, x0, batch, None, None)?;
        if let HeadKind::Ctc { .. } = self.head {
            out = tape.log_softmax(out)?;
        }
        let lp = be.download(tape.f32_value(out)?)?;
        let losses = match (self.head, targets) {
            (HeadKind::Ctc { vocab }, Some(t)) => {
                let per_label = !matches!(self.head_params, DeviceHead::MlSuperb(_));
                Some(ctc_utterance_losses(&lp, vocab, &out_batch, t, per_label)?)
            }
            _ => None,
        };
        Ok((decode_outputs(self.head, &lp, &out_batch)?, losses))
    }

    /// The speaker head's embedding of each utterance of the bf16 stack `x0` (what verification
    /// trials are scored with); an error for the other heads.
    pub fn embed_on(
        &self,
        be: &Backend,
        x0: &Buf<bf16>,
        batch: &PackedBatch,
    ) -> Result<Vec<Vec<f32>>> {
        if !matches!(self.head_params, DeviceHead::Speaker(_)) {
            return Err(Error::Config(format!(
                "'{}' has no speaker head to embed with",
                self.name
            )));
        }
        let context = self.device_context("embedding", batch);
        self.embedding(be, x0, batch).map_err(context)
    }

    fn embedding(
        &self,
        be: &Backend,
        x0: &Buf<bf16>,
        batch: &PackedBatch,
    ) -> Result<Vec<Vec<f32>>> {
        self.check_stack(x0, batch.total_frames())?;
        let mut tape = DeviceTape::no_grad(be);
        let (out, _) = self.forward(&mut tape, x0, batch, None, None)?;
        let width = tape.shape(out)[1];
        let values = be.download(tape.f32_value(out)?)?;
        Ok(values.chunks(width).map(<[f32]>::to_vec).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::interface::InterfaceConfig;

    // A device failure inside a step says which pair, which step and how big a batch; errors
    // that name their tensor already pass unchanged.
    #[test]
    fn device_failures_name_the_pair_the_work_and_the_batch() {
        let be = Backend::Emulator;
        let pair = Pair::new(
            "ws",
            &InterfaceConfig::weighted_sum(3, 8),
            HeadKind::Ctc { vocab: 5 },
            AdamConfig::adamw(1e-3),
            None,
            0,
        )
        .unwrap();
        let dev = DevicePair::from_pair(&be, &pair).unwrap();
        let batch = PackedBatch::from_lengths(&[3, 4]).unwrap();
        let context = dev.device_context("training step 1", &batch);
        let e = context(Error::Allocation("allocating 9 f32 (36 B) failed".into()));
        assert!(matches!(e, Error::Allocation(_)), "{e}");
        let e = e.to_string();
        assert!(
            e.contains("'ws' training step 1 on 2 utterances (7 frames of a 3 x 8 stack): allocating 9 f32"),
            "{e}"
        );
        let e = context(Error::Device("launch of k failed".into())).to_string();
        assert!(
            e.contains("(7 frames of a 3 x 8 stack): launch of k"),
            "{e}"
        );
        let shape = Error::shape("stack", "[7, 3, 8]", "[7, 2, 8]");
        assert_eq!(context(shape.clone()), shape);
    }
}
