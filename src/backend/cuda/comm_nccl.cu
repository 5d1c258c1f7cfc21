// The NCCL transport (include/millipede/comm.h): payload calls move device buffers between
// the ranks' GPUs with NCCL, control calls go to the host MPI transport it is built on.
//
// NCCL runs one rank per GPU: two ranks on one GPU make it fail at init (or hang), so
// mp_comm_nccl first compares every rank's (host, PCI address of its GPU) and refuses the
// sharing with a reason, the same on every rank since all of them see the same table. The
// PCI address and not the device number: with CUDA_VISIBLE_DEVICES set per rank (Slurm's
// --gpus-per-task) every rank is device 0 of its own GPU.
//
// Everything runs on the legacy default stream, as the backend does (cuda_common.h): an
// exchange starts after the kernels that filled its buffers and the kernels after it see
// its results, with no synchronisation here.
//
// No wait is unbounded (docs/cuda.md, "When a peer fails"). The communicator is nonblocking
// (ncclConfig_t.blocking = 0), so no NCCL call blocks the host: a call that starts work may
// answer ncclInProgress, and ncclCommGetAsyncError then says when the work is on the stream
// or that it failed. The wait for the data polls an event recorded after the work, and the
// communicator's asynchronous error with it. A wait that ends in an error, or that passes
// system.nccl_timeout, ends the job with one line naming the rank, the call and the reason:
// a peer that died, a failed link (ncclRemoteError and NCCL's message), or a peer that
// stopped without an error, which only the deadline catches. The process exits through
// MPI_Abort, which takes every rank down and frees the GPU with them; the communicator is
// not aborted first, as nothing of it outlives the process.
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include "backend/cuda/cuda.h"
#include "backend/cuda/cuda_common.h"
extern "C" {
#include "millipede/comm.h"
}

#ifdef MP_HAVE_NCCL
#include <nccl.h>
#endif

// nonblocking communicators (ncclConfig_t, ncclCommGetAsyncError's ncclInProgress) came
// with NCCL 2.14
#if defined(MP_HAVE_NCCL) && NCCL_VERSION_CODE >= 21400

// Every NCCL call goes through NCCL_CHECK: a failure ends the job (mp_fatal aborts every
// rank) with file:line, the call, NCCL's name of the code and its last error message.
static void nccl_check_at(ncclResult_t rc, const char *what, const char *file, int line) {
    if (rc == ncclSuccess) return;
    const char *last = ncclGetLastError(NULL);
    if (!last) last = "";
    mp_fatal_at(file, line, "NCCL error %s (%d) in %s%s%s", ncclGetErrorString(rc), (int)rc, what,
                *last ? ": " : "", last);
}
#define NCCL_CHECK(call) nccl_check_at((call), #call, __FILE__, __LINE__)

typedef struct {
    ncclComm_t nccl;
    double timeout_s;   // system.nccl_timeout: the longest any call may take
    cudaEvent_t done;   // recorded after each payload call's work
} nccl_impl;

static nccl_impl *impl_of(mp_comm *c) { return (nccl_impl *)c->impl; }

// Until the communicator's last call has its work on the stream (ncclCommGetAsyncError no
// longer ncclInProgress) and, with ev, until ev has completed on the GPU. For the first 20 ms
// the polls only yield the CPU, so that a transfer's end is seen within microseconds, as
// cudaDeviceSynchronize would; after that (a peer late, or a long transfer) they sleep 100 us
// each.
// Returns NCCL's final state of the call. Past the deadline it ends the job, or with late
// sets *late and returns ncclInProgress. Polls come at most 100 us apart (and a little): two
// more than 5 s apart mean the process was stopped (a suspended job), and that time does
// not count.
static ncclResult_t poll_until_done(nccl_impl *m, cudaEvent_t ev, const char *what, double t0,
                                    int *late, const char *file, int line) {
    double prev = mp_now();
    for (;;) {
        ncclResult_t state = ncclSuccess;
        nccl_check_at(ncclCommGetAsyncError(m->nccl, &state), "ncclCommGetAsyncError", file,
                      line);
        if (state != ncclSuccess && state != ncclInProgress) return state;
        if (state == ncclSuccess) {
            if (!ev) return ncclSuccess;
            cudaError_t q = cudaEventQuery(ev);
            if (q == cudaSuccess) return ncclSuccess;
            if (q != cudaErrorNotReady) mp_cuda_check_at(q, "cudaEventQuery", file, line);
        }
        double now = mp_now();
        if (now - prev > 5.0) t0 += now - prev;
        prev = now;
        double waited = now - t0;
        if (waited > m->timeout_s && late) {
            *late = 1;
            return ncclInProgress;
        }
        if (waited > m->timeout_s)
            mp_fatal_at(file, line, "%s did not finish within system.nccl_timeout = %g s (%s): "
                        "a peer stopped without an error, or its link stalled", what,
                        m->timeout_s, state == ncclInProgress ? "NCCL still issuing it"
                                                               : "its GPU work still waiting");
        if (waited < 0.02) {
            sched_yield();
        } else {
            struct timespec ts = {0, 100000};
            nanosleep(&ts, NULL);
        }
    }
}

// The result of a call of the operation `what` started at t0, checked: ncclInProgress (a
// nonblocking communicator) is waited out first. An error ends the job as NCCL_CHECK's do,
// with NCCL's message; file:line tells which call of the operation it was.
static void issued_at(nccl_impl *m, ncclResult_t rc, const char *what, double t0,
                      const char *file, int line) {
    if (rc == ncclInProgress) rc = poll_until_done(m, NULL, what, t0, NULL, file, line);
    nccl_check_at(rc, what, file, line);
}
#define ISSUED(m, call, what, t0) issued_at((m), (call), (what), (t0), __FILE__, __LINE__)

// A payload call returns when its data is there, as the MPI transports' do: the exchange
// times its calls (waiting included) and reads received records on the host next. Without
// this the transfer would be charged to whatever synchronised next. (Overlapping the
// exchange with compute would remove it: docs/cuda.md.) The final synchronisation finds
// nothing left to wait for; it is the backend's, which the kernel timer counts on.
static void arrived_at(nccl_impl *m, const char *what, double t0, const char *file, int line) {
    mp_cuda_check_at(cudaEventRecord(m->done, 0), "cudaEventRecord", file, line);
    nccl_check_at(poll_until_done(m, m->done, what, t0, NULL, file, line), what, file, line);
    mp_cuda_synchronize();
}

// One group of sends and receives: NCCL matches each pair's send with the peer's receive
// and runs them together. Counts are size_t in NCCL, so no per-peer limit below the memory.
static void alltoallv(mp_comm *c, const void *send, const int64_t *sc, const int64_t *sd,
                      void *recv, const int64_t *rc, const int64_t *rd, ncclDataType_t type,
                      size_t elem) {
    for (int r = 0; r < c->size; r++)
        if (sc[r] < 0 || sd[r] < 0 || rc[r] < 0 || rd[r] < 0)
            mp_fatal("all-to-all with rank %d: negative count or offset (send %lld at %lld, "
                     "receive %lld at %lld)", r, (long long)sc[r], (long long)sd[r],
                     (long long)rc[r], (long long)rd[r]);
    static const char what[] = "the all-to-all (ncclSend/ncclRecv)";
    nccl_impl *m = impl_of(c);
    double t0 = mp_now();
    NCCL_CHECK(ncclGroupStart());
    for (int r = 0; r < c->size; r++) {
        if (sc[r])
            ISSUED(m, ncclSend((const char *)send + (size_t)sd[r] * elem, (size_t)sc[r], type, r,
                               m->nccl, 0), what, t0);
        if (rc[r])
            ISSUED(m, ncclRecv((char *)recv + (size_t)rd[r] * elem, (size_t)rc[r], type, r,
                               m->nccl, 0), what, t0);
    }
    ISSUED(m, ncclGroupEnd(), what, t0);
    mp_cuda_mark("ncclSend/ncclRecv", __FILE__, __LINE__);
    arrived_at(m, what, t0, __FILE__, __LINE__);
}

static void alltoallv_f32(mp_comm *c, const float *send, const int64_t *sc, const int64_t *sd,
                          float *recv, const int64_t *rc, const int64_t *rd) {
    alltoallv(c, send, sc, sd, recv, rc, rd, ncclFloat, sizeof(float));
}

static void alltoallv_i32(mp_comm *c, const int32_t *send, const int64_t *sc, const int64_t *sd,
                          int32_t *recv, const int64_t *rc, const int64_t *rd) {
    alltoallv(c, send, sc, sd, recv, rc, rd, ncclInt32, sizeof(int32_t));
}

static void allreduce_f32(mp_comm *c, float *buf, size_t n) {
    static const char what[] = "the all-reduce (ncclAllReduce)";
    nccl_impl *m = impl_of(c);
    double t0 = mp_now();
    if (n) {
        ISSUED(m, ncclAllReduce(buf, buf, n, ncclFloat, ncclSum, m->nccl, 0), what, t0);
        mp_cuda_mark("ncclAllReduce", __FILE__, __LINE__);
    }
    arrived_at(m, what, t0, __FILE__, __LINE__);
}

static void destroy(mp_comm *c) {
    nccl_impl *m = impl_of(c);
    // waits for the peers, within the deadline
    ISSUED(m, ncclCommFinalize(m->nccl), "closing the communicator (ncclCommFinalize)", mp_now());
    NCCL_CHECK(ncclCommDestroy(m->nccl));
    CUDA_CHECK(cudaEventDestroy(m->done));
    free(m);
    free(c);
}

// 52 bits of FNV-1a: the host's name as an integer that a double holds exactly
static double host_hash(const char *name) {
    uint64_t h = 1469598103934665603ull;
    for (const char *p = name; *p; p++) h = (h ^ (unsigned char)*p) * 1099511628211ull;
    return (double)(h >> 12);
}

// Columns of the table every rank fills its row of: whether its GPU could be queried (else
// the CUDA error code in DEV), its host, its GPU's PCI address, its device number.
enum { COL_OK, COL_HOST, COL_PCI, COL_DEV, NCOL };

// The same answer on every rank: 0, or -1 with the reason when a rank could not query its
// GPU or two ranks share one.
static int check_one_gpu_per_rank(mp_comm *host, char *err, size_t err_len) {
    int P = host->size;
    double *t = (double *)mp_calloc((size_t)P * NCOL, sizeof(double));
    double *row = t + (size_t)host->rank * NCOL;
    char name[256] = "", key[320];
    if (gethostname(name, sizeof name - 1) != 0) snprintf(name, sizeof name, "(unknown host)");
    // containers may share a host name; the kernel's boot id tells machines apart (NCCL
    // does the same)
    char boot[40] = "";
    FILE *f = fopen("/proc/sys/kernel/random/boot_id", "r");
    if (f) {
        if (!fgets(boot, sizeof boot, f)) boot[0] = '\0';
        fclose(f);
    }
    snprintf(key, sizeof key, "%s/%s", name, boot);
    int dev = -1;
    cudaDeviceProp prop;
    cudaError_t rc = cudaGetDevice(&dev);
    if (rc == cudaSuccess) rc = cudaGetDeviceProperties(&prop, dev);
    if (rc == cudaSuccess) {
        row[COL_OK] = 1;
        row[COL_HOST] = host_hash(key);
        row[COL_PCI] = (double)(((uint64_t)prop.pciDomainID << 16) | ((uint64_t)prop.pciBusID << 8) |
                                (uint64_t)prop.pciDeviceID);
        row[COL_DEV] = dev;
    } else {
        row[COL_DEV] = (double)rc;
    }
    host->allreduce_f64(host, t, (size_t)P * NCOL);   // zeros but one row each: exact sums
    int result = 0;
    for (int i = 0; i < P && !result; i++)
        if (t[i * NCOL + COL_OK] != 1) {
            mp_errf(err, err_len, "rank %d could not query its GPU for NCCL: CUDA error %d",
                    i, (int)t[i * NCOL + COL_DEV]);
            result = -1;
        }
    for (int i = 0; i < P && !result; i++)
        for (int j = i + 1; j < P && !result; j++) {
            const double *a = t + i * NCOL, *b = t + j * NCOL;
            if (a[COL_HOST] != b[COL_HOST] || a[COL_PCI] != b[COL_PCI]) continue;
            host->broadcast(host, name, sizeof name, i);   // every rank found the same i
            uint64_t pci = (uint64_t)a[COL_PCI];
            mp_errf(err, err_len, "ranks %d and %d share GPU %d (PCI %04x:%02x:%02x) on %s: NCCL "
                    "needs one GPU per rank (use system.transport = mpi_staged)", i, j,
                    (int)a[COL_DEV], (unsigned)(pci >> 16), (unsigned)(pci >> 8 & 0xff),
                    (unsigned)(pci & 0xff), name);
            result = -1;
        }
    free(t);
    return result;
}

extern "C" mp_comm *mp_comm_nccl(mp_comm *host, double timeout_s, char *err, size_t err_len) {
    if (check_one_gpu_per_rank(host, err, err_len) != 0) return NULL;
    // NCCL may fail to start where it cannot set up its transports (a container without
    // enough /dev/shm, say), or a rank's start may wait past the deadline (for a peer whose
    // own start failed, say): every rank learns whether any failed, and why, so that auto
    // can fall back to mpi_staged together
    struct { int rc; ncclUniqueId id; } hello;
    memset(&hello, 0, sizeof hello);
    if (host->rank == 0) hello.rc = (int)ncclGetUniqueId(&hello.id);
    host->broadcast(host, &hello, sizeof hello, 0);
    if (hello.rc != ncclSuccess) {
        mp_errf(err, err_len, "NCCL could not start: ncclGetUniqueId on rank 0: %s",
                ncclGetErrorString((ncclResult_t)hello.rc));
        return NULL;
    }
    nccl_impl *m = (nccl_impl *)mp_calloc(1, sizeof *m);
    m->timeout_s = timeout_s;
    ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
    config.blocking = 0;
    double t0 = mp_now();
    int late = 0;
    ncclResult_t rc = ncclCommInitRankConfig(&m->nccl, host->size, hello.id, host->rank, &config);
    if (rc == ncclInProgress)
        rc = poll_until_done(m, NULL, "starting NCCL", t0, &late, __FILE__, __LINE__);
    // (P) each rank's outcome: 0, NCCL's error code, or -1 for a start past the deadline
    double *failed = (double *)mp_calloc((size_t)host->size, sizeof(double));
    failed[host->rank] = late ? -1.0 : (double)rc;
    host->allreduce_f64(host, failed, (size_t)host->size);
    // the reason: the first rank with an error of NCCL's, else the first that timed out
    // (an error is usually why the others waited)
    int why = -1;
    for (int r = 0; r < host->size && (why < 0 || failed[why] < 0); r++)
        if (failed[r] > 0 || (failed[r] < 0 && why < 0)) why = r;
    if (why >= 0) {
        if (failed[why] > 0)
            mp_errf(err, err_len, "NCCL could not start: ncclCommInitRankConfig on rank %d: %s",
                    why, ncclGetErrorString((ncclResult_t)(int)failed[why]));
        else
            mp_errf(err, err_len, "NCCL could not start: ncclCommInitRankConfig on rank %d did "
                    "not finish within system.nccl_timeout = %g s", why, timeout_s);
        // this rank's communicator, started, failed or still starting: abort waits for no peer
        if (m->nccl) NCCL_CHECK(ncclCommAbort(m->nccl));
        free(failed);
        free(m);
        return NULL;
    }
    free(failed);
    CUDA_CHECK(cudaEventCreate(&m->done));
    mp_comm *c = (mp_comm *)mp_calloc(1, sizeof *c);
    c->name = "nccl";
    c->device_buffers = 1;
    c->impl = m;
    c->alltoallv_f32 = alltoallv_f32;
    c->alltoallv_i32 = alltoallv_i32;
    c->allreduce_f32 = allreduce_f32;
    c->destroy = destroy;
    mp_comm_control_from(c, host);
    return c;
}

#else   // CUDA without NCCL: the build still works, the transport says why it is missing

extern "C" mp_comm *mp_comm_nccl(mp_comm *host, double timeout_s, char *err, size_t err_len) {
    (void)host;
    (void)timeout_s;
#ifdef MP_HAVE_NCCL
    mp_errf(err, err_len, "this build's NCCL is %d.%d; the nccl transport needs 2.14 or later "
            "(nonblocking communicators)", NCCL_MAJOR, NCCL_MINOR);
#else
    mp_errf(err, err_len, "this build has no NCCL (nccl.h / libnccl not found at configure time)");
#endif
    return NULL;
}

#endif
