// Sampling and verification on the device: the logits never leave the GPU, only the
// accepted count and the next token do. CPU twins: runtime/reference/sampling.rs.
//
//   argmax          first index of the maximum of each row (a GEMM head's rows: a GEMV
//                   head takes its argmax itself, gemv.cu's GemvArgmax);
//   probabilities   softmax(logits / T), then top-k, then top-p, renormalised
//                   (massv::sampling::probabilities: ties ranked by lower id first);
//   probabilities_max, probabilities_exp, probabilities_normalize
//                   its softmax, a row over many blocks (the same bits), the last launch
//                   drawing from each row as sample does if asked;
//   probabilities_cut_digit, probabilities_cut_top_k, probabilities_cut_keep
//                   its top-k / top-p cut of those rows over many blocks too (the same
//                   bits), before probabilities_normalize: a radix select, or where
//                   top-k is at most 64, a select of the top-k;
//   top_k           the k most likely tokens of the plain softmax and their probabilities
//                   (T = 0 token trees; spec::tree::top_tokens' order);
//   top_k_probs     the same of rows that already are distributions (T > 0 token trees:
//                   how the dynamic shape spreads its budget);
//   top_k_select    both over many blocks a row (after probabilities_max and _exp for
//                   top_k; the same bits);
//   sample          one draw per row from non-negative weights, given a uniform;
//   sample_without_replacement
//                   a token tree's children at T > 0: per node, draws from its row with
//                   each drawn token removed and the rest renormalised
//                   (spec::tree::draw_without_replacement), given the uniforms; the
//                   nodes at once where draw_counts knows each one's draws beforehand;
//   draw_counts     how many children each node draws, where its row tells beforehand;
//   verify_greedy   longest prefix of drafts equal to the target's argmax + next token;
//   verify_sampled  rejection sampling (accept with min(1, p/q), residual
//                   max(0, p - q) renormalised, bonus from p), given the host's uniforms;
//                   verify_sampled_tiles, verify_sampled_draw: the same over many blocks;
//   verify_tree_greedy   the longest root-to-node path of a token tree whose every node
//                        is the target's argmax at its parent, + next token;
//   verify_tree_sampled  multi-candidate rejection sampling down a token tree
//                        (massv::spec::tree::verify_tree_sampled), given the uniforms.
//
// Exactness. argmax, verify_greedy, sample, verify_sampled and the tree versions are
// bit-exact with their twins: they use IEEE f32 operations immune to --use_fast_math
// (common.cuh) and f64 sums in one fixed order: chunks of 32 elements summed left to
// right, tiles of 32 chunks, then the tiles left to right ("blocked" order,
// SAMPLE_CHUNK / SAMPLE_TILE in the twin). For a vocabulary of at most 32 entries that
// is exactly the CPU's sequential order; beyond it the CPU's spec::verify / spec::tree /
// Rng::sample agree unless a uniform falls within rounding of an acceptance threshold or
// a cumulative boundary (the normalisations may differ in the last f32 bit). build.rs
// compiles this file without --use_fast_math, so the softmaxes' expf is the full-range
// one (within 2 ulp of the CPU's, no flush of tiny probabilities to 0).
#include "common.cuh"

#define SAMPLE_CHUNK 32
#define SAMPLE_TILE 1024  // 32 chunks
#define MAX_TILES 256     // rows up to 262144 entries

// ---------------------------------------------------------------------------------
// Row passes

#define ROW_LOADS 4  // a thread's loads in flight over a row

// f(u, i, x[i]) for i = first, first + stride, ... < n in that order, u = the element's
// place in its batch: LOADS of them are loaded before any is used (one at a time, a pass
// over a row of n cost n / stride memory latencies, about 150 for Qwen2's vocabulary of
// 151,936 and 1024 threads). The last fewer than LOADS are one guarded step, not a loop
// (tests/sass.rs holds every row loop of these kernels to its loads a latency). x may be
// a row this kernel wrote: plain loads, each thread reads only its own writes.
template <int LOADS, class F>
__device__ __forceinline__ void for_strided(const float* x, int n, int first, int stride, F&& f) {
    int i = first;
    for (; i + (LOADS - 1) * stride < n; i += LOADS * stride) {
        float v[LOADS];
#pragma unroll
        for (int u = 0; u < LOADS; ++u) v[u] = x[i + u * stride];
#pragma unroll
        for (int u = 0; u < LOADS; ++u) f(u, i + u * stride, v[u]);
    }
    float v[LOADS - 1];
#pragma unroll
    for (int u = 0; u < LOADS - 1; ++u)
        if (i + u * stride < n) v[u] = x[i + u * stride];
#pragma unroll
    for (int u = 0; u < LOADS - 1; ++u)
        if (i + u * stride < n) f(u, i + u * stride, v[u]);
}

// f(i, x[i]) for this thread's elements of a row of n, i = threadIdx.x, + blockDim.x, ...
// in that order (the plain loop's elements and order), ROW_LOADS loads in flight.
template <class F>
__device__ __forceinline__ void for_row(const float* x, int n, F&& f) {
    for_strided<ROW_LOADS>(x, n, threadIdx.x, blockDim.x, [&](int, int i, float v) { f(i, v); });
}

// The softmax's f64 sum, in one order whether one block sums a row (probabilities, top_k)
// or many do (probabilities_max / _exp / _normalize): entry i belongs to sum thread
// i % SUM_THREADS, which adds its entries in index order; each warp of 32 consecutive sum
// threads adds their sums by warp_sum_f64's butterfly; the SUM_WARPS warp sums, in groups
// of 32 consecutive ones, are added by the butterfly in each group, and the groups' sums
// left to right (sum_warp_sums). In a block of 1024 threads thread t is the sum threads
// t + 1024 u, u < ROW_LOADS: for_row's u-th load of a batch (row_sum_lanes).
#define SUM_THREADS 4096  // 1024 * ROW_LOADS
#define SUM_WARPS 128

// The total of a row's SUM_WARPS warp sums in the order above. Whole warp; every lane
// gets it.
__device__ __forceinline__ double sum_warp_sums(const double* warp_sums) {
    const int lane = threadIdx.x & 31;
    double total = 0.0;
#pragma unroll
    for (int g = 0; g < SUM_WARPS / 32; ++g) total += warp_sum_f64(warp_sums[g * 32 + lane]);
    return total;
}

// f(i, x[i]) for this thread's elements, as for_row; what f returns is summed in the
// order above, and the row's total returned to every thread. Whole block of 1024 threads.
template <class F>
__device__ double row_sum_lanes(const float* x, int n, F&& f) {
    __shared__ double warp_sums[SUM_WARPS];
    __shared__ double s_total;
    double acc[ROW_LOADS];
#pragma unroll
    for (int u = 0; u < ROW_LOADS; ++u) acc[u] = 0.0;
    for_strided<ROW_LOADS>(x, n, threadIdx.x, blockDim.x, [&](int u, int i, float v) { acc[u] += f(i, v); });
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
    for (int u = 0; u < ROW_LOADS; ++u) {
        const double w = warp_sum_f64(acc[u]);
        if (lane == 0) warp_sums[u * 32 + warp] = w;
    }
    __syncthreads();
    if (warp == 0) {
        const double total = sum_warp_sums(warp_sums);
        if (lane == 0) s_total = total;
    }
    __syncthreads();
    const double total = s_total;
    __syncthreads();  // s_total is rewritten by the next call
    return total;
}

// ---------------------------------------------------------------------------------
// argmax

struct ArgMax {
    float v;
    int i;  // INT_MAX: nothing seen yet
};

__device__ __forceinline__ ArgMax argmax_pick(ArgMax a, ArgMax b) {
    if (b.i == INT_MAX) return a;
    if (a.i == INT_MAX) return b;
    if (b.v > a.v || (b.v == a.v && b.i < a.i)) return b;
    return a;
}

// The block-wide best of every thread's pick (argmax_pick's order: higher value, then
// lower index; i == INT_MAX: none), returned to every thread. blockDim.x a multiple of 32.
__device__ ArgMax block_best(ArgMax best) {
    __shared__ float sv[32];
    __shared__ int si[32];
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
        ArgMax o = {__shfl_xor_sync(0xffffffffu, best.v, off), __shfl_xor_sync(0xffffffffu, best.i, off)};
        best = argmax_pick(best, o);
    }
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) {
        sv[warp] = best.v;
        si[warp] = best.i;
    }
    __syncthreads();
    if (warp == 0) {
        const int nw = blockDim.x >> 5;
        best = lane < nw ? ArgMax{sv[lane], si[lane]} : ArgMax{-INFINITY, INT_MAX};
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) {
            ArgMax o = {__shfl_xor_sync(0xffffffffu, best.v, off), __shfl_xor_sync(0xffffffffu, best.i, off)};
            best = argmax_pick(best, o);
        }
        if (lane == 0) {
            sv[0] = best.v;
            si[0] = best.i;
        }
    }
    __syncthreads();
    const ArgMax r = {sv[0], si[0]};
    __syncthreads();  // sv / si are rewritten by the next call
    return r;
}

// Block-wide first index of the max of x[0..n) (NaNs skipped; 0 if none). blockDim.x a
// multiple of 32. A thread loads ROW_LOADS float4s before it compares any of them: at
// one float a load, a row cost n / blockDim.x memory latencies one after another (about
// 150 for Qwen2's vocabulary of 151,936), now a sixteenth of that. Each thread
// sees its elements in index order (the leading ones before the first 16-byte boundary,
// then its float4s, then the trailing ones), so the strict > keeps its first maximum,
// and block_best the first of the block.
__device__ int block_argmax(const float* __restrict__ x, int n) {
    ArgMax best = {-INFINITY, INT_MAX};
    auto see = [&](float v, int i) {
        if (v == v && (best.i == INT_MAX || v > best.v)) best = {v, i};
    };
    const int lead = min(n, (int)((4 - ((uintptr_t)x / 4) % 4) % 4));
    const int vecs = (n - lead) / 4;
    const float4* x4 = reinterpret_cast<const float4*>(x + lead);
    if ((int)threadIdx.x < lead) see(x[threadIdx.x], threadIdx.x);
    for (int j0 = threadIdx.x; j0 < vecs; j0 += ROW_LOADS * blockDim.x) {
        float4 v[ROW_LOADS];
#pragma unroll
        for (int u = 0; u < ROW_LOADS; ++u) {
            const int j = j0 + u * blockDim.x;
            if (j < vecs) v[u] = __ldg(x4 + j);
        }
#pragma unroll
        for (int u = 0; u < ROW_LOADS; ++u) {
            const int j = j0 + u * blockDim.x;
            if (j < vecs) {
                const int i = lead + 4 * j;
                see(v[u].x, i);
                see(v[u].y, i + 1);
                see(v[u].z, i + 2);
                see(v[u].w, i + 3);
            }
        }
    }
    const int tail = lead + 4 * vecs + threadIdx.x;  // fewer than 4 floats trail
    if (tail < n) see(x[tail], tail);
    const ArgMax r = block_best(best);
    return r.i == INT_MAX ? 0 : r.i;
}

// x: [rows, n] f32; out: [rows] int32. One block per row.
// Launched with 1024 threads: the bound keeps ptxas within 64 registers a thread.
extern "C" __global__ void __launch_bounds__(1024)
argmax(const float* __restrict__ x, int32_t* __restrict__ out, int n) {
    pdl_wait();
    const int r = block_argmax(x + (size_t)blockIdx.x * n, n);
    if (threadIdx.x == 0) out[blockIdx.x] = r;
}

// ---------------------------------------------------------------------------------
// probabilities

#define PROB_SUBS 8            // sub-histograms (warp % 8) to spread shared atomics
#define PROB_CANDIDATES 4096  // entries of the cut's first-digit bucket kept in shared memory
#define FIXED_SCALE 72057594037927936.0  // 2^56: masses as exact integers in u64

__device__ __forceinline__ unsigned long long to_fixed(float p) {
    return __double2ull_rn((double)p * FIXED_SCALE);
}

// The top-k / top-p cut of a row of probabilities: the smallest prefix of its descending
// order whose mass reaches top_p, at most k entries (massv::sampling::probabilities),
// found by a radix select of the bit patterns (probabilities are non-negative, so their
// bits sort like their values), 8-bit digits most significant first: each pass counts
// and weighs (exact fixed-point masses, so in any order) the entries that match the
// digits found so far by their next digit, and cut_choose_digit picks the digit where
// the cut falls. After the fourth the cut value's bits are known; the entries equal to
// it that are kept (ties: the lowest ids) end at tie_last. One block does all of it for
// its row (probabilities), or many blocks each pass with the last to finish choosing
// (probabilities_cut_digit, then probabilities_cut_keep): the same state, the same cut.
#define CUT_TIE_SCAN -1  // tie_last not known yet: some ties are cut, find the last kept
struct CutState {
    unsigned long long mass_above;  // fixed-point mass of the entries above the prefix
    unsigned prefix;                // the digits found so far (after the last: the cut's bits)
    unsigned mask;                  // which bits prefix holds
    unsigned count_above;           // entries above the prefix
    unsigned digit;                 // the digit the last pass chose
    unsigned keep_all;              // the mass never reaches top_p (rounding) and n <= k
    unsigned compact;               // one block: the first digit's bucket fits cand[]
    unsigned tie_keep;              // entries equal to the cut that are kept
    int tie_last;                   // the id of the last of them (INT_MAX: every tie)
};

__device__ __forceinline__ void cut_init(CutState& s) {
    s.mass_above = 0;
    s.prefix = s.mask = s.count_above = s.digit = s.keep_all = s.compact = s.tie_keep = 0;
    s.tie_last = INT_MAX;
}

// The digit at `shift` where the cut falls, given the counts and masses by that digit of
// the entries matching s.prefix: the highest digit d at which the entries above it and
// those of d reach k entries or top_p's mass (p_fixed). One thread.
__device__ __forceinline__ void cut_choose_digit(const unsigned* cnt, const unsigned long long* mass, unsigned k,
                                                 unsigned long long p_fixed, int shift, CutState& s) {
    unsigned above = s.count_above;
    unsigned long long m_above = s.mass_above;
    for (int d = 255; d >= 0; --d) {
        if (above + cnt[d] >= k || m_above + mass[d] >= p_fixed) {
            s.prefix |= (unsigned)d << shift;
            s.mask |= 255u << shift;
            s.count_above = above;
            s.mass_above = m_above;
            s.digit = d;
            if (shift == 24) s.compact = cnt[d] <= PROB_CANDIDATES;
            return;
        }
        above += cnt[d];
        m_above += mass[d];
    }
    s.keep_all = 1;
}

// After the last digit, of the `ties` entries equal to the cut how many are kept: the
// CPU adds them one at a time (lowest ids first) until k entries or top_p's mass. All of
// them: tie_last = INT_MAX; else CUT_TIE_SCAN (cut_tie_last finds it). One thread.
__device__ __forceinline__ void cut_count_ties(unsigned ties, unsigned k, unsigned long long p_fixed, CutState& s) {
    const unsigned long long v_fixed = to_fixed(__uint_as_float(s.prefix));
    unsigned long long m_acc = s.mass_above;
    unsigned t = 0;
    while (t < ties) {
        ++t;
        m_acc += v_fixed;
        if (s.count_above + t >= k || m_acc >= p_fixed) break;
    }
    s.tie_keep = t;
    s.tie_last = t == ties ? INT_MAX : CUT_TIE_SCAN;
}

// Counts and weighs v into its (sub-)histogram cnt / mass by its digit at shift, if its
// bits match prefix under pmask; returns whether they did.
__device__ __forceinline__ bool cut_count(unsigned* cnt, unsigned long long* mass, float v, unsigned prefix,
                                          unsigned pmask, int shift) {
    const unsigned b = __float_as_uint(v);
    if ((b & pmask) != prefix) return false;
    const unsigned d = (b >> shift) & 255u;
    atomicAdd(&cnt[d], 1u);
    atomicAdd(&mass[d], to_fixed(v));
    return true;
}

// Whether the cut keeps entry i of value v.
__device__ __forceinline__ bool cut_keeps(float v, int i, unsigned cut_bits, int tie_last) {
    const unsigned b = __float_as_uint(v);
    return b > cut_bits || (b == cut_bits && i <= tie_last);
}

// The id of the tie_keep-th entry of p (1 = the first) equal to cut_bits in id order:
// the ties counted tile by tile of blockDim.x entries (a ballot a warp, then the warps
// before it), LOADS tiles loaded before the first is counted, until it is found. Only
// where the cut falls inside a run of equal probabilities. Whole block (blockDim.x a
// multiple of 32); returned to every thread.
template <int LOADS>
__device__ __forceinline__ int cut_tie_last(const float* p, int n, unsigned cut_bits, unsigned tie_keep) {
    __shared__ unsigned warp_ties[32];
    __shared__ unsigned s_base;
    __shared__ int s_last;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    if (threadIdx.x == 0) {
        s_base = 0;
        s_last = -1;
    }
    __syncthreads();
    for (int base = 0; base < n; base += LOADS * blockDim.x) {
        float v[LOADS];
#pragma unroll
        for (int u = 0; u < LOADS; ++u) {
            const int i = base + u * blockDim.x + threadIdx.x;
            v[u] = i < n ? p[i] : 0.0f;
        }
#pragma unroll
        for (int u = 0; u < LOADS; ++u) {
            const int tile = base + u * blockDim.x;
            if (tile >= n) break;  // the same for every thread: no barrier is skipped by some
            const int i = tile + threadIdx.x;
            const bool tie = i < n && __float_as_uint(v[u]) == cut_bits;
            const unsigned ballot = __ballot_sync(0xffffffffu, tie);
            if (lane == 0) warp_ties[warp] = __popc(ballot);
            __syncthreads();
            unsigned before = s_base;
            for (int w = 0; w < warp; ++w) before += warp_ties[w];
            before += __popc(ballot & ((1u << lane) - 1u));
            if (tie && before + 1 == tie_keep) s_last = i;
            __syncthreads();
            if (threadIdx.x == 0) {
                unsigned tot = 0;
                for (int w = 0; w < nw; ++w) tot += warp_ties[w];
                s_base += tot;
            }
            __syncthreads();
        }
        if (s_last >= 0) break;
    }
    const int last = s_last;
    __syncthreads();  // s_last is rewritten by the next call
    return last;
}

// One row of probabilities at T > 0 into p: the softmax of x, then the cut. Whole block
// of 1024 threads.
__device__ __forceinline__ void probabilities_row(const float* __restrict__ x, float* __restrict__ p, int n,
                                                  float temperature, int top_k, float top_p) {
    // softmax(x / T) with the CPU's operation order: (x - max) / T, exp, f64 sum (in
    // row_sum_lanes' order), divide.
    float mx = -INFINITY;
    for_row(x, n, [&](int, float v) { mx = fmaxf(mx, v); });
    mx = block_max(mx);
    const double sum = row_sum_lanes(x, n, [&](int i, float v) {
        const float e = expf(ieee_div(v - mx, temperature));
        p[i] = e;
        return (double)e;
    });
    const bool use_k = top_k > 0 && top_k < n;
    const bool cuts = use_k || top_p < 1.0f;

    // The cut's radix select (see CutState). The first digit's histogram is taken by the
    // pass that normalises the row. Where the first digit's bucket holds at most
    // PROB_CANDIDATES entries (a band of values within a factor of 4, as a rule a small
    // one), the second pass copies them to shared memory and the last two digits are
    // counted there rather than over the row.
    __shared__ unsigned int cnt[PROB_SUBS][256];
    __shared__ unsigned long long mass[PROB_SUBS][256];
    __shared__ float cand[PROB_CANDIDATES];
    __shared__ unsigned int s_cands;
    __shared__ CutState st;
    const unsigned int k = use_k ? (unsigned int)top_k : (unsigned int)n;
    const unsigned long long p_fixed = __double2ull_rn((double)top_p * FIXED_SCALE);
    const int sub = (threadIdx.x >> 5) % PROB_SUBS;
    auto histogram = [&](float v, unsigned int prefix, unsigned int pmask, int shift) {
        return cut_count(cnt[sub], mass[sub], v, prefix, pmask, shift);
    };
    auto clear_histograms = [&]() {
        for (int i = threadIdx.x; i < PROB_SUBS * 256; i += blockDim.x) {
            (&cnt[0][0])[i] = 0;
            (&mass[0][0])[i] = 0;
        }
        __syncthreads();
    };
    if (cuts) {
        if (threadIdx.x == 0) {
            cut_init(st);
            s_cands = 0;
        }
        clear_histograms();
    }
    for_row(p, n, [&](int i, float v) {
        const float pi = (float)((double)v / sum);
        p[i] = pi;
        if (cuts) histogram(pi, 0u, 0u, 24);
    });
    if (!cuts) return;
    for (int pass = 0; pass < 4; ++pass) {
        const int shift = 24 - 8 * pass;
        if (pass > 0) {
            clear_histograms();
            const unsigned int prefix = st.prefix, pmask = st.mask;
            if (pass > 1 && st.compact) {
                const unsigned int c = s_cands;
                for (unsigned int j = threadIdx.x; j < c; j += blockDim.x) histogram(cand[j], prefix, pmask, shift);
            } else {
                const bool copy = pass == 1 && st.compact;
                for_row(p, n, [&](int, float v) {
                    if (histogram(v, prefix, pmask, shift) && copy) cand[atomicAdd(&s_cands, 1u)] = v;
                });
            }
        }
        __syncthreads();
        for (int d = threadIdx.x; d < 256; d += blockDim.x) {
            for (int s = 1; s < PROB_SUBS; ++s) {
                cnt[0][d] += cnt[s][d];
                mass[0][d] += mass[s][d];
            }
        }
        __syncthreads();
        if (threadIdx.x == 0) {
            cut_choose_digit(cnt[0], mass[0], k, p_fixed, shift, st);
            if (pass == 3 && !st.keep_all) cut_count_ties(cnt[0][st.digit], k, p_fixed, st);
        }
        __syncthreads();
        if (st.keep_all) return;  // nothing is cut: p is already normalised
    }
    const unsigned int cut_bits = st.prefix;
    const int tie_last = st.tie_last == CUT_TIE_SCAN ? cut_tie_last<ROW_LOADS>(p, n, cut_bits, st.tie_keep)
                                                     : st.tie_last;
    // What is kept, summed in row_sum_lanes' order (probabilities_cut_keep's), then
    // divided by as probabilities_normalize divides: the split kernels' bits.
    const double kept = row_sum_lanes(p, n, [&](int i, float v) {
        if (cut_keeps(v, i, cut_bits, tie_last)) return (double)v;
        p[i] = 0.0f;
        return 0.0;
    });
    for_row(p, n, [&](int i, float v) { p[i] = (float)((double)v / kept); });
}

// logits, out: [rows, n] f32. One block per row (1024 threads). temperature 0 = greedy
// (one-hot at the argmax); top_k 0 = off; top_p 1 = off.
extern "C" __global__ void __launch_bounds__(1024)
    probabilities(const float* __restrict__ logits, float* __restrict__ out, int n, float temperature, int top_k,
                  float top_p) {
    pdl_wait();
    const float* x = logits + (size_t)blockIdx.x * n;
    float* p = out + (size_t)blockIdx.x * n;
    if (temperature == 0.0f) {
        const int am = block_argmax(x, n);
        for (int i = threadIdx.x; i < n; i += blockDim.x) p[i] = i == am ? 1.0f : 0.0f;
        return;
    }
    probabilities_row(x, p, n, temperature, top_k, top_p);
}

// ---------------------------------------------------------------------------------
// top_k

// logits: [rows, n]; ids, probs: [rows, k]. Per row the k most likely tokens of the plain
// softmax (T = 1, with probabilities' operation order, so the values are the ones it
// writes) that have a non-zero probability, best first, ties by lower id
// (massv::spec::tree::top_tokens), and their probabilities; id -1 and probability 0 past
// the last such token. What a T = 0 token tree needs of a drafter row, without the row.
// One block per row (1024 threads). The row is read three times (max, sum, selection),
// not k + 2: in the selection pass each thread keeps its own TOP_K_LIST best entries in
// registers, then k rounds each pick the block's best head and pop it from its thread's
// list. A thread whose list runs dry while it had more entries rereads its own elements
// for the next TOP_K_LIST ranked after its last pop: k picks spread over 1024 threads
// rarely put more than one or two in a thread, so that is rare (the tests force it).
// PROBS: the rows are distributions already (top_k_probs): ranked as they are, one read.
// top_k_select does the same over many blocks a row.
#define TOP_K_LIST 4

// a ranks before b: higher, or equal with a lower id (top_tokens' order). {-INFINITY,
// INT_MAX} (no entry) ranks after every entry, which all have p > 0.
__device__ __forceinline__ bool ranks_before(ArgMax a, ArgMax b) {
    return a.v > b.v || (a.v == b.v && a.i < b.i);
}

// The k best entries (ranks_before) of the block's, best first, each handed to
// emit(j, best) on thread 0; returns how many there were (those with p > 0, at most k).
// each(f) calls f(i, p) for this thread's entries, the same entries at every call.
// Every thread keeps its own TOP_K_LIST best in registers and each of the k rounds picks
// the block's best head and pops it from its thread's list; a list that runs dry while
// its thread had more entries is refilled by calling each again. Whole block (blockDim.x
// a multiple of 32).
template <class Each, class Emit>
__device__ int block_top_k(Each&& each, int k, Emit&& emit) {
    const ArgMax none = {-INFINITY, INT_MAX};
    ArgMax list[TOP_K_LIST];  // this thread's best entries ranked after `popped`, best first
#pragma unroll
    for (int s = 0; s < TOP_K_LIST; ++s) list[s] = none;
    ArgMax popped = {INFINITY, -1};  // ranks before every entry
    bool more = true;                // entries ranked after popped may lie outside list
    int j = 0;
    for (; j < k; ++j) {
        if (list[0].i == INT_MAX && more) {
            more = false;
            each([&](int i, float p) {
                if (!(p > 0.0f)) return;  // zero, NaN, or no entry
                ArgMax c = {p, i};
                if (!ranks_before(popped, c)) return;
                if (list[TOP_K_LIST - 1].i != INT_MAX) {
                    more = true;  // c or the list's last falls out
                    if (!ranks_before(c, list[TOP_K_LIST - 1])) return;
                }
#pragma unroll
                for (int s = 0; s < TOP_K_LIST; ++s) {
                    if (ranks_before(c, list[s])) {
                        const ArgMax t = list[s];
                        list[s] = c;
                        c = t;
                    }
                }
            });
        }
        const ArgMax best = block_best(list[0]);
        if (best.i == INT_MAX) break;  // every thread sees the same pick
        if (threadIdx.x == 0) emit(j, best);
        if (list[0].i == best.i) {  // each id is one thread's
            popped = list[0];
#pragma unroll
            for (int s = 0; s + 1 < TOP_K_LIST; ++s) list[s] = list[s + 1];
            list[TOP_K_LIST - 1] = none;
        }
    }
    return j;
}

// block_top_k into a row's ids and probabilities ([k]): id -1 and probability 0 past the
// last entry found. Whole block.
template <class Each>
__device__ void block_top_k_row(Each&& each, int k, int32_t* row_ids, float* row_probs) {
    const int found = block_top_k(each, k, [&](int j, ArgMax best) {
        row_ids[j] = best.i;
        row_probs[j] = best.v;
    });
    for (int r = found + threadIdx.x; r < k; r += blockDim.x) {
        row_ids[r] = -1;
        row_probs[r] = 0.0f;
    }
}

// An entry's probability under the plain softmax of its row (max mx, sum of exps sum):
// the probabilities kernel's expression at T = 1.
__device__ __forceinline__ float top_k_prob(float v, float mx, double sum) {
    return (float)((double)expf(ieee_div(v - mx, 1.0f)) / sum);
}

template <bool PROBS>
__device__ void top_k_body(const float* __restrict__ rows, int32_t* __restrict__ ids, float* __restrict__ probs, int n,
                           int k) {
    const float* x = rows + (size_t)blockIdx.x * n;
    int32_t* row_ids = ids + (size_t)blockIdx.x * k;
    float* row_probs = probs + (size_t)blockIdx.x * k;
    float mx = 0.0f;
    double sum = 1.0;
    if (!PROBS) {
        mx = -INFINITY;
        for_row(x, n, [&](int, float v) { mx = fmaxf(mx, v); });
        mx = block_max(mx);
        sum = row_sum_lanes(x, n, [&](int, float v) { return (double)expf(ieee_div(v - mx, 1.0f)); });
    }
    block_top_k_row(
        [&](auto&& f) { for_row(x, n, [&](int i, float v) { f(i, PROBS ? v : top_k_prob(v, mx, sum)); }); }, k,
        row_ids, row_probs);
}

extern "C" __global__ void __launch_bounds__(1024)
    top_k(const float* __restrict__ logits, int32_t* __restrict__ ids, float* __restrict__ probs, int n, int k) {
    pdl_wait();
    top_k_body<false>(logits, ids, probs, n, k);
}

// q: [rows, n] distributions (the probabilities kernel's rows); ids, probs: [rows, k] as
// top_k, ranked by the values themselves.
extern "C" __global__ void __launch_bounds__(1024)
    top_k_probs(const float* __restrict__ q, int32_t* __restrict__ ids, float* __restrict__ probs, int n, int k) {
    pdl_wait();
    top_k_body<true>(q, ids, probs, n, k);
}

// ---------------------------------------------------------------------------------
// Blocked sums and sampling (see the exactness note at the top).

// The weights a draw is taken from: a row of p, or the residual max(0, p - q) (q is 0
// past its row length nq) divided by `norm` and rounded to f32 (residual with norm = 1
// gives the unnormalised residual).
struct Weights {
    const float* p;
    const float* q;  // nullptr: plain p
    int n;
    int nq;
    double norm;
    // Entry i's weight given p[i] (pi) and, where it is read, q[i] (qi).
    __device__ __forceinline__ float of(int i, float pi, float qi) const {
        if (q == nullptr) return pi;
        const float r = ieee_max(ieee_sub(pi, i < nq ? qi : 0.0f), 0.0f);
        return norm == 1.0 ? r : f64_to_f32(__ddiv_rn(f32_to_f64(r), norm));
    }
    __device__ __forceinline__ float at(int i) const { return of(i, p[i], q != nullptr && i < nq ? q[i] : 0.0f); }
};

// The weights of one tree-verification step (verify_tree_sampled): the residual
// max(0, p - q) against a drafter row q (0 past nq) or, without one, against the point
// mass at x; or, with p = nullptr, the drafter row q with entry x removed (unnormalised).
struct TreeWeights {
    const float* p;  // nullptr: "q without x"
    const float* q;  // nullptr: point mass at x
    int n;
    int nq;
    int x;
    __device__ __forceinline__ float at(int i) const {
        if (p == nullptr) return i == x ? 0.0f : q[i];
        const float qi = q != nullptr ? (i < nq ? q[i] : 0.0f) : (i == x ? 1.0f : 0.0f);
        return ieee_max(ieee_sub(p[i], qi), 0.0f);
    }
};

// Sequential f64 sum of chunk c (elements past n are absent). W: Weights or TreeWeights.
template <class W>
__device__ __forceinline__ double chunk_sum(const W& w, int c, int* last_pos) {
    double s = 0.0;
    const int i0 = c * SAMPLE_CHUNK, i1 = min(w.n, i0 + SAMPLE_CHUNK);
    for (int i = i0; i < i1; ++i) {
        const double x = f32_to_f64(w.at(i));
        s = __dadd_rn(s, x);
        if (x > 0.0) *last_pos = i;
    }
    return s;
}

// The blocked sum of tile t of w (its chunks in order, each summed left to right),
// returned to every lane of the calling warp; with `last`, the tile's last positive index
// into *last (-1: none). Whole warp.
template <class W>
__device__ __forceinline__ double warp_tile_sum(const W& w, int t, int* last = nullptr) {
    const int lane = threadIdx.x & 31;
    int l = -1;
    const double c = chunk_sum(w, t * (SAMPLE_TILE / SAMPLE_CHUNK) + lane, &l);
    double s = 0.0;
    for (int j = 0; j < 32; ++j) s = __dadd_rn(s, __shfl_sync(0xffffffffu, c, j));
    if (last != nullptr) {
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) l = max(l, __shfl_xor_sync(0xffffffffu, l, off));
        *last = l;
    }
    return s;
}

// The tiles' sums added in order.
__device__ __forceinline__ double tiles_total(const double* tile_sum, int tiles) {
    double s = 0.0;
    for (int t = 0; t < tiles; ++t) s = __dadd_rn(s, tile_sum[t]);
    return s;
}

// No weights: blocked_tile_sums' second row where it sums one.
struct NoWeights {
    int n;
    __device__ __forceinline__ float at(int) const { return 0.0f; }
};

// Tile sums of the whole row into tile_sum[], the last positive index into *s_last, and
// the total (tiles summed in order) into *s_total. With a second row v, its tile sums
// and total too (v_tile_sum, *v_total), in the same pass: a tile's chunks of v are summed
// right after w's, from L1 where the two share entries. Whole block.
template <class W, class V = NoWeights>
__device__ void blocked_tile_sums(const W& w, double* tile_sum, int* s_last, double* s_total, const V& v = V{0},
                                  double* v_tile_sum = nullptr, double* v_total = nullptr) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    const int tiles = ceil_div(w.n, SAMPLE_TILE), v_tiles = ceil_div(v.n, SAMPLE_TILE);
    if (threadIdx.x == 0) *s_last = -1;
    __syncthreads();
    for (int t = warp; t < max(tiles, v_tiles); t += nw) {
        int last;
        const double s = warp_tile_sum(w, t, &last);
        const double sv = v_tiles > 0 ? warp_tile_sum(v, t) : 0.0;
        if (lane == 0) {
            if (t < tiles) {
                tile_sum[t] = s;
                atomicMax(s_last, last);
            }
            if (t < v_tiles) v_tile_sum[t] = sv;
        }
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        *s_total = tiles_total(tile_sum, tiles);
        if (v_tiles > 0) *v_total = tiles_total(v_tile_sum, v_tiles);
    }
    __syncthreads();
}

// The tile where a draw with the uniform u01 falls, given the tile sums and their total:
// the running remainder u = u01 · total less each tile's sum in turn, until it is below
// one. Returns the tile (-1: the walk passed every tile) and the remainder there in *u.
// One thread. The sums are read WALK_BATCH at a time before any is compared: one
// shared-memory latency a batch, not a tile.
#define WALK_BATCH 4
__device__ __forceinline__ int walk_tiles(const double* tile_sum, int tiles, double total, double u01, double* u) {
    double r = __dmul_rn(u01, total);
    int tile = -1;
    for (int t0 = 0; t0 < tiles && tile < 0; t0 += WALK_BATCH) {
        double ts[WALK_BATCH];
#pragma unroll
        for (int k = 0; k < WALK_BATCH; ++k) ts[k] = t0 + k < tiles ? tile_sum[t0 + k] : 0.0;
#pragma unroll
        for (int k = 0; k < WALK_BATCH; ++k) {
            if (tile < 0 && t0 + k < tiles) {
                if (r < ts[k]) tile = t0 + k;
                else r = __dsub_rn(r, ts[k]);
            }
        }
    }
    *u = r;
    return tile;
}

// The draw inside tile `tile` of w with the remainder u there (walk_tiles): the chunk,
// then the entry where the running remainder falls; the tile's last positive entry if the
// walk passes them all. Whole warp (every lane follows lane 0's arithmetic on broadcast
// values); returns the index to every lane.
template <class W>
__device__ int warp_draw_in_tile(const W& w, int tile, double u) {
    const int lane = threadIdx.x & 31;
    int last = -1;
    const int c0 = tile * (SAMPLE_TILE / SAMPLE_CHUNK);
    const double c = chunk_sum(w, c0 + lane, &last);
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) last = max(last, __shfl_xor_sync(0xffffffffu, last, off));
    int chunk = -1;
    for (int j = 0; j < 32; ++j) {
        const double cj = __shfl_sync(0xffffffffu, c, j);
        if (chunk < 0) {
            if (u < cj) chunk = j;
            else u = __dsub_rn(u, cj);
        }
    }
    if (chunk < 0) return last;
    const int i = (c0 + chunk) * SAMPLE_CHUNK + lane;
    const double x = i < w.n ? f32_to_f64(w.at(i)) : 0.0;
    int found = -1, last_in_chunk = -1;
    for (int j = 0; j < 32; ++j) {
        const double xj = __shfl_sync(0xffffffffu, x, j);
        if (found < 0 && xj > 0.0) {
            last_in_chunk = (c0 + chunk) * SAMPLE_CHUNK + j;
            if (u < xj) found = last_in_chunk;
            else u = __dsub_rn(u, xj);
        }
    }
    return found >= 0 ? found : last_in_chunk;
}

// One draw from w with the uniform u01, in the blocked order, given w's tile sums, last
// positive index and total (blocked_tile_sums): find the tile, the chunk, then the entry
// where the running remainder falls. Whole block; returns the index to every thread (0
// when no weight is positive, last < 0).
template <class W>
__device__ int blocked_draw(const W& w, const double* tile_sum, int last_positive, double total, double u01) {
    __shared__ int s_tile, s_result;
    __shared__ double s_u;
    if (threadIdx.x == 0) {
        double u;
        s_tile = walk_tiles(tile_sum, ceil_div(w.n, SAMPLE_TILE), total, u01, &u);
        s_u = u;
        s_result = last_positive < 0 ? 0 : last_positive;
    }
    __syncthreads();
    const int tile = s_tile;
    if (tile >= 0 && threadIdx.x < 32) {
        const int r = warp_draw_in_tile(w, tile, s_u);
        if (threadIdx.x == 0) s_result = r;
    }
    __syncthreads();
    const int r = s_result;
    __syncthreads();  // s_result is rewritten by the next call
    return r;
}

// One draw from w with the uniform u01 in the blocked order (its tile sums, then the
// draw). Whole block; returns the index to every thread (0 when no weight is positive).
__device__ int blocked_sample(const Weights& w, double u01) {
    __shared__ double tile_sum[MAX_TILES];
    __shared__ int s_last;
    __shared__ double s_total;
    blocked_tile_sums(w, tile_sum, &s_last, &s_total);
    return blocked_draw(w, tile_sum, s_last, s_total, u01);
}

// The blocked total of w with entry x as 0, given w's tile sums: x's tile is summed
// again (its chunks as blocked_tile_sums sums them, x as 0) and the other tiles are w's,
// so the result is the very total blocked_tile_sums gives of "w without x", from one tile
// rather than the row. Whole block; returned to every thread.
__device__ double blocked_total_without(const float* w, int n, int x, const double* tile_sum) {
    __shared__ double s_total;
    if (threadIdx.x < 32) {
        const int lane = threadIdx.x, tx = x / SAMPLE_TILE;
        const double t = warp_tile_sum(TreeWeights{nullptr, w, n, n, x}, tx);
        if (lane == 0) {
            double total = 0.0;
            const int tiles = ceil_div(n, SAMPLE_TILE);
            for (int i = 0; i < tiles; ++i) total = __dadd_rn(total, i == tx ? t : tile_sum[i]);
            s_total = total;
        }
    }
    __syncthreads();
    const double total = s_total;
    __syncthreads();  // s_total is rewritten by the next call
    return total;
}

// w: [rows, n] non-negative weights; uniforms: [rows] in [0, 1); out: [rows]. One block
// per row (the drafter's draws at temperature > 0).
extern "C" __global__ void __launch_bounds__(1024)
    sample(const float* __restrict__ w, const double* __restrict__ uniforms, int32_t* __restrict__ out, int n) {
    pdl_wait();
    Weights wt = {w + (size_t)blockIdx.x * n, nullptr, n, 0, 1.0};
    const int r = blocked_sample(wt, uniforms[blockIdx.x]);
    if (threadIdx.x == 0) out[blockIdx.x] = r;
}

// ---------------------------------------------------------------------------------
// probabilities split over blocks

// The softmax's passes need no block-wide decision but the row's max and sum, so a row
// can take many blocks rather than one (one SM): at one block a row, Qwen2's vocabulary
// took three passes of about 150 instructions a thread each (the exp and the f64
// division dominate) on one SM, tens of microseconds for every token a drafter draws at
// T > 0 (a top-k / top-p cut too: probabilities_cut_digit below). Three launches, each
// SPLIT_BLOCKS or more blocks a row (blockIdx.y), give the same bits as the one-block
// kernel: the max is
// exact in any order, each entry is the same expression, and the sum is summed in the
// one order of row_sum_lanes: block b's thread j is sum thread b * SPLIT_THREADS + j.
// CPU twin: reference::probabilities.
#define SPLIT_THREADS 128
#define SPLIT_BLOCKS 32  // SUM_THREADS / SPLIT_THREADS
#define SPLIT_WARPS 4    // SPLIT_THREADS / 32
#define SPLIT_LOADS 16   // a thread's loads in flight (128-thread blocks have registers to spare)

// logits: [rows, n]; row_max: [rows, SPLIT_BLOCKS], each block's max of its sum threads'
// entries. Grid (SPLIT_BLOCKS, rows).
extern "C" __global__ void __launch_bounds__(SPLIT_THREADS)
    probabilities_max(const float* __restrict__ logits, float* __restrict__ row_max, int n) {
    pdl_wait();
    const float* x = logits + (size_t)blockIdx.y * n;
    float mx = -INFINITY;
    for_strided<SPLIT_LOADS>(x, n, blockIdx.x * SPLIT_THREADS + threadIdx.x, SUM_THREADS,
                             [&](int, int, float v) { mx = fmaxf(mx, v); });
    mx = block_max(mx);
    if (threadIdx.x == 0) row_max[blockIdx.y * SPLIT_BLOCKS + blockIdx.x] = mx;
}

// out: [rows, n] gets e = exp((x - max) / T) (out null: nothing, the sums alone, as
// top_k_select needs); warp_sums: [rows, SUM_WARPS] each sum warp's sum of its e. Grid
// (SPLIT_BLOCKS, rows).
extern "C" __global__ void __launch_bounds__(SPLIT_THREADS)
    probabilities_exp(const float* __restrict__ logits, float* __restrict__ out, const float* __restrict__ row_max,
                      double* __restrict__ warp_sums, int n, float temperature) {
    pdl_wait();
    const float* x = logits + (size_t)blockIdx.y * n;
    float* p = out == nullptr ? nullptr : out + (size_t)blockIdx.y * n;
    const float mx = warp_max(row_max[blockIdx.y * SPLIT_BLOCKS + (threadIdx.x & 31)]);
    const int s = blockIdx.x * SPLIT_THREADS + threadIdx.x;  // the sum thread
    double acc = 0.0;
    for_strided<SPLIT_LOADS>(x, n, s, SUM_THREADS, [&](int, int i, float v) {
        const float e = expf(ieee_div(v - mx, temperature));
        if (p != nullptr) p[i] = e;
        acc += (double)e;
    });
    acc = warp_sum_f64(acc);
    if ((threadIdx.x & 31) == 0) warp_sums[blockIdx.y * SUM_WARPS + s / 32] = acc;
}

// The entries of the tile from `base` of a row of n, staged in shared memory a chunk a
// padded row (probabilities_normalize's chunks): lane l reading chunk l's j-th entry
// meets no other lane in its bank.
struct SharedTile {
    const float (*chunk)[SAMPLE_CHUNK + 1];
    int base;
    int n;
    __device__ __forceinline__ float at(int i) const {
        const int k = i - base;
        return chunk[k / SAMPLE_CHUNK][k % SAMPLE_CHUNK];
    }
};

// A row this kernel's other blocks wrote, read through L2 (split_draw's chosen tile of
// probabilities_normalize's finished row).
struct WrittenRow {
    const float* p;
    int n;
    __device__ __forceinline__ float at(int i) const { return __ldcg(p + i); }
};

// The other blocks' tile sums ([tiles], global) into tile_sum (shared), the whole block
// loading them at once, and the largest of their last positive entries into *s_last
// (tile_lasts null: not wanted). Whole block.
__device__ void gather_tile_sums(const double* tile_sums, const int* tile_lasts, int tiles, double* tile_sum,
                                 int* s_last) {
    if (threadIdx.x == 0) *s_last = -1;
    __syncthreads();
    for (int t = threadIdx.x; t < tiles; t += blockDim.x) {
        tile_sum[t] = __ldcg(tile_sums + t);
        if (tile_lasts != nullptr) atomicMax(s_last, __ldcg(tile_lasts + t));
    }
    __syncthreads();
}

// The draw with u01 from a row of weights w split over tiles, in blocked_draw's order, by
// the last block to finish the row's tiles: their sums and last positive entries are in
// tile_sums / tile_lasts ([tiles], every block's); the walk picks the tile, the whole
// block stages that tile's weights in `stage` (a chunk a padded row) and warp 0 draws in
// it. Whole block of SPLIT_THREADS; the id is returned to thread 0.
template <class W>
__device__ int split_draw(const W& w, const double* tile_sums, const int* tile_lasts, double u01,
                          float (*stage)[SAMPLE_CHUNK + 1]) {
    __shared__ double tile_sum[MAX_TILES];
    __shared__ int s_last, s_tile;
    __shared__ double s_u;
    const int tiles = ceil_div(w.n, SAMPLE_TILE);
    gather_tile_sums(tile_sums, tile_lasts, tiles, tile_sum, &s_last);
    if (threadIdx.x == 0) {
        double u;
        s_tile = walk_tiles(tile_sum, tiles, tiles_total(tile_sum, tiles), u01, &u);
        s_u = u;
    }
    __syncthreads();
    const int tile = s_tile;
    int r = max(s_last, 0);  // the walk passed every tile: the last positive entry
    if (tile >= 0) {
        const int base = tile * SAMPLE_TILE;
        float v[SAMPLE_TILE / SPLIT_THREADS];
#pragma unroll
        for (int k = 0; k < SAMPLE_TILE / SPLIT_THREADS; ++k) {
            const int i = base + k * SPLIT_THREADS + threadIdx.x;
            v[k] = i < w.n ? w.at(i) : 0.0f;
        }
#pragma unroll
        for (int k = 0; k < SAMPLE_TILE / SPLIT_THREADS; ++k) {
            const int e = k * SPLIT_THREADS + threadIdx.x;
            stage[e / SAMPLE_CHUNK][e % SAMPLE_CHUNK] = v[k];
        }
        __syncthreads();
        if (threadIdx.x < 32) r = warp_draw_in_tile(SharedTile{stage, base, w.n}, tile, s_u);
    }
    return r;
}

// out: [rows, n], e in, p = e / sum out (warp_sums: probabilities_exp's, or after a cut
// probabilities_cut_keep's sums of what it keeps). A warp a tile
// of SAMPLE_TILE entries, its 32 loads a lane issued at once: grid (ceil(tiles /
// SPLIT_WARPS), rows), no fewer blocks. With uniforms ([rows])
// each row's last block to finish also draws from it as sample does (the same tile sums
// from the same values, the same walk) into ids[row]: tile_sums, tile_lasts: [rows,
// MAX_TILES] scratch; counters: the split counters (row r counts on counters[r]).
extern "C" __global__ void __launch_bounds__(SPLIT_THREADS)
    probabilities_normalize(float* out, const double* __restrict__ warp_sums, const double* __restrict__ uniforms,
                            int32_t* __restrict__ ids, double* tile_sums, int* tile_lasts,
                            unsigned* __restrict__ counters, int n) {
    pdl_wait();
    const int row = blockIdx.y, lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    float* p = out + (size_t)row * n;
    const double sum = sum_warp_sums(warp_sums + row * SUM_WARPS);
    const int tiles = ceil_div(n, SAMPLE_TILE);
    const bool draw = uniforms != nullptr;
    // Each warp's tile, chunk by chunk (SharedTile's layout), for its blocked sum.
    __shared__ float chunks[SPLIT_WARPS][SAMPLE_TILE / SAMPLE_CHUNK][SAMPLE_CHUNK + 1];
    const int t = blockIdx.x * SPLIT_WARPS + warp;  // this warp's tile
    if (t < tiles) {
        const int base = t * SAMPLE_TILE;
        float v[SAMPLE_CHUNK];
#pragma unroll
        for (int j = 0; j < SAMPLE_CHUNK; ++j) {
            const int i = base + j * SAMPLE_CHUNK + lane;
            v[j] = i < n ? p[i] : 0.0f;
        }
#pragma unroll
        for (int j = 0; j < SAMPLE_CHUNK; ++j) {
            const int i = base + j * SAMPLE_CHUNK + lane;
            if (i < n) {
                v[j] = (float)((double)v[j] / sum);
                p[i] = v[j];
            }
            if (draw) chunks[warp][j][lane] = v[j];
        }
        if (draw) {
            __syncwarp();
            int last;
            const double ts = warp_tile_sum(SharedTile{chunks[warp], base, n}, t, &last);
            if (lane == 0) {
                tile_sums[row * MAX_TILES + t] = ts;
                tile_lasts[row * MAX_TILES + t] = last;
            }
        }
    }
    if (!draw || !last_split_arrived(counters, row, gridDim.x)) return;
    const int r = split_draw(WrittenRow{p, n}, tile_sums + row * MAX_TILES, tile_lasts + row * MAX_TILES, uniforms[row],
                             chunks[0]);
    if (threadIdx.x == 0) ids[row] = r;
}

// The top-k / top-p cut of rows split over blocks (CutState's radix select): after
// probabilities_max and _exp, four probabilities_cut_digit launches (the first also
// normalising the row, as probabilities_normalize would), probabilities_cut_keep, then
// probabilities_normalize divides by what is kept (and draws, if asked). One block a
// row took a pass over the row a digit, with every entry's count and mass added by
// shared-memory atomics on one SM: most of a vocabulary's entries are tiny and share a
// few buckets, so those atomics queued on a handful of addresses, tens of microseconds a
// row by estimate (unmeasured) for every token a drafter draws with top-k / top-p. The
// same cut (exact integer histograms in any order), the same kept sum (row_sum_lanes'
// order), the same division: the one-block kernel's bits.
//
// A row's cut in global memory: the histogram the blocks of a pass add into (zero
// between launches: the pass's last block clears it) and the state. [rows] of them.
struct CutRow {
    unsigned long long mass[256];
    unsigned cnt[256];
    CutState st;
};
#define CUT_ROW_BYTES 4096  // the launcher's allocation a row
static_assert(sizeof(CutRow) <= CUT_ROW_BYTES, "CutRow outgrew its scratch");

// Pass `pass` (0..3) of the cut of out's rows (grid (SPLIT_BLOCKS, rows)): each block
// counts and weighs its entries that match the digits found so far by the next digit,
// adds that into the row's histogram, and the last block to arrive on counters[row]
// chooses the digit; after the last digit it counts the ties kept and, where some are
// cut, finds the last one kept (one block over the row: only inside a run of equal
// probabilities). Pass 0 first normalises the row: out holds probabilities_exp's e,
// warp_sums its sums. A row that nothing cuts (keep_all) is left alone after pass 0.
extern "C" __global__ void __launch_bounds__(SPLIT_THREADS)
    probabilities_cut_digit(float* out, const double* __restrict__ warp_sums, CutRow* cut,
                            unsigned* __restrict__ counters, int n, int top_k, float top_p, int pass) {
    pdl_wait();
    const int row = blockIdx.y, warp = threadIdx.x >> 5;
    float* p = out + (size_t)row * n;
    CutRow* c = cut + row;
    __shared__ unsigned cnt[SPLIT_WARPS][256];
    __shared__ unsigned long long mass[SPLIT_WARPS][256];
    __shared__ CutState st;
    if (threadIdx.x == 0) {
        if (pass == 0) cut_init(st);
        else st = c->st;
    }
    for (int i = threadIdx.x; i < SPLIT_WARPS * 256; i += blockDim.x) {
        (&cnt[0][0])[i] = 0;
        (&mass[0][0])[i] = 0;
    }
    __syncthreads();
    if (st.keep_all) return;  // every block of the row reads the same state
    const unsigned prefix = st.prefix, pmask = st.mask;
    const int shift = 24 - 8 * pass;
    const int first = blockIdx.x * SPLIT_THREADS + threadIdx.x, stride = gridDim.x * SPLIT_THREADS;
    if (pass == 0) {
        // Its own loop: with the atomics in it, the f64 division's slow-path call made
        // ptxas spill the loads in flight around it.
        const double sum = sum_warp_sums(warp_sums + row * SUM_WARPS);
        for_strided<SPLIT_LOADS>(p, n, first, stride, [&](int, int i, float e) { p[i] = (float)((double)e / sum); });
    }
    for_strided<SPLIT_LOADS>(p, n, first, stride,
                             [&](int, int, float v) { cut_count(cnt[warp], mass[warp], v, prefix, pmask, shift); });
    __syncthreads();
#pragma unroll
    for (int j = 0; j < 256 / SPLIT_THREADS; ++j) {
        const int d = j * SPLIT_THREADS + threadIdx.x;
        unsigned cd = 0;
        unsigned long long md = 0;
#pragma unroll
        for (int w = 0; w < SPLIT_WARPS; ++w) {
            cd += cnt[w][d];
            md += mass[w][d];
        }
        if (cd != 0) {
            atomicAdd(&c->cnt[d], cd);
            atomicAdd(&c->mass[d], md);
        }
    }
    if (!last_split_arrived(counters, row, gridDim.x)) return;
    // The last block: the row's histogram (cleared behind it), then the choice.
#pragma unroll
    for (int j = 0; j < 256 / SPLIT_THREADS; ++j) {
        const int d = j * SPLIT_THREADS + threadIdx.x;
        cnt[0][d] = __ldcg(&c->cnt[d]);
        mass[0][d] = __ldcg(&c->mass[d]);
        c->cnt[d] = 0;
        c->mass[d] = 0;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        const unsigned k = top_k > 0 && top_k < n ? (unsigned)top_k : (unsigned)n;
        const unsigned long long p_fixed = __double2ull_rn((double)top_p * FIXED_SCALE);
        cut_choose_digit(cnt[0], mass[0], k, p_fixed, shift, st);
        if (pass == 3 && !st.keep_all) cut_count_ties(cnt[0][st.digit], k, p_fixed, st);
    }
    __syncthreads();
    if (pass == 3 && !st.keep_all && st.tie_last == CUT_TIE_SCAN) {
        const int last = cut_tie_last<SPLIT_LOADS>(p, n, st.prefix, st.tie_keep);
        if (threadIdx.x == 0) st.tie_last = last;
    }
    if (threadIdx.x == 0) c->st = st;
}

// The cut applied to out's rows (grid (SPLIT_BLOCKS, rows)): the entries it drops set to
// 0, and warp_sums ([rows, SUM_WARPS]) the sum warps' sums of those it keeps, in
// probabilities_exp's order, for probabilities_normalize to divide by. A row that
// nothing cuts is final already: its sums say 1 (v / 1 is v).
extern "C" __global__ void __launch_bounds__(SPLIT_THREADS)
    probabilities_cut_keep(float* out, const CutRow* __restrict__ cut, double* __restrict__ warp_sums, int n) {
    pdl_wait();
    const int row = blockIdx.y;
    const int s = blockIdx.x * SPLIT_THREADS + threadIdx.x;  // the sum thread
    const CutState& st = cut[row].st;
    double acc = 0.0;
    if (st.keep_all) {
        acc = s == 0 ? 1.0 : 0.0;
    } else {
        float* p = out + (size_t)row * n;
        const unsigned cut_bits = st.prefix;
        const int tie_last = st.tie_last;
        for_strided<SPLIT_LOADS>(p, n, s, SUM_THREADS, [&](int, int i, float v) {
            if (cut_keeps(v, i, cut_bits, tie_last)) acc += (double)v;
            else p[i] = 0.0f;
        });
    }
    acc = warp_sum_f64(acc);
    if ((threadIdx.x & 31) == 0) warp_sums[row * SUM_WARPS + s / 32] = acc;
}

// top_k over many blocks a row (one block a row read the row three times on one SM, and
// its selection pass paid an f64 division an entry: tens of microseconds a row by
// estimate, unmeasured, at every depth of a T = 0 token tree): probabilities_max and
// probabilities_exp (sums only, T = 1) give each block the row's max and sum, then
// top_k_select. The same probabilities (the same expression, max and sum order) ranked
// in the same total order: the one-block kernel's ids and bits.
#define MAX_TOP_K 64                                            // the launcher's MAX_TOP_K
#define MERGE_LOADS (SPLIT_BLOCKS * MAX_TOP_K / SPLIT_THREADS)  // a thread's candidates

// A block's k best of the entries each(f) hands it (block_top_k), stored as its
// candidates in mine ([k], padded with {-inf, INT_MAX}) for the last block of its row to
// merge (merged_candidates). Whole block.
template <class Each>
__device__ void block_candidates(Each&& each, int k, ArgMax* mine) {
    const int found = block_top_k(each, k, [&](int j, ArgMax best) { mine[j] = best; });
    for (int j = found + threadIdx.x; j < k; j += blockDim.x) mine[j] = ArgMax{-INFINITY, INT_MAX};
}

// The row's candidates (row_cand: [gridDim.x, k], block_candidates'), loaded all at once
// (MERGE_LOADS a thread), and each(f) over them for block_top_k: every entry of the
// row's k best is one of its block's k best. The last block of the row.
struct MergedCandidates {
    ArgMax c[MERGE_LOADS];
    template <class F>
    __device__ __forceinline__ void operator()(F&& f) const {
#pragma unroll
        for (int u = 0; u < MERGE_LOADS; ++u) f(c[u].i, c[u].v);
    }
};
__device__ __forceinline__ MergedCandidates merged_candidates(const ArgMax* row_cand, int k) {
    const int m = gridDim.x * k;  // <= SPLIT_BLOCKS * MAX_TOP_K
    MergedCandidates mc;
#pragma unroll
    for (int u = 0; u < MERGE_LOADS; ++u) {
        const int t = threadIdx.x + u * SPLIT_THREADS;
        mc.c[u] = t < m ? ArgMax{__ldcg(&row_cand[t].v), __ldcg(&row_cand[t].i)} : ArgMax{-INFINITY, INT_MAX};
    }
    return mc;
}

// x: [rows, n] logits (row_max / warp_sums: probabilities_max's and _exp's) or, with
// row_max null, distributions (top_k_probs); ids, probs: [rows, k] as top_k's. Grid
// (SPLIT_BLOCKS, rows): each block ranks its sum threads' entries (block_top_k) and
// stores its k best in cand ([rows, SPLIT_BLOCKS, k], padded with {-inf, INT_MAX}); the
// last block of a row to arrive on counters[row] ranks the row's SPLIT_BLOCKS * k
// candidates the same way (every entry of the row's k best is one of its block's k
// best), loaded all at once.
extern "C" __global__ void __launch_bounds__(SPLIT_THREADS)
    top_k_select(const float* __restrict__ x, const float* __restrict__ row_max, const double* __restrict__ warp_sums,
                 ArgMax* cand, unsigned* __restrict__ counters, int32_t* __restrict__ ids, float* __restrict__ probs,
                 int n, int k) {
    pdl_wait();
    const int row = blockIdx.y;
    const float* xr = x + (size_t)row * n;
    const bool of_logits = row_max != nullptr;
    float mx = 0.0f;
    double sum = 1.0;
    if (of_logits) {
        mx = warp_max(row_max[row * SPLIT_BLOCKS + (threadIdx.x & 31)]);
        sum = sum_warp_sums(warp_sums + row * SUM_WARPS);
    }
    ArgMax* row_cand = cand + (size_t)row * SPLIT_BLOCKS * k;
    const int s = blockIdx.x * SPLIT_THREADS + threadIdx.x;  // the sum thread
    block_candidates(
        [&](auto&& f) {
            for_strided<SPLIT_LOADS>(xr, n, s, SUM_THREADS, [&](int, int i, float v) {
                f(i, of_logits ? top_k_prob(v, mx, sum) : v);
            });
        },
        k, row_cand + (size_t)blockIdx.x * k);
    if (!last_split_arrived(counters, row, gridDim.x)) return;
    block_top_k_row(merged_candidates(row_cand, k), k, ids + (size_t)row * k, probs + (size_t)row * k);
}

// The top-k / top-p cut of rows split over blocks where top_k (1..MAX_TOP_K, below n)
// bounds it, in one launch instead of four probabilities_cut_digit: every entry the cut
// keeps is one of the row's top_k best, so the cut is found among those. Each block
// normalises its entries of out (probabilities_exp's e; warp_sums its sums: the
// division probabilities_cut_digit's pass 0 makes) and stores its top_k best as
// candidates (cand: [rows, SPLIT_BLOCKS, top_k]); the last block of a row to arrive on
// counters[row] ranks them and adds the masses of the row's best in order until top_k
// entries or top_p's mass (the exact fixed-point masses of CutState: the radix select's
// cut), and stores the cut in cut[row].st for probabilities_cut_keep: its value's bits
// and the last kept id among the entries equal to it (its rank's total order is the
// ties' lower-id-first). A row with fewer than top_k positive entries whose mass never
// reaches top_p keeps every positive one (the cut falls among zeros: 0 either way).
extern "C" __global__ void __launch_bounds__(SPLIT_THREADS)
    probabilities_cut_top_k(float* out, const double* __restrict__ warp_sums, ArgMax* cand, CutRow* cut,
                            unsigned* __restrict__ counters, int n, int top_k, float top_p) {
    pdl_wait();
    const int row = blockIdx.y;
    float* p = out + (size_t)row * n;
    const int s = blockIdx.x * SPLIT_THREADS + threadIdx.x;  // the sum thread
    const double sum = sum_warp_sums(warp_sums + row * SUM_WARPS);
    // Each thread reads back only its own entries (plain loads).
    for_strided<SPLIT_LOADS>(p, n, s, SUM_THREADS, [&](int, int i, float e) { p[i] = (float)((double)e / sum); });
    ArgMax* row_cand = cand + (size_t)row * SPLIT_BLOCKS * top_k;
    block_candidates(
        [&](auto&& f) { for_strided<SPLIT_LOADS>(p, n, s, SUM_THREADS, [&](int, int i, float v) { f(i, v); }); },
        top_k, row_cand + (size_t)blockIdx.x * top_k);
    if (!last_split_arrived(counters, row, gridDim.x)) return;
    __shared__ ArgMax best[MAX_TOP_K];
    const int found = block_top_k(merged_candidates(row_cand, top_k), top_k, [&](int j, ArgMax b) { best[j] = b; });
    if (threadIdx.x == 0) {
        CutState st;
        cut_init(st);  // prefix 0, tie_last INT_MAX: every positive entry kept
        const unsigned long long p_fixed = __double2ull_rn((double)top_p * FIXED_SCALE);
        unsigned long long mass = 0;
        for (int j = 0; j < found; ++j) {
            mass += to_fixed(best[j].v);
            if (j + 1 >= top_k || mass >= p_fixed) {
                st.prefix = __float_as_uint(best[j].v);
                st.tie_last = best[j].i;
                break;
            }
        }
        cut[row].st = st;
    }
}

// Up to k draws without replacement from row (n entries) with the uniforms u[0..]: each
// drawn token is removed and the rest renormalised (the blocked total without it, f64
// division rounded to f32, as verify_tree_sampled's "q without x") before the next; stops
// early when nothing positive is left, and uses no uniform for a draw it does not make.
// ids / probs [k]: the draws and their probabilities in row (-1 / 0 past the last);
// work: [n], the running row. Returns the draws made. A draw costs two passes over the
// row: the renormalisation and the next draw's tile sums (the total without the drawn
// token comes from the tile sums already there, blocked_total_without). Whole block.
__device__ int draw_node(const float* row, int k, const double* u, float* work, int32_t* ids, float* probs, int n) {
    __shared__ double tile_sum[MAX_TILES];
    __shared__ int s_last;
    __shared__ double s_total;
    const float* left = row;
    int made = 0;
    if (k > 0) blocked_tile_sums(Weights{left, nullptr, n, 0, 1.0}, tile_sum, &s_last, &s_total);
    while (made < k) {
        const int last = s_last;
        if (last < 0) break;  // nothing positive left
        const Weights w = {left, nullptr, n, 0, 1.0};
        const int x = blocked_draw(w, tile_sum, last, s_total, u[made]);
        if (threadIdx.x == 0) {
            ids[made] = x;
            probs[made] = row[x];
        }
        if (++made == k) break;  // the last draw: nothing to renormalise for
        const double sum = blocked_total_without(left, n, x, tile_sum);
        // Each thread reads its own entries before it writes them: work may be left.
        for_row(left, n, [&](int i, float li) {
            work[i] = i == x || !(sum > 0.0) ? 0.0f : f64_to_f32(__ddiv_rn(f32_to_f64(li), sum));
        });
        __syncthreads();
        left = work;
        blocked_tile_sums(Weights{left, nullptr, n, 0, 1.0}, tile_sum, &s_last, &s_total);
    }
    for (int r = made + threadIdx.x; r < k; r += blockDim.x) {
        ids[r] = -1;
        probs[r] = 0.0f;
    }
    return made;
}

// How many children sample_without_replacement's node j draws, when that is known
// before drawing: min(counts[j], positive entries of q row row0 + j) into draws[j], or -1
// when the row could stop the node earlier: an entry negative or not finite, or a total
// of 1.5 or more. (A renormalisation divides every entry by the total without the drawn
// token: below 2 that leaves each positive entry positive, and the renormalised row sums
// to 1 within rounding, so every later total is below 2 too.) One block per node.
extern "C" __global__ void __launch_bounds__(1024)
    draw_counts(const float* __restrict__ q, const int32_t* __restrict__ counts, int32_t* __restrict__ draws,
                int row0, int n) {
    pdl_wait();
    const float* row = q + (size_t)(row0 + blockIdx.x) * n;
    const int k = counts[blockIdx.x];
    double positive = 0.0, odd = 0.0, total = 0.0;
    for_row(row, n, [&](int, float v) {
        positive += v > 0.0f ? 1.0 : 0.0;
        odd += v >= 0.0f && v < INFINITY ? 0.0 : 1.0;  // negative, infinite or NaN
        total += (double)v;
    });
    positive = block_sum_f64(positive);
    odd = block_sum_f64(odd);
    total = block_sum_f64(total);
    if (threadIdx.x == 0) {
        draws[blockIdx.x] = odd > 0.0 || !(total < 1.5) ? -1 : (int)fmin((double)k, positive);
    }
}

// The children of m token-tree nodes at T > 0 (massv::spec::tree::draw_without_replacement
// in the blocked order): node j draws counts[j] tokens from q row row0 + j ([rows, n],
// processed distributions) with draw_node. Nodes in order, one uniform stream:
// uniforms: [sum counts]. out: [sum counts + 1]: node j's draws at offset counts[0] + ...
// + counts[j - 1] (-1 past its last), then the uniforms used. out_q: [sum counts]: each
// drawn token's probability in its original row (0 past the last).
// draws: nullptr, or [m] from draw_counts. Where every node's count is known, node j's
// uniforms start after the earlier nodes' draws, so the m nodes draw at once, one block
// each (m blocks), node j in work row s: [s, n] scratch, s the nodes before j that draw
// two or more (one draw needs no running row). Otherwise (nullptr, or a -1 in draws)
// block 0 draws the nodes one after another in work row 0 and any other block returns.
extern "C" __global__ void __launch_bounds__(1024)
    sample_without_replacement(const float* q, const int32_t* __restrict__ counts, const int32_t* __restrict__ draws,
                               const double* __restrict__ uniforms, float* work, int32_t* __restrict__ out,
                               float* __restrict__ out_q, int m, int row0, int n) {
    pdl_wait();
    // q and work are read through plain pointers: work is written here, and a row read
    // from work must not come through the read-only cache.
    __shared__ int s_known, s_used, s_slot, s_work, s_used_all, s_slots_all;
    if (threadIdx.x == 0) {
        int known = draws != nullptr, used = 0, slot = 0, wrow = 0, used_all = 0, slots_all = 0;
        for (int j = 0; j < m; ++j) {
            const int d = known ? draws[j] : -1;
            known = known && d >= 0;
            if (j < (int)blockIdx.x) {
                used += d;
                slot += counts[j];
                wrow += counts[j] >= 2;
            }
            used_all += d;
            slots_all += counts[j];
        }
        s_known = known;
        s_used = used;
        s_slot = slot;
        s_work = wrow;
        s_used_all = used_all;
        s_slots_all = slots_all;
    }
    __syncthreads();
    if (s_known) {
        const int j = blockIdx.x;
        draw_node(q + (size_t)(row0 + j) * n, counts[j], uniforms + s_used, work + (size_t)s_work * n,
                  out + s_slot, out_q + s_slot, n);
        if (j == 0 && threadIdx.x == 0) out[s_slots_all] = s_used_all;
        return;
    }
    if (blockIdx.x != 0) return;
    int used = 0, slot = 0;
    for (int j = 0; j < m; ++j) {
        const int k = counts[j];
        used += draw_node(q + (size_t)(row0 + j) * n, k, uniforms + used, work, out + slot, out_q + slot, n);
        slot += k;
    }
    if (threadIdx.x == 0) out[slot] = used;
}

// ---------------------------------------------------------------------------------
// Verification

// drafts: [gamma]; target_argmax: [gamma + 1]; out: (accepted, next). One thread.
extern "C" __global__ void verify_greedy(const int32_t* __restrict__ drafts, const int32_t* __restrict__ target_argmax,
                                         int32_t* __restrict__ out, int gamma) {
    pdl_wait();
    if (threadIdx.x != 0 || blockIdx.x != 0) return;
    int a = 0;
    while (a < gamma && drafts[a] == target_argmax[a]) ++a;
    out[0] = a;
    out[1] = target_argmax[a];
}

// min(1, p/q); a draft the drafter could not have drawn (q = 0) is accepted iff p > 0.
__device__ __forceinline__ double accept_probability(float p, float q) {
    if (f32_to_f64(q) <= 0.0) return f32_to_f64(p) > 0.0 ? 1.0 : 0.0;
    const float r = ieee_div(p, q);
    return f32_to_f64(r) < 1.0 ? f32_to_f64(r) : 1.0;
}

// How many of the gamma drafts are accepted: the first i whose uniform is not below
// min(1, p/q) (the host tests them in turn and stops there), the tests 32 at a time
// across warp 0's lanes. Whole block; returned to every thread.
__device__ int accepted_drafts(const int32_t* __restrict__ drafts, const float* __restrict__ q,
                               const float* __restrict__ p, const double* __restrict__ uniforms, int gamma, int nq,
                               int np) {
    __shared__ int s_accepted;
    if (threadIdx.x < 32) {
        int a = gamma;
        for (int g = 0; g < gamma; g += 32) {
            const int i = g + (int)threadIdx.x;
            bool reject = false;
            if (i < gamma) {
                const int d = drafts[i];
                const float pd = d >= 0 && d < np ? p[(size_t)i * np + d] : 0.0f;
                const float qd = d >= 0 && d < nq ? q[(size_t)i * nq + d] : 0.0f;
                reject = uniforms[i] >= accept_probability(pd, qd);
            }
            const unsigned rejected = __ballot_sync(0xffffffffu, reject);
            if (rejected != 0u) {
                a = g + __ffs((int)rejected) - 1;
                break;
            }
        }
        if (threadIdx.x == 0) s_accepted = a;
    }
    __syncthreads();
    const int a = s_accepted;
    __syncthreads();  // s_accepted is rewritten by the next call
    return a;
}

// drafts: [gamma]; q: [gamma, nq] the distributions the drafts were drawn from; p:
// [gamma + 1, np] the target's; uniforms: [gamma + 1] (the host RNG's next draws: one
// per accept test, then one for the final draw); out: (accepted, next). The host RNG
// consumed accepted + 1 uniforms if all were accepted (accepted == gamma), else
// accepted + 2. One block of 1024 threads.
extern "C" __global__ void __launch_bounds__(1024)
    verify_sampled(const int32_t* __restrict__ drafts, const float* __restrict__ q, const float* __restrict__ p,
                   const double* __restrict__ uniforms, int32_t* __restrict__ out, int gamma, int nq, int np) {
    pdl_wait();
    __shared__ double s_norm;
    const int a = accepted_drafts(drafts, q, p, uniforms, gamma, nq, np);
    Weights w = {p + (size_t)a * np, nullptr, np, 0, 1.0};
    if (a < gamma) {
        // Residual max(0, p - q), normalised by its blocked sum (p itself if that is 0).
        __shared__ double tile_sum[MAX_TILES];
        __shared__ int s_last;
        __shared__ double s_total;
        Weights r = {w.p, q + (size_t)a * nq, np, nq, 1.0};
        blocked_tile_sums(r, tile_sum, &s_last, &s_total);
        if (threadIdx.x == 0) s_norm = s_total;
        __syncthreads();
        if (s_norm > 0.0) {
            r.norm = s_norm;
            w = r;
        }
    }
    const int next = blocked_sample(w, uniforms[a < gamma ? a + 1 : gamma]);
    if (threadIdx.x == 0) {
        out[0] = a;
        out[1] = next;
    }
}

// verify_sampled over many blocks: on one block (one SM) a rejection's residual took two
// passes over a vocabulary's p and q rows with an f64 division an entry in the second,
// tens of microseconds by estimate (unmeasured) after every target pass at T > 0. Each
// pass a launch, a warp a tile (grid ceil(tiles / SPLIT_WARPS)): verify_sampled_tiles
// sums the first weights' tiles and its last block to finish totals them (or, every
// draft accepted, draws the bonus: split_draw); verify_sampled_draw sums the normalised
// residual's tiles and its last block draws. The same weights, tile sums and walk:
// verify_sampled's verdict. state: the verdict so far, between the two.
struct VerifyState {
    int accepted;  // -1: the verdict is out already (every draft accepted)
    double norm;   // the residual's total
};

// Tile t of w (a warp's): its entries loaded at once (p's and q's, then their weights),
// staged in `stage` a chunk a padded row, their blocked sum and last positive entry into
// tile_sums[t] / tile_lasts[t]. Whole warp.
__device__ void split_tile_sum(const Weights& w, int t, float (*stage)[SAMPLE_CHUNK + 1], double* tile_sums,
                               int* tile_lasts) {
    const int lane = threadIdx.x & 31, base = t * SAMPLE_TILE;
    float pv[SAMPLE_CHUNK], qv[SAMPLE_CHUNK];
#pragma unroll
    for (int j = 0; j < SAMPLE_CHUNK; ++j) {
        const int i = base + j * SAMPLE_CHUNK + lane;
        pv[j] = i < w.n ? w.p[i] : 0.0f;
        qv[j] = w.q != nullptr && i < w.nq ? w.q[i] : 0.0f;
    }
#pragma unroll
    for (int j = 0; j < SAMPLE_CHUNK; ++j) {
        const int i = base + j * SAMPLE_CHUNK + lane;
        stage[j][lane] = i < w.n ? w.of(i, pv[j], qv[j]) : 0.0f;
    }
    __syncwarp();
    int last;
    const double ts = warp_tile_sum(SharedTile{stage, base, w.n}, t, &last);
    if (lane == 0) {
        tile_sums[t] = ts;
        tile_lasts[t] = last;
    }
}

// As verify_sampled (its arguments), and: state ([1]); tile_sums, tile_lasts:
// [MAX_TILES] scratch; counters: the split counters (counter 0). The tiles of the
// residual max(0, p - q) at the first rejected draft, or, every draft accepted, of p's
// last row, which the last block then draws the bonus from.
extern "C" __global__ void __launch_bounds__(SPLIT_THREADS)
    verify_sampled_tiles(const int32_t* __restrict__ drafts, const float* __restrict__ q, const float* __restrict__ p,
                         const double* __restrict__ uniforms, int32_t* __restrict__ out, VerifyState* state,
                         double* tile_sums, int* tile_lasts, unsigned* __restrict__ counters, int gamma, int nq,
                         int np) {
    pdl_wait();
    __shared__ float chunks[SPLIT_WARPS][SAMPLE_TILE / SAMPLE_CHUNK][SAMPLE_CHUNK + 1];
    const int a = accepted_drafts(drafts, q, p, uniforms, gamma, nq, np);
    const Weights w = a < gamma ? Weights{p + (size_t)a * np, q + (size_t)a * nq, np, nq, 1.0}
                                : Weights{p + (size_t)gamma * np, nullptr, np, 0, 1.0};
    const int warp = threadIdx.x >> 5, t = blockIdx.x * SPLIT_WARPS + warp;
    if (t < ceil_div(np, SAMPLE_TILE)) split_tile_sum(w, t, chunks[warp], tile_sums, tile_lasts);
    if (!last_split_arrived(counters, 0, gridDim.x)) return;
    if (a == gamma) {
        const int r = split_draw(w, tile_sums, tile_lasts, uniforms[gamma], chunks[0]);
        if (threadIdx.x == 0) {
            out[0] = a;
            out[1] = r;
            state->accepted = -1;
        }
        return;
    }
    // The total in tiles_total's order, from shared memory: thread 0 adding from global
    // memory would wait for an L2 latency a tile.
    __shared__ double tile_sum[MAX_TILES];
    __shared__ int s_last;
    const int tiles = ceil_div(np, SAMPLE_TILE);
    gather_tile_sums(tile_sums, nullptr, tiles, tile_sum, &s_last);
    if (threadIdx.x == 0) {
        state->accepted = a;
        state->norm = tiles_total(tile_sum, tiles);
    }
}

// After verify_sampled_tiles, where a draft was rejected: the tiles of the residual
// divided by its total (p's row itself where that total is 0), and the last block draws
// the token from them. Arguments as verify_sampled_tiles'.
extern "C" __global__ void __launch_bounds__(SPLIT_THREADS)
    verify_sampled_draw(const float* __restrict__ q, const float* __restrict__ p, const double* __restrict__ uniforms,
                        int32_t* __restrict__ out, const VerifyState* state, double* tile_sums, int* tile_lasts,
                        unsigned* __restrict__ counters, int nq, int np) {
    pdl_wait();
    __shared__ float chunks[SPLIT_WARPS][SAMPLE_TILE / SAMPLE_CHUNK][SAMPLE_CHUNK + 1];
    const int a = state->accepted;
    if (a < 0) return;
    const double norm = state->norm;
    const Weights w = norm > 0.0 ? Weights{p + (size_t)a * np, q + (size_t)a * nq, np, nq, norm}
                                 : Weights{p + (size_t)a * np, nullptr, np, 0, 1.0};
    const int warp = threadIdx.x >> 5, t = blockIdx.x * SPLIT_WARPS + warp;
    if (t < ceil_div(np, SAMPLE_TILE)) split_tile_sum(w, t, chunks[warp], tile_sums, tile_lasts);
    if (!last_split_arrived(counters, 0, gridDim.x)) return;
    const int r = split_draw(w, tile_sums, tile_lasts, uniforms[a + 1], chunks[0]);
    if (threadIdx.x == 0) {
        out[0] = a;
        out[1] = r;
    }
}

// ---------------------------------------------------------------------------------
// Token-tree verification. A tree of n nodes: node 0 is the root (the last committed
// token), every other node's parent comes before it, siblings in proposal order (the
// children of a node are the later nodes naming it as parent, in index order). out:
// [n + 1] int32 = (m, next, path[0..m]): the accepted path's length, the target's token
// after it, and the path's node indices root-side first (root excluded). Malformed
// input never reads out of bounds: a child is always a later node, tokens outside the
// vocabularies have probability 0, a q_row outside 0..q_rows means "no drafter row".

// tokens, parents, argmax: [n] (argmax[i]: the target's argmax after the path to node
// i). From the root, follow the first child equal to the argmax while there is one.
// One warp.
extern "C" __global__ void verify_tree_greedy(const int32_t* __restrict__ tokens, const int32_t* __restrict__ parents,
                                              const int32_t* __restrict__ argmax, int32_t* __restrict__ out, int n) {
    pdl_wait();
    if (blockIdx.x != 0 || threadIdx.x >= 32) return;
    const int lane = threadIdx.x;
    int node = 0, m = 0;
    for (;;) {
        const int want = argmax[node];
        int found = -1;
        for (int base = node + 1; base < n && found < 0; base += 32) {
            const int c = base + lane;
            const bool hit = c < n && parents[c] == node && tokens[c] == want;
            const unsigned int b = __ballot_sync(0xffffffffu, hit);
            if (b != 0u) found = base + __ffs(b) - 1;
        }
        if (found < 0) break;
        if (lane == 0) out[2 + m] = found;
        ++m;
        node = found;
    }
    if (lane == 0) {
        out[0] = m;
        out[1] = argmax[node];
    }
}

// tokens, parents: [n]; p: [n, np] the target's distribution after the path to each
// node; q: [q_rows, nq] drafter distributions and q_row: [n] the row of q node i's
// children were drawn from (-1: none; read only when sampled != 0, i.e.
// Proposal::Sampled: without a row, and always for Proposal::Fixed, a child's proposal
// is the point mass at its token); uniforms: [n] (the host RNG's next draws: one per
// tested child, then one for the final draw: at most n - 1 tests + 1);
// work: [np + nq] scratch (the running p, then the running q: p and q are never
// written). At a node the children are tested in order: accept child x with
// min(1, p(x) / q_x(x)); after a rejection p <- normalize(max(0, p - q_x)) (p itself when
// that is 0 everywhere) and, with a drafter row, q <- q without x, renormalised (zeros
// when nothing is left); an accepted child is descended into; when all are rejected
// the next token is drawn from the running p. Each rejection is two blocked sums and
// one pass over the vocabulary by the whole block. One block of 1024 threads.
extern "C" __global__ void __launch_bounds__(1024)
    verify_tree_sampled(const int32_t* __restrict__ tokens, const int32_t* __restrict__ parents,
                        const int32_t* __restrict__ q_row, const float* q, const float* p,
                        const double* __restrict__ uniforms, float* work, int32_t* __restrict__ out, int n, int sampled,
                        int q_rows, int nq, int np) {
    pdl_wait();
    __shared__ double tile_sum[MAX_TILES], tile_sum_q[MAX_TILES];
    __shared__ int s_last, s_accept;
    __shared__ double s_sum_p, s_sum_q;
    // The running p and q may live in work, written here: p, q and work are read through
    // plain pointers (no __restrict__), so none is read through the non-coherent
    // read-only cache.
    float* work_p = work;
    float* work_q = work + np;
    int node = 0, m = 0, used = 0;
    const float* pn = p;
    for (;;) {
        pn = p + (size_t)node * np;
        const int qr = sampled ? q_row[node] : -1;
        const float* ql = qr >= 0 && qr < q_rows ? q + (size_t)qr * nq : nullptr;
        int accepted = -1;
        for (int c = node + 1; c < n; ++c) {
            if (parents[c] != node) continue;
            const int x = tokens[c];
            if (threadIdx.x == 0) {
                const float px = x >= 0 && x < np ? pn[x] : 0.0f;
                const float qx = ql != nullptr ? (x >= 0 && x < nq ? ql[x] : 0.0f) : 1.0f;
                s_accept = uniforms[used] < accept_probability(px, qx);
            }
            __syncthreads();
            const bool accept = s_accept != 0;
            ++used;
            __syncthreads();  // s_accept is rewritten by the next test
            if (accept) {
                accepted = c;
                break;
            }
            // p <- residual(p, q_x), q <- q without x: both sums in one pass, then one
            // pass that writes them.
            const TreeWeights r = {pn, ql, np, nq, x};
            if (ql != nullptr)
                blocked_tile_sums(r, tile_sum, &s_last, &s_sum_p, TreeWeights{nullptr, ql, nq, nq, x}, tile_sum_q,
                                  &s_sum_q);
            else
                blocked_tile_sums(r, tile_sum, &s_last, &s_sum_p);
            const double sum_p = s_sum_p;
            const double sum_q = ql != nullptr ? s_sum_q : 0.0;
            const int len = ql != nullptr ? max(np, nq) : np;
            for (int i = threadIdx.x; i < len; i += blockDim.x) {
                // Read both old values before writing (work may be the source of either).
                const float pi = i < np ? r.at(i) : 0.0f;
                const float qi = ql != nullptr && i < nq ? ql[i] : 0.0f;
                if (i < np && sum_p > 0.0) work_p[i] = f64_to_f32(__ddiv_rn(f32_to_f64(pi), sum_p));
                if (ql != nullptr && i < nq)
                    work_q[i] = i == x || !(sum_q > 0.0) ? 0.0f : f64_to_f32(__ddiv_rn(f32_to_f64(qi), sum_q));
            }
            __syncthreads();
            if (sum_p > 0.0) pn = work_p;
            if (ql != nullptr) ql = work_q;
        }
        if (accepted < 0) break;
        if (threadIdx.x == 0) out[2 + m] = accepted;
        ++m;
        node = accepted;
    }
    const Weights w = {pn, nullptr, np, 0, 1.0};
    const int next = blocked_sample(w, uniforms[used]);
    if (threadIdx.x == 0) {
        out[0] = m;
        out[1] = next;
    }
}
