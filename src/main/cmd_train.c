// millipede train CONFIG.ini [--resume PATH | --no-resume] [--set section.key=value]...
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "cli.h"
#include "commands.h"
#include "core/agree.h"
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
    "When run.dir holds checkpoints, training resumes from the newest (on any number of\n"
    "ranks); a bad one is reported and the previous one used.\n"
    "  --resume PATH   resume from this checkpoint (a step_%08d directory, a checkpoints/\n"
    "                  directory or a run directory) instead\n"
    "  --no-resume     start from scratch even if run.dir has checkpoints\n"
    "A requeued Slurm job (SLURM_RESTART_COUNT > 0) whose run.dir has checkpoints resumes\n"
    "from the newest whatever these two options say (they are for the first start).\n"
    "\n"
    "One job per run.dir: the first holds run.dir/lock while it runs, and a second one\n"
    "stops at once with an error naming the holder (host, pid, Slurm job).\n"
    "\n"
    "On SIGUSR1 or SIGTERM all ranks stop at the next step boundary, write a checkpoint and\n"
    "exit with status 75 (checkpointed, please requeue; launch/*.sbatch requeue the job).\n";

static const mp_cli_option train_opts[] = {
    {"--set", 1, "train: --set needs section.key=value"},
    {"--resume", 1, "train: --resume needs a checkpoint PATH"},
    {"--no-resume", 0, NULL},
};

typedef struct {
    const char *resume;
    int no_resume;
} train_args;

static void train_option(void *ctx, const char *name, const char *value) {
    train_args *t = ctx;
    if (!strcmp(name, "--resume"))
        t->resume = value;
    else   // --no-resume
        t->no_resume = 1;
}

// A requeued Slurm job starts again with the arguments of its first start. Once that start
// has written a checkpoint, --no-resume would throw the work away (and its first checkpoint
// would prune the later ones as an abandoned history), and --resume PATH would go back to
// the same old step on every requeue: so a restart continues its own run from its newest.
// Before any checkpoint, the first start's options still mean what they meant.
static mp_resume_mode requeued_mode(const mp_config *cfg, mp_resume_mode mode) {
    const char *restarts = getenv("SLURM_RESTART_COUNT");
    if (!restarts || atol(restarts) <= 0) return mode;
    int has = mp_rank() == 0 && mp_ckpt_exists(cfg->run_dir);
    mp_broadcast0(&has, sizeof has);   // rank 0 looks, the others follow
    if (!has) return mode;
    if (mp_rank() == 0)
        fprintf(stderr, "millipede: warning: train: restart %s of Slurm job %s: ignoring %s and "
                "resuming from the newest checkpoint in %s (a requeued job continues its own run)\n",
                restarts, getenv("SLURM_JOB_ID") ? getenv("SLURM_JOB_ID") : "?",
                mode == MP_RESUME_NONE ? "--no-resume" : "--resume", cfg->run_dir);
    return MP_RESUME_AUTO;
}

int mp_cmd_train(int argc, char **argv) {
    train_args t = {NULL, 0};
    mp_cli_spec spec = {"train", help, train_opts, MP_CLI_N_OPTS(train_opts), train_option, &t};
    mp_cli_args args;
    if (mp_cli_parse(&spec, argc, argv, &args)) return 0;   // --help
    if (!args.config_path) mp_input_error("train: missing CONFIG.ini (see millipede train --help)");
    if (t.resume && t.no_resume)
        mp_input_error("train: --resume and --no-resume exclude each other");
    // Under Slurm every task must be one rank of this job: a mismatch means a launcher that
    // started separate single-rank jobs (e.g. srun without --mpi=pmix) or a wrong -n.
    // (Each rank reads its own environment, so the ranks agree on the verdict.)
    const char *ntasks = getenv("SLURM_NTASKS");
    char err[512] = "";
    int bad = ntasks && getenv("SLURM_JOB_ID") && atoi(ntasks) != mp_world();
    if (bad)
        snprintf(err, sizeof err, "train: MPI world size %d differs from SLURM_NTASKS=%s: launch "
                 "with `srun --mpi=pmix` or a plain `mpirun` inside the allocation (unset "
                 "SLURM_NTASKS to run another rank count on purpose)", mp_world(), ntasks);
    mp_agree_or_exit(bad ? -1 : 0, err);
    mp_config cfg;
    mp_cli_load_config(&cfg, args.config_path, args.sets, args.n_sets);
    free(args.sets);
    const mp_backend *be = mp_cli_setup(&cfg);
    mp_resume_mode mode = t.no_resume ? MP_RESUME_NONE : t.resume ? MP_RESUME_PATH : MP_RESUME_AUTO;
    if (mode != MP_RESUME_AUTO) mode = requeued_mode(&cfg, mode);
    return mp_train_run_resume(&cfg, be, mode, t.resume);
}
