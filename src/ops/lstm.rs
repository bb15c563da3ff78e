//! One direction of an LSTM layer over the utterances of a packed batch: PyTorch's `nn.LSTM` run on
//! a `pack_padded_sequence` (each utterance its own sequence, its state starting from zero, the
//! reverse direction reading it from its last frame). Gates in PyTorch's order i, f, g, o:
//!
//!   z = pre[t] + W_hh h[t-1]        (pre = x W_ih^T + b_ih + b_hh, every frame in one product)
//!   i, f, o = sigmoid(z_i, z_f, z_o); g = tanh(z_g)
//!   c[t] = f c[t-1] + i g;  h[t] = o tanh(c[t])
//!
//! The recurrence runs all utterances in step: at step t the utterances longer than t, the
//! longest first, so the ones still running are a prefix and each step's W_hh product is one
//! product over them (a few rows: `Real::gemm_nt_rows`). The backward is backpropagation through
//! time over the same schedule; W_hh's gradient is one GEMM at the end over every frame's gate
//! gradient and previous state.

use super::gemm::{gemm, Trans};
use super::Real;

#[inline]
fn sigmoid<R: Real>(x: R) -> R {
    R::ONE / (R::ONE + (-x).exp())
}

/// The order the recurrence visits frames in: utterances longest first (ties by position).
struct Schedule<'a> {
    offsets: &'a [usize],
    order: Vec<usize>,
    reverse: bool,
}

impl<'a> Schedule<'a> {
    fn new(offsets: &'a [usize], reverse: bool) -> Self {
        let len = |u: usize| offsets[u + 1] - offsets[u];
        let mut order: Vec<usize> = (0..offsets.len().saturating_sub(1)).collect();
        order.sort_by_key(|&u| std::cmp::Reverse(len(u)));
        Schedule {
            offsets,
            order,
            reverse,
        }
    }

    fn len(&self, k: usize) -> usize {
        let u = self.order[k];
        self.offsets[u + 1] - self.offsets[u]
    }

    fn steps(&self) -> usize {
        if self.order.is_empty() {
            0
        } else {
            self.len(0)
        }
    }

    /// How many utterances (a prefix of `order`) run at step t.
    fn running(&self, t: usize) -> usize {
        self.order
            .partition_point(|&u| self.offsets[u + 1] - self.offsets[u] > t)
    }

    /// The packed row of the k-th utterance's step t.
    fn row(&self, k: usize, t: usize) -> usize {
        let u = self.order[k];
        if self.reverse {
            self.offsets[u + 1] - 1 - t
        } else {
            self.offsets[u] + t
        }
    }
}

/// What [`backward`] needs from [`forward`]: per frame the activated gates [frames, 4H] (i, f, g,
/// o) and the cell state [frames, H].
pub struct Saved<R> {
    pub gates: Vec<R>,
    pub cells: Vec<R>,
}

/// `pre` [frames, 4H] (the input part of the gates, biases included), `w_hh` [4H, H], utterance
/// `offsets` of the packed batch -> h [frames, H] and what the backward needs.
pub fn forward<R: Real>(
    pre: &[R],
    w_hh: &[R],
    offsets: &[usize],
    hidden: usize,
    reverse: bool,
) -> (Vec<R>, Saved<R>) {
    let h4 = 4 * hidden;
    let frames = offsets.last().copied().unwrap_or(0);
    assert_eq!(pre.len(), frames * h4, "lstm: pre-activations");
    assert_eq!(w_hh.len(), h4 * hidden, "lstm: w_hh");
    let sched = Schedule::new(offsets, reverse);
    let n = sched.order.len();
    let mut h = vec![R::ZERO; frames * hidden];
    let mut gates = vec![R::ZERO; frames * h4];
    let mut cells = vec![R::ZERO; frames * hidden];
    // The running utterances' states, in schedule order.
    let mut hs = vec![R::ZERO; n * hidden];
    let mut cs = vec![R::ZERO; n * hidden];
    let mut rec = vec![R::ZERO; n * h4];
    for t in 0..sched.steps() {
        let m = sched.running(t);
        let rec = &mut rec[..m * h4];
        if t == 0 {
            rec.iter_mut().for_each(|v| *v = R::ZERO);
        } else {
            R::gemm_nt_rows(m, hidden, h4, &hs[..m * hidden], w_hh, rec);
        }
        for k in 0..m {
            let row = sched.row(k, t);
            let z = &pre[row * h4..(row + 1) * h4];
            let r = &rec[k * h4..(k + 1) * h4];
            let g_out = &mut gates[row * h4..(row + 1) * h4];
            for j in 0..hidden {
                let i = sigmoid(z[j] + r[j]);
                let f = sigmoid(z[hidden + j] + r[hidden + j]);
                let g = (z[2 * hidden + j] + r[2 * hidden + j]).tanh();
                let o = sigmoid(z[3 * hidden + j] + r[3 * hidden + j]);
                let c = f * cs[k * hidden + j] + i * g;
                let hv = o * c.tanh();
                cs[k * hidden + j] = c;
                hs[k * hidden + j] = hv;
                cells[row * hidden + j] = c;
                h[row * hidden + j] = hv;
                g_out[j] = i;
                g_out[hidden + j] = f;
                g_out[2 * hidden + j] = g;
                g_out[3 * hidden + j] = o;
            }
        }
    }
    (h, Saved { gates, cells })
}

/// Gradients of [`forward`] from dh [frames, H] (the output's gradient) and the forward's output
/// `h`: d pre [frames, 4H] (also the gradient of each bias, summed over frames, and the source of
/// x's and W_ih's) and d w_hh [4H, H].
pub fn backward<R: Real>(
    dh: &[R],
    h: &[R],
    saved: &Saved<R>,
    w_hh: &[R],
    offsets: &[usize],
    hidden: usize,
    reverse: bool,
) -> (Vec<R>, Vec<R>) {
    let h4 = 4 * hidden;
    let frames = offsets.last().copied().unwrap_or(0);
    assert_eq!(dh.len(), frames * hidden, "lstm backward: dh");
    let sched = Schedule::new(offsets, reverse);
    let n = sched.order.len();
    let mut dpre = vec![R::ZERO; frames * h4];
    // Each frame's previous state h[t-1] (zero at an utterance's first step), for dW_hh.
    let mut h_prev = vec![R::ZERO; frames * hidden];
    // The gradient flowing back into the running utterances' h and c, in schedule order.
    let mut dhs = vec![R::ZERO; n * hidden];
    let mut dcs = vec![R::ZERO; n * hidden];
    let mut dz_step = vec![R::ZERO; n * h4];
    // W_hh^T [H, 4H]: each step's dh = dz W_hh reads it row by row.
    let mut w_hh_t = vec![R::ZERO; h4 * hidden];
    for (p, row) in w_hh.chunks_exact(hidden).enumerate() {
        for (q, &v) in row.iter().enumerate() {
            w_hh_t[q * h4 + p] = v;
        }
    }
    for t in (0..sched.steps()).rev() {
        let m = sched.running(t);
        for k in 0..m {
            let row = sched.row(k, t);
            let prev = (t > 0).then(|| sched.row(k, t - 1));
            if let Some(p) = prev {
                h_prev[row * hidden..(row + 1) * hidden]
                    .copy_from_slice(&h[p * hidden..(p + 1) * hidden]);
            }
            let gate = &saved.gates[row * h4..(row + 1) * h4];
            let dz = &mut dz_step[k * h4..(k + 1) * h4];
            for j in 0..hidden {
                let (i, f, g, o) = (
                    gate[j],
                    gate[hidden + j],
                    gate[2 * hidden + j],
                    gate[3 * hidden + j],
                );
                let c = saved.cells[row * hidden + j];
                let c_prev = prev.map_or(R::ZERO, |p| saved.cells[p * hidden + j]);
                let tc = c.tanh();
                let dhv = dh[row * hidden + j] + dhs[k * hidden + j];
                let dc = dcs[k * hidden + j] + dhv * o * (R::ONE - tc * tc);
                dcs[k * hidden + j] = dc * f;
                dz[j] = dc * g * i * (R::ONE - i);
                dz[hidden + j] = dc * c_prev * f * (R::ONE - f);
                dz[2 * hidden + j] = dc * i * (R::ONE - g * g);
                dz[3 * hidden + j] = dhv * tc * o * (R::ONE - o);
            }
            dpre[row * h4..(row + 1) * h4].copy_from_slice(dz);
        }
        if t > 0 {
            R::gemm_nt_rows(
                m,
                h4,
                hidden,
                &dz_step[..m * h4],
                &w_hh_t,
                &mut dhs[..m * hidden],
            );
        }
    }
    let mut dw_hh = vec![R::ZERO; h4 * hidden];
    gemm(
        h4,
        frames,
        hidden,
        &dpre,
        Trans::T,
        &h_prev,
        Trans::N,
        R::ZERO,
        &mut dw_hh,
    );
    (dpre, dw_hh)
}
