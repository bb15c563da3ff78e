// strata/kernels/elementwise.cu: small fp32 glue of the device step, each with a plain CPU
// equivalent (src/ops/activation.rs for the activations):
// - add_rows: y[r, c] = a[r, c] (+ b[r, c]) (+ v[c]): residual adds and a broadcast row.
// - add_grads: y = a + b, each fp32 or bf16: two uses' gradients of one value.
// - col_sum_accumulate: out[c] += sum over rows r of x[r, c] in a fixed order (16 warps each a
//   residue class of the rows, then in warp order: deterministic): a parameter's gradient from
//   per-row contributions (CLS pooling's shared token).
// - activation_forward / activation_backward: ReLU, or exact GELU x * Phi(x) with d/dx =
//   Phi(x) + x * phi(x).
#ifndef STRATA_COMMON_INCLUDED
#include "common.cuh"
#endif

struct AddRowsParams {
    const float* a;  // [rows, c]
    const float* b;  // [rows, c] or null
    const float* v;  // [c] or null
    float* y;        // [rows, c]
    int64_t rows;
    int c;
};

extern "C" __global__ void add_rows(const AddRowsParams p) {
    const int64_t total = p.rows * p.c;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += (int64_t)gridDim.x * blockDim.x) {
        float y = p.a[i];
        if (p.b) y += p.b[i];
        if (p.v) y += p.v[i % p.c];
        p.y[i] = y;
    }
}
STRATA_EMU_ENTRY(add_rows, AddRowsParams)

// add_grads: y = a + b in fp32, each of a and b fp32 or bf16 (widened exactly): where the device
// tape sums a value's gradients from two uses (CLS pooling's normalized stack feeds its K and V
// projections, whose bf16 dx are 208,000 x 768 each at 32 x 500 frames). Two casts and an fp32
// add read and wrote three times as much.
struct AddGradsParams {
    const void* a;  // [n] fp32, or bf16 when a_bf16
    const void* b;
    float* y;       // [n]
    int64_t n;
    int a_bf16, b_bf16;
};

// 4 values a thread, the last n % 4 one by one.
extern "C" __global__ void add_grads(const AddGradsParams p) {
    for (int64_t i = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) * 4; i < p.n; i += (int64_t)gridDim.x * blockDim.x * 4) {
        if (i + 4 <= p.n) {
            const float4_t a = load4_f32_or_bf16(p.a, p.a_bf16, i), b = load4_f32_or_bf16(p.b, p.b_bf16, i);
            store_float4(p.y + i, float4_t{a.x + b.x, a.y + b.y, a.z + b.z, a.w + b.w});
        } else {
            for (int64_t k = i; k < p.n; ++k) p.y[k] = load_f32_or_bf16(p.a, p.a_bf16, k) + load_f32_or_bf16(p.b, p.b_bf16, k);
        }
    }
}
STRATA_EMU_ENTRY(add_grads, AddGradsParams)

struct ColSumParams {
    const float* x;  // [rows, c]
    float* out;      // [c], accumulated
    int64_t rows;
    int c;
};

// A block of COL_SUM_WARPS warps per 32 columns: lane = column, warp w sums rows w, w + 16, ...
// in order, then the warps' sums are added in warp order (a fixed order: deterministic). One thread
// per column had walked every row alone (CLS pooling's 16,000 frames, five times a step).
#define COL_SUM_WARPS 16
extern "C" __global__ void col_sum_accumulate(const ColSumParams p) {
    __shared__ float sums[COL_SUM_WARPS][32];
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    const int col = blockIdx.x * 32 + lane;
    float s = 0.0f;
    if (col < p.c) {
        for (int64_t r = w; r < p.rows; r += COL_SUM_WARPS) s += p.x[r * p.c + col];
    }
    sums[w][lane] = s;
    __syncthreads();
    if (w != 0 || col >= p.c) return;
    float t = 0.0f;
    for (int q = 0; q < COL_SUM_WARPS; ++q) t += sums[q][lane];
    p.out[col] += t;
}
STRATA_EMU_ENTRY(col_sum_accumulate, ColSumParams)

struct ActivationParams {
    const float* x;   // the pre-activation
    const float* dy;  // backward only
    float* y;         // forward: act(x); backward: dx
    int64_t n;
    int gelu;         // 0: ReLU, 1: exact GELU
};

extern "C" __global__ void activation_forward(const ActivationParams p) {
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < p.n; i += (int64_t)gridDim.x * blockDim.x) {
        const float x = p.x[i];
        p.y[i] = p.gelu ? x * 0.5f * (1.0f + erff(x * 0.70710678118654752f)) : fmaxf(x, 0.0f);
    }
}
STRATA_EMU_ENTRY(activation_forward, ActivationParams)

extern "C" __global__ void activation_backward(const ActivationParams p) {
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < p.n; i += (int64_t)gridDim.x * blockDim.x) {
        const float x = p.x[i];
        float d;
        if (p.gelu) {
            const float cdf = 0.5f * (1.0f + erff(x * 0.70710678118654752f));
            const float pdf = expf(-0.5f * x * x) * 0.39894228040143268f;
            d = cdf + x * pdf;
        } else {
            d = x > 0.0f ? 1.0f : 0.0f;
        }
        p.y[i] = p.dy[i] * d;
    }
}
STRATA_EMU_ENTRY(activation_backward, ActivationParams)
