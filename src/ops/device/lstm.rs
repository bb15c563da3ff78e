//! Launchers for one direction of an LSTM layer over a packed batch (kernels/lstm.cu; CPU reference
//! `ops::lstm`): one launch per time step, over the utterances still running at that step.

use super::{launch_elementwise, need, Cols};
use crate::batch::PackedBatch;
use crate::error::{Error, Result};
use crate::runtime::kernels::{LstmStepParams, LstmTransposeParams};
use crate::runtime::{Backend, Buf};

/// The step kernels' tile (kernels/lstm.cu's LSTM_JT, LSTM_UT, LSTM_THREADS): a block per 8 units
/// of 32 running utterances, 128 threads.
const LSTM_UNITS_PER_BLOCK: usize = 8;
const LSTM_UTTERANCES_PER_BLOCK: usize = 32;
const LSTM_THREADS: u32 = 128;

/// Which packed row each running utterance reads at each step, on the device: utterances longest
/// first (ties by position, as `ops::lstm`), -1 once ended, one extra all -1 step at the end.
pub struct DeviceLstmSchedule {
    sched: Buf<i32>,
    /// Utterances running at each step.
    running: Vec<usize>,
    n: usize,
    frames: usize,
}

impl DeviceLstmSchedule {
    pub fn upload(be: &Backend, batch: &PackedBatch, reverse: bool) -> Result<Self> {
        let offsets = batch.offsets();
        let n = batch.num_utterances();
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by_key(|&u| std::cmp::Reverse(batch.len_of(u)));
        let steps = order.first().map_or(0, |&u| batch.len_of(u));
        let mut sched = vec![-1i32; (steps + 1) * n];
        let mut running = Vec::with_capacity(steps);
        for t in 0..steps {
            let mut m = 0;
            for (k, &u) in order.iter().enumerate() {
                let len = batch.len_of(u);
                if t < len {
                    let row = if reverse {
                        offsets[u] + len - 1 - t
                    } else {
                        offsets[u] + t
                    };
                    sched[t * n + k] = i32::try_from(row).map_err(|_| {
                        Error::shape("lstm schedule", "under 2^31 frames", format!("row {row}"))
                    })?;
                    m += 1;
                }
            }
            running.push(m);
        }
        Ok(DeviceLstmSchedule {
            sched: be.upload(&sched)?,
            running,
            n,
            frames: batch.total_frames(),
        })
    }

    fn params(&self, be: &Backend, step: usize, hidden: usize, h: &Cols) -> LstmStepParams {
        LstmStepParams {
            pre: 0,
            w: 0,
            dout: 0,
            h: 0,
            c: 0,
            gates: 0,
            h_prev: 0,
            dz: 0,
            dc_carry: 0,
            sched: be.ptr(&self.sched),
            step: step as i32,
            n: self.n as i32,
            running: self.running[step] as i32,
            hidden: hidden as i32,
            h_stride: h.stride as i32,
            h_col: h.offset as i32,
        }
    }

    fn launch(&self, be: &Backend, kernel: &'static str, p: &LstmStepParams) -> Result<()> {
        let grid = (
            (p.hidden as usize).div_ceil(LSTM_UNITS_PER_BLOCK) as u32,
            (p.running as usize).div_ceil(LSTM_UTTERANCES_PER_BLOCK) as u32,
            1,
        );
        be.launch(kernel, grid, (LSTM_THREADS, 1, 1), 0, p)
    }
}

/// Checks that a direction's h (or its gradient) fits at `cols`: columns offset..offset + H of
/// rows `stride` wide (the two directions share the layer's [frames, 2H] output).
fn check_cols(
    be: &Backend,
    (k, what): (&str, &str),
    (b, cols): (&Buf<f32>, Cols),
    frames: usize,
    hidden: usize,
) -> Result<()> {
    if cols.offset + hidden > cols.stride {
        return Err(Error::shape(
            format!("{k} {what}"),
            format!("{hidden} columns inside rows of {}", cols.stride),
            format!("{cols:?}"),
        ));
    }
    need(be, k, what, b, frames * cols.stride)
}

/// What the forward keeps for the backward, all fp32: the cells [frames, H], the activated gates
/// [frames, 4H] and each row's previous state [frames, H] (W_hh's gradient is dz^T h_prev).
pub struct LstmStates {
    pub c: Buf<f32>,
    pub gates: Buf<f32>,
    pub h_prev: Buf<f32>,
}

/// The recurrence over `pre` [frames, 4H] (x W_ih^T + both biases) with `w_hh` [4H, H], writing
/// h into `h` at `cols`.
pub fn lstm_forward(
    be: &Backend,
    pre: &Buf<f32>,
    w_hh: &Buf<f32>,
    sched: &DeviceLstmSchedule,
    hidden: usize,
    (h, cols): (&Buf<f32>, Cols),
) -> Result<LstmStates> {
    const K: &str = "lstm_step_forward";
    let frames = sched.frames;
    need(be, K, "pre", pre, frames * 4 * hidden)?;
    need(be, K, "w_hh", w_hh, 4 * hidden * hidden)?;
    check_cols(be, (K, "h"), (h, cols), frames, hidden)?;
    let out = LstmStates {
        c: be.output::<f32>(frames * hidden)?,
        gates: be.output::<f32>(frames * 4 * hidden)?,
        h_prev: be.output::<f32>(frames * hidden)?,
    };
    for step in 0..sched.running.len() {
        let p = LstmStepParams {
            pre: be.ptr(pre),
            w: be.ptr(w_hh),
            h: be.ptr(h),
            c: be.ptr(&out.c),
            gates: be.ptr(&out.gates),
            h_prev: be.ptr(&out.h_prev),
            ..sched.params(be, step, hidden, &cols)
        };
        sched.launch(be, K, &p)?;
    }
    Ok(out)
}

/// Backpropagation through time from the output's gradient `dout` (at `cols`, as h was): the gate
/// pre-activations' gradient dz [frames, 4H] (W_hh's gradient is dz^T h_prev; the biases' its
/// column sums; x's and W_ih's through the input Linear).
pub fn lstm_backward(
    be: &Backend,
    (dout, cols): (&Buf<f32>, Cols),
    states: &LstmStates,
    w_hh: &Buf<f32>,
    sched: &DeviceLstmSchedule,
    hidden: usize,
) -> Result<Buf<f32>> {
    const K: &str = "lstm_step_backward";
    let frames = sched.frames;
    check_cols(be, (K, "dout"), (dout, cols), frames, hidden)?;
    need(be, K, "w_hh", w_hh, 4 * hidden * hidden)?;
    let w_hh_t = be.output::<f32>(4 * hidden * hidden)?;
    let t = LstmTransposeParams {
        w: be.ptr(w_hh),
        wt: be.ptr(&w_hh_t),
        rows: (4 * hidden) as i32,
        cols: hidden as i32,
    };
    launch_elementwise(be, "lstm_transpose", 4 * hidden * hidden, &t)?;
    let dz = be.output::<f32>(frames * 4 * hidden)?;
    let dc_carry = be.output::<f32>(frames * hidden)?;
    for step in (0..sched.running.len()).rev() {
        let p = LstmStepParams {
            w: be.ptr(&w_hh_t),
            dout: be.ptr(dout),
            c: be.ptr(&states.c),
            gates: be.ptr(&states.gates),
            dz: be.ptr(&dz),
            dc_carry: be.ptr(&dc_carry),
            ..sched.params(be, step, hidden, &cols)
        };
        sched.launch(be, K, &p)?;
    }
    Ok(dz)
}
