// strata/kernels/dropout.cu: seeded inverted dropout, y = x * keep(seed, i) * scale. The keep
// decision is the CPU's exactly (src/ops/dropout.rs): SplitMix64's finaliser over (seed, index),
// its top 53 bits as a double in [0, 1) compared with p; scale = 1 / (1 - p) rounded to f32 on the
// host. So the GPU's mask is bit-identical to the CPU's, needs no storage, and the backward is the
// same kernel applied to dy. (dropout_keep lives in common.cuh: the attention kernels share it.)
#ifndef STRATA_COMMON_INCLUDED
#include "common.cuh"
#endif

struct DropoutParams {
    const float* x;
    float* y;
    int64_t n;
    unsigned long long seed;
    double p;
    float scale;
};

extern "C" __global__ void dropout_apply(const DropoutParams a) {
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < a.n; i += (int64_t)gridDim.x * blockDim.x) {
        a.y[i] = dropout_keep(a.seed, (unsigned long long)i, a.p) ? a.x[i] * a.scale : 0.0f;
    }
}
STRATA_EMU_ENTRY(dropout_apply, DropoutParams)
