// strata/kernels/softmax.cu: log-softmax over the last axis, forward and backward, one block per
// row (the PR head's logits [frames, V] before CTC). CPU reference: src/ops/softmax.rs.
//   forward:  y = x - (ln sum exp(x - m) + m),  m = max x
//   backward: dx = dy - exp(y) * sum(dy)         (from the forward output y)
#ifndef STRATA_COMMON_INCLUDED
#include "common.cuh"
#endif

struct LogSoftmaxParams {
    const float* x;   // forward: x; backward: y
    const float* dy;  // backward only
    float* out;       // forward: y; backward: dx
    int rows, d;
};

extern "C" __global__ void log_softmax_forward(const LogSoftmaxParams p) {
    __shared__ float red[32];
    const float* x = p.x + (int64_t)blockIdx.x * p.d;
    float* y = p.out + (int64_t)blockIdx.x * p.d;
    float m = strata_bits_float(0xff800000u);
    for (int c = threadIdx.x; c < p.d; c += blockDim.x) m = fmaxf(m, x[c]);
    m = block_max(m, red);
    float s = 0.0f;
    for (int c = threadIdx.x; c < p.d; c += blockDim.x) s += expf(x[c] - m);
    const float lse = logf(block_sum(s, red)) + m;
    for (int c = threadIdx.x; c < p.d; c += blockDim.x) y[c] = x[c] - lse;
}
STRATA_EMU_ENTRY(log_softmax_forward, LogSoftmaxParams)

extern "C" __global__ void log_softmax_backward(const LogSoftmaxParams p) {
    __shared__ float red[32];
    const float* y = p.x + (int64_t)blockIdx.x * p.d;
    const float* g = p.dy + (int64_t)blockIdx.x * p.d;
    float* dx = p.out + (int64_t)blockIdx.x * p.d;
    float s = 0.0f;
    for (int c = threadIdx.x; c < p.d; c += blockDim.x) s += g[c];
    s = block_sum(s, red);
    for (int c = threadIdx.x; c < p.d; c += blockDim.x) dx[c] = g[c] - expf(y[c]) * s;
}
STRATA_EMU_ENTRY(log_softmax_backward, LogSoftmaxParams)
