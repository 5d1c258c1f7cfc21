// PEER / PKM layer on the CPU (fp32, OpenBLAS + OpenMP): the reference implementation of
// the backend's retrieval ops. Route (where the token lives): query BatchNorm statistics
// and normalisation, sub-key scores (GEMM), product-key top-k, gate softmax; and their
// backward. Experts (where the rows live): partial outputs per received token; backward with
// expert gradients accumulated grouped by expert row (a counting sort of the records), so no
// two threads write one row and the sums happen in a fixed order: results are bitwise
// repeatable. Nothing here talks to other ranks: the BatchNorm sums come back as this rank's
// partial sums and src/model/route.c reduces them.
#include <math.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>
#include "backend/cpu/cpu.h"
#include "core/log.h"

// rows of sub-key scores computed per GEMM, bounds the (rows, n) scratch
#define SCORE_CHUNK_ELEMS (1L << 22)

// relu: 1 ReLU, 0 exact (erf) GELU
static inline float act_fwd(int relu, float x) {
    if (relu) return x > 0.0f ? x : 0.0f;
    return 0.5f * x * (1.0f + erff(x * (float)M_SQRT1_2));
}

static inline float act_grad(int relu, float x) {
    if (relu) return x > 0.0f ? 1.0f : 0.0f;
    float cdf = 0.5f * (1.0f + erff(x * (float)M_SQRT1_2));
    float pdf = expf(-0.5f * x * x) * 0.3989422804014327f;
    return cdf + x * pdf;
}

static inline float dot(const float *a, const float *b, int n) { return mp_dot8(a, b, n); }

static inline void axpy(float *y, float alpha, const float *x, int n) {
#pragma omp simd
    for (int i = 0; i < n; i++) y[i] += alpha * x[i];
}

// Is (va, ia) ranked before (vb, ib)? Higher score first, then lower index.
static inline int ranks_before(float va, long ia, float vb, long ib) {
    return va > vb || (va == vb && ia < ib);
}

// Inserts (val, idx) into the sorted list (vals, idxs) of length *len, capacity k.
static inline void topk_insert(float *vals, long *idxs, int *len, int k, float val, long idx) {
    int pos = *len;
    if (pos == k) {
        if (!ranks_before(val, idx, vals[k - 1], idxs[k - 1])) return;
        pos = k - 1;
    } else {
        (*len)++;
    }
    while (pos > 0 && ranks_before(val, idx, vals[pos - 1], idxs[pos - 1])) {
        vals[pos] = vals[pos - 1];
        idxs[pos] = idxs[pos - 1];
        pos--;
    }
    vals[pos] = val;
    idxs[pos] = idx;
}

void mp_topk(const float *s, int n, int k, float *vals, long *idxs) {
    int len = 0;
    for (int i = 0; i < n; i++) topk_insert(vals, idxs, &len, k, s[i], i);
}

void mp_product_topk(const float *s1, const float *s2, int n, int k, float *vals, long *experts,
                     int32_t *sub_a, int32_t *sub_b) {
    float va[k], vb[k], cv[k];
    long ia[k], ib[k], ce[k];
    mp_topk(s1, n, k, va, ia);
    mp_topk(s2, n, k, vb, ib);
    int len = 0;
    // Both lists are sorted, so a row (or the rest of a row) whose best sum is already
    // strictly below the current k-th score cannot enter.
    for (int i = 0; i < k; i++) {
        if (len == k && va[i] + vb[0] < cv[k - 1]) break;
        for (int j = 0; j < k; j++) {
            float sc = va[i] + vb[j];
            if (len == k && sc < cv[k - 1]) break;
            topk_insert(cv, ce, &len, k, sc, ia[i] * n + ib[j]);
        }
    }
    for (int j = 0; j < k; j++) {
        vals[j] = cv[j];
        experts[j] = ce[j];
        sub_a[j] = (int32_t)(ce[j] / n);
        sub_b[j] = (int32_t)(ce[j] % n);
    }
}

// Grow-only scratch of these ops, kept across calls (host memory). The ops run one at a
// time (the model calls them in sequence), so one set serves every layer.
static float *g_s1, *g_s2;          // (rows, n) sub-key scores of a chunk of queries
static float *g_bs1, *g_bs2;        // (rows, n) the same plus the balance biases
static int64_t *g_count, *g_begin, *g_items;   // bucketing of records by expert row
static int32_t *g_touched;
static float *g_dpre;               // (R) d(pre-activation) per record
static size_t g_cap_s1, g_cap_s2, g_cap_bs1, g_cap_bs2, g_cap_count, g_cap_begin, g_cap_items,
    g_cap_touched, g_cap_dpre;

// ---------------------------------------------------------------------------------------
// query BatchNorm: forward and backward side by side. Column sums run down one column per
// thread in row order, in double, so they are independent of the thread count.

void mp_cpu_query_bn_stats(double *sums, const float *q, const double *mean, int N, int HD) {
    // sums (HD), q (N, HD), mean (HD) or NULL
#pragma omp parallel for schedule(static)
    for (int j = 0; j < HD; j++) {
        double s = 0.0;
        if (mean) {
            double m = mean[j];
            for (int i = 0; i < N; i++) {
                double d = q[(size_t)i * HD + j] - m;
                s += d * d;
            }
        } else {
            for (int i = 0; i < N; i++) s += q[(size_t)i * HD + j];
        }
        sums[j] = s;
    }
}

void mp_cpu_query_bn_backward_stats(double *sums, float *dw, float *db, const float *dqn,
                                    const float *q, const float *mean, const float *rstd, int N,
                                    int HD) {
    // sums (2, HD): sum dqn, sum dqn * xhat
#pragma omp parallel for schedule(static)
    for (int j = 0; j < HD; j++) {
        float m = mean[j], r = rstd[j];
        double sum_dy = 0.0, sum_dyx = 0.0;
        for (int i = 0; i < N; i++) {
            size_t o = (size_t)i * HD + j;
            float g = dqn[o];
            sum_dy += g;
            sum_dyx += g * ((q[o] - m) * r);
        }
        dw[j] += (float)sum_dyx;   // local part; dense gradients are all-reduced later
        db[j] += (float)sum_dy;
        sums[j] = sum_dy;
        sums[HD + j] = sum_dyx;
    }
}

void mp_cpu_query_bn_forward(float *qn, const float *q, const float *w, const float *b,
                             const float *mean, const float *rstd, int N, int HD) {
#pragma omp parallel for schedule(static)
    for (int i = 0; i < N; i++) {
        for (int j = 0; j < HD; j++) {
            size_t o = (size_t)i * HD + j;
            qn[o] = w[j] * (q[o] - mean[j]) * rstd[j] + b[j];
        }
    }
}

void mp_cpu_query_bn_backward(float *dq, const float *q, const float *w, const float *mean,
                              const float *rstd, const double *sums, double count, int train,
                              int N, int HD) {
#pragma omp parallel for schedule(static)
    for (int i = 0; i < N; i++) {
        for (int j = 0; j < HD; j++) {
            size_t o = (size_t)i * HD + j;
            float wj = w[j], r = rstd[j];
            if (train) {
                float xhat = (q[o] - mean[j]) * r;
                // dxhat = w * dqn, so the sums of dxhat are w times the sums of dqn
                dq[o] = wj * r * (dq[o] - (float)(sums[j] / count) -
                                  xhat * (float)(sums[HD + j] / count));
            } else {
                dq[o] = dq[o] * wj * r;   // eval: the statistics are constants
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// route: sub-key scores, product-key top-k, gates; and its backward

void mp_cpu_retrieval_route(int32_t *sel, int32_t *sel_a, int32_t *sel_b, float *gate,
                            const float *qn, const float *k1, const float *k2,
                            const float *key_bias, int N, int H, int dk, int n, int k) {
    int half = dk / 2;
    long rows_total = (long)N * H;                       // one query per (token, head)
    long chunk = SCORE_CHUNK_ELEMS / n;                  // bounds the (chunk, n) scratch
    if (chunk < 1) chunk = 1;
    if (chunk > rows_total) chunk = rows_total;
    if (chunk < 1) return;
    size_t bytes = (size_t)chunk * n * sizeof(float);
    float *s1 = g_s1 = mp_grow(g_s1, &g_cap_s1, bytes);   // (chunk, n) plain scores
    float *s2 = g_s2 = mp_grow(g_s2, &g_cap_s2, bytes);   // (chunk, n)
    float *bs1 = NULL, *bs2 = NULL;                        // (chunk, n) biased scores
    if (key_bias) {
        bs1 = g_bs1 = mp_grow(g_bs1, &g_cap_bs1, bytes);
        bs2 = g_bs2 = mp_grow(g_bs2, &g_cap_bs2, bytes);
    }
    for (long r0 = 0; r0 < rows_total; r0 += chunk) {
        long n_rows = rows_total - r0 < chunk ? rows_total - r0 : chunk;
        // qn viewed as (N*H, dk): the first half of each row against K1, the second against K2
        mp_cpu_sgemm(0, 1, (int)n_rows, n, half, 1.0f, qn + r0 * dk, dk, k1, half, 0.0f, s1, n);
        mp_cpu_sgemm(0, 1, (int)n_rows, n, half, 1.0f, qn + r0 * dk + half, dk, k2, half, 0.0f,
                     s2, n);
#pragma omp parallel for schedule(static)
        for (long r = 0; r < n_rows; r++) {
            long row = r0 + r;                                   // = t*H + h
            float vals[k];
            long experts[k];
            size_t o = (size_t)row * k;
            const float *r1 = s1 + r * n, *r2 = s2 + r * n;   // (n) plain scores
            if (key_bias) {
                float *b1 = bs1 + r * n, *b2 = bs2 + r * n;        // (n) biased scores
                const float *kb = key_bias + (row % H) * n;        // this head's k1 biases
                for (int i = 0; i < n; i++) {
                    b1[i] = r1[i] + kb[i];
                    b2[i] = r2[i] + kb[(size_t)H * n + i];
                }
                mp_product_topk(b1, b2, n, k, vals, experts, sel_a + o, sel_b + o);
                // the gates are of the plain scores: the biases only steer the choice
                for (int j = 0; j < k; j++) vals[j] = r1[sel_a[o + j]] + r2[sel_b[o + j]];
            } else {
                mp_product_topk(r1, r2, n, k, vals, experts, sel_a + o, sel_b + o);
            }
            float mx = vals[0], sum = 0.0f;
            for (int j = 1; j < k; j++) mx = vals[j] > mx ? vals[j] : mx;
            for (int j = 0; j < k; j++) {
                gate[o + j] = expf(vals[j] - mx);
                sum += gate[o + j];
            }
            for (int j = 0; j < k; j++) {
                gate[o + j] /= sum;
                sel[o + j] = (int32_t)experts[j];
            }
        }
    }
}

void mp_cpu_retrieval_route_backward(float *dqn, float *dk1, float *dk2, float *dgate,
                                     const float *gate, const int32_t *sel_a,
                                     const int32_t *sel_b, const float *qn, const float *k1,
                                     const float *k2, int N, int H, int dk, int n, int k) {
    (void)n;
    int half = dk / 2, HD = H * dk, S = H * k;
    // softmax backward per head: dscore_j = g_j (dg_j - sum_i g_i dg_i), kept in dgate;
    // then the query gradient through the selected sub-keys
#pragma omp parallel for schedule(static)
    for (int t = 0; t < N; t++) {
        float *dqt = dqn + (size_t)t * HD;   // (HD) this token's heads
        memset(dqt, 0, HD * sizeof(float));
        for (int h = 0; h < H; h++) {
            size_t o = (size_t)t * S + (size_t)h * k;
            float gd = 0.0f;
            for (int j = 0; j < k; j++) gd += gate[o + j] * dgate[o + j];
            for (int j = 0; j < k; j++) {
                float ds = gate[o + j] * (dgate[o + j] - gd);
                dgate[o + j] = ds;
                axpy(dqt + h * dk, ds, k1 + (size_t)sel_a[o + j] * half, half);
                axpy(dqt + h * dk + half, ds, k2 + (size_t)sel_b[o + j] * half, half);
            }
        }
    }
    // sub-key gradients: parallel over key columns so each element has one writer and a
    // fixed summation order
#pragma omp parallel for schedule(static)
    for (int c = 0; c < half; c++) {
        for (long o = 0; o < (long)N * S; o++) {
            long t = o / S, h = (o % S) / k;
            const float *qt = qn + t * HD + h * dk;
            float ds = dgate[o];
            dk1[(size_t)sel_a[o] * half + c] += ds * qt[c];
            dk2[(size_t)sel_b[o] * half + c] += ds * qt[half + c];
        }
    }
}

void mp_cpu_subkey_counts(int32_t *counts, const int32_t *sel_a, const int32_t *sel_b, int N,
                          int H, int k, int n) {
    size_t Hn = (size_t)H * n;
    memset(counts, 0, 2 * Hn * sizeof(int32_t));
    for (long row = 0; row < (long)N * H; row++) {   // row = t*H + h
        int32_t *c = counts + (row % H) * n;
        for (int j = 0; j < k; j++) {
            c[sel_a[row * k + j]]++;
            c[Hn + sel_b[row * k + j]]++;
        }
    }
}

// ---------------------------------------------------------------------------------------
// experts: forward and backward. The CPU reads the fp32 tables (t->u, t->v) in every
// precision; the bf16 copies are the GPU's.

void mp_cpu_experts_forward(const mp_expert_tables *t, float *y, const float *x, int64_t M,
                            const int64_t *slot_start, const int32_t *slot, const int32_t *row,
                            const float *gate, float *pre, int64_t R, int C, int relu) {
    (void)slot;
    (void)R;
    const float *U = t->u, *V = t->v;   // (rows, C)
    int peer = U != NULL;
#pragma omp parallel for schedule(static)
    for (int64_t m = 0; m < M; m++) {
        float *ym = y + m * C;
        const float *xm = x + m * C;
        memset(ym, 0, C * sizeof(float));
        for (int64_t i = slot_start[m]; i < slot_start[m + 1]; i++) {
            long r = row[i];
            float w = gate[i];
            if (peer) {
                float h = dot(U + r * C, xm, C);
                pre[i] = h;
                w *= act_fwd(relu, h);
            }
            axpy(ym, w, V + r * C, C);
        }
    }
}

static int cmp_i32(const void *a, const void *b) {
    int32_t x = *(const int32_t *)a, y = *(const int32_t *)b;
    return (x > y) - (x < y);
}

// sum of squares of x (n) in double, in element order (each product is exact in double)
static double row_sum_squares(const float *x, int n) {
    double s = 0.0;
    for (int i = 0; i < n; i++) s += (double)x[i] * x[i];
    return s;
}

// Columns [c0, c1) of row r's dU and dV: its records (items[p0 .. p1)) added in order, from
// zero in overwrite mode
#define ROW_GRAD_COLS 64   // columns per thread when a hot row's columns are split
static void row_grad(const mp_expert_tables *t, long r, int c0, int c1, int64_t p0, int64_t p1,
                     const int64_t *items, const float *dy, const float *x, const int32_t *slot,
                     const float *gate, const float *pre, const float *dpre, int C, int relu,
                     int overwrite) {
    int peer = t->u != NULL, w = c1 - c0;
    float *dv = t->dv + r * C + c0;
    float *du = peer ? t->du + r * C + c0 : NULL;
    if (overwrite) {
        memset(dv, 0, (size_t)w * sizeof(float));
        if (peer) memset(du, 0, (size_t)w * sizeof(float));
    }
    for (int64_t p = p0; p < p1; p++) {
        int64_t i = items[p], m = slot[i];
        float g = gate[i];
        if (peer) {
            g *= act_fwd(relu, pre[i]);
            axpy(du, dpre[i], x + m * C + c0, w);
        }
        axpy(dv, g, dy + m * C + c0, w);
    }
}

// dU and dV, one expert row at a time: records are bucketed by row (a stable counting
// sort over the touched rows), so each row sums its records in arrival order. overwrite:
// a touched row starts from zero (0 + a == a: the same bits as zeroing first), and a dirty
// row without records is zeroed.
static void expert_grads(const mp_expert_tables *t, const float *dy, const float *x,
                         const int32_t *slot, const int32_t *row, const float *gate,
                         const float *pre, const float *dpre, int64_t R, int C, int relu,
                         int overwrite, double *row_ss) {
    int peer = t->u != NULL;
    uint8_t *dirty = t->dirty;   // (rows)
    size_t nr = (size_t)(R ? R : 1);
    int64_t *cnt = g_count = mp_grow(g_count, &g_cap_count, (size_t)(t->rows ? t->rows : 1) * sizeof(int64_t));   // (rows)
    int64_t *begin = g_begin = mp_grow(g_begin, &g_cap_begin, (nr + 1) * sizeof(int64_t));   // (touched+1)
    int64_t *items = g_items = mp_grow(g_items, &g_cap_items, nr * sizeof(int64_t));         // (R)
    int32_t *touched = g_touched = mp_grow(g_touched, &g_cap_touched, nr * sizeof(int32_t)); // (touched)
    // only the rows this batch touches are visited, so the cost is O(R log R), not O(rows)
    for (int64_t i = 0; i < R; i++) cnt[row[i]] = 0;
    long n_touched = 0;
    for (int64_t i = 0; i < R; i++)
        if (cnt[row[i]]++ == 0) touched[n_touched++] = row[i];
    qsort(touched, (size_t)n_touched, sizeof(int32_t), cmp_i32);
    int64_t acc = 0;
    for (long k = 0; k < n_touched; k++) {   // cnt[r] becomes the fill position of row r
        int64_t c = cnt[touched[k]];
        begin[k] = acc;
        cnt[touched[k]] = acc;
        acc += c;
    }
    begin[n_touched] = acc;
    for (int64_t i = 0; i < R; i++) items[cnt[row[i]]++] = i;
    if (overwrite) {   // the rows without records: one pass over the flags, touched ones 2
        for (long k = 0; k < n_touched; k++) dirty[touched[k]] = 2;
#pragma omp parallel for schedule(static)
        for (long r = 0; r < t->rows; r++) {
            if (dirty[r] == 2) continue;
            if (dirty[r]) {
                if (peer) memset(t->du + (size_t)r * C, 0, (size_t)C * sizeof(float));
                memset(t->dv + (size_t)r * C, 0, (size_t)C * sizeof(float));
                dirty[r] = 0;
            }
            if (row_ss) row_ss[r] = 0.0;
        }
    }
    // A row with more than a thread's share of the records (a collapsed router's: all of them
    // on k rows) would keep one thread busy while the others wait, so its columns are split
    // among the threads instead. Each element still sums the row's records in order, so the
    // bits are the same either way.
    int64_t hot = R / omp_get_max_threads() + 1;
    int nblk = (C + ROW_GRAD_COLS - 1) / ROW_GRAD_COLS;
#pragma omp parallel for schedule(dynamic, 16)
    for (long k = 0; k < n_touched; k++) {
        long r = touched[k];
        if (begin[k + 1] - begin[k] >= hot) continue;
        row_grad(t, r, 0, C, begin[k], begin[k + 1], items, dy, x, slot, gate, pre, dpre, C,
                 relu, overwrite);
        dirty[r] = 1;
        if (row_ss)
            row_ss[r] = (peer ? row_sum_squares(t->du + r * C, C) : 0.0) +
                        row_sum_squares(t->dv + r * C, C);
    }
    for (long k = 0; k < n_touched; k++) {
        long r = touched[k];
        if (begin[k + 1] - begin[k] < hot) continue;
#pragma omp parallel for schedule(static)
        for (int b = 0; b < nblk; b++)
            row_grad(t, r, b * ROW_GRAD_COLS, b + 1 < nblk ? (b + 1) * ROW_GRAD_COLS : C,
                     begin[k], begin[k + 1], items, dy, x, slot, gate, pre, dpre, C, relu,
                     overwrite);
        dirty[r] = 1;
        if (row_ss)
            row_ss[r] = (peer ? row_sum_squares(t->du + r * C, C) : 0.0) +
                        row_sum_squares(t->dv + r * C, C);
    }
}

void mp_cpu_experts_backward(const mp_expert_tables *t, float *dx, float *dgate, const float *dy,
                             const float *x, int64_t M, const int64_t *slot_start,
                             const int32_t *slot, const int32_t *row, const float *gate,
                             const float *pre, int64_t R, int C, int relu, int overwrite,
                             double *row_ss) {
    const float *U = t->u, *V = t->v;   // (rows, C)
    int peer = U != NULL;
    float *dpre = g_dpre = mp_grow(g_dpre, &g_cap_dpre, (size_t)(R ? R : 1) * sizeof(float));   // (R)
#pragma omp parallel for schedule(static)
    for (int64_t m = 0; m < M; m++) {
        const float *dym = dy + m * C;
        float *dxm = dx + m * C;
        memset(dxm, 0, C * sizeof(float));
        for (int64_t i = slot_start[m]; i < slot_start[m + 1]; i++) {
            long r = row[i];
            float dv_dot = dot(dym, V + r * C, C);
            if (peer) {
                float h = pre[i];
                dgate[i] = act_fwd(relu, h) * dv_dot;
                dpre[i] = gate[i] * dv_dot * act_grad(relu, h);
                axpy(dxm, dpre[i], U + r * C, C);
            } else {
                dgate[i] = dv_dot;
            }
        }
    }
    expert_grads(t, dy, x, slot, row, gate, pre, dpre, R, C, relu, overwrite, row_ss);
}
