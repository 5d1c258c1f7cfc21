// millipede: one MPI binary, several subcommands.
#include <mpi.h>
#include <stdio.h>
#include <string.h>
#include "commands.h"
#include "core/log.h"
#include "millipede/checkpoint.h"
#include "millipede/data.h"

static const char *usage =
    "usage: millipede <command> [options]\n"
    "\n"
    "commands:\n"
    "  train CONFIG.ini [--resume PATH | --no-resume] [--set section.key=value]...\n"
    "                                                    train a model (resumes from checkpoints)\n"
    "  eval CONFIG.ini --model PATH                      validation loss, bits/byte, expert usage (JSON)\n"
    "  sample CONFIG.ini --model PATH --prompt TEXT --tokens N [--temperature T] [--top-k K]\n"
    "  ckpt inspect|verify DIR, ckpt export DIR OUT.h5  look into, check or export a checkpoint\n"
    "  data prepare --out DIR [--val-fraction F] PATH... text files -> token shards\n"
    "\n"
    "`millipede <command> --help` describes each command.\n";

int main(int argc, char **argv) {
    // Training turns SIGUSR1/SIGTERM into "checkpoint at the next step boundary". Installed
    // before MPI_Init, which can take seconds on a cluster: a preemption signal that came
    // then would otherwise kill the process (the default action) and lose the allocation.
    int training = argc >= 2 && !strcmp(argv[1], "train");
    if (training) {
        mp_preempt_install();
        mp_preempt_fault_hook(-1, -1);   // test hook: MILLIPEDE_FAULT_SIGNAL=-1:-1
    }
    // funneled: OpenMP's threads and the hang watchdog's (src/core/watchdog.c) never call MPI
    int provided = 0;
    MP_CHECK_MPI(MPI_Init_thread(&argc, &argv, MPI_THREAD_FUNNELED, &provided));
    if (provided < MPI_THREAD_FUNNELED)
        mp_fatal("this MPI provides thread level %d; millipede needs MPI_THREAD_FUNNELED (%d)",
                 provided, MPI_THREAD_FUNNELED);
    if (training) mp_preempt_install();   // again, in case MPI_Init replaced a handler
    int status;
    if (argc < 2 || !strcmp(argv[1], "--help") || !strcmp(argv[1], "-h") ||
        !strcmp(argv[1], "help")) {
        if (mp_rank() == 0) fputs(usage, argc < 2 ? stderr : stdout);
        status = argc < 2 ? 2 : 0;
    } else if (!strcmp(argv[1], "train")) {
        status = mp_cmd_train(argc - 1, argv + 1);
    } else if (!strcmp(argv[1], "eval")) {
        status = mp_cmd_eval(argc - 1, argv + 1);
    } else if (!strcmp(argv[1], "sample")) {
        status = mp_cmd_sample(argc - 1, argv + 1);
    } else if (!strcmp(argv[1], "ckpt")) {
        status = mp_cmd_ckpt(argc - 1, argv + 1);
    } else if (!strcmp(argv[1], "data")) {
        status = mp_cmd_data(argc - 1, argv + 1);
    } else {
        if (mp_rank() == 0)
            fprintf(stderr, "millipede: error: unknown command '%s' (expected train, eval, sample, "
                            "ckpt or data; see millipede --help)\n", argv[1]);
        status = 2;
    }
    MPI_Finalize();
    return status;
}
