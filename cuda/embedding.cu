// Embedding gather and row scatter. CPU twins: runtime/reference/embedding.rs.
#include "common.cuh"

// out[t] = table[ids[t]] for t < n; ids outside [0, vocab) give a zero row (the drafter
// embeds target-only padding ids that way). table: [vocab, dim], out: [n, dim].
// Grid: one block per token.
extern "C" __global__ void embedding(const int32_t* __restrict__ ids, const bf16* __restrict__ table,
                                     bf16* __restrict__ out, int vocab, int dim) {
    pdl_wait();
    const int id = ids[blockIdx.x];
    bf16* o = out + (size_t)blockIdx.x * dim;
    const bool ok = id >= 0 && id < vocab;
    const bf16* r = table + (size_t)(ok ? id : 0) * dim;
    if ((dim & 7) == 0) {
        uint4* o4 = reinterpret_cast<uint4*>(o);
        const uint4* r4 = reinterpret_cast<const uint4*>(r);
        for (int i = threadIdx.x; i < dim / 8; i += blockDim.x) o4[i] = ok ? r4[i] : make_uint4(0, 0, 0, 0);
    } else {
        for (int i = threadIdx.x; i < dim; i += blockDim.x) o[i] = ok ? r[i] : to_bf16(0.0f);
    }
}

// dst[positions[i]] = src[i] for i < m (image embeddings into the placeholder rows of the
// prompt's embeddings). Positions outside [0, dst_rows) are skipped. src: [m, dim],
// dst: [dst_rows, dim]. Grid: one block per source row.
extern "C" __global__ void scatter_rows(const bf16* __restrict__ src, const int32_t* __restrict__ positions,
                                        bf16* __restrict__ dst, int dst_rows, int dim) {
    pdl_wait();
    const int p = positions[blockIdx.x];
    if (p < 0 || p >= dst_rows) return;
    const bf16* s = src + (size_t)blockIdx.x * dim;
    bf16* d = dst + (size_t)p * dim;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) d[i] = s[i];
}
