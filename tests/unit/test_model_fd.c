// A second check of the whole backward, independent of the JAX reference: for every
// parameter tensor, the directional derivative of the loss along a random direction by
// central finite differences equals sum(grad * direction).
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>
#include <mpi.h>
#include "core/rng.h"
#include "millipede/model.h"
#include "model/model_private.h"

static void small_config(mp_config *c, const char *ffn, int query_bn, mp_activation act) {
    mp_config_defaults(c);
    c->vocab_size = 32;
    c->context = 8;
    c->d_model = 16;
    c->n_layers = 2;
    c->n_heads = 2;
    c->dense_hidden = 24;
    c->batch_size = 3;
    for (int l = 0; l < 2; l++) c->ffn[l] = (ffn[l] == 'd') ? MP_FFN_DENSE : ffn[l] == 'p' ? MP_FFN_PEER : MP_FFN_PKM;
    mp_retrieval_config *rcs[2] = {&c->peer, &c->pkm};
    for (int i = 0; i < 2; i++) {
        mp_retrieval_config *rc = rcs[i];
        rc->n_experts = 36;
        rc->n_sub = 6;
        rc->heads = 2;
        rc->topk = 3;
        rc->key_dim = 4;
        rc->query_bn = query_bn;
        rc->activation = act;
    }
    char err[256];
    int ok = mp_config_validate(c, err, sizeof err);
    if (ok != 0) fail_msg("config: %s", err);
}

// The non-differentiable choices of the last forward, concatenated: every retrieval
// layer's selections and, with ReLU experts, which side of the kink each one is on.
static size_t selections(mp_model *m, int32_t *out) {
    size_t n = 0;
    const mp_config *c = mp_model_config(m);
    for (int l = 0; l < c->n_layers; l++) {
        mp_retrieval_layer *r = mp_model_retrieval_layer(m, l);
        if (!r) continue;
        size_t k = (size_t)r->last_N * r->rc->heads * r->rc->topk;
        if (out) memcpy(out + n, r->sel, k * sizeof(int32_t));
        n += k;
        if (r->kind != MP_FFN_PEER || r->rc->activation != MP_ACT_RELU) continue;
        const float *pre = mp_exchange_pre(&r->ex, NULL);   // CPU backend: host memory
        for (size_t j = 0; j < k; j++, n++)
            if (out) out[n] = pre[j] > 0.0f;   // one process: record j is selection j
    }
    return n;
}

// Loss at p0 + h*dir; returns 1 when the expert selections differ from base (the loss
// is then not differentiable along the segment and the difference quotient is void).
static int loss_at(mp_model *m, float *p, const float *p0, const float *dir, size_t n, double h,
                   const int32_t *in, const int32_t *tg, const int32_t *base, double *loss) {
    const mp_config *c = mp_model_config(m);
    for (size_t j = 0; j < n; j++) p[j] = p0[j] + (float)(h * dir[j]);
    *loss = mp_model_forward(m, in, tg, c->batch_size, c->context, 1);
    size_t ns = selections(m, NULL);
    int32_t *now = malloc((ns + 1) * sizeof(int32_t));
    selections(m, now);
    int changed = ns && memcmp(now, base, ns * sizeof(int32_t)) != 0;
    free(now);
    return changed;
}

static void check_model(const char *ffn, int query_bn, mp_activation act) {
    mp_config c;
    small_config(&c, ffn, query_bn, act);
    int B = c.batch_size, T = c.context, N = B * T;
    mp_model *m = mp_model_create(&c, mp_backend_cpu(), B);
    mp_model_init(m);
    int32_t in[64], tg[64];
    for (int i = 0; i < N; i++) {
        in[i] = (int32_t)(mp_hash3(5, 1, i) % c.vocab_size);
        tg[i] = (int32_t)(mp_hash3(5, 2, i) % c.vocab_size);
    }
    mp_model_zero_grad(m);
    double l0 = mp_model_forward(m, in, tg, B, T, 1);
    mp_model_backward(m, 1.0f);
    size_t ns = selections(m, NULL);
    int32_t *base = malloc((ns + 1) * sizeof(int32_t));
    selections(m, base);
    double worst = 0.0;
    const char *worst_name = "";
    for (int i = 0; i < mp_model_n_tensors(m); i++) {
        const mp_tensor *t = mp_model_tensor(m, i);
        float *p = mp_model_params(m, t->group) + t->offset;
        float *g = mp_model_grads(m, t->group) + t->offset;
        float *p0 = malloc(t->numel * sizeof(float)), *dir = malloc(t->numel * sizeof(float));
        memcpy(p0, p, t->numel * sizeof(float));
        double analytic = 0.0;
        for (size_t j = 0; j < t->numel; j++) {
            dir[j] = mp_normal(11, i, j);
            analytic += (double)g[j] * dir[j];
        }
        // The largest step whose segment keeps every selection (top-k is piecewise constant).
        double h = 1e-3, lp = 0, lm = 0;
        int tries = 0;
        while (loss_at(m, p, p0, dir, t->numel, h, in, tg, base, &lp) |
               loss_at(m, p, p0, dir, t->numel, -h, in, tg, base, &lm)) {
            if (++tries == 6) fail_msg("%s: selections change even at step %g", t->name, h);
            h /= 3;
        }
        memcpy(p, p0, t->numel * sizeof(float));
        double fd = (lp - lm) / (2 * h);
        // Two errors, each argued from the arithmetic:
        // - truncation: the central difference errs by h^2 |f'''| / 6 relative to f'. The
        //   direction has unit normal entries, so each parameter moves by h = 1e-3, ~5% of
        //   an init-scale (0.02) weight: |f'''| / |f'| ~ 1 / 0.02^2 and the error ~ (h /
        //   0.02)^2 / 6 ~ 4e-4 (measured worst 2.1e-3, wte and biases). 2e-2 leaves 10x; a
        //   wrong backward (a missing term or accumulation, a factor) is O(1) relative.
        // - rounding: the forward is float32, each loss carries a few FLT_EPSILON |loss|
        //   (the mean of the token losses, the log-sum-exp, the forward before them, in
        //   whichever order the BLAS kernel sums), and the two differ in their roundings; 8
        //   FLT_EPSILON |loss| per loss over the 2h of the quotient, with 2x to spare, is the
        //   floor.
        double floor = 8 * 1.19e-7 * fabs(l0) / h;
        double err = fabs(fd - analytic) / (fabs(analytic) + floor / 2e-2);
        if (err > worst) { worst = err; worst_name = t->name; }
        if (fabs(fd - analytic) > 2e-2 * fabs(analytic) + floor)
            fail_msg("%s (ffn %s, bn %d): finite difference %.6g, backward %.6g (step %g)",
                     t->name, ffn, query_bn, fd, analytic, h);
        free(p0);
        free(dir);
    }
    free(base);
    printf("ffn %s bn %d act %d: worst relative error %.2e (%s)\n", ffn, query_bn, act, worst, worst_name);
    mp_model_free(m);
}

static void test_dense(void **s) { (void)s; check_model("dd", 1, MP_ACT_GELU); }
static void test_peer_bn_gelu(void **s) { (void)s; check_model("dp", 1, MP_ACT_GELU); }
static void test_peer_relu_nobn(void **s) { (void)s; check_model("pd", 0, MP_ACT_RELU); }
static void test_pkm(void **s) { (void)s; check_model("kp", 1, MP_ACT_GELU); }

int main(int argc, char **argv) {
    MPI_Init(&argc, &argv);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_dense),
        cmocka_unit_test(test_peer_bn_gelu),
        cmocka_unit_test(test_peer_relu_nobn),
        cmocka_unit_test(test_pkm),
    };
    int rc = cmocka_run_group_tests(tests, NULL, NULL);
    MPI_Finalize();
    return rc;
}
