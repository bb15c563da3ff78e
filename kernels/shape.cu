// strata/kernels/shape.cu: the single-layer interface on the device, y[f, :] = x[f, layer, :] from
// the frame-major bf16 stack [n, L, D] (16-byte copies when D % 8 == 0). CPU reference:
// src/ops/shape.rs (select_layer). Concat + Proj needs no kernel of its own: the frame-major stack
// is already the concatenation [n, L * D], so it is a Linear layer over it.
#ifndef STRATA_COMMON_INCLUDED
#include "common.cuh"
#endif

struct SelectLayerParams {
    const bf16* x;
    bf16* y;
    int n, L, D, layer;
};

extern "C" __global__ void select_layer(const SelectLayerParams p) {
    const bool vec8 = (p.D & 7) == 0;
    const int per_row = vec8 ? p.D / 8 : p.D;
    const int64_t total = (int64_t)p.n * per_row;
    for (int64_t e = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; e < total; e += (int64_t)gridDim.x * blockDim.x) {
        const int64_t f = e / per_row;
        const int c = (int)(e % per_row);
        const bf16* src = p.x + (f * p.L + p.layer) * p.D;
        bf16* dst = p.y + f * p.D;
        if (vec8)
            store_bf16x8(dst + 8 * c, load_bf16x8(src + 8 * c));
        else
            dst[c] = src[c];
    }
}
STRATA_EMU_ENTRY(select_layer, SelectLayerParams)
