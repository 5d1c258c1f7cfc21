// Preemption: SIGUSR1 (Slurm's --signal ahead of the time limit) and SIGTERM (the time
// limit itself, scancel, a node drain) only set a flag; the training loop asks at every
// step boundary whether any rank got one (an all-reduce, so all ranks stop at the same
// step), writes a checkpoint and exits with MP_EXIT_REQUEUE.
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/log.h"
#include "millipede/checkpoint.h"

static volatile sig_atomic_t preempt_flag = 0;

static void on_signal(int sig) { preempt_flag = sig; }

void mp_preempt_install(void) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = SA_RESTART;   // a signal in the middle of a write must not fail the write
    if (sigaction(SIGUSR1, &sa, NULL) != 0 || sigaction(SIGTERM, &sa, NULL) != 0)
        mp_fatal("sigaction failed");
}

int mp_preempt_agreed(mp_comm *comm) {
    double flag = preempt_flag != 0;
    if (comm && comm->size > 1) comm->allreduce_f64(comm, &flag, 1);
    return flag != 0.0;
}

// rank -1, step -1: the call in main() before MPI_Init (a signal during start-up).
void mp_preempt_fault_hook(int rank, long step) {
    const char *f = getenv("MILLIPEDE_FAULT_SIGNAL");
    int r;
    long s;
    if (f && sscanf(f, "%d:%ld", &r, &s) == 2 && r == rank && s == step) {
        if (step < 0)
            fprintf(stderr, "millipede: MILLIPEDE_FAULT_SIGNAL: raising SIGUSR1 before MPI_Init\n");
        else
            fprintf(stderr, "millipede: rank %d: MILLIPEDE_FAULT_SIGNAL: raising SIGUSR1 after "
                    "step %ld\n", rank, step);
        raise(SIGUSR1);
    }
}
