#include <math.h>
#include <stdlib.h>
#include "core/log.h"
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
        mp_batch_fill(val, c->seed, 1, (uint64_t)i, 0, (uint32_t)j0, B, T, inputs, targets);
        sum += mp_model_forward(m, inputs, targets, B, T, 0);
    }
    free(inputs);
    free(targets);
    return n_batches > 0 ? sum / n_batches : 0.0;
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
