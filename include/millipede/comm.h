// The transport between ranks: what data-parallel training and the expert exchange need.
// Three implementations (docs/design.md, "The exchange"):
//   mpi         MPI on host buffers (the CPU backend; also a single process without mpirun)
//   nccl        NCCL on device buffers, one rank per GPU (src/backend/cuda/comm_nccl.cu)
//   mpi_staged  device buffers copied through host memory to MPI, for ranks that share a GPU
// Payload calls move activations and gradients: their buffers are host memory when
// device_buffers is 0 and the backend's device memory when it is 1. Control calls move
// counts and statistics and take host buffers in every transport. Every call is collective
// over all ranks of the transport.
#pragma once
#include <stddef.h>
#include <stdint.h>

typedef struct mp_backend mp_backend;

typedef struct mp_comm mp_comm;
struct mp_comm {
    const char *name;     // "mpi", "nccl" or "mpi_staged"
    int rank, size;
    int device_buffers;   // payload buffers: 0 host memory, 1 device memory

    // payload: personalised exchange of floats: send_counts[r] floats from
    // send + send_displs[r] go to rank r; recv_counts[r] floats from rank r land at
    // recv + recv_displs[r] (counts and displacements are host arrays of size entries)
    void (*alltoallv_f32)(mp_comm *c, const float *send, const int64_t *send_counts,
                          const int64_t *send_displs, float *recv, const int64_t *recv_counts,
                          const int64_t *recv_displs);
    // payload: the same for int32 (expert rows, slots)
    void (*alltoallv_i32)(mp_comm *c, const int32_t *send, const int64_t *send_counts,
                          const int64_t *send_displs, int32_t *recv, const int64_t *recv_counts,
                          const int64_t *recv_displs);
    // payload: in-place sum over ranks (the fixed reduction order of the implementation)
    void (*allreduce_f32)(mp_comm *c, float *buf, size_t n);

    // control (host buffers): each rank sends send[r*k .. r*k+k) to rank r and receives
    // recv[r*k ..) from it
    void (*alltoall_i64)(mp_comm *c, const int64_t *send, int64_t *recv, int k);
    void (*allreduce_f64)(mp_comm *c, double *buf, size_t n);   // in-place sum
    void (*broadcast)(mp_comm *c, void *buf, size_t bytes, int root);
    void (*barrier)(mp_comm *c);

    void (*destroy)(mp_comm *c);   // frees this transport, not the one it was built on
    mp_comm *control;              // the host transport a device transport's control calls
                                   // go to (NULL for mpi itself)
    void *impl;
};

// MPI over MPI_COMM_WORLD on host buffers.
mp_comm *mp_comm_mpi(void);
// Device buffers through host memory: payload calls copy to host with be->to_host, run
// host's payload call, and copy back with be->from_host. Control calls are host's.
mp_comm *mp_comm_mpi_staged(mp_comm *host, const mp_backend *be);
// NCCL on the CUDA backend's device buffers, one GPU per rank (the GPU the backend chose);
// the unique id goes to every rank by host's broadcast, and control calls are host's.
// NULL with the reason in err when this build has no NCCL, or when two ranks share a GPU.
// No NCCL call waits longer than timeout_s (system.nccl_timeout): past it, or at an error
// NCCL reports asynchronously, the rank aborts the communicator and ends the job.
mp_comm *mp_comm_nccl(mp_comm *host, double timeout_s, char *err, size_t err_len);
void mp_comm_free(mp_comm *c);   // c->destroy(c); NULL is allowed
// For transport implementations: c takes host's rank and size, and its control calls
// become host's (c->control = host).
void mp_comm_control_from(mp_comm *c, mp_comm *host);

// The transport that system.transport (`want`: auto, mpi, nccl or mpi_staged) names for
// backend be over the MPI transport host: host itself for mpi, a new one otherwise (free
// it with mp_comm_free, before host). auto is mpi for a host-memory backend; for a device
// backend nccl when every rank has its own GPU, else mpi_staged. Writes the choice and
// its reason into why. A transport that cannot work here ends the job with one line.
// nccl_timeout_s: mp_comm_nccl's timeout_s.
mp_comm *mp_transport_open(const char *want, mp_comm *host, const mp_backend *be,
                           double nccl_timeout_s, char *why, size_t why_len);
