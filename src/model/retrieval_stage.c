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
