//! Launchers for an LSTM layer's recurrence over a packed batch (kernels/lstm.cu; CPU reference
//! `ops::lstm`): one launch per time step, over the utterances still running at that step, for
//! one direction or both of a bidirectional layer at once.

use super::{launch_elementwise, need, Cols};
use crate::batch::PackedBatch;
use crate::error::{Error, Result};
use crate::runtime::kernels::{LstmPairParams, LstmStepParams, LstmTransposeParams};
use crate::runtime::{Backend, Buf};

/// The step kernels' tile (kernels/lstm.cu's LSTM_JT, LSTM_UT): a block per 8 units of 32
/// running utterances, in groups of 128 threads (LSTM_GROUP) that split the sums' length, 2
/// forward and 4 backward (LSTM_SPLIT_FWD, LSTM_SPLIT_BWD).
const LSTM_UNITS_PER_BLOCK: usize = 8;
const LSTM_UTTERANCES_PER_BLOCK: usize = 32;
const LSTM_GROUP: u32 = 128;
const FORWARD_THREADS: u32 = 2 * LSTM_GROUP;
const BACKWARD_THREADS: u32 = 4 * LSTM_GROUP;

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
}

/// One launch of a step kernel (blocks of `threads`) over `count` directions' parameters (1 or 2,
/// the same step of the same batch, the first `count` of `pair`): grid.z picks the direction.
fn launch_step(
    be: &Backend,
    kernel: &'static str,
    threads: u32,
    pair: &LstmPairParams,
    count: usize,
) -> Result<()> {
    let p = pair.dir[0];
    let grid = (
        (p.hidden as usize).div_ceil(LSTM_UNITS_PER_BLOCK) as u32,
        (p.running as usize).div_ceil(LSTM_UTTERANCES_PER_BLOCK) as u32,
        count as u32,
    );
    be.launch(kernel, grid, (threads, 1, 1), 0, pair)
}

/// One direction of a layer: its gate pre-activations `pre` [frames, 4H] (x W_ih^T + both biases),
/// its W_hh [4H, H], its schedule, and where its h goes (`cols` of the layer's output).
#[derive(Clone, Copy)]
pub struct LstmDirection<'a> {
    pub pre: &'a Buf<f32>,
    pub w_hh: &'a Buf<f32>,
    pub sched: &'a DeviceLstmSchedule,
    pub cols: Cols,
}

/// One direction's backward: its W_hh, schedule, `cols` (where its h went, and its gradient is in
/// `dout`) and its forward's states.
#[derive(Clone, Copy)]
pub struct LstmBackDirection<'a> {
    pub w_hh: &'a Buf<f32>,
    pub sched: &'a DeviceLstmSchedule,
    pub cols: Cols,
    pub states: &'a LstmStates,
}

/// The directions stepped together: one or two over the same batch (the same steps, the same
/// utterances running at each), given by their schedules.
fn check_directions(k: &str, scheds: &[&DeviceLstmSchedule]) -> Result<()> {
    let same = scheds
        .windows(2)
        .all(|d| d[0].running == d[1].running && d[0].n == d[1].n && d[0].frames == d[1].frames);
    if scheds.is_empty() || scheds.len() > 2 || !same {
        return Err(Error::shape(
            k,
            "one or two directions over the same batch",
            format!("{} directions", scheds.len()),
        ));
    }
    Ok(())
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
    let dir = LstmDirection {
        pre,
        w_hh,
        sched,
        cols,
    };
    let mut states = lstm_forward_directions(be, &[dir], hidden, h)?;
    Ok(states.remove(0))
}

/// [`lstm_forward`] of one or both directions of a layer, stepped together (one launch a step),
/// each writing its h into `h` at its `cols`.
pub fn lstm_forward_directions(
    be: &Backend,
    dirs: &[LstmDirection],
    hidden: usize,
    h: &Buf<f32>,
) -> Result<Vec<LstmStates>> {
    const K: &str = "lstm_step_forward";
    check_directions(K, &dirs.iter().map(|d| d.sched).collect::<Vec<_>>())?;
    let frames = dirs[0].sched.frames;
    let mut out = Vec::with_capacity(dirs.len());
    for d in dirs {
        need(be, K, "pre", d.pre, frames * 4 * hidden)?;
        need(be, K, "w_hh", d.w_hh, 4 * hidden * hidden)?;
        check_cols(be, (K, "h"), (h, d.cols), frames, hidden)?;
        out.push(LstmStates {
            c: be.output::<f32>(frames * hidden)?,
            gates: be.output::<f32>(frames * 4 * hidden)?,
            h_prev: be.output::<f32>(frames * hidden)?,
        });
    }
    for step in 0..dirs[0].sched.running.len() {
        let mut pair = LstmPairParams {
            dir: [dirs[0].sched.params(be, step, hidden, &dirs[0].cols); 2],
        };
        for (slot, (d, o)) in pair.dir.iter_mut().zip(dirs.iter().zip(&out)) {
            *slot = LstmStepParams {
                pre: be.ptr(d.pre),
                w: be.ptr(d.w_hh),
                h: be.ptr(h),
                c: be.ptr(&o.c),
                gates: be.ptr(&o.gates),
                h_prev: be.ptr(&o.h_prev),
                ..d.sched.params(be, step, hidden, &d.cols)
            };
        }
        launch_step(be, K, FORWARD_THREADS, &pair, dirs.len())?;
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
    let dir = LstmBackDirection {
        w_hh,
        sched,
        cols,
        states,
    };
    let mut dz = lstm_backward_directions(be, dout, &[dir], hidden)?;
    Ok(dz.remove(0))
}

/// [`lstm_backward`] of one or both directions of a layer (each with its forward's states),
/// stepped together (one launch a step); `dout` holds each direction's gradient at its `cols`.
pub fn lstm_backward_directions(
    be: &Backend,
    dout: &Buf<f32>,
    dirs: &[LstmBackDirection],
    hidden: usize,
) -> Result<Vec<Buf<f32>>> {
    const K: &str = "lstm_step_backward";
    check_directions(K, &dirs.iter().map(|d| d.sched).collect::<Vec<_>>())?;
    let frames = dirs[0].sched.frames;
    // Per direction: W_hh^T, dz, dc_carry.
    let mut bufs = Vec::with_capacity(dirs.len());
    for d in dirs {
        check_cols(be, (K, "dout"), (dout, d.cols), frames, hidden)?;
        need(be, K, "w_hh", d.w_hh, 4 * hidden * hidden)?;
        let w_hh_t = be.output::<f32>(4 * hidden * hidden)?;
        let t = LstmTransposeParams {
            w: be.ptr(d.w_hh),
            wt: be.ptr(&w_hh_t),
            rows: (4 * hidden) as i32,
            cols: hidden as i32,
        };
        launch_elementwise(be, "lstm_transpose", 4 * hidden * hidden, &t)?;
        bufs.push((
            w_hh_t,
            be.output::<f32>(frames * 4 * hidden)?,
            be.output::<f32>(frames * hidden)?,
        ));
    }
    for step in (0..dirs[0].sched.running.len()).rev() {
        let mut pair = LstmPairParams {
            dir: [dirs[0].sched.params(be, step, hidden, &dirs[0].cols); 2],
        };
        for (slot, (d, (w_hh_t, dz, dc_carry))) in pair.dir.iter_mut().zip(dirs.iter().zip(&bufs)) {
            *slot = LstmStepParams {
                w: be.ptr(w_hh_t),
                dout: be.ptr(dout),
                c: be.ptr(&d.states.c),
                gates: be.ptr(&d.states.gates),
                dz: be.ptr(dz),
                dc_carry: be.ptr(dc_carry),
                ..d.sched.params(be, step, hidden, &d.cols)
            };
        }
        launch_step(be, K, BACKWARD_THREADS, &pair, dirs.len())?;
    }
    Ok(bufs.into_iter().map(|(_, dz, _)| dz).collect())
}
