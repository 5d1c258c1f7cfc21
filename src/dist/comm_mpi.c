// The MPI transport on host buffers (MPI_COMM_WORLD). MPI's all-to-all-v takes int
// counts, so a payload over INT_MAX elements per peer is refused rather than truncated.
#include <limits.h>
#include <mpi.h>
#include <stdlib.h>
#include "core/log.h"
#include "millipede/comm.h"

typedef struct {
    int *sc, *sd, *rc, *rd;   // (size) int counts and displacements for MPI
} mpi_impl;

static void to_int(mp_comm *c, const int64_t *src, int *dst, const char *what) {
    for (int r = 0; r < c->size; r++) {
        if (src[r] < 0 || src[r] > INT_MAX)
            mp_fatal("all-to-all %s for rank %d is %lld elements, beyond MPI's int range", what, r,
                     (long long)src[r]);
        dst[r] = (int)src[r];
    }
}

static void alltoall_i64(mp_comm *c, const int64_t *send, int64_t *recv, int k) {
    (void)c;
    MP_CHECK_MPI(MPI_Alltoall(send, k, MPI_INT64_T, recv, k, MPI_INT64_T, MPI_COMM_WORLD));
}

static void alltoallv(mp_comm *c, const void *send, const int64_t *sc, const int64_t *sd,
                      void *recv, const int64_t *rc, const int64_t *rd, MPI_Datatype type) {
    mpi_impl *m = c->impl;
    to_int(c, sc, m->sc, "send count");
    to_int(c, sd, m->sd, "send offset");
    to_int(c, rc, m->rc, "receive count");
    to_int(c, rd, m->rd, "receive offset");
    MP_CHECK_MPI(MPI_Alltoallv(send, m->sc, m->sd, type, recv, m->rc, m->rd, type, MPI_COMM_WORLD));
}

static void alltoallv_f32(mp_comm *c, const float *send, const int64_t *sc, const int64_t *sd,
                          float *recv, const int64_t *rc, const int64_t *rd) {
    alltoallv(c, send, sc, sd, recv, rc, rd, MPI_FLOAT);
}

static void alltoallv_i32(mp_comm *c, const int32_t *send, const int64_t *sc, const int64_t *sd,
                          int32_t *recv, const int64_t *rc, const int64_t *rd) {
    alltoallv(c, send, sc, sd, recv, rc, rd, MPI_INT32_T);
}

// Large buffers go in pieces so each call's count fits MPI's int.
static void allreduce(void *buf, size_t n, size_t elem, MPI_Datatype type) {
    const size_t piece = (size_t)1 << 30;
    for (size_t o = 0; o < n; o += piece) {
        size_t k = n - o < piece ? n - o : piece;
        MP_CHECK_MPI(MPI_Allreduce(MPI_IN_PLACE, (char *)buf + o * elem, (int)k, type, MPI_SUM,
                                   MPI_COMM_WORLD));
    }
}

static void allreduce_f32(mp_comm *c, float *buf, size_t n) {
    if (c->size > 1) allreduce(buf, n, sizeof(float), MPI_FLOAT);
}

static void allreduce_f64(mp_comm *c, double *buf, size_t n) {
    if (c->size > 1) allreduce(buf, n, sizeof(double), MPI_DOUBLE);
}

static void broadcast(mp_comm *c, void *buf, size_t bytes, int root) {
    if (c->size == 1) return;
    const size_t piece = (size_t)1 << 30;
    for (size_t o = 0; o < bytes; o += piece) {
        size_t k = bytes - o < piece ? bytes - o : piece;
        MP_CHECK_MPI(MPI_Bcast((char *)buf + o, (int)k, MPI_BYTE, root, MPI_COMM_WORLD));
    }
}

static void barrier(mp_comm *c) {
    (void)c;
    MP_CHECK_MPI(MPI_Barrier(MPI_COMM_WORLD));
}

static void destroy(mp_comm *c) {
    mpi_impl *m = c->impl;
    free(m->sc); free(m->sd); free(m->rc); free(m->rd);
    free(m);
    free(c);
}

mp_comm *mp_comm_mpi(void) {
    mp_comm *c = mp_calloc(1, sizeof *c);
    mpi_impl *m = mp_calloc(1, sizeof *m);
    c->name = "mpi";
    MP_CHECK_MPI(MPI_Comm_rank(MPI_COMM_WORLD, &c->rank));
    MP_CHECK_MPI(MPI_Comm_size(MPI_COMM_WORLD, &c->size));
    // errors come back to the caller, which reports file:line and aborts the job
    MP_CHECK_MPI(MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN));
    m->sc = mp_calloc(c->size, sizeof(int));
    m->sd = mp_calloc(c->size, sizeof(int));
    m->rc = mp_calloc(c->size, sizeof(int));
    m->rd = mp_calloc(c->size, sizeof(int));
    c->impl = m;
    c->alltoall_i64 = alltoall_i64;
    c->alltoallv_f32 = alltoallv_f32;
    c->alltoallv_i32 = alltoallv_i32;
    c->allreduce_f32 = allreduce_f32;
    c->allreduce_f64 = allreduce_f64;
    c->broadcast = broadcast;
    c->barrier = barrier;
    c->destroy = destroy;
    return c;
}

static void fwd_alltoall_i64(mp_comm *c, const int64_t *send, int64_t *recv, int k) {
    c->control->alltoall_i64(c->control, send, recv, k);
}
static void fwd_allreduce_f64(mp_comm *c, double *buf, size_t n) {
    c->control->allreduce_f64(c->control, buf, n);
}
static void fwd_broadcast(mp_comm *c, void *buf, size_t bytes, int root) {
    c->control->broadcast(c->control, buf, bytes, root);
}
static void fwd_barrier(mp_comm *c) { c->control->barrier(c->control); }

void mp_comm_control_from(mp_comm *c, mp_comm *host) {
    c->control = host;
    c->rank = host->rank;
    c->size = host->size;
    c->alltoall_i64 = fwd_alltoall_i64;
    c->allreduce_f64 = fwd_allreduce_f64;
    c->broadcast = fwd_broadcast;
    c->barrier = fwd_barrier;
}

void mp_comm_free(mp_comm *c) {
    if (c) c->destroy(c);
}
