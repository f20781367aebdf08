// RMSNorm as transformers' Qwen2RMSNorm computes it: y = w * x / sqrt(mean(x^2) + eps),
// the statistics in f32. CPU twins: runtime/reference/rmsnorm.rs.
#include "common.cuh"

// One block per row. x, w, y: [rows, dim] / [dim] / [rows, dim].
extern "C" __global__ void rmsnorm(const bf16* __restrict__ x, const bf16* __restrict__ w,
                                   bf16* __restrict__ y, int dim, float eps) {
    pdl_wait();
    const bf16* xr = x + (size_t)blockIdx.x * dim;
    bf16* yr = y + (size_t)blockIdx.x * dim;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) {
        float v = to_f32(xr[i]);
        ss += v * v;
    }
    const float inv = rsqrtf(block_sum(ss) / (float)dim + eps);
    for (int i = threadIdx.x; i < dim; i += blockDim.x) yr[i] = to_bf16(to_f32(w[i]) * to_f32(xr[i]) * inv);
}

// Fused residual add + RMSNorm, the pattern between every pair of sublayers:
// residual <- residual + x (the stream the next block reads), y <- rmsnorm(residual).
// Saves one read and one write of the hidden state per sublayer.
extern "C" __global__ void rmsnorm_residual(const bf16* __restrict__ x, bf16* __restrict__ residual,
                                            const bf16* __restrict__ w, bf16* __restrict__ y, int dim,
                                            float eps) {
    pdl_wait();
    const bf16* xr = x + (size_t)blockIdx.x * dim;
    bf16* rr = residual + (size_t)blockIdx.x * dim;
    bf16* yr = y + (size_t)blockIdx.x * dim;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) {
        // Round the sum to bf16 first: the stored stream is what the next layer sees.
        float v = to_f32(to_bf16(to_f32(xr[i]) + to_f32(rr[i])));
        rr[i] = to_bf16(v);
        ss += v * v;
    }
    const float inv = rsqrtf(block_sum(ss) / (float)dim + eps);
    for (int i = threadIdx.x; i < dim; i += blockDim.x) yr[i] = to_bf16(to_f32(w[i]) * to_f32(rr[i]) * inv);
}
