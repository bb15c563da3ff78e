// strata/kernels/hconv.cu: HConv's convolution over the layer axis as implicit GEMMs on tensor
// cores: forward (bias + ReLU + flatten fused) and backward (input gradient; weight and bias
// gradients). CPU reference: src/ops/layer_conv.rs (+ ReLU, + the channel-major flatten).
//
//   y[r, co] = relu(bias[co] + sum_kk A[r, kk] * W[co, kk]),  r = (frame f, output position lo),
//   kk = (tap kw, channel ci), A[r, kk] = x[f, lo*stride - pad + kw, ci] (0 outside the layers).
//
// x: bf16 [n, l_in, c_in] (frame-major stack or the previous conv's output); w: bf16 [c_out, K],
// K = kernel * c_in, tap-major (the host reorders PyTorch's [c_out, c_in, k]); bias f32; y bf16,
// either [n, l_out, c_out] or, for the last conv, flattened channel-major [n, c_out * l_out].
// Three families of kernels:
// - general (any sizes): 4 warps, a 64 x 64 tile of y, K 32 at a time through shared memory
//   (out-of-range rows, columns and K zero-filled), mma.sync m16n8k16, fp32 accumulation;
// - vectorized (_vec; c_in a multiple of 8, any c_out): 128 x 128 tiles, cp.async in a
//   HV_STAGES-deep pipeline (dynamic shared memory), ldmatrix, mma.sync;
// - wgmma (_wgmma; the same tiles on Hopper's warpgroup MMA): only in this file's sm_90a build
//   (STRATA_HAS_WGMMA), which the host compiles beside the sm_90 one.
// Bias + ReLU (+ flatten) fused into every forward's epilogue.
#ifndef STRATA_COMMON_INCLUDED
#include "common.cuh"
#endif

struct HConvFwdParams {
    const bf16* x;
    const bf16* w;
    const float* bias;
    bf16* y;
    int n, l_in, c_in, c_out, kernel, stride, pad, l_out, flatten;
    // HConv sets relu = 1 and y32 = null. At L = 1, kernel 1 these kernels are a Linear layer
    // (the implicit GEMM is then the plain GEMM): relu = 0, and y32 non-null for fp32 outputs
    // (logits) instead of y.
    int relu;
    float* y32;
};

__device__ __forceinline__ float hc_epilogue(const HConvFwdParams& p, float v) { return p.relu ? fmaxf(v, 0.0f) : v; }

// Every forward kernel's epilogue for one accumulator: bias (+ ReLU), then y in its layout (plain
// [rows, c_out] or the last conv's channel-major flatten) as bf16, or y32 in fp32.
__device__ __forceinline__ void hc_fwd_store(const HConvFwdParams& p, int64_t row, int co, float acc, int64_t rows,
                                             int c_out, int l_out) {
    if (row >= rows || co >= c_out) return;
    const float v = hc_epilogue(p, acc + p.bias[co]);
    const int64_t f = row / l_out;
    const int lo = (int)(row % l_out);
    const int64_t at = p.flatten ? f * c_out * l_out + (int64_t)co * l_out + lo : row * c_out + co;
    if (p.y32)
        p.y32[at] = v;
    else
        p.y[at] = float_to_bf16(v);
}

// Two adjacent accumulators of one row (channels co, co + 1; co even, as the mma and wgmma
// fragments place them): one 4-byte store of both bf16 values where y is plain bf16 and the pair
// lies whole in an even-width row (HConv's inner convs, every Linear to bf16 with an even width),
// else hc_fwd_store each.
__device__ __forceinline__ void hc_fwd_store2(const HConvFwdParams& p, int64_t row, int co, float acc0, float acc1,
                                             int64_t rows, int c_out, int l_out) {
    if (!p.flatten && !p.y32 && (c_out & 1) == 0 && co + 1 < c_out && row < rows) {
        store_bf16x2(p.y + row * c_out + co, float_to_bf16(hc_epilogue(p, acc0 + p.bias[co])),
                     float_to_bf16(hc_epilogue(p, acc1 + p.bias[co + 1])));
        return;
    }
    hc_fwd_store(p, row, co, acc0, rows, c_out, l_out);
    hc_fwd_store(p, row, co + 1, acc1, rows, c_out, l_out);
}

#define HC_TM 64
#define HC_TN 64
#define HC_TK 32
#define HC_SMEM_PAD 8  // bf16 of padding per shared-memory row (bank spread)

// One staged K step of a 64 x 64 block tile: warp w owns rows 16w..16w+15 and all 64 columns
// (8 mma n-tiles). as[m][k] holds A (row-major), bs[n][k] holds B transposed.
__device__ __forceinline__ void hc_tile_mma(const bf16 (*as)[HC_TK + HC_SMEM_PAD], const bf16 (*bs)[HC_TK + HC_SMEM_PAD],
                                            float (*acc)[4], int warp, int g, int t) {
#pragma unroll
    for (int ks = 0; ks < HC_TK; ks += 16) {
        uint32_t a[4];
#pragma unroll
        for (int r = 0; r < 4; ++r) {
            const bf16* q = &as[warp * 16 + g + 8 * (r % 2)][ks + 2 * t + 8 * (r / 2)];
            a[r] = (uint32_t)q[0].bits | ((uint32_t)q[1].bits << 16);
        }
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            uint32_t b[2];
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                const bf16* q = &bs[8 * j + g][ks + 2 * t + 8 * r];
                b[r] = (uint32_t)q[0].bits | ((uint32_t)q[1].bits << 16);
            }
            mma_m16n8k16_bf16(acc[j], a, b, acc[j]);
        }
    }
}

extern "C" __global__ void hconv_conv_forward(const HConvFwdParams p) {
    __shared__ bf16 as[HC_TM][HC_TK + HC_SMEM_PAD];
    __shared__ bf16 bs[HC_TN][HC_TK + HC_SMEM_PAD];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
    const int64_t rows = (int64_t)p.n * p.l_out;
    const int64_t row0 = (int64_t)blockIdx.y * HC_TM;
    const int col0 = blockIdx.x * HC_TN;
    const int K = p.kernel * p.c_in;
    float acc[8][4];
#pragma unroll
    for (int j = 0; j < 8; ++j)
#pragma unroll
        for (int r = 0; r < 4; ++r) acc[j][r] = 0.0f;
    bf16 zero;
    zero.bits = 0;
    for (int k0 = 0; k0 < K; k0 += HC_TK) {
        // Stage A (implicit im2col) and W tiles: 64 x 32 each, 16 elements per thread.
        for (int e = threadIdx.x; e < HC_TM * HC_TK; e += blockDim.x) {
            const int i = e / HC_TK, kk = e % HC_TK;
            const int64_t r = row0 + i;
            const int k = k0 + kk;
            bf16 v = zero;
            if (r < rows && k < K) {
                const int64_t f = r / p.l_out;
                const int lo = (int)(r % p.l_out);
                const int kw = k / p.c_in, ci = k % p.c_in;
                const int li = lo * p.stride - p.pad + kw;
                if (li >= 0 && li < p.l_in) v = p.x[(f * p.l_in + li) * p.c_in + ci];
            }
            as[i][kk] = v;
            const int co = col0 + i;
            bs[i][kk] = (co < p.c_out && k < K) ? p.w[(int64_t)co * K + k] : zero;
        }
        __syncthreads();
        hc_tile_mma(as, bs, acc, warp, g, t);
        __syncthreads();
    }
    // Epilogue: bias + ReLU, bf16, plain or channel-major flattened layout.
#pragma unroll
    for (int j = 0; j < 8; ++j) {
#pragma unroll
        for (int r = 0; r < 4; ++r) {
            const int64_t row = row0 + warp * 16 + g + 8 * (r / 2);
            hc_fwd_store(p, row, col0 + 8 * j + 2 * t + (r % 2), acc[j][r], rows, p.c_out, p.l_out);
        }
    }
}
STRATA_EMU_ENTRY(hconv_conv_forward, HConvFwdParams)

// -D specialization (GPU only). The host may compile this file with HC_SPEC and the geometry as
// constants (HC_C_IN, HC_C_OUT, HC_L_IN, HC_L_OUT, HC_KERNEL, HC_STRIDE, HC_PAD): the vectorized
// kernels' index math (divisions by c_in, l_out, stride, ...) then compiles to multiply-shifts. The
// emulator and unspecialized builds read the same values from the parameters. A specialized
// kernel launched with other sizes traps rather than compute garbage.
#ifdef HC_SPEC
#define HC_G(field, constant) (constant)
#define HC_CHECK_SPEC(p)                                                                                  \
    if ((p).c_in != HC_C_IN || (p).c_out != HC_C_OUT || (p).l_in != HC_L_IN || (p).l_out != HC_L_OUT ||   \
        (p).kernel != HC_KERNEL || (p).stride != HC_STRIDE || (p).pad != HC_PAD)                          \
        __trap();
#else
#define HC_G(field, constant) (p.field)
#define HC_CHECK_SPEC(p)
#endif
#define HC_GEOMETRY                                                                                       \
    HC_CHECK_SPEC(p)                                                                                      \
    const int c_in = HC_G(c_in, HC_C_IN), c_out = HC_G(c_out, HC_C_OUT), l_in = HC_G(l_in, HC_L_IN);      \
    const int l_out = HC_G(l_out, HC_L_OUT), kernel = HC_G(kernel, HC_KERNEL);                            \
    const int stride = HC_G(stride, HC_STRIDE), pad = HC_G(pad, HC_PAD);                                  \
    (void)c_in, (void)c_out, (void)l_in, (void)l_out, (void)kernel, (void)stride, (void)pad;

// ---------------------------------------------------------------------------------------------
// The vectorized forward, for c_in % 8 == 0 (every real stack: 768, 1024, ...): a 16-byte chunk of
// 8 channels never straddles a tap, so both operands stream global -> shared with cp.async (zero
// fill for padding and ragged edges), HV_STAGES - 1 steps ahead of the math, and fragments come
// from ldmatrix.
// Block: 8 warps, a 128 x 128 tile of y, BK = 32; warp w computes rows 64 (w % 2).. and columns
// 32 (w / 2)..: 4 x 4 mma tiles, 64 fp32 accumulators per thread.
#define HV_BM 128
#define HV_BN 128
#define HV_BK 32
#define HV_LD (HV_BK + 8)   // pitch of [m or n][k] tiles in bf16: 80 bytes, conflict-free ldmatrix rows
#define HV_LDT (HV_BN + 8)  // pitch of [k][m or n] tiles: 272 bytes, conflict-free ldmatrix rows
// Staged buffers of each operand (the host's HV_STAGES in src/ops/device.rs sizes the dynamic shared
// memory: HV_STAGES * (both tiles' bytes); a -D HV_STAGES=n build is sized by the host alike).
// Four: with 32-deep K slices, a step's math on one SM (two blocks: 512 m16n8k16, at an estimated
// one a cycle) is ~500-1000 cycles, about one global load's latency under load, so copies issued
// one step ahead (two stages, as before) leave the tensor cores waiting; three steps ahead cover
// it. Unmeasured as yet: the device script compares STRATA_HV_STAGES=2.
#ifndef HV_STAGES
#define HV_STAGES 4
#endif
// The vectorized kernels run 256 threads and are held to 128 registers a thread
// (__launch_bounds__(256, 2)), so that two blocks share an SM.
typedef bf16 HvTileMK[HV_BM][HV_LD];   // an operand staged [m or n][k]
typedef bf16 HvTileKN[HV_BK][HV_LDT];  // an operand staged [k][m or n]

// The vectorized kernels' warp tile: warp (wm, wn) = (warp % 2, warp / 2) of the 128 x 128 block
// tile owns rows 64 wm.. and columns 32 wn..: 4 x 4 mma tiles of m16n8, per k16 step `ks` of the
// staged BK slice. Operands staged [m][k] / [n][k] load with ldmatrix, operands staged as they lie
// in memory, [k][m] / [k][n], with ldmatrix.trans.
__device__ __forceinline__ void hv_zero(float (*acc)[4][4]) {
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j)
#pragma unroll
            for (int r = 0; r < 4; ++r) acc[i][j][r] = 0.0f;
}
__device__ __forceinline__ void hv_load_a_mk(uint32_t (*a)[4], const bf16 (*t)[HV_LD], int wm, int ks, int lane) {
#pragma unroll
    for (int mi = 0; mi < 4; ++mi)
        ldmatrix_x4(a[mi], &t[wm * 64 + mi * 16 + (lane % 8) + 8 * ((lane / 8) % 2)][ks + 8 * (lane / 16)]);
}
__device__ __forceinline__ void hv_load_a_km(uint32_t (*a)[4], const bf16 (*t)[HV_LDT], int wm, int ks, int lane) {
    // Matrices (k0, m0), (k0, m0 + 8), (k0 + 8, m0), (k0 + 8, m0 + 8), transposed.
    const int j = lane / 8;
#pragma unroll
    for (int mi = 0; mi < 4; ++mi)
        ldmatrix_x4_trans(a[mi], &t[ks + (lane % 8) + 8 * (j / 2)][wm * 64 + mi * 16 + 8 * (j % 2)]);
}
// One x4 load gives two n8 tiles: registers (b[nj][0], b[nj][1], b[nj + 1][0], b[nj + 1][1]).
__device__ __forceinline__ void hv_split_b(uint32_t (*b)[2], int nj, const uint32_t* q) {
    b[nj][0] = q[0];
    b[nj][1] = q[1];
    b[nj + 1][0] = q[2];
    b[nj + 1][1] = q[3];
}
__device__ __forceinline__ void hv_load_b_nk(uint32_t (*b)[2], const bf16 (*t)[HV_LD], int wn, int ks, int lane) {
#pragma unroll
    for (int nj = 0; nj < 4; nj += 2) {
        uint32_t q[4];
        ldmatrix_x4(q, &t[wn * 32 + nj * 8 + (lane % 8) + 8 * (lane / 16)][ks + 8 * ((lane / 8) % 2)]);
        hv_split_b(b, nj, q);
    }
}
__device__ __forceinline__ void hv_load_b_kn(uint32_t (*b)[2], const bf16 (*t)[HV_LDT], int wn, int ks, int lane) {
    const int j = lane / 8;
#pragma unroll
    for (int nj = 0; nj < 4; nj += 2) {
        uint32_t q[4];
        ldmatrix_x4_trans(q, &t[ks + (lane % 8) + 8 * (j % 2)][wn * 32 + nj * 8 + 8 * (j / 2)]);
        hv_split_b(b, nj, q);
    }
}
__device__ __forceinline__ void hv_mma(float (*acc)[4][4], const uint32_t (*a)[4], const uint32_t (*b)[2]) {
#pragma unroll
    for (int mi = 0; mi < 4; ++mi)
#pragma unroll
        for (int nj = 0; nj < 4; ++nj) mma_m16n8k16_bf16(acc[mi][nj], a[mi], b[nj], acc[mi][nj]);
}
// The multistage K loop: stage(buf) issues the next step's cp.async copies into buffer `buf` (the
// stagers below keep their own position in K and advance one step a call, so that a step costs no
// divisions; the loop commits the copies as one group per step, an empty group past the last step,
// so that the count cp_async_wait relies on holds to the end), compute(buf) consumes a staged
// buffer. Copies run HV_STAGES - 1 steps ahead. One barrier per step: once past it, step s's copies
// (each thread waited for its own) are visible to all, and every warp has finished step s - 1's
// math, so its buffer, (s - 1) % HV_STAGES, is the one the copies for step s + HV_STAGES - 1 may
// fill. Buffer indices rotate by comparison (a 64-bit step counter's `% HV_STAGES` had cost a
// multiply-high sequence a step).
template <class Stage, class Compute>
__device__ __forceinline__ void hv_pipeline(int steps, Stage stage, Compute compute) {
#pragma unroll
    for (int s = 0; s < HV_STAGES - 1; ++s) {
        if (s < steps) stage(s);
        cp_async_commit();
    }
    int read = 0, write = HV_STAGES - 1;
    for (int s = 0; s < steps; ++s) {
        cp_async_wait<HV_STAGES - 2>();  // groups 0..s done: step s is here
        __syncthreads();
        if (s + HV_STAGES - 1 < steps) stage(write);
        cp_async_commit();
        compute(read);
        read = read + 1 == HV_STAGES ? 0 : read + 1;
        write = write + 1 == HV_STAGES ? 0 : write + 1;
    }
}

// The vectorized kernels' staged tiles, HV_STAGES of each operand, in dynamic shared memory.
#define HV_SMEM_FWD (HV_STAGES * 2 * (int)sizeof(HvTileMK))
#define HV_SMEM_DX (HV_STAGES * (int)(sizeof(HvTileMK) + sizeof(HvTileKN)))
#define HV_SMEM_DW (HV_STAGES * 2 * (int)sizeof(HvTileKN))

// The vectorized forward kernels' block tile: 128 rows of y in position-major order (row r' =
// lo * n + f: every frame at output position 0, then at 1, ...), and K over only the taps that
// reach a layer at the tile's positions, [k_begin, k_end): the others read padding, whose products
// are zeros. At thousands of frames nearly every tile holds one position: HuBERT-Base's first conv
// then multiplies 21 of its 25 (position, tap) pairs, its second 7 of 10, Large's 41 of 45 and 13
// of 15. A tile that spans positions takes the union of their taps (rows whose tap misses a layer
// copy zeros).
struct HcFwdTile {
    int64_t r0;  // the first position-major row
    int k_begin, k_end;
};

__device__ __forceinline__ HcFwdTile hc_fwd_tile(int64_t n, int l_out, int l_in, int c_in, int kernel, int stride,
                                                 int pad) {
    const int64_t r0 = (int64_t)blockIdx.y * HV_BM;
    const int lo_first = (int)(r0 / n);
    const int lo_last = (int)((r0 + HV_BM - 1) / n) < l_out - 1 ? (int)((r0 + HV_BM - 1) / n) : l_out - 1;
    // Tap kw reaches layer lo * stride - pad + kw: from kw0 at the last position, to kw1 at the first.
    const int kw0 = pad - lo_last * stride > 0 ? pad - lo_last * stride : 0;
    const int kw1 = l_in + pad - lo_first * stride < kernel ? l_in + pad - lo_first * stride : kernel;
    return {r0, kw0 * c_in, (kw1 > kw0 ? kw1 : kw0) * c_in};
}

// The frame and output position of position-major row r (< n * l_out, which the host keeps under
// 65535 x 64: 32-bit division).
__device__ __forceinline__ void hc_fwd_frame_pos(int64_t r, int64_t n, int64_t* f, int* lo) {
    *lo = (int)((uint32_t)r / (uint32_t)n);
    *f = r - (int64_t)*lo * n;
}

// y's row (frame-major, f * l_out + lo) of the tile's local row i, or `rows` (none) past the end.
__device__ __forceinline__ int64_t hc_fwd_row(const HcFwdTile& t, int64_t n, int i, int l_out, int64_t rows) {
    const int64_t r = t.r0 + i;
    if (r >= rows) return rows;
    int64_t f;
    int lo;
    hc_fwd_frame_pos(r, n, &f, &lo);
    return f * l_out + lo;
}

// The vectorized forward kernels' operand staging: thread tid copies 16-byte chunk tid % 4 (8
// channels, never straddling a tap as c_in % 8 == 0) of tile rows tid / 4 and tid / 4 + 64 of A
// (the implicit im2col rows) and B (W's rows), at its K index k (tap kw = k / c_in, channel ci),
// which advances HV_BK a step. A row's chunk lies at x[f, first + kw, ci] (first = lo * stride -
// pad, the layer of tap 0), that is at a fixed offset plus k; it exists for the K indices whose
// layer does, [a_klo, a_khi) (cut at the tile's k_end). So a step costs an add and two compares a
// chunk, no division. Chunks outside those ranges copy zeros.
struct HcFwdStage {
    int64_t a_off[2], b_off[2];  // element offsets of the rows' chunks at K index 0
    int a_klo[2], a_khi[2], b_khi[2];
    int k;  // this thread's K index at the next step

    __device__ __forceinline__ HcFwdStage(const HConvFwdParams& p, const HcFwdTile& tile, int64_t rows, int col0,
                                          int K, int l_in, int c_in, int c_out, int kernel, int stride, int pad) {
        k = tile.k_begin + (threadIdx.x % 4) * 8;
#pragma unroll
        for (int j = 0; j < 2; ++j) {
            const int64_t r = tile.r0 + threadIdx.x / 4 + 64 * j;
            int64_t f = 0;
            int lo = 0;
            if (r < rows) hc_fwd_frame_pos(r, p.n, &f, &lo);
            const int first = lo * stride - pad;
            a_off[j] = (f * l_in + first) * c_in;
            const int kw_lo = first < 0 ? -first : 0, kw_hi = l_in - first < kernel ? l_in - first : kernel;
            a_klo[j] = kw_lo * c_in;
            a_khi[j] = r < rows ? (kw_hi * c_in < tile.k_end ? kw_hi * c_in : tile.k_end) : 0;
            const int co = col0 + threadIdx.x / 4 + 64 * j;
            b_off[j] = (int64_t)(co < c_out ? co : 0) * K;
            b_khi[j] = co < c_out ? tile.k_end : 0;
        }
    }

    // Copies row j's chunks at the current K index: A's to a_dst, B's to b_dst.
    __device__ __forceinline__ void copy(const HConvFwdParams& p, int j, bf16* a_dst, bf16* b_dst) const {
        const bool va = k >= a_klo[j] && k < a_khi[j];
        cp_async16(a_dst, va ? p.x + a_off[j] + k : p.x, va);
        const bool vb = k < b_khi[j];
        cp_async16(b_dst, vb ? p.w + b_off[j] + k : p.w, vb);
    }
    __device__ __forceinline__ void advance() { k += HV_BK; }
};

extern "C" __global__ void __launch_bounds__(256, 2) hconv_conv_forward_vec(const HConvFwdParams p) {
    HC_GEOMETRY
    STRATA_DYNAMIC_SMEM(HvTileMK, as);
    if (!dynamic_smem_holds(HV_SMEM_FWD)) return;
    HvTileMK* bs = as + HV_STAGES;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t = lane & 3;
    const int wm = warp % 2, wn = warp / 2;
    const int64_t rows = (int64_t)p.n * l_out;
    const HcFwdTile tile = hc_fwd_tile(p.n, l_out, l_in, c_in, kernel, stride, pad);
    const int col0 = blockIdx.x * HV_BN;
    const int K = kernel * c_in;
    const int kc = (tid % 4) * 8;
    HcFwdStage rows_of(p, tile, rows, col0, K, l_in, c_in, c_out, kernel, stride, pad);
    auto stage = [&](int buf) {
#pragma unroll
        for (int j = 0; j < 2; ++j) rows_of.copy(p, j, &as[buf][tid / 4 + 64 * j][kc], &bs[buf][tid / 4 + 64 * j][kc]);
        rows_of.advance();
    };
    float acc[4][4][4];
    hv_zero(acc);
    hv_pipeline((tile.k_end - tile.k_begin + HV_BK - 1) / HV_BK, stage, [&](int buf) {
        for (int ks = 0; ks < HV_BK; ks += 16) {
            uint32_t a[4][4], b[4][2];
            hv_load_a_mk(a, as[buf], wm, ks, lane);
            hv_load_b_nk(b, bs[buf], wn, ks, lane);
            hv_mma(acc, a, b);
        }
    });
    // This thread's 8 rows of y (each shared by 8 accumulators).
    int64_t yrow[4][2];
#pragma unroll
    for (int mi = 0; mi < 4; ++mi)
#pragma unroll
        for (int h = 0; h < 2; ++h) yrow[mi][h] = hc_fwd_row(tile, p.n, wm * 64 + mi * 16 + g + 8 * h, l_out, rows);
#pragma unroll
    for (int mi = 0; mi < 4; ++mi) {
#pragma unroll
        for (int nj = 0; nj < 4; ++nj) {
            const int co = col0 + wn * 32 + nj * 8 + 2 * t;
#pragma unroll
            for (int h = 0; h < 2; ++h)
                hc_fwd_store2(p, yrow[mi][h], co, acc[mi][nj][2 * h], acc[mi][nj][2 * h + 1], rows, c_out, l_out);
        }
    }
}
STRATA_EMU_ENTRY(hconv_conv_forward_vec, HConvFwdParams)

#ifdef STRATA_HAS_WGMMA
// The vectorized forward on Hopper's warpgroup MMA (this file's sm_90a build; the sm_90 build
// leaves it out). Same implicit GEMM, staging and epilogue as hconv_conv_forward_vec; the 128 x 128
// block tile is split between two warpgroups (rows 64 g..), each issuing one m64n128k16 per k16
// step. Operands are staged by cp.async in the no-swizzle core-matrix layout: per 8-row group its
// four 16-byte K chunks lie contiguously (descriptor lbo 128 B, sbo 512 B), so a warp's 32 chunks
// of 8 rows fill 512 contiguous bytes. HW_STAGES buffers of both operands in dynamic shared memory
// (the host's HW_STAGES in src/ops/device.rs sizes it; a -D HW_STAGES=n build likewise): one
// step's wgmmas stay in flight while the next step's are issued, and the copies run HW_STAGES - 2
// steps ahead.
#ifndef HW_STAGES
#define HW_STAGES 5
#endif
#if HW_STAGES < 3
#error "HW_STAGES: at least 3 (one stage in flight, one issued, one filling)"
#endif
typedef bf16 HwTile[HV_BM * HV_BK];  // one staged 128 x 32 operand (HV_BM == HV_BN)
#define HW_SMEM (HW_STAGES * 2 * (int)sizeof(HwTile))
// bf16 offset of row r's 16-byte K chunk c in a staged 128 x 32 K-major operand tile.
__device__ __forceinline__ int hw_core_offset(int r, int c) { return (r >> 3) * 256 + c * 64 + (r & 7) * 8; }

__device__ __forceinline__ void hw_zero(float (*acc)[32]) {
#pragma unroll
    for (int h = 0; h < 2; ++h)
#pragma unroll
        for (int i = 0; i < 32; ++i) acc[h][i] = 0.0f;
}

// The K loop of the wgmma kernels: stage(buf) issues the next step's cp.async copies into buffer
// `buf` (as in hv_pipeline, the stager advances itself; the loop commits the copies, one group per
// step, an empty group past the last step, so that the count cp_async_wait relies on holds to the
// end); compute(buf) issues a staged step's wgmmas, commits them and waits for all but that group
// (hw_step). At step s, cp_async_wait leaves the HW_STAGES - 3 newest copy groups in flight, so
// steps 0..s have landed; the barrier after it publishes step s to the tensor cores, and means
// every thread has come back from step s - 1's wait, which finished its step s - 2 wgmmas: that
// buffer, (s - 2) % HW_STAGES, is the one the copies for step s + HW_STAGES - 2 refill. Step
// s - 1's wgmmas may still run meanwhile. After the loop, the last group is waited for and the
// accumulators `acc` (64 floats) pinned after that wait: without the pin the compiler read them
// before it (ptxas then serialized every wgmma, warning C7514).
template <class Stage, class Compute>
__device__ __forceinline__ void hw_pipeline(int steps, float* acc, Stage stage, Compute compute) {
#pragma unroll
    for (int s = 0; s < HW_STAGES - 2; ++s) {
        if (s < steps) stage(s);
        cp_async_commit();
    }
    int read = 0, write = HW_STAGES - 2;
    for (int s = 0; s < steps; ++s) {
        cp_async_wait<HW_STAGES - 3>();
        fence_proxy_async();
        __syncthreads();
        if (s + HW_STAGES - 2 < steps) stage(write);
        cp_async_commit();
        compute(read);
        read = read + 1 == HW_STAGES ? 0 : read + 1;
        write = write + 1 == HW_STAGES ? 0 : write + 1;
    }
    wgmma_wait<0>();
    wgmma_fence_operands(acc, 64);
}

// Both staged layouts (K-major: hw_core_offset; MN-major: hw_mn_offset) put a 128 x 32 tile's core
// matrices 128 bytes apart along K and 512 bytes apart along M / N.
#define HW_LBO 128
#define HW_SBO 512

// One staged step of a warpgroup's 64 x 128 tile: per k16, A's rows 64 wg.. against all 128
// columns of B (one m64n128k16 into acc, 64 contiguous floats: n8 chunk 8 h + j is acc[h][4 j ..]),
// from the stage's tiles, whose descriptors `da` (A's, at the warpgroup's rows) and `db` hw_descs
// makes; they advance two K core matrices per k16. Returns with this step's wgmmas in flight and
// the previous step's finished (the pipeline's one group in flight; hw_pipeline waits for the
// last).
template <int TRANS_A, int TRANS_B>
__device__ __forceinline__ void hw_step(float (*acc)[32], wgmma_desc da, wgmma_desc db) {
    wgmma_fence_operands(acc[0], 64);
    wgmma_fence();
#pragma unroll
    for (int ks = 0; ks < HV_BK / 16; ++ks)
        wgmma_m64n128k16_bf16<TRANS_A, TRANS_B>(acc[0], wgmma_desc_advance(da, ks * 2 * HW_LBO),
                                                wgmma_desc_advance(db, ks * 2 * HW_LBO), 1);
    wgmma_commit();
    wgmma_wait<1>();
    wgmma_fence_operands(acc[0], 64);
}

// The descriptors of stage `buf`'s tiles for hw_step, from those of stage 0 (made once, before the
// K loop: a descriptor made from an address costs a window conversion and masks a step).
struct HwDescs {
    wgmma_desc a0, b0;
    __device__ __forceinline__ HwDescs(const HwTile* as, const HwTile* bs, int wg)
        : a0(make_wgmma_desc(reinterpret_cast<const unsigned char*>(as[0]) + wg * 8 * HW_SBO, HW_LBO, HW_SBO)),
          b0(make_wgmma_desc(bs[0], HW_LBO, HW_SBO)) {}
    __device__ __forceinline__ wgmma_desc a(int buf) const { return wgmma_desc_advance(a0, buf * (int)sizeof(HwTile)); }
    __device__ __forceinline__ wgmma_desc b(int buf) const { return wgmma_desc_advance(b0, buf * (int)sizeof(HwTile)); }
};

// The MN-major tiles (operands whose rows are contiguous in memory: W for dx, dpre and the im2col
// rows for dW), 128 rows (m or n) x 32 k: core matrix (row group, k group) at row_group * 512 +
// k_group * 128 bytes (lbo 128, sbo 512). Chunk c (0..511) of a stage, 8 rows of one k: k =
// c % 8 + 8 (c / 128), rows 8 ((c / 8) % 16)..: 8 consecutive threads fill one core matrix (no bank
// conflict), and 4 consecutive chunks of one k are 64 contiguous bytes in memory.
__device__ __forceinline__ int hw_mn_k(int c) { return (c & 7) + 8 * (c >> 7); }
__device__ __forceinline__ int hw_mn_rows(int c) { return 8 * ((c >> 3) & 15); }
__device__ __forceinline__ int hw_mn_offset(int row, int k) { return (row >> 3) * 256 + (k >> 3) * 64 + (k & 7) * 8 + (row & 7); }
// A thread's two staged chunks lie a fixed distance apart in either layout: rows r and r + 64 of a
// K-major tile (hw_core_offset: 8 row groups on), K rows k and k + 16 of an MN-major one
// (hw_mn_offset: 2 K groups on). Offsets found once, before the K loop, as the first plus these.
#define HW_CORE_ROWS64 (8 * 256)
#define HW_MN_K16 (2 * 64)

extern "C" __global__ void __launch_bounds__(256, 2) hconv_conv_forward_wgmma(const HConvFwdParams p) {
    HC_GEOMETRY
    STRATA_DYNAMIC_SMEM(HwTile, as);
    if (!dynamic_smem_holds(HW_SMEM)) return;
    HwTile* bs = as + HW_STAGES;
    const int tid = threadIdx.x, lane = tid & 31, wg = tid >> 7, w = (tid >> 5) & 3;
    const int64_t rows = (int64_t)p.n * l_out;
    const HcFwdTile tile = hc_fwd_tile(p.n, l_out, l_in, c_in, kernel, stride, pad);
    const int col0 = blockIdx.x * HV_BN;
    const int K = kernel * c_in;
    HcFwdStage rows_of(p, tile, rows, col0, K, l_in, c_in, c_out, kernel, stride, pad);
    const int at0 = hw_core_offset(tid / 4, tid % 4);
    auto stage = [&](int buf) {
#pragma unroll
        for (int j = 0; j < 2; ++j) {
            const int at = at0 + j * HW_CORE_ROWS64;
            rows_of.copy(p, j, &as[buf][at], &bs[buf][at]);
        }
        rows_of.advance();
    };
    float acc[2][32];
    hw_zero(acc);
    const HwDescs descs(as, bs, wg);
    hw_pipeline((tile.k_end - tile.k_begin + HV_BK - 1) / HV_BK, acc[0], stage,
                [&](int buf) { hw_step<0, 0>(acc, descs.a(buf), descs.b(buf)); });
    // This thread's 2 rows of y.
    const int64_t yrow[2] = {hc_fwd_row(tile, p.n, wg * 64 + w * 16 + lane / 4, l_out, rows),
                             hc_fwd_row(tile, p.n, wg * 64 + w * 16 + lane / 4 + 8, l_out, rows)};
#pragma unroll
    for (int h = 0; h < 2; ++h) {
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            const int co = col0 + h * 64 + j * 8 + 2 * (lane % 4);
#pragma unroll
            for (int half = 0; half < 2; ++half)
                hc_fwd_store2(p, yrow[half], co, acc[h][4 * j + 2 * half], acc[h][4 * j + 2 * half + 1], rows, c_out,
                              l_out);
        }
    }
}
STRATA_EMU_ENTRY(hconv_conv_forward_wgmma, HConvFwdParams)
#endif  // STRATA_HAS_WGMMA

// ---------------------------------------------------------------------------------------------
// Backward. dy is the gradient of the conv's (post-ReLU) output y, in y's layout; the ReLU is
// folded in as dpre = y > 0 ? dy : 0 (PyTorch's threshold_backward). Both kernels take one struct.
//
//   dx[f, li, ci]  = sum_{kw, co} dpre[f, lo, co] * W[co, kw, ci],  lo = (li + pad - kw) / stride
//                    where that division is exact and 0 <= lo < l_out:  rows (f, li), cols ci,
//                    K = (kw, co), an implicit GEMM with the gather in A.
//   dw[co, kw, ci] += sum_{f, lo} dpre[f, lo, co] * x[f, lo*stride - pad + kw, ci]:  rows co,
//                    cols (kw, ci), K = every (frame, output position). Each block owns its dw tile
//                    for its chunk of the rows (grid.z; one chunk, or partials that
//                    hconv_split_reduce adds in chunk order): deterministic, no atomics.
//   db[co]        += sum_{f, lo} dpre[f, lo, co], summed in order by the blocks of the first
//                    column tile from the dpre tiles they stage anyway.
struct HConvBwdParams {
    const bf16* x;
    const bf16* w;
    const bf16* y;
    const bf16* dy;
    bf16* dx;
    float* dw;
    float* db;
    int n, l_in, c_in, c_out, kernel, stride, pad, l_out, flatten;
    // The weight kernels' reduction over rows split into `split` chunks of `split_rows` (grid.z);
    // with split > 1 each chunk writes its own partial sums, which hconv_split_reduce then adds
    // in chunk order (deterministic, no atomics).
    float* partial_dw;
    float* partial_db;
    int64_t split_rows;
    int split;
    int relu;  // 0 for a Linear layer: no mask, y unused
};

// ReLU's backward passes the gradient where its output y > 0 (not +0, negative or NaN), as
// PyTorch's threshold_backward.
__device__ __forceinline__ bool hc_relu_passes(bf16 y) { return y.bits != 0 && y.bits <= 0x7f80u; }

__device__ __forceinline__ bf16 hc_dpre(const HConvBwdParams& p, int64_t f, int lo, int co) {
    const int64_t at = p.flatten ? (f * p.c_out + co) * p.l_out + lo : (f * p.l_out + lo) * p.c_out + co;
    bf16 v = p.dy[at];
    if (!p.relu) return v;
    if (!hc_relu_passes(p.y[at])) v.bits = 0;
    return v;
}

extern "C" __global__ void hconv_conv_backward_data(const HConvBwdParams p) {
    __shared__ bf16 as[HC_TM][HC_TK + HC_SMEM_PAD];
    __shared__ bf16 bs[HC_TN][HC_TK + HC_SMEM_PAD];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
    const int64_t rows = (int64_t)p.n * p.l_in;
    const int64_t row0 = (int64_t)blockIdx.y * HC_TM;
    const int col0 = blockIdx.x * HC_TN;
    const int K = p.kernel * p.c_out, KW = p.kernel * p.c_in;
    float acc[8][4];
    for (int j = 0; j < 8; ++j)
        for (int r = 0; r < 4; ++r) acc[j][r] = 0.0f;
    bf16 zero;
    zero.bits = 0;
    for (int k0 = 0; k0 < K; k0 += HC_TK) {
        for (int e = threadIdx.x; e < HC_TM * HC_TK; e += blockDim.x) {
            const int i = e / HC_TK, kk = e % HC_TK;
            const int k = k0 + kk;
            const int kw = k / p.c_out, co = k % p.c_out;
            const int64_t r = row0 + i;
            bf16 v = zero;
            if (r < rows && k < K) {
                const int64_t f = r / p.l_in;
                const int li = (int)(r % p.l_in);
                const int num = li + p.pad - kw;
                if (num >= 0 && num % p.stride == 0 && num / p.stride < p.l_out) v = hc_dpre(p, f, num / p.stride, co);
            }
            as[i][kk] = v;
            const int ci = col0 + i;
            bs[i][kk] = (ci < p.c_in && k < K) ? p.w[(int64_t)co * KW + kw * p.c_in + ci] : zero;
        }
        __syncthreads();
        hc_tile_mma(as, bs, acc, warp, g, t);
        __syncthreads();
    }
    for (int j = 0; j < 8; ++j) {
        for (int r = 0; r < 4; ++r) {
            const int64_t row = row0 + warp * 16 + g + 8 * (r / 2);
            const int ci = col0 + 8 * j + 2 * t + (r % 2);
            if (row < rows && ci < p.c_in) p.dx[row * p.c_in + ci] = float_to_bf16(acc[j][r]);
        }
    }
}
STRATA_EMU_ENTRY(hconv_conv_backward_data, HConvBwdParams)

extern "C" __global__ void hconv_conv_backward_weight(const HConvBwdParams p) {
    __shared__ bf16 as[HC_TM][HC_TK + HC_SMEM_PAD];
    __shared__ bf16 bs[HC_TN][HC_TK + HC_SMEM_PAD];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
    const int64_t R = (int64_t)p.n * p.l_out;
    const int co0 = blockIdx.y * HC_TM;
    const int col0 = blockIdx.x * HC_TN;
    const int K = p.kernel * p.c_in;
    const bool bias_block = blockIdx.x == 0;
    float acc[8][4];
    for (int j = 0; j < 8; ++j)
        for (int r = 0; r < 4; ++r) acc[j][r] = 0.0f;
    float bias_acc = 0.0f;  // thread i < 64 owns db[co0 + i] in bias blocks
    bf16 zero;
    zero.bits = 0;
    // This block's chunk of the rows (grid.z splits the reduction, as the vectorized kernel's).
    const int64_t r_begin = (int64_t)blockIdx.z * p.split_rows;
    const int64_t r_end = r_begin + p.split_rows < R ? r_begin + p.split_rows : R;
    for (int64_t r0 = r_begin; r0 < r_end; r0 += HC_TK) {
        for (int e = threadIdx.x; e < HC_TM * HC_TK; e += blockDim.x) {
            const int i = e / HC_TK, kk = e % HC_TK;
            const int64_t r = r0 + kk;
            const int co = co0 + i;
            bf16 a = zero, b = zero;
            if (r < r_end) {
                const int64_t f = r / p.l_out;
                const int lo = (int)(r % p.l_out);
                if (co < p.c_out) a = hc_dpre(p, f, lo, co);
                const int k = col0 + i;
                if (k < K) {
                    const int kw = k / p.c_in, ci = k % p.c_in;
                    const int li = lo * p.stride - p.pad + kw;
                    if (li >= 0 && li < p.l_in) b = p.x[(f * p.l_in + li) * p.c_in + ci];
                }
            }
            as[i][kk] = a;
            bs[i][kk] = b;
        }
        __syncthreads();
        if (bias_block && threadIdx.x < HC_TM) {
            for (int kk = 0; kk < HC_TK; ++kk) bias_acc += bf16_to_float(as[threadIdx.x][kk]);
        }
        hc_tile_mma(as, bs, acc, warp, g, t);
        __syncthreads();
    }
    // With a split, each chunk writes its partial sums, which hconv_split_reduce adds in order.
    for (int j = 0; j < 8; ++j) {
        for (int r = 0; r < 4; ++r) {
            const int co = co0 + warp * 16 + g + 8 * (r / 2);
            const int k = col0 + 8 * j + 2 * t + (r % 2);
            if (co >= p.c_out || k >= K) continue;
            if (p.split > 1)
                p.partial_dw[((int64_t)blockIdx.z * p.c_out + co) * K + k] = acc[j][r];
            else
                p.dw[(int64_t)co * K + k] += acc[j][r];
        }
    }
    const int co = co0 + (int)threadIdx.x;
    if (bias_block && threadIdx.x < HC_TM && co < p.c_out) {
        if (p.split > 1)
            p.partial_db[(int64_t)blockIdx.z * p.c_out + co] = bias_acc;
        else
            p.db[co] += bias_acc;
    }
}
STRATA_EMU_ENTRY(hconv_conv_backward_weight, HConvBwdParams)

// ---------------------------------------------------------------------------------------------
// The vectorized backward, for c_in % 8 == 0. First the ReLU mask (and the un-flatten of the last
// conv) in one elementwise pass, dpre = y > 0 ? dy : 0 as [l_out, n, hc_pitch(c_out)] (rows
// position-major, as the forward's tiles: every frame at position 0, then 1, ...); then both
// GEMMs stream 16-byte chunks with cp.async like the vectorized forward. Operands whose
// natural layout is [k][m] or [k][n] (W for dx; dpre and the im2col rows for dW) are staged as they
// lie and read with ldmatrix.trans.
// dpre's row pitch: c_out rounded up to 8 channels, so that every 16-byte chunk of a row is aligned
// and within one tap of dx's K = (kw, co) for any c_out (HConv's D / 3 channels, 341 for a
// 1024-wide stack, or a Linear layer's classes). The pad channels hold zeros.
__device__ __forceinline__ int hc_pitch(int c_out) { return (c_out + 7) & ~7; }

struct HConvMaskParams {
    const bf16* y;
    const bf16* dy;
    bf16* dpre;
    int n, c_out, l_out, flatten, relu;
};

// A warp per row of dpre (frame f at output position lo = blockIdx.y), each lane an 8-channel
// chunk (one 16-byte store) at a time; the block's 8 warps take 8 frames, blocks stride over the
// frames, so that no chunk divides for its row and position. A plain-layout y with c_out % 8 == 0
// (HConv's inner convs) is read 16 bytes at a time as well. (A Linear layer's dy with
// c_out % 8 == 0 is dpre as it lies: the host skips this pass.)
extern "C" __global__ void hconv_relu_mask(const HConvMaskParams p) {
    const int pitch = hc_pitch(p.c_out), chunks = pitch / 8;
    const int lo = blockIdx.y, lane = threadIdx.x & 31, warps = blockDim.x >> 5;
    const bool vec = !p.flatten && (p.c_out & 7) == 0 &&
                     (((unsigned long long)p.dy | (unsigned long long)(p.relu ? p.y : p.dy)) & 15) == 0;
    for (int64_t f = (int64_t)blockIdx.x * warps + (threadIdx.x >> 5); f < p.n; f += (int64_t)gridDim.x * warps) {
        for (int c = lane; c < chunks; c += 32) {
            const int c8 = c * 8;
            bf16x8 out;
            if (vec) {
                const int64_t at = (f * p.l_out + lo) * p.c_out + c8;
                out = load_bf16x8(p.dy + at);
                if (p.relu) {
                    const bf16x8 y = load_bf16x8(p.y + at);
                    for (int w = 0; w < 4; ++w) {
                        bf16 lo_half, hi_half;
                        lo_half.bits = (uint16_t)(y.w[w] & 0xffffu);
                        hi_half.bits = (uint16_t)(y.w[w] >> 16);
                        const uint32_t keep = (hc_relu_passes(lo_half) ? 0x0000ffffu : 0u) | (hc_relu_passes(hi_half) ? 0xffff0000u : 0u);
                        out.w[w] &= keep;
                    }
                }
            } else {
                for (int w = 0; w < 4; ++w) {
                    uint32_t word = 0;
                    for (int h = 0; h < 2; ++h) {
                        const int co = c8 + 2 * w + h;
                        if (co >= p.c_out) continue;
                        const int64_t at = p.flatten ? (f * p.c_out + co) * p.l_out + lo : (f * p.l_out + lo) * p.c_out + co;
                        bf16 v = p.dy[at];
                        if (p.relu && !hc_relu_passes(p.y[at])) v.bits = 0;
                        word |= (uint32_t)v.bits << (16 * h);
                    }
                    out.w[w] = word;
                }
            }
            store_bf16x8(p.dpre + ((int64_t)lo * p.n + f) * pitch + c8, out);
        }
    }
}
STRATA_EMU_ENTRY(hconv_relu_mask, HConvMaskParams)

// Operand sources shared by the vectorized backward kernels (mma.sync and wgmma), each a 16-byte
// chunk and whether it exists (a missing one is copied as zeros).

// dx by phase. Input position li receives gradient only from the taps kw = li + pad (mod stride)
// (those put it at an output position lo * stride): with kernel 5, stride 3 two taps of five, or
// one. So the rows (frame, li) are grouped by their phase ph = (li + pad) % stride, each block's
// 128 rows of one phase (blockIdx.y runs through the phases' tiles in order), and its K runs over
// that phase's taps kw = ph + stride * j only: a third of the MACs of every tap against every
// row, whose other products were zeros. Phase ph holds li = li0, li0 + stride, ... (`count` of
// them) of every frame.
struct HcDxPhase {
    int ph, li0, count, taps;
    int64_t row0;  // the block's first row among the phase's n * count
};

__device__ __forceinline__ HcDxPhase hc_dx_phase(int64_t n, int l_in, int kernel, int stride, int pad) {
    int64_t tile = blockIdx.y;
    for (int ph = 0; ph < stride; ++ph) {
        const int li0 = ((ph - pad) % stride + stride) % stride;
        const int count = li0 < l_in ? (l_in - li0 + stride - 1) / stride : 0;
        const int64_t tiles = (n * count + HV_BM - 1) / HV_BM;
        if (tile < tiles) return {ph, li0, count, ph < kernel ? (kernel - ph + stride - 1) / stride : 0, tile * HV_BM};
        tile -= tiles;
    }
    return {0, 0, 0, 0, 0};  // past the last tile: no rows
}

// Row r of a phase as the stack row f * l_in + li, or -1 past the phase's rows.
__device__ __forceinline__ int64_t hc_dx_row(const HcDxPhase& q, int64_t n, int64_t r, int l_in, int stride) {
    if (q.count == 0 || r >= n * q.count) return -1;
    const int64_t f = r / q.count;
    return f * l_in + q.li0 + stride * (int)(r - f * q.count);
}

// dx's epilogue for two adjacent input channels (ci, ci + 1; ci even, as the fragments place them)
// of stack row `row` (-1: none): one 4-byte bf16 pair, c_in being a multiple of 8 on these paths.
__device__ __forceinline__ void hc_dx_store2(const HConvBwdParams& p, int64_t row, int ci, float v0, float v1, int c_in) {
    if (row >= 0 && ci < c_in) store_bf16x2(p.dx + row * c_in + ci, float_to_bf16(v0), float_to_bf16(v1));
}

// The dx kernels' operand staging. A phase's K index k is tap kw = ph + stride * jt at output
// channel co < pitch, k = jt * pitch + co. A: thread tid stages rows tid / 4 and tid / 4 + 64 of
// the block's phase tile (frame f, layer li) at its K index (chunk tid % 4 of the step): dpre's
// chunk at the output position lo with lo * stride - pad + kw = li, which for the phase's taps is
// (li + pad - ph) / stride - jt, where 0 <= lo < l_out. B: W's chunk (8 input channels from ci) at
// two K rows, b_row and b_row + 16 of the step, at (jt, co); the pad channels (co >= c_out) and K
// past the phase's taps copy zeros. Each K index advances HV_BK a step with its chunk's offset:
// co moves on, and where it passes pitch (once every pitch / HV_BK steps) jt does, so that a step
// costs adds and compares, no division.
struct HcDxStage {
    int64_t a_off[2], b_off[2];  // element offsets in dpre and W of the chunks
    int lo[2];                   // A's rows' output positions at the current tap
    bool a_ok[2], b_col;
    int ka, ka_co;               // A's K index and its channel
    int kb[2], kb_co[2];         // B's K rows and their channels

    __device__ __forceinline__ HcDxStage(const HcDxPhase& q, int64_t n, int l_in, int KW, int c_in, int stride,
                                         int pad, int pitch, int b_row, int b_col_, int col0) {
        ka = (threadIdx.x % 4) * 8;
        const int ka_jt = ka / pitch;  // 0 but for c_out under HV_BK
        ka_co = ka - ka_jt * pitch;
#pragma unroll
        for (int j = 0; j < 2; ++j) {
            const int64_t row = hc_dx_row(q, n, q.row0 + threadIdx.x / 4 + 64 * j, l_in, stride);
            a_ok[j] = row >= 0;
            const int64_t f = a_ok[j] ? row / l_in : 0;
            const int li = a_ok[j] ? (int)(row % l_in) : 0;
            lo[j] = (li + pad - q.ph) / stride - ka_jt;
            a_off[j] = ((int64_t)lo[j] * n + f) * pitch + ka_co;
            kb[j] = b_row + 16 * j;
            const int jt = kb[j] / pitch;
            kb_co[j] = kb[j] - jt * pitch;
            b_off[j] = (int64_t)kb_co[j] * KW + (q.ph + stride * jt) * c_in + col0 + b_col_;
        }
        b_col = col0 + b_col_ < c_in;
    }

    __device__ __forceinline__ void copy(const HConvBwdParams& p, int j, int K, int l_out, int c_out, bf16* a_dst,
                                         bf16* b_dst) const {
        const bool va = a_ok[j] && ka < K && lo[j] >= 0 && lo[j] < l_out;
        cp_async16(a_dst, va ? p.dy + a_off[j] : p.dy, va);
        const bool vb = kb[j] < K && b_col && kb_co[j] < c_out;
        cp_async16(b_dst, vb ? p.w + b_off[j] : p.w, vb);
    }

    __device__ __forceinline__ void next_tap_a(int64_t n, int pitch) {
        ka_co -= pitch;
#pragma unroll
        for (int j = 0; j < 2; ++j) {
            --lo[j];
            a_off[j] -= (n + 1) * pitch;
        }
    }
    __device__ __forceinline__ void next_tap_b(int j, int KW, int c_in, int pitch, int stride) {
        kb_co[j] -= pitch;
        b_off[j] += (int64_t)stride * c_in - (int64_t)pitch * KW;
    }

    __device__ __forceinline__ void advance(int64_t n, int KW, int c_in, int pitch, int stride) {
        ka += HV_BK;
        ka_co += HV_BK;
        a_off[0] += HV_BK;
        a_off[1] += HV_BK;
        // `if`s, not a `while`: the specialized builds, whose pitch is a constant of at least HV_BK,
        // then need no loop (and its convergence barrier) at all.
        if (ka_co >= pitch) next_tap_a(n, pitch);
        if (HV_BK > pitch)
            while (ka_co >= pitch) next_tap_a(n, pitch);
#pragma unroll
        for (int j = 0; j < 2; ++j) {
            kb[j] += HV_BK;
            kb_co[j] += HV_BK;
            b_off[j] += (int64_t)HV_BK * KW;
            if (kb_co[j] >= pitch) next_tap_b(j, KW, c_in, pitch, stride);
            if (HV_BK > pitch)
                while (kb_co[j] >= pitch) next_tap_b(j, KW, c_in, pitch, stride);
        }
    }
};

// The dW kernels' operand staging. Thread tid copies, each step, the chunks of two K rows
// (position-major rows r = lo * n + f of dpre and of the im2col matrix: `row0` and row0 + 16 of the
// step's HV_BK) at one column (8 channels): A's dpre[r, co0 + col ..] and B's im2col chunk at
// column k = col0 + col, that is tap kw = k / c_in, channel ci, found once. A step moves each row
// HV_BK rows on: dpre's offset by HV_BK rows, the im2col chunk's by HV_BK frames, and where the
// frame passes the batch's last (once every n / HV_BK steps) to the next position's first frame,
// whose layer li moves by stride. So a step costs adds and compares, no division (the 32-bit
// division by the frame count, which is no compile-time constant, had cost each chunk ~20
// instructions a step), and no multiplication but the offsets' constants'.
struct HcDwStage {
    int64_t a_off[2], b_off[2];  // element offsets in dpre and x of the rows' chunks
    int r[2], f[2], li[2];
    bool a_col, b_col;  // the column exists in dpre (co < c_out) / in the im2col matrix (k < KW)

    __device__ __forceinline__ HcDwStage(const HConvBwdParams& p, int64_t r_begin, int row0, int col, int co0,
                                         int col0, int KW, int l_in, int c_in, int c_out, int pitch, int stride,
                                         int pad) {
        const int co = co0 + col, k = col0 + col;
        a_col = co < c_out;
        b_col = k < KW;
        const int kw = k / c_in, ci = k - kw * c_in;
#pragma unroll
        for (int j = 0; j < 2; ++j) {
            r[j] = (int)r_begin + row0 + 16 * j;  // rows number under 65535 x 64
            const int lo = (int)((uint32_t)r[j] / (uint32_t)p.n);
            f[j] = r[j] - lo * p.n;
            li[j] = lo * stride - pad + kw;
            a_off[j] = (int64_t)r[j] * pitch + co;
            b_off[j] = ((int64_t)f[j] * l_in + li[j]) * c_in + ci;
        }
    }

    // Copies row j's chunks: dpre's to a_dst, the im2col matrix's to b_dst (zeros past r_end, past
    // the columns, and where the tap reaches no layer).
    __device__ __forceinline__ void copy(const HConvBwdParams& p, int j, int r_end, int l_in, bf16* a_dst,
                                         bf16* b_dst) const {
        const bool in = r[j] < r_end;
        const bool va = in && a_col;
        cp_async16(a_dst, va ? p.dy + a_off[j] : p.dy, va);
        const bool vb = in && b_col && li[j] >= 0 && li[j] < l_in;
        cp_async16(b_dst, vb ? p.x + b_off[j] : p.x, vb);
    }

    __device__ __forceinline__ void advance(int n, int l_in, int c_in, int pitch, int stride) {
#pragma unroll
        for (int j = 0; j < 2; ++j) {
            r[j] += HV_BK;
            f[j] += HV_BK;
            a_off[j] += (int64_t)HV_BK * pitch;
            b_off[j] += (int64_t)HV_BK * l_in * c_in;
            while (f[j] >= n) {  // once a step at most, but for batches under HV_BK frames
                f[j] -= n;
                li[j] += stride;
                b_off[j] += ((int64_t)stride - (int64_t)n * l_in) * c_in;
            }
        }
    }
};

// A dW block's tile: column tile x (of (kw, ci)), row tile y (of co), split chunk z. The bias
// blocks (column tile 0) reduce every row of their chunk (hc_dw_rows) and sum db besides: at
// HuBERT-Base's first conv about 1.7x the work of the others, by instruction and row counts.
// Dispatched in launch order among them (one in every gridDim.x), those of the last wave would end
// most of a wave after the rest (arithmetic, unmeasured). So the launch's first gridDim.y *
// gridDim.z blocks, by linear index (the order the GPU dispatches them in), take the bias tiles,
// and the rest the other tiles in their order: the longest work starts first. The same tiles and
// sums: results are unchanged.
struct HcDwBlock {
    int x, y, z;
    __device__ __forceinline__ HcDwBlock() {
        const int gx = gridDim.x, gy = gridDim.y, bias = gridDim.y * gridDim.z;
        int id = blockIdx.x + gx * (blockIdx.y + gy * blockIdx.z);
        if (id < bias) {
            x = 0;
        } else {
            id -= bias;
            x = 1 + id % (gx - 1);
            id /= gx - 1;
        }
        y = id % gy;
        z = id / gy;
    }
};

// A dW block's rows, [*begin, *end): its split chunk of the position-major rows, narrowed (except
// in bias blocks, whose db needs every row) to the positions at which some tap of its column tile
// reaches a layer; at the others the tile's im2col chunks are all padding (HuBERT-Base's first
// conv: 21 of 25 (position, tap) pairs reach one, as in the forward).
__device__ __forceinline__ void hc_dw_rows(const HConvBwdParams& p, const HcDwBlock& blk, int64_t R, int col0, int KW,
                                           int l_in, int c_in, int l_out, int stride, int pad, int64_t* begin,
                                           int64_t* end) {
    int64_t b = (int64_t)blk.z * p.split_rows;
    int64_t e = b + p.split_rows < R ? b + p.split_rows : R;
    if (blk.x != 0) {
        const int last = (col0 + HV_BN < KW ? col0 + HV_BN : KW) - 1;
        const int kw_a = col0 / c_in, kw_b = last / c_in;
        // Tap kw reaches layer lo * stride - pad + kw in [0, l_in) for lo from ceil((pad - kw) /
        // stride) to floor((l_in - 1 + pad - kw) / stride): the union over the tile's taps.
        const int lo_min = pad - kw_b > 0 ? (pad - kw_b + stride - 1) / stride : 0;
        const int top = l_in - 1 + pad - kw_a;
        const int lo_max = top < 0 ? -1 : (top / stride < l_out - 1 ? top / stride : l_out - 1);
        const int64_t from = (int64_t)lo_min * p.n, to = (int64_t)(lo_max + 1) * p.n;
        if (from > b) b = from;
        if (to < e) e = to;
    }
    *begin = b;
    *end = e > b ? e : b;
}

// dW's epilogue for one accumulator: its own split chunk's partial sum, or added into dw.
__device__ __forceinline__ void hc_dw_store(const HConvBwdParams& p, const HcDwBlock& blk, int co, int k, float v,
                                            int c_out, int KW) {
    if (co >= c_out || k >= KW) return;
    if (p.split > 1)
        p.partial_dw[((int64_t)blk.z * c_out + co) * KW + k] = v;
    else
        p.dw[(int64_t)co * KW + k] += v;
}

// db's epilogue: thread tid of a bias block (column tile 0) owns output channel co0 + tid.
__device__ __forceinline__ void hc_db_store(const HConvBwdParams& p, const HcDwBlock& blk, int co0, float v, int c_out) {
    const int co = co0 + (int)threadIdx.x;
    if (blk.x != 0 || threadIdx.x >= HV_BM || co >= c_out) return;
    if (p.split > 1)
        p.partial_db[(int64_t)blk.z * c_out + co] = v;
    else
        p.db[co] += v;
}

// dx (dy = dpre here; y and flatten unused): rows (f, li) of one phase, cols ci, K = the phase's
// (kw, co) (HcDxPhase).
extern "C" __global__ void __launch_bounds__(256, 2) hconv_conv_backward_data_vec(const HConvBwdParams p) {
    HC_GEOMETRY
    STRATA_DYNAMIC_SMEM(HvTileMK, as);
    if (!dynamic_smem_holds(HV_SMEM_DX)) return;
    HvTileKN* bt = reinterpret_cast<HvTileKN*>(as + HV_STAGES);
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t = lane & 3;
    const int wm = warp % 2, wn = warp / 2;
    const HcDxPhase q = hc_dx_phase(p.n, l_in, kernel, stride, pad);
    const int col0 = blockIdx.x * HV_BN;
    const int pitch = hc_pitch(c_out);
    const int K = q.taps * pitch, KW = kernel * c_in;
    const int kc = (tid % 4) * 8;
    // W as [k][ci]: chunk c = tid + 256 j at k-row c / 16 (tid / 16 + 16 j), 8 channels from
    // 8 (c % 16).
    const int krow = tid / 16, b_col = (tid % 16) * 8;
    HcDxStage rows_of(q, p.n, l_in, KW, c_in, stride, pad, pitch, krow, b_col, col0);
    auto stage = [&](int buf) {
#pragma unroll
        for (int j = 0; j < 2; ++j)
            rows_of.copy(p, j, K, l_out, c_out, &as[buf][tid / 4 + 64 * j][kc], &bt[buf][krow + 16 * j][b_col]);
        rows_of.advance(p.n, KW, c_in, pitch, stride);
    };
    float acc[4][4][4];
    hv_zero(acc);
    hv_pipeline((K + HV_BK - 1) / HV_BK, stage, [&](int buf) {
        for (int ks = 0; ks < HV_BK; ks += 16) {
            uint32_t a[4][4], b[4][2];
            hv_load_a_mk(a, as[buf], wm, ks, lane);
            hv_load_b_kn(b, bt[buf], wn, ks, lane);
            hv_mma(acc, a, b);
        }
    });
    // Each of the thread's 8 rows found once (a division by the phase's count), then its channel
    // pairs stored.
#pragma unroll
    for (int mi = 0; mi < 4; ++mi) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int64_t row = hc_dx_row(q, p.n, q.row0 + wm * 64 + mi * 16 + g + 8 * h, l_in, stride);
#pragma unroll
            for (int nj = 0; nj < 4; ++nj)
                hc_dx_store2(p, row, col0 + wn * 32 + nj * 8 + 2 * t, acc[mi][nj][2 * h], acc[mi][nj][2 * h + 1], c_in);
        }
    }
}
STRATA_EMU_ENTRY(hconv_conv_backward_data_vec, HConvBwdParams)

// dW and db (dy = dpre here): rows co, cols (kw, ci), K = the position-major rows (output position,
// frame) at which the column tile's taps reach a layer (hc_dw_rows; every row in bias blocks).
extern "C" __global__ void __launch_bounds__(256, 2) hconv_conv_backward_weight_vec(const HConvBwdParams p) {
    HC_GEOMETRY
    STRATA_DYNAMIC_SMEM(HvTileKN, at);
    if (!dynamic_smem_holds(HV_SMEM_DW)) return;
    HvTileKN* bt = at + HV_STAGES;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t = lane & 3;
    const int wm = warp % 2, wn = warp / 2;
    const int64_t R = (int64_t)p.n * l_out;
    const HcDwBlock blk;
    const int co0 = blk.y * HV_BM;
    const int col0 = blk.x * HV_BN;
    const int KW = kernel * c_in, pitch = hc_pitch(c_out);
    const bool bias_block = blk.x == 0;
    int64_t r_begin, r_end;
    hc_dw_rows(p, blk, R, col0, KW, l_in, c_in, l_out, stride, pad, &r_begin, &r_end);
    // Chunk c = tid + 256 j: K row c / 16 (tid / 16 + 16 j), 8 columns from (c % 16) * 8.
    const int krow = tid / 16, off = (tid % 16) * 8;
    HcDwStage rows_of(p, r_begin, krow, off, co0, col0, KW, l_in, c_in, c_out, pitch, stride, pad);
    auto stage = [&](int buf) {
#pragma unroll
        for (int j = 0; j < 2; ++j)
            rows_of.copy(p, j, (int)r_end, l_in, &at[buf][krow + 16 * j][off], &bt[buf][krow + 16 * j][off]);
        rows_of.advance(p.n, l_in, c_in, pitch, stride);
    };
    float acc[4][4][4];
    hv_zero(acc);
    float bias_acc = 0.0f;  // thread i < 128 owns db[co0 + i] in bias blocks
    const int steps = r_end > r_begin ? (int)((r_end - r_begin + HV_BK - 1) / HV_BK) : 0;
    hv_pipeline(steps, stage, [&](int buf) {
        if (bias_block && tid < HV_BM) {
            for (int kk = 0; kk < HV_BK; ++kk) bias_acc += bf16_to_float(at[buf][kk][tid]);
        }
        for (int ks = 0; ks < HV_BK; ks += 16) {
            uint32_t a[4][4], b[4][2];
            hv_load_a_km(a, at[buf], wm, ks, lane);
            hv_load_b_kn(b, bt[buf], wn, ks, lane);
            hv_mma(acc, a, b);
        }
    });
#pragma unroll
    for (int mi = 0; mi < 4; ++mi) {
#pragma unroll
        for (int nj = 0; nj < 4; ++nj) {
#pragma unroll
            for (int r = 0; r < 4; ++r) {
                const int co = co0 + wm * 64 + mi * 16 + g + 8 * (r / 2);
                const int k = col0 + wn * 32 + nj * 8 + 2 * t + (r % 2);
                hc_dw_store(p, blk, co, k, acc[mi][nj][r], c_out, KW);
            }
        }
    }
    hc_db_store(p, blk, co0, bias_acc, c_out);
}
STRATA_EMU_ENTRY(hconv_conv_backward_weight_vec, HConvBwdParams)

#ifdef STRATA_HAS_WGMMA
// The vectorized backward on wgmma (sm_90a build), with hconv_conv_forward_wgmma's tiles and
// pipeline; the operands the mma.sync kernels read with ldmatrix.trans are MN-major here (the
// wgmma transpose flags), staged as hw_mn_offset lays them out.

// dx (dy = dpre): rows (f, li) of one phase, cols ci, K = the phase's (kw, co) (HcDxPhase). A: the
// gathered dpre rows, K-major; B: W as [k][ci], MN-major.
extern "C" __global__ void __launch_bounds__(256, 2) hconv_conv_backward_data_wgmma(const HConvBwdParams p) {
    HC_GEOMETRY
    STRATA_DYNAMIC_SMEM(HwTile, as);
    if (!dynamic_smem_holds(HW_SMEM)) return;
    HwTile* bs = as + HW_STAGES;
    const int tid = threadIdx.x, lane = tid & 31, wg = tid >> 7, w = (tid >> 5) & 3;
    const HcDxPhase q = hc_dx_phase(p.n, l_in, kernel, stride, pad);
    const int col0 = blockIdx.x * HV_BN;
    const int pitch = hc_pitch(c_out);
    const int K = q.taps * pitch, KW = kernel * c_in;
    // W as [k][ci], MN-major: chunk c = tid + 256 j at k-row hw_mn_k(c) (that of tid, + 16 j), 8
    // channels from hw_mn_rows(c) (that of tid).
    const int kr = hw_mn_k(tid), n8 = hw_mn_rows(tid);
    HcDxStage rows_of(q, p.n, l_in, KW, c_in, stride, pad, pitch, kr, n8, col0);
    const int a_at0 = hw_core_offset(tid / 4, tid % 4), b_at0 = hw_mn_offset(n8, kr);
    auto stage = [&](int buf) {
#pragma unroll
        for (int j = 0; j < 2; ++j)
            rows_of.copy(p, j, K, l_out, c_out, &as[buf][a_at0 + j * HW_CORE_ROWS64], &bs[buf][b_at0 + j * HW_MN_K16]);
        rows_of.advance(p.n, KW, c_in, pitch, stride);
    };
    float acc[2][32];
    hw_zero(acc);
    const HwDescs descs(as, bs, wg);
    hw_pipeline((K + HV_BK - 1) / HV_BK, acc[0], stage, [&](int buf) { hw_step<0, 1>(acc, descs.a(buf), descs.b(buf)); });
    // The thread's 2 rows found once, then its channel pairs stored.
    const int64_t rows2[2] = {hc_dx_row(q, p.n, q.row0 + wg * 64 + w * 16 + lane / 4, l_in, stride),
                              hc_dx_row(q, p.n, q.row0 + wg * 64 + w * 16 + lane / 4 + 8, l_in, stride)};
#pragma unroll
    for (int h = 0; h < 2; ++h) {
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            const int ci = col0 + h * 64 + j * 8 + 2 * (lane % 4);
#pragma unroll
            for (int half = 0; half < 2; ++half)
                hc_dx_store2(p, rows2[half], ci, acc[h][4 * j + 2 * half], acc[h][4 * j + 2 * half + 1], c_in);
        }
    }
}
STRATA_EMU_ENTRY(hconv_conv_backward_data_wgmma, HConvBwdParams)

// dW and db (dy = dpre): rows co, cols (kw, ci), K = every (frame, output position) of this
// block's split chunk. A: dpre as [r][co], MN-major; B: the im2col rows [r][(kw, ci)], MN-major.
extern "C" __global__ void __launch_bounds__(256, 2) hconv_conv_backward_weight_wgmma(const HConvBwdParams p) {
    HC_GEOMETRY
    STRATA_DYNAMIC_SMEM(HwTile, as);
    if (!dynamic_smem_holds(HW_SMEM)) return;
    HwTile* bs = as + HW_STAGES;
    const int tid = threadIdx.x, lane = tid & 31, wg = tid >> 7, w = (tid >> 5) & 3;
    const int64_t R = (int64_t)p.n * l_out;
    const HcDwBlock blk;
    const int co0 = blk.y * HV_BM;
    const int col0 = blk.x * HV_BN;
    const int KW = kernel * c_in, pitch = hc_pitch(c_out);
    const bool bias_block = blk.x == 0;
    int64_t r_begin, r_end;
    hc_dw_rows(p, blk, R, col0, KW, l_in, c_in, l_out, stride, pad, &r_begin, &r_end);
    // Chunk c = tid + 256 j: K row hw_mn_k(c) (that of tid, + 16 j), 8 rows of co and of k from
    // hw_mn_rows(c) (that of tid).
    const int kr = hw_mn_k(tid), m8 = hw_mn_rows(tid);
    HcDwStage rows_of(p, r_begin, kr, m8, co0, col0, KW, l_in, c_in, c_out, pitch, stride, pad);
    const int at0 = hw_mn_offset(m8, kr);
    auto stage = [&](int buf) {
#pragma unroll
        for (int j = 0; j < 2; ++j) {
            const int at = at0 + j * HW_MN_K16;
            rows_of.copy(p, j, (int)r_end, l_in, &as[buf][at], &bs[buf][at]);
        }
        rows_of.advance(p.n, l_in, c_in, pitch, stride);
    };
    float acc[2][32];
    hw_zero(acc);
    float bias_acc = 0.0f;  // thread i < 128 owns db[co0 + i] in bias blocks
    const int steps = r_end > r_begin ? (int)((r_end - r_begin + HV_BK - 1) / HV_BK) : 0;
    const HwDescs descs(as, bs, wg);
    hw_pipeline(steps, acc[0], stage, [&](int buf) {
        if (bias_block && tid < HV_BM) {
            for (int kk = 0; kk < HV_BK; ++kk) bias_acc += bf16_to_float(as[buf][hw_mn_offset(tid, kk)]);
        }
        hw_step<1, 1>(acc, descs.a(buf), descs.b(buf));
    });
#pragma unroll
    for (int h = 0; h < 2; ++h) {
#pragma unroll
        for (int j = 0; j < 8; ++j) {
#pragma unroll
            for (int r = 0; r < 4; ++r) {
                const int co = co0 + wg * 64 + w * 16 + lane / 4 + 8 * (r / 2);
                const int k = col0 + h * 64 + j * 8 + 2 * (lane % 4) + (r % 2);
                hc_dw_store(p, blk, co, k, acc[h][4 * j + r], c_out, KW);
            }
        }
    }
    hc_db_store(p, blk, co0, bias_acc, c_out);
}
STRATA_EMU_ENTRY(hconv_conv_backward_weight_wgmma, HConvBwdParams)
#endif  // STRATA_HAS_WGMMA

// out[i] += sum over chunks s = 0, 1, ... of partial[s * count + i], in that order.
struct SplitReduceParams {
    const float* partial;
    float* out;
    int64_t count;
    int split;
};
extern "C" __global__ void hconv_split_reduce(const SplitReduceParams p) {
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < p.count; i += (int64_t)gridDim.x * blockDim.x) {
        float v = p.out[i];
        for (int s = 0; s < p.split; ++s) v += p.partial[s * p.count + i];
        p.out[i] = v;
    }
}
STRATA_EMU_ENTRY(hconv_split_reduce, SplitReduceParams)
