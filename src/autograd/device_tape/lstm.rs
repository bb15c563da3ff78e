//! The device tape's bidirectional LSTM recurrence (the SUPERB ASR head; the CPU tape's
//! `Tape::lstm`, one direction at a time). Its kernels: kernels/lstm.cu; the input products and
//! W_hh's gradient are the tensor-core Linear's.

use std::rc::Rc;

use super::{shape_error, DVar, DeviceTape, Grad, Held, Value};
use crate::batch::PackedBatch;
use crate::error::Result;
use crate::ops::device::{self, Cols, DeviceLstmSchedule, LstmBackDirection, LstmDirection};

impl<'a> DeviceTape<'a> {
    /// Both directions' recurrences of one bidirectional LSTM layer: fp32 gate pre-activations
    /// `pre` = (forward, reverse), each [frames, 4H] (x W_ih^T + b_ih + b_hh), and the directions'
    /// W_hh [4H, H] -> fp32 [frames, 2H], the forward direction's h then the reverse's (PyTorch's
    /// bidirectional output). Each utterance of `batch` is its own sequence.
    pub fn bilstm(
        &mut self,
        pre: (DVar, DVar),
        w_hh: (DVar, DVar),
        batch: &PackedBatch,
    ) -> Result<DVar> {
        const OP: &str = "bilstm";
        let frames = batch.total_frames();
        let hidden = match *self.shape(w_hh.0) {
            [h4, h] if h4 == 4 * h && h > 0 => h,
            ref s => return Err(shape_error(OP, "W_hh [4H, H]", format!("{s:?}"))),
        };
        for v in [pre.0, pre.1] {
            if self.shape(v) != [frames, 4 * hidden] {
                return Err(shape_error(
                    OP,
                    format!("pre-activations [{frames} frames, {}]", 4 * hidden),
                    format!("{:?}", self.shape(v)),
                ));
            }
        }
        if self.shape(w_hh.1) != self.shape(w_hh.0) {
            return Err(shape_error(
                OP,
                format!("the reverse W_hh as the forward's {:?}", self.shape(w_hh.0)),
                format!("{:?}", self.shape(w_hh.1)),
            ));
        }
        let be = self.be;
        let h = be.output::<f32>(frames * 2 * hidden)?;
        // Per direction: (pre, W_hh fp32 and bf16, schedule, its columns of h).
        let mut dirs = Vec::new();
        for (d, (p, w)) in [(pre.0, w_hh.0), (pre.1, w_hh.1)].into_iter().enumerate() {
            let cols = Cols {
                stride: 2 * hidden,
                offset: d * hidden,
            };
            dirs.push((
                self.f32_of(OP, p)?,
                self.f32_of(OP, w)?,
                self.bf16_of(OP, w)?,
                DeviceLstmSchedule::upload(be, batch, d == 1)?,
                cols,
            ));
        }
        // Both directions stepped together: one launch a step.
        let steps: Vec<LstmDirection> = dirs
            .iter()
            .map(|(pf, wf, _, sched, cols)| LstmDirection {
                pre: pf,
                w_hh: wf,
                sched,
                cols: *cols,
            })
            .collect();
        let states = device::lstm_forward_directions(be, &steps, hidden, &h)?;
        drop(steps);
        let dirs: Vec<_> = dirs
            .into_iter()
            .zip(states)
            .map(|((_, wf, wb, sched, cols), st)| (wf, wb, sched, cols, st))
            .collect();
        Ok(self.push(
            Value::F32(Held::Own(Rc::new(h))),
            &[frames, 2 * hidden],
            &[pre.0, pre.1, w_hh.0, w_hh.1],
            move || {
                Box::new(move |be, g, need| {
                    let dout = g.to_f32(be, OP)?;
                    let mut grads = vec![None; 4];
                    let back: Vec<LstmBackDirection> = dirs
                        .iter()
                        .map(|(wf, _, sched, cols, states)| LstmBackDirection {
                            w_hh: wf,
                            sched,
                            cols: *cols,
                            states,
                        })
                        .collect();
                    let dzs = device::lstm_backward_directions(be, &dout, &back, hidden)?;
                    for (d, ((_, wb, _, _, states), dz)) in dirs.iter().zip(dzs).enumerate() {
                        // W_hh's gradient: dz^T h_prev, as the tensor-core Linear's weight
                        // gradient (bf16 operands, fp32 accumulation, like every Linear's).
                        if need[2 + d].any() {
                            let dw = need[2 + d].sink(be, 4 * hidden * hidden)?;
                            let db = be.zeros::<f32>(4 * hidden)?;
                            device::linear_backward(
                                be,
                                &device::cast_to_bf16(be, &states.h_prev)?,
                                frames,
                                hidden,
                                4 * hidden,
                                wb,
                                &device::cast_to_bf16(be, &dz)?,
                                (dw.buf(), &db),
                                false,
                            )?;
                            grads[2 + d] = dw.into_grad();
                        }
                        grads[d] = Some(Grad::f32(dz));
                    }
                    Ok(grads)
                })
            },
        ))
    }
}
