// The MASSV projector's element-wise pieces, fused around its two cuBLAS GEMMs:
//   projector_norm_gather: RMSNorm each vision patch and lay m^2 consecutive patches out
//                          as one row of fc1's input,
//   bias_gelu:             fc1's bias + exact GELU (erf) on the GEMM's output, in place,
//   bias_add:              fc2's bias (and any other nn.Linear bias after a GEMM),
//   gelu:                  exact GELU alone.
// CPU twins: runtime/reference/gelu.rs (gelu), runtime/reference/projector.rs (the rest).
#include "common.cuh"

__device__ __forceinline__ float gelu_erf(float x) { return 0.5f * x * (1.0f + erff(x * 0.70710678118654752f)); }

// y = gelu(x), element-wise over n values; y may equal x.
extern "C" __global__ void gelu(const bf16* x, bf16* y, long long n) {
    pdl_wait();
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        y[i] = to_bf16(gelu_erf(to_f32(x[i])));
}

// x[r, c] = gelu(x[r, c] + bias[c]) in place; x: [rows, cols].
extern "C" __global__ void bias_gelu(bf16* x, const bf16* __restrict__ bias, int rows, int cols) {
    pdl_wait();
    const long long n = (long long)rows * cols;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        x[i] = to_bf16(gelu_erf(to_f32(x[i]) + to_f32(bias[i % cols])));
}

// x[r, c] += bias[c] in place; x: [rows, cols].
extern "C" __global__ void bias_add(bf16* x, const bf16* __restrict__ bias, int rows, int cols) {
    pdl_wait();
    const long long n = (long long)rows * cols;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        x[i] = to_bf16(to_f32(x[i]) + to_f32(bias[i % cols]));
}

// x: [patches, dv] in the merger's order; w: [dv]; y: [patches / m2, m2 * dv]. Patch p is
// normalised (y = w * x / sqrt(mean(x^2) + eps)) into row p / m2 at column (p % m2) * dv:
// the concatenation of m2 consecutive patches is a reshape, so the gather is free and
// the kernel is one RMSNorm per patch. One block per patch.
extern "C" __global__ void projector_norm_gather(const bf16* __restrict__ x, const bf16* __restrict__ w,
                                                 bf16* __restrict__ y, int dv, float eps) {
    pdl_wait();
    const bf16* xr = x + (size_t)blockIdx.x * dv;
    bf16* yr = y + (size_t)blockIdx.x * dv;  // row p / m2, column (p % m2) * dv
    float ss = 0.0f;
    for (int i = threadIdx.x; i < dv; i += blockDim.x) {
        const float v = to_f32(xr[i]);
        ss += v * v;
    }
    const float inv = rsqrtf(block_sum(ss) / (float)dv + eps);
    for (int i = threadIdx.x; i < dv; i += blockDim.x) yr[i] = to_bf16(to_f32(w[i]) * (to_f32(xr[i]) * inv));
}
