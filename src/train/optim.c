#include <math.h>
#include <stdio.h>
#include <string.h>
#include "core/log.h"
#include "millipede/train.h"

void mp_adamw_init(mp_adamw *opt, mp_model *m) {
    const mp_backend *be = mp_model_backend(m);
    for (int g = 0; g < MP_N_GROUPS; g++) {
        size_t bytes = mp_model_group_size(m, g) * sizeof(float);
        opt->m[g] = be->alloc(bytes);
        opt->v[g] = be->alloc(bytes);
    }
    opt->t = 0;
}

void mp_adamw_free(mp_adamw *opt, mp_model *m) {
    const mp_backend *be = mp_model_backend(m);
    for (int g = 0; g < MP_N_GROUPS; g++) {
        be->free(opt->m[g]);
        be->free(opt->v[g]);
    }
}

static int lazy_experts(const mp_config *c) { return !strcmp(c->expert_optimizer, "lazy_adamw"); }

float mp_lr_at(const mp_config *c, mp_group g, long step) {
    float peak = g == MP_GROUP_EXPERTS ? c->expert_lr : g == MP_GROUP_KEYS ? c->key_lr : c->lr;
    if (step < c->warmup) return peak * (float)(step + 1) / (float)c->warmup;
    long decay_steps = c->steps - c->warmup;
    if (decay_steps <= 0) return peak;
    double progress = (double)(step - c->warmup) / (double)decay_steps;
    if (progress > 1.0) progress = 1.0;
    double floor_lr = peak * c->min_lr_frac;
    return (float)(floor_lr + (peak - floor_lr) * 0.5 * (1.0 + cos(M_PI * progress)));
}

// The expert part of the squared norm from what the backward left per row (dU[r]^2 +
// dV[r]^2, mp_model_expert_row_ss): 8 bytes per row, instead of reading dU and dV again
// (4 bytes per parameter; lazy AdamW: per touched row). The layers in block order, each
// layer's rows in the backend's fixed order.
static double row_ss_sum(mp_model *m) {
    const mp_backend *be = mp_model_backend(m);
    double ss = 0.0;
    for (int i = 0; i < mp_model_n_retrieval(m); i++) {
        int64_t rows;
        const double *row_ss = mp_model_expert_row_ss(m, mp_model_retrieval_block(m, i), &rows);
        ss += be->sum_f64(row_ss, (size_t)rows);
    }
    return ss;
}

float mp_grad_norm(mp_model *m) {
    const mp_backend *be = mp_model_backend(m);
    double experts = row_ss_sum(m);
    mp_comm *comm = mp_model_comm(m);
    if (comm && comm->size > 1) comm->allreduce_f64(comm, &experts, 1);
    double ss = experts;
    for (int g = 0; g < MP_GROUP_EXPERTS; g++)   // replicated: the same on every rank
        ss += be->sum_squares(mp_model_grads(m, g), mp_model_group_size(m, g));
    return (float)sqrt(ss);
}

float mp_adamw_step(mp_adamw *opt, mp_model *m, long step) {
    const mp_config *c = mp_model_config(m);
    const mp_backend *be = mp_model_backend(m);
    float norm = mp_grad_norm(m);
    float scale = 1.0f;
    if (c->grad_clip > 0.0f && norm > c->grad_clip) scale = c->grad_clip / norm;
    opt->t++;
    // system.precision = bf16: the bf16 copies of the dense weights and the expert tables
    // are written in the same pass as their masters, so the next forward need not refresh
    // them. Read before the params pointers (taking them marks a copy stale): lazy AdamW
    // rewrites the touched expert rows only, which leaves that copy fresh only if it was
    // fresh before.
    int experts_were_fresh = mp_model_bf16_fresh(m, MP_GROUP_EXPERTS);
    for (int g = 0; g < MP_N_GROUPS; g++) {
        float *p = mp_model_params(m, g), *gr = mp_model_grads(m, g);
        float *mo = opt->m[g], *vo = opt->v[g];
        float lr = mp_lr_at(c, g, step);
        // A group's buffer holds its decayed tensors, then the others (docs/model.md): one
        // pass over each part, instead of ~150 launches for the dense group at GPT-2 small.
        for (int decay = 1; decay >= 0; decay--) {
            float wd = !decay ? 0.0f
                       : g == MP_GROUP_EXPERTS ? c->expert_weight_decay
                       : g == MP_GROUP_KEYS    ? c->key_weight_decay
                                               : c->weight_decay;
            const mp_tensor *first = NULL;   // the part's lowest offset
            size_t n = 0;
            for (int i = 0; i < mp_model_n_tensors(m); i++) {
                const mp_tensor *t = mp_model_tensor(m, i);
                if ((int)t->group != g || t->decay != decay) continue;
                const int32_t *rows;
                int64_t n_rows = g == MP_GROUP_EXPERTS ? mp_model_touched_rows(m, t, &rows) : -1;
                if (n_rows >= 0) {   // lazy AdamW: the touched rows only (docs/model.md)
                    be->adamw_rows(p + t->offset, gr + t->offset, mo + t->offset, vo + t->offset,
                                   mp_model_bf16(m, t), rows, n_rows, (int)t->shape[1], lr,
                                   c->beta1, c->beta2, c->eps, wd, opt->t, scale);
                    continue;
                }
                if (!first || t->offset < first->offset) first = t;
                n += t->numel;
            }
            if (n)   // pb: (n) or NULL (fp32, or the keys group)
                be->adamw(p + first->offset, gr + first->offset, mo + first->offset,
                          vo + first->offset, mp_model_bf16(m, first), n, lr, c->beta1,
                          c->beta2, c->eps, wd, opt->t, scale);
        }
    }
    mp_model_bf16_set_fresh(m, MP_GROUP_DENSE);
    if (experts_were_fresh || !lazy_experts(c)) mp_model_bf16_set_fresh(m, MP_GROUP_EXPERTS);
    return norm;
}
