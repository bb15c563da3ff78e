// strata/kernels/conv2d.cu: the im2col patches of a 2-D convolution over each utterance's (time,
// feature) plane, and their adjoint: the ML-SUPERB head's Conv2dSubsampling2 runs both of its
// convolutions as a Linear over these patches (hconv.cu's GEMM). CPU reference: src/ops/conv2d.rs
// (patches_forward / patches_backward). A frame is [freq, c] (channels fastest); a patch row is
// ordered (time offset, feature offset, channel); windows never cross utterances.
//
// Forward: a gather, 16-byte copies when c % 8 == 0 (a patch row is then k * k whole 8-vectors).
// Adjoint: each input element gathers the patch entries that copied it (at most ceil(k / s)^2), in
// the order of their patch rows, as the CPU adds them: deterministic, no atomics. 8 channels a
// thread when c % 8 == 0.
#ifndef STRATA_COMMON_INCLUDED
#include "common.cuh"
#endif

struct PatchParams {
    const bf16* x;           // forward: [frames, freq, c]
    bf16* patches;           // forward: [out_frames * out_freq, k * k * c]
    const bf16* dpatches;    // adjoint: [out_frames * out_freq, k * k * c]
    float* dx;               // adjoint: [frames, freq, c]
    const int* in_offsets;   // [utterances + 1]
    const int* out_offsets;  // [utterances + 1]
    int utterances, frames, out_frames, freq, out_freq, c, k, stride;
};

// A warp per patch row (grid-stride over the rows), its lanes over the row's 16-byte chunks (single
// elements when c % 8 != 0): the row's frame, feature, utterance and source are found once a row,
// and each lane's place in the row, (time offset dt, the rest), advances by adds. A thread a chunk
// had divided for its row and searched the utterance offsets at every chunk (H200 run 2: 47% of
// the copy bandwidth at the ML-SUPERB head's second conv).
extern "C" __global__ void conv2d_patches(const PatchParams p) {
    const int vec = (p.c & 7) == 0 ? 8 : 1;
    const int span = p.k * p.c;  // a time offset's elements: k features of c channels
    const int64_t width = (int64_t)p.k * span;
    const int64_t rows = (int64_t)p.out_frames * p.out_freq;
    const int lane = threadIdx.x & 31, warps = blockDim.x >> 5;
    for (int64_t row = (int64_t)blockIdx.x * warps + (threadIdx.x >> 5); row < rows; row += (int64_t)gridDim.x * warps) {
        const int out_frame = (int)(row / p.out_freq), fo = (int)(row - (int64_t)out_frame * p.out_freq);
        const int u = utterance_of(p.out_offsets, p.utterances, out_frame);
        const int64_t first = p.in_offsets[u] + (int64_t)(out_frame - p.out_offsets[u]) * p.stride;
        const bf16* src = p.x + (first * p.freq + (int64_t)fo * p.stride) * p.c;
        bf16* dst = p.patches + row * width;
        int col = lane * vec, dt = col / span, rest = col - dt * span;
        for (; col < width; col += 32 * vec) {
            const int64_t at = (int64_t)dt * p.freq * p.c + rest;
            if (vec == 8)
                store_bf16x8(dst + col, load_bf16x8(src + at));
            else
                dst[col] = src[at];
            rest += 32 * vec;
            while (rest >= span) {  // once every span / (32 vec) steps; several a step at spans under a pass
                rest -= span;
                ++dt;
            }
        }
    }
}
STRATA_EMU_ENTRY(conv2d_patches, PatchParams)

// With c % 8 == 0 a thread takes 8 consecutive channels of one (frame, feature): one index
// decomposition and 16-byte loads for all 8 (the per-element integer work had bound this pass);
// each channel's sum keeps its order.
extern "C" __global__ void conv2d_patches_adjoint(const PatchParams p) {
    const int vec = (p.c & 7) == 0 ? 8 : 1;
    const int64_t width = (int64_t)p.k * p.k * p.c;
    const int cv = p.c / vec;  // channel groups of a (frame, feature)
    const int64_t total = (int64_t)p.frames * p.freq * cv;
    for (int64_t e = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; e < total; e += (int64_t)gridDim.x * blockDim.x) {
        const int64_t cell = e / cv;  // frame * freq + f
        const int ch = (int)(e - cell * cv) * vec;
        const int64_t frame = cell / p.freq;
        const int f = (int)(cell - frame * p.freq);
        const int u = utterance_of(p.in_offsets, p.utterances, frame);
        const int t = (int)(frame - p.in_offsets[u]);
        const int out_len = p.out_offsets[u + 1] - p.out_offsets[u];
        float acc[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
        // Descending offsets visit the patch rows in ascending order.
        for (int dt = p.k - 1; dt >= 0; --dt) {
            const int tt = t - dt;
            if (tt < 0 || tt % p.stride != 0 || tt / p.stride >= out_len) continue;
            const int64_t out_frame = p.out_offsets[u] + tt / p.stride;
            for (int df = p.k - 1; df >= 0; --df) {
                const int ff = f - df;
                if (ff < 0 || ff % p.stride != 0 || ff / p.stride >= p.out_freq) continue;
                const int64_t row = out_frame * p.out_freq + ff / p.stride;
                const bf16* src = p.dpatches + row * width + ((int64_t)dt * p.k + df) * p.c + ch;
                if (vec == 8) {
                    const bf16x8 v = load_bf16x8(src);
#pragma unroll
                    for (int i = 0; i < 4; ++i) {
                        acc[2 * i] += strata_bits_float(v.w[i] << 16);
                        acc[2 * i + 1] += strata_bits_float(v.w[i] & 0xffff0000u);
                    }
                } else {
                    acc[0] += bf16_to_float(*src);
                }
            }
        }
        // Constant indices only: a loop to the run-time `vec` indexed acc dynamically and put it in
        // local memory (ptxas: a 32-byte stack frame).
        float* dst = p.dx + cell * p.c + ch;
        if (vec == 8) {
#pragma unroll
            for (int i = 0; i < 8; ++i) dst[i] = acc[i];
        } else {
            dst[0] = acc[0];
        }
    }
}
STRATA_EMU_ENTRY(conv2d_patches_adjoint, PatchParams)
