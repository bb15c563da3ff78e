//! A whole training step of an interface + head pair on a device backend (the GPU, or the kernel
//! emulator): stack -> interface -> head -> loss -> backward -> clip -> AdamW, with no host
//! round-trip but the loss value coming down (and the batch's offsets and targets going up).
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
//!
//! Parameters live on the device as fp32 master weights in the kernels' layouts (HConv weights
//! tap-major, Linear weights [out, in]) with bf16 copies that the AdamW kernel refreshes, plus
//! fp32 gradients and Adam moments; the compute is bf16 with fp32 accumulation (logits,
//! log-probabilities and the loss gradients fp32). A [`DevicePair`] is built from a CPU [`Pair`]
//! (its parameters AND optimizer state, so a resumed run continues on the device) and written
//! back into one ([`DevicePair::write_to`]) for checkpoints and evaluation on the CPU; both paths
//! can be compared step by step.

use crate::batch::PackedBatch;
use crate::error::{Error, Result};
use crate::models::interface::{group_sizes, hconv_plan, ClsActivation, HConvPlan, InterfaceKind};
use crate::ops::ctc::Reduction;
use crate::ops::device::{self, Cols, HConvSaved, LayerNormStats, LayerSumShape};
use crate::ops::layer_conv::ConvGeom;
use crate::optim::AdamConfig;
use crate::runtime::{Backend, Buf};
use crate::tensor::Tensor;
use crate::train::side_by_side::{class_labels, decode_outputs, Head, HeadKind, Pair};
use half::bf16;

/// Whether the device step has been seen to follow the CPU path on a real GPU (scripts/gpu_check.sh,
/// recorded in RESULTS.md). Until then `--device auto` keeps training on the CPU when a GPU is
/// present and says how to opt in (`--device cuda`): the kernels have only run in the emulator.
pub const VERIFIED_ON_GPU: bool = false;

/// The GPU `--device auto` should train on: a usable one, once the device step is verified on
/// GPUs; otherwise None, with a note on stderr when a GPU was there.
pub fn auto_backend() -> Option<Backend> {
    let be = Backend::cuda().ok()?;
    if VERIFIED_ON_GPU {
        return Some(be);
    }
    eprintln!(
        "note: {} is usable, but the device step has not been verified on a GPU yet, so this runs on the CPU; --device cuda runs it on the GPU",
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
}

impl Layout {
    fn to_device(&self, v: &[f32]) -> Vec<f32> {
        match self {
            Layout::Plain => v.to_vec(),
            Layout::TapMajor(g) => device::hconv_weight_tap_major(v, g),
        }
    }
    fn to_cpu(&self, v: &[f32]) -> Vec<f32> {
        match self {
            Layout::Plain => v.to_vec(),
            Layout::TapMajor(g) => device::hconv_weight_grad_to_torch(v, g),
        }
    }
}

/// One parameter on the device: master, bf16 copy, gradient and Adam moments, in the kernel
/// layout.
/// (The buffers are private: the optimizer's tensor table holds their addresses.)
pub struct DeviceParam {
    pub name: String,
    /// Its index in the CPU pair's store (and optimizer state).
    store_index: usize,
    layout: Layout,
    master: Buf<f32>,
    copy: Buf<bf16>,
    grad: Buf<f32>,
    m: Buf<f32>,
    v: Buf<f32>,
}

/// A Linear layer's (weight [out, in], bias [out]) as indices into [`DevicePair::params`].
#[derive(Clone, Copy, Debug)]
struct Lin {
    weight: usize,
    bias: usize,
    in_f: usize,
    out_f: usize,
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

/// CLS pooling's forward activations, for its backward.
struct ClsSaved {
    /// The (normalized) stack in fp32 [n * L, D], LN1's input.
    x32: Buf<f32>,
    ln1: device::LayerNormSavedBufs,
    u: Buf<bf16>,
    ln1_cls: device::LayerNormSavedBufs,
    /// LN1 of the CLS token (the same for every frame) [D].
    u_cls: Buf<bf16>,
    q: Buf<f32>,
    k_cls: Buf<bf16>,
    v_cls: Buf<bf16>,
    k: Buf<bf16>,
    v: Buf<bf16>,
    attn: Buf<bf16>,
    probs: Buf<f32>,
    h: Buf<f32>,
    ln2: device::LayerNormSavedBufs,
    g: Buf<bf16>,
    z: Buf<f32>,
    act: Buf<bf16>,
}

/// What the forward keeps for the backward.
struct Saved {
    /// The normalized stack (interfaces that read it through a separate `normalize` pass).
    normalized: Option<Buf<bf16>>,
    /// Layer-sum norm statistics, one per WeightedSum / GroupWS group.
    stats: Vec<Option<LayerNormStats>>,
    /// HConv: every conv's output; the last one is the features.
    acts: Vec<Buf<bf16>>,
    /// The features of the other interfaces.
    feats: Option<Buf<bf16>>,
    cls: Option<ClsSaved>,
}

impl Saved {
    fn feats(&self) -> &Buf<bf16> {
        self.feats
            .as_ref()
            .or(self.acts.last())
            .expect("every interface makes features")
    }
}

/// The head's forward: the PR head's hidden activations and log-probabilities, or the
/// classifier's pooled activations and logits.
enum HeadSaved {
    Pr { h: Buf<bf16>, out: Buf<f32> },
    Classify { pooled: Buf<bf16>, out: Buf<f32> },
}

pub struct DevicePair {
    pub name: String,
    params: Vec<DeviceParam>,
    /// Every parameter's buffers for the one-launch AdamW.
    adam: device::AdamTensors,
    interface: DeviceInterface,
    head: HeadKind,
    head_proj: Lin,
    head_out: Lin,
    layers: usize,
    dim: usize,
    normalize: bool,
    optimizer: AdamConfig,
    clip: Option<f64>,
    /// Optimizer steps taken (continuing the CPU pair's count).
    pub steps: u64,
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
    params: &mut Vec<DeviceParam>,
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
    let copy: Vec<bf16> = values.iter().map(|&x| bf16::from_f32(x)).collect();
    params.push(DeviceParam {
        name: name.to_string(),
        store_index: index,
        layout,
        master: be.upload(&values)?,
        copy: be.upload(&copy)?,
        grad: be.zeros::<f32>(values.len())?,
        m: be.upload(&m)?,
        v: be.upload(&v)?,
    });
    Ok(params.len() - 1)
}

/// A Linear layer `name` (weight and bias) through `add`.
fn lin(
    add: &mut dyn FnMut(&str, Layout) -> Result<usize>,
    name: &str,
    in_f: usize,
    out_f: usize,
) -> Result<Lin> {
    Ok(Lin {
        weight: add(&format!("{name}.weight"), Layout::Plain)?,
        bias: add(&format!("{name}.bias"), Layout::Plain)?,
        in_f,
        out_f,
    })
}

impl DevicePair {
    /// The device copy of a CPU pair: its current parameters, optimizer state (moments and step
    /// count) and settings.
    pub fn from_pair(be: &Backend, pair: &Pair) -> Result<Self> {
        let cfg = pair.interface.config().clone();
        let (layers, dim) = (cfg.layers, cfg.dim);
        let refuse = |what: String| Error::Config(format!("'{}' on the device: {what}", pair.name));
        let mut params: Vec<DeviceParam> = Vec::new();
        let mut add = |name: &str, layout: Layout| add_param(be, pair, &mut params, name, layout);
        let interface = match &cfg.kind {
            InterfaceKind::WeightedSum => DeviceInterface::WeightedSum {
                weights: add("interface.weights", Layout::Plain)?,
            },
            InterfaceKind::GroupWs { groups, out_dim } => {
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
                    proj: lin(&mut add, "interface.proj", groups * dim, *out_dim)?,
                }
            }
            InterfaceKind::HConv { kernel, stride } => {
                let plan = hconv_plan(layers, dim, *kernel, *stride)?;
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
            InterfaceKind::ConcatProj { out_dim } => DeviceInterface::ConcatProj {
                proj: lin(&mut add, "interface.proj", layers * dim, *out_dim)?,
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
            InterfaceKind::ClsPool {
                heads,
                ffn_dim,
                activation,
            } => {
                if layers + 1 > 96 {
                    return Err(refuse(format!(
                        "CLS pooling's device attention takes at most 95 layer tokens, not {layers}"
                    )));
                }
                let norm = |add: &mut dyn FnMut(&str, Layout) -> Result<usize>,
                            name: &str|
                 -> Result<(usize, usize)> {
                    Ok((
                        add(&format!("{name}.weight"), Layout::Plain)?,
                        add(&format!("{name}.bias"), Layout::Plain)?,
                    ))
                };
                let p = "interface.";
                DeviceInterface::ClsPool(ClsParams {
                    heads: *heads,
                    gelu: *activation == ClsActivation::Gelu,
                    cls: add("interface.cls", Layout::Plain)?,
                    ln1: norm(&mut add, &format!("{p}ln1"))?,
                    q: lin(&mut add, &format!("{p}attn.q_proj"), dim, dim)?,
                    k: lin(&mut add, &format!("{p}attn.k_proj"), dim, dim)?,
                    v: lin(&mut add, &format!("{p}attn.v_proj"), dim, dim)?,
                    out_proj: lin(&mut add, &format!("{p}attn.out_proj"), dim, dim)?,
                    ln2: norm(&mut add, &format!("{p}ln2"))?,
                    ffn1: lin(&mut add, &format!("{p}ffn1"), dim, *ffn_dim)?,
                    ffn2: lin(&mut add, &format!("{p}ffn2"), *ffn_dim, dim)?,
                })
            }
        };
        let d_feat = pair.interface.output_dim();
        let (hidden, outs, kind) = match &pair.head {
            Head::Pr(h) => (
                h.proj.out_features,
                h.out.out_features,
                HeadKind::Ctc {
                    vocab: h.out.out_features,
                },
            ),
            Head::Classifier(h) => (
                h.proj.out_features,
                h.out.out_features,
                HeadKind::Classify {
                    classes: h.out.out_features,
                },
            ),
        };
        let head_proj = lin(&mut add, "head.proj", d_feat, hidden)?;
        let head_out = lin(&mut add, "head.out", hidden, outs)?;
        if params.len() != pair.store.len() {
            let known: Vec<&str> = params.iter().map(|p| p.name.as_str()).collect();
            let missing: Vec<&str> = pair
                .store
                .iter()
                .map(|q| q.name.as_str())
                .filter(|n| !known.contains(n))
                .collect();
            return Err(refuse(format!(
                "the device step does not train {missing:?}; use --device cpu"
            )));
        }
        let adam = device::AdamTensors::new(
            be,
            &params
                .iter()
                .map(|p| (&p.master, &p.grad, &p.m, &p.v, Some(&p.copy)))
                .collect::<Vec<_>>(),
        )?;
        Ok(DevicePair {
            name: pair.name.clone(),
            params,
            adam,
            interface,
            head: kind,
            head_proj,
            head_out,
            layers,
            dim,
            normalize: cfg.normalize,
            optimizer: pair.optimizer.config,
            clip: pair.clip,
            steps: pair.optimizer.step,
        })
    }

    /// Copies the parameters, Adam moments and step count back into `pair` (the CPU pair this
    /// one was built from): what checkpoints and CPU evaluation read.
    pub fn write_to(&self, be: &Backend, pair: &mut Pair) -> Result<()> {
        for p in &self.params {
            let id = pair.store.id(&p.name).ok_or_else(|| {
                Error::Config(format!(
                    "'{}': the CPU pair has no parameter '{}'",
                    pair.name, p.name
                ))
            })?;
            let shape = pair.store.value(id).shape().to_vec();
            let value = p.layout.to_cpu(&be.download(&p.master)?);
            pair.store.set_value(id, Tensor::from_vec(value, &shape)?)?;
            pair.optimizer.exp_avg[p.store_index] = p.layout.to_cpu(&be.download(&p.m)?);
            pair.optimizer.exp_avg_sq[p.store_index] = p.layout.to_cpu(&be.download(&p.v)?);
        }
        pair.optimizer.step = self.steps;
        pair.steps = self.steps;
        Ok(())
    }

    /// Every parameter's accumulated gradient, named and in the CPU store's layout (to compare
    /// with the CPU path's).
    pub fn gradients(&self, be: &Backend) -> Result<Vec<(String, Vec<f32>)>> {
        self.params
            .iter()
            .map(|p| Ok((p.name.clone(), p.layout.to_cpu(&be.download(&p.grad)?))))
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

    fn layer_sum_shape(&self, n: usize, first: usize, k: usize) -> LayerSumShape {
        LayerSumShape {
            n,
            l: self.layers,
            d: self.dim,
            first,
            k,
            normalize: self.normalize,
        }
    }

    fn linear(
        &self,
        be: &Backend,
        x: &Buf<bf16>,
        n: usize,
        l: Lin,
        f32_out: bool,
    ) -> Result<device::LayerOut> {
        device::linear_forward(
            be,
            x,
            n,
            l.in_f,
            l.out_f,
            &self.params[l.weight].copy,
            &self.params[l.bias].master,
            f32_out,
        )
    }

    /// The Linear backward: adds dW, db; returns dx when asked.
    fn linear_back(
        &self,
        be: &Backend,
        x: &Buf<bf16>,
        n: usize,
        l: Lin,
        dy: &Buf<bf16>,
        want_dx: bool,
    ) -> Result<Option<Buf<bf16>>> {
        device::linear_backward(
            be,
            x,
            n,
            l.in_f,
            l.out_f,
            &self.params[l.weight].copy,
            dy,
            (&self.params[l.weight].grad, &self.params[l.bias].grad),
            want_dx,
        )
    }

    fn interface_forward(&self, be: &Backend, x0: &Buf<bf16>, n: usize) -> Result<Saved> {
        let mut saved = Saved {
            normalized: None,
            stats: Vec::new(),
            acts: Vec::new(),
            feats: None,
            cls: None,
        };
        let separate_norm = matches!(
            self.interface,
            DeviceInterface::HConv { .. }
                | DeviceInterface::ConcatProj { .. }
                | DeviceInterface::SingleLayer { .. }
                | DeviceInterface::ClsPool(_)
        );
        if self.normalize && separate_norm {
            saved.normalized = Some(device::layernorm_rows_bf16(
                be,
                x0,
                n * self.layers,
                self.dim,
            )?);
        }
        let x = saved.normalized.as_ref().unwrap_or(x0);
        match &self.interface {
            DeviceInterface::WeightedSum { weights } => {
                let (out, st) = device::layer_sum_forward(
                    be,
                    x,
                    &self.params[*weights].master,
                    self.layer_sum_shape(n, 0, self.layers),
                )?;
                saved.stats.push(st);
                saved.feats = Some(out);
            }
            DeviceInterface::GroupWs { groups, .. } => {
                let width = groups.len() * self.dim;
                let cat = be.zeros::<bf16>(n * width)?;
                for (g, &(first, size, w)) in groups.iter().enumerate() {
                    let cols = Cols {
                        stride: width,
                        offset: g * self.dim,
                    };
                    saved.stats.push(device::layer_sum_forward_into(
                        be,
                        x,
                        &self.params[w].master,
                        self.layer_sum_shape(n, first, size),
                        &cat,
                        cols,
                    )?);
                }
                // The concatenation is kept for the projection's backward; the projected
                // features are made in `features`.
                saved.feats = Some(cat);
            }
            DeviceInterface::HConv { plan, convs } => {
                for (i, g) in plan.convs.iter().enumerate() {
                    let input = if i == 0 { x } else { &saved.acts[i - 1] };
                    let (w, b) = (&self.params[convs[i].0], &self.params[convs[i].1]);
                    let last = i + 1 == plan.convs.len();
                    let y = device::hconv_conv_forward(be, input, n, g, &w.copy, &b.master, last)?;
                    saved.acts.push(y);
                }
            }
            DeviceInterface::ConcatProj { proj } => {
                saved.feats = Some(
                    self.linear(be, x, n, *proj, false)?
                        .into_bf16()
                        .expect("bf16 asked"),
                );
            }
            DeviceInterface::SingleLayer { layer } => {
                saved.feats = Some(device::select_layer(
                    be,
                    x,
                    n,
                    self.layers,
                    self.dim,
                    *layer as i64,
                )?);
            }
            DeviceInterface::ClsPool(c) => {
                let (cls, y) = self.cls_forward(be, c, x, n)?;
                saved.cls = Some(cls);
                saved.feats = Some(device::cast_to_bf16(be, &y)?);
            }
        }
        Ok(saved)
    }

    /// The features the head reads: GroupWS's projection of its concatenation, else the
    /// interface's output.
    fn features<'a>(
        &self,
        be: &Backend,
        saved: &'a Saved,
        n: usize,
        projected: &'a mut Option<Buf<bf16>>,
    ) -> Result<&'a Buf<bf16>> {
        if let DeviceInterface::GroupWs { proj, .. } = &self.interface {
            *projected = Some(
                self.linear(be, saved.feats(), n, *proj, false)?
                    .into_bf16()
                    .expect("bf16 asked"),
            );
            return Ok(projected.as_ref().expect("just set"));
        }
        Ok(saved.feats())
    }

    fn head_forward(
        &self,
        be: &Backend,
        feats: &Buf<bf16>,
        batch: &PackedBatch,
    ) -> Result<HeadSaved> {
        let n = batch.total_frames();
        Ok(match self.head {
            HeadKind::Ctc { .. } => {
                let h = self
                    .linear(be, feats, n, self.head_proj, false)?
                    .into_bf16()
                    .expect("bf16 asked");
                let logits = self
                    .linear(be, &h, n, self.head_out, true)?
                    .into_f32()
                    .expect("f32 asked");
                let out = device::log_softmax_forward(be, &logits, n, self.head_out.out_f)?;
                HeadSaved::Pr { h, out }
            }
            HeadKind::Classify { .. } => {
                let h = self
                    .linear(be, feats, n, self.head_proj, true)?
                    .into_f32()
                    .expect("f32 asked");
                let pooled = device::mean_pool_forward(be, &h, batch, self.head_proj.out_f)?;
                let pooled = device::cast_to_bf16(be, &pooled)?;
                let out = self
                    .linear(be, &pooled, batch.num_utterances(), self.head_out, true)?
                    .into_f32()
                    .expect("f32 asked");
                HeadSaved::Classify { pooled, out }
            }
        })
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
        let n = batch.total_frames();
        self.check_stack(x0, n)?;
        let saved = self.interface_forward(be, x0, n)?;
        let mut projected = None;
        let feats = self.features(be, &saved, n, &mut projected)?;
        let head = self.head_forward(be, feats, batch)?;
        // Loss and its gradient w.r.t. the head's fp32 output, scaled, in bf16 for the backward.
        let (loss, dout) = match &head {
            HeadSaved::Pr { out: lp, .. } => {
                let v = self.head_out.out_f;
                let ctc = device::ctc_loss(be, lp, v, batch, targets, Reduction::Mean, true)?;
                (
                    ctc.loss,
                    device::log_softmax_backward(be, lp, &ctc.grad, n, v)?,
                )
            }
            HeadSaved::Classify { out, .. } => {
                let labels = class_labels(targets)?;
                device::cross_entropy(be, out, self.head_out.out_f, &labels, Reduction::Mean)?
            }
        };
        if !loss.is_finite() {
            return Err(Error::value(
                "training loss",
                format!(
                    "'{}' produced {loss} at step {} on the device: lower the learning rate",
                    self.name,
                    self.steps + 1
                ),
            ));
        }
        let dout = device::cast_to_bf16_scaled(be, &dout, scale)?;
        let has_params = !matches!(self.interface, DeviceInterface::SingleLayer { .. });
        let dfeats = match &head {
            HeadSaved::Pr { h, .. } => {
                let dh = self
                    .linear_back(be, h, n, self.head_out, &dout, true)?
                    .expect("dx asked");
                self.linear_back(be, feats, n, self.head_proj, &dh, has_params)?
            }
            HeadSaved::Classify { pooled, .. } => {
                let u = batch.num_utterances();
                let dpooled = self
                    .linear_back(be, pooled, u, self.head_out, &dout, true)?
                    .expect("dx asked");
                let dpooled = device::cast_to_f32(be, &dpooled)?;
                let dh = device::mean_pool_backward(be, &dpooled, batch, self.head_proj.out_f)?;
                let dh = device::cast_to_bf16(be, &dh)?;
                self.linear_back(be, feats, n, self.head_proj, &dh, has_params)?
            }
        };
        if let Some(dfeats) = dfeats {
            self.interface_backward(be, x0, n, &saved, dfeats)?;
        }
        Ok(loss)
    }

    fn interface_backward(
        &self,
        be: &Backend,
        x0: &Buf<bf16>,
        n: usize,
        saved: &Saved,
        dfeats: Buf<bf16>,
    ) -> Result<()> {
        let x = saved.normalized.as_ref().unwrap_or(x0);
        match &self.interface {
            DeviceInterface::WeightedSum { weights } => {
                let w = &self.params[*weights];
                let dout = device::cast_to_f32(be, &dfeats)?;
                device::layer_sum_backward(
                    be,
                    x,
                    &w.master,
                    &dout,
                    saved.stats[0].as_ref(),
                    self.layer_sum_shape(n, 0, self.layers),
                    &w.grad,
                    false,
                )?;
            }
            DeviceInterface::GroupWs { groups, proj } => {
                let dcat = self
                    .linear_back(be, saved.feats(), n, *proj, &dfeats, true)?
                    .expect("dx asked");
                let dcat = device::cast_to_f32(be, &dcat)?;
                let width = groups.len() * self.dim;
                for (g, &(first, size, wi)) in groups.iter().enumerate() {
                    let w = &self.params[wi];
                    let cols = Cols {
                        stride: width,
                        offset: g * self.dim,
                    };
                    device::layer_sum_backward_cols(
                        be,
                        x,
                        &w.master,
                        (&dcat, cols),
                        saved.stats[g].as_ref(),
                        self.layer_sum_shape(n, first, size),
                        &w.grad,
                        false,
                    )?;
                }
            }
            DeviceInterface::HConv { plan, convs } => {
                let mut dy = Some(dfeats);
                for (i, g) in plan.convs.iter().enumerate().rev() {
                    let (w, b) = (&self.params[convs[i].0], &self.params[convs[i].1]);
                    let conv_saved = HConvSaved {
                        x: if i == 0 { x } else { &saved.acts[i - 1] },
                        y: &saved.acts[i],
                        w: &w.copy,
                        flatten: i + 1 == plan.convs.len(),
                    };
                    let d = dy.take().expect("a gradient flows into every conv");
                    dy = device::hconv_conv_backward(
                        be,
                        &conv_saved,
                        n,
                        g,
                        &d,
                        (&w.grad, &b.grad),
                        i > 0,
                    )?;
                }
            }
            DeviceInterface::ConcatProj { proj } => {
                self.linear_back(be, x, n, *proj, &dfeats, false)?;
            }
            DeviceInterface::SingleLayer { .. } => {}
            DeviceInterface::ClsPool(c) => {
                let cs = saved
                    .cls
                    .as_ref()
                    .expect("CLS pooling's forward saved its activations");
                self.cls_backward(be, c, cs, n, &dfeats)?;
            }
        }
        Ok(())
    }

    fn ln_params(&self, (w, b): (usize, usize)) -> (&Buf<f32>, &Buf<f32>) {
        (&self.params[w].master, &self.params[b].master)
    }

    fn ln_grads(&self, (w, b): (usize, usize)) -> (&Buf<f32>, &Buf<f32>) {
        (&self.params[w].grad, &self.params[b].grad)
    }

    /// CLS pooling as the CPU interface computes it (pre-LN transformer layer, CLS query only):
    /// u = LN1(tokens); q = Wq u_cls; K, V = Wk u, Wv u; attn = softmax(q K^T / sqrt(dh)) V;
    /// h = cls + out_proj(attn); y = h + ffn2(act(ffn1(LN2(h)))). The CLS token is the same in
    /// every frame, so its LN1, query, key and value are computed once. Returns y (fp32 [n, D]).
    fn cls_forward(
        &self,
        be: &Backend,
        c: &ClsParams,
        x: &Buf<bf16>,
        n: usize,
    ) -> Result<(ClsSaved, Buf<f32>)> {
        let (l, d) = (self.layers, self.dim);
        let x32 = device::cast_to_f32(be, x)?;
        let (u, ln1) =
            device::layernorm_forward(be, &x32, n * l, d, Some(self.ln_params(c.ln1)), 1e-5)?;
        let u = device::cast_to_bf16(be, &u)?;
        let cls = &self.params[c.cls].master;
        let (u_cls, ln1_cls) =
            device::layernorm_forward(be, cls, 1, d, Some(self.ln_params(c.ln1)), 1e-5)?;
        let u_cls = device::cast_to_bf16(be, &u_cls)?;
        let lin16 = |x: &Buf<bf16>, rows: usize, p: Lin| -> Result<Buf<bf16>> {
            Ok(self
                .linear(be, x, rows, p, false)?
                .into_bf16()
                .expect("bf16 asked"))
        };
        let lin32 = |x: &Buf<bf16>, rows: usize, p: Lin| -> Result<Buf<f32>> {
            Ok(self
                .linear(be, x, rows, p, true)?
                .into_f32()
                .expect("f32 asked"))
        };
        let q = lin32(&u_cls, 1, c.q)?;
        let (k_cls, v_cls) = (lin16(&u_cls, 1, c.k)?, lin16(&u_cls, 1, c.v)?);
        let (k, v) = (lin16(&u, n * l, c.k)?, lin16(&u, n * l, c.v)?);
        let shape = device::ClsAttnShape {
            n,
            l,
            d,
            heads: c.heads,
        };
        let inputs = device::ClsAttnInputs {
            q: &q,
            k_cls: &k_cls,
            v_cls: &v_cls,
            k: &k,
            v: &v,
        };
        let (attn, probs) = device::cls_attention_forward(be, shape, &inputs)?;
        let o = lin32(&attn, n, c.out_proj)?;
        let h = device::add_rows(be, &o, None, Some(cls), n, d)?;
        let (g, ln2) = device::layernorm_forward(be, &h, n, d, Some(self.ln_params(c.ln2)), 1e-5)?;
        let g = device::cast_to_bf16(be, &g)?;
        let z = lin32(&g, n, c.ffn1)?;
        let act = device::cast_to_bf16(be, &device::activation_forward(be, &z, c.gelu)?)?;
        let f = lin32(&act, n, c.ffn2)?;
        let y = device::add_rows(be, &h, Some(&f), None, n, d)?;
        Ok((
            ClsSaved {
                x32,
                ln1,
                u,
                ln1_cls,
                u_cls,
                q,
                k_cls,
                v_cls,
                k,
                v,
                attn,
                probs,
                h,
                ln2,
                g,
                z,
                act,
            },
            y,
        ))
    }

    fn cls_backward(
        &self,
        be: &Backend,
        c: &ClsParams,
        s: &ClsSaved,
        n: usize,
        dy: &Buf<bf16>,
    ) -> Result<()> {
        let (l, d) = (self.layers, self.dim);
        let f32_of = |b: &Buf<bf16>| device::cast_to_f32(be, b);
        let bf16_of = |b: &Buf<f32>| device::cast_to_bf16(be, b);
        // y = h + ffn2(act(ffn1(LN2(h)))).
        let dact = self
            .linear_back(be, &s.act, n, c.ffn2, dy, true)?
            .expect("dx asked");
        let dz = device::activation_backward(be, &s.z, &f32_of(&dact)?, c.gelu)?;
        let dg = self
            .linear_back(be, &s.g, n, c.ffn1, &bf16_of(&dz)?, true)?
            .expect("dx asked");
        let (w2, _) = self.ln_params(c.ln2);
        let dh = device::layernorm_backward(
            be,
            &s.h,
            n,
            d,
            Some(w2),
            &s.ln2,
            &f32_of(&dg)?,
            Some(self.ln_grads(c.ln2)),
        )?;
        let dh = device::add_rows(be, &dh, Some(&f32_of(dy)?), None, n, d)?;
        // h = cls + out_proj(attn): the CLS vector's share is the frames' sum.
        let cls = &self.params[c.cls];
        device::col_sum_accumulate(be, &dh, n, d, &cls.grad)?;
        let dattn = self
            .linear_back(be, &s.attn, n, c.out_proj, &bf16_of(&dh)?, true)?
            .expect("dx asked");
        let shape = device::ClsAttnShape {
            n,
            l,
            d,
            heads: c.heads,
        };
        let inputs = device::ClsAttnInputs {
            q: &s.q,
            k_cls: &s.k_cls,
            v_cls: &s.v_cls,
            k: &s.k,
            v: &s.v,
        };
        let g = device::cls_attention_backward(be, shape, &inputs, &s.probs, &f32_of(&dattn)?)?;
        // The layer tokens: K and V projections, then LN1's parameters (the stack is frozen).
        let du_k = self
            .linear_back(be, &s.u, n * l, c.k, &g.dk, true)?
            .expect("dx asked");
        let du_v = self
            .linear_back(be, &s.u, n * l, c.v, &g.dv, true)?
            .expect("dx asked");
        let du = device::add_rows(be, &f32_of(&du_k)?, Some(&f32_of(&du_v)?), None, n * l, d)?;
        let (w1, _) = self.ln_params(c.ln1);
        device::layernorm_backward(
            be,
            &s.x32,
            n * l,
            d,
            Some(w1),
            &s.ln1,
            &du,
            Some(self.ln_grads(c.ln1)),
        )?;
        // The CLS token: its query, key and value rows (summed over the frames), through LN1.
        let du_q = self
            .linear_back(be, &s.u_cls, 1, c.q, &bf16_of(&g.dq)?, true)?
            .expect("dx asked");
        let du_kc = self
            .linear_back(be, &s.u_cls, 1, c.k, &bf16_of(&g.dk_cls)?, true)?
            .expect("dx asked");
        let du_vc = self
            .linear_back(be, &s.u_cls, 1, c.v, &bf16_of(&g.dv_cls)?, true)?
            .expect("dx asked");
        let du_cls = device::add_rows(be, &f32_of(&du_q)?, Some(&f32_of(&du_kc)?), None, 1, d)?;
        let du_cls = device::add_rows(be, &du_cls, Some(&f32_of(&du_vc)?), None, 1, d)?;
        let dcls = device::layernorm_backward(
            be,
            &cls.master,
            1,
            d,
            Some(w1),
            &s.ln1_cls,
            &du_cls,
            Some(self.ln_grads(c.ln1)),
        )?;
        device::col_sum_accumulate(be, &dcls, 1, d, &cls.grad)
    }

    /// Clips the accumulated gradients, takes one AdamW / Adam step at learning rate `lr`
    /// (refreshing the bf16 copies, clearing the gradients) in one launch.
    pub fn apply(&mut self, be: &Backend, lr: f64) -> Result<()> {
        let scale = match self.clip {
            Some(max_norm) => {
                let grads: Vec<&Buf<f32>> = self.params.iter().map(|p| &p.grad).collect();
                Some(device::clip_coefficient_multi(be, &grads, max_norm as f32)?.1)
            }
            None => None,
        };
        self.steps += 1;
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
        let n = batch.total_frames();
        self.check_stack(x0, n)?;
        let saved = self.interface_forward(be, x0, n)?;
        let mut projected = None;
        let feats = self.features(be, &saved, n, &mut projected)?;
        let out = match self.head_forward(be, feats, batch)? {
            HeadSaved::Pr { out, .. } | HeadSaved::Classify { out, .. } => out,
        };
        decode_outputs(self.head, &be.download(&out)?, batch)
    }
}
