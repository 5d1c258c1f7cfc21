// One PEER / PKM layer across ranks (docs/design.md, "Sharding" and "The exchange").
// Forward: route where the token lives (queries, BN over the global batch, product-key
// top-k, gates); group the selections by owner (the plan); counts, then an all-to-all-v
// of x once per (token, owner) and of the (slot, row, gate) records; owners compute
// partial outputs; a reverse all-to-all-v returns them and they are summed by rank.
// Backward: dy goes out on the same plan; owners accumulate dU, dV in their own rows and
// return dx partials and gate gradients; the rest of the backward runs where the token is.
#include <stdlib.h>
#include <string.h>
#include "core/log.h"
#include "model/retrieval.h"
#include "model/retrieval_stage.h"

// Counts in elements of `width` per token or record, with displacements.
static void scaled(const int64_t *count, int P, int64_t width, int64_t *out_count, int64_t *out_displ) {
    int64_t o = 0;
    for (int r = 0; r < P; r++) {
        out_count[r] = count[r] * width;
        out_displ[r] = o;
        o += out_count[r];
    }
}

// Sum of count[r] over the other ranks: what actually crosses between processes.
static double off_rank(const int64_t *count, int P, int me) {
    double s = 0.0;
    for (int r = 0; r < P; r++)
        if (r != me) s += (double)count[r];
    return s;
}

// One personalised exchange; a single process copies (its only peer is itself). The
// time spent is added to the layer's exchange statistics.
static void exchange_f32(mp_retrieval_layer *l, const float *send, const int64_t *sc,
                         const int64_t *sd, float *recv, const int64_t *rc, const int64_t *rd) {
    double t0 = mp_now();
    mp_comm *c = l->comm;
    if (!c || c->size == 1) memcpy(recv + rd[0], send + sd[0], (size_t)sc[0] * sizeof(float));
    else c->alltoallv_f32(c, send, sc, sd, recv, rc, rd);
    l->ex.stats.seconds += mp_now() - t0;
}
static void exchange_i32(mp_retrieval_layer *l, const int32_t *send, const int64_t *sc,
                         const int64_t *sd, int32_t *recv, const int64_t *rc, const int64_t *rd) {
    double t0 = mp_now();
    mp_comm *c = l->comm;
    if (!c || c->size == 1) memcpy(recv + rd[0], send + sd[0], (size_t)sc[0] * sizeof(int32_t));
    else c->alltoallv_i32(c, send, sc, sd, recv, rc, rd);
    l->ex.stats.seconds += mp_now() - t0;
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

void mp_retrieval_forward(mp_retrieval_layer *l, const mp_backend *be, float *y, const float *x,
                          int N, int train) {
    mp_exchange *e = &l->ex;
    mp_route_plan *p = &e->plan;
    int C = l->C, S = l->rc->heads * l->rc->topk, P = p->P;
    be->retrieval_route(l, x, N, train);
    if (train && l->key_bias) balance_update(l, be, N);
    if (mp_stage_single(l, be)) {   // one process, device memory: no exchange, no host copies
        mp_stage_forward_single(l, be, y, x, N, train);
        return;
    }
    // host views of the route's outputs, x and y (the tensors themselves on the CPU backend,
    // host copies on a device backend: retrieval_stage.c)
    size_t NS = (size_t)N * S, NC = (size_t)N * C * sizeof(float);
    const int32_t *sel = mp_stage_host(l, be, MP_STAGE_SEL, l->sel, NS * sizeof(int32_t), 1);
    const float *gate = mp_stage_host(l, be, MP_STAGE_GATE, l->gate, NS * sizeof(float), 1);
    const float *xh = mp_stage_host(l, be, MP_STAGE_X, x, NC, 1);
    float *yh = mp_stage_host(l, be, MP_STAGE_Y, y, NC, 0);
    mp_route_plan_build(p, sel, N, S, l->rc->n_sub);

    // counts first: (tokens, records) per peer
    int64_t *send2 = e->i64, *recv2 = e->i64 + 2 * P;
    for (int r = 0; r < P; r++) { send2[2 * r] = p->tok_count[r]; send2[2 * r + 1] = p->rec_count[r]; }
    double t0 = mp_now();
    if (l->comm && P > 1) l->comm->alltoall_i64(l->comm, send2, recv2, 2);
    else memcpy(recv2, send2, 2 * sizeof(int64_t));
    e->stats.seconds += mp_now() - t0;
    e->M = e->R = 0;
    for (int r = 0; r < P; r++) {
        e->recv_tok[r] = recv2[2 * r];
        e->recv_rec[r] = recv2[2 * r + 1];
        e->M += e->recv_tok[r];
        e->R += e->recv_rec[r];
    }

    // payload: x rows of the sent tokens; records as (slot, row, gate bits)
    e->x_send = mp_grow(e->x_send, &e->cap_x_send, (size_t)p->n_tok * C * sizeof(float));
    e->rec_send = mp_grow(e->rec_send, &e->cap_rec_send, (size_t)p->n_rec * 3 * sizeof(int32_t));
    for (int64_t i = 0; i < p->n_tok; i++)
        memcpy(e->x_send + i * C, xh + (size_t)p->tok_list[i] * C, C * sizeof(float));
    for (int64_t i = 0; i < p->n_rec; i++) {
        e->rec_send[3 * i] = p->rec_slot[i];
        e->rec_send[3 * i + 1] = p->rec_row[i];
        memcpy(&e->rec_send[3 * i + 2], &gate[p->rec_sel[i]], sizeof(float));
    }
    int64_t sc[P], sd[P], rc[P], rd[P];
    e->x_recv = mp_grow(e->x_recv, &e->cap_x_recv, (size_t)e->M * C * sizeof(float));
    e->y_recv = mp_grow(e->y_recv, &e->cap_y_recv, (size_t)e->M * C * sizeof(float));
    e->rec_recv = mp_grow(e->rec_recv, &e->cap_rec_recv, (size_t)e->R * 3 * sizeof(int32_t));
    scaled(p->tok_count, P, C, sc, sd);
    scaled(e->recv_tok, P, C, rc, rd);
    exchange_f32(l, e->x_send, sc, sd, e->x_recv, rc, rd);
    scaled(p->rec_count, P, 3, sc, sd);
    scaled(e->recv_rec, P, 3, rc, rd);
    exchange_i32(l, e->rec_send, sc, sd, e->rec_recv, rc, rd);

    // owner side: records arrive grouped by source rank, then by slot in increasing order
    size_t R = (size_t)e->R;
    e->slot = mp_grow(e->slot, &e->cap_slot, R * sizeof(int32_t));
    e->row = mp_grow(e->row, &e->cap_row, R * sizeof(int32_t));
    e->gate = mp_grow(e->gate, &e->cap_gate, R * sizeof(float));
    e->pre = mp_grow(e->pre, &e->cap_pre, R * sizeof(float));
    e->dgate = mp_grow(e->dgate, &e->cap_dgate, R * sizeof(float));
    e->slot_start = mp_grow(e->slot_start, &e->cap_slot_start, ((size_t)e->M + 1) * sizeof(int64_t));
    int64_t i = 0, tok_base = 0;
    for (int r = 0; r < P; r++) {
        for (int64_t j = 0; j < e->recv_rec[r]; j++, i++) {
            e->slot[i] = (int32_t)(tok_base + e->rec_recv[3 * i]);
            e->row[i] = e->rec_recv[3 * i + 1];
            memcpy(&e->gate[i], &e->rec_recv[3 * i + 2], sizeof(float));
            if (e->row[i] < 0 || e->row[i] >= l->rows)
                mp_fatal("expert exchange: record for row %d outside this rank's %ld rows", e->row[i], l->rows);
        }
        tok_base += e->recv_tok[r];
    }
    int64_t m = 0;
    for (size_t k = 0; k < R; k++)
        while (m <= e->slot[k]) e->slot_start[m++] = (int64_t)k;
    while (m <= e->M) e->slot_start[m++] = (int64_t)R;
    mp_stage_experts_forward(l, be);   // be->experts_forward on the received batch

    // partial outputs go back; each token sums them in rank order
    e->y_back = mp_grow(e->y_back, &e->cap_y_back, (size_t)p->n_tok * C * sizeof(float));
    scaled(e->recv_tok, P, C, sc, sd);
    scaled(p->tok_count, P, C, rc, rd);
    exchange_f32(l, e->y_recv, sc, sd, e->y_back, rc, rd);
    memset(yh, 0, NC);
    for (int r = 0; r < P; r++) {
        const int64_t lo = p->tok_displ[r], hi = lo + p->tok_count[r];
        // within one owner's block every token appears once: no two threads share a row
#pragma omp parallel for schedule(static)
        for (int64_t k = lo; k < hi; k++) {
            float *yt = yh + (size_t)p->tok_list[k] * C;
            const float *part = e->y_back + k * C;
            for (int c = 0; c < C; c++) yt[c] += part[c];
        }
    }
    if (l->usage) {
        for (size_t o = 0; o < NS; o++) l->usage[sel[o]] += gate[o];
    }
    mp_stage_back(be, y, yh, NC);
    // off-rank bytes: x and the records out, partial outputs back (and the counts)
    int me = l->comm ? l->comm->rank : 0;
    e->stats.bytes_sent += 4.0 * (C * off_rank(p->tok_count, P, me) + 3 * off_rank(p->rec_count, P, me) +
                                  C * off_rank(e->recv_tok, P, me)) + 16.0 * (P - 1);
    e->stats.bytes_recv += 4.0 * (C * off_rank(e->recv_tok, P, me) + 3 * off_rank(e->recv_rec, P, me) +
                                  C * off_rank(p->tok_count, P, me)) + 16.0 * (P - 1);
    e->stats.bytes_min += 4.0 * (4.0 * C * off_rank(p->tok_count, P, me) + 3.0 * off_rank(p->rec_count, P, me));
    e->stats.selections += (double)e->R;
    l->last_N = N;
    l->last_train = train;
}

void mp_retrieval_backward(mp_retrieval_layer *l, const mp_backend *be, float *dx, const float *dy,
                           const float *x, int N) {
    mp_exchange *e = &l->ex;
    mp_route_plan *p = &e->plan;
    int C = l->C, P = p->P;
    if (N != l->last_N) mp_fatal("retrieval backward on %d rows after a forward on %d", N, l->last_N);
    if (mp_stage_single(l, be)) {
        mp_stage_backward_single(l, be, dx, dy, x, N);
        be->retrieval_route_backward(l, dx, x, N);
        return;
    }
    int64_t sc[P], sd[P], rc[P], rd[P];
    size_t NS = (size_t)N * l->rc->heads * l->rc->topk, NC = (size_t)N * C * sizeof(float);
    const float *dyh = mp_stage_host(l, be, MP_STAGE_DY, dy, NC, 1);
    float *dgh = mp_stage_host(l, be, MP_STAGE_DGATE, l->dgate, NS * sizeof(float), 0);
    float *dxh = mp_stage_host(l, be, MP_STAGE_DX, dx, NC, 1);   // accumulated into
    // dy rows out on the forward plan (x_send's buffer is free again)
    for (int64_t i = 0; i < p->n_tok; i++)
        memcpy(e->x_send + i * C, dyh + (size_t)p->tok_list[i] * C, C * sizeof(float));
    scaled(p->tok_count, P, C, sc, sd);
    scaled(e->recv_tok, P, C, rc, rd);
    exchange_f32(l, e->x_send, sc, sd, e->y_recv, rc, rd);   // y_recv now holds dy
    e->dx_recv = mp_grow(e->dx_recv, &e->cap_dx_recv, (size_t)e->M * C * sizeof(float));
    mp_stage_experts_backward(l, be);   // be->experts_backward on the received batch

    // dx partials and gate gradients come back
    scaled(e->recv_tok, P, C, sc, sd);
    scaled(p->tok_count, P, C, rc, rd);
    exchange_f32(l, e->dx_recv, sc, sd, e->y_back, rc, rd);   // y_back now holds dx parts
    e->dgate_back = mp_grow(e->dgate_back, &e->cap_dgate_back, (size_t)p->n_rec * sizeof(float));
    scaled(e->recv_rec, P, 1, sc, sd);
    scaled(p->rec_count, P, 1, rc, rd);
    exchange_f32(l, e->dgate, sc, sd, e->dgate_back, rc, rd);
    for (int64_t i = 0; i < p->n_rec; i++) dgh[p->rec_sel[i]] = e->dgate_back[i];
    for (int r = 0; r < P; r++) {
        const int64_t lo = p->tok_displ[r], hi = lo + p->tok_count[r];
#pragma omp parallel for schedule(static)
        for (int64_t k = lo; k < hi; k++) {
            float *dxt = dxh + (size_t)p->tok_list[k] * C;
            const float *part = e->y_back + k * C;
            for (int c = 0; c < C; c++) dxt[c] += part[c];
        }
    }
    mp_stage_back(be, l->dgate, dgh, NS * sizeof(float));
    mp_stage_back(be, dx, dxh, NC);
    be->retrieval_route_backward(l, dx, x, N);
    // dy out; dx partials and gate gradients back
    int me = l->comm ? l->comm->rank : 0;
    e->stats.bytes_sent += 4.0 * (C * off_rank(p->tok_count, P, me) + C * off_rank(e->recv_tok, P, me) +
                                  off_rank(e->recv_rec, P, me));
    e->stats.bytes_recv += 4.0 * (C * off_rank(e->recv_tok, P, me) + C * off_rank(p->tok_count, P, me) +
                                  off_rank(p->rec_count, P, me));
}

void mp_retrieval_exchange_init(mp_retrieval_layer *l, mp_comm *comm) {
    int P = comm ? comm->size : 1;
    l->comm = comm;
    mp_route_plan_init(&l->ex.plan, P);
    l->ex.i64 = mp_calloc(4 * (size_t)P, sizeof(int64_t));
    l->ex.recv_tok = mp_calloc(P, sizeof(int64_t));
    l->ex.recv_rec = mp_calloc(P, sizeof(int64_t));
}

void mp_retrieval_exchange_free(mp_retrieval_layer *l) {
    mp_stage_free(l);
    mp_retrieval_scratch *w = &l->scratch;
    void *scratch[] = {w->s1, w->s2, w->bs1, w->bs2, w->count, w->begin, w->items, w->touched, w->dpre};
    for (size_t i = 0; i < sizeof scratch / sizeof scratch[0]; i++) free(scratch[i]);
    memset(w, 0, sizeof *w);
    mp_exchange *e = &l->ex;
    mp_route_plan_free(&e->plan);
    void *bufs[] = {e->i64, e->recv_tok, e->recv_rec, e->x_send, e->y_back, e->x_recv, e->y_recv,
                    e->dx_recv, e->gate, e->pre, e->dgate, e->dgate_back, e->rec_send,
                    e->rec_recv, e->slot, e->row, e->slot_start};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++) free(bufs[i]);
    memset(e, 0, sizeof *e);
}
