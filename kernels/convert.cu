// strata/kernels/convert.cu: dtype conversion on the device, fp32 -> bf16 (round to nearest even,
// as half::bf16::from_f32), for fp32 gradients entering a tensor-core backward (e.g. the logit
// gradient into the PR head's output Linear).
#ifndef STRATA_COMMON_INCLUDED
#include "common.cuh"
#endif

struct CastParams {
    const float* x;
    bf16* y;
    int64_t n;
};

extern "C" __global__ void cast_f32_to_bf16(const CastParams p) {
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < p.n; i += (int64_t)gridDim.x * blockDim.x)
        p.y[i] = float_to_bf16(p.x[i]);
}
STRATA_EMU_ENTRY(cast_f32_to_bf16, CastParams)
