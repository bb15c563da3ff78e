// strata/kernels/pooling.cu: mean over each utterance's frames of a packed batch (the utterance
// classifier's pooling), forward and backward; and each frame minus its utterance's mean (the
// ML-SUPERB head's UtteranceMVN, its own adjoint). CPU reference: src/ops/pooling.rs.
// Forward: block (u, 32 channels), 8 warps over the frames in a fixed order (deterministic), times
// 1 / frames. Backward: every frame of utterance u gets dy[u] / frames (grid-stride over frames).
#ifndef STRATA_COMMON_INCLUDED
#include "common.cuh"
#endif

struct MeanPoolParams {
    const float* in;      // forward: x [frames, c]; backward: dy [utterances, c]
    const int* offsets;   // [utterances + 1]
    float* out;           // forward: y [utterances, c]; backward: dx [frames, c]
    int utterances, frames, c;
};

// Block (utterance, 32 channels) of FRAME_SUM_WARPS warps (common.cuh's frames_column_sum).
extern "C" __global__ void mean_pool_forward(const MeanPoolParams p) {
    __shared__ float sums[FRAME_SUM_WARPS][32];
    const int u = blockIdx.x, s = p.offsets[u], e = p.offsets[u + 1];
    const int ch = blockIdx.y * 32 + (threadIdx.x & 31);
    const float total =
        frames_column_sum(s, e, ch < p.c, [&](int t) { return p.in[(int64_t)t * p.c + ch]; }, sums);
    if (threadIdx.x < 32 && ch < p.c) p.out[(int64_t)u * p.c + ch] = total * (1.0f / (float)(e - s));
}
STRATA_EMU_ENTRY(mean_pool_forward, MeanPoolParams)

extern "C" __global__ void mean_pool_backward(const MeanPoolParams p) {
    for (int t = blockIdx.x; t < p.frames; t += gridDim.x) {
        const int lo = utterance_of(p.offsets, p.utterances, t);
        const float inv = 1.0f / (float)(p.offsets[lo + 1] - p.offsets[lo]);
        for (int ch = threadIdx.x; ch < p.c; ch += blockDim.x) p.out[(int64_t)t * p.c + ch] = p.in[(int64_t)lo * p.c + ch] * inv;
    }
}
STRATA_EMU_ENTRY(mean_pool_backward, MeanPoolParams)

// y = x - mean of x's utterance, per channel: block (u, 32 channels), the frames summed as the
// mean pool's and scaled by 1 / frames as the CPU's mean (deterministic), then each warp writes its
// frames. The map is self-adjoint, so the backward is this kernel on dy.
struct CenterParams {
    const float* x;      // [frames, c]
    float* y;            // [frames, c]
    const int* offsets;  // [utterances + 1]
    int utterances, c;
};

extern "C" __global__ void utterance_center(const CenterParams p) {
    __shared__ float sums[FRAME_SUM_WARPS][32];
    const int u = blockIdx.x, ch = blockIdx.y * 32 + (threadIdx.x & 31), w = threadIdx.x >> 5;
    const int s = p.offsets[u], e = p.offsets[u + 1];
    const float sum =
        frames_column_sum(s, e, ch < p.c, [&](int t) { return p.x[(int64_t)t * p.c + ch]; }, sums);
    const float mean = sum * (1.0f / (float)(e - s));
    if (ch >= p.c) return;
    for (int t = s + w; t < e; t += FRAME_SUM_WARPS) p.y[(int64_t)t * p.c + ch] = p.x[(int64_t)t * p.c + ch] - mean;
}
STRATA_EMU_ENTRY(utterance_center, CenterParams)
