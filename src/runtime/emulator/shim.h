// The CUDA vocabulary for kernels compiled by the host C++ compiler (the kernel emulator).
// Each block's threads are cooperative fibers (emulator.cpp): a thread runs until it reaches a
// barrier (__syncthreads) or a warp collective (__shfl_*_sync, __syncwarp), then the next one
// runs; a barrier or collective releases when every live thread of the block / warp has arrived. Blocks run one
// after another, so `__shared__` (function-static storage) is shared by exactly one block's threads.
#pragma once
#include <math.h>  // expf, sqrtf, fmaxf, fminf in the global namespace, as in CUDA
#include <cstdint>
#include <cstring>

struct dim3 {
    unsigned x, y, z;
    dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};

namespace strata_emu {
struct Block;
extern thread_local Block* tl_block;
const dim3& thread_idx();
const dim3& block_idx();
const dim3& block_dim();
const dim3& grid_dim();
void block_barrier();
// Exchanges one 8-byte slot per lane: writes `mine`, waits for the warp, returns lane `src`'s slot.
uint64_t warp_exchange(uint64_t mine, int src);
int lane_id();
// One warp-wide mma.sync.m16n8k16 (bf16 x bf16 -> f32) from per-lane fragments (PTX ISA layouts).
void mma_m16n8k16_bf16(float* d, const uint32_t* a, const uint32_t* b, const float* c);
char* dynamic_smem();
// cp.async as the GPU may run it: 16 bytes (or zeros) read now, written to shared memory only at
// the cp.async.wait_group that requires their group (see emulator.cpp's PendingCopy).
void cp_async(void* dst, const void* src, bool valid);
void cp_async_commit();
void cp_async_wait(int pending);
// wgmma as the GPU may run it: an operation (`run` over a copy of its `bytes` of arguments, at
// most 64) runs only at the wgmma.wait_group that requires its group (see emulator.cpp's
// PendingWgmma); a thread that exits with operations in flight faults the launch.
void wgmma_issue(void (*run)(const void*), const void* args, unsigned bytes);
void wgmma_commit();
void wgmma_wait(int pending);
void fault_wgmma(const char* what);
// The launch's dynamic shared memory in bytes (PTX's %dynamic_smem_size).
unsigned dynamic_smem_size();
// Records the fault of a kernel whose layout needs `need` bytes of dynamic shared memory, more
// than the launch gave (on the GPU: a trap).
void fault_dynamic_smem(unsigned need);
// Records a fault the GPU would raise: a `bytes`-wide access (`op`) at `p`, off that alignment.
// The launch then fails with it ("misaligned address", as CUDA reports it), where the emulator's
// byte copies would have carried on.
void fault_misaligned(const char* op, const void* p, unsigned bytes);
// Whether `bytes` at `p` lie in the block's shared memory (the launch's dynamic allocation or the
// `__shared__` statics); if not, records the fault the GPU would raise (an out-of-range shared
// access) for `op` and returns false, so that the caller skips the access: the emulator's host
// memory past the allocation would take it silently, or crash the process.
bool shared_in_bounds(const void* p, unsigned bytes, const char* op);
typedef void (*Body)(const void*);
int launch(Body body, dim3 grid, dim3 block, unsigned smem, const void* params, char* err, unsigned errlen);

template <class T>
T shfl(T v, int src) {
    static_assert(sizeof(T) <= 8, "shuffle of a value wider than 8 bytes");
    uint64_t bits = 0;
    std::memcpy(&bits, &v, sizeof(T));
    uint64_t got = warp_exchange(bits, src);
    T r;
    std::memcpy(&r, &got, sizeof(T));
    return r;
}
}  // namespace strata_emu

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __restrict__ __restrict
// Static shared memory: function statics, all in one linker section, so that the emulator can
// fill every kernel's with NaN bytes at each block's start (blocks and launches run one at a
// time), as undefined as the GPU leaves it.
#define __shared__ static __attribute__((section("strata_static_smem")))
#define threadIdx (strata_emu::thread_idx())
#define blockIdx (strata_emu::block_idx())
#define blockDim (strata_emu::block_dim())
#define gridDim (strata_emu::grid_dim())
#define __syncthreads() strata_emu::block_barrier()

template <class T>
inline T __shfl_xor_sync(unsigned, T v, int mask) {
    return strata_emu::shfl(v, strata_emu::lane_id() ^ mask);
}
template <class T>
inline T __shfl_down_sync(unsigned, T v, unsigned delta) {
    const int src = strata_emu::lane_id() + (int)delta;
    return strata_emu::shfl(v, src < 32 ? src : strata_emu::lane_id());
}
template <class T>
inline T __shfl_sync(unsigned, T v, int src) {
    return strata_emu::shfl(v, src & 31);
}
// A warp barrier: a collective that exchanges nothing.
inline void __syncwarp(unsigned = 0xffffffffu) {
    (void)strata_emu::warp_exchange(0, strata_emu::lane_id());
}
// Blocks run one at a time on one OS thread and fibers never preempt: a plain add is atomic.
inline float atomicAdd(float* p, float v) {
    const float old = *p;
    *p = old + v;
    return old;
}
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }

#define STRATA_DYNAMIC_SMEM(T, name) T* name = reinterpret_cast<T*>(strata_emu::dynamic_smem())
#define __align__(n) alignas(n)

#define STRATA_EMU_ENTRY(name, Params)                                                                   \
    extern "C" int strata_emu_##name(unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,    \
                                     unsigned bz, unsigned smem, const void* params, char* err,          \
                                     unsigned errlen) {                                                  \
        return strata_emu::launch([](const void* p) { name(*static_cast<const Params*>(p)); },          \
                                  dim3(gx, gy, gz), dim3(bx, by, bz), smem, params, err, errlen);        \
    }
