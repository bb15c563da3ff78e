//! A whole HConv + PR head + CTC training step on a device backend (the GPU, or the kernel
//! emulator): stack -> HConv convs -> Linear -> Linear -> log-softmax -> CTC -> backward -> clip
//! -> AdamW, with no host round-trip but the loss value (and the batch's targets going up).
//!
//! Parameters live on the device as fp32 master weights in the kernels' layouts (HConv weights
//! tap-major, Linear weights [out, in]) with bf16 copies that the AdamW kernel refreshes; the
//! compute is bf16 with fp32 accumulation (logits, log-probabilities and the CTC gradient fp32).
//! Built from a CPU [`Pair`] (same initial parameters), so the two paths can be compared step by
//! step. First version: one HConv + PR pair, frozen upstream (no stack gradient).

use crate::batch::PackedBatch;
use crate::error::{Error, Result};
use crate::models::interface::{hconv_plan, HConvPlan, InterfaceKind};
use crate::ops::ctc::Reduction;
use crate::ops::device::{self, HConvSaved};
use crate::optim::AdamConfig;
use crate::runtime::{Backend, Buf};
use crate::tensor::Tensor;
use crate::train::side_by_side::{Head, Pair};
use half::bf16;

/// One parameter on the device: master, bf16 copy, gradient and Adam moments, in the kernel
/// layout.
pub struct DeviceParam {
    pub name: String,
    pub master: Buf<f32>,
    pub copy: Buf<bf16>,
    pub grad: Buf<f32>,
    m: Buf<f32>,
    v: Buf<f32>,
}

impl DeviceParam {
    fn new(be: &Backend, name: &str, values: Vec<f32>) -> Result<Self> {
        let n = values.len();
        let copy: Vec<bf16> = values.iter().map(|&x| bf16::from_f32(x)).collect();
        Ok(DeviceParam {
            name: name.to_string(),
            master: be.upload(&values)?,
            copy: be.upload(&copy)?,
            grad: be.zeros::<f32>(n)?,
            m: be.zeros::<f32>(n)?,
            v: be.zeros::<f32>(n)?,
        })
    }
}

pub struct DeviceHConvPr {
    plan: HConvPlan,
    /// (weight, bias) per conv, then the head's proj and out.
    convs: Vec<(DeviceParam, DeviceParam)>,
    proj: (DeviceParam, DeviceParam),
    out: (DeviceParam, DeviceParam),
    hidden: usize,
    vocab: usize,
    layers: usize,
    dim: usize,
    optimizer: AdamConfig,
    clip: Option<f64>,
    pub steps: u64,
}

fn cpu_param(pair: &Pair, name: &str) -> Result<Tensor> {
    let id = pair.store.id(name).ok_or_else(|| {
        Error::Config(format!(
            "device step: the pair has no parameter '{name}' (an HConv + PR head pair is needed)"
        ))
    })?;
    Ok(pair.store.value(id).clone())
}

impl DeviceHConvPr {
    /// The device copy of a CPU HConv + PR-head pair (its current parameters and settings; the
    /// optimizer starts fresh, so build it from a pair that has not stepped yet to compare).
    pub fn from_pair(be: &Backend, pair: &Pair, layers: usize, dim: usize) -> Result<Self> {
        let Head::Pr(head) = &pair.head else {
            return Err(Error::Config(
                "device step: only the PR head (CTC) runs on the device so far".into(),
            ));
        };
        let cfg = pair.interface.config();
        if (cfg.layers, cfg.dim) != (layers, dim) {
            return Err(Error::Config(format!(
                "device step: the pair's interface is for {} x {} states, not {layers} x {dim}",
                cfg.layers, cfg.dim
            )));
        }
        if pair.interface.config().normalize {
            return Err(Error::Config(
                "device step: the per-layer norm before HConv is not on the device yet".into(),
            ));
        }
        let (kernel, stride) = match &pair.interface.config().kind {
            InterfaceKind::HConv { kernel, stride } => (*kernel, *stride),
            other => {
                return Err(Error::Config(format!(
                    "device step: only HConv runs on the device so far, not {other:?}"
                )))
            }
        };
        let plan = hconv_plan(layers, dim, kernel, stride)?;
        if plan.convs.is_empty() {
            // HConv is then only the channel-major flatten of the stack: not a device kernel yet.
            return Err(Error::Config(format!(
                "device step: HConv over {layers} layers with stride {stride} has no conv; not on the device yet"
            )));
        }
        let mut convs = Vec::new();
        for (i, g) in plan.convs.iter().enumerate() {
            let w = cpu_param(pair, &format!("interface.conv{i}.weight"))?.to_vec();
            let master = device::hconv_weight_tap_major(&w, g);
            let b = cpu_param(pair, &format!("interface.conv{i}.bias"))?.to_vec();
            convs.push((
                DeviceParam::new(be, &format!("interface.conv{i}.weight"), master)?,
                DeviceParam::new(be, &format!("interface.conv{i}.bias"), b)?,
            ));
        }
        let lin = |name: &str| -> Result<(DeviceParam, DeviceParam)> {
            Ok((
                DeviceParam::new(
                    be,
                    &format!("{name}.weight"),
                    cpu_param(pair, &format!("{name}.weight"))?.to_vec(),
                )?,
                DeviceParam::new(
                    be,
                    &format!("{name}.bias"),
                    cpu_param(pair, &format!("{name}.bias"))?.to_vec(),
                )?,
            ))
        };
        Ok(DeviceHConvPr {
            hidden: head.proj.out_features,
            vocab: head.out.out_features,
            plan,
            convs,
            proj: lin("head.proj")?,
            out: lin("head.out")?,
            layers,
            dim,
            optimizer: pair.optimizer.config,
            clip: pair.clip,
            steps: 0,
        })
    }

    fn params(&self) -> Vec<&DeviceParam> {
        let mut v: Vec<&DeviceParam> = self.convs.iter().flat_map(|(w, b)| [w, b]).collect();
        v.extend([&self.proj.0, &self.proj.1, &self.out.0, &self.out.1]);
        v
    }

    /// One optimizer step on a packed batch (`stack` f32 [frames, L, D] on the host, sent up as
    /// bf16); returns the mean CTC loss.
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
        let x16: Vec<bf16> = stack.to_vec().iter().map(|&x| bf16::from_f32(x)).collect();
        self.train_step_on(be, &be.upload(&x16)?, batch, targets)
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
        let n = batch.total_frames();
        if x0.len() != n * self.layers * self.dim {
            return Err(Error::shape(
                "device step stack",
                format!("{n} x {} x {} elements", self.layers, self.dim),
                format!("{}", x0.len()),
            ));
        }
        // Forward, keeping every activation for the backward.
        let mut acts: Vec<Buf<bf16>> = Vec::new();
        for (i, g) in self.plan.convs.iter().enumerate() {
            let input = if i == 0 { x0 } else { &acts[i - 1] };
            let (w, b) = &self.convs[i];
            let last = i + 1 == self.plan.convs.len();
            acts.push(device::hconv_conv_forward(
                be, input, n, g, &w.copy, &b.master, last,
            )?);
        }
        let feats = acts.last().unwrap_or(x0);
        let d_feat = self.plan.output_dim();
        let (h_dim, v) = (self.hidden, self.vocab);
        let h = device::linear_forward(
            be,
            feats,
            n,
            d_feat,
            h_dim,
            &self.proj.0.copy,
            &self.proj.1.master,
            false,
        )?
        .into_bf16()
        .expect("bf16 asked");
        let logits = device::linear_forward(
            be,
            &h,
            n,
            h_dim,
            v,
            &self.out.0.copy,
            &self.out.1.master,
            true,
        )?
        .into_f32()
        .expect("f32 asked");
        let lp = device::log_softmax_forward(be, &logits, n, v)?;
        let ctc = device::ctc_loss(be, &lp, v, batch, targets, Reduction::Mean, true)?;
        if !ctc.loss.is_finite() {
            return Err(Error::value(
                "training loss",
                format!("{} at step {} on the device", ctc.loss, self.steps + 1),
            ));
        }
        // Backward.
        let dlogits = device::log_softmax_backward(be, &lp, &ctc.grad, n, v)?;
        let dlogits = device::cast_to_bf16(be, &dlogits)?;
        let dh = device::linear_backward(
            be,
            &h,
            n,
            h_dim,
            v,
            &self.out.0.copy,
            &dlogits,
            (&self.out.0.grad, &self.out.1.grad),
            true,
        )?
        .expect("dx asked");
        let mut dy = device::linear_backward(
            be,
            feats,
            n,
            d_feat,
            h_dim,
            &self.proj.0.copy,
            &dh,
            (&self.proj.0.grad, &self.proj.1.grad),
            !self.plan.convs.is_empty(),
        )?;
        for (i, g) in self.plan.convs.iter().enumerate().rev() {
            let (w, b) = &self.convs[i];
            let saved = HConvSaved {
                x: if i == 0 { x0 } else { &acts[i - 1] },
                y: &acts[i],
                w: &w.copy,
                flatten: i + 1 == self.plan.convs.len(),
            };
            let d = dy.take().expect("a gradient flows into every conv");
            dy = device::hconv_conv_backward(be, &saved, n, g, &d, (&w.grad, &b.grad), i > 0)?;
        }
        // Clip, step, clear.
        let scale = match self.clip {
            Some(max_norm) => {
                let grads: Vec<&Buf<f32>> = self.params().iter().map(|p| &p.grad).collect();
                Some(device::clip_coefficient_multi(be, &grads, max_norm as f32)?.1)
            }
            None => None,
        };
        self.steps += 1;
        for p in self.params() {
            device::adam_step(
                be,
                &self.optimizer,
                self.steps,
                &p.master,
                &p.grad,
                &p.m,
                &p.v,
                Some(&p.copy),
                scale.as_ref(),
            )?;
        }
        for (w, b) in self.convs.iter_mut() {
            w.grad = be.zeros::<f32>(w.grad.len())?;
            b.grad = be.zeros::<f32>(b.grad.len())?;
        }
        for p in [
            &mut self.proj.0,
            &mut self.proj.1,
            &mut self.out.0,
            &mut self.out.1,
        ] {
            p.grad = be.zeros::<f32>(p.grad.len())?;
        }
        Ok(ctc.loss)
    }
}
