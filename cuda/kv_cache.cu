// KV cache maintenance. Rollback is a length change on the host; these move rows.
// CPU twins: runtime/reference/kv_cache.rs.
#include "common.cuh"

// Writes n new rows of keys and values after the `len` committed ones:
// k_cache[len + t] = k_new[t], v_cache[len + t] = v_new[t]. row = kv_heads * head_dim
// elements; caches: [capacity, row], new: [n, row]. Grid: (n, 2): y = 0 keys, 1 values.
extern "C" __global__ void kv_append(const bf16* __restrict__ k_new, const bf16* __restrict__ v_new,
                                     bf16* __restrict__ k_cache, bf16* __restrict__ v_cache, int len, int row) {
    pdl_wait();
    const bf16* src = (blockIdx.y == 0 ? k_new : v_new) + (size_t)blockIdx.x * row;
    bf16* dst = (blockIdx.y == 0 ? k_cache : v_cache) + (size_t)(len + blockIdx.x) * row;
    if ((row & 7) == 0) {
        for (int i = threadIdx.x; i < row / 8; i += blockDim.x)
            reinterpret_cast<uint4*>(dst)[i] = reinterpret_cast<const uint4*>(src)[i];
    } else {
        for (int i = threadIdx.x; i < row; i += blockDim.x) dst[i] = src[i];
    }
}

// After a tree verification: moves the accepted path's rows to contiguous positions,
// cache[dst + i] = cache[path[i]] for i = 0..m in order (path ascending, path[i] >= dst + i,
// so copying in order never overwrites a row still to be read). `buffers` caches of
// `buffer_stride` elements each (e.g. every layer's K and V in one allocation), one block
// per buffer; the rows of a buffer are copied one after another.
extern "C" __global__ void kv_compact(bf16* cache, const int32_t* __restrict__ path, int m, int dst, int row,
                                      long long buffer_stride) {
    pdl_wait();
    bf16* c = cache + (size_t)blockIdx.x * buffer_stride;
    for (int i = 0; i < m; ++i) {
        const int from = path[i];
        const int to = dst + i;
        if (from != to) {
            // from != to: element j of one row never aliases element j' of the other.
            for (int j = threadIdx.x; j < row; j += blockDim.x) {
                const bf16 v = c[(size_t)from * row + j];
                c[(size_t)to * row + j] = v;
            }
        }
        __syncthreads();
    }
}
