#include <math.h>
#include <stdlib.h>
#include <string.h>
#include "core/log.h"
#include "core/watchdog.h"
#include "millipede/train.h"

double mp_eval_loss(mp_model *m, const mp_shard *val, int n_batches) {
    return mp_eval_loss_slice(m, val, n_batches, 0, mp_model_config(m)->batch_size);
}

double mp_eval_loss_slice(mp_model *m, const mp_shard *val, int n_batches, int j0, int B) {
    const mp_config *c = mp_model_config(m);
    int T = c->context;
    int32_t *inputs = mp_malloc((size_t)B * T * sizeof(int32_t));    // (B, T)
    int32_t *targets = mp_malloc((size_t)B * T * sizeof(int32_t));   // (B, T)
    double sum = 0.0;
    for (int i = 0; i < n_batches; i++) {
        mp_watchdog_beat("a validation batch");
        mp_batch_fill(val, c->seed, 1, (uint64_t)i, 0, (uint32_t)j0, B, T, inputs, targets);
        sum += mp_model_forward(m, inputs, targets, B, T, 0);
    }
    free(inputs);
    free(targets);
    return n_batches > 0 ? sum / n_batches : 0.0;
}

double mp_eval_loss_ranks(mp_model *m, const mp_shard *val, int n_batches, int j0, int Bl,
                          mp_comm *comm) {
    // the training loop's arithmetic, so eval of a saved model gives the run's val_loss
    double sum[2] = {mp_eval_loss_slice(m, val, n_batches, j0, Bl) * Bl, (double)Bl};
    if (comm) comm->allreduce_f64(comm, sum, 2);
    return sum[0] / sum[1];
}

long mp_eval_usage_ranks(mp_model *m, int i, mp_comm *comm, double *zg) {
    long n = 0;
    const double *z = mp_model_usage(m, i, &n);
    memcpy(zg, z, (size_t)n * sizeof(double));
    if (comm) comm->allreduce_f64(comm, zg, (size_t)n);
    return n;
}

void mp_check_ranks(const mp_config *cfg, mp_comm *comm, int split_batch) {
    int P = comm->size;
    for (int l = 0; l < cfg->n_layers; l++) {
        const mp_retrieval_config *rc = mp_config_retrieval(cfg, l);
        if (rc && P > rc->n_sub)
            mp_input_error("%d ranks, but block %d's %ld experts have only n = %d first-half "
                           "sub-keys to own: use at most %d ranks", P, l, rc->n_experts,
                           rc->n_sub, rc->n_sub);
    }
    if (split_batch && cfg->batch_size < P)
        mp_input_error("%d ranks, but train.batch_size = %d: every rank needs at least one "
                       "sequence of the global batch", P, cfg->batch_size);
    // every rank must run the same resolved configuration
    double *hashes = mp_calloc(P, sizeof(double));
    uint64_t h = mp_config_hash(cfg);
    hashes[comm->rank] = (double)(h >> 12);   // 52 bits survive the sum of doubles exactly
    comm->allreduce_f64(comm, hashes, P);
    for (int r = 1; r < P; r++)
        if (hashes[r] != hashes[0])
            mp_input_error("rank %d's resolved configuration differs from rank 0's (config hash "
                           "mismatch): every rank must get the same CONFIG.ini and --set options", r);
    free(hashes);
}

double mp_eval_target_bytes(const mp_config *c, const mp_shard *val, int n_batches,
                            const uint32_t *token_bytes) {
    int B = c->batch_size, T = c->context;
    int32_t *inputs = mp_malloc((size_t)B * T * sizeof(int32_t));    // (B, T)
    int32_t *targets = mp_malloc((size_t)B * T * sizeof(int32_t));   // (B, T)
    double bytes = 0.0;
    for (int i = 0; i < n_batches; i++) {
        mp_batch_fill(val, c->seed, 1, (uint64_t)i, 0, 0, B, T, inputs, targets);
        for (size_t k = 0; k < (size_t)B * T; k++) bytes += token_bytes[targets[k]];
    }
    free(inputs);
    free(targets);
    return bytes;
}

void mp_expert_usage(const double *z, long n, double *usage, double *unevenness) {
    double total = 0;
    long used = 0;
    for (long e = 0; e < n; e++) {
        total += z[e];
        used += z[e] > 0;
    }
    *usage = n > 0 ? (double)used / (double)n : NAN;
    if (!(total > 0)) {
        *unevenness = NAN;   // nothing was routed: undefined
        return;
    }
    double plogp = 0;   // p log p = 0 at p = 0
    for (long e = 0; e < n; e++)
        if (z[e] > 0) {
            double p = z[e] / total;
            plogp += p * log(p);
        }
    double kl = log((double)n) + plogp;
    *unevenness = kl < 0 ? 0 : kl;   // >= 0 exactly; rounding can give -1e-16
}

double mp_uniform_usage(long n, double selections) {
    return n > 0 ? -expm1(selections * log1p(-1.0 / (double)n)) : NAN;
}
