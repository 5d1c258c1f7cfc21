// Sharded HDF5 checkpoints (docs/checkpoints.md): one directory per step,
//   <run.dir>/checkpoints/step_%08d/
//       shard_%05d.h5   one per writing rank: its rows of every expert table (PEER U, V;
//                       PKM V) and their AdamW moments
//       index.h5        everything replicated (dense and key parameters and their moments,
//                       BatchNorm running statistics, step, AdamW step count, seed and data
//                       position, the resolved config, P and each shard's row ranges), plus
//                       virtual datasets that show every expert table and its moments as
//                       one global N x C dataset over the shard files
//   <run.dir>/checkpoints/latest -> step_%08d   (a relative symlink, replaced atomically)
// Written into step_%08d.tmp/, every dataset chunked with Fletcher32, every file fsynced,
// the directory renamed, then `latest` replaced; the newest checkpoint.keep are kept.
// Serial HDF5 API only: each rank writes its own file, so parallel HDF5 is not needed.
#pragma once
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include "millipede/backend.h"
#include "millipede/comm.h"
#include "millipede/config.h"
#include "millipede/model.h"
#include "millipede/train.h"

#define MP_CKPT_FORMAT "millipede-checkpoint"
#define MP_CKPT_SHARD_FORMAT "millipede-checkpoint-shard"
#define MP_CKPT_VERSION 1
#define MP_CKPT_INDEX "index.h5"
#define MP_CKPT_LATEST "latest"

// Exit status of `millipede train` after SIGUSR1/SIGTERM: a checkpoint was written, the
// run is not finished, please requeue (EX_TEMPFAIL of sysexits.h). launch/*.sbatch turn
// it into `scontrol requeue`.
#define MP_EXIT_REQUEUE 75

// What a checkpoint's index says about the training state.
typedef struct {
    long step;        // training steps done = the next step to run (0-based)
    long adam_t;      // AdamW updates done (bias correction)
    uint64_t seed;    // train.seed: every RNG value and the data order follow from it
    int n_ranks;      // P of the run that wrote it
} mp_ckpt_info;

typedef struct {
    double bytes;     // all files of the checkpoint
    double seconds;   // from the first byte to `latest` replaced
    int n_files;
} mp_ckpt_stats;

// ---- writing -----------------------------------------------------------------------
// Writes <root>/step_%08d (root = <run.dir>/checkpoints) with the model, its optimizer
// and the step, then points <root>/latest at it and removes all but the newest `keep`
// (and any checkpoint with a larger step: it belongs to an abandoned history).
// Collective over mp_model_comm(m) (all ranks return the same status). Returns -1 with a
// one-line message in err. The written directory is put in dir (may be NULL).
int mp_ckpt_save(const char *root, mp_model *m, const mp_adamw *opt, long step, int keep,
                 char *dir, size_t dir_len, mp_ckpt_stats *stats, char *err, size_t err_len);

// ---- reading -----------------------------------------------------------------------
#define MP_CKPT_EBAD (-1)        // missing, truncated or corrupt: an older one may do
#define MP_CKPT_EMISMATCH (-2)   // intact, but its shapes differ from the configuration

// Resolves what a user may pass for a checkpoint: a checkpoint directory (or a link to
// one, e.g. checkpoints/latest), a checkpoints/ directory (its latest) or a run directory
// (its checkpoints/latest). Returns 0 with the checkpoint directory in out, or -1 (err).
int mp_ckpt_resolve(const char *path, char *out, size_t out_len, char *err, size_t err_len);
// 1 when run_dir/checkpoints holds a checkpoint (a step_%08d directory), else 0.
int mp_ckpt_exists(const char *run_dir);
// Reads the configuration and training state stored in checkpoint directory dir.
int mp_ckpt_read_config(const char *dir, mp_config *cfg, mp_ckpt_info *info, char *err,
                        size_t err_len);
// Loads checkpoint dir into m (and opt unless NULL): every tensor's rows
// [row_start, row_start + rows) through the global view, whatever P wrote it. Not
// collective. The shape-fixing keys of the stored config must equal m's (messages name
// cfg_name, e.g. the run's CONFIG.ini). Returns 0, MP_CKPT_EBAD or MP_CKPT_EMISMATCH with
// a one-line message naming the file and dataset.
int mp_ckpt_load(const char *dir, mp_model *m, mp_adamw *opt, const char *cfg_name,
                 mp_ckpt_info *info, char *err, size_t err_len);

// How `millipede train` starts.
typedef enum {
    MP_RESUME_AUTO = 0,   // from <run.dir>/checkpoints/latest when there is one (default)
    MP_RESUME_PATH,       // from a given checkpoint (--resume PATH); a bad one is an error
    MP_RESUME_NONE,       // from scratch (--no-resume)
} mp_resume_mode;

// Collective: loads the checkpoint to resume from into m and opt. AUTO tries `latest`,
// then the other checkpoints from the newest, reporting each bad one on stderr. Returns
// 1 with info set when it resumed, 0 to start from scratch; exits with status 2 on bad
// input (a given checkpoint that is bad, shapes that differ from cfg).
int mp_ckpt_resume(const mp_config *cfg, mp_resume_mode mode, const char *path, mp_model *m,
                   mp_adamw *opt, mp_ckpt_info *info, char *used, size_t used_len);

// For eval and sample: opens a checkpoint (anything mp_ckpt_resolve takes) or a model
// file (model_file.h) for B sequences; with comm (not NULL) as rank comm->rank's part of
// the model sharded over comm, reading only its own expert rows. The model's configuration
// (written to *model_cfg, which must outlive the model) is cfg with the shape sections of
// the stored one, which must agree with cfg (loaded from cfg_path). Not collective: each
// rank reports its own failure (NULL, a one-line message in err), and the caller agrees.
mp_model *mp_open_stored_model(const char *path, const mp_config *cfg, const char *cfg_path,
                               const mp_backend *be, int B, mp_comm *comm, mp_config *model_cfg,
                               char *err, size_t err_len);

// ---- inspect and verify ------------------------------------------------------------
// Prints step, configuration, layout (files, ranks, row ranges, sizes) and every dataset
// with its shape. Returns -1 with err set when dir is not a readable checkpoint.
int mp_ckpt_inspect(const char *dir, FILE *out, char *err, size_t err_len);
// Checks every file is present with its recorded size, every dataset's shape against
// the configuration and the layout, the virtual datasets' mappings, and every chunk's
// checksum (reads all data). Prints one line per problem on errs ("FILE: dataset 'X':
// ..."), a summary on out. Returns the number of problems (0: the checkpoint is good).
int mp_ckpt_verify(const char *dir, FILE *out, FILE *errs);

// ---- preemption (SIGUSR1, SIGTERM) -------------------------------------------------
// Installs handlers that only set a flag.
void mp_preempt_install(void);
// Collective: 1 on every rank when any rank got a signal (an all-reduce of the flag).
int mp_preempt_agreed(mp_comm *comm);
// Test hook: MILLIPEDE_FAULT_SIGNAL="RANK:STEP" makes that rank raise SIGUSR1 on itself
// when `step` steps are done (so only one rank sees the signal); "-1:-1" makes every
// process raise it in main() before MPI_Init (a preemption during start-up).
void mp_preempt_fault_hook(int rank, long step);

// ---- the commands ------------------------------------------------------------------
// The training run with a resume mode (mp_train_run is MP_RESUME_AUTO); src/train/loop.c.
int mp_train_run_resume(const mp_config *cfg, const mp_backend *be, mp_resume_mode mode,
                        const char *resume_path);
// `millipede ckpt inspect|verify|export`; src/main/cmd_ckpt.c.
int mp_cmd_ckpt(int argc, char **argv);
