// strata/kernels/attention.cu: CLS pooling's attention (first), and the packed self-attention of
// the ML-SUPERB head (after it: a block per (frame, head), then the tiled kernels the host runs
// by default, a block per 16 rows of an (utterance, head)).
//
// CLS pooling's attention, fused: per frame, ONE query (the CLS
// token's, the same for every frame: a learned vector through the same LayerNorm and projection)
// over the frame's L+1 tokens (the CLS token's key/value row, shared by all frames, then the L
// layer tokens' rows). CPU reference: src/ops/attention.rs with sq = 1.
//
// One block per frame; each warp owns heads h = warp, warp + warps, ...; a head's scores live in
// registers, three per lane (token j in lane j % 32, slot j / 32: up to 96 tokens), and are
// broadcast with shuffles, so no shared memory and no block barrier. fp32 math on bf16 K / V.
// Backward: dV = p * dO, dS = p * (dP - sum p dP) * scale, dK = dS q, and the frame's share of
// dq and of the shared CLS row's dK / dV as per-frame partials [n, D] (summed in frame order by
// col_sum_accumulate: deterministic).
#ifndef STRATA_COMMON_INCLUDED
#include "common.cuh"
#endif

#define CLS_MAX_TOKENS 96

struct ClsAttnParams {
    const float* q;      // [D] the CLS query (projected, bias added)
    const bf16* k_cls;   // [D] the CLS token's key row
    const bf16* v_cls;   // [D] its value row
    const bf16* k;       // [n, L, D] the layer tokens' keys
    const bf16* v;       // [n, L, D]
    float* probs;        // [n, H, L + 1]: written by forward, read by backward
    bf16* out;           // forward: [n, D]
    const float* dout;   // backward: [n, D]
    bf16* dk;            // backward: [n, L, D]
    bf16* dv;            // backward: [n, L, D]
    float* dq_part;      // backward: [n, D]
    float* dk_cls_part;  // backward: [n, D]
    float* dv_cls_part;  // backward: [n, D]
    int n, L, D, H;
    float scale;
};

// Row j of frame f's keys or values: the shared CLS row for j = 0.
__device__ __forceinline__ const bf16* cls_attn_row(const bf16* shared_row, const bf16* rows, int f, int j, int L, int D) {
    return j == 0 ? shared_row : rows + ((int64_t)f * L + (j - 1)) * D;
}

// Token j's value held by lane j % 32 in slot j / 32, given to every lane.
__device__ __forceinline__ float cls_attn_bcast(float s0, float s1, float s2, int j) {
    const int slot = j >> 5;
    return __shfl_sync(0xffffffffu, slot == 0 ? s0 : (slot == 1 ? s1 : s2), j & 31);
}

extern "C" __global__ void cls_attention_forward(const ClsAttnParams a) {
    const int f = blockIdx.x, lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    const int S = a.L + 1, dh = a.D / a.H;
    for (int h = warp; h < a.H; h += warps) {
        const int c0 = h * dh;
        const float ninf = strata_bits_float(0xff800000u);
        float s[3] = {ninf, ninf, ninf};
        for (int j = 0; j < S; ++j) {
            const bf16* kr = cls_attn_row(a.k_cls, a.k, f, j, a.L, a.D) + c0;
            float dot = 0.0f;
            for (int i = lane; i < dh; i += 32) dot += a.q[c0 + i] * bf16_to_float(kr[i]);
            dot = warp_sum(dot) * a.scale;
            if ((j & 31) == lane) s[j >> 5] = dot;
        }
        float m = fmaxf(fmaxf(s[0], s[1]), s[2]);
        m = warp_max(m);
        float e[3], sum = 0.0f;
        for (int c = 0; c < 3; ++c) {
            e[c] = lane + 32 * c < S ? expf(s[c] - m) : 0.0f;
            sum += e[c];
        }
        sum = warp_sum(sum);
        float p[3];
        for (int c = 0; c < 3; ++c) {
            p[c] = e[c] / sum;
            if (lane + 32 * c < S) a.probs[((int64_t)f * a.H + h) * S + lane + 32 * c] = p[c];
        }
        // Lanes walk the head's columns in rounds of 32 so every lane takes part in each shuffle.
        for (int base = 0; base < dh; base += 32) {
            const int i = base + lane;
            float acc = 0.0f;
            for (int j = 0; j < S; ++j) {
                const float pj = cls_attn_bcast(p[0], p[1], p[2], j);
                if (i < dh) acc += pj * bf16_to_float(cls_attn_row(a.v_cls, a.v, f, j, a.L, a.D)[c0 + i]);
            }
            if (i < dh) a.out[(int64_t)f * a.D + c0 + i] = float_to_bf16(acc);
        }
    }
}
STRATA_EMU_ENTRY(cls_attention_forward, ClsAttnParams)

extern "C" __global__ void cls_attention_backward(const ClsAttnParams a) {
    const int f = blockIdx.x, lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    const int S = a.L + 1, dh = a.D / a.H;
    const float* go = a.dout + (int64_t)f * a.D;
    for (int h = warp; h < a.H; h += warps) {
        const int c0 = h * dh;
        float p[3], dp[3] = {0.0f, 0.0f, 0.0f};
        for (int c = 0; c < 3; ++c)
            p[c] = lane + 32 * c < S ? a.probs[((int64_t)f * a.H + h) * S + lane + 32 * c] : 0.0f;
        for (int j = 0; j < S; ++j) {
            const bf16* vr = cls_attn_row(a.v_cls, a.v, f, j, a.L, a.D) + c0;
            float dot = 0.0f;
            for (int i = lane; i < dh; i += 32) dot += go[c0 + i] * bf16_to_float(vr[i]);
            dot = warp_sum(dot);
            if ((j & 31) == lane) dp[j >> 5] = dot;
        }
        const float pdp = warp_sum(p[0] * dp[0] + p[1] * dp[1] + p[2] * dp[2]);
        float ds[3];
        for (int c = 0; c < 3; ++c) ds[c] = p[c] * (dp[c] - pdp) * a.scale;
        for (int base = 0; base < dh; base += 32) {
            const int i = base + lane;
            const float qi = i < dh ? a.q[c0 + i] : 0.0f;
            const float gi = i < dh ? go[c0 + i] : 0.0f;
            float dq = 0.0f;
            for (int j = 0; j < S; ++j) {
                const float pj = cls_attn_bcast(p[0], p[1], p[2], j);
                const float dsj = cls_attn_bcast(ds[0], ds[1], ds[2], j);
                if (i >= dh) continue;
                dq += dsj * bf16_to_float(cls_attn_row(a.k_cls, a.k, f, j, a.L, a.D)[c0 + i]);
                if (j == 0) {
                    a.dk_cls_part[(int64_t)f * a.D + c0 + i] = dsj * qi;
                    a.dv_cls_part[(int64_t)f * a.D + c0 + i] = pj * gi;
                } else {
                    const int64_t r = ((int64_t)f * a.L + (j - 1)) * a.D + c0 + i;
                    a.dk[r] = float_to_bf16(dsj * qi);
                    a.dv[r] = float_to_bf16(pj * gi);
                }
            }
            if (i < dh) a.dq_part[(int64_t)f * a.D + c0 + i] = dq;
        }
    }
}
STRATA_EMU_ENTRY(cls_attention_backward, ClsAttnParams)

// ---------------------------------------------------------------------------------------------
// Packed self-attention: multi-head attention of each frame over its own utterance's frames (the
// ML-SUPERB head's encoder), fp32, with seeded dropout on the probabilities. CPU reference:
// src/ops/attention.rs packed_forward / packed_backward (the same probability layout, per
// utterance [H, T, T] from prob_off[u], and the same dropout index: prob_off[u] + (h T + i) T + j).
//
// One block of PACKED_ATTN_THREADS per (frame, head). Forward: the row of scores in the probs
// buffer (no length limit), block max and sum, then the output features, each summed over the
// row by groups of threads (packed_row_sums). Backward in two launches, no atomics:
// per query row, dS = P (dP - sum P dP) scale with dP through the dropout, into `ds`, and dQ;
// then per key row, dK = sum_i dS_ij q_i and dV = sum_i P'_ij dO_i (P' after dropout).

#define PACKED_ATTN_THREADS 128  // the host's PACKED_ATTN_BLOCK

struct PackedAttnParams {
    const float* q;         // [frames, H * dh]
    const float* k;
    const float* v;
    float* probs;           // forward writes, backward reads
    float* out;             // forward: [frames, H * dh]
    const float* dout;      // backward
    float* ds;              // backward scratch, laid out as probs
    float* dq;
    float* dk;
    float* dv;
    const int* offsets;     // [U + 1] frames
    const long long* prob_off;  // [U + 1]
    int utterances, H, dh, dropout;
    float scale, keep_scale;
    unsigned long long seed;
    double p;
};

// What a (frame, head) block works on: frame f of utterance u (its frames s0 .. s0 + T, f the
// t-th), head h, the row width W, and where head h's [T, T] probabilities start.
struct PackedBlock {
    int f, h, W, s0, T, t;
    long long head;
};

__device__ __forceinline__ PackedBlock packed_block(const PackedAttnParams& a) {
    PackedBlock b;
    b.f = blockIdx.x / a.H;
    b.h = blockIdx.x % a.H;
    b.W = a.H * a.dh;
    // The utterance holding frame f (offsets ascending; binary search).
    int lo = 0, hi = a.utterances - 1;
    while (lo < hi) {
        const int mid = (lo + hi + 1) >> 1;
        if (a.offsets[mid] <= b.f) lo = mid; else hi = mid - 1;
    }
    b.s0 = a.offsets[lo];
    b.T = a.offsets[lo + 1] - b.s0;
    b.t = b.f - b.s0;
    b.head = a.prob_off[lo] + (long long)b.h * b.T * b.T;
    return b;
}

// For each feature e < dh: sums term(r, e) (a PairSum: two sums at once) over rows r in [0, T),
// then calls store(e, sum) once. The block's threads work in groups of dh, group g summing the
// rows r = g (mod groups), and the groups' partial sums are added in group order (deterministic;
// `partial`: shared scratch of blockDim.x PairSum). A head of dh = 32 in a block of 128 had three
// quarters of the threads idle through these length-T sums, one feature a thread. Contains a
// barrier: every thread of the block calls it.
struct PairSum {
    float x, y;
};
__device__ __forceinline__ PairSum pair_sum(float x, float y) { return PairSum{x, y}; }

template <class Term, class Store>
__device__ __forceinline__ void packed_row_sums(int T, int dh, PairSum* partial, Term term, Store store) {
    const int tid = threadIdx.x;
    const int groups = dh <= (int)blockDim.x ? (int)blockDim.x / dh : 1;
    if (groups == 1) {
        for (int e = tid; e < dh; e += blockDim.x) {
            PairSum acc = pair_sum(0.0f, 0.0f);
            for (int r = 0; r < T; ++r) {
                const PairSum t = term(r, e);
                acc.x += t.x;
                acc.y += t.y;
            }
            store(e, acc);
        }
        return;
    }
    const int g = tid / dh, e = tid % dh;
    if (g < groups) {
        PairSum acc = pair_sum(0.0f, 0.0f);
        for (int r = g; r < T; r += groups) {
            const PairSum t = term(r, e);
            acc.x += t.x;
            acc.y += t.y;
        }
        partial[tid] = acc;
    }
    __syncthreads();
    if (tid < dh) {
        PairSum sum = pair_sum(0.0f, 0.0f);
        for (int q = 0; q < groups; ++q) {
            sum.x += partial[q * dh + tid].x;
            sum.y += partial[q * dh + tid].y;
        }
        store(tid, sum);
    }
}

// Probability element `index` after dropout.
__device__ __forceinline__ float packed_drop(const PackedAttnParams& a, float pj, long long index) {
    if (!a.dropout) return pj;
    return dropout_keep(a.seed, (unsigned long long)index, a.p) ? pj * a.keep_scale : 0.0f;
}

extern "C" __global__ void packed_attention_forward(const PackedAttnParams a) {
    __shared__ float scratch[32];
    const PackedBlock pb = packed_block(a);
    const int f = pb.f, h = pb.h, W = pb.W, s0 = pb.s0, T = pb.T;
    const long long base = pb.head + (long long)pb.t * T;
    const float* qi = a.q + (int64_t)f * W + h * a.dh;
    float* row = a.probs + base;
    float m = strata_bits_float(0xff800000u);
    for (int j = threadIdx.x; j < T; j += blockDim.x) {
        const float* kj = a.k + (int64_t)(s0 + j) * W + h * a.dh;
        float dot = 0.0f;
        for (int e = 0; e < a.dh; ++e) dot += qi[e] * kj[e];
        dot *= a.scale;
        row[j] = dot;
        m = fmaxf(m, dot);
    }
    m = block_max(m, scratch);
    float sum = 0.0f;
    for (int j = threadIdx.x; j < T; j += blockDim.x) {
        const float ex = expf(row[j] - m);
        row[j] = ex;
        sum += ex;
    }
    const float inv = 1.0f / block_sum(sum, scratch);
    for (int j = threadIdx.x; j < T; j += blockDim.x) row[j] *= inv;
    __syncthreads();
    __shared__ PairSum partial[PACKED_ATTN_THREADS];
    const float* vh = a.v + (int64_t)s0 * W + h * a.dh;
    packed_row_sums(
        T, a.dh, partial,
        [&](int j, int e) { return pair_sum(packed_drop(a, row[j], base + j) * vh[(int64_t)j * W + e], 0.0f); },
        [&](int e, PairSum sum) { a.out[(int64_t)f * W + h * a.dh + e] = sum.x; });
}
STRATA_EMU_ENTRY(packed_attention_forward, PackedAttnParams)

extern "C" __global__ void packed_attention_backward_query(const PackedAttnParams a) {
    __shared__ float scratch[32];
    const PackedBlock pb = packed_block(a);
    const int f = pb.f, h = pb.h, W = pb.W, s0 = pb.s0, T = pb.T;
    const long long base = pb.head + (long long)pb.t * T;
    const float* doi = a.dout + (int64_t)f * W + h * a.dh;
    const float* p = a.probs + base;
    float* dsr = a.ds + base;
    float dot = 0.0f;
    for (int j = threadIdx.x; j < T; j += blockDim.x) {
        const float* vj = a.v + (int64_t)(s0 + j) * W + h * a.dh;
        float dp = 0.0f;
        for (int e = 0; e < a.dh; ++e) dp += doi[e] * vj[e];
        dp = packed_drop(a, dp, base + j);
        dsr[j] = dp;
        dot += p[j] * dp;
    }
    dot = block_sum(dot, scratch);
    for (int j = threadIdx.x; j < T; j += blockDim.x) dsr[j] = p[j] * (dsr[j] - dot) * a.scale;
    __syncthreads();
    __shared__ PairSum partial[PACKED_ATTN_THREADS];
    const float* kh = a.k + (int64_t)s0 * W + h * a.dh;
    packed_row_sums(
        T, a.dh, partial, [&](int j, int e) { return pair_sum(dsr[j] * kh[(int64_t)j * W + e], 0.0f); },
        [&](int e, PairSum sum) { a.dq[(int64_t)f * W + h * a.dh + e] = sum.x; });
}
STRATA_EMU_ENTRY(packed_attention_backward_query, PackedAttnParams)

extern "C" __global__ void packed_attention_backward_key(const PackedAttnParams a) {
    const PackedBlock pb = packed_block(a);
    const int f = pb.f, h = pb.h, W = pb.W, s0 = pb.s0, T = pb.T, j = pb.t;
    const long long head = pb.head;
    __shared__ PairSum partial[PACKED_ATTN_THREADS];
    packed_row_sums(
        T, a.dh, partial,
        [&](int i, int e) {
            const long long at = head + (long long)i * T + j;
            const int64_t row = (int64_t)(s0 + i) * W + h * a.dh + e;
            return pair_sum(a.ds[at] * a.q[row], packed_drop(a, a.probs[at], at) * a.dout[row]);
        },
        [&](int e, PairSum sum) {
            a.dk[(int64_t)f * W + h * a.dh + e] = sum.x;
            a.dv[(int64_t)f * W + h * a.dh + e] = sum.y;
        });
}
STRATA_EMU_ENTRY(packed_attention_backward_key, PackedAttnParams)

// ---------------------------------------------------------------------------------------------
// The packed self-attention, tiled. The kernels above run a block per (frame, head), each reading
// its utterance's whole K and V for one query: at ML-SUPERB's size (32 x 247 frames, 8 heads of
// 32) that is ~4 GB through L1 / L2 per launch for 1 GFLOP of products. Here a block owns a tile
// of PT_TILE rows of one (utterance, head): query rows in forward and backward_query, key rows in
// backward_key, and streams the rows it reads (K, V; or Q, dO with their dS, P columns) through
// shared memory chunk by chunk, each read once per tile. Same math and outputs as above (probs
// and ds in the same [heads, T, T] layout, the same dropout indices); every sum runs in row order
// in one thread: deterministic. Heads up to PT_MAX_DH wide (the host takes the per-row kernels
// for wider ones). Grid (utterances, heads, tiles of the longest utterance); blocks of
// PACKED_ATTN_THREADS; a tile past its utterance's end returns at once.

#define PT_TILE 16
#define PT_MAX_DH 128
#define PT_SMEM 10240  // floats of staging: 40 KB
#define PT_OUTS (PT_TILE * PT_MAX_DH / PACKED_ATTN_THREADS)  // outputs a thread may own

// CUDA's min(int, int) is not in the emulator's host build.
__device__ __forceinline__ int pt_min(int x, int y) { return x < y ? x : y; }

struct PackedTile {
    int s0, T, h, r0, n;  // the utterance's first frame and length, the head, the tile's first row, its rows
    long long head;       // where head h's [T, T] probabilities start
};

__device__ __forceinline__ bool packed_tile(const PackedAttnParams& a, PackedTile& t) {
    const int u = blockIdx.x;
    t.h = blockIdx.y;
    t.s0 = a.offsets[u];
    t.T = a.offsets[u + 1] - t.s0;
    t.r0 = blockIdx.z * PT_TILE;
    t.n = pt_min(PT_TILE, t.T - t.r0);
    t.head = a.prob_off[u] + (long long)t.h * t.T * t.T;
    return t.n > 0;
}

// The loops below walk a block's threads over an n x m grid of (i, j) by x = threadIdx.x + k *
// blockDim.x, i = x / m, j = x % m, with the division done once: each stride moves j by blockDim.x
// and carries into i (dh and m are run-time values; a division an element had cost about as many
// instructions as the element's share of the products).
struct PtGridWalk {
    int i, j;
    __device__ __forceinline__ PtGridWalk(int m) : i((int)threadIdx.x / m), j((int)threadIdx.x - i * m) {}
    __device__ __forceinline__ void next(int m) {
        j += blockDim.x;
        while (j >= m) {
            j -= m;
            ++i;
        }
    }
};

// Rows r0 .. r0 + n of head h's features in src [frames, H * dh] into dst [n][dh + 1] (the
// padding keeps threads reading different rows on different banks): blockDim.x / dh rows a pass
// (dh <= PT_MAX_DH <= blockDim.x), a thread per element.
__device__ __forceinline__ void pt_stage_rows(float* dst, const float* src, int r0, int n, int H, int h, int dh) {
    const int per_pass = (int)blockDim.x / dh, first = (int)threadIdx.x / dh, e = (int)threadIdx.x - first * dh;
    if (first >= per_pass) return;
    for (int r = first; r < n; r += per_pass) dst[r * (dh + 1) + e] = src[(int64_t)(r0 + r) * H * dh + h * dh + e];
}

// For each (i < n, j < m): f(i, j, a_i . b_j) with a [n][dh + 1] and b [m][dh + 1] in shared memory.
template <class F>
__device__ __forceinline__ void pt_row_dots(const float* a, const float* b, int n, int m, int dh, F f) {
    PtGridWalk at(m);
    for (; at.i < n; at.next(m)) {
        const float* ai = a + at.i * (dh + 1);
        const float* bj = b + at.j * (dh + 1);
        float dot = 0.0f;
        for (int e = 0; e < dh; ++e) dot += ai[e] * bj[e];
        f(at.i, at.j, dot);
    }
}

// acc[o] += sum_j w[i][j] b[j][e] over j < m for the thread's outputs (i, e) = x / dh, x % dh with
// x = threadIdx.x + o * blockDim.x < n * dh (walked by PtGridWalk); w [n][ldw] and b [m][dh + 1] in shared memory.
__device__ __forceinline__ void pt_weighted_rows(float (&acc)[PT_OUTS], const float* w, int ldw, const float* b, int n, int m, int dh) {
    PtGridWalk at(dh);
#pragma unroll
    for (int o = 0; o < PT_OUTS; ++o, at.next(dh)) {
        if (at.i < n) {
            float s = acc[o];
            for (int j = 0; j < m; ++j) s += w[at.i * ldw + j] * b[j * (dh + 1) + at.j];
            acc[o] = s;
        }
    }
}

// out[(r0 + i) * H * dh + h * dh + e] = acc for the thread's outputs (as pt_weighted_rows).
__device__ __forceinline__ void pt_store_rows(float* out, const float (&acc)[PT_OUTS], int r0, int n, int H, int h, int dh) {
    PtGridWalk at(dh);
#pragma unroll
    for (int o = 0; o < PT_OUTS; ++o, at.next(dh))
        if (at.i < n) out[(int64_t)(r0 + at.i) * H * dh + h * dh + at.j] = acc[o];
}

// f(i, j, a_i . src_j) for the tile's rows i (staged in `tile` [PT_TILE][dh + 1]) and every row j
// < T of the utterance's head in src, staged kc at a time in `rows`. Starts with a barrier (the
// tile is staged; `rows` is free), ends without one.
template <class F>
__device__ __forceinline__ void pt_dots_pass(const float* tile, float* rows, int kc, const float* src, const PackedTile& t, int H, int dh, F f) {
    for (int j0 = 0; j0 < t.T; j0 += kc) {
        const int m = pt_min(kc, t.T - j0);
        __syncthreads();
        pt_stage_rows(rows, src, t.s0 + j0, m, H, t.h, dh);
        __syncthreads();
        pt_row_dots(tile, rows, t.n, m, dh, [&](int i, int j, float dot) { f(i, j0 + j, dot); });
    }
}

// acc (the thread's outputs, as pt_weighted_rows) += sum_j w(i, j) src_j over every row j < T of
// the utterance's head in src, staged kc at a time in `rows`, the weights in `ws` [PT_TILE][kc].
// Starts with a barrier (what w reads is written; `rows` and `ws` are free).
template <class W>
__device__ __forceinline__ void pt_weighted_pass(float (&acc)[PT_OUTS], float* rows, float* ws, int kc, const float* src, const PackedTile& t, int H, int dh, W w) {
    for (int j0 = 0; j0 < t.T; j0 += kc) {
        const int m = pt_min(kc, t.T - j0);
        __syncthreads();
        pt_stage_rows(rows, src, t.s0 + j0, m, H, t.h, dh);
        for (PtGridWalk at(m); at.i < t.n; at.next(m)) ws[at.i * kc + at.j] = w(at.i, j0 + at.j);
        __syncthreads();
        pt_weighted_rows(acc, ws, kc, rows, t.n, m, dh);
    }
}

extern "C" __global__ void packed_attention_tiled_forward(const PackedAttnParams a) {
    __shared__ float sm[PT_SMEM];
    PackedTile t;
    if (!packed_tile(a, t)) return;
    const int dh = a.dh, ld = dh + 1, T = t.T, n = t.n;
    // The tile's queries, then a chunk of kc key (later value) rows and the chunk's probabilities.
    const int kc = (PT_SMEM - PT_TILE * ld) / (PT_TILE + ld);
    float* qs = sm;
    float* rows = qs + PT_TILE * ld;
    float* ps = rows + kc * ld;
    const long long first = t.head + (long long)t.r0 * T;  // the tile's rows of probabilities
    float* probs = a.probs + first;
    pt_stage_rows(qs, a.q, t.s0 + t.r0, n, a.H, t.h, dh);
    pt_dots_pass(qs, rows, kc, a.k, t, a.H, dh, [&](int i, int j, float dot) { probs[(long long)i * T + j] = dot * a.scale; });
    __syncthreads();
    // Softmax of each row, a warp a row.
    const int lane = threadIdx.x & 31, warps = blockDim.x >> 5;
    for (int i = threadIdx.x >> 5; i < n; i += warps) {
        float* r = probs + (long long)i * T;
        float m = strata_bits_float(0xff800000u);
        for (int j = lane; j < T; j += 32) m = fmaxf(m, r[j]);
        m = warp_max(m);
        float sum = 0.0f;
        for (int j = lane; j < T; j += 32) {
            const float ex = expf(r[j] - m);
            r[j] = ex;
            sum += ex;
        }
        const float inv = 1.0f / warp_sum(sum);
        for (int j = lane; j < T; j += 32) r[j] *= inv;
    }
    // out = P' V, P' the probabilities after dropout.
    float acc[PT_OUTS];
#pragma unroll
    for (int o = 0; o < PT_OUTS; ++o) acc[o] = 0.0f;
    pt_weighted_pass(acc, rows, ps, kc, a.v, t, a.H, dh, [&](int i, int j) {
        const long long at = (long long)i * T + j;
        return packed_drop(a, probs[at], first + at);
    });
    pt_store_rows(a.out, acc, t.s0 + t.r0, n, a.H, t.h, dh);
}
STRATA_EMU_ENTRY(packed_attention_tiled_forward, PackedAttnParams)

extern "C" __global__ void packed_attention_tiled_backward_query(const PackedAttnParams a) {
    __shared__ float sm[PT_SMEM];
    PackedTile t;
    if (!packed_tile(a, t)) return;
    const int dh = a.dh, ld = dh + 1, T = t.T, n = t.n;
    const int kc = (PT_SMEM - PT_TILE * ld) / (PT_TILE + ld);
    float* dos = sm;
    float* rows = dos + PT_TILE * ld;
    float* ss = rows + kc * ld;
    const long long first = t.head + (long long)t.r0 * T;
    const float* p = a.probs + first;
    float* ds = a.ds + first;
    pt_stage_rows(dos, a.dout, t.s0 + t.r0, n, a.H, t.h, dh);
    // dP = dO V^T through the dropout, into ds.
    pt_dots_pass(dos, rows, kc, a.v, t, a.H, dh, [&](int i, int j, float dot) {
        const long long at = (long long)i * T + j;
        ds[at] = packed_drop(a, dot, first + at);
    });
    __syncthreads();
    // dS = P (dP - sum_j P dP) scale, a warp a row.
    const int lane = threadIdx.x & 31, warps = blockDim.x >> 5;
    for (int i = threadIdx.x >> 5; i < n; i += warps) {
        const float* pr = p + (long long)i * T;
        float* dr = ds + (long long)i * T;
        float dot = 0.0f;
        for (int j = lane; j < T; j += 32) dot += pr[j] * dr[j];
        dot = warp_sum(dot);
        for (int j = lane; j < T; j += 32) dr[j] = pr[j] * (dr[j] - dot) * a.scale;
    }
    // dQ = dS K.
    float acc[PT_OUTS];
#pragma unroll
    for (int o = 0; o < PT_OUTS; ++o) acc[o] = 0.0f;
    pt_weighted_pass(acc, rows, ss, kc, a.k, t, a.H, dh, [&](int i, int j) { return ds[(long long)i * T + j]; });
    pt_store_rows(a.dq, acc, t.s0 + t.r0, n, a.H, t.h, dh);
}
STRATA_EMU_ENTRY(packed_attention_tiled_backward_query, PackedAttnParams)

// dK_j = sum_i dS_ij q_i and dV_j = sum_i P'_ij dO_i for the tile's key rows j, the query rows i
// in chunks of qc: their q and dO rows, and the tile's columns of dS and P'.
extern "C" __global__ void packed_attention_tiled_backward_key(const PackedAttnParams a) {
    __shared__ float sm[PT_SMEM];
    PackedTile t;
    if (!packed_tile(a, t)) return;
    const int dh = a.dh, ld = dh + 1, T = t.T, n = t.n;
    const int qc = PT_SMEM / (2 * ld + 2 * PT_TILE);
    float* qs = sm;
    float* dos = qs + qc * ld;
    float* ss = dos + qc * ld;
    float* ps = ss + qc * PT_TILE;
    float dk[PT_OUTS], dv[PT_OUTS];
#pragma unroll
    for (int o = 0; o < PT_OUTS; ++o) dk[o] = dv[o] = 0.0f;
    for (int i0 = 0; i0 < T; i0 += qc) {
        const int m = pt_min(qc, T - i0);
        __syncthreads();
        pt_stage_rows(qs, a.q, t.s0 + i0, m, a.H, t.h, dh);
        pt_stage_rows(dos, a.dout, t.s0 + i0, m, a.H, t.h, dh);
        for (PtGridWalk at_(n); at_.i < m; at_.next(n)) {
            const int i = at_.i, j = at_.j;
            const long long at = t.head + (long long)(i0 + i) * T + t.r0 + j;
            ss[j * qc + i] = a.ds[at];
            ps[j * qc + i] = packed_drop(a, a.probs[at], at);
        }
        __syncthreads();
        pt_weighted_rows(dk, ss, qc, qs, n, m, dh);
        pt_weighted_rows(dv, ps, qc, dos, n, m, dh);
    }
    pt_store_rows(a.dk, dk, t.s0 + t.r0, n, a.H, t.h, dh);
    pt_store_rows(a.dv, dv, t.s0 + t.r0, n, a.H, t.h, dh);
}
STRATA_EMU_ENTRY(packed_attention_tiled_backward_key, PackedAttnParams)
