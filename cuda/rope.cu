// Rotary position embedding, rotate-half convention (transformers' apply_rotary_pos_emb).
// CPU twin: runtime/reference/rope.rs.
#include "common.cuh"

// In place on x: [tokens, heads, head_dim]. positions: [tokens]. Pair i of a head
// rotates (x[i], x[i + head_dim/2]) by positions[t] * theta^(-2i/head_dim).
// Grid: one block per token; threads stride over heads * head_dim/2 pairs.
extern "C" __global__ void rope(bf16* __restrict__ x, const int32_t* __restrict__ positions, int heads,
                                int head_dim, float theta) {
    const int half = head_dim / 2;
    const float pos = (float)positions[blockIdx.x];
    bf16* xt = x + (size_t)blockIdx.x * heads * head_dim;
    for (int p = threadIdx.x; p < heads * half; p += blockDim.x) {
        const int h = p / half, i = p % half;
        // Same f32 arithmetic as transformers: inv_freq = 1 / theta^(2i/d), angle = pos * inv_freq.
        const float inv_freq = 1.0f / powf(theta, (float)(2 * i) / (float)head_dim);
        float s, c;
        sincosf(pos * inv_freq, &s, &c);
        bf16* xh = xt + (size_t)h * head_dim;
        const float x1 = to_f32(xh[i]), x2 = to_f32(xh[i + half]);
        xh[i] = to_bf16(x1 * c - x2 * s);
        xh[i + half] = to_bf16(x2 * c + x1 * s);
    }
}
