// Rotary position embedding, rotate-half convention (transformers' apply_rotary_pos_emb),
// and its two variants: M-RoPE (Qwen2.5-VL's language model) and the vision tower's 2-D
// RoPE. CPU twins: runtime/reference/rope.rs.
//
// Grid: one block per token. The block first computes the (sin, cos) of each rotary pair
// into shared memory (positions are per token, frequencies per pair, shared by all
// heads), then rotates every head. head_dim <= 2 * MAX_PAIRS.
#include "common.cuh"

#define MAX_PAIRS 256

// Rotates the heads of one token with the pair angles in sn/cs.
__device__ __forceinline__ void rotate_heads(bf16* __restrict__ xt, const float* sn, const float* cs, int heads,
                                             int head_dim) {
    const int half = head_dim / 2;
    for (int p = threadIdx.x; p < heads * half; p += blockDim.x) {
        const int h = p / half, i = p % half;
        bf16* xh = xt + (size_t)h * head_dim;
        const float x1 = to_f32(xh[i]), x2 = to_f32(xh[i + half]);
        xh[i] = to_bf16(x1 * cs[i] - x2 * sn[i]);
        xh[i + half] = to_bf16(x2 * cs[i] + x1 * sn[i]);
    }
}

// In place on x: [tokens, heads, head_dim]. positions: [tokens]. Pair i of a head
// rotates (x[i], x[i + head_dim/2]) by positions[t] * theta^(-2i/head_dim).
extern "C" __global__ void rope(bf16* __restrict__ x, const int32_t* __restrict__ positions, int heads,
                                int head_dim, float theta) {
    __shared__ float sn[MAX_PAIRS], cs[MAX_PAIRS];
    const int half = head_dim / 2;
    const float pos = (float)positions[blockIdx.x];
    for (int i = threadIdx.x; i < half; i += blockDim.x)
        rope_sincos(pos, rope_inv_freq_at(i, head_dim, theta), &sn[i], &cs[i]);
    __syncthreads();
    rotate_heads(x + (size_t)blockIdx.x * heads * head_dim, sn, cs, heads, head_dim);
}

// Multimodal RoPE: pair i takes its position from axis 0 (temporal) for i < s0, axis 1
// (height) for s0 <= i < s0 + s1, axis 2 (width) after. positions: [3, tokens] row-major.
extern "C" __global__ void mrope(bf16* __restrict__ x, const int32_t* __restrict__ positions, int tokens, int heads,
                                 int head_dim, float theta, int s0, int s1) {
    __shared__ float sn[MAX_PAIRS], cs[MAX_PAIRS];
    const int half = head_dim / 2;
    const int t = blockIdx.x;
    for (int i = threadIdx.x; i < half; i += blockDim.x) {
        const int axis = (i >= s0) + (i >= s0 + s1);
        const float pos = (float)positions[(size_t)axis * tokens + t];
        rope_sincos(pos, rope_inv_freq_at(i, head_dim, theta), &sn[i], &cs[i]);
    }
    __syncthreads();
    rotate_heads(x + (size_t)t * heads * head_dim, sn, cs, heads, head_dim);
}

// 2-D RoPE of the vision tower: the first head_dim/4 pairs rotate with the patch's row,
// the next head_dim/4 with its column, frequencies 1 / theta^(2j / (head_dim/2)).
// rows, cols: [tokens].
extern "C" __global__ void rope_vision(bf16* __restrict__ x, const int32_t* __restrict__ rows,
                                       const int32_t* __restrict__ cols, int heads, int head_dim, float theta) {
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
