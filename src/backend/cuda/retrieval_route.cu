// The PEER / PKM route on the GPU, where the token lives (the math and order of
// src/backend/cpu/retrieval_cpu.c): query BatchNorm column sums and normalisation, sub-key
// score GEMMs over the (N*H, dk) view of the queries, exact product-key top-k (one warp per
// token and head), gate softmax; and the backward: softmax, query gradient through the
// selected sub-keys, dK1 / dK2 as sums over records sorted by sub-key (no atomics: bitwise
// repeatable), BatchNorm backward sums and apply.
//
// The BatchNorm statistics are this rank's partial sums, in double, left in device memory;
// src/model/route.c copies them to the host and reduces them across ranks.
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include "backend/cuda/cuda.h"
#include "backend/cuda/cuda_common.h"

// elements of one (rows, n) sub-key score chunk: bounds the scratch at 2 x 128 MiB
#define SCORE_CHUNK_ELEMS (1L << 25)
#define TOPK_MAX 32
// the pruned top-k keeps its list in a warp's candidate array (TOPK_MAX^2 >= 32 * NPL =
// 1024 entries) and takes the bound from lane k - 1 (k <= 32)
static_assert(TOPK_MAX * TOPK_MAX >= 1024 && TOPK_MAX <= 32, "top-k scratch sizes");
#define TOPK_WARPS 4
#define BN_ROWS 256   // rows per double partial of a BatchNorm column sum

// ---------------------------------------------------------------------------------------
// query BatchNorm forward

// part (nblk, HD): per block of BN_ROWS rows, the sum of q, or of (q - mean)^2 when mean
// is given, in double
static __global__ void bn_partial_kernel(double *part, const float *q, const double *mean, int N,
                                         int HD, int rows_per) {
    int j = blockIdx.x * blockDim.x + threadIdx.x, k = blockIdx.y;
    if (j >= HD) return;
    int n1 = min(N, (k + 1) * rows_per);
    double s = 0.0;
    for (int i = k * rows_per; i < n1; i++) {
        double v = q[(size_t)i * HD + j];
        if (mean) v = (v - mean[j]) * (v - mean[j]);
        s += v;
    }
    part[(size_t)k * HD + j] = s;
}

static __global__ void sum_partials_kernel(double *out, const double *part, int nblk, int HD) {
    int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= HD) return;
    double s = 0.0;
    for (int k = 0; k < nblk; k++) s += part[(size_t)k * HD + j];
    out[j] = s;
}

// sums (HD) = the column sums of q (N, HD) [centred on the device doubles mean]: per block
// of rows, then the blocks in order
void mp_cuda_query_bn_stats(double *sums, const float *q, const double *mean, int N, int HD) {
    if (HD <= 0) return;
    int rows_per = mp_rows_per_block(N, BN_ROWS), nblk = N > 0 ? (N + rows_per - 1) / rows_per : 0;
    double *part = (double *)mp_cuda_scratch(SCR_COLSUM, (size_t)(nblk ? nblk : 1) * HD * sizeof(double));
    if (nblk) {
        bn_partial_kernel<<<dim3(mp_blocks(HD, 128), nblk), 128>>>(part, q, mean, N, HD, rows_per);
        KERNEL_CHECK();
    }
    sum_partials_kernel<<<mp_blocks(HD, 128), 128>>>(sums, part, nblk, HD);
    KERNEL_CHECK();
}

static __global__ void bn_normalize_kernel(float *qn, const float *q, const float *w,
                                           const float *b, const float *mean, const float *rstd,
                                           int N, int HD) {
    size_t o = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    if (o >= (size_t)N * HD) return;
    int j = (int)(o % HD);
    qn[o] = w[j] * (q[o] - mean[j]) * rstd[j] + b[j];
}

void mp_cuda_query_bn_forward(float *qn, const float *q, const float *w, const float *b,
                              const float *mean, const float *rstd, int N, int HD) {
    size_t total = (size_t)(N > 0 ? N : 0) * (HD > 0 ? HD : 0);
    if (!total) return;
    bn_normalize_kernel<<<mp_blocks(total, 256), 256>>>(qn, q, w, b, mean, rstd, N, HD);
    KERNEL_CHECK();
}

// ---------------------------------------------------------------------------------------
// product-key top-k: one warp per (token, head) query

// Is (va, ia) ranked before (vb, ib)? Higher score first, then lower index (the CPU's rule).
static __device__ __forceinline__ bool ranks_before(float va, int ia, float vb, int ib) {
    return va > vb || (va == vb && ia < ib);
}

// Keeps (x, xi) as the lane's (v, i) when it ranks strictly after the previous pick (pv, pi)
// and before the lane's best so far (i < 0: none yet). A NaN score never ranks after
// anything, so it is never picked.
static __device__ __forceinline__ void lane_consider(float x, int xi, float pv, int pi, float *v,
                                                     int *i) {
    if (ranks_before(pv, pi, x, xi) && (*i < 0 || ranks_before(x, xi, *v, *i))) {
        *v = x;
        *i = xi;
    }
}

// The best of the lanes' (v, i); every lane gets it.
static __device__ __forceinline__ void warp_best(float *v, int *i) {
    for (int o = 16; o > 0; o >>= 1) {
        float ov = __shfl_xor_sync(0xffffffffu, *v, o);
        int oi = __shfl_xor_sync(0xffffffffu, *i, o);
        if (oi >= 0 && (*i < 0 || ranks_before(ov, oi, *v, *i))) {
            *v = ov;
            *i = oi;
        }
    }
    if (*i < 0) *i = 0;   // only when scores are NaN: keep the index in range
}

// The best of s[0..n) (+ bias[0..n) when given; index id[j], or j without id) ranked
// strictly after (pv, pi); every lane gets it. k rounds of this give the exact top-k, ties
// included, with no sorting and no state beyond the previous pick.
static __device__ void warp_next(const float *s, const float *bias, const int *id, int n,
                                 float pv, int pi, float *bv, int *bi) {
    float v = -INFINITY;
    int i = -1;
    for (int j = threadIdx.x % 32; j < n; j += 32)
        lane_consider(bias ? s[j] + bias[j] : s[j], id ? id[j] : j, pv, pi, &v, &i);
    warp_best(&v, &i);
    *bv = v;
    *bi = i;
}

// Does (va, ia) rank before (vb, ib), where i < 0 is "none", ranked after everything?
static __device__ __forceinline__ bool better(float va, int ia, float vb, int ib) {
    return ia >= 0 && (ib < 0 || ranks_before(va, ia, vb, ib));
}

// The 32 lanes' (v, i) sorted best first across the warp (lane r ends with the r-th best)
// by a bitonic network: 15 compare-exchange steps of two shuffles each.
static __device__ void warp_sort_best_first(float *v, int *i) {
    int lane = threadIdx.x % 32;
    for (int size = 2; size <= 32; size <<= 1)
        for (int stride = size / 2; stride > 0; stride >>= 1) {
            float ov = __shfl_xor_sync(0xffffffffu, *v, stride);
            int oi = __shfl_xor_sync(0xffffffffu, *i, stride);
            // segments of `size` lanes alternate best-first / worst-first until the last
            // merge; the lower lane of a pair keeps the better one in a best-first segment
            bool keep_better = ((lane & stride) == 0) == ((lane & size) == 0);
            if (keep_better ? better(ov, oi, *v, *i) : better(*v, *i, ov, oi)) {
                *v = ov;
                *i = oi;
            }
        }
}

// (v, i): at most one entry per lane (i < 0: none), at least k of them. Sorted across the
// warp, lane r < k writes the r-th best: the top k in one bitonic network (15 steps) instead
// of k rounds of warp_best (5 steps each).
static __device__ __forceinline__ void warp_sort_write(float v, int i, int k, float *out_v,
                                                       int *out_i) {
    warp_sort_best_first(&v, &i);
    int lane = threadIdx.x % 32;
    if (lane < k) {
        out_v[lane] = v;
        out_i[lane] = i;
    }
}

// The top k of the score row s[0..n), n <= 32 * NPL, best first into out_v / out_i (lane 0
// writes): warp_next's rounds on registers. Each lane loads its strided slice s[lane + 32 t]
// once, so the row is read from memory once instead of k times. The slots past n hold NaN,
// which is never picked. Only compile-time indices into x (unrolled loops): it stays in
// registers.
// Pruned (NPL >= 2): the lanes' own best entries are 32 distinct entries, so the k-th best of
// them, B, has at least k entries ranked at or before it, and nothing ranked after B can be
// in the top k. The entries at or before B (at least k, usually about k) are compacted into
// `list` (shared, 32 * NPL entries). When they are at most 32 (21.6 on average for
// random scores at n = 1024, k = 16: tools/bench/topk_prune_sim.py), one per lane, one sort gives the top k
// (warp_sort_write); else the k rounds run over the list instead of over all 32 * NPL
// slots. Either way the picks are those of the rounds on all slots, ties included.
// When fewer than k lanes hold a number (NaN scores), there is no B: the rounds run on the
// registers. With bias (n), the row ranked is s + bias.
template <int NPL>
static __device__ void row_topk(const float *s, const float *bias, int n, int k, float *out_v,
                                int *out_i, float *list_v, int *list_i) {
    int lane = threadIdx.x % 32;
    float x[NPL];   // x[t] = s[lane + 32 t] (+ bias[lane + 32 t])
    UNROLL
    for (int t = 0; t < NPL; t++) {
        int i = lane + 32 * t;
        x[t] = i < n ? (bias ? s[i] + bias[i] : s[i]) : NAN;
    }
    float pv = INFINITY;
    int pi = -1;
    if (NPL >= 2) {
        float bv = -INFINITY;
        int bi = -1;
        UNROLL
        for (int t = 0; t < NPL; t++) lane_consider(x[t], lane + 32 * t, pv, pi, &bv, &bi);
        warp_sort_best_first(&bv, &bi);
        bv = __shfl_sync(0xffffffffu, bv, k - 1);
        bi = __shfl_sync(0xffffffffu, bi, k - 1);
        if (bi >= 0) {   // warp-uniform
            int m = 0;
            __syncwarp();   // the list's previous readers are done
            UNROLL
            for (int t = 0; t < NPL; t++) {
                int i = lane + 32 * t;
                bool keep = i == bi || ranks_before(x[t], i, bv, bi);
                unsigned votes = __ballot_sync(0xffffffffu, keep);
                if (keep) {
                    int at = m + __popc(votes & ((1u << lane) - 1u));
                    list_v[at] = x[t];
                    list_i[at] = i;
                }
                m += __popc(votes);
            }
            __syncwarp();
            if (m <= 32) {   // warp-uniform
                warp_sort_write(lane < m ? list_v[lane] : 0.0f, lane < m ? list_i[lane] : -1, k,
                                out_v, out_i);
                return;
            }
            for (int r = 0; r < k; r++) {
                warp_next(list_v, NULL, list_i, m, pv, pi, &pv, &pi);
                if (lane == 0) {
                    out_v[r] = pv;
                    out_i[r] = pi;
                }
            }
            return;
        }
    }
    for (int r = 0; r < k; r++) {
        float v = -INFINITY;
        int i = -1;
        UNROLL
        for (int t = 0; t < NPL; t++) lane_consider(x[t], lane + 32 * t, pv, pi, &v, &i);
        warp_best(&v, &i);
        if (lane == 0) {
            out_v[r] = v;
            out_i[r] = i;
        }
        pv = v;
        pi = i;
    }
}

// NPL = 0, n > 1024: the row does not fit in registers; every round reads it
template <>
__device__ void row_topk<0>(const float *s, const float *bias, int n, int k, float *out_v,
                            int *out_i, float *, int *) {
    float pv = INFINITY;
    int pi = -1;
    for (int r = 0; r < k; r++) {
        warp_next(s, bias, NULL, n, pv, pi, &pv, &pi);
        if (threadIdx.x % 32 == 0) {
            out_v[r] = pv;
            out_i[r] = pi;
        }
    }
}

// Where candidate (i, j) of the k x k grid (the i-th best of the first half with the j-th
// of the second) is kept: in the order of the anti-diagonals d = i + j, then i. Lane l
// looks at positions l, l + 32, ..., so the lanes' own best candidates are those of the
// first anti-diagonals, among which the top k mostly lies.
static __device__ __forceinline__ int diagonal_pos(int i, int j, int k) {
    int d = i + j;
    int before = d < k ? d * (d + 1) / 2 : k * k - (2 * k - 1 - d) * (2 * k - d) / 2;
    return before + i - max(0, d - k + 1);
}

// The top k of the k*k candidate sums in cand / cand_id (any order), best
// first: lane j < k returns the j-th in (v, e). Pruned as row_topk: the lanes' best
// candidates give the bound B, and when at most 32 candidates rank at or before it they
// are compacted into top_v / top_i (32 entries) and sorted once; else k rounds over all k*k.
// With the diagonal order above and scores without structure that is at most 19 at k = 16
// (16.2 on average; kept row by row it would be 42, past 32 in 68 % of the rows), and k = 32
// nearly always takes the rounds (tools/bench/topk_prune_sim.py simulates it).
static __device__ void candidates_topk(const float *cand, const int *cand_id, int k,
                                       float *top_v, int *top_i, float *v, int *e) {
    int lane = threadIdx.x % 32, kk = k * k;
    float bv = -INFINITY;
    int bi = -1;
    for (int c = lane; c < kk; c += 32) lane_consider(cand[c], cand_id[c], INFINITY, -1, &bv, &bi);
    warp_sort_best_first(&bv, &bi);
    bv = __shfl_sync(0xffffffffu, bv, k - 1);
    bi = __shfl_sync(0xffffffffu, bi, k - 1);
    // warp-uniform. A half with fewer than k numbers (NaN scores) pads its picks with
    // (-inf, index 0), so candidates can share an id, which the rounds skip and a sort would
    // not: B > -inf keeps every candidate at or before it a real, distinct one.
    if (bi >= 0 && bv > -INFINITY) {
        int m = 0;
        for (int c0 = 0; c0 < kk; c0 += 32) {   // the same trip count on every lane
            int c = c0 + lane;
            bool keep = c < kk && (cand_id[c] == bi || ranks_before(cand[c], cand_id[c], bv, bi));
            unsigned votes = __ballot_sync(0xffffffffu, keep);
            int at = m + __popc(votes & ((1u << lane) - 1u));
            if (keep && at < 32) {
                top_v[at] = cand[c];
                top_i[at] = cand_id[c];
            }
            m += __popc(votes);
        }
        __syncwarp();
        if (m <= 32) {   // warp-uniform
            float sv = lane < m ? top_v[lane] : 0.0f;
            int si = lane < m ? top_i[lane] : -1;
            warp_sort_best_first(&sv, &si);
            if (lane < k) {   // m >= k: a candidate
                *v = sv;
                *e = si;
            }
            return;
        }
    }
    float pv = INFINITY;
    int pi = -1;
    for (int j = 0; j < k; j++) {
        float rv;
        int ri;
        warp_next(cand, NULL, cand_id, kk, pv, pi, &rv, &ri);
        if (lane == j) {
            *v = rv;
            *e = ri;
        }
        pv = rv;
        pi = ri;
    }
}

// bias: NULL, or (2, H, n) sub-key balance biases, ranked with the scores; the gates are the
// softmax of the plain scores s1[a] + s2[b].
template <int NPL>
static __global__ void product_topk_kernel(const float *s1, const float *s2, const float *bias,
                                           int H, long rows, int n, int k, int32_t *sel,
                                           int32_t *sel_a, int32_t *sel_b, float *gate) {
    __shared__ float cand[TOPK_WARPS][TOPK_MAX * TOPK_MAX];
    __shared__ int cand_id[TOPK_WARPS][TOPK_MAX * TOPK_MAX];
    __shared__ float half_v[TOPK_WARPS][2][TOPK_MAX];
    __shared__ int half_i[TOPK_WARPS][2][TOPK_MAX];
    __shared__ float top_v[TOPK_WARPS][32];
    __shared__ int top_i[TOPK_WARPS][32];
    int w = threadIdx.x / 32, lane = threadIdx.x % 32;
    long row = (long)blockIdx.x * TOPK_WARPS + w;   // = token * H + head
    if (row >= rows) return;                         // the whole warp leaves together
    // top-k of each half
    for (int half = 0; half < 2; half++) {
        const float *b = bias ? bias + ((size_t)half * H + row % H) * n : NULL;
        row_topk<NPL>((half ? s2 : s1) + (size_t)row * n, b, n, k, half_v[w][half], half_i[w][half],
                      cand[w], cand_id[w]);
    }
    __syncwarp();
    // the k*k candidate sums, expert id a*n + b, in the diagonal order
    for (int c = lane; c < k * k; c += 32) {
        int i = c / k, j = c % k, p = diagonal_pos(i, j, k);
        cand[w][p] = half_v[w][0][i] + half_v[w][1][j];
        cand_id[w][p] = half_i[w][0][i] * n + half_i[w][1][j];
    }
    __syncwarp();
    float v = 0.0f;
    int e = 0;
    candidates_topk(cand[w], cand_id[w], k, top_v[w], top_i[w], &v, &e);
    if (bias && lane < k) v = s1[(size_t)row * n + e / n] + s2[(size_t)row * n + e % n];
    // gates: softmax over the k selected plain scores, summed in order as on the CPU
    float mx = lane < k ? v : -INFINITY;
    for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
    float ex = lane < k ? expf(v - mx) : 0.0f;
    float sum = 0.0f;
    for (int j = 0; j < k; j++) sum += __shfl_sync(0xffffffffu, ex, j);
    if (lane < k) {
        size_t o = (size_t)row * k + lane;
        gate[o] = ex / sum;
        sel[o] = e;
        sel_a[o] = e / n;
        sel_b[o] = e % n;
    }
}

typedef void (*topk_kernel_fn)(const float *, const float *, const float *, int, long, int, int,
                               int32_t *, int32_t *, int32_t *, float *);

// The instantiation for n: the smallest NPL (a power of two) with 32 * NPL >= n, else the
// memory fallback
static topk_kernel_fn topk_kernel_for(int n) {
    return n <= 32     ? product_topk_kernel<1>
           : n <= 64   ? product_topk_kernel<2>
           : n <= 128  ? product_topk_kernel<4>
           : n <= 256  ? product_topk_kernel<8>
           : n <= 512  ? product_topk_kernel<16>
           : n <= 1024 ? product_topk_kernel<32>
                       : product_topk_kernel<0>;
}

static void product_topk(const float *s1, const float *s2, const float *bias, int H, long rows,
                         int n, int k, int32_t *sel, int32_t *sel_a, int32_t *sel_b, float *gate) {
    if (k < 1 || k > TOPK_MAX || k > n)
        mp_fatal("CUDA product-key top-k supports 1 <= k <= min(%d, n), got k = %d, n = %d",
                 TOPK_MAX, k, n);
    if (rows <= 0) return;
    topk_kernel_fn kernel = topk_kernel_for(n);
    kernel<<<mp_blocks((size_t)rows, TOPK_WARPS), 32 * TOPK_WARPS>>>(s1, s2, bias, H, rows, n, k,
                                                                      sel, sel_a, sel_b, gate);
    KERNEL_CHECK();
}

extern "C" void mp_cuda_product_topk(const float *s1, const float *s2, const float *bias, int H,
                                     long rows, int n, int k, int32_t *sel, int32_t *sel_a,
                                     int32_t *sel_b, float *gate) {
    product_topk(s1, s2, bias, H, rows, n, k, sel, sel_a, sel_b, gate);
}

void mp_cuda_retrieval_route(int32_t *sel, int32_t *sel_a, int32_t *sel_b, float *gate,
                             const float *qn, const float *k1, const float *k2,
                             const float *key_bias, int N, int H, int dk, int n, int k) {
    int half = dk / 2;
    long rows_total = (long)N * H;
    long chunk = SCORE_CHUNK_ELEMS / n;
    if (chunk < 1) chunk = 1;
    chunk = chunk < H ? H : chunk / H * H;   // whole tokens: a chunk row's head is row % H
    if (chunk > rows_total) chunk = rows_total;
    if (chunk < 1) return;
    float *s1 = (float *)mp_cuda_scratch(SCR_S1, (size_t)chunk * n * sizeof(float));   // (chunk, n)
    float *s2 = (float *)mp_cuda_scratch(SCR_S2, (size_t)chunk * n * sizeof(float));   // (chunk, n)
    for (long r0 = 0; r0 < rows_total; r0 += chunk) {
        long rc_ = rows_total - r0 < chunk ? rows_total - r0 : chunk;
        // qn viewed as (N*H, dk): the first half of each row against K1, the second against
        // K2. fp32 also in bf16 mode (as is the query projection before them, route.c),
        // because the top-k is discontinuous in the scores. In TF32 each operand carries a
        // relative error of 2^-11 (2^-10 if the tensor cores truncate), which moves a score by
        // ~4e-4 of the scores' spread (random signs over dk/2 = 64 terms); near the k-th best
        // of n = 1024 scores neighbours lie ~2.5 % of the spread apart, so a few % of the
        // (token, head) rows would pick other experts than fp32 mode and the CPU pick for the
        // same weights (bf16: 16 times more). The cost: 2 N H n (dk/2) flops, 34 GFLOP at the
        // paper's shape (N = 16384, H = 8, n = 1024, dk = 128), ~0.5 ms at fp32's 67 TFLOP/s
        // on an H200, where TF32 would be bounded by writing the 1 GiB of scores (~0.2 ms).
        mp_cuda_sgemm(0, 1, (int)rc_, n, half, 1.0f, qn + r0 * dk, dk, k1, half, 0.0f, s1, n);
        mp_cuda_sgemm(0, 1, (int)rc_, n, half, 1.0f, qn + r0 * dk + half, dk, k2, half, 0.0f,
                      s2, n);
        size_t o = (size_t)r0 * k;
        product_topk(s1, s2, key_bias, H, rc_, n, k, sel + o, sel_a + o, sel_b + o, gate + o);
    }
}

// counts (2, H, n): one thread per selection adds 1 to its head's first- and second-half
// sub-key (integer atomics: the result does not depend on their order)
static __global__ void subkey_counts_kernel(int32_t *counts, const int32_t *sel_a,
                                            const int32_t *sel_b, long total, int H, int k,
                                            int n) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;   // = (t*H + h)*k + j
    if (i >= total) return;
    long h = i / k % H;
    atomicAdd(&counts[h * n + sel_a[i]], 1);
    atomicAdd(&counts[((long)H + h) * n + sel_b[i]], 1);
}

void mp_cuda_subkey_counts(int32_t *counts, const int32_t *sel_a, const int32_t *sel_b, int N,
                           int H, int k, int n) {
    CUDA_CHECK(cudaMemset(counts, 0, 2 * (size_t)H * n * sizeof(int32_t)));
    mp_cuda_mark("cudaMemset", __FILE__, __LINE__);
    long total = (long)N * H * k;
    if (total <= 0) return;
    subkey_counts_kernel<<<mp_blocks((size_t)total, 256), 256>>>(counts, sel_a, sel_b, total, H,
                                                                 k, n);
    KERNEL_CHECK();
}

// ---------------------------------------------------------------------------------------
// backward

// One warp per (token, head): dscore_j = g_j (dg_j - sum_i g_i dg_i) into dgate, and the
// query gradient dq (set, not accumulated) through the selected sub-keys, j in order.
static __global__ void softmax_dq_kernel(float *dq, float *dgate, const float *gate,
                                         const int32_t *sel_a, const int32_t *sel_b,
                                         const float *k1, const float *k2, long rows, int k,
                                         int dk) {
    __shared__ float sds[TOPK_WARPS][TOPK_MAX];
    __shared__ int sa[TOPK_WARPS][TOPK_MAX], sb[TOPK_WARPS][TOPK_MAX];
    int w = threadIdx.x / 32, lane = threadIdx.x % 32, half = dk / 2;
    long row = (long)blockIdx.x * TOPK_WARPS + w;
    if (row >= rows) return;
    size_t o = (size_t)row * k + lane;
    float g = lane < k ? gate[o] : 0.0f, dg = lane < k ? dgate[o] : 0.0f;
    float prod = g * dg, gd = 0.0f;
    for (int j = 0; j < k; j++) gd += __shfl_sync(0xffffffffu, prod, j);
    if (lane < k) {
        float ds = g * (dg - gd);
        dgate[o] = ds;
        sds[w][lane] = ds;
        sa[w][lane] = sel_a[o];
        sb[w][lane] = sel_b[o];
    }
    __syncwarp();
    float *dqr = dq + (size_t)row * dk;   // (N, H, dk) = (N, HD)
    for (int c = lane; c < dk; c += 32) {
        float acc = 0.0f;
        for (int j = 0; j < k; j++)
            acc += c < half ? sds[w][j] * k1[(size_t)sa[w][j] * half + c]
                            : sds[w][j] * k2[(size_t)sb[w][j] * half + (c - half)];
        dqr[c] = acc;
    }
}

// dkey[key] (half) += sum over the key's records (sorted by key) of dscore * qn[token, head,
// col0 + c]; one block per key. A key holds about N H k / n records (2048 at the paper's
// shape), so one thread per column walking them all in turn (as this kernel did) leaves the
// GPU waiting on one load at a time: 4.5 ms on an H200 for a sum of 0.1 GB. Here the block's
// SUBKEY_THREADS threads are R = SUBKEY_THREADS / CW record lanes of CW columns; lane r sums
// records r, r + R, ..., and the R partial sums are added in lane order, so each run adds the
// same terms in the same order (no atomics). A key with more than SUBKEY_SEG records (a
// router collapsed onto a few sub-keys gives each of them N H k / m, 524,288 at the paper's
// shape for m = 4) is left to subkey_grad_seg_kernel, a block per segment of SUBKEY_SEG
// records (the last one of up to twice that: mp_cuda_plan_hot_keys), and
// subkey_grad_hot_kernel, which adds the segments' sums in order.
#define SUBKEY_THREADS 256
#define SUBKEY_SEG MP_CUDA_SUBKEY_SEG   // cuda.h

// The block's sum of the key's records [p0, p1) (lanes as above) into dst (half), added to
// what dst holds (add) or written over it
static __device__ void subkey_sum(float *dst, int add, float *part, const int32_t *idx, int p0,
                                  int p1, const float *dscore, const float *qn, int S, int k,
                                  int dk, int col0, int CW) {
    int half = dk / 2, H = S / k, R = blockDim.x / CW;
    int lane = threadIdx.x / CW, cc = threadIdx.x % CW;
    for (int cb = 0; cb < half; cb += CW) {
        int c = cb + cc;
        float acc = 0.0f;
        if (c < half) {
            UNROLL4
            for (int p = p0 + lane; p < p1; p += R) {
                // 32-bit: record ids are below 2^31 (mp_cuda_sort_by_key refuses more), and
                // the GPU divides 64-bit integers in a software routine several times longer
                unsigned o = (unsigned)idx[p], t = o / (unsigned)S, h = o % (unsigned)S / (unsigned)k;
                acc += dscore[o] * qn[((size_t)t * H + h) * dk + col0 + c];
            }
        }
        part[threadIdx.x] = acc;
        __syncthreads();
        if (lane == 0 && c < half) {
            float s = add ? dst[c] : 0.0f;
            for (int r = 0; r < R; r++) s += part[r * CW + cc];
            dst[c] = s;
        }
        __syncthreads();   // part is refilled by the next column chunk
    }
}

static __global__ void subkey_grad_kernel(float *dkey, const int32_t *idx, const int32_t *off,
                                          const float *dscore, const float *qn, int S, int k,
                                          int dk, int col0, int CW) {
    __shared__ float part[SUBKEY_THREADS];   // (R, CW)
    int key = blockIdx.x, p0 = off[key], p1 = off[key + 1];
    // the whole block leaves together: no records, or a hot key (the segment kernels')
    if (p0 == p1 || p1 - p0 > SUBKEY_SEG) return;
    subkey_sum(dkey + (size_t)key * (dk / 2), 1, part, idx, p0, p1, dscore, qn, S, k, dk, col0,
               CW);
}

// Per segment of a hot key (a block each, looping): its sum from zero into pseg (segments,
// half)
static __global__ void subkey_grad_seg_kernel(float *pseg, mp_hot_keys hot, const int32_t *idx,
                                              const float *dscore, const float *qn, int S, int k,
                                              int dk, int col0, int CW) {
    __shared__ float part[SUBKEY_THREADS];
    for (int s = blockIdx.x; s < hot.count[1]; s += gridDim.x) {
        int p0 = hot.seg_begin[s], p1 = hot.seg_end[s];
        subkey_sum(pseg + (size_t)s * (dk / 2), 0, part, idx, p0, p1, dscore, qn, S, k, dk, col0,
                   CW);
    }
}

// Per (hot key, column): dkey += the key's segment sums in segment order
static __global__ void subkey_grad_hot_kernel(float *dkey, const float *pseg, mp_hot_keys hot,
                                              int half) {
    int64_t items = (int64_t)hot.count[0] * half, stride = (int64_t)gridDim.x * blockDim.x;
    for (int64_t it = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; it < items; it += stride) {
        int h = (int)(it / half), c = (int)(it % half);
        float *d = dkey + (size_t)hot.key[h] * half + c, s = *d;
        for (int j = hot.first[h], e = j + hot.nseg[h]; j < e; j++) s += pseg[(size_t)j * half + c];
        *d = s;
    }
}

// dkey += the sub-key gradients of the records grouped by key (idx, off from the sort), the
// hot keys' segments after the rest
static void subkey_grad(float *dkey, const int32_t *idx, const int32_t *off, const float *dscore,
                        const float *qn, int64_t R, int n, int S, int k, int dk, int col0,
                        int cw) {
    subkey_grad_kernel<<<n, SUBKEY_THREADS>>>(dkey, idx, off, dscore, qn, S, k, dk, col0, cw);
    KERNEL_CHECK();
    if (R <= SUBKEY_SEG) return;   // no key can be hot
    int half = dk / 2;
    mp_hot_keys hot = mp_cuda_plan_hot_keys(off, n, R, SUBKEY_SEG);
    float *pseg = (float *)mp_cuda_scratch(SCR_HOT_PART, (size_t)hot.max_seg * half * sizeof(float));
    unsigned nb = (unsigned)(hot.max_seg < 65535 ? hot.max_seg : 65535);
    subkey_grad_seg_kernel<<<nb, SUBKEY_THREADS>>>(pseg, hot, idx, dscore, qn, S, k, dk, col0,
                                                   cw);
    KERNEL_CHECK();
    size_t items = (size_t)hot.max_seg * half;   // hot keys: no more than segments
    subkey_grad_hot_kernel<<<mp_blocks(items < 65535 * 256 ? items : 65535 * 256, 256), 256>>>(
        dkey, pseg, hot, half);
    KERNEL_CHECK();
}

// part (nblk, 2, HD): per block of rows, the sums of dqn and of dqn * xhat in double
static __global__ void bn_backward_partial_kernel(double *part, const float *dq, const float *q,
                                                  const float *mean, const float *rstd, int N,
                                                  int HD, int rows_per) {
    int j = blockIdx.x * blockDim.x + threadIdx.x, kb = blockIdx.y;
    if (j >= HD) return;
    int n1 = min(N, (kb + 1) * rows_per);
    double sdy = 0.0, sdyx = 0.0;
    for (int i = kb * rows_per; i < n1; i++) {
        size_t o = (size_t)i * HD + j;
        float g = dq[o];
        sdy += g;
        sdyx += g * ((q[o] - mean[j]) * rstd[j]);
    }
    part[(size_t)kb * 2 * HD + j] = sdy;
    part[(size_t)kb * 2 * HD + HD + j] = sdyx;
}

// sums (2, HD) from the partials; the BN parameter gradients get the local part
static __global__ void bn_backward_sums_kernel(double *sums, float *dbn_w, float *dbn_b,
                                               const double *part, int nblk, int HD) {
    int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= HD) return;
    double sdy = 0.0, sdyx = 0.0;
    for (int kb = 0; kb < nblk; kb++) {
        sdy += part[(size_t)kb * 2 * HD + j];
        sdyx += part[(size_t)kb * 2 * HD + HD + j];
    }
    dbn_w[j] += (float)sdyx;   // dense gradients are all-reduced later
    dbn_b[j] += (float)sdy;
    sums[j] = sdy;
    sums[HD + j] = sdyx;
}

static __global__ void bn_backward_apply_kernel(float *dq, const float *q, const float *w,
                                                const float *mean, const float *rstd,
                                                const double *sums, double count, int train,
                                                int N, int HD) {
    size_t o = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    if (o >= (size_t)N * HD) return;
    int j = (int)(o % HD);
    float r = rstd[j];
    if (train) {
        float xhat = (q[o] - mean[j]) * r;
        dq[o] = w[j] * r * (dq[o] - (float)(sums[j] / count) - xhat * (float)(sums[HD + j] / count));
    } else {
        dq[o] = dq[o] * w[j] * r;   // eval: the statistics are constants
    }
}

void mp_cuda_query_bn_backward_stats(double *sums, float *dw, float *db, const float *dqn,
                                     const float *q, const float *mean, const float *rstd, int N,
                                     int HD) {
    if (HD <= 0) return;
    int rows_per = mp_rows_per_block(N, BN_ROWS), nblk = N > 0 ? (N + rows_per - 1) / rows_per : 0;
    double *part = (double *)mp_cuda_scratch(SCR_COLSUM, (size_t)(nblk ? nblk : 1) * 2 * HD * sizeof(double));
    if (nblk) {
        bn_backward_partial_kernel<<<dim3(mp_blocks(HD, 128), nblk), 128>>>(part, dqn, q, mean,
                                                                            rstd, N, HD, rows_per);
        KERNEL_CHECK();
    }
    bn_backward_sums_kernel<<<mp_blocks(HD, 128), 128>>>(sums, dw, db, part, nblk, HD);
    KERNEL_CHECK();
}

void mp_cuda_query_bn_backward(float *dq, const float *q, const float *w, const float *mean,
                               const float *rstd, const double *sums, double count, int train,
                               int N, int HD) {
    size_t total = (size_t)(N > 0 ? N : 0) * (HD > 0 ? HD : 0);
    if (!total) return;
    bn_backward_apply_kernel<<<mp_blocks(total, 256), 256>>>(dq, q, w, mean, rstd, sums, count,
                                                             train, N, HD);
    KERNEL_CHECK();
}

void mp_cuda_retrieval_route_backward(float *dqn, float *dk1, float *dk2, float *dgate,
                                      const float *gate, const int32_t *sel_a,
                                      const int32_t *sel_b, const float *qn, const float *k1,
                                      const float *k2, int N, int H, int dk, int n, int k) {
    int half = dk / 2, S = H * k;
    if (N <= 0) return;
    long rows = (long)N * H;
    softmax_dq_kernel<<<mp_blocks((size_t)rows, TOPK_WARPS), 32 * TOPK_WARPS>>>(
        dqn, dgate, gate, sel_a, sel_b, k1, k2, rows, k, dk);
    KERNEL_CHECK();
    // sub-key gradients: records grouped by sub-key; CW columns (32, 64 or 128: a divisor of
    // SUBKEY_THREADS, so every thread has a record lane) by SUBKEY_THREADS / CW >= 2 lanes
    int cw = half <= 32 ? 32 : half <= 64 ? 64 : 128;
    const int32_t *idx, *off;
    int64_t R = (int64_t)N * S;
    mp_cuda_sort_by_key(sel_a, R, n, &idx, NULL, &off);
    subkey_grad(dk1, idx, off, dgate, qn, R, n, S, k, dk, 0, cw);
    mp_cuda_sort_by_key(sel_b, R, n, &idx, NULL, &off);
    subkey_grad(dk2, idx, off, dgate, qn, R, n, S, k, dk, half, cw);
}
