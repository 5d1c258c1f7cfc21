// The optimizer's one pass per group part: each group's buffer holds its weight-decayed
// tensors first, then the others (docs/model.md), and mp_adamw_step updates each part in one
// backend call. Checked here: the layout covers every group exactly, the number of calls,
// and that the update is bit for bit the backend's adamw called tensor by tensor with each
// tensor's own learning rate, weight decay and the clipping scale (full AdamW and lazy
// AdamW). The update's values are checked against the JAX reference's AdamW steps in
// tests/python/test_model.py.
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>
#include "millipede/backend.h"
#include "millipede/train.h"
#include "small_config.h"

// The CPU backend with its two AdamW entry points counted.
static mp_backend counting;
static int n_adamw, n_adamw_rows;

static void count_adamw(float *p, const float *g, float *m, float *v, uint16_t *pb, size_t n,
                        float lr, float b1, float b2, float eps, float wd, long t, float s) {
    n_adamw++;
    mp_backend_cpu()->adamw(p, g, m, v, pb, n, lr, b1, b2, eps, wd, t, s);
}

static void count_adamw_rows(float *p, const float *g, float *m, float *v, uint16_t *pb,
                             const int32_t *rows, int64_t n_rows, int C, float lr, float b1,
                             float b2, float eps, float wd, long t, float s) {
    n_adamw_rows++;
    mp_backend_cpu()->adamw_rows(p, g, m, v, pb, rows, n_rows, C, lr, b1, b2, eps, wd, t, s);
}

static mp_config config(const char *expert_optimizer) {
    mp_config c;
    small_config(&c);
    // three distinct decays, so a part updated with another group's (or none) differs
    c.weight_decay = 0.1f;
    c.key_weight_decay = 0.02f;
    c.expert_weight_decay = 0.3f;
    c.grad_clip = 1e-3f;   // below the norm: the update's gradient scale is not 1
    snprintf(c.expert_optimizer, sizeof c.expert_optimizer, "%s", expert_optimizer);
    validate(&c);
    return c;
}

static float *snapshot(const float *p, size_t n) {
    float *h = malloc(n * sizeof *h);
    memcpy(h, p, n * sizeof *h);
    return h;
}

static void check_step(const char *expert_optimizer, int want_adamw, int want_rows) {
    counting = *mp_backend_cpu();
    counting.adamw = count_adamw;
    counting.adamw_rows = count_adamw_rows;
    mp_config c = config(expert_optimizer);
    mp_model *m = mp_model_create(&c, &counting, c.batch_size);
    mp_model_init(m);
    int32_t in[2 * 8], tg[2 * 8];
    for (int i = 0; i < 16; i++) in[i] = (i * 7 + 3) % 32, tg[i] = (i * 5 + 1) % 32;
    mp_model_zero_grad(m);
    mp_model_forward(m, in, tg, c.batch_size, c.context, 1);
    mp_model_backward(m, 1.0f);

    // the reference: tensor by tensor on copies, m and v starting at zero like the model's
    float *p[MP_N_GROUPS], *mo[MP_N_GROUPS], *vo[MP_N_GROUPS];
    for (int g = 0; g < MP_N_GROUPS; g++) {
        size_t n = mp_model_group_size(m, g);
        p[g] = snapshot(mp_model_params(m, g), n);
        mo[g] = calloc(n ? n : 1, sizeof(float));
        vo[g] = calloc(n ? n : 1, sizeof(float));
    }
    const mp_backend *cpu = mp_backend_cpu();
    long step = 3;
    float norm = mp_grad_norm(m), scale = c.grad_clip / norm;
    assert_true(scale < 0.5f);
    for (int i = 0; i < mp_model_n_tensors(m); i++) {
        const mp_tensor *t = mp_model_tensor(m, i);
        int g = t->group;
        float wd = !t->decay ? 0.0f
                   : g == MP_GROUP_EXPERTS ? c.expert_weight_decay
                   : g == MP_GROUP_KEYS    ? c.key_weight_decay
                                           : c.weight_decay;
        float lr = mp_lr_at(&c, g, step);
        const float *gr = mp_model_grads(m, g) + t->offset;
        size_t o = t->offset;
        const int32_t *rows;
        int64_t n_rows = mp_model_touched_rows(m, t, &rows);
        if (n_rows >= 0)
            cpu->adamw_rows(p[g] + o, gr, mo[g] + o, vo[g] + o, NULL, rows, n_rows,
                            (int)t->shape[1], lr, c.beta1, c.beta2, c.eps, wd, 1, scale);
        else
            cpu->adamw(p[g] + o, gr, mo[g] + o, vo[g] + o, NULL, t->numel, lr, c.beta1,
                       c.beta2, c.eps, wd, 1, scale);
    }

    mp_adamw opt;
    mp_adamw_init(&opt, m);
    n_adamw = n_adamw_rows = 0;
    assert_true(mp_adamw_step(&opt, m, step) == norm);
    assert_int_equal(n_adamw, want_adamw);
    assert_int_equal(n_adamw_rows, want_rows);
    for (int g = 0; g < MP_N_GROUPS; g++) {
        size_t bytes = mp_model_group_size(m, g) * sizeof(float);
        assert_memory_equal(mp_model_params(m, g), p[g], bytes);
        assert_memory_equal(opt.m[g], mo[g], bytes);
        assert_memory_equal(opt.v[g], vo[g], bytes);
        free(p[g]);
        free(mo[g]);
        free(vo[g]);
    }
    mp_adamw_free(&opt, m);
    mp_model_free(m);
}

// the small model: dense (decayed, not), keys (decayed), experts (decayed): four parts
static void test_full_adamw_one_call_per_part(void **state) {
    (void)state;
    check_step("adamw", 4, 0);
}

// lazy: the three expert tables (PEER U and V, PKM V) row by row, the rest by part
static void test_lazy_adamw_rows_per_table(void **state) {
    (void)state;
    check_step("lazy_adamw", 3, 3);
}

// Every element of every group belongs to exactly one tensor, the decayed ones first.
static void test_group_layout(void **state) {
    (void)state;
    mp_config c = config("adamw");
    mp_model *m = mp_model_create(&c, mp_backend_cpu(), 1);
    for (int g = 0; g < MP_N_GROUPS; g++) {
        size_t n = mp_model_group_size(m, g), decayed = 0;
        unsigned char *owner = calloc(n ? n : 1, 1);   // 0 none, 1 decayed, 2 not
        for (int i = 0; i < mp_model_n_tensors(m); i++) {
            const mp_tensor *t = mp_model_tensor(m, i);
            if ((int)t->group != g) continue;
            assert_true(t->offset + t->numel <= n);
            for (size_t e = t->offset; e < t->offset + t->numel; e++) {
                assert_int_equal(owner[e], 0);
                owner[e] = t->decay ? 1 : 2;
            }
            if (t->decay) decayed += t->numel;
        }
        for (size_t e = 0; e < n; e++) assert_int_equal(owner[e], e < decayed ? 1 : 2);
        free(owner);
    }
    mp_model_free(m);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_group_layout),
        cmocka_unit_test(test_full_adamw_one_call_per_part),
        cmocka_unit_test(test_lazy_adamw_rows_per_table),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
