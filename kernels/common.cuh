// strata/kernels/common.cuh: the one header every kernel includes. Self-contained (no CUDA toolkit
// header is needed at run time) and portable: it compiles under NVRTC for the GPU and under the
// host C++ compiler for the kernel emulator (STRATA_EMULATOR, see src/runtime/emulator/).
//
// Holds: the bf16 storage type and its conversions (round to nearest even), warp and block
// reductions, 16-byte vector loads, the tensor-core wrappers (mma.sync, ldmatrix, cp.async, and
// Hopper's wgmma for sm_90a files), and the kernel-entry macro that gives the emulator a launcher
// for each kernel.
// Convention: every kernel takes ONE parameter struct by value; Rust mirrors it with #[repr(C)].
#pragma once

#ifdef STRATA_EMULATOR
#include "../src/runtime/emulator/shim.h"
#else
// NVRTC: fixed-width types without <cstdint>.
typedef unsigned short uint16_t;
typedef unsigned int uint32_t;
typedef long long int64_t;
#define STRATA_EMU_ENTRY(name, Params)
// Dynamic shared memory (the launch's smem bytes), 16-byte aligned.
#define STRATA_DYNAMIC_SMEM(T, name)                              \
    extern __shared__ __align__(16) unsigned char strata_smem[]; \
    T* name = reinterpret_cast<T*>(strata_smem)
#endif

// bf16 kept as raw bits: identical layout on both backends, conversions in plain integer math.
struct bf16 {
    uint16_t bits;
};

__device__ __forceinline__ uint32_t strata_float_bits(float f) {
    union { float f; uint32_t u; } c;
    c.f = f;
    return c.u;
}

__device__ __forceinline__ float strata_bits_float(uint32_t u) {
    union { float f; uint32_t u; } c;
    c.u = u;
    return c.f;
}

__device__ __forceinline__ float bf16_to_float(bf16 h) {
    return strata_bits_float(((uint32_t)h.bits) << 16);
}

// Round to nearest, ties to even; NaN stays a (quiet) NaN.
__device__ __forceinline__ bf16 float_to_bf16(float f) {
    uint32_t u = strata_float_bits(f);
    bf16 h;
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        h.bits = (uint16_t)((u >> 16) | 0x40u);
        return h;
    }
    u += 0x7fffu + ((u >> 16) & 1u);
    h.bits = (uint16_t)(u >> 16);
    return h;
}

#ifdef STRATA_EMULATOR
// The GPU faults on a vector access off its width's alignment; the emulator copies bytes, which
// never fault, so it checks instead. Buffers start 16-byte aligned on both backends (cudaMalloc:
// 256; the emulator's host vectors: malloc's 16), so what this catches is an offset the GPU
// would fault on.
inline void strata_emu_check_aligned(const void* p, unsigned bytes, const char* op) {
    if (reinterpret_cast<uintptr_t>(p) % bytes != 0) strata_emu::fault_misaligned(op, p, bytes);
}
#endif

// One vector access of a V (a type aligned to its size) at p, which callers keep aligned to it:
// the emulator checks that alignment (the GPU faults off it) and copies bytes; `op` names the
// access in its fault.
template <class V>
__device__ __forceinline__ V load_vec(const void* p, const char* op) {
#ifdef STRATA_EMULATOR
    strata_emu_check_aligned(p, sizeof(V), op);
    V v;
    memcpy(&v, p, sizeof v);
    return v;
#else
    (void)op;
    return *reinterpret_cast<const V*>(p);
#endif
}

template <class V>
__device__ __forceinline__ void store_vec(void* p, const V& v, const char* op) {
#ifdef STRATA_EMULATOR
    strata_emu_check_aligned(p, sizeof(V), op);
    memcpy(p, &v, sizeof v);
#else
    (void)op;
    *reinterpret_cast<V*>(p) = v;
#endif
}

// Eight bf16 in 16 bytes: one vector load or store (callers guarantee 16-byte alignment).
struct alignas(16) bf16x8 {
    uint32_t w[4];
};

__device__ __forceinline__ bf16x8 load_bf16x8(const bf16* p) { return load_vec<bf16x8>(p, "load_bf16x8"); }
__device__ __forceinline__ void store_bf16x8(bf16* p, const bf16x8& v) { store_vec(p, v, "store_bf16x8"); }

// Four floats in 16 bytes (our own type: no toolkit header), loaded as one vector.
struct alignas(16) float4_t {
    float x, y, z, w;
};

__device__ __forceinline__ float4_t load_float4(const float* p) { return load_vec<float4_t>(p, "load_float4"); }
__device__ __forceinline__ void store_float4(float* p, const float4_t& v) { store_vec(p, v, "store_float4"); }

// Four bf16 in 8 bytes, stored as one vector (callers guarantee 8-byte alignment).
struct alignas(8) bf16x4 {
    uint32_t w[2];
};

__device__ __forceinline__ bf16x4 load_bf16x4(const bf16* p) { return load_vec<bf16x4>(p, "load_bf16x4"); }
__device__ __forceinline__ void store_bf16x4(bf16* p, const bf16x4& v) { store_vec(p, v, "store_bf16x4"); }

// Two bf16 (lo at p, hi at p + 1) as one 4-byte store (callers guarantee 4-byte alignment): the
// tensor-core epilogues' adjacent channel pairs.
__device__ __forceinline__ void store_bf16x2(bf16* p, bf16 lo, bf16 hi) {
    store_vec(p, (uint32_t)lo.bits | ((uint32_t)hi.bits << 16), "store_bf16x2");
}

// The four floats of a bf16x4 (exact), and four floats rounded into one (nearest even).
__device__ __forceinline__ float4_t unpack_bf16x4(const bf16x4& v) {
    return float4_t{strata_bits_float(v.w[0] << 16), strata_bits_float(v.w[0] & 0xffff0000u),
                    strata_bits_float(v.w[1] << 16), strata_bits_float(v.w[1] & 0xffff0000u)};
}

__device__ __forceinline__ bf16x4 pack_bf16x4(const float4_t& f) {
    bf16x4 b;
    b.w[0] = (uint32_t)float_to_bf16(f.x).bits | ((uint32_t)float_to_bf16(f.y).bits << 16);
    b.w[1] = (uint32_t)float_to_bf16(f.z).bits | ((uint32_t)float_to_bf16(f.w).bits << 16);
    return b;
}

// Element i of a buffer that is fp32, or bf16 when is_bf16 (widened exactly); and the four from
// i, a multiple of 4 (16-byte fp32 or 8-byte bf16 loads). For kernels that read either dtype.
__device__ __forceinline__ float load_f32_or_bf16(const void* x, int is_bf16, int64_t i) {
    return is_bf16 ? bf16_to_float(((const bf16*)x)[i]) : ((const float*)x)[i];
}

__device__ __forceinline__ float4_t load4_f32_or_bf16(const void* x, int is_bf16, int64_t i) {
    return is_bf16 ? unpack_bf16x4(load_bf16x4((const bf16*)x + i)) : load_float4((const float*)x + i);
}

__device__ __forceinline__ void unpack_bf16x8(const bf16x8& v, float* f) {
    for (int i = 0; i < 4; ++i) {
        f[2 * i] = strata_bits_float(v.w[i] << 16);
        f[2 * i + 1] = strata_bits_float(v.w[i] & 0xffff0000u);
    }
}

__device__ __forceinline__ bf16x8 pack_bf16x8(const float* f) {
    bf16x8 v;
    for (int i = 0; i < 4; ++i) {
        v.w[i] = (uint32_t)float_to_bf16(f[2 * i]).bits | ((uint32_t)float_to_bf16(f[2 * i + 1]).bits << 16);
    }
    return v;
}

// Tensor cores: D = A * B + C for one warp, A 16x16 bf16 (row), B 16x8 bf16 (col), C/D 16x8 f32,
// in the PTX ISA fragment layouts (see the emulator's mma_m16n8k16_bf16 for them in words).
__device__ __forceinline__ void mma_m16n8k16_bf16(float* d, const uint32_t* a, const uint32_t* b, const float* c) {
#ifdef STRATA_EMULATOR
    strata_emu::mma_m16n8k16_bf16(d, a, b, c);
#else
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%10,%11,%12,%13};\n"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]),
          "f"(c[3]));
#endif
}

// Shared-memory address of a generic pointer (what ldmatrix and cp.async take).
__device__ __forceinline__ uint32_t smem_addr(const void* p) {
#ifdef STRATA_EMULATOR
    return (uint32_t)(uintptr_t)p;
#else
    return (uint32_t)__cvta_generic_to_shared(p);
#endif
}

#ifdef STRATA_EMULATOR
// Lane `src`'s 16-byte row, 32-bit word `w` (the emulator's ldmatrix building block).
inline uint32_t strata_emu_row_word(const uint32_t* mine, int src, int w) {
    const uint64_t lo = strata_emu::warp_exchange(mine[0] | (uint64_t)mine[1] << 32, src);
    const uint64_t hi = strata_emu::warp_exchange(mine[2] | (uint64_t)mine[3] << 32, src);
    const uint64_t half = w < 2 ? lo : hi;
    return (uint32_t)(half >> (32 * (w % 2)));
}
#endif

// ldmatrix.x4: four 8x8 bf16 matrices from shared memory. Lane l gives the address of row l % 8 of
// matrix l / 8 (16 contiguous bytes); lane l receives r[j] = matrix j's row l / 4, elements
// 2 (l % 4) and 2 (l % 4) + 1 (the low half first): exactly an mma A / B fragment register.
__device__ __forceinline__ void ldmatrix_x4(uint32_t* r, const bf16* row) {
#ifdef STRATA_EMULATOR
    strata_emu_check_aligned(row, 16, "ldmatrix row");
    uint32_t mine[4] = {0, 0, 0, 0};
    if (strata_emu::shared_in_bounds(row, 16, "ldmatrix row")) memcpy(mine, row, 16);
    const int lane = strata_emu::lane_id();
    for (int j = 0; j < 4; ++j) r[j] = strata_emu_row_word(mine, 8 * j + lane / 4, lane % 4);
#else
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(row)));
#endif
}

// ldmatrix.x4.trans: the same rows, each matrix transposed: lane l receives r[j] = matrix j's
// elements (row 2 (l % 4), column l / 4) and (row 2 (l % 4) + 1, column l / 4).
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t* r, const bf16* row) {
#ifdef STRATA_EMULATOR
    strata_emu_check_aligned(row, 16, "ldmatrix.trans row");
    uint32_t mine[4] = {0, 0, 0, 0};
    if (strata_emu::shared_in_bounds(row, 16, "ldmatrix.trans row")) memcpy(mine, row, 16);
    const int lane = strata_emu::lane_id();
    const int col = lane / 4;
    for (int j = 0; j < 4; ++j) {
        const uint32_t w0 = strata_emu_row_word(mine, 8 * j + 2 * (lane % 4), col / 2);
        const uint32_t w1 = strata_emu_row_word(mine, 8 * j + 2 * (lane % 4) + 1, col / 2);
        const uint32_t e0 = (w0 >> (16 * (col % 2))) & 0xffffu, e1 = (w1 >> (16 * (col % 2))) & 0xffffu;
        r[j] = e0 | (e1 << 16);
    }
#else
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(row)));
#endif
}

// cp.async: 16 bytes global -> shared without staging in registers; `valid` false writes zeros
// (src-size 0: nothing is read). The emulator lands each copy only at the cp_async_wait that
// requires its group, so a pipeline that reads a stage before waiting for it, or waits for too
// few groups, reads stale shared memory there as it may on the GPU.
__device__ __forceinline__ void cp_async16(bf16* dst, const bf16* src, bool valid) {
#ifdef STRATA_EMULATOR
    // Both addresses aligned to the copy size, even when nothing is read (src-size 0).
    strata_emu_check_aligned(dst, 16, "cp.async shared destination");
    strata_emu_check_aligned(src, 16, "cp.async global source");
    strata_emu::cp_async(dst, src, valid);
#else
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
                 "r"(valid ? 16 : 0));
#endif
}
// Whether the launch gave the kernel the `bytes` of dynamic shared memory its layout needs (the
// host computes the size apart from the kernel): if not, the GPU traps (the launch fails) and the
// emulator fails the launch with both sizes; the kernel returns at once.
__device__ __forceinline__ bool dynamic_smem_holds(uint32_t bytes) {
#ifdef STRATA_EMULATOR
    if (strata_emu::dynamic_smem_size() >= bytes) return true;
    strata_emu::fault_dynamic_smem(bytes);
    return false;
#else
    uint32_t have;
    asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(have));
    if (have < bytes) __trap();
    return true;
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#ifdef STRATA_EMULATOR
    strata_emu::cp_async_commit();
#else
    asm volatile("cp.async.commit_group;\n" ::);
#endif
}
// Waits until at most `N` committed groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#ifdef STRATA_EMULATOR
    strata_emu::cp_async_wait(N);
#else
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
#endif
}

__device__ __forceinline__ float warp_sum(float v) {
    for (int offset = 16; offset > 0; offset >>= 1) {
        v += __shfl_xor_sync(0xffffffffu, v, offset);
    }
    return v;
}

// Per-column sums over a run of rows, for a block of FRAME_SUM_WARPS (8) warps owning 32 columns:
// lane = column, warp w sums f(t) over t = s + w, s + w + 8, ... < e in order, then the warps' sums
// are added in warp order (deterministic) and returned to every thread of the lane's column.
// `valid`: whether the lane's column exists (else f is not called); `sums`: shared [8][32] floats.
// Contains barriers: every thread of the block calls it. One thread per column over every row
// (a block per utterance) had left pooling kernels latency-bound.
#define FRAME_SUM_WARPS 8
template <class F>
__device__ __forceinline__ float frames_column_sum(int s, int e, bool valid, F f, float (*sums)[32]) {
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    float acc = 0.0f;
    if (valid) {
        for (int t = s + w; t < e; t += FRAME_SUM_WARPS) acc += f(t);
    }
    __syncthreads();  // a previous call's sums have been read
    sums[w][lane] = acc;
    __syncthreads();
    float total = 0.0f;
    for (int q = 0; q < FRAME_SUM_WARPS; ++q) total += sums[q][lane];
    return total;
}

// Sum over the block, returned to every thread. `scratch` holds >= 32 floats of shared memory and
// may be reused right after the call. Fixed reduction order: deterministic.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int warps = (blockDim.x + 31) >> 5;
    v = warp_sum(v);
    if (lane == 0) {
        scratch[warp] = v;
    }
    __syncthreads();
    if (warp == 0) {
        float r = lane < warps ? scratch[lane] : 0.0f;
        r = warp_sum(r);
        if (lane == 0) {
            scratch[0] = r;
        }
    }
    __syncthreads();
    const float total = scratch[0];
    __syncthreads();
    return total;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int offset = 16; offset > 0; offset >>= 1) {
        v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
    }
    return v;
}

// Mean and 1 / sqrt(biased variance + eps) of a bf16 row of n values, two passes in fp32, by one
// warp (every lane gets both): the no-affine LayerNorm statistics of s3prl's `normalize`.
__device__ __forceinline__ void warp_row_stats_bf16(const bf16* row, int n, float eps, float* mean, float* rstd) {
    const int lane = threadIdx.x & 31;
    float s = 0.0f;
    for (int i = lane; i < n; i += 32) s += bf16_to_float(row[i]);
    const float m = warp_sum(s) / (float)n;
    float q = 0.0f;
    for (int i = lane; i < n; i += 32) {
        const float c = bf16_to_float(row[i]) - m;
        q += c * c;
    }
    *mean = m;
    *rstd = 1.0f / sqrtf(warp_sum(q) / (float)n + eps);
}

// The last i in [0, count) with start(i) <= x, for runs laid end to end from start(0) <= x (binary
// search): the utterance of a packed row, the tensor of a block in a table of runs of blocks.
template <class Start>
__device__ __forceinline__ int run_holding(int count, int64_t x, Start start) {
    int lo = 0, hi = count;
    while (hi - lo > 1) {
        const int mid = (lo + hi) / 2;
        if ((int64_t)start(mid) <= x) lo = mid; else hi = mid;
    }
    return lo;
}

// The utterance holding packed row t: the last u with offsets[u] <= t (of the [utterances + 1]
// offsets, cu_seqlens).
__device__ __forceinline__ int utterance_of(const int* offsets, int utterances, int64_t t) {
    return run_holding(utterances, t, [&](int u) { return offsets[u]; });
}

// Seeded dropout's keep decision for element i, the CPU's exactly (src/ops/dropout.rs):
// SplitMix64's finaliser over (seed, i), its top 53 bits as a double in [0, 1) compared with p.
__device__ __forceinline__ bool dropout_keep(unsigned long long seed, unsigned long long i, double p) {
    unsigned long long z = seed ^ (i * 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    const double u = (double)(z >> 11) * (1.0 / 9007199254740992.0);
    return u >= p;
}

// Max over the block, returned to every thread (same contract as block_sum).
__device__ __forceinline__ float block_max(float v, float* scratch) {
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int warps = (blockDim.x + 31) >> 5;
    v = warp_max(v);
    if (lane == 0) {
        scratch[warp] = v;
    }
    __syncthreads();
    if (warp == 0) {
        float r = lane < warps ? scratch[lane] : scratch[0];
        r = warp_max(r);
        if (lane == 0) {
            scratch[0] = r;
        }
    }
    __syncthreads();
    const float r = scratch[0];
    __syncthreads();
    return r;
}

// ---------------------------------------------------------------------------------------------
// Hopper warpgroup MMA (wgmma, PTX ISA 8.0+, the sm_90a target only: files that use it are
// compiled for sm_90a, see KernelFile::arch). A warpgroup is 4 consecutive warps, the first at a
// warp index divisible by 4; all 128 threads issue each instruction together.
//
// Operands come from shared memory through matrix descriptors, in the no-swizzle layouts. An
// operand (A: M x K, B: N x K; "row" below is m or n) is made of core matrices of 8 x 8 bf16, each
// stored contiguously in 128 bytes; `lbo` is the byte distance between core matrices adjacent along
// K, `sbo` between core matrices adjacent along M (A) or N (B).
//   K-major (the default, trans 0): a core matrix is 8 rows of 8 consecutive k; element (row, k) at
//     start + (row / 8) * sbo + (k / 8) * lbo + (row % 8) * 16 + (k % 8) * 2.
//   MN-major (trans 1: the operand stored transposed, rows contiguous): a core matrix is 8 k of 8
//     consecutive rows; element (row, k) at
//     start + (row / 8) * sbo + (k / 8) * lbo + (k % 8) * 16 + (row % 8) * 2.
// The accumulators stay in registers: thread (warp w of the warpgroup, lane l) holds, for each
// n8 chunk j, d[4 j + r] = D[16 w + l / 4 + 8 (r / 2)][8 j + 2 (l % 4) + r % 2] (the mma.m16n8
// C layout, one warp per 16 rows).
//
// wgmma runs asynchronously: shared memory written by ordinary stores or cp.async must be
// published with fence_proxy_async() in each writing thread before the barrier that precedes the
// wgmma; wgmma_fence() goes before the first wgmma that touches accumulators other code wrote;
// after wgmma_commit(), wgmma_wait<N>() waits until at most N groups are in flight, and only then
// may the accumulators be read or the operand buffers overwritten. The emulator computes each
// wgmma (from the descriptors, by the layout above) only at the wgmma_wait that requires it, so it
// checks layouts, arithmetic and that ordering: a stage refilled before the wait, or an
// accumulator read before it, gives wrong results. (The proxy fence it does not model.)
#if defined(STRATA_EMULATOR) || defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define STRATA_HAS_WGMMA 1
#ifdef STRATA_EMULATOR
struct wgmma_desc {
    const unsigned char* start;
    uint32_t lbo, sbo;
};
#else
typedef unsigned long long wgmma_desc;
#endif

// Descriptor of the no-swizzle operand at `smem` (16-byte aligned, in the first 256 KB of the
// block's shared window; lbo and sbo multiples of 16 below 256 KB). Whether it is read K-major or
// MN-major is the instruction's TRANS flag, not the descriptor's.
__device__ __forceinline__ wgmma_desc make_wgmma_desc(const void* smem, uint32_t lbo, uint32_t sbo) {
#ifdef STRATA_EMULATOR
    // The hardware drops the low 4 bits of all three: off 16 bytes it reads elsewhere, silently.
    strata_emu_check_aligned(smem, 16, "wgmma descriptor start");
    if (lbo % 16 != 0 || sbo % 16 != 0)
        strata_emu::fault_misaligned("wgmma descriptor stride (lbo or sbo)", reinterpret_cast<const void*>(uintptr_t(lbo % 16 ? lbo : sbo)), 16);
    return wgmma_desc{static_cast<const unsigned char*>(smem), lbo, sbo};
#else
    // Bits 0-13: start address >> 4; 16-29: lbo >> 4; 32-45: sbo >> 4; 49-51 base offset 0;
    // 62-63 swizzle mode 0 (none).
    const unsigned long long a = (smem_addr(smem) & 0x3ffffu) >> 4;
    return a | ((unsigned long long)((lbo & 0x3ffffu) >> 4) << 16) | ((unsigned long long)((sbo & 0x3ffffu) >> 4) << 32);
#endif
}

// The descriptor of the operand `bytes` (a multiple of 16) further on in shared memory: one add
// to the start-address field, where make_wgmma_desc converts an address (a K loop's per-step
// descriptors from one made before it). The field must not carry: the operand stays in the first
// 256 KB, as make_wgmma_desc requires.
__device__ __forceinline__ wgmma_desc wgmma_desc_advance(wgmma_desc d, uint32_t bytes) {
#ifdef STRATA_EMULATOR
    if (bytes % 16 != 0) strata_emu::fault_misaligned("wgmma descriptor advance", reinterpret_cast<const void*>(uintptr_t(bytes)), 16);
    d.start += bytes;
    return d;
#else
    return d + (bytes >> 4);
#endif
}

#ifdef STRATA_EMULATOR
inline const unsigned char* strata_emu_desc_at(const wgmma_desc& q, int row, int k, bool mn_major) {
    return q.start + (row / 8) * q.sbo + (k / 8) * q.lbo +
           (mn_major ? (k % 8) * 16 + (row % 8) * 2 : (row % 8) * 16 + (k % 8) * 2);
}
// Whether an operand of `rows` x 16 k through q lies in shared memory: its first and last
// elements (the layout grows with row and k), else the launch's fault.
inline bool strata_emu_desc_in_bounds(const wgmma_desc& q, int rows, bool mn_major, const char* op) {
    return strata_emu::shared_in_bounds(strata_emu_desc_at(q, 0, 0, mn_major), 2, op) &&
           strata_emu::shared_in_bounds(strata_emu_desc_at(q, rows - 1, 15, mn_major), 2, op);
}
inline float strata_emu_desc_elem(const wgmma_desc& q, int row, int k, bool mn_major) {
    const unsigned char* p = strata_emu_desc_at(q, row, k, mn_major);
    bf16 v;
    memcpy(&v, p, 2);
    return bf16_to_float(v);
}
#endif

#ifdef STRATA_EMULATOR
// One thread's share of an m64nNk16 wgmma, run when the emulator's wgmma_wait requires it.
template <int N, int TRANS_A, int TRANS_B>
struct StrataEmuWgmma {
    float* d;
    wgmma_desc a, b;
    int scale_d;
    static void run(const void* args) {
        const StrataEmuWgmma& op = *static_cast<const StrataEmuWgmma*>(args);
        if (!strata_emu_desc_in_bounds(op.a, 64, TRANS_A, "wgmma A operand") ||
            !strata_emu_desc_in_bounds(op.b, N, TRANS_B, "wgmma B operand"))
            return;
        const int w = (threadIdx.x >> 5) & 3, lane = threadIdx.x & 31;
        for (int j = 0; j < N / 8; ++j) {
            for (int r = 0; r < 4; ++r) {
                const int row = 16 * w + lane / 4 + 8 * (r / 2), col = 8 * j + 2 * (lane % 4) + r % 2;
                float s = 0.0f;
                for (int k = 0; k < 16; ++k)
                    s += strata_emu_desc_elem(op.a, row, k, TRANS_A) * strata_emu_desc_elem(op.b, col, k, TRANS_B);
                op.d[4 * j + r] = (op.scale_d ? op.d[4 * j + r] : 0.0f) + s;
            }
        }
    }
};
#endif

// D[64 x 64] = A[64 x 16] B[16 x 64] + (scale_d ? D : 0), fp32 accumulators d[32] per thread.
// TRANS_A / TRANS_B: 0 for a K-major operand, 1 for an MN-major one.
template <int TRANS_A = 0, int TRANS_B = 0>
__device__ __forceinline__ void wgmma_m64n64k16_bf16(float* d, wgmma_desc a, wgmma_desc b, int scale_d) {
#ifdef STRATA_EMULATOR
    const StrataEmuWgmma<64, TRANS_A, TRANS_B> op{d, a, b, scale_d};
    strata_emu::wgmma_issue(&StrataEmuWgmma<64, TRANS_A, TRANS_B>::run, &op, sizeof op);
#else
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "
        "%32, %33, p, 1, 1, %35, %36;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
          "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
          "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
        : "l"(a), "l"(b), "r"(scale_d), "n"(TRANS_A), "n"(TRANS_B));
#endif
}

// D[64 x 128] = A[64 x 16] B[16 x 128] + (scale_d ? D : 0), fp32 accumulators d[64] per thread
// (n8 chunk j in d[4 j ..], as for m64n64): one instruction where two m64n64 would read A twice.
template <int TRANS_A = 0, int TRANS_B = 0>
__device__ __forceinline__ void wgmma_m64n128k16_bf16(float* d, wgmma_desc a, wgmma_desc b, int scale_d) {
#ifdef STRATA_EMULATOR
    const StrataEmuWgmma<128, TRANS_A, TRANS_B> op{d, a, b, scale_d};
    strata_emu::wgmma_issue(&StrataEmuWgmma<128, TRANS_A, TRANS_B>::run, &op, sizeof op);
#else
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 "
        "{"
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
        "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
        "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63 "
        "}, %64, %65, p, 1, 1, %67, %68;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
          "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
          "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
          "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
          "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
          "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
          "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "l"(a), "l"(b), "r"(scale_d), "n"(TRANS_A), "n"(TRANS_B));
#endif
}

// Keeps the compiler from moving reads or writes of accumulator registers across the wgmma
// fences (the asynchronous instruction owns them until wgmma_wait).
__device__ __forceinline__ void wgmma_fence_operands(float* d, int n) {
#ifndef STRATA_EMULATOR
#pragma unroll
    for (int i = 0; i < n; ++i) asm volatile("" : "+f"(d[i])::"memory");
#else
    (void)d, (void)n;
#endif
}
__device__ __forceinline__ void wgmma_fence() {
#ifndef STRATA_EMULATOR
    asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void wgmma_commit() {
#ifdef STRATA_EMULATOR
    strata_emu::wgmma_commit();
#else
    asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#endif
}
template <int N>
__device__ __forceinline__ void wgmma_wait() {
#ifdef STRATA_EMULATOR
    strata_emu::wgmma_wait(N);
#else
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
#endif
}
// Makes this thread's ordinary shared-memory writes visible to the tensor cores' (async proxy)
// reads that follow the next barrier.
__device__ __forceinline__ void fence_proxy_async() {
#ifndef STRATA_EMULATOR
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}
#endif  // STRATA_HAS_WGMMA
