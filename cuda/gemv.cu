// Decode GEMV: y[b, n] = x[b, :] . W[n, :] (+ bias[n]) for a handful of rows b (1 for a
// decode step, gamma + 1 for a verification, up to 8), W in bf16 row-major [N, K] (the
// nn.Linear layout), f32 accumulation. Memory-bound: every weight is streamed from HBM
// exactly once for all rows, with 16-byte loads that bypass L1; x (a few KB) is re-read
// through L1 by every warp. CPU twin: runtime/reference/gemv.rs (= reference::linear).
//
// Layout of the work: a warp owns ROWS consecutive output columns n and walks K in
// 8-element (16-byte) steps, lane l taking steps l, l + 32, ...; two steps are loaded
// ahead so each lane keeps 2 * ROWS 16-byte weight loads in flight. A block is 4 warps.
// gridDim.y > 1 splits K (split-K): each split writes f32 partial sums to
// partial[split, b, n] and gemv_reduce_* adds them (and the bias) up. K % 8 == 0.
#include "common.cuh"

#define GEMV_WARPS 4
#define GEMV_ROWS 4
#define GEMV_UNROLL 2

template <int B>
__device__ __forceinline__ void gemv_accumulate(const uint4* __restrict__ x4, const uint4* __restrict__ w4, int n0,
                                                int N, int K8, int k8_begin, int k8_end, float acc[GEMV_ROWS][B]) {
    const int lane = threadIdx.x & 31;
    const uint4* wrow[GEMV_ROWS];
#pragma unroll
    for (int r = 0; r < GEMV_ROWS; ++r) wrow[r] = w4 + (size_t)min(n0 + r, N - 1) * K8;  // clamp: no OOB reads
#pragma unroll
    for (int r = 0; r < GEMV_ROWS; ++r)
#pragma unroll
        for (int b = 0; b < B; ++b) acc[r][b] = 0.0f;

    int k8 = k8_begin + lane;
    for (; k8 + 32 * (GEMV_UNROLL - 1) < k8_end; k8 += 32 * GEMV_UNROLL) {
        uint4 wv[GEMV_UNROLL][GEMV_ROWS];
#pragma unroll
        for (int u = 0; u < GEMV_UNROLL; ++u)
#pragma unroll
            for (int r = 0; r < GEMV_ROWS; ++r) wv[u][r] = ld_stream(wrow[r] + k8 + 32 * u);
#pragma unroll
        for (int u = 0; u < GEMV_UNROLL; ++u) {
            float wf[GEMV_ROWS][8];
#pragma unroll
            for (int r = 0; r < GEMV_ROWS; ++r) bf16x8_to_f32(wv[u][r], wf[r]);
#pragma unroll
            for (int b = 0; b < B; ++b) {
                float xf[8];
                bf16x8_to_f32(__ldg(x4 + (size_t)b * K8 + k8 + 32 * u), xf);
#pragma unroll
                for (int r = 0; r < GEMV_ROWS; ++r)
#pragma unroll
                    for (int i = 0; i < 8; ++i) acc[r][b] = fmaf(wf[r][i], xf[i], acc[r][b]);
            }
        }
    }
    for (; k8 < k8_end; k8 += 32) {
        float wf[GEMV_ROWS][8];
#pragma unroll
        for (int r = 0; r < GEMV_ROWS; ++r) bf16x8_to_f32(ld_stream(wrow[r] + k8), wf[r]);
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
#pragma unroll
    for (int r = 0; r < GEMV_ROWS; ++r)
#pragma unroll
        for (int b = 0; b < B; ++b) acc[r][b] = warp_sum(acc[r][b]);
}

__device__ __forceinline__ void store_out(float* y, size_t i, float v) { y[i] = v; }
__device__ __forceinline__ void store_out(bf16* y, size_t i, float v) { y[i] = to_bf16(v); }

// One K range per blockIdx.y; with gridDim.y == 1 the result (+ bias) goes to y, else
// the f32 partial sums go to partial[blockIdx.y, b, n].
template <int B, typename OutT>
__device__ __forceinline__ void gemv_body(const bf16* __restrict__ x, const bf16* __restrict__ w,
                                          const bf16* __restrict__ bias, OutT* __restrict__ y,
                                          float* __restrict__ partial, int N, int K) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int n0 = (blockIdx.x * GEMV_WARPS + warp) * GEMV_ROWS;
    if (n0 >= N) return;
    const int K8 = K / 8;
    const int per_split = ceil_div(K8, gridDim.y);
    const int k8_begin = blockIdx.y * per_split;
    const int k8_end = min(K8, k8_begin + per_split);
    float acc[GEMV_ROWS][B];
    gemv_accumulate<B>(reinterpret_cast<const uint4*>(x), reinterpret_cast<const uint4*>(w), n0, N, K8, k8_begin,
                       k8_end, acc);
    // Lane (r * B + b) % 32 stores output (r, b): spreads the stores over the warp.
#pragma unroll
    for (int r = 0; r < GEMV_ROWS; ++r) {
        const int n = n0 + r;
#pragma unroll
        for (int b = 0; b < B; ++b) {
            if (lane == ((r * B + b) & 31) && n < N) {
                if (gridDim.y == 1) {
                    store_out(y, (size_t)b * N + n, acc[r][b] + (bias ? to_f32(bias[n]) : 0.0f));
                } else {
                    partial[((size_t)blockIdx.y * B + b) * N + n] = acc[r][b];
                }
            }
        }
    }
}

#define GEMV_ENTRY(B)                                                                                                  \
    extern "C" __global__ void __launch_bounds__(GEMV_WARPS * 32)                                                     \
        gemv_bf16_b##B(const bf16* __restrict__ x, const bf16* __restrict__ w, const bf16* __restrict__ bias,         \
                       bf16* __restrict__ y, float* __restrict__ partial, int N, int K) {                             \
        gemv_body<B, bf16>(x, w, bias, y, partial, N, K);                                                              \
    }                                                                                                                  \
    extern "C" __global__ void __launch_bounds__(GEMV_WARPS * 32)                                                     \
        gemv_bf16_f32_b##B(const bf16* __restrict__ x, const bf16* __restrict__ w, const bf16* __restrict__ bias,     \
                           float* __restrict__ y, float* __restrict__ partial, int N, int K) {                        \
        gemv_body<B, float>(x, w, bias, y, partial, N, K);                                                             \
    }

GEMV_ENTRY(1)
GEMV_ENTRY(2)
GEMV_ENTRY(3)
GEMV_ENTRY(4)
GEMV_ENTRY(5)
GEMV_ENTRY(6)
GEMV_ENTRY(7)
GEMV_ENTRY(8)

// y[b, n] = sum over splits of partial[s, b, n] (+ bias[n]); rows * N threads.
template <typename OutT>
__device__ __forceinline__ void gemv_reduce_body(const float* __restrict__ partial, const bf16* __restrict__ bias,
                                                 OutT* __restrict__ y, int rows, int N, int splits) {
    const size_t total = (size_t)rows * N;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += (size_t)gridDim.x * blockDim.x) {
        float s = bias ? to_f32(bias[i % N]) : 0.0f;
        for (int k = 0; k < splits; ++k) s += partial[(size_t)k * total + i];
        store_out(y, i, s);
    }
}

extern "C" __global__ void gemv_reduce_bf16(const float* __restrict__ partial, const bf16* __restrict__ bias,
                                            bf16* __restrict__ y, int rows, int N, int splits) {
    gemv_reduce_body(partial, bias, y, rows, N, splits);
}

extern "C" __global__ void gemv_reduce_f32(const float* __restrict__ partial, const bf16* __restrict__ bias,
                                           float* __restrict__ y, int rows, int N, int splits) {
    gemv_reduce_body(partial, bias, y, rows, N, splits);
}
