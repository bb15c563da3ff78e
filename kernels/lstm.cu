// strata/kernels/lstm.cu: one direction of an LSTM layer over the utterances of a packed batch,
// one launch per time step (CPU reference: src/ops/lstm.rs; gates in PyTorch's order i, f, g, o).
// The host's schedule `sched` [(steps + 1) * n] holds, for step t and the k-th running utterance
// (longest first), the packed row it reads at that step; -1 where it has ended (the extra last
// step is all -1). Every step's work, one warp per (utterance k, unit j):
// h (and, backward, its gradient) may be a column block of a wider matrix: the two directions
// write their halves of the layer's [frames, 2H] output in place.
// - lstm_step_forward: z = pre[row] + W_hh h[prev] (four length-H dot products over the lanes),
//   then the gates, c = f c[prev] + i g, h = o tanh(c); writes h, c, the activated gates and the
//   previous state h[prev] (zero at the first step), which W_hh's gradient reads.
// - lstm_step_backward: dh = dout[row] + W_hh^T dz[next] (a length-4H dot product with row j of
//   W_hh^T), dc = dc_carry[next] + dh o (1 - tanh^2 c); writes dz[row] (the gate pre-activations'
//   gradient) and dc_carry[row] = dc f. Rows of different steps never overlap, so a step reads
//   the one after it while writing its own.
// fp32 throughout (the recurrence compounds rounding); W_hh's gradient is the tensor-core Linear's
// weight gradient of dz against the previous states, after the last step.
#ifndef STRATA_COMMON_INCLUDED
#include "common.cuh"
#endif

struct LstmStepParams {
    const float* pre;     // [frames, 4H]: x W_ih^T + b_ih + b_hh
    const float* w;       // forward: W_hh [4H, H]; backward: W_hh^T [H, 4H]
    const float* dout;    // backward: the output's gradient, laid out as h
    float* h;             // row r's h at h + r * h_stride + h_col ([frames, 2H] for both directions)
    float* c;             // [frames, H]
    float* gates;         // [frames, 4H]: i, f, g, o activated
    float* h_prev;        // forward: [frames, H], h of each row's previous step (0 at the first)
    float* dz;            // backward: [frames, 4H]
    float* dc_carry;      // backward: [frames, H]
    const int* sched;     // [(steps + 1) * n]
    int step, n, running, hidden, h_stride, h_col;
};

__device__ __forceinline__ float lstm_sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

extern "C" __global__ void lstm_step_forward(const LstmStepParams p) {
    const int lane = threadIdx.x & 31;
    const int64_t warp = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    if (warp >= (int64_t)p.running * p.hidden) return;
    // Consecutive warps share the unit j (and so W's rows, hot in L1) across the utterances k.
    const int k = (int)(warp % p.running), j = (int)(warp / p.running), H = p.hidden;
    const int row = p.sched[(int64_t)p.step * p.n + k];
    const int prev = p.step > 0 ? p.sched[(int64_t)(p.step - 1) * p.n + k] : -1;
    float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    if (prev >= 0) {
        const float* hp = p.h + (int64_t)prev * p.h_stride + p.h_col;
        for (int q = lane; q < H; q += 32) {
            const float hv = hp[q];
#pragma unroll
            for (int g = 0; g < 4; ++g) acc[g] += p.w[((int64_t)g * H + j) * H + q] * hv;
        }
#pragma unroll
        for (int g = 0; g < 4; ++g) acc[g] = warp_sum(acc[g]);
    }
    if (lane != 0) return;
    const float* z = p.pre + (int64_t)row * 4 * H;
    const float i = lstm_sigmoid(z[j] + acc[0]);
    const float f = lstm_sigmoid(z[H + j] + acc[1]);
    const float g = tanhf(z[2 * H + j] + acc[2]);
    const float o = lstm_sigmoid(z[3 * H + j] + acc[3]);
    const float c_prev = prev >= 0 ? p.c[(int64_t)prev * H + j] : 0.0f;
    const float cv = f * c_prev + i * g;
    p.c[(int64_t)row * H + j] = cv;
    p.h[(int64_t)row * p.h_stride + p.h_col + j] = o * tanhf(cv);
    p.h_prev[(int64_t)row * H + j] = prev >= 0 ? p.h[(int64_t)prev * p.h_stride + p.h_col + j] : 0.0f;
    float* gs = p.gates + (int64_t)row * 4 * H;
    gs[j] = i;
    gs[H + j] = f;
    gs[2 * H + j] = g;
    gs[3 * H + j] = o;
}
STRATA_EMU_ENTRY(lstm_step_forward, LstmStepParams)

extern "C" __global__ void lstm_step_backward(const LstmStepParams p) {
    const int lane = threadIdx.x & 31;
    const int64_t warp = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    if (warp >= (int64_t)p.running * p.hidden) return;
    // Consecutive warps share the unit j (and so W's rows, hot in L1) across the utterances k.
    const int k = (int)(warp % p.running), j = (int)(warp / p.running), H = p.hidden;
    const int row = p.sched[(int64_t)p.step * p.n + k];
    const int next = p.sched[(int64_t)(p.step + 1) * p.n + k];
    const int prev = p.step > 0 ? p.sched[(int64_t)(p.step - 1) * p.n + k] : -1;
    float dh_rec = 0.0f;
    if (next >= 0) {
        const float* dzn = p.dz + (int64_t)next * 4 * H;
        const float* wt = p.w + (int64_t)j * 4 * H;
        for (int q = lane; q < 4 * H; q += 32) dh_rec += dzn[q] * wt[q];
        dh_rec = warp_sum(dh_rec);
    }
    if (lane != 0) return;
    const float* gs = p.gates + (int64_t)row * 4 * H;
    const float i = gs[j], f = gs[H + j], g = gs[2 * H + j], o = gs[3 * H + j];
    const float tc = tanhf(p.c[(int64_t)row * H + j]);
    const float c_prev = prev >= 0 ? p.c[(int64_t)prev * H + j] : 0.0f;
    const float dh = p.dout[(int64_t)row * p.h_stride + p.h_col + j] + dh_rec;
    const float dc = (next >= 0 ? p.dc_carry[(int64_t)next * H + j] : 0.0f) + dh * o * (1.0f - tc * tc);
    p.dc_carry[(int64_t)row * H + j] = dc * f;
    float* d = p.dz + (int64_t)row * 4 * H;
    d[j] = dc * g * i * (1.0f - i);
    d[H + j] = dc * c_prev * f * (1.0f - f);
    d[2 * H + j] = dc * i * (1.0f - g * g);
    d[3 * H + j] = dh * tc * o * (1.0f - o);
}
STRATA_EMU_ENTRY(lstm_step_backward, LstmStepParams)

// wt [cols, rows] = w [rows, cols]^T: W_hh^T for the backward's dot products, once per backward.
struct LstmTransposeParams {
    const float* w;
    float* wt;
    int rows, cols;
};

extern "C" __global__ void lstm_transpose(const LstmTransposeParams p) {
    const int64_t total = (int64_t)p.rows * p.cols;
    for (int64_t e = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; e < total; e += (int64_t)gridDim.x * blockDim.x) {
        const int64_t col = e / p.rows, row = e % p.rows;
        p.wt[e] = p.w[row * p.cols + col];
    }
}
STRATA_EMU_ENTRY(lstm_transpose, LstmTransposeParams)
