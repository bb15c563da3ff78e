// The kernel emulator's scheduler: the threads of one block as ucontext fibers.
//
// A fiber runs until it finishes or waits (block barrier, warp collective). When every fiber has
// run as far as it can, the scheduler releases a warp whose live lanes all wait at a collective,
// else the block if all live threads wait at __syncthreads, else reports a deadlock (a barrier or
// collective reached by only part of its threads) as an error instead of hanging.
//
// On the GPU nothing orders threads between two barriers, nor the blocks of a grid. So that code
// relying on an order (a missing __syncthreads / __syncwarp, a block reading what another block of
// the same launch writes) fails here rather than passing by luck of the emulator's order, the
// sweeps over a block's threads alternate between ascending and descending order, starting the
// other way in every other block, and the blocks run in a scrambled (deterministic) order.
//
// On request (strata_emu_set_timing) the scheduler times each fiber run, for each block's critical
// path (run_block): crate::runtime::emulated_profile_of, examples/emu_profile.rs.
#include <time.h>
#include <ucontext.h>
#if defined(__x86_64__)
#include <x86intrin.h>
#endif

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "shim.h"

#if defined(__x86_64__) && defined(__linux__)
#define STRATA_FAST_SWITCH 1
// strata_switch(save, load): saves the current context's stack pointer into *save, resumes `load`.
asm(R"(
    .text
    .globl strata_switch
    .type strata_switch,@function
strata_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size strata_switch,.-strata_switch
    .section .note.GNU-stack,"",@progbits
    .text
)");
extern "C" void strata_switch(void** save, void* load);
#endif

namespace strata_emu {

enum State { READY, AT_BLOCK_BARRIER, AT_WARP_COLLECTIVE, DONE };

struct Fiber {
    ucontext_t ctx;
    void* sp = nullptr;
    State state;
    dim3 tid;
    int linear;
};

struct WarpMma {
    bool done = false;
    float D[16][8];
};

// One thread's cp.async copies in flight: the source's 16 bytes are read at issue (a kernel's
// global inputs do not change under it), the shared destination poisoned at issue and written only
// when a cp.async.wait_group requires it, as late as the GPU may land it, so that any read of it
// in between (before the wait, or by a wait that lets too many groups stay in flight, or an
// operation still reading the old contents) sees neither the old nor the new bytes.
struct PendingCopy {
    char* dst;
    unsigned char bytes[16];
};

// One thread's asynchronous operations (cp.async copies, wgmmas) in commit groups: `wait`
// finishes every committed group but the newest `pending`, oldest first, as PTX's wait_group does;
// uncommitted operations are not waited for.
template <class Op>
struct AsyncGroups {
    std::vector<std::vector<Op>> committed;  // oldest first
    std::vector<Op> open;                    // issued since the last commit
    bool empty() const { return committed.empty() && open.empty(); }
    void commit() {
        committed.push_back(std::move(open));
        open.clear();
    }
    template <class Finish>
    void wait(int pending, Finish finish) {
        while ((int)committed.size() > pending) {
            // The group leaves the list first: finishing an operation cannot disturb it.
            std::vector<Op> group = std::move(committed.front());
            committed.erase(committed.begin());
            for (const Op& op : group) finish(op);
        }
    }
};
using CopyGroups = AsyncGroups<PendingCopy>;

// One thread's wgmma operations in flight: each runs (reads its shared-memory operands, updates
// the thread's accumulators) only at the wgmma.wait_group that requires its group, as late as the
// GPU may finish it, so that an operand stage overwritten before that wait, or an accumulator read
// before it, gives a wrong result. `run` computes one operation from `args` for the current thread.
struct PendingWgmma {
    void (*run)(const void*);
    alignas(16) unsigned char args[64];
};
using WgmmaGroups = AsyncGroups<PendingWgmma>;

struct Block {
    std::vector<Fiber> fibers;
    char* stacks = nullptr;  // kStack bytes per thread (fiber_stacks)
    std::vector<uint64_t> slots;  // one per thread: the warp-exchange mailbox
    std::vector<uint32_t> mma;    // 10 words per thread: an mma's A (4), B (2) and C (4 floats)
    std::vector<WarpMma> warp_mma;  // one per warp: the result of the warp's current mma
    std::vector<CopyGroups> copies;  // one per thread: its cp.async groups in flight
    std::vector<WgmmaGroups> wgmmas;  // one per thread: its wgmma groups in flight
    std::vector<char> smem_storage;
    char* smem = nullptr;  // 16-byte aligned inside smem_storage
    unsigned smem_bytes = 0;  // the launch's dynamic shared memory
    ucontext_t scheduler;
    void* scheduler_sp = nullptr;
    int current = 0;
    dim3 block_idx, block_dim, grid_dim;
    Body body = nullptr;
    const void* params = nullptr;
    std::string fault;  // the block's first fault (fault_misaligned), empty if none
    // Timing (strata_emu_set_timing): the time of every fiber run of the launch, summed, and each
    // block's critical path (run_block).
    uint64_t work_ticks = 0;
    std::vector<uint64_t> block_critical;  // each block's critical path, in the order they ran
    uint64_t most_phases = 0;               // the most barrier phases of a block (one + barriers)
};

thread_local Block* tl_block = nullptr;
// Whether this thread's launches time their fibers, and the last launch's figures.
thread_local bool tl_timing = false;
thread_local uint64_t tl_last_work_ns = 0, tl_last_critical_ns = 0, tl_last_median_ns = 0, tl_last_phases = 0;

// Timing reads a clock once per fiber run (on x86-64 the time-stamp counter, ~10 ns; the vDSO's
// clock_gettime, ~25 ns, took half of a timed emulation's time): wall time, so a fiber run the OS
// preempted counts the pause; profiles repeat and keep each kernel's least.
static uint64_t wall_ns() {
    timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
}
#if defined(__x86_64__)
static uint64_t ticks() { return __rdtsc(); }
// Nanoseconds per tick, measured once against the monotonic clock over 5 ms.
static double ns_per_tick() {
    static const double rate = [] {
        const uint64_t w0 = wall_ns(), t0 = ticks();
        while (wall_ns() - w0 < 5000000) {
        }
        return (double)(wall_ns() - w0) / (double)(ticks() - t0);
    }();
    return rate;
}
#else
static uint64_t ticks() { return wall_ns(); }
static double ns_per_tick() { return 1.0; }
#endif

}  // namespace strata_emu

// The bounds of the `__shared__` statics' section (shim.h), provided by the linker.
extern "C" char __start_strata_static_smem[] __attribute__((weak));
extern "C" char __stop_strata_static_smem[] __attribute__((weak));

namespace strata_emu {

static const size_t kStack = 64 * 1024;
static const unsigned kMaxDynamicSmem = 227 * 1024;

const dim3& thread_idx() { return tl_block->fibers[tl_block->current].tid; }
const dim3& block_idx() { return tl_block->block_idx; }
const dim3& block_dim() { return tl_block->block_dim; }
const dim3& grid_dim() { return tl_block->grid_dim; }
char* dynamic_smem() { return tl_block->smem; }
unsigned dynamic_smem_size() { return tl_block->smem_bytes; }
int lane_id() { return tl_block->fibers[tl_block->current].linear & 31; }

static void wait_in(State s) {
    Block* b = tl_block;
    Fiber& f = b->fibers[b->current];
    f.state = s;
#ifdef STRATA_FAST_SWITCH
    strata_switch(&f.sp, b->scheduler_sp);
#else
    swapcontext(&f.ctx, &b->scheduler);
#endif
}

void block_barrier() { wait_in(AT_BLOCK_BARRIER); }

void cp_async(void* dst, const void* src, bool valid) {
    if (!shared_in_bounds(dst, 16, "cp.async shared destination")) return;
    PendingCopy c;
    c.dst = static_cast<char*>(dst);
    if (valid)
        std::memcpy(c.bytes, src, 16);
    else
        std::memset(c.bytes, 0, 16);
    tl_block->copies[tl_block->current].open.push_back(c);
    // Until its wait the destination is undefined (the copy may land at any moment): all ones
    // (NaN as f32 and bf16), so that a read of it in that window, such as a wgmma still in flight
    // on the stage being refilled, shows in the results.
    std::memset(c.dst, 0xff, 16);
}

void cp_async_commit() { tl_block->copies[tl_block->current].commit(); }

void cp_async_wait(int pending) {
    tl_block->copies[tl_block->current].wait(pending, [](const PendingCopy& c) { std::memcpy(c.dst, c.bytes, 16); });
}

void wgmma_issue(void (*run)(const void*), const void* args, unsigned bytes) {
    PendingWgmma w;
    w.run = run;
    if (bytes > sizeof w.args) {
        fault_wgmma("an emulated wgmma's arguments exceed the emulator's 64-byte slot");
        return;
    }
    std::memcpy(w.args, args, bytes);
    tl_block->wgmmas[tl_block->current].open.push_back(w);
}

void wgmma_commit() { tl_block->wgmmas[tl_block->current].commit(); }

void wgmma_wait(int pending) {
    tl_block->wgmmas[tl_block->current].wait(pending, [](const PendingWgmma& w) { w.run(w.args); });
}

void fault_wgmma(const char* what) {
    Block* b = tl_block;
    if (!b->fault.empty()) return;
    const dim3& t = b->fibers[b->current].tid;
    char msg[320];
    std::snprintf(msg, sizeof msg, "wgmma: %s (block (%u,%u,%u), thread (%u,%u,%u))", what, b->block_idx.x,
                  b->block_idx.y, b->block_idx.z, t.x, t.y, t.z);
    b->fault = msg;
}

void fault_misaligned(const char* op, const void* p, unsigned bytes) {
    Block* b = tl_block;
    if (!b->fault.empty()) return;
    const dim3& t = b->fibers[b->current].tid;
    char msg[320];
    std::snprintf(msg, sizeof msg,
                  "misaligned address: %s of %u bytes at an address %u bytes past a multiple of %u "
                  "(block (%u,%u,%u), thread (%u,%u,%u))",
                  op, bytes, (unsigned)(reinterpret_cast<uintptr_t>(p) % bytes), bytes, b->block_idx.x,
                  b->block_idx.y, b->block_idx.z, t.x, t.y, t.z);
    b->fault = msg;
}

bool shared_in_bounds(const void* p, unsigned bytes, const char* op) {
    Block* b = tl_block;
    const char* c = static_cast<const char*>(p);
    if (c >= b->smem && c + bytes <= b->smem + b->smem_bytes) return true;
    if (__start_strata_static_smem != nullptr && c >= __start_strata_static_smem &&
        c + bytes <= __stop_strata_static_smem)
        return true;
    if (!b->fault.empty()) return false;
    const dim3& t = b->fibers[b->current].tid;
    const long long off = (long long)(c - b->smem);
    char msg[320];
    std::snprintf(msg, sizeof msg,
                  "out-of-range shared address: %s of %u bytes at offset %lld of the block's %u bytes of "
                  "dynamic shared memory (block (%u,%u,%u), thread (%u,%u,%u))",
                  op, bytes, off, b->smem_bytes, b->block_idx.x, b->block_idx.y, b->block_idx.z, t.x, t.y, t.z);
    b->fault = msg;
    return false;
}

void fault_dynamic_smem(unsigned need) {
    Block* b = tl_block;
    if (!b->fault.empty()) return;
    char msg[200];
    std::snprintf(msg, sizeof msg,
                  "the kernel's shared-memory layout needs %u bytes of dynamic shared memory, the launch "
                  "gave %u (the host's size is out of step with the kernel's)",
                  need, b->smem_bytes);
    b->fault = msg;
}

uint64_t warp_exchange(uint64_t mine, int src) {
    Block* b = tl_block;
    const int me = b->fibers[b->current].linear;
    const int base = me & ~31;
    b->slots[me] = mine;
    wait_in(AT_WARP_COLLECTIVE);  // everyone has written
    const int from = base + src;
    const uint64_t got = from < (int)b->fibers.size() ? b->slots[from] : mine;
    wait_in(AT_WARP_COLLECTIVE);  // everyone has read: the slots may be reused
    return got;
}

static float bf16_bits_to_float(uint32_t bits16) {
    const uint32_t u = bits16 << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

// The fragment layouts of mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 (PTX ISA), with
// lane = 4 * g + t: A reg r holds row g + 8 * (r % 2), k = 2t + 8 * (r / 2) + {0, 1}; B reg r holds
// column g, k = 2t + 8r + {0, 1}; C/D reg r holds row g + 8 * (r / 2), column 2t + (r % 2).
// Every lane deposits its fragments, the warp meets, each lane computes its four outputs in fp32.
void mma_m16n8k16_bf16(float* d, const uint32_t* a, const uint32_t* b, const float* c) {
    Block* bl = tl_block;
    const int me = bl->fibers[bl->current].linear;
    const int base = me & ~31;
    uint32_t* mine = &bl->mma[(size_t)me * 10];
    for (int i = 0; i < 4; ++i) mine[i] = a[i];
    for (int i = 0; i < 2; ++i) mine[4 + i] = b[i];
    std::memcpy(mine + 6, c, 16);
    wait_in(AT_WARP_COLLECTIVE);  // every lane has deposited its fragments
    WarpMma& wm = bl->warp_mma[base / 32];
    if (!wm.done) {
        // The first lane to resume computes the whole 16x8 result for the warp.
        float A[16][16], B[16][8];
        for (int lane = 0; lane < 32; ++lane) {
            const uint32_t* f = &bl->mma[(size_t)(base + lane) * 10];
            const int g = lane / 4, t = lane % 4;
            for (int r = 0; r < 4; ++r) {
                const int row = g + 8 * (r % 2), k = 2 * t + 8 * (r / 2);
                A[row][k] = bf16_bits_to_float(f[r] & 0xffffu);
                A[row][k + 1] = bf16_bits_to_float(f[r] >> 16);
            }
            for (int r = 0; r < 2; ++r) {
                const int k = 2 * t + 8 * r;
                B[k][g] = bf16_bits_to_float(f[4 + r] & 0xffffu);
                B[k + 1][g] = bf16_bits_to_float(f[4 + r] >> 16);
            }
            for (int r = 0; r < 4; ++r) {
                const int row = g + 8 * (r / 2), col = 2 * t + (r % 2);
                std::memcpy(&wm.D[row][col], f + 6 + r, 4);
            }
        }
        for (int row = 0; row < 16; ++row)
            for (int col = 0; col < 8; ++col) {
                float acc = wm.D[row][col];
                for (int k = 0; k < 16; ++k) acc += A[row][k] * B[k][col];
                wm.D[row][col] = acc;
            }
        wm.done = true;
    }
    const int lane = me & 31, g = lane / 4, t = lane % 4;
    for (int r = 0; r < 4; ++r) d[r] = wm.D[g + 8 * (r / 2)][2 * t + (r % 2)];
    wait_in(AT_WARP_COLLECTIVE);  // every lane has read its outputs
    wm.done = false;
}

static void trampoline() {
    Block* b = tl_block;
    b->body(b->params);
    // On the GPU, accumulators of a wgmma still in flight at exit are never written back.
    if (!b->wgmmas[b->current].empty())
        fault_wgmma("a thread exited with wgmma operations in flight (no wgmma_wait for them)");
    b->fibers[b->current].state = DONE;
#ifdef STRATA_FAST_SWITCH
    strata_switch(&b->fibers[b->current].sp, b->scheduler_sp);  // never resumed
    __builtin_unreachable();
#endif
    // ucontext: uc_link returns to the scheduler.
}

#ifdef STRATA_FAST_SWITCH
// A new fiber's stack, laid out so that the first switch to it "returns" into trampoline with
// the stack aligned as after a call.
static void* initial_stack(char* base, size_t size) {
    uint64_t* sp = reinterpret_cast<uint64_t*>((reinterpret_cast<uintptr_t>(base + size)) & ~uintptr_t(15));
    uint32_t mxcsr = 0;
    uint16_t fpucw = 0;
    asm volatile("stmxcsr %0" : "=m"(mxcsr));
    asm volatile("fnstcw %0" : "=m"(fpucw));
    const uint64_t csr = uint64_t(mxcsr) | (uint64_t(fpucw) << 32);
    *--sp = 0;                                          // fake return address of trampoline
    *--sp = reinterpret_cast<uint64_t>(&trampoline);    // where `ret` goes
    for (int i = 0; i < 6; ++i) *--sp = 0;              // rbp, rbx, r12-r15
    *--sp = csr;                                        // MXCSR and x87 control word
    return sp;
}
#endif

// Runs one block to completion; false (with a message) on a deadlock. `descending_first`: the
// direction of the first sweep over its threads (they alternate after it).
static bool run_block(Block& b, bool descending_first, char* err, unsigned errlen) {
    const int n = (int)b.fibers.size();
    for (int i = 0; i < n; ++i) {
        Fiber& f = b.fibers[i];
        f.state = READY;
#ifdef STRATA_FAST_SWITCH
        f.sp = initial_stack(b.stacks + (size_t)i * kStack, kStack);
#else
        getcontext(&f.ctx);
        f.ctx.uc_stack.ss_sp = b.stacks + (size_t)i * kStack;
        f.ctx.uc_stack.ss_size = kStack;
        f.ctx.uc_link = &b.scheduler;
        makecontext(&f.ctx, trampoline, 0);
#endif
    }
    // With timing on, the block's critical path: the lanes of a warp run in step (a warp's time in
    // a sweep is its slowest lane's run), warps run side by side between block barriers (a phase
    // lasts as long as its slowest warp's summed sweeps), phases one after another.
    const bool timing = tl_timing;
    const int warps = (n + 31) / 32;
    std::vector<uint64_t> warp_sweep(timing ? warps : 0), warp_phase(timing ? warps : 0);
    uint64_t critical = 0, mark = 0, phases = 0;
    auto end_phase = [&] {
        ++phases;
        if (!timing) return;
        critical += *std::max_element(warp_phase.begin(), warp_phase.end());
        std::fill(warp_phase.begin(), warp_phase.end(), 0);
    };
    for (bool descending = descending_first;; descending = !descending) {
        if (timing) mark = ticks();  // the releases between sweeps are the scheduler's own time
        for (int k = 0; k < n; ++k) {
            const int i = descending ? n - 1 - k : k;
            if (b.fibers[i].state == READY) {
                b.current = i;
#ifdef STRATA_FAST_SWITCH
                strata_switch(&b.scheduler_sp, b.fibers[i].sp);
#else
                swapcontext(&b.scheduler, &b.fibers[i].ctx);
#endif
                if (timing) {
                    // Since the previous run ended: this run and the scheduler's few steps to it.
                    const uint64_t now = ticks(), ran = now - mark;
                    mark = now;
                    b.work_ticks += ran;
                    warp_sweep[i / 32] = std::max(warp_sweep[i / 32], ran);
                }
            }
        }
        if (timing) {
            for (int w = 0; w < warps; ++w) {
                warp_phase[w] += warp_sweep[w];
                warp_sweep[w] = 0;
            }
        }
        int live = 0, at_barrier = 0;
        bool released = false;
        for (int w = 0; w < n; w += 32) {
            int wlive = 0, wwait = 0;
            for (int i = w; i < n && i < w + 32; ++i) {
                if (b.fibers[i].state != DONE) ++wlive;
                if (b.fibers[i].state == AT_WARP_COLLECTIVE) ++wwait;
            }
            if (wlive > 0 && wwait == wlive) {
                for (int i = w; i < n && i < w + 32; ++i) {
                    if (b.fibers[i].state == AT_WARP_COLLECTIVE) b.fibers[i].state = READY;
                }
                released = true;
            }
        }
        for (int i = 0; i < n; ++i) {
            if (b.fibers[i].state != DONE) ++live;
            if (b.fibers[i].state == AT_BLOCK_BARRIER) ++at_barrier;
        }
        if (live == 0) {
            end_phase();
            if (timing) b.block_critical.push_back(critical);
            b.most_phases = std::max(b.most_phases, phases);
            return true;
        }
        if (released) continue;
        if (at_barrier == live) {
            for (int i = 0; i < n; ++i) {
                if (b.fibers[i].state == AT_BLOCK_BARRIER) b.fibers[i].state = READY;
            }
            end_phase();
            continue;
        }
        std::snprintf(err, errlen,
                      "deadlock in block (%u,%u,%u): %d of %d live threads wait at __syncthreads, the others "
                      "at a warp collective their warp does not complete",
                      b.block_idx.x, b.block_idx.y, b.block_idx.z, at_barrier, live);
        return false;
    }
}

// The fibers' stacks, kept from launch to launch on each thread (freed when it exits): a launch of
// 512 threads needs 32 MB, and a fresh zero-filled allocation per launch took most of an emulated
// LSTM step (page faults and the fill: system time). Stacks need no zeroing. A launch inside a
// launch (none today) would take a buffer of its own.
thread_local std::vector<char> tl_stacks;
thread_local bool tl_stacks_in_use = false;
struct FiberStacks {
    char* base;
    bool owned;
    explicit FiberStacks(size_t bytes) : owned(tl_stacks_in_use) {
        if (owned) {
            base = new char[bytes];
            return;
        }
        tl_stacks_in_use = true;
        if (tl_stacks.size() < bytes) tl_stacks.resize(bytes);
        base = tl_stacks.data();
    }
    ~FiberStacks() {
        if (owned)
            delete[] base;
        else
            tl_stacks_in_use = false;
    }
    FiberStacks(const FiberStacks&) = delete;
    FiberStacks& operator=(const FiberStacks&) = delete;
};

int launch(Body body, dim3 grid, dim3 block, unsigned smem, const void* params, char* err, unsigned errlen) {
    const long threads = (long)block.x * block.y * block.z;
    if (threads <= 0 || threads > 1024 || block.x > 1024 || block.y > 1024 || block.z > 64) {
        std::snprintf(err, errlen, "block (%u,%u,%u): CUDA allows 1..1024 threads, z at most 64", block.x,
                      block.y, block.z);
        return 1;
    }
    if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > 0x7fffffffu || grid.y > 65535 || grid.z > 65535) {
        std::snprintf(err, errlen, "grid (%u,%u,%u): CUDA allows x in 1..2^31-1, y and z in 1..65535", grid.x,
                      grid.y, grid.z);
        return 1;
    }
    // The H100's most per block, which the CUDA runtime opts each launch of more than 48 KB into
    // (src/runtime/cuda.rs).
    if (smem > kMaxDynamicSmem) {
        std::snprintf(err, errlen, "%u bytes of dynamic shared memory: an H100 block has at most %u", smem,
                      kMaxDynamicSmem);
        return 1;
    }
    Block b;
    b.body = body;
    b.params = params;
    b.block_dim = block;
    b.grid_dim = grid;
    b.fibers.resize(threads);
    FiberStacks stacks((size_t)threads * kStack);
    b.stacks = stacks.base;
    b.slots.assign(threads, 0);
    b.mma.assign((size_t)threads * 10, 0);
    b.warp_mma.assign((threads + 31) / 32, WarpMma());
    b.copies.assign(threads, CopyGroups());
    b.wgmmas.assign(threads, WgmmaGroups());
    b.smem_storage.assign(smem + 32, 0);
    b.smem_bytes = smem;
    b.smem = reinterpret_cast<char*>((reinterpret_cast<uintptr_t>(b.smem_storage.data()) + 15) & ~uintptr_t(15));
    for (int i = 0; i < threads; ++i) {
        b.fibers[i].linear = i;
        b.fibers[i].tid = dim3(i % block.x, (i / block.x) % block.y, i / (block.x * block.y));
    }
    Block* saved = tl_block;
    tl_block = &b;
    int rc = 0;
    // Block j runs (j * step + blocks / 2) mod blocks: a step coprime to the count makes it a
    // permutation, and near 0.618 of the count puts consecutive runs far apart in both directions
    // (two blocks run in descending order).
    const uint64_t blocks = (uint64_t)grid.x * grid.y * grid.z;
    uint64_t step = blocks > 2 ? (uint64_t)(0.6180339887 * (double)blocks) : 1;
    auto gcd = [](uint64_t a, uint64_t c) {
        while (c != 0) {
            const uint64_t t = a % c;
            a = c;
            c = t;
        }
        return a;
    };
    while (blocks > 2 && gcd(step, blocks) != 1) ++step;
    for (uint64_t j = 0; j < blocks && rc == 0; ++j) {
        const uint64_t linear = (uint64_t)(((unsigned __int128)j * step + blocks / 2) % blocks);
        b.block_idx = dim3((unsigned)(linear % grid.x), (unsigned)(linear / grid.x % grid.y),
                           (unsigned)(linear / grid.x / grid.y));
        // Shared memory (dynamic and static) starts undefined on the GPU: all ones here (NaN as
        // f32 and as bf16), so a read before any write shows in results rather than reading zero
        // or the previous block's values.
        std::memset(b.smem, 0xff, smem);
        for (CopyGroups& c : b.copies) c = CopyGroups();
        for (WgmmaGroups& w : b.wgmmas) w = WgmmaGroups();
        char* static_begin = __start_strata_static_smem;
        char* static_end = __stop_strata_static_smem;
        if (static_begin != nullptr && static_end > static_begin)
            std::memset(static_begin, 0xff, (size_t)(static_end - static_begin));
        // Block 0 (the only one of a one-block launch) sweeps its threads in descending order
        // first: ascending is the order in which a missing barrier is most often harmless.
        if (!run_block(b, (linear & 1) == 0, err, errlen)) rc = 2;
        if (rc == 0 && !b.fault.empty()) {
            std::snprintf(err, errlen, "%s", b.fault.c_str());
            rc = 3;
        }
    }
    tl_block = saved;
    if (tl_timing && !b.block_critical.empty()) {
        std::vector<uint64_t>& c = b.block_critical;
        const double scale = ns_per_tick();
        tl_last_work_ns = (uint64_t)(b.work_ticks * scale);
        tl_last_critical_ns = (uint64_t)(*std::max_element(c.begin(), c.end()) * scale);
        std::nth_element(c.begin(), c.begin() + c.size() / 2, c.end());
        tl_last_median_ns = (uint64_t)(c[c.size() / 2] * scale);
        tl_last_phases = b.most_phases;
    }
    return rc;
}

}  // namespace strata_emu

// Timing of this thread's launches, for crate::runtime::emulated_profile_of: on or off, and the
// last launch's CPU time over all its fibers, its longest block's critical path (run_block), its
// median block's, and the most barrier phases a block went through.
extern "C" void strata_emu_set_timing(int on) { strata_emu::tl_timing = on != 0; }
extern "C" void strata_emu_last_timing(uint64_t* work_ns, uint64_t* critical_ns, uint64_t* median_ns,
                                       uint64_t* phases) {
    *work_ns = strata_emu::tl_last_work_ns;
    *critical_ns = strata_emu::tl_last_critical_ns;
    *median_ns = strata_emu::tl_last_median_ns;
    *phases = strata_emu::tl_last_phases;
}
