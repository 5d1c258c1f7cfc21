// PEER / PKM layer on the CPU (fp32, OpenBLAS + OpenMP): the reference implementation.
// Forward: query projection, query BatchNorm, sub-key scores (GEMM), product-key top-k,
// gate softmax, experts. Backward: the same in reverse. Expert gradients are accumulated
// grouped by expert row (a counting sort of the selections), so no two threads write one
// row and the sums happen in a fixed order: results are bitwise repeatable.
#include <cblas.h>
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

static inline float dot(const float *a, const float *b, int n) {
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (int i = 0; i < n; i++) s += a[i] * b[i];
    return s;
}

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

// Query BatchNorm forward, in place from l->q into l->qn. (N, HD)
static void query_bn_forward(mp_retrieval_layer *l, int N, int train) {
    const mp_retrieval_config *rc = l->rc;
    int HD = rc->heads * rc->key_dim;
    if (!rc->query_bn) {
        memcpy(l->qn, l->q, (size_t)N * HD * sizeof(float));
        return;
    }
#pragma omp parallel for schedule(static)
    for (int j = 0; j < HD; j++) {
        float mean, var;
        if (train) {
            double s = 0.0, ss = 0.0;
            for (int i = 0; i < N; i++) s += l->q[(size_t)i * HD + j];
            double m = s / N;
            for (int i = 0; i < N; i++) {
                double d = l->q[(size_t)i * HD + j] - m;
                ss += d * d;
            }
            mean = (float)m;
            var = (float)(ss / N);
            float mo = rc->bn_momentum;
            l->running_mean[j] = (1.0f - mo) * l->running_mean[j] + mo * mean;
            float unbiased = N > 1 ? (float)(ss / (N - 1)) : var;
            l->running_var[j] = (1.0f - mo) * l->running_var[j] + mo * unbiased;
        } else {
            mean = l->running_mean[j];
            var = l->running_var[j];
        }
        float rstd = 1.0f / sqrtf(var + rc->bn_eps);
        l->bn_mean[j] = mean;
        l->bn_rstd[j] = rstd;
        for (int i = 0; i < N; i++) {
            size_t o = (size_t)i * HD + j;
            l->qn[o] = l->bn_w[j] * (l->q[o] - mean) * rstd + l->bn_b[j];
        }
    }
}

// Sub-key scores and product-key top-k for every (token, head); fills sel, sel_a, sel_b
// and gate (softmax of the selected scores).
static void retrieve(mp_retrieval_layer *l, int N) {
    const mp_retrieval_config *rc = l->rc;
    int H = rc->heads, k = rc->topk, dk = rc->key_dim, half = dk / 2, n = rc->n_sub;
    long rows_total = (long)N * H;                       // one query per (token, head)
    long chunk = SCORE_CHUNK_ELEMS / n;
    if (chunk < 1) chunk = 1;
    if (chunk > rows_total) chunk = rows_total;
    float *s1 = mp_malloc((size_t)chunk * n * sizeof(float));   // (chunk, n)
    float *s2 = mp_malloc((size_t)chunk * n * sizeof(float));   // (chunk, n)
    for (long r0 = 0; r0 < rows_total; r0 += chunk) {
        long rc_ = rows_total - r0 < chunk ? rows_total - r0 : chunk;
        // qn viewed as (N*H, dk): the first half of each row against K1, the second against K2
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)rc_, n, half, 1.0f,
                    l->qn + r0 * dk, dk, l->k1, half, 0.0f, s1, n);
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)rc_, n, half, 1.0f,
                    l->qn + r0 * dk + half, dk, l->k2, half, 0.0f, s2, n);
#pragma omp parallel for schedule(static)
        for (long r = 0; r < rc_; r++) {
            long row = r0 + r;                                   // = t*H + h
            float vals[k];
            long experts[k];
            size_t o = (size_t)row * k;
            mp_product_topk(s1 + r * n, s2 + r * n, n, k, vals, experts, l->sel_a + o, l->sel_b + o);
            float mx = vals[0], sum = 0.0f;
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
    free(s1);
    free(s2);
}

void mp_cpu_retrieval_forward(mp_retrieval_layer *l, float *y, const float *x, int N, int train) {
    const mp_retrieval_config *rc = l->rc;
    int C = l->C, HD = rc->heads * rc->key_dim, S = rc->heads * rc->topk;
    if (N > l->maxN) mp_fatal("retrieval layer: %d rows exceed the %d it was built for", N, l->maxN);
    l->last_N = N;
    l->last_train = train;
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, N, HD, C, 1.0f, x, C, l->wq, C, 0.0f,
                l->q, HD);
    query_bn_forward(l, N, train);
    retrieve(l, N);

    int peer = l->kind == MP_FFN_PEER;
#pragma omp parallel for schedule(static)
    for (int t = 0; t < N; t++) {
        float *yt = y + (size_t)t * C;
        const float *xt = x + (size_t)t * C;
        memset(yt, 0, C * sizeof(float));
        for (int s = 0; s < S; s++) {
            size_t o = (size_t)t * S + s;
            long r = l->sel[o] - l->row_start;
            float w = l->gate[o];
            if (peer) {
                float h = dot(l->u + r * C, xt, C);
                l->pre[o] = h;
                w *= act_fwd(rc->activation, h);
            }
            axpy(yt, w, l->v + r * C, C);
        }
    }
    if (l->usage) {
        for (size_t o = 0; o < (size_t)N * S; o++) l->usage[l->sel[o]] += l->gate[o];
    }
}

// dU and dV, one expert row at a time: selections are bucketed by row with a counting sort
// (stable, so each row sums its selections in token order).
static void expert_grads(mp_retrieval_layer *l, const float *dy, const float *x, int N) {
    const mp_retrieval_config *rc = l->rc;
    int C = l->C, S = rc->heads * rc->topk;
    long total = (long)N * S;
    int32_t *start = mp_calloc((size_t)l->rows + 1, sizeof(int32_t));   // (rows+1)
    int32_t *items = mp_malloc((size_t)total * sizeof(int32_t));          // (N*S)
    int32_t *touched = mp_malloc((size_t)total * sizeof(int32_t));
    for (long o = 0; o < total; o++) start[l->sel[o] - l->row_start + 1]++;
    long n_touched = 0;
    for (long r = 0; r < l->rows; r++) {
        if (start[r + 1] > 0) touched[n_touched++] = (int32_t)r;
        start[r + 1] += start[r];
    }
    int32_t *fill = mp_malloc((size_t)l->rows * sizeof(int32_t));
    memcpy(fill, start, (size_t)l->rows * sizeof(int32_t));
    for (long o = 0; o < total; o++) items[fill[l->sel[o] - l->row_start]++] = (int32_t)o;
    free(fill);

    int peer = l->kind == MP_FFN_PEER;
#pragma omp parallel for schedule(dynamic, 16)
    for (long i = 0; i < n_touched; i++) {
        long r = touched[i];
        float *dv = l->dv + r * C;
        float *du = peer ? l->du + r * C : NULL;
        for (int32_t p = start[r]; p < start[r + 1]; p++) {
            long o = items[p], t = o / S;
            float w = l->gate[o];
            if (peer) {
                w *= act_fwd(rc->activation, l->pre[o]);
                axpy(du, l->dpre[o], x + t * C, C);
            }
            axpy(dv, w, dy + t * C, C);
        }
    }
    free(start);
    free(items);
    free(touched);
}

// Query BatchNorm backward: l->dq holds d(qn) on entry and d(q) on exit.
static void query_bn_backward(mp_retrieval_layer *l, int N) {
    const mp_retrieval_config *rc = l->rc;
    if (!rc->query_bn) return;
    int HD = rc->heads * rc->key_dim;
#pragma omp parallel for schedule(static)
    for (int j = 0; j < HD; j++) {
        float mean = l->bn_mean[j], rstd = l->bn_rstd[j], w = l->bn_w[j];
        double sum_d = 0.0, sum_dx = 0.0;      // sums of dxhat and dxhat * xhat
        double sum_dy = 0.0, sum_dyx = 0.0;    // sums of dqn and dqn * xhat
        for (int i = 0; i < N; i++) {
            size_t o = (size_t)i * HD + j;
            float xhat = (l->q[o] - mean) * rstd;
            float g = l->dq[o];
            sum_dy += g;
            sum_dyx += g * xhat;
            sum_d += g * w;
            sum_dx += g * w * xhat;
        }
        l->dbn_w[j] += (float)sum_dyx;
        l->dbn_b[j] += (float)sum_dy;
        for (int i = 0; i < N; i++) {
            size_t o = (size_t)i * HD + j;
            float dxhat = l->dq[o] * w;
            if (l->last_train) {
                float xhat = (l->q[o] - mean) * rstd;
                l->dq[o] = rstd / N * (N * dxhat - (float)sum_d - xhat * (float)sum_dx);
            } else {
                l->dq[o] = dxhat * rstd;   // eval: statistics are constants
            }
        }
    }
}

void mp_cpu_retrieval_backward(mp_retrieval_layer *l, float *dx, const float *dy, const float *x,
                               int N) {
    const mp_retrieval_config *rc = l->rc;
    int C = l->C, H = rc->heads, k = rc->topk, dk = rc->key_dim, half = dk / 2;
    int HD = H * dk, S = H * k;
    if (N != l->last_N) mp_fatal("retrieval backward on %d rows after a forward on %d", N, l->last_N);
    int peer = l->kind == MP_FFN_PEER;

    // per selection: d(gate) and d(pre-activation); then dx from the experts' u rows and
    // the softmax backward into d(score), all per token
#pragma omp parallel for schedule(static)
    for (int t = 0; t < N; t++) {
        const float *dyt = dy + (size_t)t * C;
        float *dxt = dx + (size_t)t * C;
        for (int s = 0; s < S; s++) {
            size_t o = (size_t)t * S + s;
            long r = l->sel[o] - l->row_start;
            float dv_dot = dot(dyt, l->v + r * C, C);
            if (peer) {
                float h = l->pre[o];
                l->dgate[o] = act_fwd(rc->activation, h) * dv_dot;
                l->dpre[o] = l->gate[o] * dv_dot * act_grad(rc->activation, h);
                axpy(dxt, l->dpre[o], l->u + r * C, C);
            } else {
                l->dgate[o] = dv_dot;
            }
        }
        // softmax backward per head: dscore_j = g_j (dg_j - sum_i g_i dg_i), kept in dgate
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
    expert_grads(l, dy, x, N);

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
    cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, HD, C, N, 1.0f, l->dq, HD, x, C, 1.0f,
                l->dwq, C);
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, N, C, HD, 1.0f, l->dq, HD, l->wq, C,
                1.0f, dx, C);
}
