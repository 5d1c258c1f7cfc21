// The CPU backend's experts_backward gradient modes (include/millipede/backend.h): a step's
// first micro-batch overwrites the rows it touches and zeroes the other dirty rows, later
// micro-batches accumulate, the dirty flags follow, and row_ss holds each row's sum of
// squares. Against a host computation in double over the same records.
//
// Tolerances. Inputs x, dy, u, v, gate lie in [-1, 1], ReLU experts with pre-activations
// at least 0.1 from the kink (so act' is exact). A float dot of C terms errs by at most
// C 2^-24 times the sum of its |terms| (<= C); dpre = gate dv_dot adds one rounding. A row
// element is a sum of at most K record terms of size <= C, each rounded once, the running
// sum rounded once per term: |err| <= (K + C + 3) 2^-24 K C (GRAD_BOUND). A record missing
// or counted twice moves an element by a whole term, ~0.1..1 here. row_ss: squares of floats
// are exact in double, a sum of 2C nonnegative terms errs by at most 2C 2^-53 relative.
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <math.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "core/rng.h"
#include "millipede/backend.h"
#include "millipede/model.h"
#include "model/model_private.h"
#include "model/retrieval.h"
#include "small_config.h"

static const mp_backend *be;

static void fill(float *x, size_t n, float lo, float hi, uint64_t stream) {
    for (size_t i = 0; i < n; i++) x[i] = lo + (hi - lo) * mp_uniform(4321, stream, i);
}

// One micro-batch's records: every slot has S records; record i's row is set[0] for even i
// (one heavy row) and the set's members in turn otherwise, so every member is touched.
typedef struct {
    int M, S;
    int64_t R;
    int64_t *start;        // (M + 1)
    int32_t *slot, *row;   // (R)
    float *x, *dy, *gate, *pre, *dx, *dgate;
} batch;

static batch make_batch(int M, int S, int C, const int32_t *set, int n_set, uint64_t seed) {
    batch b = {.M = M, .S = S, .R = (int64_t)M * S};
    size_t R = (size_t)(b.R ? b.R : 1), MC = (size_t)(M ? M : 1) * C;
    b.start = malloc((size_t)(M + 1) * sizeof(int64_t));
    b.slot = malloc(R * sizeof(int32_t));
    b.row = malloc(R * sizeof(int32_t));
    b.x = malloc(MC * sizeof(float));
    b.dy = malloc(MC * sizeof(float));
    b.dx = malloc(MC * sizeof(float));
    b.gate = malloc(R * sizeof(float));
    b.pre = malloc(R * sizeof(float));
    b.dgate = malloc(R * sizeof(float));
    for (int m = 0; m <= M; m++) b.start[m] = (int64_t)m * S;
    for (int64_t i = 0; i < b.R; i++) {
        b.slot[i] = (int32_t)(i / S);
        b.row[i] = i % 2 == 0 ? set[0] : set[(i / 2) % n_set];
    }
    fill(b.x, (size_t)M * C, -1, 1, 10 * seed + 1);
    fill(b.dy, (size_t)M * C, -1, 1, 10 * seed + 2);
    fill(b.gate, (size_t)b.R, 0, 1, 10 * seed + 3);
    fill(b.pre, (size_t)b.R, 0.1f, 1, 10 * seed + 4);
    for (int64_t i = 0; i < b.R; i += 3) b.pre[i] = -b.pre[i];   // some records off (ReLU)
    return b;
}

static void free_batch(batch *b) {
    free(b->start); free(b->slot); free(b->row); free(b->x); free(b->dy); free(b->dx);
    free(b->gate); free(b->pre); free(b->dgate);
}

// ref (+)= the batch's expert gradients in double; mark[r] |= the batch touched r
static void reference(double *rdu, double *rdv, uint8_t *mark, const float *U, const float *V,
                      const batch *b, long rows, int C, int overwrite) {
    if (overwrite) {
        memset(rdu, 0, (size_t)rows * C * sizeof(double));
        memset(rdv, 0, (size_t)rows * C * sizeof(double));
        memset(mark, 0, (size_t)rows);
    }
    for (int64_t i = 0; i < b->R; i++) {
        int64_t m = b->slot[i], r = b->row[i];
        double dot = 0.0;
        for (int c = 0; c < C; c++) dot += (double)b->dy[m * C + c] * V[r * C + c];
        double on = b->pre[i] > 0, g = U ? b->gate[i] * on * b->pre[i] : b->gate[i];
        double dpre = b->gate[i] * dot * on;
        for (int c = 0; c < C; c++) {
            rdv[r * C + c] += g * b->dy[m * C + c];
            if (U) rdu[r * C + c] += dpre * b->x[m * C + c];
        }
        mark[r] = 1;
    }
}

static void check_state(const char *ctx, const mp_expert_tables *t, const double *rdu,
                        const double *rdv, const uint8_t *mark, const double *row_ss, int C,
                        double grad_bound) {
    double worst = 0.0;
    for (long r = 0; r < t->rows; r++) {
        if (t->dirty[r] != mark[r])
            fail_msg("%s: dirty[%ld] = %d, want %d", ctx, r, t->dirty[r], mark[r]);
        double ss = 0.0;
        for (int c = 0; c < C; c++) {
            size_t o = (size_t)r * C + c;
            float gu = t->du ? t->du[o] : 0.0f, gv = t->dv[o];
            if (!mark[r] && (gv != 0.0f || gu != 0.0f || signbit(gv) || signbit(gu)))
                fail_msg("%s: row %ld has no record this step but reads %g, %g", ctx, r, gu, gv);
            double e = fabs(gv - rdv[o]);
            if (t->du && fabs(gu - rdu[o]) > e) e = fabs(gu - rdu[o]);
            if (e > worst) worst = e;
            if (!(e <= grad_bound))
                fail_msg("%s: row %ld col %d: du %.9g (want %.9g), dv %.9g (want %.9g), bound %.3g",
                         ctx, r, c, gu, t->du ? rdu[o] : 0.0, gv, rdv[o], grad_bound);
            ss += (double)gu * gu + (double)gv * gv;
        }
        double ss_bound = 2.0 * C * ldexp(1.0, -53) * ss;
        if (!(fabs(row_ss[r] - ss) <= ss_bound))
            fail_msg("%s: row_ss[%ld] = %.17g, the rows' sum of squares %.17g", ctx, r, row_ss[r], ss);
    }
    print_message("  %-40s largest gradient error %.3e (bound %.3e)\n", ctx, worst, grad_bound);
}

// Three steps: (overwrite A, accumulate B), (overwrite C: rows of A and B without records
// in C are zeroed), (overwrite with no records at all: everything zero).
static void run_modes(int peer) {
    int C = 6, S = 3;
    long rows = 10;
    size_t n = (size_t)rows * C;
    float *U = malloc(n * sizeof(float)), *V = malloc(n * sizeof(float));
    float *du = malloc(n * sizeof(float)), *dv = malloc(n * sizeof(float));
    fill(U, n, -1, 1, 1);
    fill(V, n, -1, 1, 2);
    // what the gradients hold before the first step of this test is never read: start dirty
    // everywhere with garbage, as after an earlier step
    fill(du, n, -1, 1, 3);
    fill(dv, n, -1, 1, 4);
    uint8_t *dirty = malloc((size_t)rows), *mark = calloc((size_t)rows, 1);
    memset(dirty, 1, (size_t)rows);
    double *row_ss = malloc((size_t)rows * sizeof(double));
    double *rdu = calloc(n, sizeof(double)), *rdv = calloc(n, sizeof(double));
    mp_expert_tables t = {.u = peer ? U : NULL, .v = V, .du = peer ? du : NULL, .dv = dv,
                          .dirty = dirty, .rows = rows};
    static const int32_t A[] = {0, 1, 2, 5}, B[] = {2, 3, 7}, Cs[] = {1, 3, 9};
    struct { const int32_t *set; int n_set, M, overwrite; const char *name; } plan[] = {
        {A, 4, 5, 1, "step 1, overwrite"},
        {B, 3, 4, 0, "step 1, accumulate"},
        {Cs, 3, 5, 1, "step 2, overwrite (A, B rows zeroed)"},
        {Cs, 3, 0, 1, "step 3, overwrite, no records"},
    };
    int K = 0;   // the most records any row's element sums (bound below)
    for (int p = 0; p < 4; p++) K += plan[p].M * S;
    double grad_bound = (K + C + 3) * ldexp(1.0, -24) * K * C;
    for (int p = 0; p < 4; p++) {
        batch b = make_batch(plan[p].M, S, C, plan[p].set, plan[p].n_set, 7 + p);
        be->experts_backward(&t, b.dx, b.dgate, b.dy, b.x, b.M, b.start, b.slot, b.row, b.gate,
                             b.pre, b.R, C, 1, plan[p].overwrite, row_ss);
        reference(rdu, rdv, mark, peer ? U : NULL, V, &b, rows, C, plan[p].overwrite);
        char ctx[96];
        snprintf(ctx, sizeof ctx, "%s: %s", peer ? "peer" : "pkm", plan[p].name);
        check_state(ctx, &t, rdu, rdv, mark, row_ss, C, grad_bound);
        free_batch(&b);
    }
    // row_ss NULL: not written, the gradients the same
    double *before = malloc((size_t)rows * sizeof(double));
    memcpy(before, row_ss, (size_t)rows * sizeof(double));
    batch b = make_batch(4, S, C, A, 4, 20);
    be->experts_backward(&t, b.dx, b.dgate, b.dy, b.x, b.M, b.start, b.slot, b.row, b.gate, b.pre,
                         b.R, C, 1, 1, NULL);
    assert_memory_equal(before, row_ss, (size_t)rows * sizeof(double));
    free_batch(&b);
    free(before);
    free(U); free(V); free(du); free(dv); free(dirty); free(mark); free(row_ss); free(rdu); free(rdv);
}

static void test_modes_peer(void **state) { (void)state; run_modes(1); }
static void test_modes_pkm(void **state) { (void)state; run_modes(0); }

// A row with more than a thread's share of the records has its columns split among the
// threads (expert_grads in retrieval_cpu.c), which must not change a bit: each element sums
// the same records in the same order. One thread (no row is hot then) against 3 (the heavy
// row, 3/4 of the records, is), in overwrite and accumulate mode, at C = 200 (three blocks
// of 64 columns and a last one of 8). A wrong column range, a block counted twice or left
// out, or a lost zeroing gives other bits.
static void test_hot_row_threads(void **state) {
    (void)state;
    int C = 200, S = 4, threads = omp_get_max_threads();
    long rows = 6;
    size_t n = (size_t)rows * C;
    static const int32_t set[] = {4, 4, 4, 1, 4, 4, 2, 4, 5};   // row 4: most odd records too
    float *out[2][2];   // [threads 1, 3][du, dv]
    double *ss[2];
    uint8_t *dirty[2];
    for (int run = 0; run < 2; run++) {
        omp_set_num_threads(run == 0 ? 1 : 3);
        float *U = malloc(n * sizeof(float)), *V = malloc(n * sizeof(float));
        out[run][0] = malloc(n * sizeof(float));
        out[run][1] = malloc(n * sizeof(float));
        fill(U, n, -1, 1, 31);
        fill(V, n, -1, 1, 32);
        fill(out[run][0], n, -1, 1, 33);
        fill(out[run][1], n, -1, 1, 34);
        dirty[run] = malloc((size_t)rows);
        memset(dirty[run], 1, (size_t)rows);
        ss[run] = calloc((size_t)rows, sizeof(double));
        mp_expert_tables t = {.u = U, .v = V, .du = out[run][0], .dv = out[run][1],
                              .dirty = dirty[run], .rows = rows};
        for (int p = 0; p < 2; p++) {   // overwrite, then accumulate
            batch b = make_batch(40, S, C, set, 9, 40 + p);
            be->experts_backward(&t, b.dx, b.dgate, b.dy, b.x, b.M, b.start, b.slot, b.row,
                                 b.gate, b.pre, b.R, C, 1, p == 0, ss[run]);
            free_batch(&b);
        }
        free(U); free(V);
    }
    omp_set_num_threads(threads);
    assert_memory_equal(out[0][0], out[1][0], n * sizeof(float));
    assert_memory_equal(out[0][1], out[1][1], n * sizeof(float));
    assert_memory_equal(ss[0], ss[1], (size_t)rows * sizeof(double));
    assert_memory_equal(dirty[0], dirty[1], (size_t)rows);
    for (int run = 0; run < 2; run++) {
        free(out[run][0]); free(out[run][1]); free(ss[run]); free(dirty[run]);
    }
}

// The model's use of the modes (tests/unit/small_config.h: a PEER and a PKM block): a step
// of two micro-batches, then a step of one on other tokens. After each step every expert
// row the step's forwards selected is dirty and no other, the other rows read exactly
// zero (the first step's rows that the second did not select included), and row_ss, from
// mp_model_expert_row_ss, is each row's sum of squares (the bound of run_modes).
static void test_model_steps(void **state) {
    (void)state;
    mp_config c;
    small_config(&c);
    validate(&c);
    int B = c.batch_size, T = c.context, N = B * T;
    mp_model *m = mp_model_create(&c, be, B);
    mp_model_init(m);
    int64_t nss[3];
    const double *ss[2] = {mp_model_expert_row_ss(m, 1, &nss[1]), mp_model_expert_row_ss(m, 2, &nss[2])};
    assert_non_null(ss[0]);
    assert_non_null(ss[1]);
    assert_int_equal(nss[1], 64);
    assert_int_equal(nss[2], 64);
    assert_null(mp_model_expert_row_ss(m, 0, &nss[0]));   // the dense block
    assert_int_equal(nss[0], 0);
    int32_t in[16], tg[16];
    for (int step = 0; step < 2; step++) {
        uint8_t *sel[2];   // per retrieval block: the rows this step's forwards selected
        for (int b = 0; b < 2; b++) sel[b] = calloc(64, 1);
        mp_model_zero_grad(m);
        for (int micro = 0; micro < 2 - step; micro++) {
            for (int i = 0; i < N; i++) {
                in[i] = (int32_t)(mp_hash3(9 + step, micro, i) % c.vocab_size);
                tg[i] = (int32_t)(mp_hash3(19 + step, micro, i) % c.vocab_size);
            }
            mp_model_forward(m, in, tg, B, T, 1);
            for (int b = 0; b < 2; b++) {
                mp_retrieval_layer *l = mp_model_retrieval_layer(m, b + 1);
                for (int i = 0; i < N * l->rc->heads * l->rc->topk; i++) sel[b][l->sel[i]] = 1;
            }
            mp_model_backward(m, 0.5f);
        }
        for (int b = 0; b < 2; b++) {
            mp_retrieval_layer *l = mp_model_retrieval_layer(m, b + 1);
            int C = l->C;
            long n_sel = 0;
            for (long r = 0; r < l->rows; r++) {
                n_sel += sel[b][r];
                if (l->grad_dirty[r] != sel[b][r])
                    fail_msg("step %d block %d: dirty[%ld] = %d, selected %d", step, b + 1, r,
                             l->grad_dirty[r], sel[b][r]);
                double want = 0.0;
                for (int k = 0; k < C; k++) {
                    float u = l->du ? l->du[r * C + k] : 0.0f, v = l->dv[r * C + k];
                    if (!sel[b][r] && (u != 0.0f || v != 0.0f))
                        fail_msg("step %d block %d: row %ld not selected but reads %g, %g", step,
                                 b + 1, r, u, v);
                    want += (double)u * u + (double)v * v;
                }
                if (!(fabs(ss[b][r] - want) <= 2.0 * C * ldexp(1.0, -53) * want))
                    fail_msg("step %d block %d: row_ss[%ld] = %.17g, want %.17g", step, b + 1, r,
                             ss[b][r], want);
            }
            // a step that selects every row would not test the zeroing
            if (n_sel == 0 || n_sel == l->rows) fail_msg("step %d block %d: %ld rows selected", step, b + 1, n_sel);
            print_message("  step %d block %d: %ld of %ld rows selected\n", step, b + 1, n_sel, l->rows);
        }
        for (int b = 0; b < 2; b++) free(sel[b]);
    }
    mp_model_free(m);
}

int main(void) {
    be = mp_backend_cpu();
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_modes_peer),
        cmocka_unit_test(test_modes_pkm),
        cmocka_unit_test(test_hot_row_threads),
        cmocka_unit_test(test_model_steps),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
