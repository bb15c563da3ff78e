// strata/kernels/dropout.cu: seeded inverted dropout, y = x * keep(seed, i) * scale. The keep
// decision is the CPU's exactly (src/ops/dropout.rs): SplitMix64's finaliser over (seed, index),
// its top 53 bits as a double in [0, 1) compared with p; scale = 1 / (1 - p) rounded to f32 on the
// host. So the GPU's mask is bit-identical to the CPU's, needs no storage, and the backward is the
// same kernel applied to dy.
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

__device__ __forceinline__ bool dropout_keep(unsigned long long seed, unsigned long long i, double p) {
    unsigned long long z = seed ^ (i * 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    const double u = (double)(z >> 11) * (1.0 / 9007199254740992.0);
    return u >= p;
}

extern "C" __global__ void dropout_apply(const DropoutParams a) {
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < a.n; i += (int64_t)gridDim.x * blockDim.x) {
        a.y[i] = dropout_keep(a.seed, (unsigned long long)i, a.p) ? a.x[i] * a.scale : 0.0f;
    }
}
STRATA_EMU_ENTRY(dropout_apply, DropoutParams)
