// The cuBLAS entry points cudarc's CudaBlas uses for massv (handle, stream, GemmEx), on
// host memory through massv_emu::gemm. Built as the emulator's libcublas.so.
#include "gemm.h"

typedef int cublasStatus_t;
enum { OK = 0, INVALID_VALUE = 7, NOT_SUPPORTED = 15 };

extern "C" {

struct Handle {
    void* stream;
};
cublasStatus_t cublasCreate_v2(void** h) {
    *h = new Handle{nullptr};
    return OK;
}
cublasStatus_t cublasDestroy_v2(void* h) {
    delete static_cast<Handle*>(h);
    return OK;
}
cublasStatus_t cublasSetStream_v2(void* h, void* stream) {
    static_cast<Handle*>(h)->stream = stream;
    return OK;
}
cublasStatus_t cublasSetMathMode(void*, int) { return OK; }
cublasStatus_t cublasSetWorkspace_v2(void*, void*, size_t) { return OK; }
static int pointer_mode = 0;
cublasStatus_t cublasSetPointerMode_v2(void*, int mode) {
    pointer_mode = mode;
    return OK;
}
cublasStatus_t cublasGetPointerMode_v2(void*, int* mode) {
    *mode = pointer_mode;
    return OK;
}
const char* cublasGetStatusString(cublasStatus_t s) {
    return s == OK ? "CUBLAS_STATUS_SUCCESS" : s == INVALID_VALUE ? "CUBLAS_STATUS_INVALID_VALUE" : "CUBLAS_STATUS_NOT_SUPPORTED";
}

// transa / transb: 0 = N, 1 = T. Compute type must be CUBLAS_COMPUTE_32F (68), scalars f32.
cublasStatus_t cublasGemmEx(void* h, int transa, int transb, int m, int n, int k, const void* alpha, const void* a,
                            int at, int lda, const void* b, int bt, int ldb, const void* beta, void* c, int ct, int ldc,
                            int compute, int) {
    using namespace massv_emu;
    if (compute != 68 || pointer_mode != 0 || !gemm_type_ok(at) || !gemm_type_ok(bt) || !gemm_type_ok(ct))
        return NOT_SUPPORTED;
    if (transa > 1 || transb > 1 || m < 0 || n < 0 || k < 0) return INVALID_VALUE;
    if (stream_refused(static_cast<Handle*>(h)->stream, "cublasGemmEx")) return NOT_SUPPORTED;
    gemm(transa == 1, transb == 1, m, n, k, *static_cast<const float*>(alpha), a, at, lda, b, bt, ldb,
         *static_cast<const float*>(beta), c, ct, ldc, c, ct, ldc, nullptr, 0);
    return OK;
}

cublasStatus_t cublasGemmStridedBatchedEx(void* h, int transa, int transb, int m, int n, int k, const void* alpha,
                                          const void* a, int at, int lda, long long sa, const void* b, int bt, int ldb,
                                          long long sb, const void* beta, void* c, int ct, int ldc, long long sc,
                                          int batch, int compute, int algo) {
    auto elt = [](int t) { return t == massv_emu::R_16BF ? 2 : 4; };
    for (int i = 0; i < batch; ++i) {
        const cublasStatus_t s = cublasGemmEx(
            h, transa, transb, m, n, k, alpha, static_cast<const char*>(a) + i * sa * elt(at), at, lda,
            static_cast<const char*>(b) + i * sb * elt(bt), bt, ldb, beta, static_cast<char*>(c) + i * sc * elt(ct), ct,
            ldc, compute, algo);
        if (s != OK) return s;
    }
    return OK;
}

}  // extern "C"
