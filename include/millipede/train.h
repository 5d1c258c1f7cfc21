// Optimizer (AdamW per parameter group, warmup + cosine schedule, global-norm clipping),
// validation loss, and the training loop. Formulas: docs/model.md, "Training".
#pragma once
#include "millipede/data.h"
#include "millipede/model.h"

typedef struct {
    float *m[MP_N_GROUPS], *v[MP_N_GROUPS];   // first and second moments, like the params
    long t;                                    // completed updates (bias correction)
} mp_adamw;

void mp_adamw_init(mp_adamw *opt, mp_model *m);
void mp_adamw_free(mp_adamw *opt, mp_model *m);
// Learning rate of group g at 0-based step `step`.
float mp_lr_at(const mp_config *c, mp_group g, long step);
// Global L2 norm of all gradients (before clipping); for a sharded model the expert part
// is summed over ranks. The expert part comes from the backward's per-row squares, so a
// backward must have run since the last mp_model_zero_grad (checked: a fatal error).
float mp_grad_norm(mp_model *m);
// One update at 0-based `step`: clips to train.grad_clip, applies AdamW: one backend call per
// group and decay class (each group's buffer holds its decayed tensors first), row by row
// for lazy AdamW's expert tables.
// Returns the gradient norm before clipping.
float mp_adamw_step(mp_adamw *opt, mp_model *m, long step);

// Mean validation loss (nats per token) over n_batches micro-batches of the validation
// stream, BatchNorm in eval mode. Batch i is mp_batch_fill(seed, 1, i, 0, 0, ...).
double mp_eval_loss(mp_model *m, const mp_shard *val, int n_batches);
// The same over sequences [j0, j0 + B) of each validation batch (one rank's slice).
double mp_eval_loss_slice(mp_model *m, const mp_shard *val, int n_batches, int j0, int B);
// The same over P ranks (comm; NULL for one process): each rank evaluates its slice
// [j0, j0 + Bl) of every batch and the mean over the global batch comes back on every rank.
double mp_eval_loss_ranks(mp_model *m, const mp_shard *val, int n_batches, int j0, int Bl,
                          mp_comm *comm);
// z (N) of the i-th retrieval layer summed over ranks into zg (N), and N.
long mp_eval_usage_ranks(mp_model *m, int i, mp_comm *comm, double *zg);
// Refuses (one line, exit status 2, on every rank alike) a rank count that cfg cannot run
// on: more ranks than a retrieval layer has first-half sub-keys to own, or, when the batch
// is split over the ranks (split_batch), fewer sequences than ranks; and ranks whose
// resolved configurations differ.
void mp_check_ranks(const mp_config *cfg, mp_comm *comm, int split_batch);
// The bytes of text behind the target tokens of those batches (token_bytes: (vocab,),
// mp_tokenizer_token_bytes): with the mean loss, bits per byte = loss * tokens / (bytes ln 2).
double mp_eval_target_bytes(const mp_config *c, const mp_shard *val, int n_batches,
                            const uint32_t *token_bytes);

// Expert usage and unevenness of one layer (paper Table 2) from z (n): usage = fraction of
// experts with z_e > 0; unevenness = KL(z/|z| || uniform) = log n + sum p log p, p = z/|z|,
// in nats (NaN when nothing was routed).
void mp_expert_usage(const double *z, long n, double *usage, double *unevenness);
// The usage a uniform random router would show after `selections` draws over n experts:
// 1 - (1 - 1/n)^selections (the yardstick for a measured usage on the same selections).
double mp_uniform_usage(long n, double selections);

// The whole training run: prints and saves the resolved config, resumes from
// <run.dir>/checkpoints/latest when there is one, trains, validates, logs metrics.jsonl and
// writes checkpoints (docs/checkpoints.md). Returns the process exit status (75: stopped
// on a signal after a checkpoint, please requeue).
int mp_train_run(const mp_config *cfg, const mp_backend *be);
