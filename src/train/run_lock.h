// One writer per run directory. Two jobs in one run.dir (the default one, or a job
// resubmitted while the first still runs) would delete each other's checkpoints in
// progress, prune each other's history and rewrite each other's metrics.jsonl.
#pragma once
#include <stddef.h>

// Takes run_dir/lock for the rest of this process's life (rank 0 of a training run calls
// it). A POSIX record lock, so the kernel (or the NFS lock manager) drops it when the
// process ends however it ends: kill -9 leaves no stale lock behind. Returns -1 with err
// naming the holder (host, pid, Slurm job, since when) when another process holds it. On a
// file system without locks it warns and returns 0: training unprotected beats no training.
int mp_run_lock(const char *run_dir, char *err, size_t err_len);
