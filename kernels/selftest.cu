// strata/kernels/selftest.cu: kernels that test the kernel machinery itself (warp shuffles, block
// reductions, barrier semantics) on the emulator and on the GPU. `selftest_divergent_barrier` is
// deliberately broken (half the block waits at __syncthreads while the other half waits in a warp
// shuffle their warp never completes): only the emulator runs it, to show that such a bug becomes
// an error instead of a hang. (Threads that EXIT do not block a barrier, as on Volta and later.)
#ifndef STRATA_COMMON_INCLUDED
#include "common.cuh"
#endif

struct SelftestParams {
    const float* in;
    float* out;
    int n;
};

// out[4i..4i+4] for thread i: xor-shuffle partner's value, shuffle-down by 3, warp sum, block sum.
extern "C" __global__ void selftest_collectives(const SelftestParams a) {
    __shared__ float scratch[32];
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    const float v = i < a.n ? a.in[i] : 0.0f;
    const float x = __shfl_xor_sync(0xffffffffu, v, 5);
    const float d = __shfl_down_sync(0xffffffffu, v, 3);
    const float w = warp_sum(v);
    const float b = block_sum(v, scratch);
    if (i < a.n) {
        a.out[4 * i + 0] = x;
        a.out[4 * i + 1] = d;
        a.out[4 * i + 2] = w;
        a.out[4 * i + 3] = b;
    }
}
STRATA_EMU_ENTRY(selftest_collectives, SelftestParams)

extern "C" __global__ void selftest_divergent_barrier(const SelftestParams a) {
    float v = (float)threadIdx.x;
    if (threadIdx.x % 2 == 0) {
        __syncthreads();
    } else {
        v = __shfl_xor_sync(0xffffffffu, v, 2);
    }
    if (threadIdx.x == 0) a.out[0] = v;
}
STRATA_EMU_ENTRY(selftest_divergent_barrier, SelftestParams)
