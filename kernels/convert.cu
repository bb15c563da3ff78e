// strata/kernels/convert.cu: dtype conversion on the device. fp32 -> bf16 (round to nearest even,
// as half::bf16::from_f32) with an optional scale, for fp32 gradients entering a tensor-core
// backward (the logit gradient into the head's output Linear, times 1 / micro-batches when
// gradients accumulate); bf16 -> fp32 (exact) for bf16 gradients entering an fp32 backward (mean
// pooling, the layer sums).
#ifndef STRATA_COMMON_INCLUDED
#include "common.cuh"
#endif

struct CastParams {
    const float* x;
    bf16* y;
    int64_t n;
    float scale;
};

// Both casts take 4 elements a thread (16-byte fp32 and 8-byte bf16 accesses; buffers start
// allocations, so every group of 4 is aligned), the last n % 4 one by one: 2-byte accesses left a
// warp's request at 64 bytes.
extern "C" __global__ void cast_f32_to_bf16(const CastParams p) {
    for (int64_t i = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) * 4; i < p.n; i += (int64_t)gridDim.x * blockDim.x * 4) {
        if (i + 4 <= p.n) {
            float4_t v = load_float4(p.x + i);
            if (p.scale != 1.0f) v = float4_t{p.scale * v.x, p.scale * v.y, p.scale * v.z, p.scale * v.w};
            store_bf16x4(p.y + i, pack_bf16x4(v));
        } else {
            for (int64_t k = i; k < p.n; ++k) p.y[k] = float_to_bf16(p.scale == 1.0f ? p.x[k] : p.scale * p.x[k]);
        }
    }
}
STRATA_EMU_ENTRY(cast_f32_to_bf16, CastParams)

struct WidenParams {
    const bf16* x;
    float* y;
    int64_t n;
};

extern "C" __global__ void cast_bf16_to_f32(const WidenParams p) {
    for (int64_t i = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) * 4; i < p.n; i += (int64_t)gridDim.x * blockDim.x * 4) {
        if (i + 4 <= p.n) {
            store_float4(p.y + i, unpack_bf16x4(load_bf16x4(p.x + i)));
        } else {
            for (int64_t k = i; k < p.n; ++k) p.y[k] = bf16_to_float(p.x[k]);
        }
    }
}
STRATA_EMU_ENTRY(cast_bf16_to_f32, WidenParams)
