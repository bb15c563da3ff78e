// strata/kernels/ctc.cu: CTC loss and its gradient in log space, one block per utterance, with
// PyTorch's ctc_loss semantics (blank index, 'mean' / 'sum', zero_infinity). CPU reference:
// src/ops/ctc.rs (the same recursions and log-sum-exp formula per cell).
//
// Inputs are packed: log_probs [frames, v] with input_offsets (cu_seqlens), targets concatenated
// with target_offsets. Per utterance: alpha over (t, s) of the extended target (blank, l1, blank,
// ..., blank; S = 2U + 1) goes to a global scratch block (each block finds its offset from the
// lengths), two rows of it and of beta live in shared memory. Backward walks t downwards: beta row,
// then e(s) = alpha_t(s) + beta_t(s), then the gradient row:
//   d nll / d lp[t, c] = -exp(lse_{s: ext(s) = c} e(s) - lp[t, c] + nll)     (0 where c is absent)
// times the reduction weight (1 / (max(U, 1) N) for 'mean', 1 for 'sum'). The blank's lse is a
// block reduction over the even s (max, then the sum of exponentials: the CPU chains lse2 instead,
// so the two differ by rounding); a label's lse walks its occurrences in target order (a chain
// from its first occurrence), the CPU's accumulation order. Deterministic.
// An impossible alignment (nll = inf): zero_infinity gives loss 0 and gradient 0; otherwise the
// loss is inf and the gradient NaN, as the CPU reference.
#ifndef STRATA_COMMON_INCLUDED
#include "common.cuh"
#endif

#define CTC_MAX_TARGET 1024
#define CTC_MAX_S (2 * CTC_MAX_TARGET + 1)
#define CTC_THREADS 256

struct CtcParams {
    const float* lp;
    const int* input_offsets;
    const int* targets;
    const int* target_offsets;
    float* alpha;  // scratch: sum over utterances of T_u * S_u floats
    float* nll;    // [n], after zero_infinity (unweighted)
    float* grad;   // [frames, v]
    int n, v, blank, mean, zero_infinity;
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

extern "C" __global__ void ctc_loss_fwd_bwd(const CtcParams p) {
    __shared__ int tgt[CTC_MAX_TARGET];
    __shared__ int next_same[CTC_MAX_TARGET];
    __shared__ int is_first[CTC_MAX_TARGET];
    __shared__ float row[2][CTC_MAX_S];
    __shared__ float e[CTC_MAX_S];
    __shared__ float red[32];
    __shared__ float nll_s;
    const int u = blockIdx.x, tid = threadIdx.x, nt = blockDim.x;
    const int t0 = p.input_offsets[u], T = p.input_offsets[u + 1] - t0;
    const int g0 = p.target_offsets[u], U = p.target_offsets[u + 1] - g0, S = 2 * U + 1;
    const float ninf = ctc_ninf();
    int64_t base = 0;
    for (int i = 0; i < u; ++i) {
        const int ti = p.input_offsets[i + 1] - p.input_offsets[i];
        const int ui = p.target_offsets[i + 1] - p.target_offsets[i];
        base += (int64_t)ti * (2 * ui + 1);
    }
    float* A = p.alpha + base;
    const float* lp = p.lp + (int64_t)t0 * p.v;
    float* grad = p.grad + (int64_t)t0 * p.v;
    for (int i = tid; i < U; i += nt) tgt[i] = p.targets[g0 + i];
    __syncthreads();
    for (int i = tid; i < U; i += nt) {
        int nx = -1, first = 1;
        for (int j = U - 1; j > i; --j)
            if (tgt[j] == tgt[i]) nx = j;
        for (int j = 0; j < i && first; ++j)
            if (tgt[j] == tgt[i]) first = 0;
        next_same[i] = nx;
        is_first[i] = first;
    }
    __syncthreads();
#define CTC_EXT(s) (((s) % 2 == 0) ? p.blank : tgt[(s) / 2])
#define CTC_SKIP(s) ((s) >= 2 && (s) % 2 == 1 && tgt[(s) / 2] != tgt[(s) / 2 - 1])
    // alpha
    for (int s = tid; s < S; s += nt) {
        const float a = s == 0 ? lp[p.blank] : (s == 1 ? lp[CTC_EXT(1)] : ninf);
        row[0][s] = a;
        A[s] = a;
    }
    __syncthreads();
    for (int t = 1; t < T; ++t) {
        const float* prev = row[(t - 1) & 1];
        float* cur = row[t & 1];
        for (int s = tid; s < S; s += nt) {
            const float a = prev[s];
            const float b = s >= 1 ? prev[s - 1] : ninf;
            const float c = CTC_SKIP(s) ? prev[s - 2] : ninf;
            const float v = ctc_lse3(a, b, c) + lp[(int64_t)t * p.v + CTC_EXT(s)];
            cur[s] = v;
            A[(int64_t)t * S + s] = v;
        }
        __syncthreads();
    }
    if (tid == 0) {
        const float* last = row[(T - 1) & 1];
        nll_s = -(S > 1 ? ctc_lse2(last[S - 1], last[S - 2]) : last[0]);
    }
    __syncthreads();
    const float nll = nll_s;
    const bool finite = nll < strata_bits_float(0x7f800000u) && nll == nll;
    if (!finite) {
        const float fill = p.zero_infinity ? 0.0f : strata_bits_float(0x7fc00000u);
        for (int64_t i = tid; i < (int64_t)T * p.v; i += nt) grad[i] = fill;
        if (tid == 0) p.nll[u] = p.zero_infinity ? 0.0f : nll;
        return;
    }
    if (tid == 0) p.nll[u] = nll;
    const float weight = p.mean ? 1.0f / (float)((U > 1 ? U : 1) * p.n) : 1.0f;
    // beta, and the gradient row by row
    for (int t = T - 1; t >= 0; --t) {
        float* cur = row[t & 1];
        const float* next = row[(t + 1) & 1];
        for (int s = tid; s < S; s += nt) {
            float b;
            if (t == T - 1) {
                b = (s == S - 1 || s == S - 2) ? lp[(int64_t)t * p.v + CTC_EXT(s)] : ninf;
            } else {
                const float x = next[s];
                const float y = s + 1 < S ? next[s + 1] : ninf;
                const float z = (s + 2 < S && CTC_SKIP(s + 2)) ? next[s + 2] : ninf;
                b = ctc_lse3(x, y, z) + lp[(int64_t)t * p.v + CTC_EXT(s)];
            }
            cur[s] = b;
            e[s] = A[(int64_t)t * S + s] + b;
        }
        for (int c = tid; c < p.v; c += nt) grad[(int64_t)t * p.v + c] = 0.0f;
        __syncthreads();
        // The blank: a block log-sum-exp over the even s (fixed reduction tree: deterministic).
        float m = ninf;
        for (int s = 2 * tid; s < S; s += 2 * nt) m = fmaxf(m, e[s]);
        m = block_max(m, red);
        if (m != ninf) {
            float sum = 0.0f;
            for (int s = 2 * tid; s < S; s += 2 * nt) sum += expf(e[s] - m);
            sum = block_sum(sum, red);
            if (tid == 0) {
                const float l = lp[(int64_t)t * p.v + p.blank];
                grad[(int64_t)t * p.v + p.blank] = -expf(m + logf(sum) - l + nll) * weight;
            }
        }
        for (int i = tid; i < U; i += nt) {
            if (!is_first[i]) continue;
            float acc = ninf;
            for (int j = i; j != -1; j = next_same[j]) acc = ctc_lse2(acc, e[2 * j + 1]);
            if (acc != ninf) {
                const int c = tgt[i];
                grad[(int64_t)t * p.v + c] = -expf(acc - lp[(int64_t)t * p.v + c] + nll) * weight;
            }
        }
        __syncthreads();
    }
#undef CTC_EXT
#undef CTC_SKIP
}
STRATA_EMU_ENTRY(ctc_loss_fwd_bwd, CtcParams)
