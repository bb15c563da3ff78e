// strata/kernels/mlsuperb.cu: the ML-SUPERB head's per-frame glue (its convolutions are
// conv2d.cu's patches + hconv.cu's GEMM; its attention is attention.cu's packed attention):
// - row_mix: y[r, :] = sum over r's taps of w * x[src, :], taps as CSR (row_ptr, src, w), summed
//   in tap order. SpecAugment's bicubic time warp (4 taps a row; CPU reference
//   src/ops/resample.rs mix_forward), and with the transposed taps its backward.
// - specaug_mask: y = x * keep, keep = 0 on a time-masked frame, else the frame's utterance's
//   feature-mask row: SpecAugment's masks (CPU reference: mlsuperb_head::specaug_mask) without a
//   [frames, c] mask in memory. Its own adjoint.
// - scale_add_positions: y = x * scale + pe(t, j), t the frame's position in its utterance,
//   pe(t, 2i) = sin(t r_i), pe(t, 2i + 1) = cos(t r_i), the rates r_i from the host (ESPnet's
//   x * sqrt(d) + PositionalEncoding; CPU reference mlsuperb_head::positions). The backward is a
//   scale (convert.cu).
#ifndef STRATA_COMMON_INCLUDED
#include "common.cuh"
#endif

struct RowMixParams {
    const float* x;      // [in rows, c]
    float* y;            // [rows, c]
    const int* row_ptr;  // [rows + 1]
    const int* src;      // [taps]
    const float* w;      // [taps]
    int64_t rows;
    int c;
};

extern "C" __global__ void row_mix(const RowMixParams p) {
    const int64_t total = p.rows * p.c;
    for (int64_t e = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; e < total; e += (int64_t)gridDim.x * blockDim.x) {
        const int64_t r = e / p.c;
        const int ch = (int)(e % p.c);
        float acc = 0.0f;
        for (int i = p.row_ptr[r]; i < p.row_ptr[r + 1]; ++i) acc += p.w[i] * p.x[(int64_t)p.src[i] * p.c + ch];
        p.y[e] = acc;
    }
}
STRATA_EMU_ENTRY(row_mix, RowMixParams)

struct SpecMaskParams {
    const float* x;          // [rows, c]
    float* y;                // [rows, c]
    const int* row_code;     // [rows]: the frame's utterance, or -1 where the frame is masked
    const float* chan_keep;  // [utterances, c]: 1 kept, 0 masked
    int64_t rows;
    int c;
};

extern "C" __global__ void specaug_mask(const SpecMaskParams p) {
    const int64_t total = p.rows * p.c;
    for (int64_t e = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; e < total; e += (int64_t)gridDim.x * blockDim.x) {
        const int code = p.row_code[e / p.c];
        const float keep = code < 0 ? 0.0f : p.chan_keep[(int64_t)code * p.c + e % p.c];
        p.y[e] = p.x[e] * keep;
    }
}
STRATA_EMU_ENTRY(specaug_mask, SpecMaskParams)

struct PositionsParams {
    const float* x;       // [rows, d]
    float* y;             // [rows, d]
    const int* offsets;   // [utterances + 1]
    const float* rates;   // [(d + 1) / 2]
    int64_t rows;
    int utterances, d;
    float scale;
};

extern "C" __global__ void scale_add_positions(const PositionsParams p) {
    const int64_t total = p.rows * p.d;
    for (int64_t e = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; e < total; e += (int64_t)gridDim.x * blockDim.x) {
        const int64_t r = e / p.d;
        const int j = (int)(e % p.d);
        const int t = (int)(r - p.offsets[utterance_of(p.offsets, p.utterances, r)]);
        const float a = (float)t * p.rates[j / 2];
        p.y[e] = p.x[e] * p.scale + ((j & 1) ? cosf(a) : sinf(a));
    }
}
STRATA_EMU_ENTRY(scale_add_positions, PositionsParams)
