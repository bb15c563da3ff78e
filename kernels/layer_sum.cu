// strata/kernels/layer_sum.cu: the WeightedSum interface, fused. CPU reference: src/ops/layer_sum.rs
// (and src/ops/layernorm.rs for the optional per-layer norm).
//
// Stack x: frame-major bf16 [n, L, D]. Layers first..first+k are summed with softmax(w) weights.
// The output (and, in backward, its gradient) may be a column slice of a wider row-major matrix
// (a row stride above D): GroupWS writes each group's sum straight into its place in the
// concatenation that its projection reads.
// Forward: one block per frame; optional no-affine LayerNorm of each layer row (eps 1e-5, biased
// variance) computed on the fly, its mean/rstd saved for backward; fp32 accumulation, bf16 out.
// With the norm (D % 8 == 0) the frame's rows are first staged in shared memory, so that the
// statistics and the sum read the stack once between them.
// Backward: dp[j] = sum_d dout * xhat summed over each block's run of frames, one partial per
// block and layer, then one block reduces the partials in fixed order and applies the softmax Jacobian:
// deterministic. The stack gradient (for a trainable upstream) is optional: with it,
// layer_sum_backward (a warp per layer); without it (a frozen stack) and D % 8 == 0,
// layer_sum_backward_dw (a thread per 8-column chunk, the forward's access pattern).
// Per-layer reductions (norm statistics, dp) give each warp its own layers (j = warp, warp +
// warps, ...) and reduce with shuffles only: no block-wide barrier per layer. Rows are read 8 bf16
// (16 bytes) per load when D % 8 == 0. The forward's and the warp-per-layer backward's blocks are a
// whole number of warps.
#ifndef STRATA_COMMON_INCLUDED
#include "common.cuh"
#endif

struct LayerSumFwdParams {
    const bf16* x;
    const float* w;
    bf16* out;    // row f at out + f * out_stride (out_stride >= D: a column slice of a wider matrix)
    float* mean;  // [n, k] when normalize
    float* rstd;  // [n, k] when normalize
    int n, L, D, first, k, normalize, out_stride;
    // 1: the frame's k rows are read once into dynamic shared memory (k * D bf16), and the norm's
    // statistics and the sum read them there (normalize with D % 8 == 0: one read of the stack).
    int staged;
};

struct LayerSumBwdParams {
    const bf16* x;
    const float* w;
    const float* dout;  // [n, D] fp32, row f at dout + f * dout_stride
    const float* mean;
    const float* rstd;
    float* partial;  // [k, blocks]: each block's dp
    float* dx;       // [n, L, D] fp32 or null
    int n, L, D, first, k, normalize, dout_stride;
    int frames_per_block;  // block b takes frames b * frames_per_block ..
};

struct LayerSumReduceParams {
    const float* partial;  // [k, n]
    const float* w;
    float* dw;  // [k], accumulated (+=) like every parameter gradient
    int n, k;   // n: the backward's block count
};

// softmax(w) into shared memory (k is small: one thread does it, others wait).
__device__ __forceinline__ void layer_softmax(const float* w, int k, float* p) {
    if (threadIdx.x == 0) {
        float m = w[0];
        for (int j = 1; j < k; ++j) m = fmaxf(m, w[j]);
        float s = 0.0f;
        for (int j = 0; j < k; ++j) {
            p[j] = expf(w[j] - m);
            s += p[j];
        }
        for (int j = 0; j < k; ++j) p[j] = p[j] / s;
    }
    __syncthreads();
}

#define STRATA_MAX_LAYERS 64
// Backward: each block sums the dp of its run of frames (the host's frames_per_block) in order and
// writes one partial per layer, so the one-block reduction reads n / frames_per_block values per
// layer. The warp-per-layer kernel takes 8 frames a block (2000 blocks of 4 warps at 16000
// frames); the weight-gradient kernel one wave of blocks (see layer_sum_backward_dw).

// Mean and rstd (biased variance, eps 1e-5) of a staged row of D bf16 (D % 8 == 0), by one warp:
// each lane sums its 8-element chunks, then the warp; two passes over shared memory.
__device__ __forceinline__ void warp_row_stats_staged(const bf16* row, int D, float* mean, float* rstd) {
    const int lane = threadIdx.x & 31;
    float s = 0.0f;
    for (int c = lane; c < D / 8; c += 32) {
        float v[8];
        unpack_bf16x8(load_bf16x8(row + 8 * c), v);
        for (int e = 0; e < 8; ++e) s += v[e];
    }
    const float m = warp_sum(s) / (float)D;
    float q = 0.0f;
    for (int c = lane; c < D / 8; c += 32) {
        float v[8];
        unpack_bf16x8(load_bf16x8(row + 8 * c), v);
        for (int e = 0; e < 8; ++e) q += (v[e] - m) * (v[e] - m);
    }
    *mean = m;
    *rstd = 1.0f / sqrtf(warp_sum(q) / (float)D + 1e-5f);
}

extern "C" __global__ void layer_sum_forward(const LayerSumFwdParams a) {
    __shared__ float p[STRATA_MAX_LAYERS];
    __shared__ float mu[STRATA_MAX_LAYERS];
    __shared__ float rs[STRATA_MAX_LAYERS];
    const int f = blockIdx.x;
    const bf16* frame = a.x + (int64_t)f * a.L * a.D;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    const bool vec8 = (a.D & 7) == 0;
    // Staged: the k rows (contiguous in the frame) copied once with cp.async, all in flight at once;
    // the barrier in layer_softmax publishes them. `rows` then points at them instead of the stack.
    STRATA_DYNAMIC_SMEM(bf16, staged);
    const bf16* rows = frame + (int64_t)a.first * a.D;
    if (a.staged) {
        if (!dynamic_smem_holds((uint32_t)(a.k * a.D * 2))) return;
        for (int c = threadIdx.x; c < a.k * a.D / 8; c += blockDim.x) cp_async16(staged + 8 * c, rows + 8 * c, true);
        cp_async_commit();
        cp_async_wait<0>();
        rows = staged;
    }
    layer_softmax(a.w, a.k, p);
    if (a.normalize) {
        for (int j = warp; j < a.k; j += warps) {
            float m, r;
            if (a.staged)
                warp_row_stats_staged(rows + (int64_t)j * a.D, a.D, &m, &r);
            else
                warp_row_stats_bf16(rows + (int64_t)j * a.D, a.D, 1e-5f, &m, &r);
            if (lane == 0) {
                mu[j] = m;
                rs[j] = r;
                a.mean[(int64_t)f * a.k + j] = m;
                a.rstd[(int64_t)f * a.k + j] = r;
            }
        }
        __syncthreads();
    }
    if (vec8) {
        for (int c = threadIdx.x; c < a.D / 8; c += blockDim.x) {
            float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
            for (int j = 0; j < a.k; ++j) {
                float v[8];
                unpack_bf16x8(load_bf16x8(rows + (int64_t)j * a.D + 8 * c), v);
                const float pj = p[j];
                const float m = a.normalize ? mu[j] : 0.0f;
                const float r = a.normalize ? rs[j] : 1.0f;
                for (int e = 0; e < 8; ++e) {
                    const float x = a.normalize ? (v[e] - m) * r : v[e];
                    acc[e] += pj * x;
                }
            }
            store_bf16x8(a.out + (int64_t)f * a.out_stride + 8 * c, pack_bf16x8(acc));
        }
        return;
    }
    for (int d = threadIdx.x; d < a.D; d += blockDim.x) {
        float acc = 0.0f;
        for (int j = 0; j < a.k; ++j) {
            float v = bf16_to_float(frame[(int64_t)(a.first + j) * a.D + d]);
            if (a.normalize) v = (v - mu[j]) * rs[j];
            acc += p[j] * v;
        }
        a.out[(int64_t)f * a.out_stride + d] = float_to_bf16(acc);
    }
}
STRATA_EMU_ENTRY(layer_sum_forward, LayerSumFwdParams)

extern "C" __global__ void layer_sum_backward(const LayerSumBwdParams a) {
    __shared__ float p[STRATA_MAX_LAYERS];
    __shared__ float dp_block[STRATA_MAX_LAYERS];
    // The current frame's dout row, staged once and read by every warp (dynamic shared memory of D
    // floats when D % 8 == 0 and D <= 4096, which takes this path).
    STRATA_DYNAMIC_SMEM(float4_t, gs);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    const bool vec8 = (a.D & 7) == 0 && a.D <= 4096;
    for (int j = threadIdx.x; j < a.k; j += blockDim.x) dp_block[j] = 0.0f;
    layer_softmax(a.w, a.k, p);  // its barrier also publishes dp_block's zeros
    const int64_t f_stop = (int64_t)(blockIdx.x + 1) * a.frames_per_block;
    const int f_end = f_stop < a.n ? (int)f_stop : a.n;
    for (int f = blockIdx.x * a.frames_per_block; f < f_end; ++f) {
        const bf16* frame = a.x + (int64_t)f * a.L * a.D;
        const float* g = a.dout + (int64_t)f * a.dout_stride;
        if (vec8) {
            for (int c = threadIdx.x; c < a.D / 4; c += blockDim.x) gs[c] = load_float4(g + 4 * c);
            __syncthreads();
        }
        for (int j = warp; j < a.k; j += warps) {
            const bf16* row = frame + (int64_t)(a.first + j) * a.D;
            const float m = a.normalize ? a.mean[(int64_t)f * a.k + j] : 0.0f;
            const float r = a.normalize ? a.rstd[(int64_t)f * a.k + j] : 1.0f;
            float s = 0.0f;
            if (vec8) {
                for (int c = lane; c < a.D / 8; c += 32) {
                    float v[8];
                    unpack_bf16x8(load_bf16x8(row + 8 * c), v);
                    const float4_t g0 = gs[2 * c], g1 = gs[2 * c + 1];
                    s += g0.x * ((v[0] - m) * r) + g0.y * ((v[1] - m) * r) + g0.z * ((v[2] - m) * r) + g0.w * ((v[3] - m) * r);
                    s += g1.x * ((v[4] - m) * r) + g1.y * ((v[5] - m) * r) + g1.z * ((v[6] - m) * r) + g1.w * ((v[7] - m) * r);
                }
            } else {
                for (int d = lane; d < a.D; d += 32) s += g[d] * ((bf16_to_float(row[d]) - m) * r);
            }
            const float dp = warp_sum(s);
            // Layer j belongs to this warp alone: frames add in order, no race, deterministic.
            if (lane == 0) dp_block[j] += dp;
            if (a.dx) {
                float* dxr = a.dx + ((int64_t)f * a.L + a.first + j) * a.D;
                if (!a.normalize) {
                    for (int d = lane; d < a.D; d += 32) dxr[d] = p[j] * g[d];
                } else {
                    // LayerNorm backward of gy = p_j * dout: rstd * (gy - mean(gy) - xhat * mean(gy * xhat)).
                    float sg = 0.0f, sgx = 0.0f;
                    for (int d = lane; d < a.D; d += 32) {
                        const float xh = (bf16_to_float(row[d]) - m) * r;
                        sg += p[j] * g[d];
                        sgx += p[j] * g[d] * xh;
                    }
                    const float mg = warp_sum(sg) / (float)a.D;
                    const float mgx = warp_sum(sgx) / (float)a.D;
                    for (int d = lane; d < a.D; d += 32) {
                        const float xh = (bf16_to_float(row[d]) - m) * r;
                        dxr[d] = r * (p[j] * g[d] - mg - xh * mgx);
                    }
                }
            }
        }
        if (vec8) __syncthreads();  // every warp is done with gs before the next frame restages it
    }
    __syncthreads();
    // Layer-major partials: the reduction reads each layer's run of blocks contiguously.
    for (int j = threadIdx.x; j < a.k; j += blockDim.x) a.partial[(int64_t)j * gridDim.x + blockIdx.x] = dp_block[j];
}
STRATA_EMU_ENTRY(layer_sum_backward, LayerSumBwdParams)

// Backward, weight gradient only (a frozen stack, D % 8 == 0): the forward's access pattern, for the
// bandwidth. Thread (c, r) of a block of C * R threads (C = D / 8) owns the 8-column chunk c of
// layers j = r, r + R, ... (at most LS_DW_LAYERS_PER_THREAD of them). Per frame it issues all of its
// 16-byte loads before using any, with no shuffle or barrier in the frame loop (the warp-per-layer
// kernel above waits on a reduction per layer and a barrier per frame), and adds each layer's dot
// product to a register, frames in order. At the end the block sums each layer over its chunks in
// fixed order (shared memory, k x C floats) into the same layer-major partials: deterministic.
// The host launches one wave: as many blocks as the GPU holds at once, each with an even share of
// the frames (2000 blocks of 8 frames were 5.05 waves on an H100 at HuBERT-Base's size, the last
// nearly empty, and 16 waves at Large's), so that no SM idles through a tail; its partials, and so
// the sums, depend on the GPU's SM count, not on the run.
#define LS_DW_LAYERS_PER_THREAD 8

extern "C" __global__ void layer_sum_backward_dw(const LayerSumBwdParams a) {
    STRATA_DYNAMIC_SMEM(float, chunk_dp);  // [k, C]
    const int chunks = a.D >> 3;
    const int groups = blockDim.x / chunks;
    const int c = threadIdx.x % chunks, r = threadIdx.x / chunks;
    float acc[LS_DW_LAYERS_PER_THREAD];
#pragma unroll
    for (int i = 0; i < LS_DW_LAYERS_PER_THREAD; ++i) acc[i] = 0.0f;
    const int64_t layer_step = (int64_t)groups * a.D;
    const int64_t f_stop = (int64_t)(blockIdx.x + 1) * a.frames_per_block;
    const int f_end = f_stop < a.n ? (int)f_stop : a.n;
    for (int f = blockIdx.x * a.frames_per_block; f < f_end; ++f) {
        const bf16* row = a.x + ((int64_t)f * a.L + a.first + r) * a.D + 8 * c;
        bf16x8 raw[LS_DW_LAYERS_PER_THREAD];
#pragma unroll
        for (int i = 0; i < LS_DW_LAYERS_PER_THREAD; ++i) {
            if (r + i * groups < a.k) raw[i] = load_bf16x8(row + i * layer_step);
        }
        const float* g = a.dout + (int64_t)f * a.dout_stride + 8 * c;
        const float4_t g0 = load_float4(g), g1 = load_float4(g + 4);
        const float gv[8] = {g0.x, g0.y, g0.z, g0.w, g1.x, g1.y, g1.z, g1.w};
#pragma unroll
        for (int i = 0; i < LS_DW_LAYERS_PER_THREAD; ++i) {
            const int j = r + i * groups;
            if (j < a.k) {
                float v[8];
                unpack_bf16x8(raw[i], v);
                const float m = a.normalize ? a.mean[(int64_t)f * a.k + j] : 0.0f;
                const float rs = a.normalize ? a.rstd[(int64_t)f * a.k + j] : 1.0f;
                float s = 0.0f;
                for (int e = 0; e < 8; ++e) s += gv[e] * ((v[e] - m) * rs);
                acc[i] += s;
            }
        }
    }
#pragma unroll
    for (int i = 0; i < LS_DW_LAYERS_PER_THREAD; ++i) {
        const int j = r + i * groups;
        if (j < a.k && r < groups) chunk_dp[j * chunks + c] = acc[i];
    }
    __syncthreads();
    // Whole warps only (a block of C * R threads may end in a partial warp, which has no work here).
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    for (int j = warp; j < a.k; j += warps) {
        float s = 0.0f;
        for (int cc = lane; cc < chunks; cc += 32) s += chunk_dp[j * chunks + cc];
        s = warp_sum(s);
        if (lane == 0) a.partial[(int64_t)j * gridDim.x + blockIdx.x] = s;
    }
}
STRATA_EMU_ENTRY(layer_sum_backward_dw, LayerSumBwdParams)

// One block: dp[j] = sum over the backward's blocks (fixed order), then dw += p * (dp - sum p dp).
extern "C" __global__ void layer_sum_reduce(const LayerSumReduceParams a) {
    __shared__ float p[STRATA_MAX_LAYERS];
    __shared__ float dp[STRATA_MAX_LAYERS];
    __shared__ float scratch[32];
    layer_softmax(a.w, a.k, p);
    for (int j = 0; j < a.k; ++j) {
        float s = 0.0f;
        for (int b = threadIdx.x; b < a.n; b += blockDim.x) s += a.partial[(int64_t)j * a.n + b];
        const float t = block_sum(s, scratch);
        if (threadIdx.x == 0) dp[j] = t;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        float dot = 0.0f;
        for (int j = 0; j < a.k; ++j) dot += p[j] * dp[j];
        for (int j = 0; j < a.k; ++j) a.dw[j] += p[j] * (dp[j] - dot);
    }
}
STRATA_EMU_ENTRY(layer_sum_reduce, LayerSumReduceParams)
