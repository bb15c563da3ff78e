// strata/kernels/layernorm.cu: LayerNorm over the last dimension (biased variance, eps inside the
// square root), optional affine weight / bias. CPU reference: src/ops/layernorm.rs.
// Forward: one block per row, two-pass mean / variance in fp32, mean and rstd saved; x and y fp32
// or bf16.
// Backward: one block per row for dx (rstd * (g - mean(g) - xhat * mean(g * xhat)), g = dy * w);
// the affine gradients sum dy * xhat and dy over rows: each block adds its rows in order into its
// own partial row, then layernorm_param_reduce adds the partials (8 warps a column block, each a
// residue class of the partials, in a fixed order). Deterministic.
// layernorm_rows_bf16: s3prl's `normalize` of a frozen hidden-state stack (no affine, eps 1e-5),
// bf16 in and out, one warp per row; no backward (nothing upstream of it trains).
#ifndef STRATA_COMMON_INCLUDED
#include "common.cuh"
#endif

#define LN_ROWS_PER_BLOCK 8

// x and y each fp32 or bf16 (x_bf16, y_bf16): CLS pooling normalizes the bf16 stack's rows
// straight into the bf16 its projections read, where a cast to fp32 before and one to bf16 after
// moved five times the bytes. The math is fp32 either way (a bf16 x widened exactly, y rounded
// once at the store): the same values as those casts around an fp32 LayerNorm.
struct LayerNormFwdParams {
    const void* x;   // [rows, d]
    const float* w;  // [d] or null
    const float* b;  // [d] or null
    void* y;         // [rows, d]
    float* mean;     // [rows]
    float* rstd;     // [rows]
    int rows, d;
    float eps;
    int x_bf16, y_bf16;
};

struct LayerNormBwdParams {
    const void* x;   // [rows, d], fp32 or bf16 (x_bf16)
    const float* w;  // [d] or null (no affine)
    const float* dy;
    const float* mean;
    const float* rstd;
    float* dx;       // [rows, d], or null: only the affine parameters' gradients
    float* partial;  // [blocks, 2 d]: sum dy * xhat, sum dy over the block's rows (affine only)
    int rows, d;
    int x_bf16;
};

struct LayerNormReduceParams {
    const float* partial;
    float* dw;  // [d], accumulated
    float* db;  // [d], accumulated
    int blocks, d;
};

extern "C" __global__ void layernorm_forward(const LayerNormFwdParams p) {
    __shared__ float red[32];
    const int64_t row = (int64_t)blockIdx.x * p.d;
    float s = 0.0f;
    for (int i = threadIdx.x; i < p.d; i += blockDim.x) s += load_f32_or_bf16(p.x, p.x_bf16, row + i);
    const float m = block_sum(s, red) / (float)p.d;
    float v = 0.0f;
    for (int i = threadIdx.x; i < p.d; i += blockDim.x) {
        const float c = load_f32_or_bf16(p.x, p.x_bf16, row + i) - m;
        v += c * c;
    }
    const float rs = 1.0f / sqrtf(block_sum(v, red) / (float)p.d + p.eps);
    for (int i = threadIdx.x; i < p.d; i += blockDim.x) {
        const float xh = (load_f32_or_bf16(p.x, p.x_bf16, row + i) - m) * rs;
        const float y = p.w ? xh * p.w[i] + p.b[i] : xh;
        if (p.y_bf16) {
            ((bf16*)p.y)[row + i] = float_to_bf16(y);
        } else {
            ((float*)p.y)[row + i] = y;
        }
    }
    if (threadIdx.x == 0) {
        p.mean[blockIdx.x] = m;
        p.rstd[blockIdx.x] = rs;
    }
}
STRATA_EMU_ENTRY(layernorm_forward, LayerNormFwdParams)

extern "C" __global__ void layernorm_backward(const LayerNormBwdParams p) {
    __shared__ float red[32];
    const int r_stop = (int)(blockIdx.x + 1) * LN_ROWS_PER_BLOCK;
    const int r_end = r_stop < p.rows ? r_stop : p.rows;
    float* part = p.partial ? p.partial + (int64_t)blockIdx.x * 2 * p.d : 0;
    if (part) {
        // Each thread zeroes exactly the columns it accumulates below: no cross-thread hazard.
        for (int i = threadIdx.x; i < p.d; i += blockDim.x) part[i] = part[p.d + i] = 0.0f;
    }
    for (int r = blockIdx.x * LN_ROWS_PER_BLOCK; r < r_end; ++r) {
        const int64_t row = (int64_t)r * p.d;
        const float* g = p.dy + row;
        float* dx = p.dx ? p.dx + row : 0;
        const float m = p.mean[r], rs = p.rstd[r];
        float sg = 0.0f, sgx = 0.0f;
        for (int i = threadIdx.x; i < p.d; i += blockDim.x) {
            const float xh = (load_f32_or_bf16(p.x, p.x_bf16, row + i) - m) * rs;
            const float gi = p.w ? g[i] * p.w[i] : g[i];
            sg += gi;
            sgx += gi * xh;
            if (part) {
                part[i] += g[i] * xh;  // column i belongs to this thread: rows add in order
                part[p.d + i] += g[i];
            }
        }
        // No dx (an input that needs no gradient, e.g. the frozen stack CLS pooling normalizes):
        // only the parameters' partials. p.dx is the same for every thread: no divergent barrier.
        if (!p.dx) continue;
        const float mg = block_sum(sg, red) / (float)p.d;
        const float mgx = block_sum(sgx, red) / (float)p.d;
        for (int i = threadIdx.x; i < p.d; i += blockDim.x) {
            const float xh = (load_f32_or_bf16(p.x, p.x_bf16, row + i) - m) * rs;
            const float gi = p.w ? g[i] * p.w[i] : g[i];
            dx[i] = rs * (gi - mg - xh * mgx);
        }
    }
}
STRATA_EMU_ENTRY(layernorm_backward, LayerNormBwdParams)

// A block of 8 warps per 32 columns (common.cuh's frames_column_sum over the partial rows): lane =
// column, warp w sums the partials w, w + 8, ... in order, the warps' sums then in warp order
// (deterministic). One thread per column had walked all rows / 8 partials alone, one block for
// d = 256: latency-bound (the ML-SUPERB head's five LayerNorms over 7,904 rows, 988 partials each).
extern "C" __global__ void layernorm_param_reduce(const LayerNormReduceParams p) {
    __shared__ float sums[FRAME_SUM_WARPS][32];
    const int i = blockIdx.x * 32 + (threadIdx.x & 31);
    const bool valid = i < p.d;
    const float sw = frames_column_sum(0, p.blocks, valid, [&](int k) { return p.partial[(int64_t)k * 2 * p.d + i]; }, sums);
    const float sb =
        frames_column_sum(0, p.blocks, valid, [&](int k) { return p.partial[(int64_t)k * 2 * p.d + p.d + i]; }, sums);
    if (threadIdx.x >= 32 || !valid) return;
    p.dw[i] += sw;
    p.db[i] += sb;
}
STRATA_EMU_ENTRY(layernorm_param_reduce, LayerNormReduceParams)

struct LayerNormRowsParams {
    const bf16* x;
    bf16* y;
    int64_t rows;
    int d;
    float eps;
};

#define LN_ROWS_WARPS 8
extern "C" __global__ void layernorm_rows_bf16(const LayerNormRowsParams p) {
    const int lane = threadIdx.x & 31;
    const int64_t row = (int64_t)blockIdx.x * LN_ROWS_WARPS + (threadIdx.x >> 5);
    if (row >= p.rows) return;  // whole warps leave: no block barrier below
    const bf16* x = p.x + row * p.d;
    bf16* y = p.y + row * p.d;
    float m, rs;
    warp_row_stats_bf16(x, p.d, p.eps, &m, &rs);
    for (int i = lane; i < p.d; i += 32) y[i] = float_to_bf16((bf16_to_float(x[i]) - m) * rs);
}
STRATA_EMU_ENTRY(layernorm_rows_bf16, LayerNormRowsParams)
