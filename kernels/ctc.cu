// strata/kernels/ctc.cu: CTC loss and its gradient in log space, with PyTorch's ctc_loss semantics
// (blank index, 'mean' / 'sum', zero_infinity). CPU reference: src/ops/ctc.rs (the same recursions
// and log-sum-exp formula per cell).
//
// Inputs are packed: log_probs [frames, v] with input_offsets (cu_seqlens), targets concatenated
// with target_offsets. The extended target is (blank, l1, blank, ..., blank), S = 2U + 1. Two
// launches:
// 1. ctc_alpha_beta, grid (utterances, 2): block y = 0 runs the alpha recursion forward in time,
//    y = 1 the beta recursion backward, at the same time. Each writes its T x S table to global
//    scratch (at the utterance's scratch offset) and keeps two rows in shared memory. The time
//    recursion is the kernel's critical path, so each step has one barrier and no global load to
//    wait on: a thread's log-probabilities are loaded two steps ahead.
//    The alpha block writes the utterance's loss.
// 2. ctc_grad, a warp per frame (every frame of the batch in parallel): e(s) = alpha_t(s) +
//    beta_t(s), then
//      d nll / d lp[t, c] = -exp(lse_{s: ext(s) = c} e(s) - lp[t, c] + nll)     (0 where c is absent)
//    times the reduction weight (1 / (max(U, 1) N) for 'mean', 1 for 'sum'). The blank's lse is a
//    warp reduction over the even s (max, then the sum of exponentials: the CPU chains lse2
//    instead, so the two differ by rounding); a label's lse walks its occurrences in target order
//    (a chain from its first occurrence, links computed on the host), the CPU's accumulation order.
//    Deterministic.
// An impossible alignment (nll = inf): zero_infinity gives loss 0 and gradient 0; otherwise the
// loss is inf and the gradient NaN, as the CPU reference. A NaN loss (NaN log-probs) stays NaN
// with a NaN gradient even under zero_infinity, as in PyTorch.
#ifndef STRATA_COMMON_INCLUDED
#include "common.cuh"
#endif

#define CTC_MAX_TARGET 1024
#define CTC_MAX_S (2 * CTC_MAX_TARGET + 1)
#define CTC_THREADS 256
// Extended-target positions per thread of the recursion blocks (s = tid, tid + 256, ...).
#define CTC_S_PER_THREAD ((CTC_MAX_S + CTC_THREADS - 1) / CTC_THREADS)

struct CtcParams {
    const float* lp;
    const int* input_offsets;   // [n + 1]
    const int* targets;         // concatenated labels
    const int* target_offsets;  // [n + 1]
    const int* next_same;       // per label: index (within its target) of its next occurrence, -1 at the last
    const int* first;           // per label: 1 at a label's first occurrence in its target
    const int64_t* scratch_offsets;  // [n]: each utterance's T * S cells in alpha and in beta
    float* alpha;
    float* beta;
    float* nll;   // [n], after zero_infinity (unweighted)
    float* grad;  // [frames, v]
    int n, frames, v, blank, mean, zero_infinity;
};

__device__ __forceinline__ float ctc_ninf() { return strata_bits_float(0xff800000u); }

__device__ __forceinline__ float ctc_lse2(float a, float b) {
    const float m = fmaxf(a, b);
    if (m == ctc_ninf()) return m;
    return m + logf(expf(a - m) + expf(b - m));
}

__device__ __forceinline__ float ctc_lse3(float a, float b, float c) {
    const float m = fmaxf(fmaxf(a, b), c);
    if (m == ctc_ninf()) return m;
    return m + logf(expf(a - m) + expf(b - m) + expf(c - m));
}

// -log p(target | input) from the alpha table's last row (both kernels compute it this way, so
// they agree bit for bit on whether it is finite).
__device__ __forceinline__ float ctc_nll(const float* A, int T, int S) {
    const float* last = A + (int64_t)(T - 1) * S;
    return -(S > 1 ? ctc_lse2(last[S - 1], last[S - 2]) : last[0]);
}

extern "C" __global__ void ctc_alpha_beta(const CtcParams p) {
    __shared__ int tgt[CTC_MAX_TARGET];
    __shared__ float row[2][CTC_MAX_S];
    const int u = blockIdx.x, tid = threadIdx.x, nt = blockDim.x;
    const bool backward = blockIdx.y == 1;
    const int t0 = p.input_offsets[u], T = p.input_offsets[u + 1] - t0;
    const int g0 = p.target_offsets[u], U = p.target_offsets[u + 1] - g0, S = 2 * U + 1;
    const float ninf = ctc_ninf();
    float* table = (backward ? p.beta : p.alpha) + p.scratch_offsets[u];
    const float* lp = p.lp + (int64_t)t0 * p.v;
    for (int i = tid; i < U; i += nt) tgt[i] = p.targets[g0 + i];
    __syncthreads();
    // This thread's positions s = tid + i * nt: their symbols and whether a skip (from s - 2 going
    // forward, from s + 2 going backward) is allowed onto / from them.
    int ext[CTC_S_PER_THREAD];
    bool skip[CTC_S_PER_THREAD];
    // Emissions of the next two steps, loaded ahead: a step takes about as long as an L2 hit.
    float next_lp[CTC_S_PER_THREAD], after_lp[CTC_S_PER_THREAD];
    const int t_first = backward ? T - 1 : 0;
#pragma unroll
    for (int i = 0; i < CTC_S_PER_THREAD; ++i) {
        const int s = tid + i * nt;
        ext[i] = s < S ? (s % 2 == 0 ? p.blank : tgt[s / 2]) : p.blank;
        // Forward: onto label s from s - 2; backward: from s to s + 2 (the same rule at s + 2).
        const int k = backward ? s + 2 : s;
        skip[i] = k < S && k >= 2 && k % 2 == 1 && tgt[k / 2] != tgt[k / 2 - 1];
        next_lp[i] = s < S ? lp[(int64_t)t_first * p.v + ext[i]] : ninf;
    }
    // The first row: alpha_0 = lp at s = 0, 1; beta_{T-1} = lp at s = S - 1, S - 2.
#pragma unroll
    for (int i = 0; i < CTC_S_PER_THREAD; ++i) {
        const int s = tid + i * nt;
        if (s < S) {
            const bool start = backward ? s >= S - 2 : s <= 1;
            const float a = start ? next_lp[i] : ninf;
            row[0][s] = a;
            table[(int64_t)t_first * S + s] = a;
        }
    }
    const int step = backward ? -1 : 1;
#pragma unroll
    for (int i = 0; i < CTC_S_PER_THREAD; ++i) {
        const int s = tid + i * nt;
        if (s < S && T > 1) next_lp[i] = lp[(int64_t)(t_first + step) * p.v + ext[i]];
        if (s < S && T > 2) after_lp[i] = lp[(int64_t)(t_first + 2 * step) * p.v + ext[i]];
    }
    __syncthreads();
    for (int k = 1; k < T; ++k) {
        const int t = t_first + k * step;
        const float* prev = row[(k - 1) & 1];
        float* cur = row[k & 1];
#pragma unroll
        for (int i = 0; i < CTC_S_PER_THREAD; ++i) {
            const int s = tid + i * nt;
            if (s < S) {
                float a, b, c;
                if (backward) {
                    a = prev[s];
                    b = s + 1 < S ? prev[s + 1] : ninf;
                    c = skip[i] ? prev[s + 2] : ninf;
                } else {
                    a = prev[s];
                    b = s >= 1 ? prev[s - 1] : ninf;
                    c = skip[i] ? prev[s - 2] : ninf;
                }
                const float v = ctc_lse3(a, b, c) + next_lp[i];
                cur[s] = v;
                table[(int64_t)t * S + s] = v;
                // The emission two steps on goes in flight while this step's barrier waits.
                next_lp[i] = after_lp[i];
                if (k + 2 < T) after_lp[i] = lp[(int64_t)(t + 2 * step) * p.v + ext[i]];
            }
        }
        __syncthreads();
    }
    if (!backward && tid == 0) {
        const float nll = ctc_nll(table, T, S);
        const bool impossible = nll == strata_bits_float(0x7f800000u);
        p.nll[u] = impossible && p.zero_infinity ? 0.0f : nll;
    }
}
STRATA_EMU_ENTRY(ctc_alpha_beta, CtcParams)

// Warps per block of ctc_grad (a warp per frame).
#define CTC_GRAD_WARPS 8

extern "C" __global__ void ctc_grad(const CtcParams p) {
    const int lane = threadIdx.x & 31;
    const int f = blockIdx.x * CTC_GRAD_WARPS + (threadIdx.x >> 5);
    if (f >= p.frames) return;  // the whole warp: no barrier below
    // The frame's utterance: the last u with input_offsets[u] <= f.
    int lo = 0, hi = p.n - 1;
    while (lo < hi) {
        const int mid = (lo + hi + 1) / 2;
        if (p.input_offsets[mid] <= f) lo = mid;
        else hi = mid - 1;
    }
    const int u = lo;
    const int t0 = p.input_offsets[u], T = p.input_offsets[u + 1] - t0, t = f - t0;
    const int g0 = p.target_offsets[u], U = p.target_offsets[u + 1] - g0, S = 2 * U + 1;
    const float ninf = ctc_ninf();
    const float* A = p.alpha + p.scratch_offsets[u];
    const float* B = p.beta + p.scratch_offsets[u];
    const float* lp = p.lp + (int64_t)f * p.v;
    float* grad = p.grad + (int64_t)f * p.v;
    const float nll = ctc_nll(A, T, S);
    const bool finite = nll < strata_bits_float(0x7f800000u) && nll == nll;
    if (!finite) {
        const bool impossible = nll == strata_bits_float(0x7f800000u);
        const float fill = impossible && p.zero_infinity ? 0.0f : strata_bits_float(0x7fc00000u);
        for (int c = lane; c < p.v; c += 32) grad[c] = fill;
        return;
    }
    const float weight = p.mean ? 1.0f / (float)((U > 1 ? U : 1) * p.n) : 1.0f;
    const float* a = A + (int64_t)t * S;
    const float* b = B + (int64_t)t * S;
    for (int c = lane; c < p.v; c += 32) grad[c] = 0.0f;
    __syncwarp();  // the zeros land before the lanes that own a class overwrite them
    // The blank: even s (fixed reduction tree: deterministic).
    float m = ninf;
    for (int s = 2 * lane; s < S; s += 64) m = fmaxf(m, a[s] + b[s]);
    m = warp_max(m);
    if (m != ninf) {
        float sum = 0.0f;
        for (int s = 2 * lane; s < S; s += 64) sum += expf(a[s] + b[s] - m);
        sum = warp_sum(sum);
        if (lane == 0) grad[p.blank] = -expf(m + logf(sum) - lp[p.blank] + nll) * weight;
    }
    // Each distinct label: its occurrences s = 2j + 1, in target order.
    for (int i = lane; i < U; i += 32) {
        if (!p.first[g0 + i]) continue;
        float acc = ninf;
        for (int j = i; j != -1; j = p.next_same[g0 + j]) acc = ctc_lse2(acc, a[2 * j + 1] + b[2 * j + 1]);
        if (acc != ninf) {
            const int c = p.targets[g0 + i];
            grad[c] = -expf(acc - lp[c] + nll) * weight;
        }
    }
}
STRATA_EMU_ENTRY(ctc_grad, CtcParams)
