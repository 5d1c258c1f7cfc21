// millipede train CONFIG.ini [--resume PATH | --no-resume] [--set section.key=value]...
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "cli.h"
#include "commands.h"
#include "core/log.h"
#include "millipede/checkpoint.h"
#include "millipede/train.h"

static const char *help =
    "usage: millipede train CONFIG.ini [--resume PATH | --no-resume] [--set section.key=value]...\n"
    "\n"
    "Trains the model that CONFIG.ini describes (docs/config.md lists every key).\n"
    "Writes into run.dir: config.ini (the resolved configuration), metrics.jsonl (one JSON\n"
    "object per line: training lines with \"step\" and \"loss\", validation lines with\n"
    "\"val_loss\") and checkpoints/step_%08d/ (sharded HDF5, docs/checkpoints.md) every\n"
    "checkpoint.every steps and at the end; checkpoints/latest names the newest, which eval\n"
    "and sample read.\n"
    "\n"
    "When run.dir holds checkpoints/latest, training resumes from it (on any number of\n"
    "ranks); a bad one is reported and the previous one used.\n"
    "  --resume PATH   resume from this checkpoint (a step_%08d directory, a checkpoints/\n"
    "                  directory or a run directory) instead\n"
    "  --no-resume     start from scratch even if run.dir has checkpoints\n"
    "\n"
    "On SIGUSR1 or SIGTERM all ranks stop at the next step boundary, write a checkpoint and\n"
    "exit with status 75 (checkpointed, please requeue; launch/*.sbatch requeue the job).\n";

int mp_cmd_train(int argc, char **argv) {
    const char *config_path = NULL, *resume = NULL;
    int no_resume = 0;
    char *sets[256];
    int n_sets = 0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) {
            if (mp_rank() == 0) fputs(help, stdout);
            return 0;
        } else if (!strcmp(argv[i], "--set")) {
            if (i + 1 >= argc) mp_input_error("train: --set needs section.key=value");
            if (n_sets == 256) mp_input_error("train: more than 256 --set options");
            sets[n_sets++] = argv[++i];
        } else if (!strcmp(argv[i], "--resume")) {
            if (i + 1 >= argc) mp_input_error("train: --resume needs a checkpoint PATH");
            resume = argv[++i];
        } else if (!strcmp(argv[i], "--no-resume")) {
            no_resume = 1;
        } else if (argv[i][0] == '-') {
            mp_input_error("train: unknown option '%s' (see millipede train --help)", argv[i]);
        } else if (!config_path) {
            config_path = argv[i];
        } else {
            mp_input_error("train: unexpected argument '%s' (one CONFIG.ini expected)", argv[i]);
        }
    }
    if (!config_path) mp_input_error("train: missing CONFIG.ini (see millipede train --help)");
    if (resume && no_resume) mp_input_error("train: --resume and --no-resume exclude each other");
    // Under Slurm every task must be one rank of this job: a mismatch means a launcher that
    // started separate single-rank jobs (e.g. srun without --mpi=pmix) or a wrong -n.
    const char *ntasks = getenv("SLURM_NTASKS");
    if (ntasks && getenv("SLURM_JOB_ID") && atoi(ntasks) != mp_world())
        mp_input_error("train: MPI world size %d differs from SLURM_NTASKS=%s: launch with "
                       "`srun --mpi=pmix` or a plain `mpirun` inside the allocation (unset "
                       "SLURM_NTASKS to run another rank count on purpose)", mp_world(), ntasks);
    mp_config cfg;
    mp_cli_load_config(&cfg, config_path, sets, n_sets);
    const mp_backend *be = mp_cli_setup(&cfg);
    mp_resume_mode mode = no_resume ? MP_RESUME_NONE : resume ? MP_RESUME_PATH : MP_RESUME_AUTO;
    return mp_train_run_resume(&cfg, be, mode, resume);
}
