//! The device tape's ops for the ML-SUPERB head (see `models::mlsuperb_head` for the CPU tape's):
//! SpecAugment's time warp and masks, utterance centering, the convolutions' im2col patches, the
//! scaled positional encoding and the packed self-attention. Their kernels: kernels/conv2d.cu,
//! kernels/mlsuperb.cu, kernels/pooling.cu, kernels/attention.cu.

use std::rc::Rc;

use super::{shape_error, DVar, DeviceTape, Grad, Held, Value};
use crate::batch::PackedBatch;
use crate::error::Result;
use crate::ops::attention::ProbDropout;
use crate::ops::conv2d::PatchGeom;
use crate::ops::device::{self, DeviceSpecMask, DeviceTimeWarp, PackedAttn};
use crate::runtime::Buf;

/// The packed attention's launch description over fp32 q, k, v [frames, heads * head_dim].
fn packed_attn<'b>(
    batch: &'b PackedBatch,
    (q, k, v): (&'b Buf<f32>, &'b Buf<f32>, &'b Buf<f32>),
    heads: usize,
    dropout: Option<ProbDropout>,
) -> PackedAttn<'b> {
    PackedAttn {
        q,
        k,
        v,
        batch,
        heads,
        head_dim: q.len() / batch.total_frames() / heads,
        dropout,
    }
}

impl<'a> DeviceTape<'a> {
    /// The width c of fp32 x [rows, c].
    fn rows_width(&self, op: &str, x: DVar) -> Result<(usize, usize)> {
        match *self.shape(x) {
            [rows, c] => Ok((rows, c)),
            ref s => Err(shape_error(op, "[rows, c]", format!("{s:?}"))),
        }
    }

    /// SpecAugment's time warp of fp32 x [frames, c] (taps uploaded by the caller; the transposed
    /// taps are the backward).
    pub fn time_warp(&mut self, x: DVar, warp: DeviceTimeWarp) -> Result<DVar> {
        const OP: &str = "time_warp";
        let (rows, c) = self.rows_width(OP, x)?;
        let (out_rows, in_rows) = warp.rows();
        if in_rows != rows {
            return Err(shape_error(
                OP,
                format!("taps over {in_rows} frames"),
                format!("{rows} frames"),
            ));
        }
        let xf = self.f32_of(OP, x)?;
        let y = Rc::new(warp.forward(self.be, &xf, c)?);
        Ok(self.push_f32(y, &[out_rows, c], x, OP, move |be, dy| {
            warp.backward(be, dy, c)
        }))
    }

    /// SpecAugment's masks applied to fp32 x [frames, c]; the backward masks the gradient.
    pub fn spec_mask(&mut self, x: DVar, mask: DeviceSpecMask) -> Result<DVar> {
        const OP: &str = "spec_mask";
        let (rows, c) = self.rows_width(OP, x)?;
        if mask.shape() != (rows, c) {
            return Err(shape_error(
                OP,
                format!("a mask of x's shape [{rows}, {c}]"),
                format!("{:?}", mask.shape()),
            ));
        }
        let xf = self.f32_of(OP, x)?;
        let y = Rc::new(mask.apply(self.be, &xf)?);
        Ok(self.push_f32(y, &[rows, c], x, OP, move |be, dy| mask.apply(be, dy)))
    }

    /// Each utterance's frames of fp32 x [frames, c] minus their mean (its own adjoint).
    pub fn utterance_center(&mut self, x: DVar, batch: &PackedBatch) -> Result<DVar> {
        const OP: &str = "utterance_center";
        let c = self.frame_channels(OP, x, batch)?;
        let xf = self.f32_of(OP, x)?;
        let y = Rc::new(device::utterance_center(self.be, &xf, batch, c)?);
        let batch = batch.clone();
        let shape = [batch.total_frames(), c];
        Ok(self.push_f32(y, &shape, x, OP, move |be, dy| {
            device::utterance_center(be, dy, &batch, c)
        }))
    }

    /// The im2col patches of bf16 x [frames, freq * channels] packed as `batch`: bf16 [frames' *
    /// freq', k * k * channels] and the batch of frames'. The backward sums the patches' gradient
    /// back (fp32).
    pub fn conv2d_patches(
        &mut self,
        x: DVar,
        batch: &PackedBatch,
        geom: PatchGeom,
    ) -> Result<(DVar, PackedBatch)> {
        const OP: &str = "conv2d_patches";
        let width = geom.freq * geom.channels;
        if self.shape(x) != [batch.total_frames(), width] {
            return Err(shape_error(
                OP,
                format!("[{} frames, {width}]", batch.total_frames()),
                format!("{:?}", self.shape(x)),
            ));
        }
        let xb = self.bf16_of(OP, x)?;
        let (patches, out) = device::conv2d_patches(self.be, &xb, batch, &geom)?;
        let rows = patches.len() / geom.patch_width();
        let batch = batch.clone();
        let y = self.push(
            Value::Bf16(Held::Own(Rc::new(patches))),
            &[rows, geom.patch_width()],
            &[x],
            move || {
                Box::new(move |be, g, _| {
                    let dy = g.to_bf16(be, OP)?;
                    let dx = device::conv2d_patches_adjoint(be, &dy, &batch, &geom)?;
                    Ok(vec![Some(Grad::f32(dx))])
                })
            },
        );
        Ok((y, out))
    }

    /// fp32 x [frames, d] * scale + ESPnet's positional encoding (positions restarting in each
    /// utterance of `batch`); the backward scales the gradient (into bf16: the Linear before it
    /// reads bf16).
    pub fn scale_add_positions(
        &mut self,
        x: DVar,
        batch: &PackedBatch,
        scale: f32,
    ) -> Result<DVar> {
        const OP: &str = "scale_add_positions";
        let d = self.frame_channels(OP, x, batch)?;
        let xf = self.f32_of(OP, x)?;
        let y = device::scale_add_positions(self.be, &xf, batch, d, scale)?;
        let shape = [batch.total_frames(), d];
        Ok(
            self.push(Value::F32(Held::Own(Rc::new(y))), &shape, &[x], move || {
                Box::new(move |be, g, _| {
                    let dy = g.to_f32(be, OP)?;
                    Ok(vec![Some(Grad::bf16(device::cast_to_bf16_scaled(
                        be, &dy, scale,
                    )?))])
                })
            }),
        )
    }

    /// Multi-head self-attention of each frame over its utterance's frames: fp32 q, k, v [frames,
    /// heads * head_dim] -> fp32 [frames, heads * head_dim], with the CPU's dropout on the
    /// probabilities when `dropout` is given.
    pub fn packed_self_attention(
        &mut self,
        (q, k, v): (DVar, DVar, DVar),
        batch: &PackedBatch,
        heads: usize,
        dropout: Option<ProbDropout>,
    ) -> Result<DVar> {
        const OP: &str = "packed_self_attention";
        let w = self.frame_channels(OP, q, batch)?;
        for other in [k, v] {
            if self.shape(other) != self.shape(q) {
                return Err(shape_error(
                    OP,
                    format!("k and v of q's shape {:?}", self.shape(q)),
                    format!("{:?}", self.shape(other)),
                ));
            }
        }
        if heads == 0 || w % heads != 0 {
            return Err(shape_error(
                OP,
                "a width divisible into the heads",
                format!("{w} into {heads}"),
            ));
        }
        let (qf, kf, vf) = (
            self.f32_of(OP, q)?,
            self.f32_of(OP, k)?,
            self.f32_of(OP, v)?,
        );
        let batch = batch.clone();
        let (out, probs) = packed_attn(&batch, (&qf, &kf, &vf), heads, dropout).forward(self.be)?;
        let shape = [batch.total_frames(), w];
        Ok(self.push(
            Value::F32(Held::Own(Rc::new(out))),
            &shape,
            &[q, k, v],
            move || {
                Box::new(move |be, g, _| {
                    let dout = g.to_f32(be, OP)?;
                    let attn = packed_attn(&batch, (&qf, &kf, &vf), heads, dropout);
                    let (dq, dk, dv) = attn.backward(be, &probs, &dout)?;
                    Ok(vec![
                        Some(Grad::f32(dq)),
                        Some(Grad::f32(dk)),
                        Some(Grad::f32(dv)),
                    ])
                })
            },
        ))
    }
}
