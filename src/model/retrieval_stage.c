// Staging for device backends (see retrieval_stage.h). The exchange runs on host buffers
// today; a GPU transport (NCCL on device buffers) would replace these copies.
#include "model/retrieval_stage.h"
#include <stdlib.h>
#include <string.h>
#include "core/log.h"

typedef struct {   // a grow-only buffer in backend memory
    void *p;
    size_t cap;
} dev_buf;

struct mp_retrieval_stage {
    const mp_backend *be;              // the backend the device mirrors belong to
    void *host[MP_STAGE_N];            // host copies of the layer's backend tensors
    size_t host_cap[MP_STAGE_N];
    // device mirrors of the received batch: x (M,C), y / dy (M,C), dx (M,C), slot_start
    // (M+1), slot, row, gate, pre, dgate (R); x, slot_start..pre live from forward to backward
    dev_buf x, y, dx, slot_start, slot, row, gate, pre, dgate;
    int64_t single_N;   // the token count slot_start / slot were built for (single process)
};

static struct mp_retrieval_stage *stage_of(mp_retrieval_layer *l, const mp_backend *be) {
    if (!l->stage) {
        l->stage = mp_calloc(1, sizeof *l->stage);
        l->stage->be = be;
    }
    if (l->stage->be != be) mp_fatal("retrieval layer used with two backends");
    return l->stage;
}

static void *dev_grow(const mp_backend *be, dev_buf *b, size_t bytes) {
    if (bytes > b->cap || !b->p) {
        if (b->p) be->free(b->p);
        b->cap = bytes ? bytes : 1;
        b->p = be->alloc(b->cap);
    }
    return b->p;
}

void *mp_stage_host(mp_retrieval_layer *l, const mp_backend *be, int which, const void *p,
                    size_t bytes, int copy) {
    if (be->host_memory) return (void *)p;
    struct mp_retrieval_stage *s = stage_of(l, be);
    s->host[which] = mp_grow(s->host[which], &s->host_cap[which], bytes ? bytes : 1);
    if (copy) be->to_host(s->host[which], p, bytes);
    return s->host[which];
}

void mp_stage_back(const mp_backend *be, void *dst, const void *host, size_t bytes) {
    if (!be->host_memory) be->from_host(dst, host, bytes);
}

void mp_stage_experts_forward(mp_retrieval_layer *l, const mp_backend *be) {
    mp_exchange *e = &l->ex;
    if (be->host_memory) {
        be->experts_forward(l, e->y_recv, e->x_recv, e->M, e->slot_start, e->slot, e->row,
                            e->gate, e->pre, e->R);
        return;
    }
    struct mp_retrieval_stage *s = stage_of(l, be);
    size_t MC = (size_t)e->M * l->C * sizeof(float), R = (size_t)e->R;
    float *x = dev_grow(be, &s->x, MC), *y = dev_grow(be, &s->y, MC);
    int64_t *start = dev_grow(be, &s->slot_start, ((size_t)e->M + 1) * sizeof(int64_t));
    int32_t *slot = dev_grow(be, &s->slot, R * sizeof(int32_t));
    int32_t *row = dev_grow(be, &s->row, R * sizeof(int32_t));
    float *gate = dev_grow(be, &s->gate, R * sizeof(float));
    float *pre = dev_grow(be, &s->pre, R * sizeof(float));
    be->from_host(x, e->x_recv, MC);
    be->from_host(start, e->slot_start, ((size_t)e->M + 1) * sizeof(int64_t));
    be->from_host(slot, e->slot, R * sizeof(int32_t));
    be->from_host(row, e->row, R * sizeof(int32_t));
    be->from_host(gate, e->gate, R * sizeof(float));
    be->experts_forward(l, y, x, e->M, start, slot, row, gate, pre, e->R);
    be->to_host(e->y_recv, y, MC);
    // pre-activations too (R floats): host code and tests read them as on the CPU backend
    if (l->kind == MP_FFN_PEER) be->to_host(e->pre, pre, R * sizeof(float));
}

void mp_stage_experts_backward(mp_retrieval_layer *l, const mp_backend *be) {
    mp_exchange *e = &l->ex;
    if (be->host_memory) {
        be->experts_backward(l, e->dx_recv, e->dgate, e->y_recv, e->x_recv, e->M, e->slot_start,
                             e->slot, e->row, e->gate, e->pre, e->R);
        return;
    }
    struct mp_retrieval_stage *s = stage_of(l, be);
    size_t MC = (size_t)e->M * l->C * sizeof(float), R = (size_t)e->R;
    if (s->x.cap < MC || s->pre.cap < R * sizeof(float))
        mp_fatal("expert backward without the forward's device batch");
    float *dy = dev_grow(be, &s->y, MC), *dx = dev_grow(be, &s->dx, MC);
    float *dgate = dev_grow(be, &s->dgate, R * sizeof(float));
    be->from_host(dy, e->y_recv, MC);   // y_recv holds dy in backward
    be->experts_backward(l, dx, dgate, dy, s->x.p, e->M, s->slot_start.p, s->slot.p, s->row.p,
                         s->gate.p, s->pre.p, e->R);
    be->to_host(e->dx_recv, dx, MC);
    be->to_host(e->dgate, dgate, R * sizeof(float));
}

int mp_stage_single(const mp_retrieval_layer *l, const mp_backend *be) {
    return !be->host_memory && (!l->comm || l->comm->size == 1);
}

void mp_stage_forward_single(mp_retrieval_layer *l, const mp_backend *be, float *y,
                             const float *x, int N, int train) {
    struct mp_retrieval_stage *s = stage_of(l, be);
    int S = l->rc->heads * l->rc->topk;
    size_t R = (size_t)N * S;
    if (l->row_start != 0 || l->rows != l->rc->n_experts)
        mp_fatal("single-process experts on a shard of rows [%ld, %ld)", l->row_start,
                 l->row_start + l->rows);
    // slot_start (N+1) = t*S and slot (R) = i/S depend on N only: built once per N
    int64_t *start = dev_grow(be, &s->slot_start, ((size_t)N + 1) * sizeof(int64_t));
    int32_t *slot = dev_grow(be, &s->slot, (R ? R : 1) * sizeof(int32_t));
    if (s->single_N != N) {
        int64_t *hs = mp_malloc(((size_t)N + 1) * sizeof(int64_t));
        int32_t *hl = mp_malloc((R ? R : 1) * sizeof(int32_t));
        for (int64_t t = 0; t <= N; t++) hs[t] = t * S;
        for (size_t i = 0; i < R; i++) hl[i] = (int32_t)(i / (size_t)S);
        be->from_host(start, hs, ((size_t)N + 1) * sizeof(int64_t));
        be->from_host(slot, hl, R * sizeof(int32_t));
        free(hs);
        free(hl);
        s->single_N = N;
    }
    float *pre = dev_grow(be, &s->pre, (R ? R : 1) * sizeof(float));
    // with one process an expert's row is its id: sel and the gates are the records
    be->experts_forward(l, y, x, N, start, slot, l->sel, l->gate, pre, (int64_t)R);
    if (l->usage) {
        const int32_t *sel = mp_stage_host(l, be, MP_STAGE_SEL, l->sel, R * sizeof(int32_t), 1);
        const float *gate = mp_stage_host(l, be, MP_STAGE_GATE, l->gate, R * sizeof(float), 1);
        for (size_t o = 0; o < R; o++) l->usage[sel[o]] += gate[o];
    }
    l->ex.M = N;
    l->ex.R = (int64_t)R;
    l->ex.stats.selections += (double)R;
    l->last_N = N;
    l->last_train = train;
}

void mp_stage_backward_single(mp_retrieval_layer *l, const mp_backend *be, float *dx,
                              const float *dy, const float *x, int N) {
    struct mp_retrieval_stage *s = stage_of(l, be);
    size_t NC = (size_t)N * l->C, R = (size_t)l->ex.R;
    if (s->single_N != N || s->pre.cap < R * sizeof(float))
        mp_fatal("expert backward without the forward's device batch");
    // experts_backward writes its dx (the experts' part); the layer's dx accumulates it
    float *part = dev_grow(be, &s->dx, (NC ? NC : 1) * sizeof(float));
    be->experts_backward(l, part, l->dgate, dy, x, N, s->slot_start.p, s->slot.p, l->sel,
                         l->gate, s->pre.p, (int64_t)R);
    be->residual_forward(dx, dx, part, (long)NC);
}

void mp_stage_free(mp_retrieval_layer *l) {
    struct mp_retrieval_stage *s = l->stage;
    if (!s) return;
    for (int i = 0; i < MP_STAGE_N; i++) free(s->host[i]);
    dev_buf *bufs[] = {&s->x, &s->y, &s->dx, &s->slot_start, &s->slot, &s->row, &s->gate,
                       &s->pre, &s->dgate};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++)
        if (bufs[i]->p) s->be->free(bufs[i]->p);
    free(s);
    l->stage = NULL;
}
