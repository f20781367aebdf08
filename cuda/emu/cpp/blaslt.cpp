// The cuBLASLt entry points cudarc's CudaBlasLT uses for massv (descriptors, layouts,
// preference, heuristic, matmul with the bias epilogue), on host memory through
// massv_emu::gemm. Built as the emulator's libcublasLt.so.
#include <stdint.h>
#include <string.h>

#include <atomic>

#include "gemm.h"

typedef int cublasStatus_t;
enum { OK = 0, INVALID_VALUE = 7, NOT_SUPPORTED = 15 };

struct Desc {
    int compute, scale;
    int32_t trans[3];
    uint32_t epilogue;
    const void* bias;
    int32_t bias_type;
};
struct Layout {
    int type;
    uint64_t rows, cols;
    int64_t ld;
    int32_t batch;
};

extern "C" {

// Whether the heuristic finds an algorithm (massv_emu_set_lt_algorithms): without one,
// cudarc's matmul fails NOT_SUPPORTED before anything runs, as on a GPU whose cuBLASLt
// serves no algorithm for a shape.
static std::atomic<int> algorithms_available{1};
void massv_emu_set_lt_algorithms(int available) { algorithms_available = available; }

static int handle_tag;
cublasStatus_t cublasLtCreate(void** h) {
    *h = &handle_tag;
    return OK;
}
cublasStatus_t cublasLtDestroy(void*) { return OK; }
const char* cublasLtGetStatusString(cublasStatus_t s) {
    return s == OK ? "CUBLAS_STATUS_SUCCESS" : s == INVALID_VALUE ? "CUBLAS_STATUS_INVALID_VALUE" : "CUBLAS_STATUS_NOT_SUPPORTED";
}

cublasStatus_t cublasLtMatmulDescCreate(void** d, int compute, int scale) {
    *d = new Desc{compute, scale, {0, 0, 0}, 1, nullptr, -1};
    return OK;
}
cublasStatus_t cublasLtMatmulDescDestroy(void* d) {
    delete static_cast<Desc*>(d);
    return OK;
}
cublasStatus_t cublasLtMatmulDescSetAttribute(void* dp, int attr, const void* buf, size_t size) {
    Desc* d = static_cast<Desc*>(dp);
    switch (attr) {
        case 3:
        case 4:
        case 5:
            if (size != 4) return INVALID_VALUE;
            memcpy(&d->trans[attr - 3], buf, 4);
            return OK;
        case 7:
            if (size != 4) return INVALID_VALUE;
            memcpy(&d->epilogue, buf, 4);
            return OK;
        case 8:
            if (size != sizeof(void*)) return INVALID_VALUE;
            memcpy(&d->bias, buf, sizeof(void*));
            return OK;
        case 10:
            return OK;  // bias batch stride: one batch only
        default:
            return NOT_SUPPORTED;
    }
}

cublasStatus_t cublasLtMatrixLayoutCreate(void** l, int type, uint64_t rows, uint64_t cols, int64_t ld) {
    *l = new Layout{type, rows, cols, ld, 1};
    return OK;
}
cublasStatus_t cublasLtMatrixLayoutDestroy(void* l) {
    delete static_cast<Layout*>(l);
    return OK;
}
cublasStatus_t cublasLtMatrixLayoutSetAttribute(void* lp, int attr, const void* buf, size_t size) {
    Layout* l = static_cast<Layout*>(lp);
    if (attr == 5 && size == 4) {  // batch count
        memcpy(&l->batch, buf, 4);
        return l->batch == 1 ? OK : NOT_SUPPORTED;
    }
    return attr == 6 ? OK : NOT_SUPPORTED;  // strided batch offset (one batch)
}

static int pref_tag;
cublasStatus_t cublasLtMatmulPreferenceCreate(void** p) {
    *p = &pref_tag;
    return OK;
}
cublasStatus_t cublasLtMatmulPreferenceDestroy(void*) { return OK; }
cublasStatus_t cublasLtMatmulPreferenceSetAttribute(void*, int, const void*, size_t) { return OK; }

// cublasLtMatmulHeuristicResult_t: algo (8 × u64), workspaceSize, state, wavesCount, 4 ints.
struct HeuristicResult {
    uint64_t algo[8];
    size_t workspace;
    int state;
    float waves;
    int reserved[4];
};
cublasStatus_t cublasLtMatmulAlgoGetHeuristic(void*, void*, void*, void*, void*, void*, void*, int requested,
                                              HeuristicResult* out, int* returned) {
    if (requested < 1) return INVALID_VALUE;
    memset(out, 0, sizeof(HeuristicResult));
    out->waves = 1.0f;
    *returned = algorithms_available.load() ? 1 : 0;
    return OK;
}

cublasStatus_t cublasLtMatmul(void*, void* dp, const void* alpha, const void* a, void* al, const void* b, void* bl,
                              const void* beta, const void* c, void* cl, void* d, void* dl, const void*, void*, size_t,
                              void* stream) {
    using namespace massv_emu;
    const Desc* desc = static_cast<const Desc*>(dp);
    const Layout *A = static_cast<Layout*>(al), *B = static_cast<Layout*>(bl), *C = static_cast<Layout*>(cl),
                 *D = static_cast<Layout*>(dl);
    if (desc->compute != 68 || desc->scale != R_32F || desc->trans[2] != 0) return NOT_SUPPORTED;
    if (desc->epilogue != 1 && desc->epilogue != 4) return NOT_SUPPORTED;
    if (!gemm_type_ok(A->type) || !gemm_type_ok(B->type) || !gemm_type_ok(C->type) || !gemm_type_ok(D->type))
        return NOT_SUPPORTED;
    const bool ta = desc->trans[0] == 1, tb = desc->trans[1] == 1;
    const uint64_t m = D->rows, n = D->cols, k = ta ? A->rows : A->cols;
    if ((ta ? A->cols : A->rows) != m || (tb ? B->cols : B->rows) != k || (tb ? B->rows : B->cols) != n ||
        C->rows != m || C->cols != n)
        return INVALID_VALUE;
    if (desc->epilogue == 4 && !desc->bias) return INVALID_VALUE;
    if (stream_refused(stream, "cublasLtMatmul")) return NOT_SUPPORTED;
    gemm(ta, tb, (int64_t)m, (int64_t)n, (int64_t)k, *static_cast<const float*>(alpha), a, A->type, A->ld, b, B->type,
         B->ld, *static_cast<const float*>(beta), c, C->type, C->ld, d, D->type, D->ld,
         desc->epilogue == 4 ? desc->bias : nullptr, D->type);
    return OK;
}

}  // extern "C"
