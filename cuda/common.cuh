// Shared helpers for every massv kernel: bf16 storage, f32 accumulation.
#pragma once
#include <cuda_bf16.h>
#include <stdint.h>

typedef __nv_bfloat16 bf16;

__device__ __forceinline__ float to_f32(bf16 x) { return __bfloat162float(x); }
__device__ __forceinline__ bf16 to_bf16(float x) { return __float2bfloat16_rn(x); }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
    return v;
}

// Sum over the whole block; every thread gets the result. blockDim.x must be a
// multiple of 32 and at most 1024.
__device__ __forceinline__ float block_sum(float v) {
    __shared__ float partial[32];
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    v = warp_sum(v);
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    const int nwarps = (blockDim.x + 31) >> 5;
    v = (threadIdx.x < nwarps) ? partial[threadIdx.x] : 0.0f;
    if (warp == 0) v = warp_sum(v);
    if (threadIdx.x == 0) partial[0] = v;
    __syncthreads();
    v = partial[0];
    __syncthreads();  // partial[] is reused by the next call
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
    return v;
}

// Max over the whole block; same contract as block_sum.
__device__ __forceinline__ float block_max(float v) {
    __shared__ float partial[32];
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    v = warp_max(v);
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    const int nwarps = (blockDim.x + 31) >> 5;
    v = (threadIdx.x < nwarps) ? partial[threadIdx.x] : -INFINITY;
    if (warp == 0) v = warp_max(v);
    if (threadIdx.x == 0) partial[0] = v;
    __syncthreads();
    v = partial[0];
    __syncthreads();
    return v;
}

// f64 sum over the warp by a butterfly (a fixed order: every lane gets the same bits).
__device__ __forceinline__ double warp_sum_f64(double v) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
    return v;
}

// f64 sum over the block (order fixed by the block shape, so deterministic for a given
// launch configuration); every thread gets the result.
__device__ __forceinline__ double block_sum_f64(double v) {
    __shared__ double partial_d[32];
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    v = warp_sum_f64(v);
    if (lane == 0) partial_d[warp] = v;
    __syncthreads();
    const int nwarps = (blockDim.x + 31) >> 5;
    v = (threadIdx.x < nwarps) ? partial_d[threadIdx.x] : 0.0;
    if (warp == 0) v = warp_sum_f64(v);
    if (threadIdx.x == 0) partial_d[0] = v;
    __syncthreads();
    v = partial_d[0];
    __syncthreads();
    return v;
}

// 8 bf16 values in one 16-byte word: the unit of every vectorised load.
union bf16x8 {
    uint4 u;
    __nv_bfloat162 h[4];
};

__device__ __forceinline__ void bf16x8_to_f32(const uint4 u, float f[8]) {
    bf16x8 v;
    v.u = u;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const float2 p = __bfloat1622float2(v.h[i]);
        f[2 * i] = p.x;
        f[2 * i + 1] = p.y;
    }
}

// Streaming 16-byte load that does not pollute L1 (weights are read once per step).
// Non-coherent and not volatile: only for data no kernel writes while it runs (weights,
// a step's inputs), never for what another block of the same launch writes.
__device__ __forceinline__ uint4 ld_stream(const uint4* p) {
#ifdef MASSV_EMU
    return *p;
#else
    uint4 r;
    asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
                 : "l"(p));
    return r;
#endif
}

__host__ __device__ __forceinline__ int ceil_div(int a, int b) { return (a + b - 1) / b; }

// Programmatic dependent launch (sm_90+; CudaDevice::set_pdl): a kernel launched with it
// may start while the kernel before it on the stream still runs, so that its launch and
// first weight fetches overlap that kernel's tail. Every kernel therefore calls
// pdl_wait() before it touches memory that earlier work writes or reads (only weights,
// which nothing writes, may be prefetched before it): it returns once the kernel before
// has finished and its writes are visible (at once when the launch was not programmatic).
// Then it lets the next kernel start launching: that one waits in turn, so a chain of
// them stays in order. The emulator fails a programmatic launch in which a thread exits
// without calling it.
__device__ __forceinline__ void pdl_wait() {
#ifdef MASSV_EMU
    massv_emu::pdl_wait();
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// Asks L2 for the 128-byte line holding p ahead of its load: for weights, before
// pdl_wait. A hint: it never faults and nothing waits for it.
__device__ __forceinline__ void prefetch_l2(const void* p) {
#ifndef MASSV_EMU
    asm volatile("prefetch.global.L2 [%0];" ::"l"(p));
#else
    (void)p;
#endif
}

// Split-K in one launch (gemv.cu, attention.cu): a grid's `splits` blocks of one work item
// each store their partial result, then count themselves in on counters[idx]; the block
// that counts last sees every partial in memory (read them with __ldcg) and merges them,
// so no second kernel does. The counter is zero before the launch and the last block
// resets it. Called by every thread of the block, after its partials are stored.
__device__ __forceinline__ bool last_split_arrived(unsigned* __restrict__ counters, unsigned idx, unsigned splits) {
    __shared__ bool last;
    __threadfence();  // this thread's partials reach L2 before the count says so
    __syncthreads();
    if (threadIdx.x == 0) {
        last = atomicAdd(&counters[idx], 1u) == splits - 1;
        if (last) {
            counters[idx] = 0;
            __threadfence();  // the other splits' partials are read after their count
        }
    }
    __syncthreads();
    return last;
}

// IEEE single-precision operations that --use_fast_math (ftz, approximate division)
// must not touch: the kernels that promise bit-equality with the CPU use these. (The CPU
// emulator, cuda/emu, has no fast math: plain operations are IEEE there.)
#ifdef MASSV_EMU
static inline float ieee_sub(float a, float b) { return a - b; }
static inline float ieee_div(float a, float b) { return a / b; }
static inline float ieee_max(float a, float b) { return a > b ? a : (b == b ? b : a); }
static inline double f32_to_f64(float a) { return (double)a; }
static inline float f64_to_f32(double a) { return (float)a; }
#else
__device__ __forceinline__ float ieee_sub(float a, float b) {
    float r;
    asm("sub.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
    return r;
}
__device__ __forceinline__ float ieee_div(float a, float b) {
    float r;
    asm("div.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
    return r;
}
__device__ __forceinline__ float ieee_max(float a, float b) {
    float r;
    asm("max.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
    return r;
}
__device__ __forceinline__ double f32_to_f64(float a) {
    double r;
    asm("cvt.f64.f32 %0, %1;" : "=d"(r) : "f"(a));
    return r;
}
__device__ __forceinline__ float f64_to_f32(double a) {
    float r;
    asm("cvt.rn.f32.f64 %0, %1;" : "=f"(r) : "d"(a));
    return r;
}
#endif

// Rotary helpers shared by rope / mrope / rope_vision: the inverse frequency and the
// angle's sine and cosine computed as the CPU twin does (f32 pow and product, then a
// correctly rounded sin/cos), immune to --use_fast_math's approximate powf/sincosf,
// whose error at positions of a few thousand radians exceeds bf16's precision.
__device__ __forceinline__ float rope_inv_freq_at(int i, int dim, float theta) {
    const float e = ieee_div((float)(2 * i), (float)dim);
    const float p = (float)pow((double)theta, (double)e);
    return ieee_div(1.0f, p);
}
__device__ __forceinline__ void rope_sincos(float pos, float inv_freq, float* s, float* c) {
    const float angle = __fmul_rn(pos, inv_freq);
    double sd, cd;
    sincos((double)angle, &sd, &cd);
    *s = (float)sd;
    *c = (float)cd;
}

// The two halves of pair (x1, x2) rotated by the angle whose cosine and sine are c, s:
// x1 c - x2 s and x2 c + x1 s, in bf16. Each product and sum is rounded on its own, never
// contracted into an FMA, as the CPU twin rounds them: the kernels that rotate (rope.cu,
// gemv.cu's gemv_rope_kv_append) agree bit for bit whatever nvcc fuses.
__device__ __forceinline__ bf16 rope_first(float x1, float x2, float c, float s) {
    return to_bf16(__fsub_rn(__fmul_rn(x1, c), __fmul_rn(x2, s)));
}
__device__ __forceinline__ bf16 rope_second(float x1, float x2, float c, float s) {
    return to_bf16(__fadd_rn(__fmul_rn(x2, c), __fmul_rn(x1, s)));
}

// The pair angle of rotary pair i (of head_dim / 2) of token t under M-RoPE: the position
// from axis 0 (temporal) for i < s0, axis 1 (height) for s0 <= i < s0 + s1, axis 2
// (width) after; positions: [3, tokens] row-major (plain RoPE: s0 = head_dim / 2, every
// pair on axis 0, so positions may be just [tokens]).
__device__ __forceinline__ void mrope_sincos(const int32_t* __restrict__ positions, int tokens, int t, int i,
                                             int head_dim, float theta, int s0, int s1, float* s, float* c) {
    const int axis = (i >= s0) + (i >= s0 + s1);
    const float pos = (float)positions[(size_t)axis * tokens + t];
    rope_sincos(pos, rope_inv_freq_at(i, head_dim, theta), s, c);
}
