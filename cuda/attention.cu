// Attention on bf16 tensor cores (mma.sync m16n8k16, f32 accumulation), flash-style:
// K/V stream through shared memory in tiles of 64 keys, each warp keeps 16 query rows'
// running max, sum and output in registers (online softmax), and nothing of size
// queries x keys ever reaches global memory. CPU twins: runtime/reference/attention.rs
// (attention, attention_varlen) and runtime/reference/attention_ops.rs (the named ops).
//
// Rows. Grouped-query attention packs the query heads that share a KV head into one row
// tile: row r of KV head h is token r / group, query head h * group + r % group. A
// decode step of the 7B (group 7) is one 16-row tile per KV head; a verification of
// gamma + 1 = 6 tokens 42 rows; a prefill 64 rows (9 tokens x 7 heads) per block. The
// vision tower (group 1) has one row per token of a cu_seqlens segment.
//
// Entry points (one per mode and head dim 16 / 32 / 64 / 80 / 128, the launcher in
// runtime/backend/cuda.rs picks): attention_{prefill,decode,verify,varlen}_d{16,32,64,80,128}.
// Split over the keys (gridDim.z > 1: decode, verify, a prefill of few row tiles), each
// split stores its partial output and (max, sum), and the last split of a row tile to
// finish merges them (combine_splits): one launch either way.
//   prefill / decode (causal): query t (cache position start + t) sees keys
//       lo..=start + t, lo = 0 or start + t + 1 - window with a sliding window;
//   verify (masked): query t sees every cached key < mask_start and key mask_start + j
//       when mask[t * span + j] != 0, span = start + n - mask_start (mask_start = start:
//       the block alone, causal for a chain, ancestors for a tree; < start: a drafter's
//       tree whose earlier depths are already cached);
//   varlen: tokens of segment s (cu_seqlens[s]..cu_seqlens[s + 1]) see each other.
// Grid: (row tiles, KV heads [varlen: heads], key splits [varlen: segments]);
// block: 32 * warps threads, 16 rows per warp. Head dims must be 16, 32, 64, 80 or 128
// (any multiple of 16 works; these are instantiated: 16 and 32 for small models such as
// the HF test fixtures and the demo's, so that they run on the device end to end).
#include "common.cuh"

#define ATTN_BC 64  // keys per shared-memory tile

enum { MODE_CAUSAL = 0, MODE_MASKED = 1, MODE_VARLEN = 2 };

// Must match `AttnParams` in runtime/backend/cuda.rs field for field.
struct AttnParams {
    const bf16* q;              // [n, q_stride]: token t, head h at q + t * q_stride + h * D
    const bf16* k;              // [kv_len, kv_stride]: key j, KV head h at k + j * kv_stride + h * D
    const bf16* v;              // same layout as k
    bf16* out;                  // [n, out_stride], like q
    float* o_part;              // split-K: [splits, n * hq, D] partial outputs (normalised)
    float* ml_part;             // split-K: [splits, n * hq, 2] (running max in log2 units, sum)
    const uint8_t* mask;        // verify: [n, start + n - mask_start]
    const int32_t* cu_seqlens;  // varlen: [segments + 1]
    unsigned* counters;         // split-K: [row tiles * KV heads] arrival counts, zero between launches
    const int32_t* len_at;      // when set, start = *len_at and kv_len = start + n, read at run time
                                // (a CUDA graph replays one launch at every cache length)
    int n;                      // query tokens (varlen: total tokens)
    int start;                  // cache position of query token 0
    int mask_start;             // verify: first key the mask covers (<= start)
    int kv_len;                 // keys available
    int hq;                     // query heads
    int hkv;                    // KV heads
    int window;                 // sliding window (causal), 0 = none
    int keys_per_split;         // keys per blockIdx.z (a multiple of ATTN_BC); 0: the fewest that
                                // spread kv_len over gridDim.z (the splits past kv_len idle)
    int q_stride;
    int kv_stride;
    int out_stride;
    float scale_log2;           // softmax scale * log2(e)
};

__device__ __forceinline__ void mma_bf16(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
#ifdef MASSV_EMU
    massv_emu_mma_bf16(c, a, b0, b1);
#else
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}

__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
}

__device__ __forceinline__ uint32_t pack_bf16(bf16 lo, bf16 hi) {
    __nv_bfloat162 h = __halves2bfloat162(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
}

// The last split of a row tile to finish merges every split's partials of the tile's
// rows into out: out = sum_s w_s o_s / sum_s w_s, w_s = l_s 2^(m_s - M), M = max_s m_s,
// the splits in order. rows: the tile's rows (r = row_base + i), at most 64; splits: those
// that hold keys (the first ones; the rest wrote nothing).
template <int D>
__device__ __forceinline__ void combine_splits(const AttnParams& p, int splits, int row_base, int rows, int group,
                                               int head) {
    __shared__ float big_m[64], inv_w[64];
    const size_t all_rows = (size_t)p.n * p.hq;
    // Partial row of tile row i: token (row_base + i) / group, query head h * group + i % group.
    auto prow = [&](int i) {
        const int r = row_base + i;
        return (size_t)(r / group) * p.hq + head * group + r % group;
    };
    for (int i = threadIdx.x; i < rows; i += blockDim.x) {
        const size_t row = prow(i);
        float M = -INFINITY;
        for (int s = 0; s < splits; ++s) M = fmaxf(M, __ldcg(p.ml_part + (s * all_rows + row) * 2));
        float wsum = 0.0f;
        for (int s = 0; s < splits; ++s) {
            const float ms = __ldcg(p.ml_part + (s * all_rows + row) * 2);
            if (ms != -INFINITY) wsum += __ldcg(p.ml_part + (s * all_rows + row) * 2 + 1) * exp2f(ms - M);
        }
        big_m[i] = M;
        inv_w[i] = wsum > 0.0f ? 1.0f / wsum : 0.0f;
    }
    __syncthreads();
    for (int e = threadIdx.x; e < rows * D; e += blockDim.x) {
        const int i = e / D, c = e % D;
        const size_t row = prow(i);
        float acc = 0.0f;
        for (int s = 0; s < splits; ++s) {
            const float ms = __ldcg(p.ml_part + (s * all_rows + row) * 2);
            if (ms != -INFINITY)
                acc += __ldcg(p.ml_part + (s * all_rows + row) * 2 + 1) * exp2f(ms - big_m[i]) *
                       __ldcg(p.o_part + (s * all_rows + row) * D + c);
        }
        const int r = row_base + i;
        p.out[(size_t)(r / group) * p.out_stride + (size_t)(head * group + r % group) * D + c] = to_bf16(acc * inv_w[i]);
    }
}

template <int D, int MODE>
__device__ __forceinline__ void attention_body(const AttnParams& p) {
    constexpr int LD = D + 8;  // padded shared row: conflict-free fragment reads
    constexpr int KC = D / 16;
    constexpr int NT = D / 8;
    constexpr int NJ = ATTN_BC / 8;
    constexpr int CHUNKS = ATTN_BC * (D / 8);  // 16-byte chunks of K (and of V) in a tile
    // A thread's chunks of each in flight while a tile loads: a 4-warp block's share of a
    // tile (CHUNKS / 128 = D / 16, at least 1 since D >= 16), at most 4 (registers).
    constexpr int TILE_LOADS = D / 16 < 4 ? D / 16 : 4;
    __shared__ __align__(16) bf16 ks[ATTN_BC * LD];
    __shared__ __align__(16) bf16 vs[ATTN_BC * LD];

    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nw = blockDim.x >> 5;
    const int g = lane >> 2, tig = lane & 3;
    const int head = blockIdx.y;  // KV head (varlen: the head)

    int group, rows_total, seg_lo = 0;
    if (MODE == MODE_VARLEN) {
        seg_lo = p.cu_seqlens[blockIdx.z];
        rows_total = p.cu_seqlens[blockIdx.z + 1] - seg_lo;
        group = 1;
    } else {
        group = p.hq / p.hkv;
        rows_total = p.n * group;
    }
    const int row_base = blockIdx.x * nw * 16;
    if (row_base >= rows_total) return;  // uniform over the block

    // The cache's extent: fixed at launch, or read here (a CUDA graph's launch serves
    // every length), then the keys per split for it when the launcher left them open.
    int start = p.start, kv_len = p.kv_len, kps = p.keys_per_split, splits = gridDim.z;
    if (MODE != MODE_VARLEN) {
        if (p.len_at) {
            start = *p.len_at;
            kv_len = start + p.n;
        }
        if (kps <= 0) {
            kps = max(ATTN_BC, (kv_len + (int)gridDim.z - 1) / (int)gridDim.z + ATTN_BC - 1) / ATTN_BC * ATTN_BC;
            splits = min((int)gridDim.z, (kv_len + kps - 1) / kps);
        }
    }
    const bool split = MODE != MODE_VARLEN && gridDim.z > 1;
    if (split && (int)blockIdx.z >= splits) {  // past the cache: no partials, only counted in
        if (last_split_arrived(p.counters, blockIdx.y * gridDim.x + blockIdx.x, gridDim.z))
            combine_splits<D>(p, splits, row_base, min(rows_total - row_base, nw * 16), group, head);
        return;
    }

    // Key range of this block.
    int lo, hi;
    if (MODE == MODE_VARLEN) {
        lo = seg_lo;
        hi = seg_lo + rows_total;
    } else {
        const int t_first = row_base / group;
        const int t_last = min(rows_total - 1, row_base + nw * 16 - 1) / group;
        if (MODE == MODE_CAUSAL) {
            hi = min(kv_len, start + t_last + 1);
            lo = p.window > 0 ? max(0, start + t_first + 1 - p.window) : 0;
        } else {
            hi = min(kv_len, start + p.n);
            lo = 0;
        }
        const int s_lo = blockIdx.z * kps;
        lo = max(lo, s_lo);
        hi = min(hi, s_lo + kps);
    }

    // This lane's two rows: r[0] = tile row g, r[1] = g + 8.
    int tok[2], qh[2];
    bool valid[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const int r = row_base + warp * 16 + g + 8 * h;
        valid[h] = r < rows_total;
        if (MODE == MODE_VARLEN) {
            tok[h] = seg_lo + r;
            qh[h] = head;
        } else {
            tok[h] = r / group;
            qh[h] = head * group + r % group;
        }
    }

    // Q fragments (A operand, row-major 16 x D), zero for rows past the end.
    uint32_t qa[KC][4];
#pragma unroll
    for (int kc = 0; kc < KC; ++kc) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int h = i & 1, col = kc * 16 + tig * 2 + (i >> 1) * 8;
            qa[kc][i] = valid[h] ? *reinterpret_cast<const uint32_t*>(p.q + (size_t)tok[h] * p.q_stride +
                                                                      (size_t)qh[h] * D + col)
                                 : 0u;
        }
    }

    float o[NT][4];
#pragma unroll
    for (int i = 0; i < NT; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.0f;
    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};

    for (int key0 = lo; key0 < hi; key0 += ATTN_BC) {
        // K/V tile -> shared (zeros past hi so that masked products stay finite). A thread
        // loads TILE_LOADS of its 16-byte chunks of K and of V before it stores any: one at
        // a time, a tile of 64 keys cost 8 memory latencies (4 warps, D = 128), now 2.
        for (int c0 = threadIdx.x; c0 < CHUNKS; c0 += TILE_LOADS * blockDim.x) {
            uint4 kv[TILE_LOADS], vv[TILE_LOADS];
#pragma unroll
            for (int u = 0; u < TILE_LOADS; ++u) {
                const int c = c0 + u * blockDim.x;
                const int gk = key0 + c / (D / 8);
                kv[u] = vv[u] = make_uint4(0, 0, 0, 0);
                if (c < CHUNKS && gk < hi) {
                    const size_t off = (size_t)gk * p.kv_stride + (size_t)head * D + (c % (D / 8)) * 8;
                    kv[u] = *reinterpret_cast<const uint4*>(p.k + off);
                    vv[u] = *reinterpret_cast<const uint4*>(p.v + off);
                }
            }
#pragma unroll
            for (int u = 0; u < TILE_LOADS; ++u) {
                const int c = c0 + u * blockDim.x;
                if (c < CHUNKS) {
                    const int key = c / (D / 8), col = (c % (D / 8)) * 8;
                    *reinterpret_cast<uint4*>(&ks[key * LD + col]) = kv[u];
                    *reinterpret_cast<uint4*>(&vs[key * LD + col]) = vv[u];
                }
            }
        }
        __syncthreads();

        // S = Q K^T for 16 rows x 64 keys.
        float s[NJ][4];
#pragma unroll
        for (int j = 0; j < NJ; ++j) {
            s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.0f;
#pragma unroll
            for (int kc = 0; kc < KC; ++kc) {
                const bf16* kr = &ks[(j * 8 + g) * LD + kc * 16 + tig * 2];
                mma_bf16(s[j], qa[kc], *reinterpret_cast<const uint32_t*>(kr),
                         *reinterpret_cast<const uint32_t*>(kr + 8));
            }
        }

        // Mask, scale, online softmax.
        float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
        for (int j = 0; j < NJ; ++j) {
#pragma unroll
            for (int c = 0; c < 4; ++c) {
                const int h = c >> 1;
                const int key = key0 + j * 8 + tig * 2 + (c & 1);
                bool vis = key < hi;
                if (MODE == MODE_CAUSAL) {
                    const int last = start + tok[h];
                    vis = vis && key <= last && (p.window <= 0 || key > last - p.window);
                } else if (MODE == MODE_MASKED) {
                    const int jb = key - p.mask_start, span = start + p.n - p.mask_start;
                    vis = vis && (jb < 0 || (jb < span && valid[h] && p.mask[(size_t)tok[h] * span + jb] != 0));
                }
                s[j][c] = vis ? s[j][c] * p.scale_log2 : -INFINITY;
                mx[h] = fmaxf(mx[h], s[j][c]);
            }
        }
        float m_use[2];
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 1));
            mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 2));
            const float m_new = fmaxf(m[h], mx[h]);
            m_use[h] = m_new == -INFINITY ? 0.0f : m_new;
            const float corr = exp2f(m[h] - m_use[h]);
            m[h] = m_new;
            l[h] *= corr;
#pragma unroll
            for (int i = 0; i < NT; ++i) {
                o[i][2 * h] *= corr;
                o[i][2 * h + 1] *= corr;
            }
        }
#pragma unroll
        for (int j = 0; j < NJ; ++j) {
#pragma unroll
            for (int c = 0; c < 4; ++c) {
                s[j][c] = exp2f(s[j][c] - m_use[c >> 1]);
                l[c >> 1] += s[j][c];
            }
        }

        // O += P V: P's accumulator layout is the A fragment of the next mma.
#pragma unroll
        for (int kk = 0; kk < ATTN_BC / 16; ++kk) {
            uint32_t a[4];
            a[0] = pack_bf16(s[2 * kk][0], s[2 * kk][1]);
            a[1] = pack_bf16(s[2 * kk][2], s[2 * kk][3]);
            a[2] = pack_bf16(s[2 * kk + 1][0], s[2 * kk + 1][1]);
            a[3] = pack_bf16(s[2 * kk + 1][2], s[2 * kk + 1][3]);
            const bf16* v0 = &vs[(kk * 16 + tig * 2) * LD + g];
#pragma unroll
            for (int dn = 0; dn < NT; ++dn) {
                const bf16* vp = v0 + dn * 8;
                const uint32_t b0 = pack_bf16(vp[0], vp[LD]);
                const uint32_t b1 = pack_bf16(vp[8 * LD], vp[9 * LD]);
                mma_bf16(o[dn], a, b0, b1);
            }
        }
        __syncthreads();
    }

    // Finish: full row sums, then the output (or this split's partial result).
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        l[h] += __shfl_xor_sync(0xffffffffu, l[h], 1);
        l[h] += __shfl_xor_sync(0xffffffffu, l[h], 2);
    }
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        if (!valid[h]) continue;
        const float inv = l[h] > 0.0f ? 1.0f / l[h] : 0.0f;
        if (!split) {
            bf16* orow = p.out + (size_t)tok[h] * p.out_stride + (size_t)qh[h] * D;
#pragma unroll
            for (int dn = 0; dn < NT; ++dn) {
                *reinterpret_cast<__nv_bfloat162*>(orow + dn * 8 + tig * 2) =
                    __floats2bfloat162_rn(o[dn][2 * h] * inv, o[dn][2 * h + 1] * inv);
            }
        } else {
            const size_t row = (size_t)blockIdx.z * p.n * p.hq + (size_t)tok[h] * p.hq + qh[h];
            float* orow = p.o_part + row * D;
#pragma unroll
            for (int dn = 0; dn < NT; ++dn) {
                *reinterpret_cast<float2*>(orow + dn * 8 + tig * 2) =
                    make_float2(o[dn][2 * h] * inv, o[dn][2 * h + 1] * inv);
            }
            if (tig == 0) *reinterpret_cast<float2*>(p.ml_part + row * 2) = make_float2(m[h], l[h]);
        }
    }
    if (split && last_split_arrived(p.counters, blockIdx.y * gridDim.x + blockIdx.x, gridDim.z))
        combine_splits<D>(p, splits, row_base, min(rows_total - row_base, nw * 16), group, head);
}

#define ATTN_ENTRY(NAME, MODE, D)                                                                                      \
    extern "C" __global__ void __launch_bounds__(128) attention_##NAME##_d##D(const AttnParams p) {                   \
        pdl_wait();                                                                                                    \
        attention_body<D, MODE>(p);                                                                                    \
    }
#define ATTN_ENTRIES(NAME, MODE)                                                              \
    ATTN_ENTRY(NAME, MODE, 16) ATTN_ENTRY(NAME, MODE, 32) ATTN_ENTRY(NAME, MODE, 64) ATTN_ENTRY(NAME, MODE, 80) \
    ATTN_ENTRY(NAME, MODE, 128)

ATTN_ENTRIES(prefill, MODE_CAUSAL)
ATTN_ENTRIES(decode, MODE_CAUSAL)
ATTN_ENTRIES(verify, MODE_MASKED)
ATTN_ENTRIES(varlen, MODE_VARLEN)
