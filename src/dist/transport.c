// system.transport: which mp_comm moves the payload (comm.h, mp_transport_open).
#include <stdio.h>
#include <string.h>
#include "core/agree.h"
#include "core/log.h"
#include "millipede/backend.h"
#include "millipede/comm.h"

mp_comm *mp_transport_open(const char *want, mp_comm *host, const mp_backend *be,
                           double nccl_timeout_s, char *why, size_t why_len) {
    if (be->host_memory) {
        if (strcmp(want, "auto") && strcmp(want, "mpi"))
            mp_fatal("system.transport = %s moves GPU buffers, but the %s backend's memory is "
                     "host memory (use auto or mpi)", want, be->name);
        snprintf(why, why_len, "mpi (host buffers of the %s backend)", be->name);
        return host;
    }
    if (!strcmp(want, "mpi"))
        mp_fatal("system.transport = mpi moves host buffers, but the %s backend's are device "
                 "memory (use auto, nccl or mpi_staged)", be->name);
    if (!strcmp(want, "mpi_staged")) {
        snprintf(why, why_len, "mpi_staged (system.transport = mpi_staged)");
        return mp_comm_mpi_staged(host, be);
    }
    if (!strcmp(want, "auto") && host->size == 1) {   // nothing crosses ranks: no NCCL needed
        snprintf(why, why_len, "mpi_staged (auto: one rank, nothing to move between ranks)");
        return mp_comm_mpi_staged(host, be);
    }
    // nccl or auto: mp_comm_nccl decides the same on every rank (from all-reduced data)
    char err[512] = "";
    mp_comm *c = mp_comm_nccl(host, nccl_timeout_s, err, sizeof err);
    if (c) {
        snprintf(why, why_len, "nccl (%s; every rank has its own GPU)",
                 strcmp(want, "auto") ? "system.transport = nccl" : "auto");
        return c;
    }
    if (!strcmp(want, "nccl")) {
        char msg[700];
        snprintf(msg, sizeof msg, "system.transport = nccl: %s", err);
        mp_agree_or_exit(-1, msg);
    }
    snprintf(why, why_len, "mpi_staged (auto: %s)", err);
    return mp_comm_mpi_staged(host, be);
}
