// The emulator's stand-in for NCCL (README.md here, "NCCL"): the calls of include/nccl.h
// carried over MPI between the ranks' emulated device memory, so that
// src/backend/cuda/comm_nccl.cu runs in the tests on machines without a GPU.
//
// It mirrors what NCCL promises and what its callers can get wrong:
// - sends and receives inside ncclGroupStart/End are queued and move together at the
//   outermost ncclGroupEnd; a call outside a group is a group of its own;
// - every buffer must be device memory (one cudaMalloc allocation, count elements long):
//   a host pointer is refused, as NCCL refuses it;
// - at ncclGroupEnd each rank learns what every peer sends it and checks it against the
//   receives it posted (the number of operations, each count and type, in order); a
//   mismatch, which on NCCL hangs or corrupts, is refused on every rank with ncclInvalidUsage;
// - ncclCommInitRank refuses ranks that pass different unique ids;
// - a nonblocking communicator (ncclConfig_t.blocking = 0) answers ncclInProgress to each
//   call that starts work, reports ncclInProgress to the next two ncclCommGetAsyncError
//   polls, and refuses any call made before a poll reported the end (ncclInvalidUsage), so
//   that a caller who does not poll fails the tests.
// MP_EMU_NCCL_FAULT = KIND:RANK:CALL injects a fault into rank RANK's CALL-th (from 1) call
// that moves data (an outermost ncclGroupEnd, an ncclAllReduce), after its data moved:
//   stall    the device never finishes that call's work (mp_emu::stall_device), and nothing
//            says why: a peer that stopped sending, as NCCL sees it;
//   error    the same, and the communicator reports ncclRemoteError asynchronously: a
//            network failure or a peer's process gone;
//   pending  the call never leaves ncclInProgress (nonblocking communicators); CALL 0 is
//            the communicator's initialisation.
// A refusal on one rank reaches all of them: the lowest refusing rank's code and message
// (ncclGetLastError) go to every rank, so no rank waits for a peer that gave up.
//
// Unlike NCCL, every group (and every send or receive outside a group) is collective over
// all ranks while a communicator lives: a group that only some ranks call hangs here. The
// callers here run all-to-alls, which every rank calls. Collectives (ncclAllReduce) run
// outside groups only. A communicator spans MPI_COMM_WORLD, one rank per process.
// MPI's C API only: Open MPI's mpi.h pulls its C++ bindings (a library not linked) into C++
#define OMPI_SKIP_MPICXX 1
#define MPICH_SKIP_MPICXX 1
#include <mpi.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <climits>
#include <unistd.h>
#include <algorithm>
#include <string>
#include <vector>
#include "cuda_emu.h"
#include "nccl.h"

struct ncclComm {
    int rank, nranks;
    bool blocking;
    long in_progress;        // polls of ncclCommGetAsyncError until one reports the end
    const char *call;        // the call in progress
    ncclResult_t async;      // the asynchronous error (MP_EMU_NCCL_FAULT = error)
};

namespace {

const char ID_MAGIC[] = "mp-emu-nccl";
const size_t PIECE = (size_t)1 << 30;   // bytes per MPI call: MPI counts are int

MPI_Comm g_world = MPI_COMM_NULL;   // a dup of MPI_COMM_WORLD, made by the first init
int g_live;                          // communicators alive (made and destroyed collectively)
ncclComm_t g_comm;                   // the newest: an empty group's faults land on it
long g_calls;                        // calls that moved data, for MP_EMU_NCCL_FAULT
char g_last_error[1024];

struct Op {
    bool send;
    void *buf;
    size_t count;
    ncclDataType_t type;
    int peer;
    ncclComm_t comm;
};
int g_depth;                   // ncclGroupStart nesting
std::vector<Op> g_ops;         // queued until the outermost ncclGroupEnd
ncclResult_t g_group_rc;       // the first call of the group that was refused
char g_group_err[1024];

// MPI failing under the stand-in is a broken test setup, not a result to return
void mpi_check(int rc, const char *what) {
    if (rc == MPI_SUCCESS) return;
    char msg[MPI_MAX_ERROR_STRING];
    int len = 0;
    MPI_Error_string(rc, msg, &len);
    fprintf(stderr, "nccl stand-in: %s failed: %s\n", what, msg);
    MPI_Abort(MPI_COMM_WORLD, 1);
}
#define MPI_OK(call) mpi_check((call), #call)

int world_rank(void) {
    int ready = 0, r = -1;
    MPI_Initialized(&ready);
    if (ready) MPI_OK(MPI_Comm_rank(MPI_COMM_WORLD, &r));
    return r;
}

// A refused call: its message goes to the last error and, inside a group, makes the group
// fail at ncclGroupEnd (on every rank) with the first refusal's code.
ncclResult_t refuse(ncclResult_t rc, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
ncclResult_t refuse(ncclResult_t rc, const char *fmt, ...) {
    char msg[900];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    snprintf(g_last_error, sizeof g_last_error, "rank %d: %s", world_rank(), msg);
    if (g_depth > 0 && g_group_rc == ncclSuccess) {
        g_group_rc = rc;
        snprintf(g_group_err, sizeof g_group_err, "%s", g_last_error);
    }
    return rc;
}

// Every rank's rc becomes the lowest failing rank's, with its message as the last error.
ncclResult_t agree(ncclResult_t rc, const char *msg) {
    int me = 0, P = 1;
    MPI_OK(MPI_Comm_rank(g_world, &me));
    MPI_OK(MPI_Comm_size(g_world, &P));
    int first = rc != ncclSuccess ? me : P;
    MPI_OK(MPI_Allreduce(MPI_IN_PLACE, &first, 1, MPI_INT, MPI_MIN, g_world));
    if (first == P) return ncclSuccess;
    struct {
        int rc;
        char msg[1024];
    } m = {};
    if (me == first) {
        m.rc = (int)rc;
        snprintf(m.msg, sizeof m.msg, "%s", msg);
    }
    MPI_OK(MPI_Bcast(&m, (int)sizeof m, MPI_BYTE, first, g_world));
    snprintf(g_last_error, sizeof g_last_error, "%s", m.msg);
    return (ncclResult_t)m.rc;
}

size_t type_size(ncclDataType_t t) {
    switch (t) {
    case ncclInt8: case ncclUint8: case ncclFloat8e4m3: case ncclFloat8e5m2: return 1;
    case ncclFloat16: case ncclBfloat16: return 2;
    case ncclInt32: case ncclUint32: case ncclFloat32: return 4;
    case ncclInt64: case ncclUint64: case ncclFloat64: return 8;
    default: return 0;
    }
}

const char *type_name(int t) {
    static const char *names[] = {"ncclInt8", "ncclUint8", "ncclInt32", "ncclUint32",
                                  "ncclInt64", "ncclUint64", "ncclFloat16", "ncclFloat32",
                                  "ncclFloat64", "ncclBfloat16", "ncclFloat8e4m3",
                                  "ncclFloat8e5m2"};
    return t >= 0 && t < ncclNumTypes ? names[t] : "an invalid type";
}

// the MPI type that reduces like the NCCL one (none for 16- and 8-bit floats)
MPI_Datatype mpi_type(ncclDataType_t t) {
    switch (t) {
    case ncclInt8: return MPI_INT8_T;
    case ncclUint8: return MPI_UINT8_T;
    case ncclInt32: return MPI_INT32_T;
    case ncclUint32: return MPI_UINT32_T;
    case ncclInt64: return MPI_INT64_T;
    case ncclUint64: return MPI_UINT64_T;
    case ncclFloat32: return MPI_FLOAT;
    case ncclFloat64: return MPI_DOUBLE;
    default: return MPI_DATATYPE_NULL;
    }
}

enum FaultKind { FAULT_NONE, FAULT_STALL, FAULT_ERROR, FAULT_PENDING };
struct Fault {
    FaultKind kind;
    int rank;
    long call;
};

// MP_EMU_NCCL_FAULT, read once; a malformed value is a broken test setup
const Fault &fault(void) {
    static Fault f = {FAULT_NONE, -1, 0};
    static bool read;
    if (read) return f;
    read = true;
    const char *s = getenv("MP_EMU_NCCL_FAULT");
    if (!s || !*s) return f;
    char kind[16] = "";
    int rank = -1, used = 0;
    long call = 0;
    int n = sscanf(s, "%15[a-z]:%d:%ld%n", kind, &rank, &call, &used);
    long first = strcmp(kind, "pending") ? 1 : 0;   // pending may hit the initialisation
    if (n != 3 || s[used] || rank < 0 || call < first ||
        (strcmp(kind, "stall") && strcmp(kind, "error") && strcmp(kind, "pending"))) {
        fprintf(stderr, "nccl stand-in: MP_EMU_NCCL_FAULT='%s': expected stall|error|pending:"
                "RANK:CALL (CALL from 1; pending also 0, the initialisation)\n", s);
        MPI_Abort(MPI_COMM_WORLD, 1);
    }
    f.kind = !strcmp(kind, "stall") ? FAULT_STALL : !strcmp(kind, "error") ? FAULT_ERROR
                                                                           : FAULT_PENDING;
    f.rank = rank;
    f.call = call;
    return f;
}

// A nonblocking communicator's call returns ncclInProgress: its work is not yet on the stream
// until a poll reports the end, so the emulator refuses device work queued before that.
ncclResult_t in_progress(ncclComm_t comm, const char *call, long polls) {
    comm->in_progress = polls == LONG_MAX ? LONG_MAX : polls + 1;
    comm->call = call;
    mp_emu::set_issuing(call);
    return ncclInProgress;
}

// A call that moved data has returned its work to the caller: what it answers (ncclInProgress
// on a nonblocking communicator), after any injected fault.
ncclResult_t started(ncclComm_t comm, const char *call) {
    if (!comm) comm = g_comm;
    g_calls++;
    const Fault &f = fault();
    if (f.kind != FAULT_NONE && f.rank == world_rank() && f.call == g_calls && comm) {
        if (f.kind == FAULT_STALL || f.kind == FAULT_ERROR) mp_emu::stall_device();
        if (f.kind == FAULT_ERROR) {
            comm->async = ncclRemoteError;
            snprintf(g_last_error, sizeof g_last_error, "rank %d: MP_EMU_NCCL_FAULT=error: the "
                     "connection to a peer was lost (injected at call %ld)", world_rank(), f.call);
        }
        if (f.kind == FAULT_PENDING && !comm->blocking) return in_progress(comm, call, LONG_MAX);
    }
    if (!comm || comm->blocking) return ncclSuccess;
    return in_progress(comm, call, 2);
}

// A nonblocking communicator takes no call while its last one is in progress (NCCL's rule)
ncclResult_t check_settled(const char *call, ncclComm_t comm) {
    if (comm && comm->in_progress > 0)
        return refuse(ncclInvalidUsage, "%s: the communicator's last call (%s) is still in "
                      "progress (poll ncclCommGetAsyncError until it reports ncclSuccess first)",
                      call, comm->call);
    if (comm && comm->async != ncclSuccess)
        return refuse(comm->async, "%s: the communicator has an asynchronous error", call);
    return ncclSuccess;
}

// the checks NCCL makes of a call's arguments (its buffer: device memory of count elements)
ncclResult_t check_args(const char *call, const void *buf, size_t count, ncclDataType_t type,
                        ncclComm_t comm, int peer) {
    if (!comm) return refuse(ncclInvalidArgument, "%s: the communicator is NULL", call);
    if (peer < -1 || peer >= comm->nranks)
        return refuse(ncclInvalidArgument, "%s: peer %d is not a rank of the %d", call, peer,
                      comm->nranks);
    size_t elem = type_size(type);
    if (!elem)
        return refuse(ncclInvalidArgument, "%s: data type %d is not an NCCL type", call, (int)type);
    if (count == 0) return ncclSuccess;
    if (count > SIZE_MAX / elem)
        return refuse(ncclInvalidArgument, "%s: %zu elements overflow size_t", call, count);
    char why[200];
    if (!mp_emu::device_memory(buf, count * elem, why, sizeof why))
        return refuse(ncclInvalidArgument, "%s: the buffer of %zu x %s is not device memory of "
                      "that size (%s): NCCL takes cudaMalloc'ed device buffers only", call,
                      count, type_name(type), why);
    return ncclSuccess;
}

ncclResult_t post(bool send, const char *call, void *buf, size_t count, ncclDataType_t type,
                  int peer, ncclComm_t comm) {
    bool alone = g_depth == 0;   // outside a group: a group of its own
    if (alone) ncclGroupStart();
    ncclResult_t rc = check_args(call, buf, count, type, comm, peer);
    if (rc == ncclSuccess) rc = check_settled(call, comm);
    if (rc == ncclSuccess && peer < 0)
        rc = refuse(ncclInvalidArgument, "%s: peer %d is not a rank", call, peer);
    if (rc == ncclSuccess && !g_ops.empty() && g_ops[0].comm != comm)
        rc = refuse(ncclInvalidUsage, "%s: the stand-in takes one communicator per group", call);
    if (rc == ncclSuccess) g_ops.push_back(Op{send, buf, count, type, peer, comm});
    if (alone) {
        ncclResult_t end = ncclGroupEnd();
        return rc != ncclSuccess ? rc : end;
    }
    return rc;
}

// "5 x ncclFloat32", "nothing", or "2 operations (5 x ncclFloat32, 3 x ncclInt32)"
std::string describe(const int64_t *desc, size_t n) {
    if (n == 0) return "nothing";
    std::string s;
    char one[80];
    for (size_t i = 0; i < n; i++) {
        snprintf(one, sizeof one, "%s%lld x %s", i ? ", " : "", (long long)desc[2 * i],
                 type_name((int)desc[2 * i + 1]));
        s += one;
    }
    if (n == 1) return s;
    snprintf(one, sizeof one, "%zu operations (", n);
    return one + s + ")";
}

// The outermost ncclGroupEnd: check every pair's sends against its receives, agree on the
// outcome, then move the data with device memory open to MPI.
ncclResult_t run_group(const std::vector<Op> &ops, ncclResult_t rc, const char *err) {
    int me = 0, P = 1;
    MPI_OK(MPI_Comm_rank(g_world, &me));
    MPI_OK(MPI_Comm_size(g_world, &P));
    std::string msg = err;

    // what I send each peer, as (count, type) pairs in posting order, goes to that peer
    std::vector<int> nsend(P, 0), nfrom(P, 0), sdispl(P, 0), rdispl(P, 0);
    for (const Op &o : ops)
        if (o.send) nsend[o.peer] += 2;
    MPI_OK(MPI_Alltoall(nsend.data(), 1, MPI_INT, nfrom.data(), 1, MPI_INT, g_world));
    for (int r = 1; r < P; r++) {
        sdispl[r] = sdispl[r - 1] + nsend[r - 1];
        rdispl[r] = rdispl[r - 1] + nfrom[r - 1];
    }
    std::vector<int64_t> sdesc(sdispl[P - 1] + nsend[P - 1] + 1);
    std::vector<int64_t> rdesc(rdispl[P - 1] + nfrom[P - 1] + 1);
    std::vector<int> fill = sdispl;
    for (const Op &o : ops)
        if (o.send) {
            sdesc[fill[o.peer]++] = (int64_t)o.count;
            sdesc[fill[o.peer]++] = (int64_t)o.type;
        }
    MPI_OK(MPI_Alltoallv(sdesc.data(), nsend.data(), sdispl.data(), MPI_INT64_T, rdesc.data(),
                         nfrom.data(), rdispl.data(), MPI_INT64_T, g_world));
    for (int r = 0; r < P && rc == ncclSuccess; r++) {
        std::vector<int64_t> mine;   // my receives from r
        for (const Op &o : ops)
            if (!o.send && o.peer == r) {
                mine.push_back((int64_t)o.count);
                mine.push_back((int64_t)o.type);
            }
        const int64_t *theirs = rdesc.data() + rdispl[r];
        if (mine.size() == (size_t)nfrom[r] &&
            std::equal(mine.begin(), mine.end(), theirs))
            continue;
        char m[1024];
        snprintf(m, sizeof m, "rank %d: unmatched send/receive in a group: rank %d sends rank %d "
                 "%s, but rank %d posts receives from rank %d of %s", me, r, me,
                 describe(theirs, (size_t)nfrom[r] / 2).c_str(), me, r,
                 describe(mine.data(), mine.size() / 2).c_str());
        rc = ncclInvalidUsage;
        msg = m;
    }
    rc = agree(rc, msg.c_str());
    if (rc != ncclSuccess) return rc;

    // The data: matched in posting order per pair (MPI does not overtake on one
    // communicator and tag), in pieces that both sides cut alike from the same counts.
    std::vector<MPI_Request> reqs;
    mp_emu::begin_device_work();
    for (int pass = 0; pass < 2; pass++)   // receives first, so no send waits on a buffer
        for (const Op &o : ops) {
            if (o.send != (pass == 1)) continue;
            size_t bytes = o.count * type_size(o.type);
            for (size_t at = 0; at < bytes; at += PIECE) {
                int k = (int)(bytes - at < PIECE ? bytes - at : PIECE);
                reqs.emplace_back();
                if (o.send)
                    MPI_OK(MPI_Isend((char *)o.buf + at, k, MPI_BYTE, o.peer, 0, g_world,
                                     &reqs.back()));
                else
                    MPI_OK(MPI_Irecv((char *)o.buf + at, k, MPI_BYTE, o.peer, 0, g_world,
                                     &reqs.back()));
            }
        }
    MPI_OK(MPI_Waitall((int)reqs.size(), reqs.data(), MPI_STATUSES_IGNORE));
    mp_emu::end_device_work();
    return started(ops.empty() ? nullptr : ops[0].comm, "ncclGroupEnd");
}

}  // namespace

extern "C" {

ncclResult_t ncclGetUniqueId(ncclUniqueId *id) {
    static unsigned serial;
    if (!id) return refuse(ncclInvalidArgument, "ncclGetUniqueId: id is NULL");
    memset(id, 0, sizeof *id);
    char host[64] = "";
    gethostname(host, sizeof host - 1);
    snprintf(id->internal, sizeof id->internal, "%s %s %ld %ld %u", ID_MAGIC, host,
             (long)getpid(), (long)time(NULL), serial++);
    return ncclSuccess;
}

namespace {
// rc: a refusal of the caller's already (the config), which the others learn here too
ncclResult_t init_rank(ncclComm_t *comm, int nranks, ncclUniqueId id, int rank, bool blocking,
                       ncclResult_t rc) {
    int ready = 0;
    MPI_Initialized(&ready);
    if (!ready) {
        snprintf(g_last_error, sizeof g_last_error, "ncclCommInitRank: the stand-in needs MPI "
                 "to be initialised first");
        return ncclInvalidUsage;
    }
    if (!comm && rc == ncclSuccess)
        rc = refuse(ncclInvalidArgument, "ncclCommInitRank: comm is NULL");
    if (comm) *comm = nullptr;
    if (g_world == MPI_COMM_NULL) {   // collective: every rank initialises together
        MPI_OK(MPI_Comm_dup(MPI_COMM_WORLD, &g_world));
        MPI_OK(MPI_Comm_set_errhandler(g_world, MPI_ERRORS_RETURN));
    }
    int me = 0, P = 1;
    MPI_OK(MPI_Comm_rank(g_world, &me));
    MPI_OK(MPI_Comm_size(g_world, &P));
    if (rc != ncclSuccess) {
    } else if (nranks != P || rank != me)
        rc = refuse(ncclInvalidArgument, "ncclCommInitRank(nranks %d, rank %d): the stand-in "
                    "runs one rank per process of MPI_COMM_WORLD (%d processes, this is %d)",
                    nranks, rank, P, me);
    else if (strncmp(id.internal, ID_MAGIC, sizeof ID_MAGIC - 1) != 0)
        rc = refuse(ncclInvalidArgument, "ncclCommInitRank: the unique id was not made by "
                    "ncclGetUniqueId");
    // the same id on every rank: bytewise minimum and maximum over the ranks agree
    unsigned char lo[NCCL_UNIQUE_ID_BYTES], hi[NCCL_UNIQUE_ID_BYTES];
    MPI_OK(MPI_Allreduce(id.internal, lo, NCCL_UNIQUE_ID_BYTES, MPI_UNSIGNED_CHAR, MPI_MIN,
                         g_world));
    MPI_OK(MPI_Allreduce(id.internal, hi, NCCL_UNIQUE_ID_BYTES, MPI_UNSIGNED_CHAR, MPI_MAX,
                         g_world));
    if (rc == ncclSuccess && memcmp(lo, hi, sizeof lo) != 0)
        rc = refuse(ncclInvalidUsage, "ncclCommInitRank: the ranks passed different unique ids "
                    "(rank 0 makes one with ncclGetUniqueId and sends it to the others)");
    rc = agree(rc, g_last_error);
    if (rc != ncclSuccess) return rc;
    *comm = new ncclComm{rank, nranks, blocking, 0, nullptr, ncclSuccess};
    g_comm = *comm;
    g_live++;
    if (blocking) return ncclSuccess;
    const Fault &f = fault();   // call 0: this initialisation never finishes on f.rank
    if (f.kind == FAULT_PENDING && f.call == 0 && f.rank == me)
        return in_progress(*comm, "ncclCommInitRankConfig", LONG_MAX);
    return in_progress(*comm, "ncclCommInitRankConfig", 2);
}
}  // namespace

ncclResult_t ncclCommInitRank(ncclComm_t *comm, int nranks, ncclUniqueId id, int rank) {
    return init_rank(comm, nranks, id, rank, true, ncclSuccess);
}

ncclResult_t ncclCommInitRankConfig(ncclComm_t *comm, int nranks, ncclUniqueId id, int rank,
                                    ncclConfig_t *config) {
    ncclResult_t rc = ncclSuccess;
    if (config && (config->magic != 0xcafebeef || config->size != sizeof(ncclConfig_t)))
        rc = refuse(ncclInvalidArgument, "ncclCommInitRankConfig: the config was not "
                    "initialised with NCCL_CONFIG_INITIALIZER");
    // NCCL's default is blocking; so is NCCL_CONFIG_UNDEF_INT
    bool blocking = !config || config->blocking != 0;
    return init_rank(comm, nranks, id, rank, blocking, rc);
}

ncclResult_t ncclCommFinalize(ncclComm_t comm) {
    if (!comm) return refuse(ncclInvalidArgument, "ncclCommFinalize: comm is NULL");
    ncclResult_t rc = check_settled("ncclCommFinalize", comm);
    if (rc != ncclSuccess || comm->blocking) return rc;
    return in_progress(comm, "ncclCommFinalize", 2);
}

// frees the communicator at once, waiting for no peer (nothing is in flight here)
ncclResult_t ncclCommAbort(ncclComm_t comm) {
    if (!comm) return ncclSuccess;   // NCCL allows NULL
    if (comm->in_progress > 0) mp_emu::set_issuing(nullptr);
    g_live--;
    if (g_comm == comm) g_comm = nullptr;
    delete comm;
    return ncclSuccess;
}

ncclResult_t ncclCommGetAsyncError(ncclComm_t comm, ncclResult_t *async) {
    if (!comm || !async)
        return refuse(ncclInvalidArgument, "ncclCommGetAsyncError: comm or asyncError is NULL");
    if (comm->async != ncclSuccess) {
        *async = comm->async;
    } else if (comm->in_progress > 0) {
        if (comm->in_progress != LONG_MAX) comm->in_progress--;
        *async = comm->in_progress > 0 ? ncclInProgress : ncclSuccess;
        if (*async == ncclSuccess) mp_emu::set_issuing(nullptr);
    } else {
        *async = ncclSuccess;
    }
    return ncclSuccess;
}

ncclResult_t ncclCommDestroy(ncclComm_t comm) {
    if (!comm) return refuse(ncclInvalidArgument, "ncclCommDestroy: comm is NULL");
    g_live--;
    if (g_comm == comm) g_comm = nullptr;
    delete comm;
    return ncclSuccess;
}

const char *ncclGetErrorString(ncclResult_t rc) {
    switch (rc) {
    case ncclSuccess: return "no error";
    case ncclUnhandledCudaError: return "unhandled cuda error";
    case ncclSystemError: return "unhandled system error";
    case ncclInternalError: return "internal error";
    case ncclInvalidArgument: return "invalid argument";
    case ncclInvalidUsage: return "invalid usage";
    case ncclRemoteError: return "remote process exited or there was a network error";
    case ncclInProgress: return "NCCL operation in progress";
    default: return "unknown result code";
    }
}

const char *ncclGetLastError(ncclComm_t) { return g_last_error; }

ncclResult_t ncclGroupStart(void) {
    if (g_depth++ == 0) {
        g_ops.clear();
        g_group_rc = ncclSuccess;
        g_group_err[0] = 0;
    }
    return ncclSuccess;
}

ncclResult_t ncclGroupEnd(void) {
    if (g_depth == 0) return refuse(ncclInvalidUsage, "ncclGroupEnd without ncclGroupStart");
    if (--g_depth > 0) return ncclSuccess;
    std::vector<Op> ops;
    ops.swap(g_ops);
    if (g_live == 0) return g_group_rc;   // no communicator: nothing was queued
    return run_group(ops, g_group_rc, g_group_err);
}

ncclResult_t ncclSend(const void *buf, size_t count, ncclDataType_t type, int peer,
                      ncclComm_t comm, cudaStream_t) {
    return post(true, "ncclSend", (void *)buf, count, type, peer, comm);
}

ncclResult_t ncclRecv(void *buf, size_t count, ncclDataType_t type, int peer, ncclComm_t comm,
                      cudaStream_t) {
    return post(false, "ncclRecv", buf, count, type, peer, comm);
}

ncclResult_t ncclAllReduce(const void *send, void *recv, size_t count, ncclDataType_t type,
                           ncclRedOp_t op, ncclComm_t comm, cudaStream_t) {
    if (g_world == MPI_COMM_NULL)   // no communicator was ever made: nobody to tell
        return refuse(ncclInvalidArgument, "ncclAllReduce: the communicator is NULL");
    MPI_Op mop = op == ncclSum ? MPI_SUM : op == ncclProd ? MPI_PROD : op == ncclMax ? MPI_MAX
               : op == ncclMin ? MPI_MIN : MPI_OP_NULL;
    // refusals go on to the collectives below, so that every rank learns them
    ncclResult_t rc = ncclSuccess;
    if (g_depth > 0)
        rc = refuse(ncclInvalidUsage, "ncclAllReduce inside a group: the stand-in runs "
                    "collectives outside groups only");
    else if (!comm)
        rc = refuse(ncclInvalidArgument, "ncclAllReduce: the communicator is NULL");
    if (rc == ncclSuccess) rc = check_settled("ncclAllReduce", comm);
    if (rc == ncclSuccess) rc = check_args("ncclAllReduce (send)", send, count, type, comm, -1);
    if (rc == ncclSuccess) rc = check_args("ncclAllReduce (receive)", recv, count, type, comm, -1);
    if (rc == ncclSuccess && (mop == MPI_OP_NULL || mpi_type(type) == MPI_DATATYPE_NULL))
        rc = refuse(ncclInvalidArgument, "ncclAllReduce: the stand-in reduces 8-64-bit integers, "
                    "ncclFloat32 and ncclFloat64 with sum, prod, max, min (got %s, op %d)",
                    type_name(type), (int)op);
    // NCCL needs the same count, type and op on every rank; MPI would hang or mix them
    int64_t mine[3] = {(int64_t)count, (int64_t)type, (int64_t)op}, lo[3], hi[3];
    MPI_OK(MPI_Allreduce(mine, lo, 3, MPI_INT64_T, MPI_MIN, g_world));
    MPI_OK(MPI_Allreduce(mine, hi, 3, MPI_INT64_T, MPI_MAX, g_world));
    if (rc == ncclSuccess && memcmp(lo, hi, sizeof lo) != 0)
        rc = refuse(ncclInvalidUsage, "ncclAllReduce: the ranks pass different arguments "
                    "(count %lld..%lld, type %lld..%lld, op %lld..%lld)", (long long)lo[0],
                    (long long)hi[0], (long long)lo[1], (long long)hi[1], (long long)lo[2],
                    (long long)hi[2]);
    rc = agree(rc, g_last_error);
    if (rc != ncclSuccess || count == 0) return rc;
    size_t elem = type_size(type), piece = PIECE / elem;
    mp_emu::begin_device_work();
    for (size_t at = 0; at < count; at += piece) {
        int k = (int)(count - at < piece ? count - at : piece);
        char *r = (char *)recv + at * elem;
        const void *s = send == recv ? MPI_IN_PLACE : (const char *)send + at * elem;
        MPI_OK(MPI_Allreduce(s, r, k, mpi_type(type), mop, g_world));
    }
    mp_emu::end_device_work();
    return started(comm, "ncclAllReduce");
}

}  // extern "C"
