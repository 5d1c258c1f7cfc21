// The host-staged transport (comm.h, mpi_staged): device buffers go through host memory
// to the MPI transport. It is what ranks sharing one GPU use (NCCL refuses two ranks on a
// GPU) and works with any MPI, CUDA-aware or not. Every payload byte crosses the host
// twice, once each way: docs/design.md, "The exchange", compares the transports.
#include <stdlib.h>
#include "core/log.h"
#include "millipede/backend.h"
#include "millipede/comm.h"

typedef struct {
    const mp_backend *be;        // whose device memory the payload buffers are
    void *send, *recv;           // host staging, grown as needed
    size_t cap_send, cap_recv;
} staged_impl;

// Bytes spanned by counts/displacements (the extent the exchange reads or writes).
static size_t extent(const mp_comm *c, const int64_t *count, const int64_t *displ, size_t elem) {
    int64_t end = 0;
    for (int r = 0; r < c->size; r++)
        if (count[r] > 0 && displ[r] + count[r] > end) end = displ[r] + count[r];
    return (size_t)end * elem;
}

// recv's segments back to the device one peer at a time: what lies between them is not
// the exchange's to overwrite
static void copy_back(const mp_comm *c, const staged_impl *s, char *dst, const char *src,
                      const int64_t *count, const int64_t *displ, size_t elem) {
    for (int r = 0; r < c->size; r++)
        if (count[r] > 0)
            s->be->from_host(dst + displ[r] * elem, src + displ[r] * elem, count[r] * elem);
}

// send's extent to the host buffer, and the host receive buffer grown to recv's extent
static void stage_out(mp_comm *c, const void *send, const int64_t *sc, const int64_t *sd,
                      const int64_t *rc, const int64_t *rd, size_t elem) {
    staged_impl *s = c->impl;
    size_t sb = extent(c, sc, sd, elem), rb = extent(c, rc, rd, elem);
    s->send = mp_grow(s->send, &s->cap_send, sb ? sb : 1);
    s->recv = mp_grow(s->recv, &s->cap_recv, rb ? rb : 1);
    if (sb) s->be->to_host(s->send, send, sb);
}

static void alltoallv_f32(mp_comm *c, const float *send, const int64_t *sc, const int64_t *sd,
                          float *recv, const int64_t *rc, const int64_t *rd) {
    staged_impl *s = c->impl;
    stage_out(c, send, sc, sd, rc, rd, sizeof(float));
    c->control->alltoallv_f32(c->control, s->send, sc, sd, s->recv, rc, rd);
    copy_back(c, s, (char *)recv, s->recv, rc, rd, sizeof(float));
}

static void alltoallv_i32(mp_comm *c, const int32_t *send, const int64_t *sc, const int64_t *sd,
                          int32_t *recv, const int64_t *rc, const int64_t *rd) {
    staged_impl *s = c->impl;
    stage_out(c, send, sc, sd, rc, rd, sizeof(int32_t));
    c->control->alltoallv_i32(c->control, s->send, sc, sd, s->recv, rc, rd);
    copy_back(c, s, (char *)recv, s->recv, rc, rd, sizeof(int32_t));
}

static void allreduce_f32(mp_comm *c, float *buf, size_t n) {
    staged_impl *s = c->impl;
    if (c->size == 1 || n == 0) return;
    s->send = mp_grow(s->send, &s->cap_send, n * sizeof(float));
    s->be->to_host(s->send, buf, n * sizeof(float));
    c->control->allreduce_f32(c->control, s->send, n);
    s->be->from_host(buf, s->send, n * sizeof(float));
}

static void destroy(mp_comm *c) {
    staged_impl *s = c->impl;
    free(s->send);
    free(s->recv);
    free(s);
    free(c);
}

mp_comm *mp_comm_mpi_staged(mp_comm *host, const mp_backend *be) {
    if (host->device_buffers) mp_fatal("mpi_staged needs a host-buffer transport under it, not %s", host->name);
    mp_comm *c = mp_calloc(1, sizeof *c);
    staged_impl *s = mp_calloc(1, sizeof *s);
    s->be = be;
    c->name = "mpi_staged";
    c->device_buffers = 1;
    c->alltoallv_f32 = alltoallv_f32;
    c->alltoallv_i32 = alltoallv_i32;
    c->allreduce_f32 = allreduce_f32;
    c->destroy = destroy;
    mp_comm_control_from(c, host);
    c->impl = s;
    return c;
}
