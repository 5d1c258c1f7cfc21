// Agreement between ranks on outcomes that can differ from rank to rank: a file that one
// node cannot see, a GPU that one node lacks, a disk that fills on one rank. A rank that
// failed alone and simply exited would leave the others waiting in their next collective
// for ever; so every rank reaches the same agreement call, and either all go on or all
// stop with the same one-line error. Collective over MPI_COMM_WORLD: every rank calls it at
// the same point. A single process (with or without mpirun) agrees with itself.
#pragma once
#include <stddef.h>

// Every rank passes its status (0: fine) and, when it failed, its one-line reason in err.
// Returns 0 when every rank is fine; otherwise the status of the lowest failing rank, whose
// reason every rank then finds in err.
int mp_agree(int status, char *err, size_t err_len);
// mp_agree that ends the job: when any rank failed, rank 0 prints "millipede: error:
// [rank R: ]<reason>" and every rank exits with status 2 (bad input or environment).
void mp_agree_or_exit(int status, const char *err);
// Rank 0's bytes to every rank: where rank 0 alone decides (what a directory holds on a file
// system whose listings may differ between nodes) and the others follow.
void mp_broadcast0(void *buf, size_t bytes);
