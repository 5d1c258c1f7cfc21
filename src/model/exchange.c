// The expert exchange as one pipeline of named stages (exchange.h; docs/design.md, "The
// exchange"). Every reduction has a fixed order: the plan lists an owner's tokens in
// increasing order with their records in selection order, owners sum records per slot in
// arrival order, and each token sums its returned parts in rank order. So results do not
// depend on the transport, and a run is bitwise repeatable on the same ranks.
#include "model/exchange.h"
#include <stdlib.h>
#include <string.h>
#include "core/log.h"
#include "model/retrieval.h"
#include "model/route.h"

static void *xbuf(const mp_backend *be, mp_xbuf *b, size_t bytes) {
    if (!bytes) bytes = 1;
    if (bytes > b->cap || !b->p) {
        if (b->p) be->free(b->p);
        b->p = be->alloc(bytes);
        b->cap = bytes;
    }
    return b->p;
}

// b (backend memory) = a copy of host indices
static void *upload(const mp_backend *be, mp_xbuf *b, const void *host, size_t bytes) {
    void *d = xbuf(be, b, bytes);
    if (bytes) be->from_host(d, host, bytes);
    return d;
}

// A host view of n indices in backend memory p: p itself on a host-memory backend, else a
// copy in *buf (grown as needed).
static const int32_t *host_ids(const mp_backend *be, int32_t **buf, size_t *cap, const int32_t *p,
                               size_t n) {
    if (be->host_memory) return p;
    *buf = mp_grow(*buf, cap, (n ? n : 1) * sizeof(int32_t));
    if (n) be->to_host(*buf, p, n * sizeof(int32_t));
    return *buf;
}

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

// One payload exchange of `width` elements per counted item (floats, or int32 when
// send_i is given), timed into the statistics.
static void send_items(mp_exchange *e, const float *send_f, const int32_t *send_i,
                       const int64_t *send_n, void *recv, const int64_t *recv_n, int64_t width) {
    int P = e->P;
    int64_t sc[P], sd[P], rc[P], rd[P];
    scaled(send_n, P, width, sc, sd);
    scaled(recv_n, P, width, rc, rd);
    double t0 = mp_now();
    if (send_i) e->comm->alltoallv_i32(e->comm, send_i, sc, sd, recv, rc, rd);
    else e->comm->alltoallv_f32(e->comm, send_f, sc, sd, recv, rc, rd);
    e->stats.seconds += mp_now() - t0;
}
static void send_f32(mp_exchange *e, const float *send, const int64_t *send_n, float *recv,
                     const int64_t *recv_n, int64_t width) {
    send_items(e, send, NULL, send_n, recv, recv_n, width);
}

// ---------------------------------------------------------------------------------------
// one rank: the identity plan

// slot_start (N+1) = t*S and slot (R) = t of record t*S + s depend on N only: built once
// per N. With one rank an expert's row is its id, so sel and the gates are the records.
static void identity_plan(mp_exchange *e, const mp_retrieval_layer *l, int N) {
    const mp_backend *be = e->be;
    int S = l->rc->heads * l->rc->topk;
    size_t R = (size_t)N * S;
    if (l->row_start != 0 || l->rows != l->rc->n_experts)
        mp_fatal("a single-rank exchange over a shard of rows [%ld, %ld) of %ld", l->row_start,
                 l->row_start + l->rows, l->rc->n_experts);
    e->M = N;
    e->R = (int64_t)R;
    if (e->identity_N == N) return;
    int64_t *hs = mp_malloc(((size_t)N + 1) * sizeof(int64_t));
    int32_t *hl = mp_malloc((R ? R : 1) * sizeof(int32_t));
    for (int64_t t = 0; t <= N; t++) hs[t] = t * S;
    for (size_t i = 0; i < R; i++) hl[i] = (int32_t)(i / (size_t)S);
    be->from_host(xbuf(be, &e->slot_start, ((size_t)N + 1) * sizeof(int64_t)), hs,
                  ((size_t)N + 1) * sizeof(int64_t));
    be->from_host(xbuf(be, &e->slot, R * sizeof(int32_t)), hl, R * sizeof(int32_t));
    free(hs);
    free(hl);
    e->identity_N = N;
}

// ---------------------------------------------------------------------------------------
// forward stages

// plan: this rank's selections grouped by owner (host, from the selected ids)
static void stage_plan(mp_exchange *e, const mp_retrieval_layer *l, int N) {
    size_t NS = (size_t)N * l->rc->heads * l->rc->topk;
    const int32_t *sel = host_ids(e->be, &e->sel_h, &e->cap_sel_h, l->sel, NS);
    mp_shard_plan_build(&e->plan, sel, N, l->rc->heads * l->rc->topk, l->rc->n_sub);
}

// counts: (tokens, records) for each peer, both ways (a control call, host buffers)
static void stage_counts(mp_exchange *e) {
    const mp_shard_plan *p = &e->plan;
    int P = e->P;
    int64_t *send2 = e->counts, *recv2 = e->counts + 2 * P;
    for (int r = 0; r < P; r++) {
        send2[2 * r] = p->tok_count[r];
        send2[2 * r + 1] = p->rec_count[r];
    }
    double t0 = mp_now();
    e->comm->alltoall_i64(e->comm, send2, recv2, 2);
    e->stats.seconds += mp_now() - t0;
    e->M = e->R = 0;
    for (int r = 0; r < P; r++) {
        e->recv_tok[r] = recv2[2 * r];
        e->recv_rec[r] = recv2[2 * r + 1];
        e->M += e->recv_tok[r];
        e->R += e->recv_rec[r];
    }
}

// pack: x rows of the sent tokens and the gates of the records, in owner order (backend
// ops on backend memory); the records' (slot, row) come from the host plan
static void stage_pack(mp_exchange *e, const mp_retrieval_layer *l, const float *x) {
    const mp_backend *be = e->be;
    const mp_shard_plan *p = &e->plan;
    int C = l->C;
    const int32_t *tok = upload(be, &e->tok_list, p->tok_list, (size_t)p->n_tok * sizeof(int32_t));
    const int32_t *sel = upload(be, &e->rec_sel, p->rec_sel, (size_t)p->n_rec * sizeof(int32_t));
    be->gather_rows(xbuf(be, &e->x_send, (size_t)p->n_tok * C * sizeof(float)), x, tok, p->n_tok, C);
    be->gather_rows(xbuf(be, &e->gate_send, (size_t)p->n_rec * sizeof(float)), l->gate, sel, p->n_rec, 1);
    e->rec_h = mp_grow(e->rec_h, &e->cap_rec_h, (size_t)(p->n_rec ? p->n_rec : 1) * 2 * sizeof(int32_t));
    for (int64_t i = 0; i < p->n_rec; i++) {
        e->rec_h[2 * i] = p->rec_slot[i];
        e->rec_h[2 * i + 1] = p->rec_row[i];
    }
    upload(be, &e->rec_send, e->rec_h, (size_t)p->n_rec * 2 * sizeof(int32_t));
}

// send: x rows, records and gates to their owners (payload calls)
static void stage_send(mp_exchange *e, int C) {
    const mp_backend *be = e->be;
    const mp_shard_plan *p = &e->plan;
    size_t M = (size_t)e->M, R = (size_t)e->R;
    send_f32(e, e->x_send.p, p->tok_count, xbuf(be, &e->x_recv, M * C * sizeof(float)), e->recv_tok, C);
    send_items(e, NULL, e->rec_send.p, p->rec_count, xbuf(be, &e->rec_recv, R * 2 * sizeof(int32_t)),
               e->recv_rec, 2);
    send_f32(e, e->gate_send.p, p->rec_count, xbuf(be, &e->gate_recv, R * sizeof(float)), e->recv_rec, 1);
}

// experts: the owner's slots from the received records (host: indices), then the partial
// outputs y_recv (M, C) of its rows
static void stage_experts(mp_exchange *e, mp_retrieval_layer *l) {
    const mp_backend *be = e->be;
    size_t M = (size_t)e->M, R = (size_t)e->R;
    const int32_t *rec = host_ids(be, &e->rec_h, &e->cap_rec_h, e->rec_recv.p, R * 2);
    int32_t *slot = e->slot_h = mp_grow(e->slot_h, &e->cap_slot_h, (R ? R : 1) * sizeof(int32_t));
    int32_t *row = e->row_h = mp_grow(e->row_h, &e->cap_row_h, (R ? R : 1) * sizeof(int32_t));
    int64_t *start = e->slot_start_h = mp_grow(e->slot_start_h, &e->cap_slot_start_h, (M + 1) * sizeof(int64_t));
    // records arrive grouped by source rank, each group's slots counted from its first token
    int64_t i = 0, tok_base = 0;
    for (int r = 0; r < e->P; r++) {
        for (int64_t j = 0; j < e->recv_rec[r]; j++, i++) {
            slot[i] = (int32_t)(tok_base + rec[2 * i]);
            row[i] = rec[2 * i + 1];
            if (row[i] < 0 || row[i] >= l->rows)
                mp_fatal("expert exchange: record for row %d outside this rank's %ld rows", row[i], l->rows);
        }
        tok_base += e->recv_tok[r];
    }
    int64_t m = 0;
    for (size_t k = 0; k < R; k++)
        while (m <= slot[k]) start[m++] = (int64_t)k;
    while (m <= (int64_t)M) start[m++] = (int64_t)R;
    upload(be, &e->slot_start, start, (M + 1) * sizeof(int64_t));
    upload(be, &e->slot, slot, R * sizeof(int32_t));
    upload(be, &e->row, row, R * sizeof(int32_t));
    mp_experts_forward(l, be, xbuf(be, &e->y_recv, M * l->C * sizeof(float)), e->x_recv.p, e->M,
                       e->slot_start.p, e->slot.p, e->row.p, e->gate_recv.p,
                       xbuf(be, &e->pre, R * sizeof(float)), e->R);
}

// return: partial outputs back to the tokens' ranks (payload call)
static void stage_return(mp_exchange *e, int C) {
    const mp_shard_plan *p = &e->plan;
    send_f32(e, e->y_recv.p, e->recv_tok, xbuf(e->be, &e->y_back, (size_t)p->n_tok * C * sizeof(float)),
             p->tok_count, C);
}

// sum: each token adds its parts in rank order (one scatter per owner's block: within a
// block every token appears once)
static void stage_sum(mp_exchange *e, float *y, const float *parts, int C) {
    const mp_shard_plan *p = &e->plan;
    for (int r = 0; r < e->P; r++)
        e->be->scatter_add_rows(y, parts + p->tok_displ[r] * C,
                                (const int32_t *)e->tok_list.p + p->tok_displ[r], p->tok_count[r], C);
}

void mp_exchange_forward(mp_exchange *e, mp_retrieval_layer *l, float *y, const float *x, int N) {
    const mp_backend *be = e->be;
    int C = l->C, P = e->P;
    if (P == 1) {   // the identity plan: experts on the route's tensors, nothing moves
        identity_plan(e, l, N);
        mp_experts_forward(l, be, y, x, N, e->slot_start.p, e->slot.p, l->sel, l->gate,
                           xbuf(be, &e->pre, (size_t)e->R * sizeof(float)), e->R);
        e->stats.selections += (double)e->R;
        return;
    }
    stage_plan(e, l, N);
    stage_counts(e);
    stage_pack(e, l, x);
    stage_send(e, C);
    stage_experts(e, l);
    stage_return(e, C);
    be->zero(y, (size_t)N * C * sizeof(float));
    stage_sum(e, y, e->y_back.p, C);

    // off-rank bytes: x, records (slot, row, gate) and the counts out, partial outputs back
    const mp_shard_plan *p = &e->plan;
    int me = e->me;
    e->stats.bytes_sent += 4.0 * (C * off_rank(p->tok_count, P, me) + 3 * off_rank(p->rec_count, P, me) +
                                  C * off_rank(e->recv_tok, P, me)) + 16.0 * (P - 1);
    e->stats.bytes_recv += 4.0 * (C * off_rank(e->recv_tok, P, me) + 3 * off_rank(e->recv_rec, P, me) +
                                  C * off_rank(p->tok_count, P, me)) + 16.0 * (P - 1);
    e->stats.bytes_min += 4.0 * (4.0 * C * off_rank(p->tok_count, P, me) + 3.0 * off_rank(p->rec_count, P, me));
    e->stats.selections += (double)e->R;
}

// ---------------------------------------------------------------------------------------
// backward stages, the forward's mirrored on its plan

// Lazy AdamW's touched rows: lists each of the R local rows of this backward's records
// that is not listed yet (host). Records, not gradients: a row whose gradient happens to
// be zero was still selected, and takes its step (docs/model.md, "Lazy AdamW").
static void mark_touched(mp_retrieval_layer *l, const int32_t *row, int64_t R) {
    if (!l->touched_mark) return;
    for (int64_t i = 0; i < R; i++) {
        int32_t r = row[i];
        if (l->touched_mark[r]) continue;
        l->touched_mark[r] = 1;
        l->touched_h[l->n_touched++] = r;
    }
    l->touched_ready = 0;
}

// pack: dy rows on the forward's plan (x_send is free again)
static void stage_pack_back(mp_exchange *e, const float *dy, int C) {
    e->be->gather_rows(e->x_send.p, dy, e->tok_list.p, e->plan.n_tok, C);
}

// send: dy to the owners, into y_recv (free again)
static void stage_send_back(mp_exchange *e, int C) {
    send_f32(e, e->x_send.p, e->plan.tok_count, e->y_recv.p, e->recv_tok, C);
}

// experts: dx parts, gate gradients, and dU, dV of the owner's rows
static void stage_experts_back(mp_exchange *e, mp_retrieval_layer *l) {
    const mp_backend *be = e->be;
    size_t M = (size_t)e->M, R = (size_t)e->R;
    mp_experts_backward(l, be, xbuf(be, &e->dx_recv, M * l->C * sizeof(float)),
                        xbuf(be, &e->dgate_recv, R * sizeof(float)), e->y_recv.p, e->x_recv.p,
                        e->M, e->slot_start.p, e->slot.p, e->row.p, e->gate_recv.p, e->pre.p, e->R);
    mark_touched(l, e->row_h, e->R);   // the forward's received records (host)
}

// return: dx parts (into y_back, free again) and gate gradients
static void stage_return_back(mp_exchange *e, int C) {
    const mp_shard_plan *p = &e->plan;
    send_f32(e, e->dx_recv.p, e->recv_tok, e->y_back.p, p->tok_count, C);
    send_f32(e, e->dgate_recv.p, e->recv_rec,
             xbuf(e->be, &e->dgate_back, (size_t)p->n_rec * sizeof(float)), p->rec_count, 1);
}

// sum: dx parts in rank order; every selection has one record, so its gate gradient is
// written once
static void stage_sum_back(mp_exchange *e, mp_retrieval_layer *l, float *dx, int N, int C) {
    stage_sum(e, dx, e->y_back.p, C);
    e->be->zero(l->dgate, (size_t)N * l->rc->heads * l->rc->topk * sizeof(float));
    e->be->scatter_add_rows(l->dgate, e->dgate_back.p, e->rec_sel.p, e->plan.n_rec, 1);
}

void mp_exchange_backward(mp_exchange *e, mp_retrieval_layer *l, float *dx, const float *dy,
                          const float *x, int N) {
    const mp_backend *be = e->be;
    int C = l->C, P = e->P;
    if (P == 1) {   // experts' dx into a part, added to the layer's dx; gate gradients in place
        if (e->identity_N != N) mp_fatal("expert backward on %d rows after a forward on %lld", N,
                                         (long long)e->identity_N);
        float *part = xbuf(be, &e->dx_recv, (size_t)N * C * sizeof(float));
        mp_experts_backward(l, be, part, l->dgate, dy, x, N, e->slot_start.p, e->slot.p, l->sel,
                            l->gate, e->pre.p, e->R);
        be->residual_forward(dx, dx, part, (long)N * C);
        if (l->touched_mark)   // one rank: a record's row is its selected expert id
            mark_touched(l, host_ids(be, &e->sel_h, &e->cap_sel_h, l->sel, (size_t)e->R), e->R);
        return;
    }
    stage_pack_back(e, dy, C);
    stage_send_back(e, C);
    stage_experts_back(e, l);
    stage_return_back(e, C);
    stage_sum_back(e, l, dx, N, C);

    // dy out; dx parts and gate gradients back
    const mp_shard_plan *p = &e->plan;
    int me = e->me;
    e->stats.bytes_sent += 4.0 * (C * off_rank(p->tok_count, P, me) + C * off_rank(e->recv_tok, P, me) +
                                  off_rank(e->recv_rec, P, me));
    e->stats.bytes_recv += 4.0 * (C * off_rank(e->recv_tok, P, me) + C * off_rank(p->tok_count, P, me) +
                                  off_rank(p->rec_count, P, me));
}

const float *mp_exchange_pre(const mp_exchange *e, int64_t *R) {
    if (R) *R = e->R;
    return e->pre.p;
}

void mp_exchange_init(mp_exchange *e, mp_comm *comm, const mp_backend *be) {
    memset(e, 0, sizeof *e);
    e->P = comm ? comm->size : 1;
    e->me = comm ? comm->rank : 0;
    e->comm = e->P > 1 ? comm : NULL;
    e->be = be;
    mp_shard_plan_init(&e->plan, e->P);
    e->counts = mp_calloc(4 * (size_t)e->P, sizeof(int64_t));
    e->recv_tok = mp_calloc(e->P, sizeof(int64_t));
    e->recv_rec = mp_calloc(e->P, sizeof(int64_t));
}

void mp_exchange_free(mp_exchange *e) {
    if (!e->be) return;
    const mp_backend *be = e->be;
    mp_xbuf *bufs[] = {&e->tok_list, &e->rec_sel, &e->rec_send, &e->rec_recv, &e->x_send,
                       &e->gate_send, &e->x_recv, &e->gate_recv, &e->slot_start, &e->slot,
                       &e->row, &e->pre, &e->y_recv, &e->y_back, &e->dx_recv, &e->dgate_recv,
                       &e->dgate_back};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++)
        if (bufs[i]->p) be->free(bufs[i]->p);
    mp_shard_plan_free(&e->plan);
    void *host[] = {e->counts, e->recv_tok, e->recv_rec, e->sel_h, e->rec_h, e->slot_h, e->row_h,
                    e->slot_start_h};
    for (size_t i = 0; i < sizeof host / sizeof host[0]; i++) free(host[i]);
    memset(e, 0, sizeof *e);
}
