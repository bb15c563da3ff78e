// strata/kernels/selftest.cu: kernels that test the kernel machinery itself (warp shuffles, block
// reductions, barrier semantics) on the emulator and on the GPU. `selftest_divergent_barrier` is
// deliberately broken (half the block waits at __syncthreads while the other half waits in a warp
// shuffle their warp never completes): only the emulator runs it, to show that such a bug becomes
// an error instead of a hang. (Threads that EXIT do not block a barrier, as on Volta and later.)
// `selftest_unordered` is deliberately racy too (a missing barrier, blocks reading each other's
// writes): also emulator only, to show that such races change results there rather than passing
// by luck of the order in which the emulator runs threads and blocks.
// `selftest_shared_bounds` faults past the block's shared memory (emulator only, for that case).
// `selftest_serial` gives the emulator's launch timing (crate::runtime::emulated_profile_of) work
// of a known shape.
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

// One warp: D[16x8] = A[16x16] * B[16x8] + C through the tensor-core wrapper. A row-major bf16,
// B given as Bt [8][16] row-major bf16 (column-major B), C and D row-major f32. Each lane loads its
// fragments by the documented layouts, so a wrong layout shows up as a wrong product.
struct SelftestMmaParams {
    const bf16* a;
    const bf16* bt;
    const float* c;
    float* d;
};

__device__ __forceinline__ uint32_t pack_pair(const bf16* p) {
    return (uint32_t)p[0].bits | ((uint32_t)p[1].bits << 16);
}

extern "C" __global__ void selftest_mma(const SelftestMmaParams s) {
    const int lane = threadIdx.x & 31, g = lane / 4, t = lane % 4;
    uint32_t a[4], b[2];
    float c[4], d[4];
    for (int r = 0; r < 4; ++r) a[r] = pack_pair(s.a + (g + 8 * (r % 2)) * 16 + 2 * t + 8 * (r / 2));
    for (int r = 0; r < 2; ++r) b[r] = pack_pair(s.bt + g * 16 + 2 * t + 8 * r);
    for (int r = 0; r < 4; ++r) c[r] = s.c[(g + 8 * (r / 2)) * 8 + 2 * t + (r % 2)];
    mma_m16n8k16_bf16(d, a, b, c);
    for (int r = 0; r < 4; ++r) s.d[(g + 8 * (r / 2)) * 8 + 2 * t + (r % 2)] = d[r];
}
STRATA_EMU_ENTRY(selftest_mma, SelftestMmaParams)

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

// 64-thread blocks. Each thread writes its smem slot and, with NO barrier, reads both neighbours'
// slots: out[2 (64 b + t) + {0, 1}] = the lower / upper neighbour's value t +- 1 + 1, or whatever
// was there before. Thread 0 of block b then copies block b - 1's flag (0 unless that block has
// run) into out[129 blocks + b] and raises its own flag, out[128 blocks + b].
extern "C" __global__ void selftest_unordered(const SelftestParams a) {
    __shared__ float slots[64];
    const int t = threadIdx.x, b = blockIdx.x, blocks = gridDim.x;
    slots[t] = (float)(t + 1);
    a.out[2 * (64 * b + t) + 0] = slots[(t + 63) % 64];
    a.out[2 * (64 * b + t) + 1] = slots[(t + 1) % 64];
    if (t == 0) {
        float* flags = a.out + 128 * blocks;
        a.out[129 * blocks + b] = b > 0 ? flags[b - 1] : 1.0f;
        flags[b] = 1.0f;
    }
}
STRATA_EMU_ENTRY(selftest_unordered, SelftestParams)

// ldmatrix.x4 and .x4.trans from a 32 x 8 bf16 tile (four stacked 8 x 8 matrices, element e holds
// the value e): lane l points at row l. out (uint32) gets lane l's four registers at 4l.. (plain),
// then at 128 + 4l.. (transposed). The host checks them against the PTX ISA fragment layout, so on
// the GPU this also validates the emulator's ldmatrix.
struct SelftestLdmatrixParams {
    const bf16* tile;
    uint32_t* out;
};
extern "C" __global__ void selftest_ldmatrix(const SelftestLdmatrixParams s) {
    __align__(16) __shared__ bf16 tile[32][8];
    const int lane = threadIdx.x & 31;
    for (int e = 0; e < 8; ++e) tile[lane][e] = s.tile[lane * 8 + e];
    __syncthreads();
    uint32_t r[4];
    ldmatrix_x4(r, &tile[lane][0]);
    for (int j = 0; j < 4; ++j) s.out[4 * lane + j] = r[j];
    ldmatrix_x4_trans(r, &tile[lane][0]);
    for (int j = 0; j < 4; ++j) s.out[128 + 4 * lane + j] = r[j];
}
STRATA_EMU_ENTRY(selftest_ldmatrix, SelftestLdmatrixParams)

// Shared-memory bounds: thread 0 copies 16 bytes of `in` into the block's dynamic shared memory
// at byte offset n (cp.async), then every lane points ldmatrix at that row, so that lane l < 4
// holds its word l (of matrix 0), which it writes to out[l] (as bits). Past the launch's dynamic shared memory the emulator
// fails the launch naming the access, as the GPU raises an illegal address (only the emulator runs
// that case: on the GPU the error poisons the context).
extern "C" __global__ void selftest_shared_bounds(const SelftestParams a) {
    STRATA_DYNAMIC_SMEM(unsigned char, smem);
    bf16* row = reinterpret_cast<bf16*>(smem + a.n);
    if (threadIdx.x == 0) cp_async16(row, reinterpret_cast<const bf16*>(a.in), true);
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();
    uint32_t r[4];
    ldmatrix_x4(r, row);
    if (threadIdx.x < 4) a.out[threadIdx.x] = strata_bits_float(r[0]);
}
STRATA_EMU_ENTRY(selftest_shared_bounds, SelftestParams)

struct SelftestSerialParams {
    float* out;
    int n;
    int mode;
};

// A dependent chain of `n` multiply-adds (nothing can run it in parallel or skip it).
__device__ __forceinline__ float selftest_chain(int n, float seed) {
    float acc = seed;
    for (int i = 0; i < n; ++i) acc = acc * 0.999f + 1.0f;
    return acc;
}

// Work of a known shape for the emulator's timing, out[thread] = its chains' result. mode 0:
// thread 0 runs n steps, the others none (critical path = all the work); 1: every thread runs
// n / blockDim.x (critical path = one thread's share); 2: thread 0 runs n / 2, a barrier, then the
// last thread n / 2 (two phases, one after the other: critical path = all the work again).
extern "C" __global__ void selftest_serial(const SelftestSerialParams a) {
    const int t = threadIdx.x, last = blockDim.x - 1;
    float acc = 0.0f;
    if (a.mode == 0 && t == 0) acc = selftest_chain(a.n, 1.0f);
    if (a.mode == 1) acc = selftest_chain(a.n / blockDim.x, (float)t);
    if (a.mode == 2) {
        if (t == 0) acc = selftest_chain(a.n / 2, 1.0f);
        __syncthreads();
        if (t == last) acc += selftest_chain(a.n / 2, 2.0f);
    }
    a.out[blockIdx.x * blockDim.x + t] = acc;
}
STRATA_EMU_ENTRY(selftest_serial, SelftestSerialParams)
