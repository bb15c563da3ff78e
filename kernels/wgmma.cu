// strata/kernels/wgmma.cu: Hopper warpgroup MMA (sm_90a). Today it holds the self-test of the
// wrapper in common.cuh, the groundwork for tensor-core kernels on the path that reaches Hopper's
// matrix peak (mma.sync, which kernels/hconv.cu uses, runs at a fraction of it on an H100).
//
// selftest_wgmma: one warpgroup computes D[64 x 64] = A[64 x K] B[K x 64] (K a multiple of 16, at
// most 64) in K / 16 wgmma steps, the first with scale_d = 0 over accumulators that hold garbage.
// A and B are staged into two different core-matrix arrangements, so that the descriptor's two
// offsets are told apart: in A each 8-row group's K chunks are contiguous (lbo = 128 B, sbo =
// K / 8 * 128 B); in B each K chunk's 8-row groups are contiguous (lbo = 8 * 128 B, sbo = 128 B).
// A wrong descriptor encoding or fragment layout gives a wrong product.
#ifndef STRATA_COMMON_INCLUDED
#include "common.cuh"
#endif

struct SelftestWgmmaParams {
    const bf16* a;   // [64, k] row-major
    const bf16* bt;  // [64, k] row-major: B transposed (K-major B)
    float* d;        // [64, 64] row-major
    int k;
};

extern "C" __global__ void selftest_wgmma(const SelftestWgmmaParams p) {
    __align__(128) __shared__ bf16 sa[64 * 64];
    __align__(128) __shared__ bf16 sb[64 * 64];
    const int K = p.k;
    const int a_sbo = (K / 8) * 128, b_lbo = 8 * 128;
    // Byte offsets of element (row, k) in each arrangement.
    for (int e = threadIdx.x; e < 64 * K; e += blockDim.x) {
        const int row = e / K, k = e % K;
        const int in_core = (row % 8) * 16 + (k % 8) * 2;
        sa[((row / 8) * a_sbo + (k / 8) * 128 + in_core) / 2] = p.a[e];
        sb[((row / 8) * 128 + (k / 8) * b_lbo + in_core) / 2] = p.bt[e];
    }
    fence_proxy_async();
    __syncthreads();
    float d[32];
#pragma unroll
    for (int i = 0; i < 32; ++i) d[i] = 1e30f;  // scale_d = 0 must ignore these
    wgmma_fence_operands(d, 32);
    wgmma_fence();
    for (int ks = 0; ks < K; ks += 16) {
        const wgmma_desc da = make_wgmma_desc(reinterpret_cast<const unsigned char*>(sa) + (ks / 8) * 128, 128, a_sbo);
        const wgmma_desc db = make_wgmma_desc(reinterpret_cast<const unsigned char*>(sb) + (ks / 8) * b_lbo, b_lbo, 128);
        wgmma_m64n64k16_bf16(d, da, db, ks > 0);
    }
    wgmma_commit();
    wgmma_wait<0>();
    wgmma_fence_operands(d, 32);
    const int w = (threadIdx.x >> 5) & 3, lane = threadIdx.x & 31;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
#pragma unroll
        for (int r = 0; r < 4; ++r) {
            const int row = 16 * w + lane / 4 + 8 * (r / 2), col = 8 * j + 2 * (lane % 4) + r % 2;
            p.d[row * 64 + col] = d[4 * j + r];
        }
    }
}
STRATA_EMU_ENTRY(selftest_wgmma, SelftestWgmmaParams)
