// The transport between ranks: what data-parallel training and the expert exchange need.
// The MPI implementation works on host buffers; GPU transports (NCCL with one rank per GPU,
// host-staged MPI when ranks share a GPU) implement the same table for device buffers.
// Every call is collective over all ranks of the transport.
#pragma once
#include <stddef.h>
#include <stdint.h>

typedef struct mp_comm mp_comm;
struct mp_comm {
    const char *name;
    int rank, size;
    // each rank sends send[r*k .. r*k+k) to rank r and receives recv[r*k ..) from it
    void (*alltoall_i64)(mp_comm *c, const int64_t *send, int64_t *recv, int k);
    // personalised exchange of floats: send_counts[r] floats from send + send_displs[r]
    // go to rank r; recv_counts[r] floats from rank r land at recv + recv_displs[r]
    void (*alltoallv_f32)(mp_comm *c, const float *send, const int64_t *send_counts,
                          const int64_t *send_displs, float *recv, const int64_t *recv_counts,
                          const int64_t *recv_displs);
    // the same for int32 payloads (expert rows, slots)
    void (*alltoallv_i32)(mp_comm *c, const int32_t *send, const int64_t *send_counts,
                          const int64_t *send_displs, int32_t *recv, const int64_t *recv_counts,
                          const int64_t *recv_displs);
    // in-place sums over ranks (the fixed reduction order of the implementation)
    void (*allreduce_f32)(mp_comm *c, float *buf, size_t n);
    void (*allreduce_f64)(mp_comm *c, double *buf, size_t n);
    void (*broadcast)(mp_comm *c, void *buf, size_t bytes, int root);
    void (*barrier)(mp_comm *c);
    void *impl;
};

// The MPI transport over MPI_COMM_WORLD (also a single process without mpirun).
mp_comm *mp_comm_mpi(void);
void mp_comm_free(mp_comm *c);
