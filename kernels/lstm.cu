// strata/kernels/lstm.cu: an LSTM layer's recurrence over the utterances of a packed batch, one
// launch per time step, both directions of a bidirectional layer in the same launch (CPU
// reference: src/ops/lstm.rs, a direction at a time; gates in PyTorch's order i, f, g, o).
// The host's schedule `sched` [(steps + 1) * n] holds, for step t and the k-th running utterance
// (longest first), the packed row it reads at that step; -1 where it has ended (the extra last
// step is all -1). h (and, backward, its gradient) may be a column block of a wider matrix: the
// two directions write their halves of the layer's [frames, 2H] output in place.
// - lstm_step_forward: z = pre[row] + W_hh h[prev], then the gates, c = f c[prev] + i g,
//   h = o tanh(c); writes h, c, the activated gates and the previous state h[prev] (zero at the
//   first step), which W_hh's gradient reads.
// - lstm_step_backward: dh = dout[row] + W_hh^T dz[next], dc = dc_carry[next] + dh o (1 - tanh^2
//   c); writes dz[row] (the gate pre-activations' gradient) and dc_carry[row] = dc f. Rows of
//   different steps never overlap, so a step reads the one after it while writing its own.
// Each step's products are a small GEMM over the running utterances (s3prl's 32 x 1024 by
// 1024 x 4096 forward), tiled: a block owns LSTM_JT units for LSTM_UT utterances and streams W's
// rows of those units and the utterances' states through shared memory in chunks of LSTM_QC, so
// that W is read from L2 once per step and tile, and each thread keeps several sums in registers
// (forward: 2 utterances x 4 gates of one unit; backward: 2 utterances of one unit). A warp per
// (utterance, unit), as before, re-read W's rows from L1 for every utterance.
// The sums' length (H forward, 4H backward) is split between groups of LSTM_GROUP threads, each
// streaming its own part through its own buffers, the first group adding the others' sums in
// group order (deterministic): a step is a chain of chunks, each a wait for memory and two
// barriers, and one group over 4H = 4096 ran 64 of them in a row. At H = 1024 a block's barrier
// phases per step (examples/emu_profile.rs counts them): backward 130 -> 35, forward 34 -> 19.
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

// The directions a launch steps together, blockIdx.z picking one: both of a bidirectional layer
// (independent recurrences over the same schedule of running utterances: one launch per step
// instead of two, and twice the blocks), or one (grid.z = 1).
struct LstmPairParams {
    LstmStepParams dir[2];
};

__device__ __forceinline__ float lstm_sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

// The step kernels' tiles (the host's LSTM_UNITS_PER_BLOCK, LSTM_UTTERANCES_PER_BLOCK, and its
// threads per block, LSTM_GROUP x the split): thread t of a group on unit t % LSTM_JT and
// utterances 2 (t / LSTM_JT) + {0, 1} of the block's.
#define LSTM_GROUP 128
#define LSTM_SPLIT_FWD 2  // groups over H
#define LSTM_SPLIT_BWD 4  // groups over 4H
#define LSTM_JT 8
#define LSTM_UT 32
#define LSTM_QC 64
#define LSTM_PITCH (LSTM_QC + 4)  // floats: rows stay 16-byte aligned for the float4 reads

// Fills rows[r][0 .. LSTM_QC) (r < count) with src(r, c0 + q), zeros from `limit` on; coalesced:
// consecutive threads of the group (t, its thread's index in it) take consecutive q.
template <class Src>
__device__ __forceinline__ void lstm_stage(float (*rows)[LSTM_PITCH], int count, int c0, int limit, int t, Src src) {
    for (int e = t; e < count * LSTM_QC; e += LSTM_GROUP) {
        const int r = e / LSTM_QC, q = e % LSTM_QC;
        rows[r][q] = c0 + q < limit ? src(r, c0 + q) : 0.0f;
    }
}

// Group `group`'s part of a sum of length k split between `groups`: columns [begin, end), its
// chunks running from begin over `span` (a multiple of LSTM_QC; the last groups' parts may be
// short or empty: zero-filled past end).
struct LstmPart {
    int begin, span, end;
};
__device__ __forceinline__ LstmPart lstm_part(int k, int groups, int group) {
    LstmPart r;
    r.span = (k + groups * LSTM_QC - 1) / (groups * LSTM_QC) * LSTM_QC;
    r.begin = group * r.span;
    r.end = r.begin + r.span < k ? r.begin + r.span : k;
    return r;
}

__device__ __forceinline__ float lstm_dot4(float acc, float4_t a, float4_t b) {
    acc += a.x * b.x;
    acc += a.y * b.y;
    acc += a.z * b.z;
    return acc + a.w * b.w;
}

extern "C" __global__ void lstm_step_forward(const LstmPairParams pair) {
    const LstmStepParams& p = pair.dir[blockIdx.z];
    // Each group's rows g * LSTM_JT + jj: W's row g H + j; the utterances' previous h.
    __align__(16) __shared__ float ws[LSTM_SPLIT_FWD][4 * LSTM_JT][LSTM_PITCH];
    __align__(16) __shared__ float hs[LSTM_SPLIT_FWD][LSTM_UT][LSTM_PITCH];
    __shared__ float sums[LSTM_SPLIT_FWD - 1][8][LSTM_GROUP];  // the other groups' sums
    __shared__ int prev_row[LSTM_UT];
    const int tid = threadIdx.x, H = p.hidden;
    const int group = tid / LSTM_GROUP, t = tid % LSTM_GROUP;
    const int j0 = blockIdx.x * LSTM_JT, k0 = blockIdx.y * LSTM_UT;
    if (tid < LSTM_UT) {
        const int k = k0 + tid;
        prev_row[tid] = p.step > 0 && k < p.running ? p.sched[(int64_t)(p.step - 1) * p.n + k] : -1;
    }
    __syncthreads();
    const int jj = t % LSTM_JT, u0 = 2 * (t / LSTM_JT);
    const LstmPart part = lstm_part(H, LSTM_SPLIT_FWD, group);
    float acc[2][4] = {{0.0f, 0.0f, 0.0f, 0.0f}, {0.0f, 0.0f, 0.0f, 0.0f}};
    for (int c0 = part.begin; c0 < part.begin + part.span; c0 += LSTM_QC) {
        // A group past the sum's end (small H) only keeps the block's barriers.
        const bool active = c0 < part.end;
        if (active) {
            lstm_stage(ws[group], 4 * LSTM_JT, c0, part.end, t, [&](int r, int q) {
                const int j = j0 + r % LSTM_JT;
                return j < H ? p.w[((int64_t)(r / LSTM_JT) * H + j) * H + q] : 0.0f;
            });
            lstm_stage(hs[group], LSTM_UT, c0, part.end, t, [&](int r, int q) {
                const int pr = prev_row[r];
                return pr >= 0 ? p.h[(int64_t)pr * p.h_stride + p.h_col + q] : 0.0f;
            });
        }
        __syncthreads();
        if (active) {
#pragma unroll 4
            for (int q = 0; q < LSTM_QC; q += 4) {
                const float4_t h0 = load_float4(&hs[group][u0][q]), h1 = load_float4(&hs[group][u0 + 1][q]);
#pragma unroll
                for (int g = 0; g < 4; ++g) {
                    const float4_t w = load_float4(&ws[group][g * LSTM_JT + jj][q]);
                    acc[0][g] = lstm_dot4(acc[0][g], w, h0);
                    acc[1][g] = lstm_dot4(acc[1][g], w, h1);
                }
            }
        }
        __syncthreads();
    }
    if (group > 0) {
        for (int v = 0; v < 8; ++v) sums[group - 1][v][t] = acc[v / 4][v % 4];
    }
    __syncthreads();
    if (group > 0) return;
    for (int s = 0; s < LSTM_SPLIT_FWD - 1; ++s) {
        for (int v = 0; v < 8; ++v) acc[v / 4][v % 4] += sums[s][v][t];
    }
    const int j = j0 + jj;
    if (j >= H) return;
    for (int u = 0; u < 2; ++u) {
        const int k = k0 + u0 + u;
        if (k >= p.running) return;
        const int row = p.sched[(int64_t)p.step * p.n + k], prev = prev_row[u0 + u];
        const float* z = p.pre + (int64_t)row * 4 * H;
        const float i = lstm_sigmoid(z[j] + acc[u][0]);
        const float f = lstm_sigmoid(z[H + j] + acc[u][1]);
        const float g = tanhf(z[2 * H + j] + acc[u][2]);
        const float o = lstm_sigmoid(z[3 * H + j] + acc[u][3]);
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
}
STRATA_EMU_ENTRY(lstm_step_forward, LstmPairParams)

extern "C" __global__ void lstm_step_backward(const LstmPairParams pair) {
    const LstmStepParams& p = pair.dir[blockIdx.z];
    // Each group's W_hh^T rows j ([4H] each) and the utterances' next dz, over its part of 4H.
    __align__(16) __shared__ float ws[LSTM_SPLIT_BWD][LSTM_JT][LSTM_PITCH];
    __align__(16) __shared__ float ds[LSTM_SPLIT_BWD][LSTM_UT][LSTM_PITCH];
    __shared__ float sums[LSTM_SPLIT_BWD - 1][2][LSTM_GROUP];  // the other groups' sums
    __shared__ int next_row[LSTM_UT];
    const int tid = threadIdx.x, H = p.hidden;
    const int group = tid / LSTM_GROUP, t = tid % LSTM_GROUP;
    const int j0 = blockIdx.x * LSTM_JT, k0 = blockIdx.y * LSTM_UT;
    if (tid < LSTM_UT) {
        const int k = k0 + tid;
        next_row[tid] = k < p.running ? p.sched[(int64_t)(p.step + 1) * p.n + k] : -1;
    }
    __syncthreads();
    const int jj = t % LSTM_JT, u0 = 2 * (t / LSTM_JT);
    const LstmPart part = lstm_part(4 * H, LSTM_SPLIT_BWD, group);
    float acc[2] = {0.0f, 0.0f};
    for (int c0 = part.begin; c0 < part.begin + part.span; c0 += LSTM_QC) {
        // A group past the sum's end (small H) only keeps the block's barriers.
        const bool active = c0 < part.end;
        if (active) {
            lstm_stage(ws[group], LSTM_JT, c0, part.end, t, [&](int r, int q) {
                const int j = j0 + r;
                return j < H ? p.w[(int64_t)j * 4 * H + q] : 0.0f;
            });
            lstm_stage(ds[group], LSTM_UT, c0, part.end, t, [&](int r, int q) {
                const int nr = next_row[r];
                return nr >= 0 ? p.dz[(int64_t)nr * 4 * H + q] : 0.0f;
            });
        }
        __syncthreads();
        if (active) {
#pragma unroll 4
            for (int q = 0; q < LSTM_QC; q += 4) {
                const float4_t w = load_float4(&ws[group][jj][q]);
                acc[0] = lstm_dot4(acc[0], w, load_float4(&ds[group][u0][q]));
                acc[1] = lstm_dot4(acc[1], w, load_float4(&ds[group][u0 + 1][q]));
            }
        }
        __syncthreads();
    }
    if (group > 0) {
        sums[group - 1][0][t] = acc[0];
        sums[group - 1][1][t] = acc[1];
    }
    __syncthreads();
    if (group > 0) return;
    for (int s = 0; s < LSTM_SPLIT_BWD - 1; ++s) {
        acc[0] += sums[s][0][t];
        acc[1] += sums[s][1][t];
    }
    const int j = j0 + jj;
    if (j >= H) return;
    for (int u = 0; u < 2; ++u) {
        const int k = k0 + u0 + u;
        if (k >= p.running) return;
        const int row = p.sched[(int64_t)p.step * p.n + k], next = next_row[u0 + u];
        const int prev = p.step > 0 ? p.sched[(int64_t)(p.step - 1) * p.n + k] : -1;
        const float* gs = p.gates + (int64_t)row * 4 * H;
        const float i = gs[j], f = gs[H + j], g = gs[2 * H + j], o = gs[3 * H + j];
        const float tc = tanhf(p.c[(int64_t)row * H + j]);
        const float c_prev = prev >= 0 ? p.c[(int64_t)prev * H + j] : 0.0f;
        const float dh = p.dout[(int64_t)row * p.h_stride + p.h_col + j] + acc[u];
        const float dc = (next >= 0 ? p.dc_carry[(int64_t)next * H + j] : 0.0f) + dh * o * (1.0f - tc * tc);
        p.dc_carry[(int64_t)row * H + j] = dc * f;
        float* d = p.dz + (int64_t)row * 4 * H;
        d[j] = dc * g * i * (1.0f - i);
        d[H + j] = dc * c_prev * f * (1.0f - f);
        d[2 * H + j] = dc * i * (1.0f - g * g);
        d[3 * H + j] = dh * tc * o * (1.0f - o);
    }
}
STRATA_EMU_ENTRY(lstm_step_backward, LstmPairParams)

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
