// strata/kernels/speaker.cu: the speaker-verification head's own ops on the device (its Linear
// layers run on the tensor-core Linear of hconv.cu). CPU reference: src/ops/speaker.rs.
// - rows_gather: a TDNN layer's windows, y[r] = x[idx[r]] (bf16 rows; the host builds idx so that
//   [frames' * context, c] read as [frames', context * c] is the window layout).
// - rows_gather_sum: its backward without atomics, dx[f] = sum_j dy[inv[f * context + j]]
//   (inv -1 = no window uses that slot), the sources summed in a fixed order: deterministic.
// - stats_pool_forward / _backward: each utterance's mean and unbiased std (torch.std; its
//   gradient 0 where the std is 0, as torch), a block per utterance and 32 channels, 8 warps over
//   the frames in a fixed order (deterministic).
// - l2_normalize_forward / _backward: F.normalize of each row, a block per row.
// - am_margin: AM-softmax's logits s (cos - m [j = label]); its backward is s * dy.
#ifndef STRATA_COMMON_INCLUDED
#include "common.cuh"
#endif

struct RowsGatherParams {
    const bf16* x;    // [frames, c]
    const int* idx;   // [rows]
    bf16* y;          // [rows, c]
    int rows, c;
};

extern "C" __global__ void rows_gather(const RowsGatherParams p) {
    const int64_t total = (int64_t)p.rows * p.c;
    for (int64_t e = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; e < total; e += (int64_t)gridDim.x * blockDim.x) {
        const int64_t r = e / p.c;
        const int ch = (int)(e % p.c);
        p.y[e] = p.x[(int64_t)p.idx[r] * p.c + ch];
    }
}
STRATA_EMU_ENTRY(rows_gather, RowsGatherParams)

struct RowsGatherSumParams {
    const float* dy;  // [rows, c]
    const int* inv;   // [frames, context], -1 where no row reads the frame
    float* dx;        // [frames, c]
    int frames, context, c;
};

extern "C" __global__ void rows_gather_sum(const RowsGatherSumParams p) {
    const int64_t total = (int64_t)p.frames * p.c;
    for (int64_t e = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; e < total; e += (int64_t)gridDim.x * blockDim.x) {
        const int64_t f = e / p.c;
        const int ch = (int)(e % p.c);
        float acc = 0.0f;
        for (int j = 0; j < p.context; ++j) {
            const int r = p.inv[f * p.context + j];
            if (r >= 0) acc += p.dy[(int64_t)r * p.c + ch];
        }
        p.dx[e] = acc;
    }
}
STRATA_EMU_ENTRY(rows_gather_sum, RowsGatherSumParams)

struct StatsPoolParams {
    const float* x;       // [frames, c]
    const float* y;       // forward: out [utterances, 2c]; backward: the forward's output
    const float* dy;      // backward: [utterances, 2c]
    float* out;           // forward: y; backward: dx [frames, c]
    const int* offsets;   // [utterances + 1], every utterance >= 2 frames
    int utterances, c;
};

// Block (utterance, 32 channels) of FRAME_SUM_WARPS warps (common.cuh's frames_column_sum): the
// mean, then the squared deviations from it.
extern "C" __global__ void stats_pool_forward(const StatsPoolParams p) {
    __shared__ float sums[FRAME_SUM_WARPS][32];
    const int u = blockIdx.x, s = p.offsets[u], e = p.offsets[u + 1];
    const int ch = blockIdx.y * 32 + (threadIdx.x & 31);
    const bool valid = ch < p.c;
    const float n = (float)(e - s);
    const float mean = frames_column_sum(s, e, valid, [&](int t) { return p.x[(int64_t)t * p.c + ch]; }, sums) / n;
    const float sq = frames_column_sum(s, e, valid, [&](int t) {
        const float d = p.x[(int64_t)t * p.c + ch] - mean;
        return d * d;
    }, sums);
    if (threadIdx.x >= 32 || !valid) return;
    float* y = p.out + (int64_t)u * 2 * p.c;
    y[ch] = mean;
    y[p.c + ch] = sqrtf(sq / (n - 1.0f));
}
STRATA_EMU_ENTRY(stats_pool_forward, StatsPoolParams)

// Block (utterance, 32 channels), each warp writing a residue class of the frames.
extern "C" __global__ void stats_pool_backward(const StatsPoolParams p) {
    const int u = blockIdx.x, s = p.offsets[u], e = p.offsets[u + 1];
    const int ch = blockIdx.y * 32 + (threadIdx.x & 31), w = threadIdx.x >> 5;
    if (ch >= p.c) return;
    const float n = (float)(e - s);
    const float* y = p.y + (int64_t)u * 2 * p.c;
    const float* dy = p.dy + (int64_t)u * 2 * p.c;
    const float mean = y[ch], std = y[p.c + ch];
    // torch's std backward is 0 where the std is 0 (a channel constant over the utterance).
    const float a = dy[ch] / n, b = std != 0.0f ? dy[p.c + ch] / ((n - 1.0f) * std) : 0.0f;
    for (int t = s + w; t < e; t += FRAME_SUM_WARPS) {
        const int64_t i = (int64_t)t * p.c + ch;
        p.out[i] = a + b * (p.x[i] - mean);
    }
}
STRATA_EMU_ENTRY(stats_pool_backward, StatsPoolParams)

struct L2NormalizeParams {
    const float* x;   // [rows, c]
    const float* dy;  // backward: [rows, c]
    float* out;       // forward: y; backward: dx
    int rows, c;
};

// F.normalize's clamp: ||x|| below 1e-12 divides by 1e-12.
__device__ __forceinline__ float l2_row_norm(const float* x, int c, float* scratch) {
    float s = 0.0f;
    for (int i = threadIdx.x; i < c; i += blockDim.x) s += x[i] * x[i];
    return sqrtf(block_sum(s, scratch));
}

extern "C" __global__ void l2_normalize_forward(const L2NormalizeParams p) {
    __shared__ float red[32];
    const float* x = p.x + (int64_t)blockIdx.x * p.c;
    float* y = p.out + (int64_t)blockIdx.x * p.c;
    const float d = fmaxf(l2_row_norm(x, p.c, red), 1e-12f);
    for (int i = threadIdx.x; i < p.c; i += blockDim.x) y[i] = x[i] / d;
}
STRATA_EMU_ENTRY(l2_normalize_forward, L2NormalizeParams)

extern "C" __global__ void l2_normalize_backward(const L2NormalizeParams p) {
    __shared__ float red[32];
    const float* x = p.x + (int64_t)blockIdx.x * p.c;
    const float* g = p.dy + (int64_t)blockIdx.x * p.c;
    float* dx = p.out + (int64_t)blockIdx.x * p.c;
    const float norm = l2_row_norm(x, p.c, red);
    if (norm > 1e-12f) {
        float s = 0.0f;
        for (int i = threadIdx.x; i < p.c; i += blockDim.x) s += x[i] * g[i];
        const float dot = block_sum(s, red) / norm;
        for (int i = threadIdx.x; i < p.c; i += blockDim.x) dx[i] = (g[i] - x[i] / norm * dot) / norm;
    } else {
        for (int i = threadIdx.x; i < p.c; i += blockDim.x) dx[i] = g[i] / 1e-12f;
    }
}
STRATA_EMU_ENTRY(l2_normalize_backward, L2NormalizeParams)

struct AmMarginParams {
    const float* x;       // forward: cosines [rows, classes]; backward: dy
    const int* labels;    // [rows] (forward only)
    float* out;           // forward: logits; backward: dx
    int rows, classes, backward;
    float scale, margin;
};

extern "C" __global__ void am_margin(const AmMarginParams p) {
    const int64_t total = (int64_t)p.rows * p.classes;
    for (int64_t e = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; e < total; e += (int64_t)gridDim.x * blockDim.x) {
        if (p.backward) {
            p.out[e] = p.scale * p.x[e];
        } else {
            const int row = (int)(e / p.classes), j = (int)(e % p.classes);
            p.out[e] = p.scale * (p.x[e] - (j == p.labels[row] ? p.margin : 0.0f));
        }
    }
}
STRATA_EMU_ENTRY(am_margin, AmMarginParams)
