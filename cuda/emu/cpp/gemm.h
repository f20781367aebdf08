// The one GEMM behind the emulated cuBLAS and cuBLASLt: column-major, f32 accumulation
// (in 8 partial sums), bf16 (CUDA_R_16BF) or f32 (CUDA_R_32F) operands, an optional per-row bias
// added before the output is rounded.
#pragma once
#include <stdint.h>

#include <vector>

#include "cuda_bf16.h"

// The emulated driver's (libcuda.so, loaded first): nonzero when a GEMM may not run on
// `stream` now, i.e. it captures (cuBLAS work is not recorded into graphs).
extern "C" int massv_emu_refuse_capture(void* stream, const char* what) __attribute__((weak));

namespace massv_emu {

enum { R_32F = 0, R_16BF = 14 };

inline bool stream_refused(void* stream, const char* what) {
    return massv_emu_refuse_capture && massv_emu_refuse_capture(stream, what) != 0;
}

inline bool gemm_type_ok(int t) { return t == R_32F || t == R_16BF; }

inline float load_as_f32(const void* p, int type, int64_t i) {
    if (type == R_16BF) return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
    return static_cast<const float*>(p)[i];
}

inline void store_from_f32(void* p, int type, int64_t i, float v) {
    if (type == R_16BF)
        static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(v);
    else
        static_cast<float*>(p)[i] = v;
}

// x · y over k contiguous floats in 8 interleaved partial sums, which the compiler turns
// into vector code. Like cuBLAS, the sum is not taken in k order.
inline float dot(const float* x, const float* y, int64_t k) {
    float s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int64_t l = 0;
    for (; l + 8 <= k; l += 8)
        for (int u = 0; u < 8; ++u) s[u] += x[l + u] * y[l + u];
    for (int u = 0; l < k; ++l, ++u) s[u] += x[l] * y[l];
    return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
}

// D = alpha · op(A) · op(B) + beta · C (+ bias[i]); op(X) = X or Xᵀ; m × n output. The
// operands are first widened to f32 with op(A)'s rows and op(B)'s columns contiguous.
inline void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const void* a, int at, int64_t lda,
                 const void* b, int bt, int64_t ldb, float beta, const void* c, int ct, int64_t ldc, void* d, int dt,
                 int64_t ldd, const void* bias, int biast) {
    std::vector<float> ar((size_t)(m * k)), bc((size_t)(n * k));
    for (int64_t l = 0; l < k; ++l)
        for (int64_t i = 0; i < m; ++i) ar[i * k + l] = load_as_f32(a, at, ta ? l + i * lda : i + l * lda);
    for (int64_t j = 0; j < n; ++j)
        for (int64_t l = 0; l < k; ++l) bc[j * k + l] = load_as_f32(b, bt, tb ? j + l * ldb : l + j * ldb);
    for (int64_t j = 0; j < n; ++j)
        for (int64_t i = 0; i < m; ++i) {
            float v = alpha * dot(&ar[i * k], &bc[j * k], k);
            if (beta != 0.0f) v += beta * load_as_f32(c, ct, i + j * ldc);
            if (bias) v += load_as_f32(bias, biast, i);
            store_from_f32(d, dt, i + j * ldd, v);
        }
}

}  // namespace massv_emu
