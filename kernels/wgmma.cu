// strata/kernels/wgmma.cu: the self-test of Hopper's warpgroup MMA wrapper (common.cuh; sm_90a).
// The kernels built on it live with their op family: hconv.cu's sm_90a build holds HConv's
// forward and backward on wgmma (mma.sync, the other path, runs at a fraction of an H100's matrix
// peak). This test pins the wrapper's descriptor and fragment layouts to the hardware's.
//
// selftest_wgmma: one warpgroup computes D[64 x N] = A[64 x K] B[K x N] (N 64 or 128: the
// m64n64k16 or the m64n128k16 instruction; K a multiple of 16, at most 64) in K / 16 wgmma steps,
// the first with scale_d = 0 over accumulators that hold garbage. The operands are staged into
// different core-matrix arrangements, so that the descriptor's two offsets are told apart: mode 0,
// both K-major (A: each 8-row group's K chunks contiguous, lbo = 128 B, sbo = K / 8 * 128 B; B:
// each K chunk's 8-row groups contiguous, lbo = N / 8 * 128 B, sbo = 128 B); mode 1, B MN-major
// instead (lbo = 128 B, sbo = K / 8 * 128 B); mode 2, A MN-major too (lbo = 8 * 128 B, sbo =
// 128 B). A wrong descriptor encoding, operand layout or fragment layout gives a wrong product.
#ifndef STRATA_COMMON_INCLUDED
#include "common.cuh"
#endif

struct SelftestWgmmaParams {
    const bf16* a;   // [64, k] row-major
    const bf16* bt;  // [n, k] row-major: B transposed
    float* d;        // [64, n] row-major
    int k, mode, n;
};

// Byte offset of element (row, k) of a staged operand (see common.cuh's wgmma notes).
__device__ __forceinline__ int wg_test_offset(int row, int k, int lbo, int sbo, bool mn_major) {
    return (row / 8) * sbo + (k / 8) * lbo + (mn_major ? (k % 8) * 16 + (row % 8) * 2 : (row % 8) * 16 + (k % 8) * 2);
}

template <int N, int TA, int TB>
__device__ __forceinline__ void wg_test_steps(float* d, const bf16* sa, const bf16* sb, int K, int a_lbo, int a_sbo,
                                              int b_lbo, int b_sbo) {
    for (int ks = 0; ks < K; ks += 16) {
        const unsigned char* a = reinterpret_cast<const unsigned char*>(sa) + (ks / 8) * a_lbo;
        const unsigned char* b = reinterpret_cast<const unsigned char*>(sb) + (ks / 8) * b_lbo;
        const wgmma_desc da = make_wgmma_desc(a, a_lbo, a_sbo), db = make_wgmma_desc(b, b_lbo, b_sbo);
        if (N == 64)
            wgmma_m64n64k16_bf16<TA, TB>(d, da, db, ks > 0);
        else
            wgmma_m64n128k16_bf16<TA, TB>(d, da, db, ks > 0);
    }
}

template <int N>
__device__ __forceinline__ void wg_test_mode(float* d, int mode, const bf16* sa, const bf16* sb, int K, int a_lbo,
                                             int a_sbo, int b_lbo, int b_sbo) {
    if (mode == 0)
        wg_test_steps<N, 0, 0>(d, sa, sb, K, a_lbo, a_sbo, b_lbo, b_sbo);
    else if (mode == 1)
        wg_test_steps<N, 0, 1>(d, sa, sb, K, a_lbo, a_sbo, b_lbo, b_sbo);
    else
        wg_test_steps<N, 1, 1>(d, sa, sb, K, a_lbo, a_sbo, b_lbo, b_sbo);
}

extern "C" __global__ void selftest_wgmma(const SelftestWgmmaParams p) {
    __align__(128) __shared__ bf16 sa[64 * 64];
    __align__(128) __shared__ bf16 sb[128 * 64];
    const int K = p.k, N = p.n == 128 ? 128 : 64;
    const bool a_mn = p.mode == 2, b_mn = p.mode >= 1;
    const int a_lbo = a_mn ? 8 * 128 : 128, a_sbo = a_mn ? 128 : (K / 8) * 128;
    const int b_lbo = b_mn ? 128 : (N / 8) * 128, b_sbo = b_mn ? (K / 8) * 128 : 128;
    // Zeros first, so that a failed test's diagnosis (tests/kernels.rs) knows every byte a
    // misread could reach.
    for (int e = threadIdx.x; e < 128 * 64; e += blockDim.x) {
        if (e < 64 * 64) sa[e].bits = 0;
        sb[e].bits = 0;
    }
    __syncthreads();
    for (int e = threadIdx.x; e < N * K; e += blockDim.x) {
        const int row = e / K, k = e % K;
        if (row < 64) sa[wg_test_offset(row, k, a_lbo, a_sbo, a_mn) / 2] = p.a[e];
        sb[wg_test_offset(row, k, b_lbo, b_sbo, b_mn) / 2] = p.bt[e];
    }
    fence_proxy_async();
    __syncthreads();
    float d[64];
#pragma unroll
    for (int i = 0; i < 64; ++i) d[i] = 1e30f;  // scale_d = 0 must ignore these
    wgmma_fence_operands(d, 64);
    wgmma_fence();
    if (N == 64)
        wg_test_mode<64>(d, p.mode, sa, sb, K, a_lbo, a_sbo, b_lbo, b_sbo);
    else
        wg_test_mode<128>(d, p.mode, sa, sb, K, a_lbo, a_sbo, b_lbo, b_sbo);
    wgmma_commit();
    wgmma_wait<0>();
    wgmma_fence_operands(d, 64);
    const int w = (threadIdx.x >> 5) & 3, lane = threadIdx.x & 31;
#pragma unroll
    for (int j = 0; j < 16; ++j) {
#pragma unroll
        for (int r = 0; r < 4; ++r) {
            const int row = 16 * w + lane / 4 + 8 * (r / 2), col = 8 * j + 2 * (lane % 4) + r % 2;
            if (col < N) p.d[row * N + col] = d[4 * j + r];
        }
    }
}
STRATA_EMU_ENTRY(selftest_wgmma, SelftestWgmmaParams)
