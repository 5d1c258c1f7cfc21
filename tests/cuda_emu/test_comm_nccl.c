// The nccl transport (src/backend/cuda/comm_nccl.cu) on the CUDA emulator and its NCCL
// stand-in (emu_nccl.cpp), under mpirun with 1-3 ranks and MP_EMU_DEVICES=4 (a GPU each):
// - alltoallv_f32 / alltoallv_i32 on device buffers against mp_comm_mpi's exchange of the
//   same data on host copies, bit for bit, with uneven counts (zeros among them) and blocks
//   laid out in reverse rank order with gaps, whose sentinel values must survive;
// - allreduce_f32 against mp_comm_mpi's, exactly: the values are integers below 2^10, so
//   every partial sum of at most 3 ranks is an integer below 2^24, which a float holds, and
//   any order of summation gives the same bits;
// - the control calls, which go to the host transport;
// - device memory is closed to host code again after every call (the emulator makes it
//   PROT_NONE outside device work; the stand-in opens it to MPI only while MPI runs);
// - the stand-in itself: a host pointer (and a device buffer too short for its count) is
//   refused, an unmatched send/receive pair fails on every rank, different unique ids fail.
// - the stand-in's nonblocking communicators: ncclInProgress, then the polls, and a call
//   made before the polls reported the end refused on every rank.
// With the argument "shared" (mpirun -n 2, MP_EMU_DEVICES=1: both ranks on GPU 0, as on a
// one-GPU machine) it checks that mp_comm_nccl refuses, naming the ranks and the GPU.
// With "fault SECONDS" it runs exchanges and all-reduces with that timeout until a fault
// that MP_EMU_NCCL_FAULT injects ends the job (the ctest entries emu.nccl_fault.* check the
// one line it ends with); exit status 3 if the exchanges all finish.
#include <mpi.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <errno.h>
#include <cmocka.h>
#include <nccl.h>   // the stand-in's (tests/cuda_emu/include)
#include "core/log.h"
#include "core/rng.h"
#include "millipede/backend.h"
#include "millipede/comm.h"

static const mp_backend *be;
static mp_comm *host;   // mp_comm_mpi: the reference, and the nccl transport's control calls
static mp_comm *nc;
static int me, P;

#define ROUNDS 4
#define TIMEOUT_S 120.0   // no call here comes near it
#define GAP 2   // sentinel elements before, between and after the blocks

// elements rank s sends rank d in a round: uneven, a zero now and then for every pair
static int64_t count_of(int s, int d, int round) {
    static const int64_t sizes[8] = {0, 1, 3, 17, 0, 64, 5, 1000};
    return sizes[(5 * s + 3 * d + 2 * round) % 8];
}

// blocks in reverse rank order, GAP elements around each; returns the total length
static int64_t layout(const int64_t *counts, int64_t *displs) {
    int64_t at = GAP;
    for (int r = P - 1; r >= 0; r--) {
        displs[r] = at;
        at += counts[r] + GAP;
    }
    return at;
}

static void plan(int round, int64_t *sc, int64_t *sd, int64_t *rc, int64_t *rd, int64_t *ns,
                 int64_t *nr) {
    for (int r = 0; r < P; r++) {
        sc[r] = count_of(me, r, round);
        rc[r] = count_of(r, me, round);
    }
    *ns = layout(sc, sd);
    *nr = layout(rc, rd);
}

static void *dev_copy(const void *h, size_t bytes) {
    void *d = be->alloc(bytes);
    be->from_host(d, h, bytes);
    return d;
}

// ---------------------------------------------------------------------------------------
// the transport against mp_comm_mpi

static void transport_fields(void **state) {
    (void)state;
    assert_string_equal(nc->name, "nccl");
    assert_int_equal(nc->device_buffers, 1);
    assert_int_equal(nc->rank, me);
    assert_int_equal(nc->size, P);
}

// one exchange of elem-byte elements (float or int32) both ways, compared bitwise
static void check_alltoallv(int is_f32) {
    int64_t sc[3], sd[3], rc[3], rd[3], ns, nr, moved = 0;
    for (int round = 0; round < ROUNDS; round++) {
        plan(round, sc, sd, rc, rd, &ns, &nr);
        uint32_t *send = malloc((size_t)ns * 4), *want = malloc((size_t)nr * 4),
                 *got = malloc((size_t)nr * 4);
        for (int64_t i = 0; i < ns; i++) {
            uint64_t h = mp_hash3(11, (uint64_t)(me * ROUNDS + round), (uint64_t)i);
            float f = 200.0f * mp_uniform(11, (uint64_t)(me * ROUNDS + round), (uint64_t)i) - 100.0f;
            if (is_f32) memcpy(&send[i], &f, 4); else send[i] = (uint32_t)h;
        }
        for (int64_t i = 0; i < nr; i++) want[i] = 0xdeadbeefu;   // sentinel in the gaps
        void *d_send = dev_copy(send, (size_t)ns * 4), *d_recv = dev_copy(want, (size_t)nr * 4);
        if (is_f32) {
            nc->alltoallv_f32(nc, d_send, sc, sd, d_recv, rc, rd);
            host->alltoallv_f32(host, (const float *)send, sc, sd, (float *)want, rc, rd);
        } else {
            nc->alltoallv_i32(nc, d_send, sc, sd, d_recv, rc, rd);
            host->alltoallv_i32(host, (const int32_t *)send, sc, sd, (int32_t *)want, rc, rd);
        }
        be->to_host(got, d_recv, (size_t)nr * 4);
        assert_memory_equal(got, want, (size_t)nr * 4);
        for (int r = 0; r < P; r++) moved += rc[r];
        be->free(d_send);
        be->free(d_recv);
        free(send); free(want); free(got);
    }
    assert_true(moved > 0);
}

static void alltoallv_f32_matches_mpi(void **state) {
    (void)state;
    check_alltoallv(1);
}

static void alltoallv_i32_matches_mpi(void **state) {
    (void)state;
    check_alltoallv(0);
}

static void allreduce_f32_matches_mpi(void **state) {
    (void)state;
    const size_t n = 1037;
    float *want = malloc(n * sizeof(float)), *got = malloc(n * sizeof(float));
    for (size_t i = 0; i < n; i++)
        want[i] = (float)((int)(mp_hash3(12, (uint64_t)me, i) % 2001) - 1000);   // [-1000, 1000]
    float *d = dev_copy(want, n * sizeof(float));
    nc->allreduce_f32(nc, d, n);
    host->allreduce_f32(host, want, n);
    be->to_host(got, d, n * sizeof(float));
    assert_memory_equal(got, want, n * sizeof(float));
    be->free(d);
    free(want); free(got);
}

static void control_calls_go_to_host(void **state) {
    (void)state;
    double sum = me + 1;
    nc->allreduce_f64(nc, &sum, 1);
    assert_true(sum == P * (P + 1) / 2.0);
    int v = me == P - 1 ? 42 : -1;
    nc->broadcast(nc, &v, sizeof v, P - 1);
    assert_int_equal(v, 42);
    int64_t send[6], recv[6];
    for (int r = 0; r < P; r++) send[2 * r] = 100 * me + r, send[2 * r + 1] = -me;
    nc->alltoall_i64(nc, send, recv, 2);
    for (int r = 0; r < P; r++) {
        assert_int_equal(recv[2 * r], 100 * r + me);
        assert_int_equal(recv[2 * r + 1], -r);
    }
    nc->barrier(nc);
}

// 1 when host code may read the byte at p: write(2) copies from it in the kernel, which
// fails with EFAULT on a PROT_NONE page instead of raising SIGSEGV
static int host_readable(const void *p) {
    int fd[2];
    assert_int_equal(pipe(fd), 0);
    ssize_t n = write(fd[1], p, 1);
    int e = errno;
    close(fd[0]);
    close(fd[1]);
    if (n == 1) return 1;
    assert_int_equal(e, EFAULT);
    return 0;
}

static void device_memory_closed_after_calls(void **state) {
    (void)state;
    int64_t sc[3], sd[3], rc[3], rd[3], ns, nr;
    plan(1, sc, sd, rc, rd, &ns, &nr);
    float *d_send = be->alloc((size_t)ns * 4), *d_recv = be->alloc((size_t)nr * 4);
    float h = 0.0f;
    assert_true(host_readable(&h));
    assert_false(host_readable(d_recv));
    nc->alltoallv_f32(nc, d_send, sc, sd, d_recv, rc, rd);
    assert_false(host_readable(d_send));
    assert_false(host_readable(d_recv));
    float *d_sum = be->alloc(64 * sizeof(float));   // the same length on every rank
    nc->allreduce_f32(nc, d_sum, 64);
    assert_false(host_readable(d_sum));
    be->free(d_send);
    be->free(d_recv);
    be->free(d_sum);
}

#ifdef MP_NCCL_STANDIN   // the emulator's stand-in (its nccl.h); real NCCL need not refuse these
// ---------------------------------------------------------------------------------------
// the stand-in's own checks, through its API

static ncclComm_t direct_comm(void) {
    ncclUniqueId id;
    memset(&id, 0, sizeof id);
    if (me == 0) assert_int_equal(ncclGetUniqueId(&id), ncclSuccess);
    MPI_Bcast(&id, sizeof id, MPI_BYTE, 0, MPI_COMM_WORLD);
    ncclComm_t c = NULL;
    assert_int_equal(ncclCommInitRank(&c, P, id, me), ncclSuccess);
    assert_non_null(c);
    return c;
}

// a ring: every rank sends 8 floats to the next and receives from the previous; rank 0's
// send buffer is `bad` when not NULL
static ncclResult_t ring(ncclComm_t c, const void *bad, float *d_send, float *d_recv,
                         ncclResult_t *send_rc) {
    assert_int_equal(ncclGroupStart(), ncclSuccess);
    *send_rc = ncclSend(me == 0 && bad ? bad : d_send, 8, ncclFloat, (me + 1) % P, c, 0);
    assert_int_equal(ncclRecv(d_recv, 8, ncclFloat, (me + P - 1) % P, c, 0), ncclSuccess);
    return ncclGroupEnd();
}

static void standin_refuses_host_memory(void **state) {
    (void)state;
    ncclComm_t c = direct_comm();
    float h[8];
    for (int i = 0; i < 8; i++) h[i] = (float)(10 * me + i);
    float *d_send = dev_copy(h, sizeof h), *d_recv = be->alloc(sizeof h);
    ncclResult_t send_rc;
    // a host pointer: refused by ncclSend on rank 0 and by ncclGroupEnd everywhere
    assert_int_equal(ring(c, h, d_send, d_recv, &send_rc), ncclInvalidArgument);
    assert_int_equal(send_rc, me == 0 ? ncclInvalidArgument : ncclSuccess);
    assert_non_null(strstr(ncclGetLastError(c), "rank 0: ncclSend"));
    assert_non_null(strstr(ncclGetLastError(c), "not device memory"));
    // device memory, but 8 floats from the 5th run past the allocation's end
    assert_int_equal(ring(c, d_send + 4, d_send, d_recv, &send_rc), ncclInvalidArgument);
    assert_int_equal(send_rc, me == 0 ? ncclInvalidArgument : ncclSuccess);
    assert_non_null(strstr(ncclGetLastError(c), "past its end"));
    // the same ring on device memory goes through, and moves the data
    assert_int_equal(ring(c, NULL, d_send, d_recv, &send_rc), ncclSuccess);
    assert_int_equal(send_rc, ncclSuccess);
    float got[8];
    be->to_host(got, d_recv, sizeof got);
    for (int i = 0; i < 8; i++) assert_true(got[i] == (float)(10 * ((me + P - 1) % P) + i));
    be->free(d_send);
    be->free(d_recv);
    assert_int_equal(ncclCommDestroy(c), ncclSuccess);
}

static void standin_refuses_unmatched_pairs(void **state) {
    (void)state;
    if (P < 2) skip();
    ncclComm_t c = direct_comm();
    float *d = be->alloc(8 * sizeof(float));
    // rank 0 sends 5 floats, rank 1 posts a receive of 4
    assert_int_equal(ncclGroupStart(), ncclSuccess);
    if (me == 0) assert_int_equal(ncclSend(d, 5, ncclFloat, 1, c, 0), ncclSuccess);
    if (me == 1) assert_int_equal(ncclRecv(d, 4, ncclFloat, 0, c, 0), ncclSuccess);
    assert_int_equal(ncclGroupEnd(), ncclInvalidUsage);
    const char *why = ncclGetLastError(c);
    assert_non_null(strstr(why, "rank 0 sends rank 1 5 x ncclFloat32"));
    assert_non_null(strstr(why, "rank 1 posts receives from rank 0 of 4 x ncclFloat32"));
    // the same count of another type
    assert_int_equal(ncclGroupStart(), ncclSuccess);
    if (me == 0) assert_int_equal(ncclSend(d, 4, ncclInt32, 1, c, 0), ncclSuccess);
    if (me == 1) assert_int_equal(ncclRecv(d, 4, ncclFloat, 0, c, 0), ncclSuccess);
    assert_int_equal(ncclGroupEnd(), ncclInvalidUsage);
    assert_non_null(strstr(ncclGetLastError(c), "4 x ncclInt32"));
    // a receive with no send at all
    assert_int_equal(ncclGroupStart(), ncclSuccess);
    if (me == 1) assert_int_equal(ncclRecv(d, 4, ncclFloat, 0, c, 0), ncclSuccess);
    assert_int_equal(ncclGroupEnd(), ncclInvalidUsage);
    assert_non_null(strstr(ncclGetLastError(c), "rank 0 sends rank 1 nothing"));
    // and the matched pair goes through afterwards
    assert_int_equal(ncclGroupStart(), ncclSuccess);
    if (me == 0) assert_int_equal(ncclSend(d, 4, ncclFloat, 1, c, 0), ncclSuccess);
    if (me == 1) assert_int_equal(ncclRecv(d + 4, 4, ncclFloat, 0, c, 0), ncclSuccess);
    assert_int_equal(ncclGroupEnd(), ncclSuccess);
    be->free(d);
    assert_int_equal(ncclCommDestroy(c), ncclSuccess);
}

static void standin_refuses_different_ids(void **state) {
    (void)state;
    if (P < 2) skip();
    ncclUniqueId id;
    assert_int_equal(ncclGetUniqueId(&id), ncclSuccess);   // each rank its own
    ncclComm_t c = (ncclComm_t)&id;
    assert_int_equal(ncclCommInitRank(&c, P, id, me), ncclInvalidUsage);
    assert_null(c);
    assert_non_null(strstr(ncclGetLastError(NULL), "different unique ids"));
}

// NCCL's nonblocking protocol, as the stand-in keeps it (emu_nccl.cpp): comm_nccl.cu relies
// on it, and a caller that skips the polls must fail
static void standin_nonblocking_protocol(void **state) {
    (void)state;
    ncclUniqueId id;
    if (me == 0) assert_int_equal(ncclGetUniqueId(&id), ncclSuccess);
    host->broadcast(host, &id, sizeof id, 0);
    ncclConfig_t bad;
    memset(&bad, 0, sizeof bad);
    ncclComm_t c = NULL;
    assert_int_equal(ncclCommInitRankConfig(&c, P, id, me, &bad), ncclInvalidArgument);
    assert_non_null(strstr(ncclGetLastError(NULL), "NCCL_CONFIG_INITIALIZER"));
    ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
    config.blocking = 0;
    assert_int_equal(ncclCommInitRankConfig(&c, P, id, me, &config), ncclInProgress);
    ncclResult_t st = ncclSuccess;
    int polls = 0;
    do {
        assert_int_equal(ncclCommGetAsyncError(c, &st), ncclSuccess);
        polls++;
    } while (st == ncclInProgress && polls < 100);
    assert_int_equal(st, ncclSuccess);
    assert_int_equal(polls, 3);
    float *d = be->alloc(4 * sizeof(float));
    be->zero(d, 4 * sizeof(float));
    assert_int_equal(ncclAllReduce(d, d, 4, ncclFloat, ncclSum, c, NULL), ncclInProgress);
    // the next call before the polls: refused, on every rank
    assert_int_equal(ncclAllReduce(d, d, 4, ncclFloat, ncclSum, c, NULL), ncclInvalidUsage);
    assert_non_null(strstr(ncclGetLastError(NULL), "still in progress"));
    do assert_int_equal(ncclCommGetAsyncError(c, &st), ncclSuccess); while (st == ncclInProgress);
    assert_int_equal(st, ncclSuccess);
    assert_int_equal(ncclCommFinalize(c), ncclInProgress);
    do assert_int_equal(ncclCommGetAsyncError(c, &st), ncclSuccess); while (st == ncclInProgress);
    assert_int_equal(ncclCommDestroy(c), ncclSuccess);
    be->free(d);
}

#endif   // MP_NCCL_STANDIN
// ---------------------------------------------------------------------------------------

static void shared_gpu_is_refused(void **state) {
    (void)state;
    char err[512] = "";
    mp_comm *c = mp_comm_nccl(host, TIMEOUT_S, err, sizeof err);
    assert_null(c);
    fprintf(stderr, "rank %d: %s\n", me, err);
    assert_non_null(strstr(err, "ranks 0 and 1 share GPU 0"));
    assert_non_null(strstr(err, "mpi_staged"));
}

// "fault SECONDS": rounds of an all-to-all and an all-reduce (calls 1, 2, 3, ... of the
// stand-in's count) until the injected fault ends the job, or mp_comm_nccl refuses (a
// fault in its start, call 0), which every rank reports
static int run_until_fault(double timeout_s) {
    char err[512] = "";
    nc = mp_comm_nccl(host, timeout_s, err, sizeof err);
    if (!nc) {
        fprintf(stderr, "test_comm_nccl: rank %d: mp_comm_nccl: %s\n", me, err);
        return 1;
    }
    for (int round = 0; round < 8; round++) {
        int64_t sc[3], sd[3], rc[3], rd[3], ns, nr;
        plan(round % ROUNDS, sc, sd, rc, rd, &ns, &nr);
        float *send = be->alloc((size_t)ns * 4), *recv = be->alloc((size_t)nr * 4);
        float *sum = be->alloc(64 * 4);   // the same count on every rank
        be->zero(send, (size_t)ns * 4);
        be->zero(sum, 64 * 4);
        nc->alltoallv_f32(nc, send, sc, sd, recv, rc, rd);
        nc->allreduce_f32(nc, sum, 64);
        be->free(send);
        be->free(recv);
        be->free(sum);
    }
    fprintf(stderr, "test_comm_nccl: rank %d: 16 calls finished: no fault ended the job\n", me);
    mp_comm_free(nc);
    return 3;
}

int main(int argc, char **argv) {
    MPI_Init(&argc, &argv);
    me = mp_rank();
    P = mp_world();
    int shared = argc > 1 && strcmp(argv[1], "shared") == 0;
    int fault = argc > 2 && strcmp(argv[1], "fault") == 0;
    char err[512] = "";
    be = mp_backend_cuda(err, sizeof err);
    if (!be) {   // a real CUDA build on a machine without a GPU: skipped, not passed
        fprintf(stderr, "SKIPPED: test_comm_nccl: %s\n", err);
        MPI_Finalize();
        return 77;
    }
    if (P > 3 || (shared && P < 2)) {
        fprintf(stderr, "test_comm_nccl: run under mpirun -n 1..3 (-n 2..3 with 'shared')\n");
        MPI_Finalize();
        return 1;
    }
    host = mp_comm_mpi();
    int failed;
    if (fault) {
        failed = run_until_fault(atof(argv[2]));
    } else if (shared) {
        const struct CMUnitTest tests[] = {cmocka_unit_test(shared_gpu_is_refused)};
        failed = cmocka_run_group_tests(tests, NULL, NULL);
    } else {
        nc = mp_comm_nccl(host, TIMEOUT_S, err, sizeof err);
        if (!nc) {
            fprintf(stderr, "test_comm_nccl: mp_comm_nccl: %s\n", err);
            MPI_Abort(MPI_COMM_WORLD, 1);
        }
        const struct CMUnitTest tests[] = {
            cmocka_unit_test(transport_fields),
            cmocka_unit_test(alltoallv_f32_matches_mpi),
            cmocka_unit_test(alltoallv_i32_matches_mpi),
            cmocka_unit_test(allreduce_f32_matches_mpi),
            cmocka_unit_test(control_calls_go_to_host),
            cmocka_unit_test(device_memory_closed_after_calls),
#ifdef MP_NCCL_STANDIN
            cmocka_unit_test(standin_refuses_host_memory),
            cmocka_unit_test(standin_refuses_unmatched_pairs),
            cmocka_unit_test(standin_refuses_different_ids),
            cmocka_unit_test(standin_nonblocking_protocol),
#endif
        };
        failed = cmocka_run_group_tests(tests, NULL, NULL);
        mp_comm_free(nc);
    }
    mp_comm_free(host);
    MPI_Finalize();
    return fault ? failed : failed ? 1 : 0;
}
