// The retrieval layer's compute, op by op, with its collectives in plain sight (route.h).
// The backend ops see tensors and shapes only; every sum over ranks happens here, on host
// buffers, between two ops: the query BatchNorm's statistics (forward, two passes: the mean
// first, then the squares centred on the global mean, as one pass over the data would lose
// precision), its backward sums, and the sub-key counts behind the balance biases.
// The arithmetic and its order are the backends' (double column sums in a fixed order);
// what is done here on the host (mean, variance, rstd, running statistics) is the same
// float / double formula on every backend, so the CPU results are bitwise what one fused
// op gave.
#include <math.h>
#include "model/route.h"
#include "core/log.h"

// Sums over ranks of the (n) host doubles in buf; a single process has nothing to add.
static void allreduce(mp_retrieval_layer *l, double *buf, size_t n) {
    if (l->comm && l->comm->size > 1) l->comm->allreduce_f64(l->comm, buf, n);
}

// Sub-key balance (docs/model.md, "Sub-key balance"): after a training forward, each
// head's bias of each sub-key moves by balance_rate, up if the global micro-batch selected
// it less often than the mean (N_global * k / n), down if more often. The counts are
// integers summed over ranks, so every rank holds the same biases, and another P gives the
// same ones as long as it makes the same selections (a top-k flip on a near-tie changes
// a count by one).
static void balance_update(mp_retrieval_layer *l, const mp_backend *be, int N) {
    const mp_retrieval_config *rc = l->rc;
    int H = rc->heads, k = rc->topk, n = rc->n_sub;
    size_t G = 2 * (size_t)H * n;
    be->subkey_counts(l->key_counts, l->sel_a, l->sel_b, N, H, k, n);
    int32_t *counts = l->key_counts_i32;
    be->to_host(counts, l->key_counts, G * sizeof(int32_t));
    double *c = l->key_counts_host;                  // (G + 1): counts, then tokens
    for (size_t i = 0; i < G; i++) c[i] = counts[i];
    c[G] = N;
    if (l->comm && l->comm->size > 1) l->comm->allreduce_f64(l->comm, c, G + 1);
    double mean_times_n = c[G] * k;                  // a head's selections in one half
    float *b = l->key_bias_host, rate = rc->balance_rate;
    be->to_host(b, l->key_bias, G * sizeof(float));
    for (size_t i = 0; i < G; i++) {
        double d = mean_times_n - n * c[i];          // exact: integers below 2^53
        b[i] += d > 0 ? rate : d < 0 ? -rate : 0.0f;
    }
    be->from_host(l->key_bias, b, G * sizeof(float));
}

// ---------------------------------------------------------------------------------------
// query BatchNorm, forward and backward. Training normalises with the statistics of the
// global batch (all ranks' rows), so every rank's queries, and the selections made from
// them, do not depend on how the batch is split; eval uses the running statistics.

// l->q (N, HD) -> l->qn (N, HD); l->bn_mean, l->bn_rstd (HD) for backward.
static void query_bn_forward(mp_retrieval_layer *l, const mp_backend *be, int N, int train) {
    const mp_retrieval_config *rc = l->rc;
    int HD = rc->heads * rc->key_dim;
    size_t fb = (size_t)HD * sizeof(float), db = (size_t)HD * sizeof(double);
    // host: running mean and variance (HD), and the mean and rstd this forward uses (HD)
    float *rm = l->bn_host, *rv = rm + HD, *bm = rm + 2 * HD, *br = rm + 3 * HD;
    be->to_host(rm, l->running_mean, fb);
    be->to_host(rv, l->running_var, fb);
    if (train) {
        double *sum = l->bn_sums_host;    // (HD + 1) column sums, then the token count
        double *sq = sum + HD + 1;        // (HD) centred squares
        double *dsum = l->bn_sums;        // (HD) backend: this rank's column sums
        double *dmean = l->bn_sums + 2 * HD;   // (HD) backend: the global mean
        be->query_bn_stats(dsum, l->q, NULL, N, HD);
        be->to_host(sum, dsum, db);
        sum[HD] = N;
        allreduce(l, sum, HD + 1);
        double count = sum[HD];
        for (int j = 0; j < HD; j++) sq[j] = sum[j] / count;   // the mean, for the backend
        be->from_host(dmean, sq, db);
        be->query_bn_stats(dsum, l->q, dmean, N, HD);
        be->to_host(sq, dsum, db);
        allreduce(l, sq, HD);
        float mo = rc->bn_momentum;
        for (int j = 0; j < HD; j++) {
            float mean = (float)(sum[j] / count), var = (float)(sq[j] / count);
            float unbiased = count > 1 ? (float)(sq[j] / (count - 1)) : var;
            rm[j] = (1.0f - mo) * rm[j] + mo * mean;
            rv[j] = (1.0f - mo) * rv[j] + mo * unbiased;
            bm[j] = mean;
            br[j] = 1.0f / sqrtf(var + rc->bn_eps);
        }
        l->bn_count = count;
        be->from_host(l->running_mean, rm, fb);
        be->from_host(l->running_var, rv, fb);
    } else {
        for (int j = 0; j < HD; j++) {
            bm[j] = rm[j];
            br[j] = 1.0f / sqrtf(rv[j] + rc->bn_eps);
        }
    }
    be->from_host(l->bn_mean, bm, fb);
    be->from_host(l->bn_rstd, br, fb);
    be->query_bn_forward(l->qn, l->q, l->bn_w, l->bn_b, l->bn_mean, l->bn_rstd, N, HD);
}

// l->dq (N, HD): d(qn) in, d(q) out; the BN affine's gradients += this rank's part. The
// batch statistics depend on every rank's rows, so their gradient needs the two column
// sums over the global batch (training forward only).
static void query_bn_backward(mp_retrieval_layer *l, const mp_backend *be, int N) {
    const mp_retrieval_config *rc = l->rc;
    int HD = rc->heads * rc->key_dim;
    double *sums = l->bn_sums;   // (2, HD) backend: sum dqn, sum dqn * xhat
    be->query_bn_backward_stats(sums, l->dbn_w, l->dbn_b, l->dq, l->q, l->bn_mean, l->bn_rstd,
                                N, HD);
    if (l->last_train && l->comm && l->comm->size > 1) {
        double *h = l->bn_sums_host;   // (2, HD)
        size_t db = 2 * (size_t)HD * sizeof(double);
        be->to_host(h, sums, db);
        allreduce(l, h, 2 * (size_t)HD);
        be->from_host(sums, h, db);
    }
    be->query_bn_backward(l->dq, l->q, l->bn_w, l->bn_mean, l->bn_rstd, sums, l->bn_count,
                          l->last_train, N, HD);
}

// ---------------------------------------------------------------------------------------
// route (where the token lives): forward and backward

void mp_route_forward(mp_retrieval_layer *l, const mp_backend *be, const float *x, int N,
                      int train) {
    const mp_retrieval_config *rc = l->rc;
    int C = l->C, H = rc->heads, dk = rc->key_dim, HD = H * dk, n = rc->n_sub, k = rc->topk;
    if (N > l->maxN) mp_fatal("retrieval layer: %d rows exceed the %d it was built for", N, l->maxN);
    // q (N, HD) = x (N, C) W_q^T, in fp32 also in bf16 mode: with the sub-key scores (fp32
    // too, retrieval_route.cu) it decides the top-k, which rounding of x and W_q to bf16
    // (2^-8 each) would change for a few % of the rows. Its backward needs no such care.
    int precision = be->set_precision ? be->set_precision(MP_PRECISION_FP32) : MP_PRECISION_FP32;
    be->matmul_forward(l->q, x, NULL, l->wq, NULL, NULL, N, C, HD);
    if (be->set_precision) be->set_precision(precision);
    const float *qn = l->q;                                // (N, HD) what the scores read
    if (rc->query_bn) {
        query_bn_forward(l, be, N, train);
        qn = l->qn;
    }
    // sel, sel_a, sel_b, gate (N, H, k)
    be->retrieval_route(l->sel, l->sel_a, l->sel_b, l->gate, qn, l->k1, l->k2, l->key_bias, N, H,
                        dk, n, k);
    l->last_train = train;   // backward differentiates through batch or running statistics
    if (train && l->key_bias) balance_update(l, be, N);
}

void mp_route_backward(mp_retrieval_layer *l, const mp_backend *be, float *dx, const float *x,
                       const uint16_t *x_bf16, int N) {
    const mp_retrieval_config *rc = l->rc;
    int C = l->C, H = rc->heads, dk = rc->key_dim, HD = H * dk, n = rc->n_sub, k = rc->topk;
    const float *qn = rc->query_bn ? l->qn : l->q;   // (N, HD) what the forward scored
    // dgate (N, H, k): gate gradients -> score gradients; dq (N, HD) = d(qn); dK1, dK2 +=
    be->retrieval_route_backward(l->dq, l->dk1, l->dk2, l->dgate, l->gate, l->sel_a, l->sel_b,
                                 qn, l->k1, l->k2, N, H, dk, n, k);
    if (rc->query_bn) query_bn_backward(l, be, N);   // dq (N, HD) = d(q)
    // dW_q (HD, C) += dq^T x, dx (N, C) += dq W_q
    be->matmul_backward(dx, l->dwq, NULL, l->dq, NULL, x, x_bf16, l->wq, l->wq_bf16, N, C, HD, 1);
}

// ---------------------------------------------------------------------------------------
// experts (where the rows live): forward and backward

static mp_expert_tables tables(const mp_retrieval_layer *l) {
    int peer = l->kind == MP_FFN_PEER;   // PKM has values only: u NULL tells the backend
    mp_expert_tables t = {
        .u = peer ? l->u : NULL, .v = l->v,
        .u_bf16 = peer ? l->u_bf16 : NULL, .v_bf16 = l->v_bf16,
        .du = peer ? l->du : NULL, .dv = l->dv,
        .dirty = l->grad_dirty,
        .rows = l->rows,
    };
    return t;
}

void mp_experts_forward(mp_retrieval_layer *l, const mp_backend *be, float *y, const float *x,
                        int64_t M, const int64_t *slot_start, const int32_t *slot,
                        const int32_t *row, const float *gate, float *pre, int64_t R) {
    mp_expert_tables t = tables(l);
    int relu = l->rc->activation == MP_ACT_RELU;
    be->experts_forward(&t, y, x, M, slot_start, slot, row, gate, pre, R, l->C, relu);
}

void mp_experts_backward(mp_retrieval_layer *l, const mp_backend *be, float *dx, float *dgate,
                         const float *dy, const float *x, int64_t M, const int64_t *slot_start,
                         const int32_t *slot, const int32_t *row, const float *gate,
                         const float *pre, int64_t R) {
    mp_expert_tables t = tables(l);
    int relu = l->rc->activation == MP_ACT_RELU;
    // the step's first backward writes dU, dV; the later micro-batches add to them
    be->experts_backward(&t, dx, dgate, dy, x, M, slot_start, slot, row, gate, pre, R, l->C,
                         relu, l->grad_overwrite, l->row_ss);
    l->grad_overwrite = 0;
}
