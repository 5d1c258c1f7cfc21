// The MPI transport on host buffers (MPI_COMM_WORLD). MPI's all-to-all-v takes int counts
// and int displacements, which bound a whole send or receive buffer to 2^31 - 1 elements.
// Larger exchanges go as rounds of point-to-point messages of at most that many elements
// per peer, with pointer arithmetic in 64 bits: no size the memory allows is refused.
#include <limits.h>
#include <mpi.h>
#include <stdlib.h>
#include "core/log.h"
#include "millipede/comm.h"

typedef struct {
    int *sc, *sd, *rc, *rd;   // (size) int counts and displacements for MPI_Alltoallv
    MPI_Request *req;         // (2 size) the chunked path's requests
    int64_t max_count;        // the largest count or displacement one MPI call takes
} mpi_impl;

static void alltoall_i64(mp_comm *c, const int64_t *send, int64_t *recv, int k) {
    (void)c;
    MP_CHECK_MPI(MPI_Alltoall(send, k, MPI_INT64_T, recv, k, MPI_INT64_T, MPI_COMM_WORLD));
}

static int fits(const mp_comm *c, const int64_t *count, const int64_t *displ, int64_t max) {
    for (int r = 0; r < c->size; r++)
        if (count[r] < 0 || displ[r] < 0)
            mp_fatal("all-to-all with rank %d: negative count %lld or offset %lld", r,
                     (long long)count[r], (long long)displ[r]);
        else if (count[r] > max || displ[r] > max)
            return 0;
    return 1;
}

// Round after round, every peer's next piece of at most max elements, until all is moved.
// Pieces of one peer follow each other on one tag, and MPI keeps messages between two ranks
// on one tag in order, so each lands where it belongs.
static void alltoallv_chunked(mp_comm *c, const char *send, const int64_t *sc, const int64_t *sd,
                              char *recv, const int64_t *rc, const int64_t *rd, MPI_Datatype type,
                              size_t elem) {
    mpi_impl *m = c->impl;
    int64_t max = m->max_count, rounds = 0;
    for (int r = 0; r < c->size; r++) {
        int64_t need = (sc[r] > rc[r] ? sc[r] : rc[r]) + max - 1;
        if (need / max > rounds) rounds = need / max;
    }
    for (int64_t k = 0; k < rounds; k++) {
        int n = 0;
        int64_t o = k * max;
        for (int r = 0; r < c->size; r++) {
            if (rc[r] > o) {
                int len = (int)(rc[r] - o < max ? rc[r] - o : max);
                MP_CHECK_MPI(MPI_Irecv(recv + (size_t)(rd[r] + o) * elem, len, type, r, 7,
                                       MPI_COMM_WORLD, &m->req[n++]));
            }
            if (sc[r] > o) {
                int len = (int)(sc[r] - o < max ? sc[r] - o : max);
                MP_CHECK_MPI(MPI_Isend(send + (size_t)(sd[r] + o) * elem, len, type, r, 7,
                                       MPI_COMM_WORLD, &m->req[n++]));
            }
        }
        MP_CHECK_MPI(MPI_Waitall(n, m->req, MPI_STATUSES_IGNORE));
    }
}

static void alltoallv(mp_comm *c, const void *send, const int64_t *sc, const int64_t *sd,
                      void *recv, const int64_t *rc, const int64_t *rd, MPI_Datatype type,
                      size_t elem) {
    mpi_impl *m = c->impl;
    // every rank must take the same path: the chunked one posts point-to-point messages
    // that an MPI_Alltoallv on the peer would not match
    int big = !fits(c, sc, sd, m->max_count) || !fits(c, rc, rd, m->max_count);
    MP_CHECK_MPI(MPI_Allreduce(MPI_IN_PLACE, &big, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD));
    if (big) {
        alltoallv_chunked(c, send, sc, sd, recv, rc, rd, type, elem);
        return;
    }
    for (int r = 0; r < c->size; r++) {
        m->sc[r] = (int)sc[r];
        m->sd[r] = (int)sd[r];
        m->rc[r] = (int)rc[r];
        m->rd[r] = (int)rd[r];
    }
    MP_CHECK_MPI(MPI_Alltoallv(send, m->sc, m->sd, type, recv, m->rc, m->rd, type, MPI_COMM_WORLD));
}

static void alltoallv_f32(mp_comm *c, const float *send, const int64_t *sc, const int64_t *sd,
                          float *recv, const int64_t *rc, const int64_t *rd) {
    alltoallv(c, send, sc, sd, recv, rc, rd, MPI_FLOAT, sizeof(float));
}

static void alltoallv_i32(mp_comm *c, const int32_t *send, const int64_t *sc, const int64_t *sd,
                          int32_t *recv, const int64_t *rc, const int64_t *rd) {
    alltoallv(c, send, sc, sd, recv, rc, rd, MPI_INT32_T, sizeof(int32_t));
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
    free(m->sc); free(m->sd); free(m->rc); free(m->rd); free(m->req);
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
    m->req = mp_calloc(2 * (size_t)c->size, sizeof(MPI_Request));
    // MP_MPI_MAX_COUNT (tests only): a smaller bound, so that small exchanges take the
    // chunked path
    m->max_count = INT_MAX;
    const char *cap = getenv("MP_MPI_MAX_COUNT");
    if (cap && *cap) {
        char *end;
        long long v = strtoll(cap, &end, 10);
        if (*end || v < 1 || v > INT_MAX)
            mp_fatal("MP_MPI_MAX_COUNT = '%s': expected an integer in [1, %d]", cap, INT_MAX);
        m->max_count = v;
    }
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
