// The CUDA device dialect for g++: what cuda/*.cu needs so that the very same source runs
// on the CPU under the emulator (cuda/emu/src/fiber.cpp runs each block's threads as
// fibers; __syncthreads and the warp intrinsics are barriers between them). Included
// before each kernel file (`g++ -include emu.h -x c++ cuda/<op>.cu`); nvcc never sees it.
//
// What it models: one block at a time (one launch at a time in the process), every thread of a block interleaved only at
// barriers (so a missing __syncthreads shows up as a wrong result under one of the two
// thread orders), warp shuffles / ballots / mma.sync as warp-wide exchanges, IEEE f32
// arithmetic without FMA contraction. What it does not: timing, memory-model subtleties
// between blocks, tensor-core rounding, anything nvcc's optimiser does.
#pragma once
#define MASSV_EMU 1

#include <limits.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "cuda_bf16.h"

#ifdef MASSV_EMU_SCAN
#define __global__ __massv_kernel__  // build.rs reads the kernel names
#else
#define __global__
#endif
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
// A kernel file's __shared__ arrays are its only zero-initialised statics: build.rs moves
// its .bss to a section of its own, which the emulator fills with 0xff bytes (NaN, -1)
// before every block. On a GPU shared memory starts each block holding garbage, and a
// block reading what it never wrote must not see the last block's values.
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))

struct uint3 {
    unsigned int x, y, z;
};
typedef uint3 dim3;
struct alignas(16) uint4 {
    unsigned int x, y, z, w;
};
struct alignas(8) uint2 {
    unsigned int x, y;
};
struct alignas(16) float4 {
    float x, y, z, w;
};

extern uint3 threadIdx, blockIdx, blockDim, gridDim;

namespace massv_emu {
void block_barrier();
void warp_barrier(unsigned mask);
// griddepcontrol.wait: launches run one after another here, so it only notes that the
// thread called it (a programmatic launch fails where a thread never does).
void pdl_wait();

// A warp's exchange words (shuffles, ballots, mma fragments). A lane writes its own in
// `warp_words`, then waits at a warp barrier; the barrier's release copies the warp's
// words to `warp_seen`, which the released lanes read. So an exchange takes one barrier:
// a lane's next write cannot reach what the others read (two barriers, write / read, cost
// twice the fiber switches).
struct WarpWords {
    uint64_t slots[32];
    uint32_t scratch[32 * 8];
};
extern WarpWords warp_words[32];
extern WarpWords warp_seen[32];

inline unsigned linear_tid() { return threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z); }
inline unsigned lane_id() { return linear_tid() & 31; }
inline WarpWords& my_words() { return warp_words[linear_tid() / 32]; }
inline const WarpWords& my_seen() { return warp_seen[linear_tid() / 32]; }
}  // namespace massv_emu

static inline uint4 make_uint4(unsigned a, unsigned b, unsigned c, unsigned d) { return uint4{a, b, c, d}; }
static inline float2 make_float2(float a, float b) { return float2{a, b}; }

static inline void __syncthreads() { massv_emu::block_barrier(); }
static inline void __syncwarp(unsigned mask = 0xffffffffu) { massv_emu::warp_barrier(mask); }

template <class T>
static inline T massv_emu_exchange(unsigned mask, T v, unsigned src) {
    static_assert(sizeof(T) <= 8, "shuffle of more than 8 bytes");
    memcpy(&massv_emu::my_words().slots[massv_emu::lane_id()], &v, sizeof(T));
    massv_emu::warp_barrier(mask);
    T r;
    memcpy(&r, &massv_emu::my_seen().slots[src & 31], sizeof(T));
    return r;
}

template <class T>
static inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
    const unsigned lane = massv_emu::lane_id();
    unsigned src = lane ^ (unsigned)lane_mask;
    if ((src & ~(unsigned)(width - 1)) != (lane & ~(unsigned)(width - 1))) src = lane;
    return massv_emu_exchange(mask, v, src);
}

template <class T>
static inline T __shfl_sync(unsigned mask, T v, int src_lane, int width = 32) {
    const unsigned lane = massv_emu::lane_id();
    const unsigned src = (lane & ~(unsigned)(width - 1)) + ((unsigned)src_lane & (unsigned)(width - 1));
    return massv_emu_exchange(mask, v, src);
}

template <class T>
static inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
    const unsigned lane = massv_emu::lane_id();
    const unsigned seg = lane & ~(unsigned)(width - 1);
    unsigned src = lane + delta;
    if (src >= seg + (unsigned)width) src = lane;
    return massv_emu_exchange(mask, v, src);
}

static inline unsigned __ballot_sync(unsigned mask, int pred) {
    massv_emu::my_words().slots[massv_emu::lane_id()] = pred ? 1 : 0;
    massv_emu::warp_barrier(mask);
    const uint64_t* s = massv_emu::my_seen().slots;
    unsigned r = 0;
    for (unsigned i = 0; i < 32; ++i)
        if (((mask >> i) & 1u) && s[i]) r |= 1u << i;
    return r;
}

// mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 with the PTX ISA's fragment
// layouts (the same ones cuda/dev/attention_emu.py models): every lane hands in its A
// and B registers, then computes its own four C elements.
static inline void massv_emu_mma_bf16(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
    const unsigned lane = massv_emu::lane_id();
    uint32_t* w = massv_emu::my_words().scratch;
    for (int i = 0; i < 4; ++i) w[lane * 8 + i] = a[i];
    w[lane * 8 + 4] = b0;
    w[lane * 8 + 5] = b1;
    massv_emu::warp_barrier(0xffffffffu);
    const uint32_t* s = massv_emu::my_seen().scratch;
    auto half_at = [](uint32_t w, int e) {
        __nv_bfloat16 h;
        h.x = (uint16_t)(e ? w >> 16 : w & 0xffffu);
        return __bfloat162float(h);
    };
    auto A = [&](int r, int k) {
        const int kk = k & 7, reg = (r >> 3) + 2 * (k >> 3);
        return half_at(s[((r & 7) * 4 + (kk >> 1)) * 8 + reg], kk & 1);
    };
    auto B = [&](int k, int col) {
        const int kk = k & 7;
        return half_at(s[(col * 4 + (kk >> 1)) * 8 + 4 + (k >> 3)], kk & 1);
    };
    const int g = (int)lane >> 2, t = (int)lane & 3;
    float d[4];
    for (int i = 0; i < 4; ++i) {
        const int row = g + 8 * (i >> 1), col = 2 * t + (i & 1);
        float acc = 0.0f;
        for (int k = 0; k < 16; ++k) acc += A(row, k) * B(k, col);
        d[i] = acc;
    }
    for (int i = 0; i < 4; ++i) c[i] += d[i];
}

// One fiber runs at a time, so read-modify-write is atomic by construction.
template <class T, class U>
static inline T atomicAdd(T* p, U v) {
    const T old = *p;
    *p = old + (T)v;
    return old;
}
template <class T, class U>
static inline T atomicMax(T* p, U v) {
    const T old = *p;
    if ((T)v > old) *p = (T)v;
    return old;
}

template <class T>
static inline T __ldg(const T* p) {
    return *p;
}

// Loads through L2 only (the split-K partials other blocks wrote): blocks run one after
// another here, so every earlier write is visible and a fence has nothing to order.
template <class T>
static inline T __ldcg(const T* p) {
    return *p;
}
static inline void __threadfence() {}

static inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
#define __expf expf
static inline float __fmul_rn(float a, float b) { return a * b; }
static inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
static inline float __fadd_rn(float a, float b) { return a + b; }
static inline float __fsub_rn(float a, float b) { return a - b; }
static inline double __dadd_rn(double a, double b) { return a + b; }
static inline double __dsub_rn(double a, double b) { return a - b; }
static inline double __dmul_rn(double a, double b) { return a * b; }
static inline double __ddiv_rn(double a, double b) { return a / b; }
static inline unsigned long long __double2ull_rn(double x) { return (unsigned long long)nearbyint(x); }
static inline unsigned __float_as_uint(float f) {
    unsigned u;
    memcpy(&u, &f, 4);
    return u;
}
static inline float __uint_as_float(unsigned u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}
static inline int __popc(unsigned x) { return __builtin_popcount(x); }
static inline int __ffs(int x) { return __builtin_ffs(x); }

// CUDA's integer / float min and max overloads.
static inline int min(int a, int b) { return a < b ? a : b; }
static inline int max(int a, int b) { return a > b ? a : b; }
static inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
static inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
static inline long long min(long long a, long long b) { return a < b ? a : b; }
static inline long long max(long long a, long long b) { return a > b ? a : b; }
static inline unsigned long long min(unsigned long long a, unsigned long long b) { return a < b ? a : b; }
static inline unsigned long long max(unsigned long long a, unsigned long long b) { return a > b ? a : b; }
static inline float min(float a, float b) { return fminf(a, b); }
static inline float max(float a, float b) { return fmaxf(a, b); }
