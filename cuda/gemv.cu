// Decode GEMV: y[b, n] = x[b, :] . W[n, :] (+ bias[n]) for a handful of rows b (1 for a
// decode step, gamma + 1 for a verification, up to 8), W in bf16 row-major [N, K] (the
// nn.Linear layout), f32 accumulation. Memory-bound: every weight is streamed from HBM
// exactly once for all rows, with 16-byte loads that bypass L1; x (a few KB) is re-read
// through L1 by every warp. CPU twin: runtime/reference/gemv.rs (= reference::linear).
//
// Layout of the work: a warp owns ROWS consecutive output columns n and walks K in
// 8-element (16-byte) steps, lane l taking steps l, l + 32, ...; the next two steps'
// weights are loaded while the current two are multiplied, so each lane keeps 2 * ROWS
// 16-byte weight loads in flight. A block is 4 warps.
// gridDim.y > 1 splits K (split-K): each split writes f32 partial sums to
// partial[split, b, n], and the block of a column range that finishes last (a counter per
// range, counters[blockIdx.x], zero before and after the launch) adds them up in split
// order, so a split GEMV is still one launch. K % 8 == 0.
// Under programmatic dependent launch (common.cuh's pdl_wait) each lane asks L2 for its
// first weights before it waits for the kernel before: weights are never written, so
// their stream can start while that kernel finishes.
//
// Two fusions spare a decoder layer the two RMSNorm launches between its sublayers:
// - rms_eps >= 0: x is the residual stream and each of its rows is RMS-normalised on the
//   way in. The norm's weight is folded into w's columns at load (w' = w · diag(norm)),
//   so only the row's scale 1 / sqrt(mean(x²) + eps) is left: every block computes it
//   (a pass over the few KB of x) and applies it to the dot products. The hot loop is
//   the plain GEMV's.
// - add_to_y: y += the result (rounded to bf16 first, as the stored projection would be)
//   instead of y = the result: the projection is added to the residual stream by the
//   thread that owns the element, so no other kernel has to.
// And the LM head's f32 variant can take each row's argmax as its epilogue (greedy
// decoding and drafting), sparing the argmax kernel's launch and its reread of the
// logits: see GemvArgmax.
#include "common.cuh"

#define GEMV_WARPS 4
#define GEMV_ROWS 4
#define GEMV_UNROLL 2

// acc[r][b] += x[b, 8 k8 ..] . w[r] for one 8-element step k8 whose weights w holds.
template <int B>
__device__ __forceinline__ void gemv_step(const uint4 w[GEMV_ROWS], const uint4* __restrict__ x4, int K8, int k8,
                                          float acc[GEMV_ROWS][B]) {
    float wf[GEMV_ROWS][8];
#pragma unroll
    for (int r = 0; r < GEMV_ROWS; ++r) bf16x8_to_f32(w[r], wf[r]);
#pragma unroll
    for (int b = 0; b < B; ++b) {
        float xf[8];
        bf16x8_to_f32(__ldg(x4 + (size_t)b * K8 + k8), xf);
#pragma unroll
        for (int r = 0; r < GEMV_ROWS; ++r)
#pragma unroll
            for (int i = 0; i < 8; ++i) acc[r][b] = fmaf(wf[r][i], xf[i], acc[r][b]);
    }
}

// acc[r][b] = x[b, ks] . wrow[r][ks] over this block's range ks of K (split blockIdx.y of
// gridDim.y), in 8-element steps; K8 = K / 8.
template <int B>
__device__ __forceinline__ void gemv_accumulate(const uint4* __restrict__ x4, const uint4* const wrow[GEMV_ROWS],
                                                int K8, float acc[GEMV_ROWS][B]) {
    const int lane = threadIdx.x & 31;
    const int per_split = ceil_div(K8, gridDim.y);
    const int k8_begin = blockIdx.y * per_split;
    const int k8_end = min(K8, k8_begin + per_split);
#pragma unroll
    for (int r = 0; r < GEMV_ROWS; ++r)
#pragma unroll
        for (int b = 0; b < B; ++b) acc[r][b] = 0.0f;

    // Software-pipelined: the weights of the next GEMV_UNROLL steps are requested before
    // those of these are multiplied, so one memory latency serves GEMV_UNROLL * GEMV_ROWS
    // 16-byte loads. Written plainly (load, then multiply), nvcc issued half of them only
    // once the first half had arrived: two latencies a step (tests/sass.rs holds it to one).
    int k8 = k8_begin + lane;
    bool full = k8 + 32 * (GEMV_UNROLL - 1) < k8_end;
    uint4 wv[GEMV_UNROLL][GEMV_ROWS];
    if (full) {
#pragma unroll
        for (int u = 0; u < GEMV_UNROLL; ++u)
#pragma unroll
            for (int r = 0; r < GEMV_ROWS; ++r) wv[u][r] = ld_stream(wrow[r] + k8 + 32 * u);
    }
    while (full) {
        const int kn = k8 + 32 * GEMV_UNROLL;
        const bool more = kn + 32 * (GEMV_UNROLL - 1) < k8_end;
        uint4 next[GEMV_UNROLL][GEMV_ROWS];
#pragma unroll
        for (int u = 0; u < GEMV_UNROLL; ++u)
#pragma unroll
            for (int r = 0; r < GEMV_ROWS; ++r)
                next[u][r] = more ? ld_stream(wrow[r] + kn + 32 * u) : make_uint4(0, 0, 0, 0);
#pragma unroll
        for (int u = 0; u < GEMV_UNROLL; ++u) gemv_step<B>(wv[u], x4, K8, k8 + 32 * u, acc);
#pragma unroll
        for (int u = 0; u < GEMV_UNROLL; ++u)
#pragma unroll
            for (int r = 0; r < GEMV_ROWS; ++r) wv[u][r] = next[u][r];
        k8 = kn;
        full = more;
    }
    for (; k8 < k8_end; k8 += 32) {
        uint4 w[GEMV_ROWS];
#pragma unroll
        for (int r = 0; r < GEMV_ROWS; ++r) w[r] = ld_stream(wrow[r] + k8);
        gemv_step<B>(w, x4, K8, k8, acc);
    }
#pragma unroll
    for (int r = 0; r < GEMV_ROWS; ++r)
#pragma unroll
        for (int b = 0; b < B; ++b) acc[r][b] = warp_sum(acc[r][b]);
}

__device__ __forceinline__ void store_out(float* y, size_t i, float v, bool add) { y[i] = add ? y[i] + v : v; }
__device__ __forceinline__ void store_out(bf16* y, size_t i, float v, bool add) {
    y[i] = add ? to_bf16(to_f32(to_bf16(v)) + to_f32(y[i])) : to_bf16(v);
}

#define GEMV_MAX_B 8

// row_scale[b] = 1 / sqrt(mean(x[b]²) + eps) for the B rows of x, in shared memory for
// the whole block; the scales the epilogues read, or null with eps < 0 (scale 1: the
// plain GEMV pays no pass and no barrier). Every thread of the block calls it. Two
// barriers for any B: each warp sums its share of every row, then thread b adds the
// warps' sums of row b in warp order (the same scale in every block). A thread loads two
// steps of every row before it uses any (2B loads in flight: row after row, a verify
// block's 6 rows waited for 6 to 12 L2 latencies in turn), each row's sum still taken
// over its k8 in order.
template <int B>
__device__ __forceinline__ const float* rms_row_scales(const bf16* __restrict__ x, int K, float eps,
                                                       float* row_scale) {
    if (eps < 0.0f) return nullptr;
    __shared__ float warp_ss[GEMV_WARPS][GEMV_MAX_B];
    constexpr int STEP = GEMV_WARPS * 32;
    const uint4* x4 = reinterpret_cast<const uint4*>(x);
    const int K8 = K / 8, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    float ss[B];
#pragma unroll
    for (int b = 0; b < B; ++b) ss[b] = 0.0f;
    auto add_squares = [&](const uint4 v, float& s) {
        float f[8];
        bf16x8_to_f32(v, f);
#pragma unroll
        for (int i = 0; i < 8; ++i) s += f[i] * f[i];
    };
    int k8 = threadIdx.x;
    for (; k8 + STEP < K8; k8 += 2 * STEP) {
        uint4 v[2][B];
#pragma unroll
        for (int h = 0; h < 2; ++h)
#pragma unroll
            for (int b = 0; b < B; ++b) v[h][b] = __ldg(x4 + (size_t)b * K8 + k8 + h * STEP);
#pragma unroll
        for (int h = 0; h < 2; ++h)
#pragma unroll
            for (int b = 0; b < B; ++b) add_squares(v[h][b], ss[b]);
    }
    if (k8 < K8) {
        uint4 v[B];
#pragma unroll
        for (int b = 0; b < B; ++b) v[b] = __ldg(x4 + (size_t)b * K8 + k8);
#pragma unroll
        for (int b = 0; b < B; ++b) add_squares(v[b], ss[b]);
    }
#pragma unroll
    for (int b = 0; b < B; ++b) {
        const float w = warp_sum(ss[b]);
        if (lane == 0) warp_ss[warp][b] = w;
    }
    __syncthreads();
    if (threadIdx.x < B) {
        float s = 0.0f;
#pragma unroll
        for (int w = 0; w < GEMV_WARPS; ++w) s += warp_ss[w][threadIdx.x];
        row_scale[threadIdx.x] = rsqrtf(s / (float)K + eps);
    }
    __syncthreads();
    return row_scale;
}

__device__ __forceinline__ float scale_of(const float* row_scale, int b) { return row_scale ? row_scale[b] : 1.0f; }

// Row r of a warp's GEMV_ROWS weight rows: output n0 + r of gemv_bf16, or for gemv_swiglu
// (swiglu = true, n0 = the warp's first output j0) gate row j0 + r for r < SWIGLU_COLS,
// then the matching up rows. Clamped to the last row: no out-of-bounds reads.
#define SWIGLU_COLS (GEMV_ROWS / 2)
__device__ __forceinline__ const uint4* weight_row(const bf16* w, bool swiglu, int n0, int r, int N, int K8) {
    const uint4* w4 = reinterpret_cast<const uint4*>(w);
    if (!swiglu) return w4 + (size_t)min(n0 + r, N - 1) * K8;
    const int j = min(n0 + r % SWIGLU_COLS, N - 1);  // N = inter here
    return w4 + ((size_t)(r / SWIGLU_COLS) * N + j) * K8;
}

// Before pdl_wait: L2 prefetches of the weights this lane loads first (rows wrow of its
// warp over this block's K range; none where !live), which no kernel writes, so that
// under programmatic dependent launch the stream starts while the kernel before still
// runs. Then the wait.
__device__ __forceinline__ void prefetch_rows_then_wait(const uint4* const wrow[GEMV_ROWS], bool live, int K8) {
    const int lane = threadIdx.x & 31;
    const int k8 = blockIdx.y * ceil_div(K8, gridDim.y) + lane;
    const int k8_end = min(K8, k8 - lane + ceil_div(K8, gridDim.y));
#pragma unroll
    for (int u = 0; u < GEMV_UNROLL; ++u)
#pragma unroll
        for (int r = 0; r < GEMV_ROWS; ++r)
            if (live && k8 + 32 * u < k8_end) prefetch_l2(wrow[r] + k8 + 32 * u);
    pdl_wait();
}

// prefetch_rows_then_wait for the warp's rows of gemv_bf16 / gemv_swiglu (weight_row).
__device__ __forceinline__ void prefetch_then_wait(const bf16* w, bool swiglu, int n0, int N, int K8) {
    const uint4* wrow[GEMV_ROWS];
#pragma unroll
    for (int r = 0; r < GEMV_ROWS; ++r) wrow[r] = weight_row(w, swiglu, n0, r, N, K8);
    prefetch_rows_then_wait(wrow, n0 < N, K8);
}

// An output's value from its dot product: acc · scale + bias[n] in one rounding (one
// expression for every GEMV, so the fused epilogues give the plain GEMV's bits).
__device__ __forceinline__ float gemv_result(float acc, float scale, const bf16* __restrict__ bias, int n) {
    return __fmaf_rn(acc, scale, bias ? to_f32(bias[n]) : 0.0f);
}

// The LM head's argmax fused into gemv_bf16_f32 (CPU twin: reference::gemv_bf16_argmax,
// the GEMV then argmax): the first index of each row's maximum over the values y gets,
// NaNs skipped, 0 when there is none (sampling.cu's argmax). A value and its index pack
// into one 64-bit key that orders as the argmax does, value first, then the lower index:
// the value's bits made monotone (negatives flipped; -0 as +0, which the CPU's > holds
// equal) above, the index's complement below. So a block's best is a max of keys, merged
// into keys[b] with one atomicMax a row, in any order; the block that counts last on
// *count turns keys[b] into out[b] and zeroes it. keys: [GEMV_MAX_B] and *count zero
// before and after the launch. out == nullptr: no argmax.
struct GemvArgmax {
    int32_t* out;
    unsigned long long* keys;
    unsigned* count;
};

__device__ __forceinline__ unsigned long long argmax_key(float v, int n) {
    if (v != v) return 0ull;  // NaN: never picked (key 0: nothing seen)
    const unsigned b = __float_as_uint(v == 0.0f ? 0.0f : v);
    const unsigned ordered = (b & 0x80000000u) ? ~b : (b | 0x80000000u);
    return ((unsigned long long)ordered << 32) | (0xffffffffu - (unsigned)n);
}

// Every thread's best keys kb[b] merged into the row's key; the last block to arrive
// writes the argmax. Called by every thread of the block, after its outputs are final.
template <int B>
__device__ __forceinline__ void gemv_argmax_arrive(const GemvArgmax& am, const unsigned long long kb[B]) {
    __shared__ unsigned long long warp_best[GEMV_WARPS][B];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
#pragma unroll
    for (int b = 0; b < B; ++b) {
        unsigned long long k = kb[b];
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) k = max(k, __shfl_xor_sync(0xffffffffu, k, off));
        if (lane == 0) warp_best[warp][b] = k;
    }
    __syncthreads();
    if (threadIdx.x < B) {
        unsigned long long k = 0ull;
#pragma unroll
        for (int w = 0; w < GEMV_WARPS; ++w) k = max(k, warp_best[w][threadIdx.x]);
        if (k != 0ull) atomicMax(am.keys + threadIdx.x, k);
    }
    if (!last_split_arrived(am.count, 0, gridDim.x)) return;
    if (threadIdx.x < B) {
        const unsigned long long k = __ldcg(am.keys + threadIdx.x);
        am.keys[threadIdx.x] = 0ull;
        am.out[threadIdx.x] = k == 0ull ? 0 : (int32_t)(0xffffffffu - (unsigned)(k & 0xffffffffull));
    }
}

// One warp's GEMV_ROWS outputs n0.. over this block's K range: to y (+ bias) or, split
// over K, to the partial sums partial[blockIdx.y, b, n]. Each output y gets is folded
// into kb[b] (argmax_key) where `keys`.
template <int B, typename OutT>
__device__ __forceinline__ void gemv_warp(const bf16* __restrict__ x, const bf16* __restrict__ w,
                                          const bf16* __restrict__ bias, OutT* __restrict__ y,
                                          float* __restrict__ partial, const float* row_scale, bool add, int N,
                                          int K, int n0, int lane, bool keys, unsigned long long kb[B]) {
    const int K8 = K / 8;
    const uint4* wrow[GEMV_ROWS];
#pragma unroll
    for (int r = 0; r < GEMV_ROWS; ++r) wrow[r] = weight_row(w, false, n0, r, N, K8);
    float acc[GEMV_ROWS][B];
    gemv_accumulate<B>(reinterpret_cast<const uint4*>(x), wrow, K8, acc);
    // Lane (r * B + b) % 32 stores output (r, b): spreads the stores over the warp.
#pragma unroll
    for (int r = 0; r < GEMV_ROWS; ++r) {
        const int n = n0 + r;
#pragma unroll
        for (int b = 0; b < B; ++b) {
            if (lane == ((r * B + b) & 31) && n < N) {
                if (gridDim.y == 1) {
                    const float v = gemv_result(acc[r][b], scale_of(row_scale, b), bias, n);
                    store_out(y, (size_t)b * N + n, v, add);
                    if (keys) kb[b] = max(kb[b], argmax_key(v, n));
                } else {
                    partial[((size_t)blockIdx.y * B + b) * N + n] = acc[r][b];
                }
            }
        }
    }
}

// One K range per blockIdx.y; with gridDim.y == 1 the result (scaled, + bias) goes to y,
// else the last split of the block's columns adds the partial sums up in split order,
// then scales them and adds the bias. Then, with am.out, the argmax epilogue.
template <int B, typename OutT>
__device__ __forceinline__ void gemv_body(const bf16* __restrict__ x, const bf16* __restrict__ w,
                                          const bf16* __restrict__ bias, OutT* __restrict__ y,
                                          float* __restrict__ partial, unsigned* __restrict__ counters, int N,
                                          int K, float rms_eps, bool add, const GemvArgmax am) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int n0 = (blockIdx.x * GEMV_WARPS + warp) * GEMV_ROWS;
    prefetch_then_wait(w, false, n0, N, K / 8);
    __shared__ float scales[GEMV_MAX_B];
    const float* row_scale = rms_row_scales<B>(x, K, rms_eps, scales);
    const bool keys = am.out != nullptr;
    unsigned long long kb[B];
#pragma unroll
    for (int b = 0; b < B; ++b) kb[b] = 0ull;
    // No early return: a split's warps all meet at last_split_arrived's barriers.
    if (n0 < N) gemv_warp<B>(x, w, bias, y, partial, row_scale, add, N, K, n0, lane, keys, kb);
    if (gridDim.y > 1) {
        if (!last_split_arrived(counters, blockIdx.x, gridDim.y)) return;
        const int c0 = blockIdx.x * GEMV_WARPS * GEMV_ROWS, cols = min(GEMV_WARPS * GEMV_ROWS, N - c0);
        for (int i = threadIdx.x; i < B * cols; i += blockDim.x) {
            const int b = i / cols, n = c0 + i % cols;
            float s = 0.0f;
            for (int k = 0; k < (int)gridDim.y; ++k) s += __ldcg(partial + ((size_t)k * B + b) * N + n);
            const float v = gemv_result(s, scale_of(row_scale, b), bias, n);
            store_out(y, (size_t)b * N + n, v, add);
#pragma unroll
            for (int bb = 0; bb < B; ++bb)  // kb indexed by constants: it stays in registers
                if (keys && bb == b) kb[bb] = max(kb[bb], argmax_key(v, n));
        }
    }
    if (keys) gemv_argmax_arrive<B>(am, kb);
}

#define GEMV_ENTRY(B)                                                                                                  \
    extern "C" __global__ void __launch_bounds__(GEMV_WARPS * 32)                                                     \
        gemv_bf16_b##B(const bf16* __restrict__ x, const bf16* __restrict__ w, const bf16* __restrict__ bias,         \
                       bf16* __restrict__ y, float* __restrict__ partial, unsigned* __restrict__ counters, int N,     \
                       int K, float rms_eps, int add_to_y) {                                                           \
        gemv_body<B, bf16>(x, w, bias, y, partial, counters, N, K, rms_eps, add_to_y != 0,                             \
                           GemvArgmax{nullptr, nullptr, nullptr});                                                     \
    }                                                                                                                  \
    extern "C" __global__ void __launch_bounds__(GEMV_WARPS * 32)                                                     \
        gemv_bf16_f32_b##B(const bf16* __restrict__ x, const bf16* __restrict__ w, const bf16* __restrict__ bias,     \
                           float* __restrict__ y, float* __restrict__ partial, unsigned* __restrict__ counters,       \
                           int N, int K, float rms_eps, int add_to_y, int32_t* argmax_out,                            \
                           unsigned long long* argmax_keys, unsigned* argmax_count) {                                 \
        gemv_body<B, float>(x, w, bias, y, partial, counters, N, K, rms_eps, add_to_y != 0,                            \
                            GemvArgmax{argmax_out, argmax_keys, argmax_count});                                        \
    }

GEMV_ENTRY(1)
GEMV_ENTRY(2)
GEMV_ENTRY(3)
GEMV_ENTRY(4)
GEMV_ENTRY(5)
GEMV_ENTRY(6)
GEMV_ENTRY(7)
GEMV_ENTRY(8)

// ---------------------------------------------------------------------------------
// The QKV projection with RoPE and the cache write as its epilogue (a decode or verify
// block): q_out = rope(q), k_cache[len + t] = rope(k), v_cache[len + t] = v straight from
// the GEMV's registers, the bits of gemv_bf16 (a bf16 qkv row) then rope.cu's
// rope_kv_append, in one launch rather than two. CPU twin: reference::gemv_rope_kv_append.
// RoPE pairs entries head_dim / 2 apart, which the plain GEMV's column order puts in
// different blocks, so a warp's GEMV_ROWS weight rows are two whole pairs instead: warp
// unit u (unit columns 4u..4u + 3) inside a q or k head takes rows 2j, 2j + 1, 2j + half,
// 2j + 1 + half of the head (j: u's place in it, half = head_dim / 2), and inside the v
// heads 4 consecutive rows (rope_unit_row). Every lane has the warp's sums, so a lane
// rotates an entry with its partner's (unit column c ^ 2) at hand. Split over K the
// partial sums go to partial[split, b, c] and the last split finishes the block's units
// (whole: a block is 4 units). w, bias: the stacked QKV projection [(hq + 2 hkv)
// head_dim, K] (bias may be null); head_dim % 4 == 0. positions, s0, s1, len, len_at:
// as rope_kv_append's, for the B tokens.
struct RopeKvArgs {
    const int32_t* positions;
    int head_dim;
    int rotated;  // (hq + hkv) * head_dim: the q and k columns
    int q_row;    // hq * head_dim
    int kv_row;   // hkv * head_dim
    float theta;
    int s0, s1;
    bf16* q_out;
    bf16* k_cache;
    bf16* v_cache;
    int len;
};

// The qkv column (weight row) of unit column c.
__device__ __forceinline__ int rope_unit_row(int c, int head_dim, int rotated) {
    const int u0 = c & ~3, r = c & 3;
    if (u0 >= rotated) return c;
    const int h = u0 / head_dim, j = (u0 % head_dim) / 4;
    return h * head_dim + 2 * j + (r & 1) + (r >> 1) * (head_dim / 2);
}

// The warp's weight rows (units past N clamped to the last: nothing is read there).
__device__ __forceinline__ void rope_weight_rows(const bf16* w, int n0, int N, int K8, int head_dim, int rotated,
                                                 const uint4* wrow[GEMV_ROWS]) {
#pragma unroll
    for (int r = 0; r < GEMV_ROWS; ++r) {
        const int row = rope_unit_row(min(n0, N - GEMV_ROWS) + r, head_dim, rotated);
        wrow[r] = reinterpret_cast<const uint4*>(w) + (size_t)row * K8;
    }
}

// prefetch_rows_then_wait for the warp's rows of gemv_rope_kv_append.
__device__ __forceinline__ void rope_prefetch_then_wait(const bf16* w, int n0, int N, int K8, int head_dim,
                                                        int rotated) {
    const uint4* wrow[GEMV_ROWS];
    rope_weight_rows(w, n0, N, K8, head_dim, rotated, wrow);
    prefetch_rows_then_wait(wrow, n0 < N, K8);
}

// Unit column c of token b, given its value v and, in a q or k head, its partner's vp
// (unit column c ^ 2): rounded to bf16 as the qkv row holds it, rotated, stored.
template <int B>
__device__ __forceinline__ void rope_kv_store(const RopeKvArgs& a, int c, int b, float v, float vp) {
    const int col = rope_unit_row(c, a.head_dim, a.rotated);
    if (col >= a.rotated) {
        a.v_cache[(size_t)(a.len + b) * a.kv_row + col - a.rotated] = to_bf16(v);
        return;
    }
    const int half = a.head_dim / 2, in_head = col % a.head_dim;
    float sn, cs;
    mrope_sincos(a.positions, B, b, in_head % half, a.head_dim, a.theta, a.s0, a.s1, &sn, &cs);
    const float x = to_f32(to_bf16(v)), xp = to_f32(to_bf16(vp));
    const bf16 y = in_head < half ? rope_first(x, xp, cs, sn) : rope_second(xp, x, cs, sn);
    if (col < a.q_row) a.q_out[(size_t)b * a.q_row + col] = y;
    else a.k_cache[(size_t)(a.len + b) * a.kv_row + col - a.q_row] = y;
}

template <int B>
__device__ __forceinline__ void gemv_rope_kv_body(const bf16* __restrict__ x, const bf16* __restrict__ w,
                                                  const bf16* __restrict__ bias, float* __restrict__ partial,
                                                  unsigned* __restrict__ counters, int N, int K, float rms_eps,
                                                  RopeKvArgs a, const int32_t* __restrict__ len_at) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, K8 = K / 8;
    const int n0 = (blockIdx.x * GEMV_WARPS + warp) * GEMV_ROWS;
    rope_prefetch_then_wait(w, n0, N, K8, a.head_dim, a.rotated);
    if (len_at) a.len = *len_at;  // read at run time: a CUDA graph's launch serves every length
    const uint4* wrow[GEMV_ROWS];
    rope_weight_rows(w, n0, N, K8, a.head_dim, a.rotated, wrow);
    __shared__ float scales[GEMV_MAX_B];
    const float* row_scale = rms_row_scales<B>(x, K, rms_eps, scales);
    // Each thread finishes at most one output (unit column c of token b): its sum and its
    // partner's. One call of rope_kv_store in the kernel, outside any loop: its sincos
    // and pow inlined once, and the K loop keeps its registers.
    int c = -1, b = 0;
    float sum = 0.0f, partner = 0.0f;
    if (n0 < N) {
        float acc[GEMV_ROWS][B];
        gemv_accumulate<B>(reinterpret_cast<const uint4*>(x), wrow, K8, acc);
#pragma unroll
        for (int r = 0; r < GEMV_ROWS; ++r) {
#pragma unroll
            for (int bb = 0; bb < B; ++bb) {
                if (gridDim.y == 1) {
                    if (lane == r * B + bb) {  // every lane has the warp's sums
                        c = n0 + r;
                        b = bb;
                        sum = acc[r][bb];
                        partner = acc[r ^ 2][bb];
                    }
                } else if (lane == ((r * B + bb) & 31)) {
                    partial[((size_t)blockIdx.y * B + bb) * N + n0 + r] = acc[r][bb];
                }
            }
        }
    }
    if (gridDim.y > 1) {
        if (!last_split_arrived(counters, blockIdx.x, gridDim.y)) return;
        // B * cols <= blockDim.x: a thread an output.
        const int c0 = blockIdx.x * GEMV_WARPS * GEMV_ROWS, cols = min(GEMV_WARPS * GEMV_ROWS, N - c0);
        if ((int)threadIdx.x < B * cols) {
            b = threadIdx.x / cols;
            c = c0 + threadIdx.x % cols;
            for (int k = 0; k < (int)gridDim.y; ++k) {
                const float* p = partial + ((size_t)k * B + b) * N;
                sum += __ldcg(p + c);
                partner += __ldcg(p + (c ^ 2));
            }
        }
    }
    if (c < 0) return;
    const float sc = scale_of(row_scale, b);
    rope_kv_store<B>(a, c, b, gemv_result(sum, sc, bias, rope_unit_row(c, a.head_dim, a.rotated)),
                     gemv_result(partner, sc, bias, rope_unit_row(c ^ 2, a.head_dim, a.rotated)));
}

#define GEMV_ROPE_KV_ENTRY(B)                                                                                          \
    extern "C" __global__ void __launch_bounds__(GEMV_WARPS * 32) gemv_rope_kv_append_b##B(                          \
        const bf16* __restrict__ x, const bf16* __restrict__ w, const bf16* __restrict__ bias,                        \
        float* __restrict__ partial, unsigned* __restrict__ counters, int N, int K, float rms_eps,                    \
        const int32_t* __restrict__ positions, int hq, int hkv, int head_dim, float theta, int s0, int s1,           \
        bf16* __restrict__ q_out, bf16* __restrict__ k_cache, bf16* __restrict__ v_cache, int len,                   \
        const int32_t* __restrict__ len_at) {                                                                         \
        gemv_rope_kv_body<B>(x, w, bias, partial, counters, N, K, rms_eps,                                             \
                             RopeKvArgs{positions, head_dim, (hq + hkv) * head_dim, hq * head_dim, hkv * head_dim,     \
                                        theta, s0, s1, q_out, k_cache, v_cache, len},                                  \
                             len_at);                                                                                  \
    }

GEMV_ROPE_KV_ENTRY(1)
GEMV_ROPE_KV_ENTRY(2)
GEMV_ROPE_KV_ENTRY(3)
GEMV_ROPE_KV_ENTRY(4)
GEMV_ROPE_KV_ENTRY(5)
GEMV_ROPE_KV_ENTRY(6)
GEMV_ROPE_KV_ENTRY(7)
GEMV_ROPE_KV_ENTRY(8)

// The MLP's gate/up projection with SwiGLU as its epilogue: y[b, j] = silu(g) * u with
// g = x[b] . w[j], u = x[b] . w[inter + j] (w: [2 * inter, K], gate rows first, the
// layout swiglu reads), so the 2 * inter projections never reach memory. A warp owns
// GEMV_ROWS / 2 outputs j and streams their gate and up rows together. Split over K,
// the f32 partial sums of both go to partial[split, b, 2 * inter] (the gate/up column
// order) and the last split finishes. rms_eps >= 0 normalises x's rows on the way in,
// as gemv_bf16 does. CPU twin: reference::gemv_swiglu.
__device__ __forceinline__ float silu_mul(float g, float u) { return g / (1.0f + __expf(-g)) * u; }

template <int B>
__device__ __forceinline__ void gemv_swiglu_warp(const bf16* __restrict__ x, const bf16* __restrict__ w,
                                                 bf16* __restrict__ y, float* __restrict__ partial,
                                                 const float* row_scale, int inter, int K, int j0, int lane) {
    const int K8 = K / 8;
    const uint4* wrow[GEMV_ROWS];
#pragma unroll
    for (int r = 0; r < GEMV_ROWS; ++r) wrow[r] = weight_row(w, true, j0, r, inter, K8);
    float acc[GEMV_ROWS][B];
    gemv_accumulate<B>(reinterpret_cast<const uint4*>(x), wrow, K8, acc);
#pragma unroll
    for (int c = 0; c < SWIGLU_COLS; ++c) {
        const int j = j0 + c;
#pragma unroll
        for (int b = 0; b < B; ++b) {
            if (lane == ((c * B + b) & 31) && j < inter) {
                const float g = acc[c][b], u = acc[c + SWIGLU_COLS][b];
                if (gridDim.y == 1) {
                    const float sc = scale_of(row_scale, b);
                    y[(size_t)b * inter + j] = to_bf16(silu_mul(g * sc, u * sc));
                } else {
                    float* p = partial + ((size_t)blockIdx.y * B + b) * 2 * inter;
                    p[j] = g;
                    p[inter + j] = u;
                }
            }
        }
    }
}

template <int B>
__device__ __forceinline__ void gemv_swiglu_body(const bf16* __restrict__ x, const bf16* __restrict__ w,
                                                 bf16* __restrict__ y, float* __restrict__ partial,
                                                 unsigned* __restrict__ counters, int inter, int K,
                                                 float rms_eps) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int j0 = (blockIdx.x * GEMV_WARPS + warp) * SWIGLU_COLS;
    prefetch_then_wait(w, true, j0, inter, K / 8);
    __shared__ float scales[GEMV_MAX_B];
    const float* row_scale = rms_row_scales<B>(x, K, rms_eps, scales);
    if (j0 < inter) gemv_swiglu_warp<B>(x, w, y, partial, row_scale, inter, K, j0, lane);
    if (gridDim.y == 1 || !last_split_arrived(counters, blockIdx.x, gridDim.y)) return;
    const int c0 = blockIdx.x * GEMV_WARPS * SWIGLU_COLS, cols = min(GEMV_WARPS * SWIGLU_COLS, inter - c0);
    for (int i = threadIdx.x; i < B * cols; i += blockDim.x) {
        const int b = i / cols, j = c0 + i % cols;
        float g = 0.0f, u = 0.0f;
        for (int k = 0; k < (int)gridDim.y; ++k) {
            const float* p = partial + ((size_t)k * B + b) * 2 * inter;
            g += __ldcg(p + j);
            u += __ldcg(p + inter + j);
        }
        const float sc = scale_of(row_scale, b);
        y[(size_t)b * inter + j] = to_bf16(silu_mul(g * sc, u * sc));
    }
}

#define GEMV_SWIGLU_ENTRY(B)                                                                                           \
    extern "C" __global__ void __launch_bounds__(GEMV_WARPS * 32)                                                     \
        gemv_swiglu_b##B(const bf16* __restrict__ x, const bf16* __restrict__ w, bf16* __restrict__ y,                \
                         float* __restrict__ partial, unsigned* __restrict__ counters, int inter, int K,              \
                         float rms_eps) {                                                                              \
        gemv_swiglu_body<B>(x, w, y, partial, counters, inter, K, rms_eps);                                            \
    }

GEMV_SWIGLU_ENTRY(1)
GEMV_SWIGLU_ENTRY(2)
GEMV_SWIGLU_ENTRY(3)
GEMV_SWIGLU_ENTRY(4)
GEMV_SWIGLU_ENTRY(5)
GEMV_SWIGLU_ENTRY(6)
GEMV_SWIGLU_ENTRY(7)
GEMV_SWIGLU_ENTRY(8)
