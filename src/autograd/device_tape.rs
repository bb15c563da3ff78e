//! The tape on a device backend (the GPU, or the kernel emulator running the same kernels): the
//! same reverse-mode scheme as [`super::Tape`], over device buffers. Each op launches its forward
//! kernels, records its output and a backward closure holding the buffers that backward reads,
//! and `backward` runs the closures in reverse from a scalar loss. Where a value feeds several ops
//! its gradients are summed (fp32) before its own backward runs; parameter gradients are ADDED
//! into the parameters' fp32 gradient buffers (fused into the kernels where they can: Linear,
//! conv, LayerNorm and layer-sum weights), so micro-batches accumulate until the optimizer step.
//!
//! Values keep their device dtype: bf16 for what the tensor-core kernels read, fp32 for the
//! LayerNorm / softmax / loss side, with explicit casts between them as in a bf16-autocast step.
//! Gradients are whichever dtype their op's backward produced; each backward converts what it
//! reads (bf16 <-> fp32 casts on the device), so a chain of bf16 ops never round-trips.
//!
//! The op set is what the interfaces and heads need on the device; ops whose kernels have no
//! backward for an input (the per-layer normalize and the layer gather, which only read the frozen
//! stack) refuse, when recorded, an input that needs a gradient.
//!
//! ```
//! use half::bf16;
//! use strata::autograd::{DeviceParam, DeviceTape};
//! use strata::runtime::Backend;
//! use strata::PackedBatch;
//! # fn main() -> strata::Result<()> {
//! let be = Backend::Emulator; // the same kernels as Backend::cuda()?, on the CPU
//! let (l, d, vocab) = (3, 8, 4);
//! let batch = PackedBatch::from_lengths(&[4, 2])?; // two utterances, 6 frames
//! let frames = batch.total_frames();
//! let stack: Vec<bf16> = (0..frames * l * d).map(|i| bf16::from_f32((i % 7) as f32 / 7.0)).collect();
//! let stack = be.upload(&stack)?;
//! // Parameters outlive the tape that borrows them.
//! let ws = DeviceParam::upload(&be, "weights", &vec![0.0; l], &[l])?;
//! let proj_w = DeviceParam::upload(&be, "proj.weight", &vec![0.01; vocab * d], &[vocab, d])?;
//! let proj_b = DeviceParam::upload(&be, "proj.bias", &vec![0.0; vocab], &[vocab])?;
//! let mut tape = DeviceTape::new(&be);
//! let x = tape.input(&stack, &[frames, l, d])?;
//! let w = tape.param(&ws)?;
//! let feats = tape.layer_sums(x, &[(0, l, w)], false)?; // fused WS: bf16 [frames, d]
//! let (pw, pb) = (tape.param(&proj_w)?, tape.param(&proj_b)?);
//! let logits = tape.linear(feats, pw, pb, true)?; // fp32 [frames, vocab]
//! let loss = tape.ctc_loss(logits, &batch, &[vec![1, 2], vec![3]])?;
//! assert!(tape.loss_value(loss)?.is_finite());
//! tape.backward(loss, 1.0)?; // adds into ws.grad, proj_w.grad, proj_b.grad
//! drop(tape);
//! assert!(be.download(&proj_b.grad)?.iter().any(|g| *g != 0.0));
//! # Ok(())
//! # }
//! ```

use std::ops::Deref;
use std::rc::Rc;

use crate::batch::PackedBatch;
use crate::error::{Error, Result};
use crate::ops::ctc::Reduction;
use crate::ops::device::{self, Cols, HConvSaved, LayerSumShape};
use crate::ops::layer_conv::ConvGeom;
use crate::runtime::{Backend, Buf};
use half::bf16;

mod lstm;
mod mlsuperb;

/// A handle to a value recorded on a [`DeviceTape`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DVar(usize);

/// A device buffer the tape owns (shared with the backward closures that read it) or borrows
/// (the input stack, parameters).
enum Held<'a, T> {
    Own(Rc<Buf<T>>),
    Lent(&'a Buf<T>),
}

impl<T> Clone for Held<'_, T> {
    fn clone(&self) -> Self {
        match self {
            Held::Own(b) => Held::Own(Rc::clone(b)),
            Held::Lent(b) => Held::Lent(b),
        }
    }
}

impl<T> Deref for Held<'_, T> {
    type Target = Buf<T>;
    fn deref(&self) -> &Buf<T> {
        match self {
            Held::Own(b) => b,
            Held::Lent(b) => b,
        }
    }
}

/// What a Linear's GEMM writes: fp32, bf16, or ReLU then bf16.
#[derive(Clone, Copy)]
enum Epilogue {
    F32,
    Bf16,
    ReluBf16,
}

/// An op's input held in the dtype it came in, for kernels that read either.
enum HeldIn<'a> {
    F32(Held<'a, f32>),
    Bf16(Held<'a, bf16>),
}

impl HeldIn<'_> {
    fn buf(&self) -> device::AnyBuf<'_> {
        match self {
            HeldIn::F32(b) => device::AnyBuf::F32(b),
            HeldIn::Bf16(b) => device::AnyBuf::Bf16(b),
        }
    }
}

/// A trainable parameter's device buffers: fp32 master values, their bf16 copy (what the
/// tensor-core kernels read; the optimizer refreshes it) and the fp32 gradient its ops add into,
/// with its shape in the kernels' layout.
pub struct DeviceParam {
    pub name: String,
    pub shape: Vec<usize>,
    pub master: Buf<f32>,
    pub copy: Buf<bf16>,
    pub grad: Buf<f32>,
}

impl DeviceParam {
    /// `values` (fp32, `shape`) put on `be`, with their bf16 copy and a zero gradient.
    pub fn upload(be: &Backend, name: &str, values: &[f32], shape: &[usize]) -> Result<Self> {
        DeviceTape::check_len(&format!("parameter '{name}'"), shape, values.len())?;
        let copy: Vec<bf16> = values.iter().map(|&x| bf16::from_f32(x)).collect();
        Ok(DeviceParam {
            name: name.to_string(),
            shape: shape.to_vec(),
            master: be.upload(values)?,
            copy: be.upload(&copy)?,
            grad: be.zeros::<f32>(values.len())?,
        })
    }
}

enum Value<'a> {
    Bf16(Held<'a, bf16>),
    F32(Held<'a, f32>),
    Param(&'a DeviceParam),
    /// A loss, reduced on the host.
    Loss(f32),
}

impl Value<'_> {
    fn dtype(&self) -> &'static str {
        match self {
            Value::Bf16(_) => "bf16",
            Value::F32(_) => "fp32",
            Value::Param(_) => "parameter",
            Value::Loss(_) => "loss",
        }
    }
}

/// A gradient flowing down the tape.
#[derive(Clone)]
pub enum Grad {
    Bf16(Rc<Buf<bf16>>),
    F32(Rc<Buf<f32>>),
    /// The loss's seed.
    Scalar(f32),
}

impl Grad {
    fn f32(b: Buf<f32>) -> Grad {
        Grad::F32(Rc::new(b))
    }

    fn bf16(b: Buf<bf16>) -> Grad {
        Grad::Bf16(Rc::new(b))
    }

    /// As fp32 (a cast when it is bf16).
    fn to_f32(&self, be: &Backend, op: &str) -> Result<Rc<Buf<f32>>> {
        match self {
            Grad::F32(b) => Ok(Rc::clone(b)),
            Grad::Bf16(b) => Ok(Rc::new(device::cast_to_f32(be, b)?)),
            Grad::Scalar(_) => Err(Error::Config(format!(
                "{op}: a loss seed reached a tensor op's backward"
            ))),
        }
    }

    /// As bf16 (rounded when it is fp32), what the tensor-core backward kernels read.
    fn to_bf16(&self, be: &Backend, op: &str) -> Result<Rc<Buf<bf16>>> {
        match self {
            Grad::Bf16(b) => Ok(Rc::clone(b)),
            Grad::F32(b) => Ok(Rc::new(device::cast_to_bf16(be, b)?)),
            Grad::Scalar(_) => Err(Error::Config(format!(
                "{op}: a loss seed reached a tensor op's backward"
            ))),
        }
    }

    /// The buffer, for a kernel that reads either dtype.
    fn as_buf(&self, op: &str) -> Result<device::AnyBuf<'_>> {
        match self {
            Grad::F32(b) => Ok(device::AnyBuf::F32(b)),
            Grad::Bf16(b) => Ok(device::AnyBuf::Bf16(b)),
            Grad::Scalar(_) => Err(Error::Config(format!(
                "{op}: a loss seed reached a tensor op's backward"
            ))),
        }
    }

    /// The gradient as fp32 values on the host (tests, gradient checks).
    pub fn download(&self, be: &Backend) -> Result<Vec<f32>> {
        match self {
            Grad::F32(b) => be.download(b),
            Grad::Bf16(b) => Ok(be.download(b)?.iter().map(|x| x.to_f32()).collect()),
            Grad::Scalar(s) => Ok(vec![*s]),
        }
    }
}

/// What backward wants for one input of an op.
#[derive(Clone, Copy)]
enum Need<'a> {
    /// Nothing (a constant, or nothing trainable upstream of it).
    No,
    /// The gradient, returned to the tape.
    Grad,
    /// A parameter: its gradient is added into this buffer (by the op's own kernels where they
    /// fuse it, otherwise by the tape from the returned gradient).
    Param(&'a Buf<f32>),
}

impl<'a> Need<'a> {
    fn any(&self) -> bool {
        !matches!(self, Need::No)
    }

    /// The buffer a fused kernel adds this input's gradient into: the parameter's own, or a zeroed
    /// one of `len` that is returned as the gradient (or dropped when none is wanted).
    fn sink(&self, be: &Backend, len: usize) -> Result<Sink<'a>> {
        Ok(match self {
            Need::Param(g) => Sink::Param(g),
            Need::Grad => Sink::Fresh(be.zeros::<f32>(len)?, true),
            Need::No => Sink::Fresh(be.zeros::<f32>(len)?, false),
        })
    }
}

enum Sink<'a> {
    Param(&'a Buf<f32>),
    /// A zeroed buffer, and whether the tape wants it back.
    Fresh(Buf<f32>, bool),
}

impl Sink<'_> {
    fn buf(&self) -> &Buf<f32> {
        match self {
            Sink::Param(g) => g,
            Sink::Fresh(b, _) => b,
        }
    }

    fn into_grad(self) -> Option<Grad> {
        match self {
            Sink::Fresh(b, true) => Some(Grad::f32(b)),
            _ => None,
        }
    }
}

/// Maps the output gradient to one optional gradient per input.
type BackwardFn<'a> =
    Box<dyn FnOnce(&Backend, Grad, &[Need<'a>]) -> Result<Vec<Option<Grad>>> + 'a>;

struct Node<'a> {
    value: Value<'a>,
    shape: Vec<usize>,
    inputs: Vec<DVar>,
    backward: Option<BackwardFn<'a>>,
    requires_grad: bool,
}

pub struct DeviceTape<'a> {
    be: &'a Backend,
    nodes: Vec<Node<'a>>,
    grad_enabled: bool,
    backward_done: bool,
}

/// Gradients of the leaves made with [`DeviceTape::input_requiring_grad`].
#[derive(Default)]
pub struct DeviceGradients {
    leaves: Vec<(DVar, Grad)>,
}

impl DeviceGradients {
    pub fn get(&self, v: DVar) -> Option<&Grad> {
        self.leaves.iter().find(|(w, _)| *w == v).map(|(_, g)| g)
    }
}

/// A shape error named after the tape op.
fn shape_error(op: &str, expected: impl Into<String>, got: impl Into<String>) -> Error {
    Error::shape(format!("device tape {op}"), expected, got)
}

fn rows_of(shape: &[usize]) -> usize {
    shape[..shape.len().saturating_sub(1)].iter().product()
}

impl<'a> DeviceTape<'a> {
    /// A tape that records backward closures.
    pub fn new(be: &'a Backend) -> Self {
        DeviceTape {
            be,
            nodes: Vec::new(),
            grad_enabled: true,
            backward_done: false,
        }
    }

    /// A tape that only computes values (decoding, evaluation).
    pub fn no_grad(be: &'a Backend) -> Self {
        DeviceTape {
            grad_enabled: false,
            ..Self::new(be)
        }
    }

    pub fn backend(&self) -> &'a Backend {
        self.be
    }

    pub fn shape(&self, v: DVar) -> &[usize] {
        &self.nodes[v.0].shape
    }

    pub fn requires_grad(&self, v: DVar) -> bool {
        self.nodes[v.0].requires_grad
    }

    /// The value of an fp32 node (or a parameter's master values).
    pub fn f32_value(&self, v: DVar) -> Result<&Buf<f32>> {
        match &self.nodes[v.0].value {
            Value::F32(b) => Ok(b),
            Value::Param(p) => Ok(&p.master),
            other => Err(Error::Config(format!(
                "device tape: value {} is {}, not fp32",
                v.0,
                other.dtype()
            ))),
        }
    }

    /// The value of a loss node.
    pub fn loss_value(&self, v: DVar) -> Result<f32> {
        match self.nodes[v.0].value {
            Value::Loss(l) => Ok(l),
            ref other => Err(Error::Config(format!(
                "device tape: value {} is {}, not a loss",
                v.0,
                other.dtype()
            ))),
        }
    }

    fn leaf(&mut self, value: Value<'a>, shape: &[usize], requires_grad: bool) -> DVar {
        self.nodes.push(Node {
            value,
            shape: shape.to_vec(),
            inputs: Vec::new(),
            backward: None,
            requires_grad,
        });
        DVar(self.nodes.len() - 1)
    }

    fn check_len(what: &str, shape: &[usize], len: usize) -> Result<()> {
        if shape.iter().product::<usize>() != len || shape.is_empty() {
            return Err(shape_error(
                what,
                format!("{len} elements"),
                format!("shape {shape:?}"),
            ));
        }
        Ok(())
    }

    /// A bf16 value that never receives a gradient (the frozen upstream's stack).
    pub fn input(&mut self, x: &'a Buf<bf16>, shape: &[usize]) -> Result<DVar> {
        Self::check_len("input", shape, x.len())?;
        Ok(self.leaf(Value::Bf16(Held::Lent(x)), shape, false))
    }

    /// An fp32 value that never receives a gradient (a fitted, untrained bias).
    pub fn constant_f32(&mut self, x: &'a Buf<f32>, shape: &[usize]) -> Result<DVar> {
        Self::check_len("constant", shape, x.len())?;
        Ok(self.leaf(Value::F32(Held::Lent(x)), shape, false))
    }

    /// A bf16 leaf whose gradient [`DeviceTape::backward`] returns (a trainable upstream's stack,
    /// gradient checks).
    pub fn input_requiring_grad(&mut self, x: &'a Buf<bf16>, shape: &[usize]) -> Result<DVar> {
        Self::check_len("input", shape, x.len())?;
        let rg = self.grad_enabled;
        Ok(self.leaf(Value::Bf16(Held::Lent(x)), shape, rg))
    }

    /// A trainable parameter, in its own shape.
    pub fn param(&mut self, p: &'a DeviceParam) -> Result<DVar> {
        self.param_as(p, &p.shape)
    }

    /// A trainable parameter seen under another shape of as many elements (e.g. a [D] vector as
    /// a [1, D] row).
    pub fn param_as(&mut self, p: &'a DeviceParam, shape: &[usize]) -> Result<DVar> {
        for (what, len) in [
            ("master", p.master.len()),
            ("bf16 copy", p.copy.len()),
            ("gradient", p.grad.len()),
        ] {
            Self::check_len(&format!("parameter '{}' {what}", p.name), shape, len)?;
        }
        let rg = self.grad_enabled;
        Ok(self.leaf(Value::Param(p), shape, rg))
    }

    fn bf16_of(&self, op: &str, v: DVar) -> Result<Held<'a, bf16>> {
        match &self.nodes[v.0].value {
            Value::Bf16(b) => Ok(b.clone()),
            Value::Param(p) => Ok(Held::Lent(&p.copy)),
            other => Err(Error::Config(format!(
                "device tape {op}: expects a bf16 input, got {} (cast it with to_bf16)",
                other.dtype()
            ))),
        }
    }

    fn f32_of(&self, op: &str, v: DVar) -> Result<Held<'a, f32>> {
        match &self.nodes[v.0].value {
            Value::F32(b) => Ok(b.clone()),
            Value::Param(p) => Ok(Held::Lent(&p.master)),
            other => Err(Error::Config(format!(
                "device tape {op}: expects an fp32 input, got {} (cast it with to_f32)",
                other.dtype()
            ))),
        }
    }

    /// Refuses an input that needs a gradient for an op whose kernels have no backward for it.
    fn frozen(&self, op: &str, v: DVar) -> Result<()> {
        if self.nodes[v.0].requires_grad {
            return Err(Error::Config(format!(
                "device tape {op}: its input needs a gradient, which this op has no kernel for (it reads the frozen stack)"
            )));
        }
        Ok(())
    }

    /// Records an op's output. `make_backward` is only called when some input needs a gradient.
    fn push(
        &mut self,
        value: Value<'a>,
        shape: &[usize],
        inputs: &[DVar],
        make_backward: impl FnOnce() -> BackwardFn<'a>,
    ) -> DVar {
        let requires_grad =
            self.grad_enabled && inputs.iter().any(|v| self.nodes[v.0].requires_grad);
        let backward = requires_grad.then(make_backward);
        self.nodes.push(Node {
            value,
            shape: shape.to_vec(),
            inputs: inputs.to_vec(),
            backward,
            requires_grad,
        });
        DVar(self.nodes.len() - 1)
    }

    /// Records an fp32 op of the one input `x` whose backward maps the output's gradient (as
    /// fp32) to the input's with `backward`.
    fn push_f32(
        &mut self,
        y: Rc<Buf<f32>>,
        shape: &[usize],
        x: DVar,
        op: &'static str,
        backward: impl FnOnce(&Backend, &Buf<f32>) -> Result<Buf<f32>> + 'a,
    ) -> DVar {
        self.push(Value::F32(Held::Own(y)), shape, &[x], move || {
            Box::new(move |be, g, _| {
                let dy = g.to_f32(be, op)?;
                Ok(vec![Some(Grad::f32(backward(be, &dy)?))])
            })
        })
    }

    /// The same values under another shape of as many elements.
    pub fn reshape(&mut self, x: DVar, shape: &[usize]) -> Result<DVar> {
        let n = &self.nodes[x.0];
        if shape.iter().product::<usize>() != n.shape.iter().product::<usize>() {
            return Err(shape_error(
                "reshape",
                format!("{} elements", n.shape.iter().product::<usize>()),
                format!("{shape:?}"),
            ));
        }
        let value = match &n.value {
            Value::Bf16(b) => Value::Bf16(b.clone()),
            Value::F32(b) => Value::F32(b.clone()),
            other => {
                return Err(Error::Config(format!(
                    "device tape reshape: cannot reshape a {}",
                    other.dtype()
                )))
            }
        };
        Ok(self.push(value, shape, &[x], || Box::new(|_, g, _| Ok(vec![Some(g)]))))
    }

    /// bf16 -> fp32 (exact). The gradient passes through in whatever dtype it comes.
    pub fn to_f32(&mut self, x: DVar) -> Result<DVar> {
        let xb = self.bf16_of("to_f32", x)?;
        let y = device::cast_to_f32(self.be, &xb)?;
        let shape = self.shape(x).to_vec();
        Ok(
            self.push(Value::F32(Held::Own(Rc::new(y))), &shape, &[x], || {
                Box::new(|_, g, _| Ok(vec![Some(g)]))
            }),
        )
    }

    /// fp32 -> bf16 (round to nearest even). The gradient passes through.
    pub fn to_bf16(&mut self, x: DVar) -> Result<DVar> {
        let xf = self.f32_of("to_bf16", x)?;
        let y = device::cast_to_bf16(self.be, &xf)?;
        let shape = self.shape(x).to_vec();
        Ok(
            self.push(Value::Bf16(Held::Own(Rc::new(y))), &shape, &[x], || {
                Box::new(|_, g, _| Ok(vec![Some(g)]))
            }),
        )
    }

    fn stack_dims(&self, op: &str, x: DVar) -> Result<(usize, usize, usize)> {
        match *self.shape(x) {
            [n, l, d] => Ok((n, l, d)),
            ref s => Err(shape_error(op, "a stack [frames, L, D]", format!("{s:?}"))),
        }
    }

    /// s3prl's per-layer `normalize` of the frozen bf16 stack [n, L, D] (LayerNorm of every
    /// layer's row, no affine).
    pub fn normalize_layers(&mut self, x: DVar) -> Result<DVar> {
        const OP: &str = "normalize_layers";
        self.frozen(OP, x)?;
        let (n, l, d) = self.stack_dims(OP, x)?;
        let xb = self.bf16_of(OP, x)?;
        let y = device::layernorm_rows_bf16(self.be, &xb, n * l, d)?;
        Ok(self.leaf(Value::Bf16(Held::Own(Rc::new(y))), &[n, l, d], false))
    }

    /// Layer `layer` of the bf16 stack [n, L, D] as [n, D] (negative counts from the end).
    pub fn select_layer(&mut self, x: DVar, layer: i64) -> Result<DVar> {
        const OP: &str = "select_layer";
        self.frozen(OP, x)?;
        let (n, l, d) = self.stack_dims(OP, x)?;
        let xb = self.bf16_of(OP, x)?;
        let y = device::select_layer(self.be, &xb, n, l, d, layer)?;
        Ok(self.leaf(Value::Bf16(Held::Own(Rc::new(y))), &[n, d], false))
    }

    /// Softmax-weighted sums of the stack's layers, one per group `(first, count, weights [count])`,
    /// written side by side: bf16 [n, groups * D] (WeightedSum is one group over every layer;
    /// GroupWS's concatenation needs no copy). `normalize` fuses s3prl's per-layer LayerNorm.
    pub fn layer_sums(
        &mut self,
        x: DVar,
        groups: &[(usize, usize, DVar)],
        normalize: bool,
    ) -> Result<DVar> {
        const OP: &str = "layer_sums";
        let (n, l, d) = self.stack_dims(OP, x)?;
        if groups.is_empty() {
            return Err(shape_error(OP, "at least one group", "none"));
        }
        let xb = self.bf16_of(OP, x)?;
        let width = groups.len() * d;
        // Every column belongs to one group: written in full.
        let out = self.be.output::<bf16>(n * width)?;
        let mut plan = Vec::new();
        let mut inputs = vec![x];
        for (g, &(first, k, w)) in groups.iter().enumerate() {
            if self.shape(w) != [k] {
                return Err(shape_error(
                    &format!("{OP} group {g}"),
                    format!("weights [{k}]"),
                    format!("{:?}", self.shape(w)),
                ));
            }
            let wv = self.f32_of(OP, w)?;
            let shape = LayerSumShape {
                n,
                l,
                d,
                first,
                k,
                normalize,
            };
            let cols = Cols {
                stride: width,
                offset: g * d,
            };
            let stats = device::layer_sum_forward_into(self.be, &xb, &wv, shape, &out, cols)?;
            plan.push((shape, cols, wv, stats));
            inputs.push(w);
        }
        Ok(self.push(
            Value::Bf16(Held::Own(Rc::new(out))),
            &[n, width],
            &inputs,
            move || {
                Box::new(move |be, g, need| {
                    let dout = g.to_f32(be, OP)?;
                    // One stack gradient for every group: each writes only its own layers.
                    let dx = match need[0].any() {
                        true => Some(be.zeros::<f32>(n * l * d)?),
                        false => None,
                    };
                    let mut grads = vec![None];
                    for (i, (shape, cols, wv, stats)) in plan.into_iter().enumerate() {
                        let sink = need[i + 1].sink(be, shape.k)?;
                        device::layer_sum_backward_into(
                            be,
                            &xb,
                            &wv,
                            (&dout, cols),
                            stats.as_ref(),
                            shape,
                            sink.buf(),
                            dx.as_ref(),
                        )?;
                        grads.push(sink.into_grad());
                    }
                    grads[0] = dx.map(Grad::f32);
                    Ok(grads)
                })
            },
        ))
    }

    fn linear_dims(&self, op: &str, x: DVar, w: DVar, b: DVar) -> Result<(usize, usize, usize)> {
        let (xs, ws) = (self.shape(x), self.shape(w));
        match *ws {
            [out_f, in_f]
                if xs.len() >= 2 && xs[xs.len() - 1] == in_f && self.shape(b) == [out_f] =>
            {
                Ok((rows_of(xs), in_f, out_f))
            }
            _ => Err(shape_error(
                op,
                "x [rows, in], weight [out, in], bias [out]",
                format!("x {xs:?}, weight {ws:?}, bias {:?}", self.shape(b)),
            )),
        }
    }

    /// y = x W^T + b on tensor cores: x bf16 [rows, in], w [out, in] (read as bf16), b [out]
    /// (fp32); y bf16, or fp32 with `out_f32` (logits, and what LayerNorm or a residual reads).
    pub fn linear(&mut self, x: DVar, w: DVar, b: DVar, out_f32: bool) -> Result<DVar> {
        self.linear_with(
            x,
            w,
            b,
            if out_f32 {
                Epilogue::F32
            } else {
                Epilogue::Bf16
            },
        )
    }

    /// relu(x W^T + b) in bf16 [rows, out], the ReLU and the rounding fused into the GEMM
    /// (`linear` to fp32, `activation` and `to_bf16` give the same values in three passes over an
    /// fp32 [rows, out]); its backward masks dy by the output.
    pub fn linear_relu(&mut self, x: DVar, w: DVar, b: DVar) -> Result<DVar> {
        self.linear_with(x, w, b, Epilogue::ReluBf16)
    }

    fn linear_with(&mut self, x: DVar, w: DVar, b: DVar, epilogue: Epilogue) -> Result<DVar> {
        let op = match epilogue {
            Epilogue::ReluBf16 => "linear_relu",
            _ => "linear",
        };
        let (rows, in_f, out_f) = self.linear_dims(op, x, w, b)?;
        let (xb, wb, bf) = (
            self.bf16_of(op, x)?,
            self.bf16_of(op, w)?,
            self.f32_of(op, b)?,
        );
        // The ReLU's output, kept for its mask in backward.
        let mut relu_out = None;
        let value = match epilogue {
            Epilogue::ReluBf16 => {
                let y = Rc::new(device::linear_relu_forward(
                    self.be, &xb, rows, in_f, out_f, &wb, &bf,
                )?);
                relu_out = Some(Rc::clone(&y));
                Value::Bf16(Held::Own(y))
            }
            Epilogue::F32 | Epilogue::Bf16 => {
                let out_f32 = matches!(epilogue, Epilogue::F32);
                match device::linear_forward(self.be, &xb, rows, in_f, out_f, &wb, &bf, out_f32)? {
                    device::LayerOut::Bf16(y) => Value::Bf16(Held::Own(Rc::new(y))),
                    device::LayerOut::F32(y) => Value::F32(Held::Own(Rc::new(y))),
                }
            }
        };
        let mut shape = self.shape(x).to_vec();
        *shape.last_mut().expect("checked 2-D") = out_f;
        Ok(self.push(value, &shape, &[x, w, b], move || {
            Box::new(move |be, g, need| {
                let dy = g.to_bf16(be, op)?;
                let (dw, db) = (need[1].sink(be, out_f * in_f)?, need[2].sink(be, out_f)?);
                let grads = (dw.buf(), db.buf());
                let want_dx = need[0].any();
                let dx = match &relu_out {
                    Some(y) => device::linear_relu_backward(
                        be, &xb, y, rows, in_f, out_f, &wb, &dy, grads, want_dx,
                    )?,
                    None => device::linear_backward(
                        be, &xb, rows, in_f, out_f, &wb, &dy, grads, want_dx,
                    )?,
                };
                Ok(vec![dx.map(Grad::bf16), dw.into_grad(), db.into_grad()])
            })
        }))
    }

    /// One HConv conv + bias + ReLU over the layer axis: x bf16 [n, l_in, c_in], w tap-major
    /// [c_out, kernel * c_in], b [c_out] -> bf16 [n, l_out, c_out], or channel-major flattened
    /// [n, c_out * l_out] when `flatten` (the last conv).
    pub fn hconv_conv(
        &mut self,
        x: DVar,
        w: DVar,
        b: DVar,
        geom: ConvGeom,
        flatten: bool,
    ) -> Result<DVar> {
        const OP: &str = "hconv_conv";
        let n = match *self.shape(x) {
            [n, l, c] if l == geom.l_in && c == geom.c_in => n,
            ref s => {
                return Err(shape_error(
                    OP,
                    format!("x [frames, {}, {}]", geom.l_in, geom.c_in),
                    format!("{s:?}"),
                ))
            }
        };
        let k = geom.kernel * geom.c_in;
        if self.shape(w) != [geom.c_out, k] || self.shape(b) != [geom.c_out] {
            return Err(shape_error(
                OP,
                format!("weight [{}, {k}], bias [{}]", geom.c_out, geom.c_out),
                format!("weight {:?}, bias {:?}", self.shape(w), self.shape(b)),
            ));
        }
        let (xb, wb, bf) = (
            self.bf16_of(OP, x)?,
            self.bf16_of(OP, w)?,
            self.f32_of(OP, b)?,
        );
        let y = Rc::new(device::hconv_conv_forward(
            self.be, &xb, n, &geom, &wb, &bf, flatten,
        )?);
        let l_out = geom.l_out();
        let shape = if flatten {
            vec![n, geom.c_out * l_out]
        } else {
            vec![n, l_out, geom.c_out]
        };
        let saved_y = Rc::clone(&y);
        Ok(
            self.push(Value::Bf16(Held::Own(y)), &shape, &[x, w, b], move || {
                Box::new(move |be, g, need| {
                    let dy = g.to_bf16(be, OP)?;
                    let (dw, db) = (
                        need[1].sink(be, geom.c_out * k)?,
                        need[2].sink(be, geom.c_out)?,
                    );
                    let saved = HConvSaved {
                        x: &xb,
                        y: &saved_y,
                        w: &wb,
                        flatten,
                    };
                    let dx = device::hconv_conv_backward(
                        be,
                        &saved,
                        n,
                        &geom,
                        &dy,
                        (dw.buf(), db.buf()),
                        need[0].any(),
                    )?;
                    Ok(vec![dx.map(Grad::bf16), dw.into_grad(), db.into_grad()])
                })
            }),
        )
    }

    /// LayerNorm over the last dimension of fp32 x, with an optional affine (weight, bias [d]).
    pub fn layer_norm(&mut self, x: DVar, affine: Option<(DVar, DVar)>, eps: f64) -> Result<DVar> {
        self.layer_norm_to(x, affine, eps, false)
    }

    /// [`Self::layer_norm`] of fp32 or bf16 x (read as it is, no cast), its output in bf16 when
    /// `out_bf16` (rounded once at the store): CLS pooling normalizes the bf16 stack's rows straight
    /// into the bf16 its projections read. The same values as casts around the fp32 LayerNorm.
    pub fn layer_norm_to(
        &mut self,
        x: DVar,
        affine: Option<(DVar, DVar)>,
        eps: f64,
        out_bf16: bool,
    ) -> Result<DVar> {
        const OP: &str = "layer_norm";
        let shape = self.shape(x).to_vec();
        let d = *shape.last().unwrap_or(&0);
        if let Some((w, b)) = affine {
            if self.shape(w) != [d] || self.shape(b) != [d] {
                return Err(shape_error(
                    OP,
                    format!("weight and bias [{d}]"),
                    format!("{:?}, {:?}", self.shape(w), self.shape(b)),
                ));
            }
        }
        let rows = rows_of(&shape);
        let xin = match &self.nodes[x.0].value {
            Value::Bf16(b) => HeldIn::Bf16(b.clone()),
            _ => HeldIn::F32(self.f32_of(OP, x)?),
        };
        let aff = match affine {
            Some((w, b)) => Some((self.f32_of(OP, w)?, self.f32_of(OP, b)?)),
            None => None,
        };
        let (y, saved) = device::layernorm_forward_any(
            self.be,
            xin.buf(),
            rows,
            d,
            aff.as_ref().map(|(w, b)| (&**w, &**b)),
            eps,
            out_bf16,
        )?;
        let value = match y {
            device::LayerOut::F32(y) => Value::F32(Held::Own(Rc::new(y))),
            device::LayerOut::Bf16(y) => Value::Bf16(Held::Own(Rc::new(y))),
        };
        let mut inputs = vec![x];
        inputs.extend(affine.iter().flat_map(|&(w, b)| [w, b]));
        Ok(self.push(value, &shape, &inputs, move || {
            Box::new(move |be, g, need| {
                let dy = g.to_f32(be, OP)?;
                let sinks = match &aff {
                    Some(_) => Some((need[1].sink(be, d)?, need[2].sink(be, d)?)),
                    None => None,
                };
                // The frozen stack's rows (CLS pooling) take no dx: only the affine
                // parameters' gradients are computed then.
                let dx = match (need[0].any(), &sinks) {
                    (false, None) => None,
                    (need_dx, _) => device::layernorm_backward_with(
                        be,
                        xin.buf(),
                        rows,
                        d,
                        aff.as_ref().map(|(w, _)| &**w),
                        &saved,
                        &dy,
                        sinks.as_ref().map(|(w, b)| (w.buf(), b.buf())),
                        need_dx,
                    )?,
                };
                let mut grads = vec![dx.map(Grad::f32)];
                if let Some((w, b)) = sinks {
                    grads.extend([w.into_grad(), b.into_grad()]);
                }
                Ok(grads)
            })
        }))
    }

    /// The attention of CLS pooling's one query, shared by every frame, over each frame's CLS
    /// token and `l` layer tokens: q fp32 [1, D]; k_cls, v_cls bf16 [1, D]; k, v bf16 [n * l, D]
    /// -> bf16 [n, D] (kernels/attention.cu).
    #[allow(clippy::too_many_arguments)]
    pub fn cls_attention(
        &mut self,
        q: DVar,
        k_cls: DVar,
        v_cls: DVar,
        k: DVar,
        v: DVar,
        l: usize,
        heads: usize,
    ) -> Result<DVar> {
        const OP: &str = "cls_attention";
        let d = *self.shape(q).last().unwrap_or(&0);
        let rows = rows_of(self.shape(k));
        let ok = [q, k_cls, v_cls].iter().all(|&t| self.shape(t) == [1, d])
            && [k, v].iter().all(|&t| self.shape(t) == [rows, d])
            && l > 0
            && rows.is_multiple_of(l);
        if !ok {
            return Err(shape_error(
                OP,
                format!("q, k_cls, v_cls [1, D]; k, v [frames * {l}, D]"),
                format!(
                    "{:?}",
                    [q, k_cls, v_cls, k, v].map(|t| self.shape(t).to_vec())
                ),
            ));
        }
        let shape = device::ClsAttnShape {
            n: rows / l,
            l,
            d,
            heads,
        };
        let qf = self.f32_of(OP, q)?;
        let (kc, vc) = (self.bf16_of(OP, k_cls)?, self.bf16_of(OP, v_cls)?);
        let (kb, vb) = (self.bf16_of(OP, k)?, self.bf16_of(OP, v)?);
        let inputs = device::ClsAttnInputs {
            q: &qf,
            k_cls: &kc,
            v_cls: &vc,
            k: &kb,
            v: &vb,
        };
        let (out, probs) = device::cls_attention_forward(self.be, shape, &inputs)?;
        Ok(self.push(
            Value::Bf16(Held::Own(Rc::new(out))),
            &[shape.n, d],
            &[q, k_cls, v_cls, k, v],
            move || {
                Box::new(move |be, g, _| {
                    let dout = g.to_f32(be, OP)?;
                    let inputs = device::ClsAttnInputs {
                        q: &qf,
                        k_cls: &kc,
                        v_cls: &vc,
                        k: &kb,
                        v: &vb,
                    };
                    let gr = device::cls_attention_backward(be, shape, &inputs, &probs, &dout)?;
                    Ok(vec![
                        Some(Grad::f32(gr.dq)),
                        Some(Grad::f32(gr.dk_cls)),
                        Some(Grad::f32(gr.dv_cls)),
                        Some(Grad::bf16(gr.dk)),
                        Some(Grad::bf16(gr.dv)),
                    ])
                })
            },
        ))
    }

    /// a + b, fp32, same shapes.
    pub fn add(&mut self, a: DVar, b: DVar) -> Result<DVar> {
        const OP: &str = "add";
        let shape = self.shape(a).to_vec();
        if self.shape(b) != shape.as_slice() {
            return Err(shape_error(
                OP,
                format!("{shape:?} + {shape:?}"),
                format!("{shape:?} + {:?}", self.shape(b)),
            ));
        }
        let (af, bf) = (self.f32_of(OP, a)?, self.f32_of(OP, b)?);
        let y = device::add_rows(self.be, &af, Some(&bf), None, 1, af.len())?;
        Ok(
            self.push(Value::F32(Held::Own(Rc::new(y))), &shape, &[a, b], || {
                Box::new(|_, g, _| Ok(vec![Some(g.clone()), Some(g)]))
            }),
        )
    }

    /// a [rows, c] + the row v [c] (or [1, c]) added to every row, fp32.
    pub fn add_row(&mut self, a: DVar, v: DVar) -> Result<DVar> {
        const OP: &str = "add_row";
        let shape = self.shape(a).to_vec();
        let c = *shape.last().unwrap_or(&0);
        if self.shape(v).iter().product::<usize>() != c || shape.len() < 2 {
            return Err(shape_error(
                OP,
                format!("a [rows, c] and a row of c = {c}"),
                format!("{shape:?} and {:?}", self.shape(v)),
            ));
        }
        let rows = rows_of(&shape);
        let (af, vf) = (self.f32_of(OP, a)?, self.f32_of(OP, v)?);
        let y = device::add_rows(self.be, &af, None, Some(&vf), rows, c)?;
        Ok(self.push(
            Value::F32(Held::Own(Rc::new(y))),
            &shape,
            &[a, v],
            move || {
                Box::new(move |be, g, need| {
                    let dv = match need[1] {
                        Need::No => None,
                        sink => {
                            // The row's share is the sum over the rows (deterministic order).
                            let dy = g.to_f32(be, OP)?;
                            let s = sink.sink(be, c)?;
                            device::col_sum_accumulate(be, &dy, rows, c, s.buf())?;
                            s.into_grad()
                        }
                    };
                    Ok(vec![Some(g), dv])
                })
            },
        ))
    }

    /// ReLU or exact GELU of fp32 x.
    pub fn activation(&mut self, x: DVar, gelu: bool) -> Result<DVar> {
        const OP: &str = "activation";
        let xf = self.f32_of(OP, x)?;
        let y = Rc::new(device::activation_forward(self.be, &xf, gelu)?);
        let shape = self.shape(x).to_vec();
        Ok(self.push_f32(y, &shape, x, OP, move |be, dy| {
            device::activation_backward(be, &xf, dy, gelu)
        }))
    }

    /// Inverted dropout of fp32 x with drop probability `p`: the CPU tape's mask exactly (a
    /// function of `seed` and the element index), so the backward is the same kernel on dy.
    pub fn dropout(&mut self, x: DVar, p: f64, seed: u64) -> Result<DVar> {
        const OP: &str = "dropout";
        let xf = self.f32_of(OP, x)?;
        let y = device::dropout(self.be, &xf, p, seed)?;
        let shape = self.shape(x).to_vec();
        Ok(
            self.push(Value::F32(Held::Own(Rc::new(y))), &shape, &[x], move || {
                Box::new(move |be, g, _| {
                    let dy = g.to_f32(be, OP)?;
                    Ok(vec![Some(Grad::f32(device::dropout(be, &dy, p, seed)?))])
                })
            }),
        )
    }

    /// The channels c of x [frames, c] packed as `batch`.
    fn frame_channels(&self, op: &str, x: DVar, batch: &PackedBatch) -> Result<usize> {
        match *self.shape(x) {
            [frames, c] if frames == batch.total_frames() => Ok(c),
            ref s => Err(shape_error(
                op,
                format!("[{} frames, c]", batch.total_frames()),
                format!("{s:?}"),
            )),
        }
    }

    /// Mean of each utterance's frames: fp32 [frames, c] -> [utterances, c].
    pub fn mean_pool(&mut self, x: DVar, batch: &PackedBatch) -> Result<DVar> {
        const OP: &str = "mean_pool";
        let c = self.frame_channels(OP, x, batch)?;
        let xf = self.f32_of(OP, x)?;
        let y = Rc::new(device::mean_pool_forward(self.be, &xf, batch, c)?);
        let batch = batch.clone();
        let shape = [batch.num_utterances(), c];
        Ok(self.push_f32(y, &shape, x, OP, move |be, dy| {
            device::mean_pool_backward(be, dy, &batch, c)
        }))
    }

    /// A TDNN layer's windows of bf16 x [frames, c]: bf16 [frames', context * c], each row the
    /// utterance's frames t, t + dilation, ... side by side (as the CPU tape's `time_context`).
    /// Returns the windows and their batch.
    pub fn time_context(
        &mut self,
        x: DVar,
        batch: &PackedBatch,
        context: usize,
        dilation: usize,
    ) -> Result<(DVar, PackedBatch)> {
        const OP: &str = "time_context";
        let shape = self.shape(x).to_vec();
        if shape.len() != 2 || shape[0] != batch.total_frames() || context == 0 || dilation == 0 {
            return Err(shape_error(
                OP,
                format!(
                    "[{} frames, c], context and dilation >= 1",
                    batch.total_frames()
                ),
                format!("{shape:?}, context {context}, dilation {dilation}"),
            ));
        }
        let (frames, c) = (shape[0], shape[1]);
        let (idx, inv, lengths) = device::speaker_window_index(batch, context, dilation)
            .ok_or_else(|| {
                Error::value(
                    "speaker head input",
                    "an utterance of the batch is shorter than the x-vector's TDNN windows: give it more audio",
                )
            })?;
        let out_batch = PackedBatch::from_lengths(&lengths)?;
        let xb = self.bf16_of(OP, x)?;
        let idx = self.be.upload(&idx)?;
        let y = device::rows_gather(self.be, &xb, &idx, c)?;
        let inv = self.be.upload(&inv)?;
        let out = self.push(
            Value::Bf16(Held::Own(Rc::new(y))),
            &[out_batch.total_frames(), context * c],
            &[x],
            move || {
                Box::new(move |be, g, _| {
                    let dy = g.to_f32(be, OP)?;
                    Ok(vec![Some(Grad::f32(device::rows_gather_sum(
                        be, &dy, &inv, frames, context, c,
                    )?))])
                })
            },
        );
        Ok((out, out_batch))
    }

    /// Statistics pooling of fp32 x [frames, c]: fp32 [utterances, 2c], means then unbiased stds.
    pub fn stats_pool(&mut self, x: DVar, batch: &PackedBatch) -> Result<DVar> {
        const OP: &str = "stats_pool";
        let c = self.frame_channels(OP, x, batch)?;
        let xf = self.f32_of(OP, x)?;
        let y = Rc::new(device::stats_pool_forward(self.be, &xf, batch, c)?);
        let (saved, batch) = (Rc::clone(&y), batch.clone());
        let shape = [batch.num_utterances(), 2 * c];
        Ok(self.push_f32(y, &shape, x, OP, move |be, dy| {
            device::stats_pool_backward(be, &xf, &saved, dy, &batch, c)
        }))
    }

    /// F.normalize of the rows of fp32 x [rows, c] (a parameter too: AM-softmax's speaker
    /// vectors).
    pub fn l2_normalize(&mut self, x: DVar) -> Result<DVar> {
        const OP: &str = "l2_normalize";
        let (rows, c) = self.logits_dims(OP, x)?;
        let xf = self.f32_of(OP, x)?;
        let y = Rc::new(device::l2_normalize_forward(self.be, &xf, rows, c)?);
        Ok(self.push_f32(y, &[rows, c], x, OP, move |be, dy| {
            device::l2_normalize_backward(be, &xf, dy, rows, c)
        }))
    }

    /// AM-softmax's logits from fp32 cosines [rows, classes]: scale (cos - margin [j = label]).
    pub fn am_margin(
        &mut self,
        x: DVar,
        labels: &[usize],
        scale: f32,
        margin: f32,
    ) -> Result<DVar> {
        const OP: &str = "am_margin";
        let (rows, classes) = self.logits_dims(OP, x)?;
        if labels.len() != rows || labels.iter().any(|&l| l >= classes) {
            return Err(shape_error(
                OP,
                format!("{rows} labels below {classes}"),
                format!("{labels:?}"),
            ));
        }
        let xf = self.f32_of(OP, x)?;
        let labels: Vec<i32> = labels.iter().map(|&l| l as i32).collect();
        let lb = self.be.upload(&labels)?;
        let y = Rc::new(device::am_margin(
            self.be,
            &xf,
            Some(&lb),
            rows,
            classes,
            scale,
            margin,
        )?);
        Ok(self.push_f32(y, &[rows, classes], x, OP, move |be, dy| {
            device::am_margin(be, dy, None, rows, classes, scale, margin)
        }))
    }

    fn logits_dims(&self, op: &str, x: DVar) -> Result<(usize, usize)> {
        match *self.shape(x) {
            [rows, v] => Ok((rows, v)),
            ref s => Err(shape_error(op, "logits [rows, classes]", format!("{s:?}"))),
        }
    }

    /// Log-softmax over the rows of fp32 x [rows, v].
    pub fn log_softmax(&mut self, x: DVar) -> Result<DVar> {
        const OP: &str = "log_softmax";
        let (rows, v) = self.logits_dims(OP, x)?;
        let xf = self.f32_of(OP, x)?;
        let y = Rc::new(device::log_softmax_forward(self.be, &xf, rows, v)?);
        let saved = Rc::clone(&y);
        Ok(self.push_f32(y, &[rows, v], x, OP, move |be, dy| {
            device::log_softmax_backward(be, &saved, dy, rows, v)
        }))
    }

    /// The mean CTC loss (blank 0, zero_infinity, PyTorch's 'mean') of fp32 logits [frames, v]
    /// packed as `batch`, through a fused log-softmax. Its backward hands the logits a bf16
    /// gradient (what the tensor-core Linear backward reads), scaled by the loss's seed.
    pub fn ctc_loss(
        &mut self,
        logits: DVar,
        batch: &PackedBatch,
        targets: &[Vec<usize>],
    ) -> Result<DVar> {
        self.ctc_loss_reduced(logits, batch, targets, Reduction::Mean, 1.0)
    }

    /// [`Self::ctc_loss`] with PyTorch's `reduction`, times `factor` (ESPnet's CTC: the sum over
    /// the batch divided by its utterances).
    pub fn ctc_loss_reduced(
        &mut self,
        logits: DVar,
        batch: &PackedBatch,
        targets: &[Vec<usize>],
        reduction: Reduction,
        factor: f32,
    ) -> Result<DVar> {
        const OP: &str = "ctc_loss";
        let (rows, v) = self.logits_dims(OP, logits)?;
        if rows != batch.total_frames() {
            return Err(shape_error(
                OP,
                format!("logits for {} frames", batch.total_frames()),
                format!("{rows} rows"),
            ));
        }
        let xf = self.f32_of(OP, logits)?;
        let lp = device::log_softmax_forward(self.be, &xf, rows, v)?;
        let ctc = device::ctc_loss(self.be, &lp, v, batch, targets, reduction, true)?;
        let loss = ctc.loss * factor;
        Ok(self.push(Value::Loss(loss), &[1], &[logits], move || {
            Box::new(move |be, g, _| {
                let Grad::Scalar(seed) = g else {
                    return Err(Error::Config(format!("{OP}: expects the loss seed")));
                };
                let dx = device::log_softmax_backward(be, &lp, &ctc.grad, rows, v)?;
                Ok(vec![Some(Grad::bf16(device::cast_to_bf16_scaled(
                    be,
                    &dx,
                    seed * factor,
                )?))])
            })
        }))
    }

    /// The mean softmax cross-entropy of fp32 logits [rows, classes] against `labels`, fused
    /// with its gradient; the backward hands the logits that gradient in bf16, scaled by the seed.
    pub fn cross_entropy(&mut self, logits: DVar, labels: &[usize]) -> Result<DVar> {
        const OP: &str = "cross_entropy";
        let (rows, classes) = self.logits_dims(OP, logits)?;
        if rows != labels.len() {
            return Err(shape_error(
                OP,
                format!("one label per logit row ({rows})"),
                format!("{} labels", labels.len()),
            ));
        }
        let xf = self.f32_of(OP, logits)?;
        let (loss, dlogits) =
            device::cross_entropy(self.be, &xf, classes, labels, Reduction::Mean)?;
        Ok(self.push(Value::Loss(loss), &[1], &[logits], move || {
            Box::new(move |be, g, _| {
                let Grad::Scalar(seed) = g else {
                    return Err(Error::Config(format!("{OP}: expects the loss seed")));
                };
                Ok(vec![Some(Grad::bf16(device::cast_to_bf16_scaled(
                    be, &dlogits, seed,
                )?))])
            })
        }))
    }

    /// Runs backward from the loss node `loss`, its gradient seeded with `seed` (1 / micro-batches
    /// when accumulating): parameter gradients are added into their buffers; the gradients of
    /// [`DeviceTape::input_requiring_grad`] leaves are returned. Consumes the recorded closures.
    pub fn backward(&mut self, loss: DVar, seed: f32) -> Result<DeviceGradients> {
        if self.backward_done {
            return Err(Error::Config(
                "device tape: backward already ran on this tape; record a new forward pass".into(),
            ));
        }
        self.loss_value(loss)?;
        if !self.nodes[loss.0].requires_grad {
            return Err(Error::Config(
                "device tape backward: the loss does not depend on any trainable parameter (or the tape is no_grad)".into(),
            ));
        }
        self.backward_done = true;
        let be = self.be;
        let mut grads: Vec<Option<Grad>> = (0..=loss.0).map(|_| None).collect();
        grads[loss.0] = Some(Grad::Scalar(seed));
        let mut out = DeviceGradients::default();
        for i in (0..=loss.0).rev() {
            let Some(g) = grads[i].take() else { continue };
            let node = &mut self.nodes[i];
            let Some(bw) = node.backward.take() else {
                if node.requires_grad && node.inputs.is_empty() {
                    out.leaves.push((DVar(i), g));
                }
                continue;
            };
            let inputs = node.inputs.clone();
            let need: Vec<Need<'a>> = inputs
                .iter()
                .map(|v| {
                    let n = &self.nodes[v.0];
                    match (&n.value, n.requires_grad) {
                        (_, false) => Need::No,
                        (Value::Param(p), true) => Need::Param(&p.grad),
                        _ => Need::Grad,
                    }
                })
                .collect();
            let input_grads = bw(be, g, &need)?;
            for ((v, gi), want) in inputs.iter().zip(input_grads).zip(&need) {
                let Some(gi) = gi else { continue };
                match want {
                    Need::No => {}
                    Need::Param(sink) => {
                        // An op that does not fuse its parameter gradient (e.g. the CLS token as
                        // a LayerNorm input): add it here.
                        let gf = gi.to_f32(be, "parameter gradient")?;
                        device::col_sum_accumulate(be, &gf, 1, gf.len(), sink)?;
                    }
                    Need::Grad => {
                        grads[v.0] = Some(match grads[v.0].take() {
                            None => gi,
                            Some(acc) => Grad::f32(device::add_grads(
                                be,
                                acc.as_buf("sum")?,
                                gi.as_buf("sum")?,
                            )?),
                        });
                    }
                }
            }
        }
        out.leaves.reverse();
        Ok(out)
    }
}
