// mp_backend_cuda and mp_comm_nccl in a build without the CUDA backend (CMake links this
// file instead of src/backend/cuda when no CUDA compiler was found or MILLIPEDE_CUDA is OFF).
#include <stdio.h>
#include "millipede/backend.h"
#include "millipede/comm.h"

const mp_backend *mp_backend_cuda(char *err, size_t err_len) {
    if (err && err_len)
        snprintf(err, err_len,
                 "this build has no CUDA backend (CUDA was not found at configure time)");
    return NULL;
}

mp_comm *mp_comm_nccl(mp_comm *host, double timeout_s, char *err, size_t err_len) {
    (void)host;
    (void)timeout_s;
    if (err && err_len) snprintf(err, err_len, "this build has no CUDA backend (so no NCCL)");
    return NULL;
}
