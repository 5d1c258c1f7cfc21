// PEER / PKM layer on the CPU (fp32, OpenBLAS + OpenMP): the reference implementation of
// the backend's four retrieval ops. Route (where the token lives): query projection,
// query BatchNorm over the global batch, sub-key scores (GEMM), product-key top-k, gate
// softmax; and its backward. Experts (where the rows live): partial outputs per received
// token; backward with expert gradients accumulated grouped by expert row (a counting sort
// of the records), so no two threads write one row and the sums happen in a fixed order:
// results are bitwise repeatable.
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include "backend/cpu/cpu.h"
#include "core/log.h"
#include "model/retrieval.h"

// rows of sub-key scores computed per GEMM, bounds the (rows, n) scratch
#define SCORE_CHUNK_ELEMS (1L << 22)

static inline float act_fwd(mp_activation a, float x) {
    if (a == MP_ACT_RELU) return x > 0.0f ? x : 0.0f;
    return 0.5f * x * (1.0f + erff(x * (float)M_SQRT1_2));
}

static inline float act_grad(mp_activation a, float x) {
    if (a == MP_ACT_RELU) return x > 0.0f ? 1.0f : 0.0f;
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

// Sums over ranks of the (n) doubles in buf; a single process has nothing to add.
static void allreduce(mp_retrieval_layer *l, double *buf, size_t n) {
    if (l->comm && l->comm->size > 1) l->comm->allreduce_f64(l->comm, buf, n);
}

// Query BatchNorm forward from l->q into l->qn (N, HD). Training statistics are over the
// global batch: column sums are reduced across ranks, then the centred squares.
static void query_bn_forward(mp_retrieval_layer *l, int N, int train) {
    const mp_retrieval_config *rc = l->rc;
    int HD = rc->heads * rc->key_dim;
    if (!rc->query_bn) {
        memcpy(l->qn, l->q, (size_t)N * HD * sizeof(float));
        return;
    }
    if (train) {
        double *sum = mp_calloc((size_t)HD + 1, sizeof(double));   // (HD) column sums, count
        double *sq = mp_calloc((size_t)HD, sizeof(double));        // (HD) centred squares
#pragma omp parallel for schedule(static)
        for (int j = 0; j < HD; j++)
            for (int i = 0; i < N; i++) sum[j] += l->q[(size_t)i * HD + j];
        sum[HD] = N;
        allreduce(l, sum, HD + 1);
        double count = sum[HD];
#pragma omp parallel for schedule(static)
        for (int j = 0; j < HD; j++) {
            double m = sum[j] / count;
            for (int i = 0; i < N; i++) {
                double d = l->q[(size_t)i * HD + j] - m;
                sq[j] += d * d;
            }
        }
        allreduce(l, sq, HD);
        float mo = rc->bn_momentum;
        for (int j = 0; j < HD; j++) {
            float mean = (float)(sum[j] / count), var = (float)(sq[j] / count);
            float unbiased = count > 1 ? (float)(sq[j] / (count - 1)) : var;
            l->running_mean[j] = (1.0f - mo) * l->running_mean[j] + mo * mean;
            l->running_var[j] = (1.0f - mo) * l->running_var[j] + mo * unbiased;
            l->bn_mean[j] = mean;
            l->bn_rstd[j] = 1.0f / sqrtf(var + rc->bn_eps);
        }
        l->bn_count = count;
        free(sum);
        free(sq);
    } else {
        for (int j = 0; j < HD; j++) {
            l->bn_mean[j] = l->running_mean[j];
            l->bn_rstd[j] = 1.0f / sqrtf(l->running_var[j] + rc->bn_eps);
        }
    }
#pragma omp parallel for schedule(static)
    for (int i = 0; i < N; i++) {
        for (int j = 0; j < HD; j++) {
            size_t o = (size_t)i * HD + j;
            l->qn[o] = l->bn_w[j] * (l->q[o] - l->bn_mean[j]) * l->bn_rstd[j] + l->bn_b[j];
        }
    }
}

// Sub-key scores and product-key top-k for every (token, head); fills sel, sel_a, sel_b
// and gate (softmax of the selected scores). With key_bias the top-k ranks the biased
// scores, and the gates use the plain ones.
static void retrieve(mp_retrieval_layer *l, int N) {
    const mp_retrieval_config *rc = l->rc;
    int H = rc->heads, k = rc->topk, dk = rc->key_dim, half = dk / 2, n = rc->n_sub;
    long rows_total = (long)N * H;                       // one query per (token, head)
    long chunk = SCORE_CHUNK_ELEMS / n;
    if (chunk < 1) chunk = 1;
    if (chunk > rows_total) chunk = rows_total;
    mp_retrieval_scratch *w = &l->scratch;
    float *s1 = w->s1 = mp_grow(w->s1, &w->cap_s1, (size_t)chunk * n * sizeof(float));   // (chunk, n)
    float *s2 = w->s2 = mp_grow(w->s2, &w->cap_s2, (size_t)chunk * n * sizeof(float));   // (chunk, n)
    float *bs1 = NULL, *bs2 = NULL;                      // (chunk, n) biased scores
    if (l->key_bias) {
        bs1 = w->bs1 = mp_grow(w->bs1, &w->cap_bs1, (size_t)chunk * n * sizeof(float));
        bs2 = w->bs2 = mp_grow(w->bs2, &w->cap_bs2, (size_t)chunk * n * sizeof(float));
    }
    for (long r0 = 0; r0 < rows_total; r0 += chunk) {
        long n_rows = rows_total - r0 < chunk ? rows_total - r0 : chunk;
        // qn viewed as (N*H, dk): the first half of each row against K1, the second against K2
        mp_cpu_sgemm(0, 1, (int)n_rows, n, half, 1.0f, l->qn + r0 * dk, dk, l->k1, half, 0.0f, s1, n);
        mp_cpu_sgemm(0, 1, (int)n_rows, n, half, 1.0f, l->qn + r0 * dk + half, dk, l->k2, half, 0.0f,
                     s2, n);
#pragma omp parallel for schedule(static)
        for (long r = 0; r < n_rows; r++) {
            long row = r0 + r;                                   // = t*H + h
            float vals[k];
            long experts[k];
            size_t o = (size_t)row * k;
            const float *r1 = s1 + r * n, *r2 = s2 + r * n;   // (n) plain scores
            if (l->key_bias) {
                float *b1 = bs1 + r * n, *b2 = bs2 + r * n;        // (n) biased scores
                const float *kb = l->key_bias + (row % H) * n;     // this head's k1 biases
                for (int i = 0; i < n; i++) {
                    b1[i] = r1[i] + kb[i];
                    b2[i] = r2[i] + kb[(size_t)H * n + i];
                }
                mp_product_topk(b1, b2, n, k, vals, experts, l->sel_a + o, l->sel_b + o);
                for (int j = 0; j < k; j++) vals[j] = r1[l->sel_a[o + j]] + r2[l->sel_b[o + j]];
            } else {
                mp_product_topk(r1, r2, n, k, vals, experts, l->sel_a + o, l->sel_b + o);
            }
            float mx = vals[0], sum = 0.0f;
            for (int j = 1; j < k; j++) mx = vals[j] > mx ? vals[j] : mx;
            for (int j = 0; j < k; j++) {
                l->gate[o + j] = expf(vals[j] - mx);
                sum += l->gate[o + j];
            }
            for (int j = 0; j < k; j++) {
                l->gate[o + j] /= sum;
                l->sel[o + j] = (int32_t)experts[j];
            }
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

void mp_cpu_retrieval_route(mp_retrieval_layer *l, const float *x, int N, int train) {
    const mp_retrieval_config *rc = l->rc;
    int C = l->C, HD = rc->heads * rc->key_dim;
    if (N > l->maxN) mp_fatal("retrieval layer: %d rows exceed the %d it was built for", N, l->maxN);
    mp_cpu_sgemm(0, 1, N, HD, C, 1.0f, x, C, l->wq, C, 0.0f, l->q, HD);
    query_bn_forward(l, N, train);
    retrieve(l, N);
}

void mp_cpu_experts_forward(mp_retrieval_layer *l, float *y, const float *x, int64_t M,
                            const int64_t *slot_start, const int32_t *slot, const int32_t *row,
                            const float *gate, float *pre, int64_t R) {
    (void)slot;
    (void)R;
    int C = l->C, peer = l->kind == MP_FFN_PEER;
    mp_activation act = l->rc->activation;
#pragma omp parallel for schedule(static)
    for (int64_t m = 0; m < M; m++) {
        float *ym = y + m * C;
        const float *xm = x + m * C;
        memset(ym, 0, C * sizeof(float));
        for (int64_t i = slot_start[m]; i < slot_start[m + 1]; i++) {
            long r = row[i];
            float w = gate[i];
            if (peer) {
                float h = dot(l->u + r * C, xm, C);
                pre[i] = h;
                w *= act_fwd(act, h);
            }
            axpy(ym, w, l->v + r * C, C);
        }
    }
}

static int cmp_i32(const void *a, const void *b) {
    int32_t x = *(const int32_t *)a, y = *(const int32_t *)b;
    return (x > y) - (x < y);
}

// dU and dV, one expert row at a time: records are bucketed by row (a stable counting
// sort over the touched rows), so each row sums its records in arrival order.
static void expert_grads(mp_retrieval_layer *l, const float *dy, const float *x,
                         const int32_t *slot, const int32_t *row, const float *gate,
                         const float *pre, const float *dpre, int64_t R) {
    int C = l->C, peer = l->kind == MP_FFN_PEER;
    mp_activation act = l->rc->activation;
    mp_retrieval_scratch *w = &l->scratch;
    size_t nr = (size_t)(R ? R : 1);
    int64_t *cnt = w->count = mp_grow(w->count, &w->cap_count, (size_t)l->rows * sizeof(int64_t));  // (rows)
    int64_t *begin = w->begin = mp_grow(w->begin, &w->cap_begin, (nr + 1) * sizeof(int64_t));  // (touched+1)
    int64_t *items = w->items = mp_grow(w->items, &w->cap_items, nr * sizeof(int64_t));     // (R)
    int32_t *touched = w->touched = mp_grow(w->touched, &w->cap_touched, nr * sizeof(int32_t));
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
#pragma omp parallel for schedule(dynamic, 16)
    for (long k = 0; k < n_touched; k++) {
        long r = touched[k];
        float *dv = l->dv + r * C;
        float *du = peer ? l->du + r * C : NULL;
        for (int64_t p = begin[k]; p < begin[k + 1]; p++) {
            int64_t i = items[p], m = slot[i];
            float g = gate[i];
            if (peer) {
                g *= act_fwd(act, pre[i]);
                axpy(du, dpre[i], x + m * C, C);
            }
            axpy(dv, g, dy + m * C, C);
        }
    }
}

void mp_cpu_experts_backward(mp_retrieval_layer *l, float *dx, float *dgate, const float *dy,
                             const float *x, int64_t M, const int64_t *slot_start,
                             const int32_t *slot, const int32_t *row, const float *gate,
                             const float *pre, int64_t R) {
    int C = l->C, peer = l->kind == MP_FFN_PEER;
    mp_activation act = l->rc->activation;
    mp_retrieval_scratch *w = &l->scratch;
    float *dpre = w->dpre = mp_grow(w->dpre, &w->cap_dpre, (size_t)(R ? R : 1) * sizeof(float));   // (R)
#pragma omp parallel for schedule(static)
    for (int64_t m = 0; m < M; m++) {
        const float *dym = dy + m * C;
        float *dxm = dx + m * C;
        memset(dxm, 0, C * sizeof(float));
        for (int64_t i = slot_start[m]; i < slot_start[m + 1]; i++) {
            long r = row[i];
            float dv_dot = dot(dym, l->v + r * C, C);
            if (peer) {
                float h = pre[i];
                dgate[i] = act_fwd(act, h) * dv_dot;
                dpre[i] = gate[i] * dv_dot * act_grad(act, h);
                axpy(dxm, dpre[i], l->u + r * C, C);
            } else {
                dgate[i] = dv_dot;
            }
        }
    }
    expert_grads(l, dy, x, slot, row, gate, pre, dpre, R);
}

// Query BatchNorm backward: l->dq holds d(qn) on entry and d(q) on exit. In training the
// two column sums the formula needs are over the global batch.
static void query_bn_backward(mp_retrieval_layer *l, int N) {
    const mp_retrieval_config *rc = l->rc;
    if (!rc->query_bn) return;
    int HD = rc->heads * rc->key_dim;
    double *sums = mp_calloc(2 * (size_t)HD, sizeof(double));   // sum dqn, sum dqn*xhat
#pragma omp parallel for schedule(static)
    for (int j = 0; j < HD; j++) {
        float mean = l->bn_mean[j], rstd = l->bn_rstd[j];
        double sum_dy = 0.0, sum_dyx = 0.0;
        for (int i = 0; i < N; i++) {
            size_t o = (size_t)i * HD + j;
            float g = l->dq[o];
            sum_dy += g;
            sum_dyx += g * ((l->q[o] - mean) * rstd);
        }
        l->dbn_w[j] += (float)sum_dyx;   // local part; dense gradients are all-reduced later
        l->dbn_b[j] += (float)sum_dy;
        sums[j] = sum_dy;
        sums[HD + j] = sum_dyx;
    }
    if (l->last_train) allreduce(l, sums, 2 * (size_t)HD);
    double count = l->bn_count;
#pragma omp parallel for schedule(static)
    for (int i = 0; i < N; i++) {
        for (int j = 0; j < HD; j++) {
            size_t o = (size_t)i * HD + j;
            float w = l->bn_w[j], rstd = l->bn_rstd[j];
            if (l->last_train) {
                float xhat = (l->q[o] - l->bn_mean[j]) * rstd;
                // dxhat = w * dqn, so the sums of dxhat are w times the sums of dqn
                l->dq[o] = w * rstd * (l->dq[o] - (float)(sums[j] / count) -
                                       xhat * (float)(sums[HD + j] / count));
            } else {
                l->dq[o] = l->dq[o] * w * rstd;   // eval: the statistics are constants
            }
        }
    }
    free(sums);
}

void mp_cpu_retrieval_route_backward(mp_retrieval_layer *l, float *dx, const float *x, int N) {
    const mp_retrieval_config *rc = l->rc;
    int C = l->C, H = rc->heads, k = rc->topk, dk = rc->key_dim, half = dk / 2;
    int HD = H * dk, S = H * k;
    // softmax backward per head: dscore_j = g_j (dg_j - sum_i g_i dg_i), kept in dgate;
    // then the query gradient through the selected sub-keys
#pragma omp parallel for schedule(static)
    for (int t = 0; t < N; t++) {
        float *dqt = l->dq + (size_t)t * HD;
        memset(dqt, 0, HD * sizeof(float));
        for (int h = 0; h < H; h++) {
            size_t o = (size_t)t * S + (size_t)h * k;
            float gd = 0.0f;
            for (int j = 0; j < k; j++) gd += l->gate[o + j] * l->dgate[o + j];
            for (int j = 0; j < k; j++) {
                float ds = l->gate[o + j] * (l->dgate[o + j] - gd);
                l->dgate[o + j] = ds;
                axpy(dqt + h * dk, ds, l->k1 + (size_t)l->sel_a[o + j] * half, half);
                axpy(dqt + h * dk + half, ds, l->k2 + (size_t)l->sel_b[o + j] * half, half);
            }
        }
    }
    // sub-key gradients: parallel over key columns so each element has one writer and a
    // fixed summation order
#pragma omp parallel for schedule(static)
    for (int c = 0; c < half; c++) {
        for (long o = 0; o < (long)N * S; o++) {
            long t = o / S, h = (o % S) / k;
            const float *qt = l->qn + t * HD + h * dk;
            float ds = l->dgate[o];
            l->dk1[(size_t)l->sel_a[o] * half + c] += ds * qt[c];
            l->dk2[(size_t)l->sel_b[o] * half + c] += ds * qt[half + c];
        }
    }
    query_bn_backward(l, N);
    mp_cpu_sgemm(1, 0, HD, C, N, 1.0f, l->dq, HD, x, C, 1.0f, l->dwq, C);
    mp_cpu_sgemm(0, 0, N, C, HD, 1.0f, l->dq, HD, l->wq, C, 1.0f, dx, C);
}
