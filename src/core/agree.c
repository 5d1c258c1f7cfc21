#include "agree.h"
#include <limits.h>
#include <mpi.h>
#include <stdio.h>
#include <string.h>
#include "log.h"

#define REASON_LEN 1024

// mp_agree, also telling which rank spoke (-1 when none failed).
static int agree(int status, char *err, size_t err_len, int *speaker) {
    int P = mp_world(), rank = mp_rank();
    *speaker = status != 0 ? rank : -1;
    if (P == 1) return status;
    // the lowest failing rank speaks for all (P when none failed)
    int mine = status != 0 ? rank : P, first = P;
    MP_CHECK_MPI(MPI_Allreduce(&mine, &first, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD));
    *speaker = first < P ? first : -1;
    if (first == P) return 0;
    char reason[REASON_LEN] = "";
    int code = status;
    if (rank == first) snprintf(reason, sizeof reason, "%s", err && err[0] ? err : "failed");
    MP_CHECK_MPI(MPI_Bcast(&code, 1, MPI_INT, first, MPI_COMM_WORLD));
    MP_CHECK_MPI(MPI_Bcast(reason, REASON_LEN, MPI_CHAR, first, MPI_COMM_WORLD));
    if (err && err_len) snprintf(err, err_len, "%s", reason);
    return code;
}

int mp_agree(int status, char *err, size_t err_len) {
    int speaker;
    return agree(status, err, err_len, &speaker);
}

void mp_agree_or_exit(int status, const char *err) {
    char reason[REASON_LEN];
    snprintf(reason, sizeof reason, "%s", status != 0 && err ? err : "");
    int speaker;
    if (agree(status, reason, sizeof reason, &speaker) == 0) return;
    if (mp_world() > 1) mp_input_error("rank %d: %s", speaker, reason);
    mp_input_error("%s", reason);
}

void mp_broadcast0(void *buf, size_t bytes) {
    if (mp_world() == 1) return;
    for (size_t o = 0; o < bytes; o += INT_MAX) {   // MPI counts are int
        size_t k = bytes - o < INT_MAX ? bytes - o : INT_MAX;
        MP_CHECK_MPI(MPI_Bcast((char *)buf + o, (int)k, MPI_BYTE, 0, MPI_COMM_WORLD));
    }
}
