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

extern "C" __global__ void cast_f32_to_bf16(const CastParams p) {
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < p.n; i += (int64_t)gridDim.x * blockDim.x)
        p.y[i] = float_to_bf16(p.scale == 1.0f ? p.x[i] : p.scale * p.x[i]);
}
STRATA_EMU_ENTRY(cast_f32_to_bf16, CastParams)

struct WidenParams {
    const bf16* x;
    float* y;
    int64_t n;
};

extern "C" __global__ void cast_bf16_to_f32(const WidenParams p) {
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < p.n; i += (int64_t)gridDim.x * blockDim.x)
        p.y[i] = bf16_to_float(p.x[i]);
}
STRATA_EMU_ENTRY(cast_bf16_to_f32, WidenParams)
