// strata/kernels/cross_entropy.cu: softmax + cross-entropy + dlogits fused in one kernel, one block
// per row (llm.c's fused classifier), PyTorch's 'mean' / 'sum'. CPU reference:
// src/ops/cross_entropy.rs (same formula: m = max, s = sum exp(x - m), loss = ln s + m - x[y],
// dlogits = exp(x - m) / s * w - w [y]). The row's logits are read twice (max, then sum and grads
// fused); the per-row losses go to the host, which sums them in row order.
#ifndef STRATA_COMMON_INCLUDED
#include "common.cuh"
#endif

struct CrossEntropyParams {
    const float* logits;  // [rows, classes]
    const int* labels;    // [rows], each < classes
    float* loss_rows;     // [rows], unweighted
    float* dlogits;       // [rows, classes], d(reduced loss) / d logits
    int rows, classes, mean;
};

extern "C" __global__ void cross_entropy_fwd_bwd(const CrossEntropyParams p) {
    __shared__ float red[32];
    const int row = blockIdx.x;
    const float* x = p.logits + (int64_t)row * p.classes;
    float* d = p.dlogits + (int64_t)row * p.classes;
    float m = strata_bits_float(0xff800000u);
    for (int c = threadIdx.x; c < p.classes; c += blockDim.x) m = fmaxf(m, x[c]);
    m = block_max(m, red);
    float s = 0.0f;
    for (int c = threadIdx.x; c < p.classes; c += blockDim.x) s += expf(x[c] - m);
    s = block_sum(s, red);
    const int y = p.labels[row];
    const float w = p.mean ? 1.0f / (float)p.rows : 1.0f;
    if (threadIdx.x == 0) p.loss_rows[row] = logf(s) + m - x[y];
    for (int c = threadIdx.x; c < p.classes; c += blockDim.x) {
        float g = expf(x[c] - m) / s * w;
        if (c == y) g -= w;
        d[c] = g;
    }
}
STRATA_EMU_ENTRY(cross_entropy_fwd_bwd, CrossEntropyParams)
