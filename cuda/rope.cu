// Rotary position embedding, rotate-half convention (transformers' apply_rotary_pos_emb),
// and its two variants: M-RoPE (Qwen2.5-VL's language model) and the vision tower's 2-D
// RoPE. CPU twins: runtime/reference/rope.rs.
//
// Grid: one block per token. The block first computes the (sin, cos) of each rotary pair
// into shared memory (positions are per token, frequencies per pair, shared by all
// heads), then rotates every head. head_dim <= 2 * MAX_PAIRS.
#include "common.cuh"

#define MAX_PAIRS 256

// Pair (x1, x2) rotated (rope_first / rope_second) into y[0], y[half].
__device__ __forceinline__ void rotate_pair(float x1, float x2, float c, float s, bf16* y, int half) {
    y[0] = rope_first(x1, x2, c, s);
    y[half] = rope_second(x1, x2, c, s);
}

// Rotates the heads of one token with the pair angles in sn/cs.
__device__ __forceinline__ void rotate_heads(bf16* __restrict__ xt, const float* sn, const float* cs, int heads,
                                             int head_dim) {
    const int half = head_dim / 2;
    for (int p = threadIdx.x; p < heads * half; p += blockDim.x) {
        const int h = p / half, i = p % half;
        bf16* xh = xt + (size_t)h * head_dim;
        rotate_pair(to_f32(xh[i]), to_f32(xh[i + half]), cs[i], sn[i], xh + i, half);
    }
}

// In place on x: [tokens, heads, head_dim]. positions: [tokens]. Pair i of a head
// rotates (x[i], x[i + head_dim/2]) by positions[t] * theta^(-2i/head_dim).
extern "C" __global__ void rope(bf16* __restrict__ x, const int32_t* __restrict__ positions, int heads,
                                int head_dim, float theta) {
    pdl_wait();
    __shared__ float sn[MAX_PAIRS], cs[MAX_PAIRS];
    const int half = head_dim / 2;
    const float pos = (float)positions[blockIdx.x];
    for (int i = threadIdx.x; i < half; i += blockDim.x)
        rope_sincos(pos, rope_inv_freq_at(i, head_dim, theta), &sn[i], &cs[i]);
    __syncthreads();
    rotate_heads(x + (size_t)blockIdx.x * heads * head_dim, sn, cs, heads, head_dim);
}

// The pair angles of token t under M-RoPE (mrope_sincos) into sn / cs (the block's
// threads share the pairs; the caller syncs). positions: [3, tokens] row-major.
__device__ __forceinline__ void mrope_angles(const int32_t* __restrict__ positions, int tokens, int t, int head_dim,
                                             float theta, int s0, int s1, float* sn, float* cs) {
    for (int i = threadIdx.x; i < head_dim / 2; i += blockDim.x)
        mrope_sincos(positions, tokens, t, i, head_dim, theta, s0, s1, &sn[i], &cs[i]);
}

// Multimodal RoPE (mrope_angles) in place on x: [tokens, heads, head_dim].
extern "C" __global__ void mrope(bf16* __restrict__ x, const int32_t* __restrict__ positions, int tokens, int heads,
                                 int head_dim, float theta, int s0, int s1) {
    pdl_wait();
    __shared__ float sn[MAX_PAIRS], cs[MAX_PAIRS];
    const int t = blockIdx.x;
    mrope_angles(positions, tokens, t, head_dim, theta, s0, s1, sn, cs);
    __syncthreads();
    rotate_heads(x + (size_t)t * heads * head_dim, sn, cs, heads, head_dim);
}

// 2-D RoPE of the vision tower: the first head_dim/4 pairs rotate with the patch's row,
// the next head_dim/4 with its column, frequencies 1 / theta^(2j / (head_dim/2)).
// rows, cols: [tokens].
extern "C" __global__ void rope_vision(bf16* __restrict__ x, const int32_t* __restrict__ rows,
                                       const int32_t* __restrict__ cols, int heads, int head_dim, float theta) {
    pdl_wait();
    __shared__ float sn[MAX_PAIRS], cs[MAX_PAIRS];
    const int half = head_dim / 2, quarter = head_dim / 4;
    const int t = blockIdx.x;
    for (int i = threadIdx.x; i < half; i += blockDim.x) {
        const bool is_row = i < quarter;
        const float pos = (float)(is_row ? rows[t] : cols[t]);
        rope_sincos(pos, rope_inv_freq_at(is_row ? i : i - quarter, half, theta), &sn[i], &cs[i]);
    }
    __syncthreads();
    rotate_heads(x + (size_t)t * heads * head_dim, sn, cs, heads, head_dim);
}

// A decoder layer's RoPE and cache write in one launch, after its QKV projection:
// q_out = rope(q), k_cache[len + t] = rope(k), v_cache[len + t] = v, with the roundings of
// rope / mrope followed by kv_append. qkv: [tokens, (hq + 2 * hkv) * head_dim], each
// token's row its q heads, then k heads, then v heads (one GEMM over the stacked
// weights); q_out: [tokens, hq * head_dim]. positions: [3, tokens] with sections s0, s1
// as in mrope; plain RoPE is s0 = head_dim / 2 (every pair on axis 0, so positions may
// be just [tokens]). k_cache, v_cache: [capacity, hkv * head_dim]. Grid: one block per
// token. CPU twin: reference::rope_kv_append.
extern "C" __global__ void rope_kv_append(const bf16* __restrict__ qkv, const int32_t* __restrict__ positions,
                                          int tokens, int hq, int hkv, int head_dim, float theta, int s0, int s1,
                                          bf16* __restrict__ q_out, bf16* __restrict__ k_cache,
                                          bf16* __restrict__ v_cache, int len,
                                          const int32_t* __restrict__ len_at) {
    pdl_wait();
    __shared__ float sn[MAX_PAIRS], cs[MAX_PAIRS];
    if (len_at) len = *len_at;  // read at run time: a CUDA graph's launch serves every length
    const int half = head_dim / 2;
    const int t = blockIdx.x;
    mrope_angles(positions, tokens, t, head_dim, theta, s0, s1, sn, cs);
    __syncthreads();
    const size_t q_row = (size_t)hq * head_dim, kv_row = (size_t)hkv * head_dim;
    const bf16* src = qkv + t * (q_row + 2 * kv_row);
    // Pairs of the q heads, then of the k heads: (x[i], x[i + half]) of head h.
    for (int p = threadIdx.x; p < (hq + hkv) * half; p += blockDim.x) {
        const int h = p / half, i = p % half;
        const bf16* x = src + (size_t)h * head_dim;
        bf16* y = h < hq ? q_out + t * q_row + (size_t)h * head_dim
                         : k_cache + (size_t)(len + t) * kv_row + (size_t)(h - hq) * head_dim;
        rotate_pair(to_f32(x[i]), to_f32(x[i + half]), cs[i], sn[i], y + i, half);
    }
    const bf16* v = src + q_row + kv_row;
    bf16* vc = v_cache + (size_t)(len + t) * kv_row;
    if (((kv_row & 7) | ((reinterpret_cast<uintptr_t>(v) | reinterpret_cast<uintptr_t>(vc)) & 15)) == 0) {
        for (int i = threadIdx.x; i < (int)(kv_row / 8); i += blockDim.x)
            reinterpret_cast<uint4*>(vc)[i] = reinterpret_cast<const uint4*>(v)[i];
    } else {
        for (int i = threadIdx.x; i < (int)kv_row; i += blockDim.x) vc[i] = v[i];
    }
}
