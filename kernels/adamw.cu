// strata/kernels/adamw.cu: Adam / AdamW over every trainable parameter in ONE launch (one flat
// fp32 buffer, as in llm.c: adam_step; or a table of separate buffers: adam_step_multi), with fp32
// master weights and moments and
// an optional bf16 copy for compute; and the global gradient norm for clipping, reduced in a fixed
// order (deterministic). CPU references: src/optim/adam.rs, src/optim/clip.rs.
// Bias corrections and the step size are computed on the host (f64, rounded to f32 as the CPU
// path does); the clip coefficient is read from device memory so clipping needs no host round trip.
#ifndef STRATA_COMMON_INCLUDED
#include "common.cuh"
#endif

struct AdamParams {
    float* param;
    const float* grad;
    float* m;
    float* v;
    bf16* param_bf16;         // optional compute copy
    const float* grad_scale;  // optional: clip coefficient on the device
    int64_t n;
    float step_size;   // lr / (1 - beta1^t)
    float bc2_sqrt;    // sqrt(1 - beta2^t)
    float one_minus_beta1, beta2, one_minus_beta2, eps;
    float weight_decay;  // Adam: L2 added to the gradient
    float decay;         // AdamW: param *= decay = 1 - lr * wd
    int decoupled;
};

// The update's constants, as both entry points take them.
struct AdamConsts {
    float scale;  // the clip coefficient, or 1
    float step_size, bc2_sqrt, one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay, decay;
    int decoupled;
};

// One element's update from its raw gradient (every path runs this, so they agree bit for bit).
__device__ __forceinline__ void adam_math(const AdamConsts& c, float grad, float& p, float& m, float& v) {
    float g = grad * c.scale;
    if (c.decoupled) {
        p *= c.decay;
    } else {
        g += c.weight_decay * p;
    }
    m += c.one_minus_beta1 * (g - m);
    v = v * c.beta2 + c.one_minus_beta2 * g * g;
    const float denom = sqrtf(v) / c.bc2_sqrt + c.eps;
    p += -c.step_size * (m / denom);
}

// Elements [i, i + count) of one tensor's buffers (count <= 4): four at a time with 16-byte
// accesses (8 for the bf16 copy) where `vec` (a full group: i is a multiple of 4 and every buffer
// starts an allocation, 16-byte aligned; the emulator faults otherwise), one by one for the tail.
// Each thread then has 64 bytes of loads in flight, not 16: a memory-bound update needs them to
// come near the copy bandwidth (the scalar kernel: 79-85% on the H200). The gradient is zeroed
// after its read when `zero_grad`.
__device__ __forceinline__ void adam_group(const AdamConsts& c, float* param, float* grad, float* m_, float* v_,
                                           bf16* copy, int64_t i, int count, bool vec, int zero_grad) {
    if (vec) {
        float4_t p = load_float4(param + i), g = load_float4(grad + i);
        float4_t m = load_float4(m_ + i), v = load_float4(v_ + i);
        adam_math(c, g.x, p.x, m.x, v.x);
        adam_math(c, g.y, p.y, m.y, v.y);
        adam_math(c, g.z, p.z, m.z, v.z);
        adam_math(c, g.w, p.w, m.w, v.w);
        store_float4(param + i, p);
        store_float4(m_ + i, m);
        store_float4(v_ + i, v);
        if (zero_grad) store_float4(grad + i, float4_t{0.0f, 0.0f, 0.0f, 0.0f});
        if (copy) store_bf16x4(copy + i, pack_bf16x4(p));
        return;
    }
    for (int k = 0; k < count; ++k) {
        float p = param[i + k], m = m_[i + k], v = v_[i + k];
        adam_math(c, grad[i + k], p, m, v);
        param[i + k] = p;
        m_[i + k] = m;
        v_[i + k] = v;
        if (zero_grad) grad[i + k] = 0.0f;
        if (copy) copy[i + k] = float_to_bf16(p);
    }
}

extern "C" __global__ void adam_step(const AdamParams a) {
    const AdamConsts c{a.grad_scale ? a.grad_scale[0] : 1.0f, a.step_size, a.bc2_sqrt, a.one_minus_beta1, a.beta2,
                       a.one_minus_beta2, a.eps, a.weight_decay, a.decay, a.decoupled};
    // A thread per group of 4 elements, the grid striding over the groups.
    for (int64_t i = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) * 4; i < a.n; i += (int64_t)gridDim.x * blockDim.x * 4) {
        const int count = a.n - i < 4 ? (int)(a.n - i) : 4;
        adam_group(c, a.param, (float*)a.grad, a.m, a.v, a.param_bf16, i, count, count == 4, 0);
    }
}
STRATA_EMU_ENTRY(adam_step, AdamParams)

// Multi-tensor Adam / AdamW: every parameter of a model in one launch, each a separate buffer
// listed in a device table (blockIdx.y = the tensor, blocks stride over its elements), the
// gradient optionally zeroed as it is consumed (the next step's accumulation starts from 0 without
// another pass).
struct AdamTensor {
    float* param;
    float* grad;
    float* m;
    float* v;
    bf16* param_bf16;  // or null
    int64_t n;
    // sum_squares_multi: this tensor's blocks (as sum_squares_partial's grid for it alone) and
    // where their partial sums start, so the partials come out as the per-tensor launches lay them.
    int parts, part_offset;
    // adam_step_multi: this tensor's first block (it has ceil(n / ADAM_MULTI_CHUNK) of them).
    int block0;
};

struct AdamMultiParams {
    const AdamTensor* tensors;
    int count, zero_grad;
    const float* grad_scale;
    float step_size, bc2_sqrt, one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay, decay;
    int decoupled;
};

// Elements per block of adam_step_multi: every tensor gets ceil(n / chunk) blocks of one flat grid
// (a block finds its tensor by binary search over the table's block0), so no block is idle; a
// grid of the largest tensor's blocks for every tensor left most of a small tensor's blocks with
// nothing to do (HConv-Base's table: 59% of the copy bandwidth, the flat buffer 79%).
#define ADAM_MULTI_CHUNK 1024

extern "C" __global__ void adam_step_multi(const AdamMultiParams a) {
    const AdamTensor t = a.tensors[run_holding(a.count, blockIdx.x, [&](int i) { return a.tensors[i].block0; })];
    const AdamConsts c{a.grad_scale ? a.grad_scale[0] : 1.0f, a.step_size, a.bc2_sqrt, a.one_minus_beta1, a.beta2,
                       a.one_minus_beta2, a.eps, a.weight_decay, a.decay, a.decoupled};
    const int64_t base = (int64_t)(blockIdx.x - t.block0) * ADAM_MULTI_CHUNK;
    // A thread per group of 4 elements of the block's chunk (256 threads: the whole chunk).
    for (int k = threadIdx.x * 4; k < ADAM_MULTI_CHUNK; k += blockDim.x * 4) {
        const int64_t i = base + k;
        if (i >= t.n) break;
        const int count = t.n - i < 4 ? (int)(t.n - i) : 4;
        adam_group(c, t.param, t.grad, t.m, t.v, t.param_bf16, i, count, count == 4, a.zero_grad);
    }
}
STRATA_EMU_ENTRY(adam_step_multi, AdamMultiParams)

struct SumSquaresParams {
    const float* x;
    float* partial;  // [gridDim.x]
    int64_t n;
};

extern "C" __global__ void sum_squares_partial(const SumSquaresParams a) {
    __shared__ float scratch[32];
    float s = 0.0f;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < a.n; i += (int64_t)gridDim.x * blockDim.x) {
        s += a.x[i] * a.x[i];
    }
    const float t = block_sum(s, scratch);
    if (threadIdx.x == 0) a.partial[blockIdx.x] = t;
}
STRATA_EMU_ENTRY(sum_squares_partial, SumSquaresParams)

struct SumSquaresMultiParams {
    const AdamTensor* tensors;
    float* partial;  // [sum of the tensors' parts]
    int count;
};

// The squared-gradient partial sums of every tensor of the table in ONE launch, one block per
// partial (grid.x = every tensor's parts): block part_offset + x is block x of
// sum_squares_partial over that tensor's gradient, bit for bit.
extern "C" __global__ void sum_squares_multi(const SumSquaresMultiParams a) {
    __shared__ float scratch[32];
    const AdamTensor t = a.tensors[run_holding(a.count, blockIdx.x, [&](int i) { return a.tensors[i].part_offset; })];
    const int64_t x = (int64_t)blockIdx.x - t.part_offset;
    float s = 0.0f;
    for (int64_t i = x * blockDim.x + threadIdx.x; i < t.n; i += (int64_t)t.parts * blockDim.x) {
        s += t.grad[i] * t.grad[i];
    }
    const float total = block_sum(s, scratch);
    if (threadIdx.x == 0) a.partial[blockIdx.x] = total;
}
STRATA_EMU_ENTRY(sum_squares_multi, SumSquaresMultiParams)

struct ClipCoefParams {
    const float* partial;
    int parts;
    float max_norm;
    float* norm;  // [1]: the global norm
    float* coef;  // [1]: min(max_norm / (norm + 1e-6), 1)
};

extern "C" __global__ void clip_coefficient(const ClipCoefParams a) {
    __shared__ float scratch[32];
    float s = 0.0f;
    for (int i = threadIdx.x; i < a.parts; i += blockDim.x) s += a.partial[i];
    const float total = block_sum(s, scratch);
    if (threadIdx.x == 0) {
        const float norm = sqrtf(total);
        a.norm[0] = norm;
        a.coef[0] = fminf(a.max_norm / (norm + 1e-6f), 1.0f);
    }
}
STRATA_EMU_ENTRY(clip_coefficient, ClipCoefParams)
