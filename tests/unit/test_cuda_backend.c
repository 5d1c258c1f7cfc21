// The CUDA backend against the CPU backend (the reference), fp32, on the same inputs.
//
// Without a GPU (or in a build without CUDA) mp_backend_cuda returns NULL: the test prints
// the reason and exits 77, which ctest reports as skipped (SKIP_RETURN_CODE), never passed.
//
// What is checked, with a GPU:
// - every op of the backend table: outputs, and gradients that are pre-filled with random
//   values so that accumulation (+=) is checked too;
// - the product-key top-k against brute force over all n*n pairs, on scores with exact ties
//   and near-ties (values on a 2^-20 grid, so the float sums are exact and the brute force
//   is the exact answer), and against the CPU's mp_product_topk on random scores;
// - the PEER / PKM layer (route, exchange staging, experts, backward) and a whole model:
//   outputs, dx and every parameter gradient (W_q, BN, K1, K2, U, V, dense parameters);
// - determinism: the layer and the model twice, compared bit for bit.
//
// Tolerance: 1e-4 relative, as ||got - want|| / ||want|| and max |got - want| <= 1e-4 max
// |want| per tensor. Both sides are fp32; they differ only in summation order (cuBLAS vs
// OpenBLAS, whose kernel family depends on the CPU; warp trees vs 8-lane sums) and FMA
// contraction, ~sqrt(K) u ~ 1e-6 for the sums here (u = 2^-24), at worst K u ~ 2e-5 for
// the longest, K = 300 (the vocabulary of test_crossentropy), outside the backward of BN
// and softmax, which subtract nearly equal terms (measured there: 7e-7); a wrong formula,
// index or a missed accumulation gives O(1e-2..1).
// The top-k is a discontinuous function: inputs whose k-th and (k+1)-th scores lie closer
// than 1e-4 (or, with ReLU experts, a pre-activation within 1e-4 of the kink) would make the
// two backends legitimately pick differently, so such inputs are rejected and the next
// seed is taken (the number of rejected seeds is printed). The scores are O(0.1..1) (queries,
// BN'd or not, times keys of norm ~1, dk / 2 = 4 terms) and the two backends' differ by ~1e-6
// of that (the error of the forward before them, above): 1e-4 is >= 100x that.
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>
#include "backend/cpu/cpu.h"
#include "core/rng.h"
#include "millipede/backend.h"
#include "millipede/model.h"
#include "millipede/train.h"
#include "model/model_private.h"
#include "model/retrieval.h"
#ifdef MP_HAVE_CUDA
#include "backend/cuda/cuda.h"
#endif

#define TOL 1e-4

static const mp_backend *cpu, *gpu;
static uint64_t g_stream = 1;

// ---------------------------------------------------------------------------------------
// helpers

static void fill(float *x, size_t n, float lo, float hi) {
    uint64_t s = g_stream++;
    for (size_t i = 0; i < n; i++) x[i] = lo + (hi - lo) * mp_uniform(77, s, i);
}

static float *frand(size_t n, float lo, float hi) {
    float *x = malloc((n ? n : 1) * sizeof(float));
    fill(x, n, lo, hi);
    return x;
}

static void *dev_copy(const void *host, size_t bytes) {
    void *d = gpu->alloc(bytes);
    gpu->from_host(d, host, bytes);
    return d;
}

static void *host_copy(const void *dev, size_t bytes) {
    void *h = malloc(bytes ? bytes : 1);
    gpu->to_host(h, dev, bytes);
    return h;
}

static double g_worst;        // the largest relative error seen, printed at the end
static double g_worst_bf16;   // the same for bf16 tables against the CPU's fp32
static double g_tol = TOL;    // expect_dev's tolerance
static double *g_track = &g_worst;

static void expect_close(const char *what, const float *got, const float *want, size_t n,
                         double tol) {
    double d2 = 0.0, w2 = 0.0, dmax = 0.0, wmax = 0.0;
    size_t at = 0;
    for (size_t i = 0; i < n; i++) {
        double d = fabs((double)got[i] - want[i]);
        if (!(d <= dmax)) { dmax = d; at = i; }   // NaN lands here too
        d2 += d * d;
        w2 += (double)want[i] * want[i];
        if (fabs(want[i]) > wmax) wmax = fabs(want[i]);
    }
    double rel = w2 > 0 ? sqrt(d2 / w2) : sqrt(d2);
    double relmax = wmax > 0 ? dmax / wmax : dmax;
    if (rel > *g_track) *g_track = rel;
    if (!(rel <= tol) || !(relmax <= tol))
        fail_msg("%s: relative error %.3g (norm), %.3g (max, at %zu: got %.9g want %.9g), "
                 "tolerance %.1g", what, rel, relmax, at, got[at], want[at], tol);
}

// device tensor vs host reference
static void expect_dev(const char *what, const float *dev, const float *want, size_t n) {
    float *h = host_copy(dev, n * sizeof(float));
    expect_close(what, h, want, n, g_tol);
    free(h);
}

// ---------------------------------------------------------------------------------------
// memory

static void test_memory(void **state) {
    (void)state;
    size_t n = 1000;
    float *d = gpu->alloc(n * sizeof(float));
    float *h = host_copy(d, n * sizeof(float));
    for (size_t i = 0; i < n; i++) assert_true(h[i] == 0.0f);
    fill(h, n, -1, 1);
    gpu->from_host(d, h, n * sizeof(float));
    float *back = host_copy(d, n * sizeof(float));
    assert_memory_equal(back, h, n * sizeof(float));
    gpu->zero(d, n * sizeof(float));
    gpu->to_host(back, d, n * sizeof(float));
    for (size_t i = 0; i < n; i++) assert_true(back[i] == 0.0f);
    free(h);
    free(back);
    gpu->free(d);
}

// ---------------------------------------------------------------------------------------
// dense ops

static void test_encoder(void **state) {
    (void)state;
    int B = 3, T = 5, C = 37, V = 7, N = B * T;
    int32_t inp[15];
    for (int i = 0; i < N; i++) inp[i] = (int32_t)(mp_hash3(1, 2, i) % V);   // repeats
    float *wte = frand((size_t)V * C, -1, 1), *wpe = frand((size_t)T * C, -1, 1);
    float *out = frand((size_t)N * C, 0, 0);
    cpu->encoder_forward(out, inp, wte, wpe, B, T, C);
    int32_t *d_inp = dev_copy(inp, sizeof inp);
    float *d_wte = dev_copy(wte, (size_t)V * C * 4), *d_wpe = dev_copy(wpe, (size_t)T * C * 4);
    float *d_out = gpu->alloc((size_t)N * C * 4);
    gpu->encoder_forward(d_out, d_inp, d_wte, d_wpe, B, T, C);
    expect_dev("encoder out", d_out, out, (size_t)N * C);
    // backward: gradients start from random values (accumulation)
    float *dout = frand((size_t)N * C, -1, 1);
    float *dwte = frand((size_t)V * C, -1, 1), *dwpe = frand((size_t)T * C, -1, 1);
    float *d_dout = dev_copy(dout, (size_t)N * C * 4);
    float *d_dwte = dev_copy(dwte, (size_t)V * C * 4), *d_dwpe = dev_copy(dwpe, (size_t)T * C * 4);
    cpu->encoder_backward(dwte, dwpe, dout, inp, B, T, C);
    gpu->encoder_backward(d_dwte, d_dwpe, d_dout, d_inp, B, T, C);
    expect_dev("encoder dwte", d_dwte, dwte, (size_t)V * C);
    expect_dev("encoder dwpe", d_dwpe, dwpe, (size_t)T * C);
    void *dev[] = {d_inp, d_wte, d_wpe, d_out, d_dout, d_dwte, d_dwpe};
    for (size_t i = 0; i < 7; i++) gpu->free(dev[i]);
    free(wte); free(wpe); free(out); free(dout); free(dwte); free(dwpe);
}

static void test_layernorm(void **state) {
    (void)state;
    int N = 19, C = 70;
    size_t NC = (size_t)N * C;
    float *x = frand(NC, -2, 3), *w = frand(C, 0.5, 1.5), *b = frand(C, -1, 1);
    float *out = frand(NC, 0, 0), *mean = frand(N, 0, 0), *rstd = frand(N, 0, 0);
    cpu->layernorm_forward(out, mean, rstd, x, w, b, N, C);
    float *d_x = dev_copy(x, NC * 4), *d_w = dev_copy(w, C * 4), *d_b = dev_copy(b, C * 4);
    float *d_out = gpu->alloc(NC * 4), *d_mean = gpu->alloc(N * 4), *d_rstd = gpu->alloc(N * 4);
    gpu->layernorm_forward(d_out, d_mean, d_rstd, d_x, d_w, d_b, N, C);
    expect_dev("layernorm out", d_out, out, NC);
    expect_dev("layernorm mean", d_mean, mean, N);
    expect_dev("layernorm rstd", d_rstd, rstd, N);
    float *dout = frand(NC, -1, 1), *dx = frand(NC, -1, 1), *dw = frand(C, -1, 1), *db = frand(C, -1, 1);
    float *d_dout = dev_copy(dout, NC * 4), *d_dx = dev_copy(dx, NC * 4);
    float *d_dw = dev_copy(dw, C * 4), *d_db = dev_copy(db, C * 4);
    cpu->layernorm_backward(dx, dw, db, dout, x, w, mean, rstd, N, C);
    gpu->layernorm_backward(d_dx, d_dw, d_db, d_dout, d_x, d_w, d_mean, d_rstd, N, C);
    expect_dev("layernorm dx", d_dx, dx, NC);
    expect_dev("layernorm dw", d_dw, dw, C);
    expect_dev("layernorm db", d_db, db, C);
    void *dev[] = {d_x, d_w, d_b, d_out, d_mean, d_rstd, d_dout, d_dx, d_dw, d_db};
    for (size_t i = 0; i < 10; i++) gpu->free(dev[i]);
    void *host[] = {x, w, b, out, mean, rstd, dout, dx, dw, db};
    for (size_t i = 0; i < 10; i++) free(host[i]);
}

static void check_matmul(int N, int C, int OC, int with_bias) {
    size_t nx = (size_t)N * C, nw = (size_t)OC * C, no = (size_t)N * OC;
    float *x = frand(nx, -1, 1), *w = frand(nw, -1, 1), *bias = frand(OC, -1, 1);
    float *out = frand(no, 0, 0);
    cpu->matmul_forward(out, x, w, with_bias ? bias : NULL, N, C, OC);
    float *d_x = dev_copy(x, nx * 4), *d_w = dev_copy(w, nw * 4), *d_bias = dev_copy(bias, OC * 4);
    float *d_out = gpu->alloc(no * 4);
    gpu->matmul_forward(d_out, d_x, d_w, with_bias ? d_bias : NULL, N, C, OC);
    expect_dev("matmul out", d_out, out, no);
    float *dout = frand(no, -1, 1), *dx = frand(nx, -1, 1), *dw = frand(nw, -1, 1), *db = frand(OC, -1, 1);
    float *d_dout = dev_copy(dout, no * 4), *d_dx = dev_copy(dx, nx * 4), *d_dw = dev_copy(dw, nw * 4);
    float *d_db = dev_copy(db, OC * 4);
    cpu->matmul_backward(dx, dw, with_bias ? db : NULL, dout, x, w, N, C, OC);
    gpu->matmul_backward(d_dx, d_dw, with_bias ? d_db : NULL, d_dout, d_x, d_w, N, C, OC);
    expect_dev("matmul dx", d_dx, dx, nx);
    expect_dev("matmul dw", d_dw, dw, nw);
    expect_dev("matmul dbias", d_db, db, OC);
    // NULL gradients are not written
    gpu->matmul_backward(NULL, d_dw, NULL, d_dout, d_x, d_w, N, C, OC);
    cpu->matmul_backward(NULL, dw, NULL, dout, x, w, N, C, OC);
    expect_dev("matmul dw only", d_dw, dw, nw);
    expect_dev("matmul dx untouched", d_dx, dx, nx);
    void *dev[] = {d_x, d_w, d_bias, d_out, d_dout, d_dx, d_dw, d_db};
    for (size_t i = 0; i < 8; i++) gpu->free(dev[i]);
    void *host[] = {x, w, bias, out, dout, dx, dw, db};
    for (size_t i = 0; i < 8; i++) free(host[i]);
}

static void test_matmul(void **state) {
    (void)state;
    check_matmul(33, 45, 29, 1);
    check_matmul(7, 64, 130, 0);
    check_matmul(200, 3, 1, 1);
}

static void test_attention(void **state) {
    (void)state;
    int B = 2, T = 13, C = 24, NH = 3;
    size_t nq = (size_t)B * T * 3 * C, no = (size_t)B * T * C, na = (size_t)B * NH * T * T;
    float *qkv = frand(nq, -1, 1), *out = frand(no, 0, 0), *att = frand(na, 0, 0);
    cpu->attention_forward(out, att, qkv, B, T, C, NH);
    float *d_qkv = dev_copy(qkv, nq * 4), *d_out = gpu->alloc(no * 4), *d_att = gpu->alloc(na * 4);
    gpu->attention_forward(d_out, d_att, d_qkv, B, T, C, NH);
    expect_dev("attention out", d_out, out, no);
    expect_dev("attention att", d_att, att, na);
    float *dout = frand(no, -1, 1), *dqkv = frand(nq, -1, 1);
    float *d_dout = dev_copy(dout, no * 4), *d_dqkv = dev_copy(dqkv, nq * 4);
    cpu->attention_backward(dqkv, dout, qkv, att, B, T, C, NH);
    gpu->attention_backward(d_dqkv, d_dout, d_qkv, d_att, B, T, C, NH);
    expect_dev("attention dqkv", d_dqkv, dqkv, nq);
    void *dev[] = {d_qkv, d_out, d_att, d_dout, d_dqkv};
    for (size_t i = 0; i < 5; i++) gpu->free(dev[i]);
    free(qkv); free(out); free(att); free(dout); free(dqkv);
}

static void test_elementwise(void **state) {
    (void)state;
    long n = 1001;
    float *x = frand(n, -4, 4), *y = frand(n, -1, 1), *out = frand(n, 0, 0);
    float *d_x = dev_copy(x, n * 4), *d_y = dev_copy(y, n * 4), *d_out = gpu->alloc(n * 4);
    cpu->gelu_forward(out, x, n);
    gpu->gelu_forward(d_out, d_x, n);
    expect_dev("gelu", d_out, out, n);
    float *dx = frand(n, -1, 1), *d_dx = dev_copy(dx, n * 4);
    cpu->gelu_backward(dx, x, y, n);
    gpu->gelu_backward(d_dx, d_x, d_y, n);
    expect_dev("gelu backward", d_dx, dx, n);
    cpu->residual_forward(out, x, y, n);
    gpu->residual_forward(d_out, d_x, d_y, n);
    expect_dev("residual", d_out, out, n);
    gpu->residual_forward(d_x, d_x, d_y, n);   // out may alias a
    expect_dev("residual in place", d_x, out, n);
    gpu->free(d_x); gpu->free(d_y); gpu->free(d_out); gpu->free(d_dx);
    free(x); free(y); free(out); free(dx);
}

static void test_crossentropy(void **state) {
    (void)state;
    int N = 7, V = 300;
    size_t nv = (size_t)N * V;
    float *logits = frand(nv, -5, 5), *probs = frand(nv, 0, 0), *losses = frand(N, 0, 0);
    int32_t tg[7];
    for (int i = 0; i < N; i++) tg[i] = (int32_t)(mp_hash3(3, 4, i) % V);
    cpu->crossentropy_forward(losses, probs, logits, tg, N, V);
    float *d_logits = dev_copy(logits, nv * 4), *d_probs = gpu->alloc(nv * 4);
    float *d_losses = gpu->alloc(N * 4);
    int32_t *d_tg = dev_copy(tg, sizeof tg);
    gpu->crossentropy_forward(d_losses, d_probs, d_logits, d_tg, N, V);
    expect_dev("crossentropy losses", d_losses, losses, N);
    expect_dev("crossentropy probs", d_probs, probs, nv);
    float *dl = frand(nv, -1, 1), *d_dl = dev_copy(dl, nv * 4);
    cpu->crossentropy_backward(dl, probs, tg, 0.37f, N, V);
    gpu->crossentropy_backward(d_dl, d_probs, d_tg, 0.37f, N, V);
    expect_dev("crossentropy dlogits", d_dl, dl, nv);
    gpu->free(d_logits); gpu->free(d_probs); gpu->free(d_losses); gpu->free(d_tg); gpu->free(d_dl);
    free(logits); free(probs); free(losses); free(dl);
}

static void test_optim(void **state) {
    (void)state;
    size_t n = 5000;
    float *p = frand(n, -1, 1), *m = frand(n, 0, 0), *v = frand(n, 0, 0);
    float *d_p = dev_copy(p, n * 4), *d_m = gpu->alloc(n * 4), *d_v = gpu->alloc(n * 4);
    for (long t = 1; t <= 3; t++) {
        float *g = frand(n, -1, 1), *d_g = dev_copy(g, n * 4);
        cpu->adamw(p, g, m, v, n, 1e-2f, 0.9f, 0.95f, 1e-8f, 0.1f, t, 0.5f);
        gpu->adamw(d_p, d_g, d_m, d_v, n, 1e-2f, 0.9f, 0.95f, 1e-8f, 0.1f, t, 0.5f);
        gpu->free(d_g);
        free(g);
    }
    expect_dev("adamw p", d_p, p, n);
    expect_dev("adamw m", d_m, m, n);
    expect_dev("adamw v", d_v, v, n);
    size_t big = 70001;   // several partial-sum blocks and a tail
    float *x = frand(big, -3, 3), *d_x = dev_copy(x, big * 4);
    double want = cpu->sum_squares(x, big), got = gpu->sum_squares(d_x, big);
    // exact double squares, all positive: each side errs by at most (terms one value passes
    // through) 2^-53 of the sum: CPU <= 4096 + 8 (4 lanes of a 16384 block, the blocks),
    // GPU <= 64 + 5 + 8 + 5 (a thread's stride, the warp tree, the warps, the blocks), so
    // the two differ by <= 4.6e-13 of the sum; a float accumulation or a lost block is >= 6e-8.
    if (fabs(got - want) > 1e-12 * want) fail_msg("sum_squares %.17g, CPU %.17g", got, want);
    assert_true(gpu->sum_squares(d_x, 0) == 0.0);
    gpu->free(d_p); gpu->free(d_m); gpu->free(d_v); gpu->free(d_x);
    free(p); free(m); free(v); free(x);
}

static float *fdup(const float *x, size_t n) {
    float *y = malloc(n * sizeof(float));
    memcpy(y, x, n * sizeof(float));
    return y;
}

// Lazy AdamW's row ops (adamw_rows, sum_squares_rows, zero_rows) against the CPU's: 40 of
// 97 rows of width C = 300 (more than a block's 256 threads) listed, out of order. The
// unlisted rows must come back bit for bit (not written), the listed ones within TOL.
static void test_optim_rows(void **state) {
    (void)state;
    int R = 97, C = 300, nr = 40;
    size_t n = (size_t)R * C;
    int32_t rows[40];
    for (int i = 0; i < nr; i++) rows[i] = (int32_t)((i * 37 + 11) % R);   // 37 coprime to 97: distinct
    float *p = frand(n, -1, 1), *m = frand(n, -0.1f, 0.1f), *v = frand(n, 0, 0.01f);
    float *p0 = fdup(p, n), *m0 = fdup(m, n), *v0 = fdup(v, n);
    float *d_p = dev_copy(p, n * 4), *d_m = dev_copy(m, n * 4), *d_v = dev_copy(v, n * 4);
    int32_t *d_rows = dev_copy(rows, sizeof rows);
    for (long t = 1; t <= 3; t++) {
        float *g = frand(n, -1, 1), *d_g = dev_copy(g, n * 4);
        cpu->adamw_rows(p, g, m, v, rows, nr, C, 1e-2f, 0.9f, 0.95f, 1e-8f, 0.1f, t, 0.5f);
        gpu->adamw_rows(d_p, d_g, d_m, d_v, d_rows, nr, C, 1e-2f, 0.9f, 0.95f, 1e-8f, 0.1f, t, 0.5f);
        gpu->free(d_g);
        free(g);
    }
    expect_dev("adamw_rows p", d_p, p, n);
    expect_dev("adamw_rows m", d_m, m, n);
    expect_dev("adamw_rows v", d_v, v, n);
    // the CPU left unlisted rows alone, and the GPU's unlisted rows are the CPU's bits
    float *hp = host_copy(d_p, n * 4);
    int listed[97] = {0};
    for (int i = 0; i < nr; i++) listed[rows[i]] = 1;
    for (int r = 0; r < R; r++) {
        size_t o = (size_t)r * C;
        int same = !memcmp(p + o, p0 + o, C * 4) && !memcmp(m + o, m0 + o, C * 4) &&
                   !memcmp(v + o, v0 + o, C * 4) && !memcmp(hp + o, p0 + o, C * 4);
        if (listed[r] == same) fail_msg("adamw_rows: row %d %s", r, listed[r] ? "not updated" : "written");
    }
    // sums of squares, of the same values (the CPU's p: the updates above agree only to
    // rounding, e.g. where nvcc contracts to FMA): both exact double squares of C = 300
    // floats per row, then 40 row partials in list order; each side errs by <= (300 + 40)
    // 2^-53 of the sum, the two by <= 1e-13; a float accumulation or a missed row is >= 6e-8
    gpu->from_host(d_p, p, n * 4);
    double want = cpu->sum_squares_rows(p, rows, nr, C), got = gpu->sum_squares_rows(d_p, d_rows, nr, C);
    if (fabs(got - want) > 1e-12 * want) fail_msg("sum_squares_rows %.17g, CPU %.17g", got, want);
    assert_true(gpu->sum_squares_rows(d_p, d_rows, 0, C) == 0.0);
    cpu->zero_rows(p, rows, nr, C);
    gpu->zero_rows(d_p, d_rows, nr, C);
    free(hp);
    hp = host_copy(d_p, n * 4);
    if (memcmp(hp, p, n * 4)) fail_msg("zero_rows differs from the CPU's");
    gpu->free(d_p); gpu->free(d_m); gpu->free(d_v); gpu->free(d_rows);
    free(p); free(m); free(v); free(p0); free(m0); free(v0); free(hp);
}

// ---------------------------------------------------------------------------------------
// product-key top-k

#ifdef MP_HAVE_CUDA
// The k best of all n*n pairs (float sums, ties to the lower id): the definition.
static void brute_topk(const float *s1, const float *s2, int n, int k, long *best) {
    for (int j = 0; j < k; j++) {
        long bi = -1;
        float bv = 0.0f;
        for (long e = 0; e < (long)n * n; e++) {
            float sc = s1[e / n] + s2[e % n];
            int taken = 0;
            for (int q = 0; q < j; q++) taken |= best[q] == e;
            if (taken) continue;
            if (bi < 0 || sc > bv || (sc == bv && e < bi)) { bv = sc; bi = e; }
        }
        best[j] = bi;
    }
}

// grid = 1: values on a 2^-20 grid in [1, 1 + 8*2^-20): exact ties and near-ties whose sums
// are exact in float; grid = 0: uniform random floats
static void check_topk(long rows, int n, int k, int grid) {
    size_t ns = (size_t)rows * n, nk = (size_t)rows * k;
    float *s1 = malloc(ns * 4), *s2 = malloc(ns * 4);
    uint64_t st = g_stream++;
    for (size_t i = 0; i < ns; i++) {
        if (grid) {
            s1[i] = 1.0f + (float)(mp_hash3(9, st, i) % 8) * 0x1p-20f;
            s2[i] = 1.0f + (float)(mp_hash3(9, st + 1000, i) % 8) * 0x1p-20f;
        } else {
            s1[i] = mp_uniform(9, st, i);
            s2[i] = mp_uniform(9, st + 1000, i);
        }
    }
    float *d_s1 = dev_copy(s1, ns * 4), *d_s2 = dev_copy(s2, ns * 4);
    int32_t *d_sel = gpu->alloc(nk * 4), *d_a = gpu->alloc(nk * 4), *d_b = gpu->alloc(nk * 4);
    float *d_gate = gpu->alloc(nk * 4);
    mp_cuda_product_topk(d_s1, d_s2, NULL, 1, rows, n, k, d_sel, d_a, d_b, d_gate);
    int32_t *sel = host_copy(d_sel, nk * 4), *sa = host_copy(d_a, nk * 4), *sb = host_copy(d_b, nk * 4);
    float *gate = host_copy(d_gate, nk * 4);
    long best[32];
    float vals[32];
    int32_t ca[32], cb[32];
    for (long r = 0; r < rows; r++) {
        const float *r1 = s1 + r * n, *r2 = s2 + r * n;
        const int32_t *got = sel + r * k;
        if (grid) brute_topk(r1, r2, n, k, best);
        else mp_product_topk(r1, r2, n, k, vals, best, ca, cb);
        double mx = r1[best[0] / n] + r2[best[0] % n], z = 0.0;
        for (int j = 0; j < k; j++) z += exp((double)(r1[best[j] / n] + r2[best[j] % n]) - mx);
        for (int j = 0; j < k; j++) {
            if (got[j] != best[j])
                fail_msg("top-k (n %d, k %d, %s) row %ld position %d: GPU expert %d, %s %ld", n, k,
                         grid ? "ties" : "random", r, j, got[j], grid ? "brute force" : "CPU", best[j]);
            assert_int_equal(sa[r * k + j], best[j] / n);
            assert_int_equal(sb[r * k + j], best[j] % n);
            double g = exp((double)(r1[best[j] / n] + r2[best[j] % n]) - mx) / z;
            // The GPU: expf (<= 2 ulp, 4u relative), a sum of k positive terms in order
            // ((k - 1) u), a division (u), from scores whose float difference v - mx errs by
            // u |v - mx| (u / e after exp): |gate - g| <= g (k + 5) u + u / e. The gates here
            // are ~1/k (on the grid all scores lie within 2^-17, the random ones' top k within
            // ~k / n^2), so that is <= ~2e-7; a wrong max, sum or index is >= 1e-3.
            if (fabs(gate[r * k + j] - g) > 1e-6) fail_msg("gate %.9g, want %.9g", gate[r * k + j], g);
        }
    }
    void *dev[] = {d_s1, d_s2, d_sel, d_a, d_b, d_gate};
    for (size_t i = 0; i < 6; i++) gpu->free(dev[i]);
    free(s1); free(s2); free(sel); free(sa); free(sb); free(gate);
}

// With balance biases (2, H, n) of about the scores' size: row r is head r % H; the
// expected experts are the CPU top-k of the biased rows, the gates the softmax of the plain
// scores of those experts (as the route computes them).
static void check_topk_bias(long rows, int n, int k, int H) {
    size_t ns = (size_t)rows * n, nk = (size_t)rows * k, nb = 2 * (size_t)H * n;
    float *s1 = malloc(ns * 4), *s2 = malloc(ns * 4), *b = malloc(nb * 4);
    uint64_t st = g_stream++;
    for (size_t i = 0; i < ns; i++) {
        s1[i] = mp_uniform(12, st, i);
        s2[i] = mp_uniform(12, st + 1000, i);
    }
    for (size_t i = 0; i < nb; i++) b[i] = mp_uniform(13, st, i) - 0.5f;
    float *d_s1 = dev_copy(s1, ns * 4), *d_s2 = dev_copy(s2, ns * 4), *d_b = dev_copy(b, nb * 4);
    int32_t *d_sel = gpu->alloc(nk * 4), *d_a = gpu->alloc(nk * 4), *d_b2 = gpu->alloc(nk * 4);
    float *d_gate = gpu->alloc(nk * 4);
    mp_cuda_product_topk(d_s1, d_s2, d_b, H, rows, n, k, d_sel, d_a, d_b2, d_gate);
    int32_t *sel = host_copy(d_sel, nk * 4);
    float *gate = host_copy(d_gate, nk * 4);
    float *r1b = malloc(n * 4), *r2b = malloc(n * 4), vals[32];
    long best[32];
    int32_t ca[32], cb[32];
    int reordered = 0;
    for (long r = 0; r < rows; r++) {
        const float *r1 = s1 + r * n, *r2 = s2 + r * n;
        const float *b1 = b + (r % H) * n, *b2 = b + ((size_t)H + r % H) * n;
        for (int i = 0; i < n; i++) { r1b[i] = r1[i] + b1[i]; r2b[i] = r2[i] + b2[i]; }
        mp_product_topk(r1b, r2b, n, k, vals, best, ca, cb);
        long plain[32];
        mp_product_topk(r1, r2, n, k, vals, plain, ca, cb);
        reordered |= memcmp(best, plain, k * sizeof *best) != 0;
        double mx = -INFINITY, z = 0.0;
        for (int j = 0; j < k; j++) mx = fmax(mx, (double)(r1[best[j] / n] + r2[best[j] % n]));
        for (int j = 0; j < k; j++) z += exp((double)(r1[best[j] / n] + r2[best[j] % n]) - mx);
        for (int j = 0; j < k; j++) {
            if (sel[r * k + j] != best[j])
                fail_msg("top-k with biases (n %d, k %d, H %d) row %ld position %d: GPU expert %d, "
                         "CPU %ld", n, k, H, r, j, sel[r * k + j], best[j]);
            double g = exp((double)(r1[best[j] / n] + r2[best[j] % n]) - mx) / z;
            // as in check_topk: <= g (k + 5) u + u / e of the plain-score softmax
            if (fabs(gate[r * k + j] - g) > 1e-6) fail_msg("gate %.9g, want %.9g", gate[r * k + j], g);
        }
    }
    if (!reordered) fail_msg("biases of this size must change some selection (n %d)", n);
    void *dev[] = {d_s1, d_s2, d_b, d_sel, d_a, d_b2, d_gate};
    for (size_t i = 0; i < 7; i++) gpu->free(dev[i]);
    free(s1); free(s2); free(b); free(sel); free(gate); free(r1b); free(r2b);
}
#endif

static void test_topk(void **state) {
    (void)state;
#ifdef MP_HAVE_CUDA
    check_topk(64, 37, 5, 1);     // n not a multiple of the warp
    check_topk(16, 40, 16, 1);
    check_topk(8, 33, 32, 1);     // k = 32: the most the kernel supports
    check_topk(3, 4, 4, 1);       // k = n
    check_topk(300, 64, 16, 0);
    check_topk(100, 1000, 8, 0);  // many columns per lane
    // each register width NPL (scores per lane, n <= 32 NPL) and the n > 1024 fallback
    check_topk(8, 1, 1, 1);       // NPL 1
    check_topk(8, 5, 5, 1);
    check_topk(8, 32, 32, 1);
    check_topk(8, 100, 32, 1);    // NPL 4
    check_topk(4, 256, 24, 1);    // NPL 8
    check_topk(4, 257, 16, 1);    // NPL 16
    check_topk(2, 1024, 16, 1);   // NPL 32: the top classes of ties span every lane
    check_topk(2, 1100, 16, 1);   // fallback: the row read from memory each round
    check_topk(64, 512, 32, 0);
    check_topk(64, 1024, 32, 0);
    check_topk(400, 1100, 32, 0); // enough rows that the last column is among the picks
    // balance biases per head: registers (NPL 1, 4) and the n > 1024 fallback
    check_topk_bias(30, 32, 8, 3);
    check_topk_bias(64, 100, 8, 4);
    check_topk_bias(8, 1100, 16, 2);
    // NaN scores (a third of them) are never picked: with >= k finite scores in each half the
    // result is the brute force with NaN as -inf (registers: n = 100; fallback: n = 1100)
    for (int n = 100; n <= 1100; n += 1000) {
        int k = 8, rows = 2;
        size_t ns = (size_t)rows * n, nk = (size_t)rows * k;
        float *s = malloc(2 * ns * 4), *inf = malloc(2 * ns * 4);   // (2, rows, n)
        for (size_t i = 0; i < 2 * ns; i++) {
            s[i] = mp_hash3(11, n, i) % 3 ? 1.0f + (float)(mp_hash3(10, n, i) % 8) * 0x1p-20f : NAN;
            inf[i] = isnan(s[i]) ? -INFINITY : s[i];
        }
        float *d_s = dev_copy(s, 2 * ns * 4), *d_gate = gpu->alloc(nk * 4);
        int32_t *d_sel = gpu->alloc(3 * nk * 4);   // sel, sel_a, sel_b
        mp_cuda_product_topk(d_s, d_s + ns, NULL, 1, rows, n, k, d_sel, d_sel + nk, d_sel + 2 * nk, d_gate);
        int32_t *sel = host_copy(d_sel, nk * 4);
        long best[8];
        for (int r = 0; r < rows; r++) {
            brute_topk(inf + r * n, inf + ns + r * n, n, k, best);
            for (int j = 0; j < k; j++)
                if (sel[r * k + j] != best[j])
                    fail_msg("top-k with NaN (n %d) row %d position %d: GPU expert %d, want %ld", n,
                             r, j, sel[r * k + j], best[j]);
        }
        gpu->free(d_s); gpu->free(d_gate); gpu->free(d_sel);
        free(s); free(inf); free(sel);
    }
#endif
}

// The query BatchNorm ops on their own (the layer tests below run them inside the model):
// this rank's column sums (plain and centred, in double), normalisation, the backward sums
// with the BN affine's gradients accumulated, and the backward apply in both modes. N spans
// more than one row block of the GPU's column sums.
static void to_floats(float *out, const double *in, size_t n) {
    for (size_t i = 0; i < n; i++) out[i] = (float)in[i];
}

static void test_query_bn_ops(void **state) {
    (void)state;
    int N = 300, HD = 24;
    size_t NH = (size_t)N * HD;
    float *q = frand(NH, -1, 2), *w = frand(HD, 0.5f, 1.5f), *b = frand(HD, -0.5f, 0.5f);
    float *mean = frand(HD, 0.4f, 0.6f), *rstd = frand(HD, 0.8f, 1.2f), *dqn = frand(NH, -1, 1);
    double *mean_d = malloc(HD * sizeof(double)), *sums = malloc(2 * HD * sizeof(double));
    double *gsums = malloc(2 * HD * sizeof(double));
    float *fw = malloc(2 * HD * 4), *fg = malloc(2 * HD * 4);
    for (int j = 0; j < HD; j++) mean_d[j] = mean[j];
    float *d_q = dev_copy(q, NH * 4), *d_w = dev_copy(w, HD * 4), *d_b = dev_copy(b, HD * 4);
    float *d_mean = dev_copy(mean, HD * 4), *d_rstd = dev_copy(rstd, HD * 4);
    double *d_mean_d = dev_copy(mean_d, HD * sizeof(double)), *d_sums = gpu->alloc(2 * HD * sizeof(double));
    // forward: column sums, centred squares, qn
    for (int centred = 0; centred < 2; centred++) {
        cpu->query_bn_stats(sums, q, centred ? mean_d : NULL, N, HD);
        gpu->query_bn_stats(d_sums, d_q, centred ? d_mean_d : NULL, N, HD);
        gpu->to_host(gsums, d_sums, HD * sizeof(double));
        to_floats(fw, sums, HD);
        to_floats(fg, gsums, HD);
        expect_close(centred ? "query_bn_stats centred" : "query_bn_stats", fg, fw, HD, TOL);
    }
    float *qn = malloc(NH * 4), *d_qn = gpu->alloc(NH * 4);
    cpu->query_bn_forward(qn, q, w, b, mean, rstd, N, HD);
    gpu->query_bn_forward(d_qn, d_q, d_w, d_b, d_mean, d_rstd, N, HD);
    expect_dev("query_bn_forward", d_qn, qn, NH);
    // backward: the sums and the affine's gradients (pre-filled: accumulation)
    float *dw = frand(HD, -1, 1), *db = frand(HD, -1, 1);
    float *d_dw = dev_copy(dw, HD * 4), *d_db = dev_copy(db, HD * 4), *d_dqn = dev_copy(dqn, NH * 4);
    cpu->query_bn_backward_stats(sums, dw, db, dqn, q, mean, rstd, N, HD);
    gpu->query_bn_backward_stats(d_sums, d_dw, d_db, d_dqn, d_q, d_mean, d_rstd, N, HD);
    gpu->to_host(gsums, d_sums, 2 * HD * sizeof(double));
    to_floats(fw, sums, 2 * HD);
    to_floats(fg, gsums, 2 * HD);
    expect_close("query_bn_backward_stats: sums", fg, fw, 2 * HD, TOL);
    expect_dev("query_bn_backward_stats: dw", d_dw, dw, HD);
    expect_dev("query_bn_backward_stats: db", d_db, db, HD);
    // apply, training (the sums as if over 2N rows on two ranks) and eval
    for (int train = 0; train < 2; train++) {
        float *dq = malloc(NH * 4);
        memcpy(dq, dqn, NH * 4);
        gpu->from_host(d_dqn, dqn, NH * 4);
        cpu->query_bn_backward(dq, q, w, mean, rstd, sums, 2.0 * N, train, N, HD);
        gpu->query_bn_backward(d_dqn, d_q, d_w, d_mean, d_rstd, d_sums, 2.0 * N, train, N, HD);
        expect_dev(train ? "query_bn_backward train" : "query_bn_backward eval", d_dqn, dq, NH);
        free(dq);
    }
    void *dev[] = {d_q, d_w, d_b, d_mean, d_rstd, d_mean_d, d_sums, d_qn, d_dw, d_db, d_dqn};
    for (size_t i = 0; i < sizeof dev / sizeof dev[0]; i++) gpu->free(dev[i]);
    free(q); free(w); free(b); free(mean); free(rstd); free(dqn); free(mean_d); free(sums);
    free(gsums); free(fw); free(fg); free(qn); free(dw); free(db);
}

// ---------------------------------------------------------------------------------------
// the retrieval layer and the model

static void small_config(mp_config *c, mp_ffn_kind kind, int query_bn, mp_activation act, int C,
                         int n, int H, int k, int dk) {
    mp_config_defaults(c);
    c->vocab_size = 40;
    c->context = 8;
    c->d_model = C;
    c->n_layers = 2;
    c->n_heads = 2;
    c->dense_hidden = 2 * C;
    c->batch_size = 4;
    c->ffn[0] = MP_FFN_DENSE;
    c->ffn[1] = kind;
    mp_retrieval_config *rcs[2] = {&c->peer, &c->pkm};
    for (int i = 0; i < 2; i++) {
        rcs[i]->n_experts = (long)n * n;
        rcs[i]->n_sub = n;
        rcs[i]->heads = H;
        rcs[i]->topk = k;
        rcs[i]->key_dim = dk;
        rcs[i]->query_bn = query_bn;
        rcs[i]->activation = act;
    }
    char err[256];
    if (mp_config_validate(c, err, sizeof err) != 0) fail_msg("config: %s", err);
}

// Sets every gradient (and the given extra tensors) to the same random values on both models.
static void same_random_grads(mp_model *a, mp_model *b) {
    for (int g = 0; g < MP_N_GROUPS; g++) {
        size_t n = mp_model_group_size(a, g);
        float *h = frand(n, -0.01f, 0.01f);
        mp_model_backend(a)->from_host(mp_model_grads(a, g), h, n * sizeof(float));
        mp_model_backend(b)->from_host(mp_model_grads(b, g), h, n * sizeof(float));
        free(h);
    }
}

// Every gradient tensor of the GPU model against the CPU model's.
static void expect_grads(mp_model *mg, mp_model *mc, const char *ctx) {
    for (int i = 0; i < mp_model_n_tensors(mc); i++) {
        const mp_tensor *t = mp_model_tensor(mc, i);
        char what[160];
        snprintf(what, sizeof what, "%s: grad %s", ctx, t->name);
        expect_dev(what, mp_model_grads(mg, t->group) + t->offset,
                   mp_model_grads(mc, t->group) + t->offset, t->numel);
    }
}

// The smallest gap, over the CPU layer's last forward, between the k-th and (k+1)-th best
// of all n*n exact scores of a (token, head), and (ReLU PEER) the smallest |pre-activation|
// u_e . x of a selection, x (N, C) the layer's input (host memory; one process holds every
// expert row).
static double decision_margin(mp_retrieval_layer *l, const float *x, int N) {
    const mp_retrieval_config *rc = l->rc;
    int H = rc->heads, k = rc->topk, dk = rc->key_dim, half = dk / 2, n = rc->n_sub;
    double margin = INFINITY;
    double *sc = malloc((size_t)n * n * sizeof(double)), *s1 = malloc(n * sizeof(double)),
           *s2 = malloc(n * sizeof(double));
    for (int t = 0; t < N; t++)
        for (int h = 0; h < H; h++) {
            // what the scores read: the BN'd queries, or the queries without query BN
            const float *q = (rc->query_bn ? l->qn : l->q) + ((size_t)t * H + h) * dk;
            for (int a = 0; a < n; a++) {
                s1[a] = s2[a] = 0.0;
                for (int c = 0; c < half; c++) {
                    s1[a] += (double)q[c] * l->k1[(size_t)a * half + c];
                    s2[a] += (double)q[half + c] * l->k2[(size_t)a * half + c];
                }
            }
            if (l->key_bias)   // what the top-k ranks: the scores plus this head's biases
                for (int a = 0; a < n; a++) {
                    s1[a] += l->key_bias[(size_t)h * n + a];
                    s2[a] += l->key_bias[((size_t)H + h) * n + a];
                }
            for (int e = 0; e < n * n; e++) sc[e] = s1[e / n] + s2[e % n];
            double kth = -INFINITY, next = -INFINITY;   // k-th and (k+1)-th largest
            for (int j = 0; j <= k; j++) {
                double best = -INFINITY;
                int bi = 0;
                for (int e = 0; e < n * n; e++)
                    if (sc[e] > best) { best = sc[e]; bi = e; }
                sc[bi] = -INFINITY;
                if (j == k - 1) kth = best;
                if (j == k) next = best;
            }
            if (kth - next < margin) margin = kth - next;
        }
    if (l->kind == MP_FFN_PEER && rc->activation == MP_ACT_RELU) {
        if (!x) fail_msg("decision_margin: ReLU experts need the layer input");
        // the pre-activations as the CPU's experts op computes them: every token its own
        // slot, its N*H*k selections as records (local row = expert id - row_start)
        int C = l->C, S = H * k;
        int64_t R = (int64_t)N * S;
        int64_t *start = malloc((size_t)(N + 1) * sizeof(int64_t));
        int32_t *slot = calloc((size_t)R, sizeof(int32_t)), *row = calloc((size_t)R, sizeof(int32_t));
        float *pre = malloc((size_t)R * sizeof(float)), *y = malloc((size_t)N * C * sizeof(float));
        for (int t = 0; t <= N; t++) start[t] = (int64_t)t * S;
        for (int64_t i = 0; i < R; i++) {
            slot[i] = (int32_t)(i / S);
            row[i] = (int32_t)(l->sel[i] - l->row_start);
        }
        mp_expert_tables tb = {.u = l->u, .v = l->v, .du = l->du, .dv = l->dv, .rows = l->rows};
        cpu->experts_forward(&tb, y, x, N, start, slot, row, l->gate, pre, R, C, 1);
        for (int64_t i = 0; i < R; i++)
            if (fabs(pre[i]) < margin) margin = fabs(pre[i]);
        free(start); free(slot); free(row); free(pre); free(y);
    }
    free(sc); free(s1); free(s2);
    return margin;
}

// system.precision = bf16 in check_layer: FP32 (off); BF16_EXACT: the expert tables, x and
// dy hold bf16-representable values (low 16 bits cleared), so what the GPU rounds (the
// tables; x and dy for the gradient sums) equals the CPU's fp32 and only summation order
// differs (TOL); BF16: ordinary values, which the GPU rounds, against the CPU's unrounded
// fp32 (BF16_TOL).
enum { FP32, BF16_EXACT, BF16 };
// Each table element is rounded to nearest with 8 significant bits: relative error at most
// 2^-9 ~ 2e-3, and sums of such errors with random signs stay near 2^-9/sqrt(3) ~ 1e-3 of
// the result's norm per rounded table, ~2e-3 with U and V both rounded (PEER), 4e-3 if every
// error had one sign. Measured (emulator, two input draws): y 2.2e-3 and 2.6e-3, the worst
// gradient 3.1e-3 (dBN_w) and 5.6e-3 (dK1: the gate softmax backward subtracts nearly equal
// terms, which raises the relative error). 1e-2 bounds that; a wrong row, a stale copy or a
// missing term is O(1e-1) and more.
#define BF16_TOL 1e-2

// Clears the low 16 bits of x (n): bf16-representable values.
static void truncate_bf16(float *x, size_t n) {
    for (size_t i = 0; i < n; i++) {
        uint32_t u;
        memcpy(&u, &x[i], 4);
        u &= 0xffff0000u;
        memcpy(&x[i], &u, 4);
    }
}

// The same for m's experts group (U and V).
static void truncate_tables_bf16(mp_model *m) {
    const mp_backend *be = mp_model_backend(m);
    size_t n = mp_model_group_size(m, MP_GROUP_EXPERTS);
    float *h = malloc(n * sizeof(float));
    be->to_host(h, mp_model_params(m, MP_GROUP_EXPERTS), n * sizeof(float));
    truncate_bf16(h, n);
    be->from_host(mp_model_params(m, MP_GROUP_EXPERTS), h, n * sizeof(float));
    free(h);
}

// The same new random bf16-representable expert tables in both models.
static void new_tables_bf16(mp_model *a, mp_model *b) {
    size_t n = mp_model_group_size(a, MP_GROUP_EXPERTS);
    float *h = frand(n, -0.5f, 0.5f);
    truncate_bf16(h, n);
    mp_model_backend(a)->from_host(mp_model_params(a, MP_GROUP_EXPERTS), h, n * sizeof(float));
    mp_model_backend(b)->from_host(mp_model_params(b, MP_GROUP_EXPERTS), h, n * sizeof(float));
    free(h);
}

// The same random sub-key balance biases of block 1 in both models (none without).
static void same_random_biases(mp_model *a, mp_model *b) {
    mp_retrieval_layer *la = mp_model_retrieval_layer(a, 1), *lb = mp_model_retrieval_layer(b, 1);
    if (!la->key_bias) return;
    size_t n = 2 * (size_t)la->rc->heads * la->rc->n_sub;
    float *h = frand(n, -0.5f, 0.5f);   // of the order of the scores (rms ~0.6): they reorder
    mp_model_backend(a)->from_host(la->key_bias, h, n * sizeof(float));
    mp_model_backend(b)->from_host(lb->key_bias, h, n * sizeof(float));
    free(h);
}

// The FFN branch of block 1 (the retrieval layer) on both backends: y, dx and every gradient.
// balance > 0: sub-key balance biases at that rate, starting from random values.
static void check_layer_at(mp_ffn_kind kind, int query_bn, mp_activation act, int train,
                           int precision, float balance) {
    mp_config c;
    small_config(&c, kind, query_bn, act, 48, 16, 2, 4, 8);
    c.peer.balance_rate = c.pkm.balance_rate = balance;
    int N = c.batch_size * c.context, C = c.d_model;
    size_t NC = (size_t)N * C;
    mp_config cg = c;   // the GPU's: the same model, maybe bf16 tables
    if (precision != FP32) {
        snprintf(cg.backend, sizeof cg.backend, "cuda");
        snprintf(cg.precision, sizeof cg.precision, "bf16");
    }
    g_tol = precision == BF16 ? BF16_TOL : TOL;
    g_track = precision == BF16 ? &g_worst_bf16 : &g_worst;
    mp_model *mc = mp_model_create(&c, cpu, c.batch_size);
    mp_model *mg = mp_model_create(&cg, gpu, c.batch_size);
    mp_model_init(mc);
    mp_model_init(mg);
    if (precision == BF16_EXACT) {
        truncate_tables_bf16(mc);
        truncate_tables_bf16(mg);
    }
    same_random_biases(mc, mg);
    mp_retrieval_layer *lc = mp_model_retrieval_layer(mc, 1);
    float *x = NULL, *yc = malloc(NC * 4);
    int rejected = 0;
    for (;; rejected++) {   // inputs without near-ties at the top-k boundary (see the top)
        free(x);
        x = frand(NC, -1.5, 1.5);
        if (precision == BF16_EXACT) truncate_bf16(x, NC);
        mp_model_ffn_forward(mc, 1, yc, x, N, train);
        if (decision_margin(lc, x, N) > 1e-4) break;
        if (rejected == 50) fail_msg("no input without near-ties in 50 tries");
    }
    // running statistics and biases back to their start (the rejected tries moved them)
    mp_model_init(mc);
    if (precision == BF16_EXACT) truncate_tables_bf16(mc);
    same_random_biases(mc, mg);
    same_random_grads(mc, mg);
    mp_model_ffn_forward(mc, 1, yc, x, N, train);
    float *d_x = dev_copy(x, NC * 4), *d_y = gpu->alloc(NC * 4);
    mp_model_ffn_forward(mg, 1, d_y, d_x, N, train);
    char ctx[96];
    snprintf(ctx, sizeof ctx, "%s bn %d %s %s%s%s", kind == MP_FFN_PEER ? "peer" : "pkm", query_bn,
             act == MP_ACT_RELU ? "relu" : "gelu", train ? "train" : "eval",
             precision == BF16 ? " bf16" : precision == BF16_EXACT ? " bf16 (exact tables)" : "",
             balance > 0 ? " balanced" : "");
    char what[160];
    snprintf(what, sizeof what, "%s: y", ctx);
    expect_dev(what, d_y, yc, NC);
    // the selections, gates and running statistics the forward left
    mp_retrieval_layer *lg = mp_model_retrieval_layer(mg, 1);
    size_t NS = (size_t)N * c.peer.heads * c.peer.topk;
    int32_t *sel = host_copy(lg->sel, NS * 4);
    assert_memory_equal(sel, lc->sel, NS * 4);
    snprintf(what, sizeof what, "%s: gates", ctx);
    expect_dev(what, lg->gate, lc->gate, NS);
    if (query_bn || balance > 0) {   // the biases moved by integer counts: equal
        snprintf(what, sizeof what, "%s: router state", ctx);
        expect_dev(what, mp_model_router_state(mg), mp_model_router_state(mc), mp_model_router_state_size(mc));
    }
    // backward: dx starts random (accumulation)
    float *dy = frand(NC, -1, 1), *dx = frand(NC, -1, 1);
    if (precision == BF16_EXACT) truncate_bf16(dy, NC);
    float *d_dy = dev_copy(dy, NC * 4), *d_dx = dev_copy(dx, NC * 4);
    mp_model_ffn_backward(mc, 1, dx, dy, x, N);
    mp_model_ffn_backward(mg, 1, d_dx, d_dy, d_x, N);
    snprintf(what, sizeof what, "%s: dx", ctx);
    expect_dev(what, d_dx, dx, NC);
    expect_grads(mg, mc, ctx);
    if (precision == BF16_EXACT) {
        // new masters (what an optimizer step does): the next forward must read their copies
        new_tables_bf16(mc, mg);
        mp_model_ffn_forward(mc, 1, yc, x, N, 0);
        mp_model_ffn_forward(mg, 1, d_y, d_x, N, 0);
        snprintf(what, sizeof what, "%s: y after new tables", ctx);
        expect_dev(what, d_y, yc, NC);
    }
    printf("layer %s: ok (%d inputs rejected for near-ties)\n", ctx, rejected);
    gpu->free(d_x); gpu->free(d_y); gpu->free(d_dy); gpu->free(d_dx);
    free(x); free(yc); free(dy); free(dx); free(sel);
    mp_model_free(mc);
    mp_model_free(mg);
    g_tol = TOL;
    g_track = &g_worst;
}

static void check_layer(mp_ffn_kind kind, int query_bn, mp_activation act, int train) {
    check_layer_at(kind, query_bn, act, train, FP32, 0.0f);
}

static void test_layer_peer(void **s) { (void)s; check_layer(MP_FFN_PEER, 1, MP_ACT_GELU, 1); }
static void test_layer_peer_eval(void **s) { (void)s; check_layer(MP_FFN_PEER, 1, MP_ACT_GELU, 0); }
static void test_layer_peer_relu_nobn(void **s) { (void)s; check_layer(MP_FFN_PEER, 0, MP_ACT_RELU, 1); }
static void test_layer_pkm(void **s) { (void)s; check_layer(MP_FFN_PKM, 1, MP_ACT_GELU, 1); }
static void test_layer_balanced(void **s) {
    (void)s;
    check_layer_at(MP_FFN_PEER, 1, MP_ACT_GELU, 1, FP32, 0.05f);
    check_layer_at(MP_FFN_PEER, 1, MP_ACT_GELU, 0, FP32, 0.05f);
    check_layer_at(MP_FFN_PKM, 0, MP_ACT_GELU, 1, FP32, 0.05f);
}
static void test_layer_peer_bf16_exact(void **s) {
    (void)s;
    check_layer_at(MP_FFN_PEER, 1, MP_ACT_GELU, 1, BF16_EXACT, 0.0f);
    check_layer_at(MP_FFN_PEER, 0, MP_ACT_RELU, 1, BF16_EXACT, 0.0f);
}
static void test_layer_pkm_bf16_exact(void **s) {
    (void)s;
    check_layer_at(MP_FFN_PKM, 1, MP_ACT_GELU, 1, BF16_EXACT, 0.0f);
}
static void test_layer_peer_bf16(void **s) {
    (void)s;
    check_layer_at(MP_FFN_PEER, 1, MP_ACT_GELU, 1, BF16, 0.0f);
    check_layer_at(MP_FFN_PKM, 1, MP_ACT_GELU, 1, BF16, 0.0f);
}

// to_bf16: round to nearest, ties to even, on values whose answers follow from the definition
// (bf16 = the top 16 bits of a float; the low 16 bits decide the rounding)
static void test_to_bf16(void **state) {
    (void)state;
    static const uint32_t cases[][2] = {
        {0x3f800000u, 0x3f80},   // 1.0 exact
        {0x3f808000u, 0x3f80},   // 1 + 2^-8: a tie, 0x3f80 is even
        {0x3f818000u, 0x3f82},   // 1 + 3*2^-8: a tie, 0x3f81 is odd: up
        {0x3f808001u, 0x3f81},   // just above the tie: up
        {0x3f807fffu, 0x3f80},   // just below: down
        {0xc0200000u, 0xc020},   // -2.5 exact
        {0xbf80c000u, 0xbf81},   // negative, above the tie: away from zero
        {0x7f800000u, 0x7f80},   // +inf
        {0xff800000u, 0xff80},   // -inf
        {0x7f7fffffu, 0x7f80},   // the largest float rounds up to inf
        {0x7fc00000u, 0x7fc0},   // quiet NaN
        {0x7f800001u, 0x7fc0},   // signalling NaN: stays NaN, quiet
        {0x00000001u, 0x0000},   // the smallest subnormal rounds to +0
        {0x00018000u, 0x0002},   // subnormal tie, odd: up
        {0x80000000u, 0x8000},   // -0
    };
    size_t n = sizeof cases / sizeof cases[0];
    float *src = malloc(n * sizeof(float));
    for (size_t i = 0; i < n; i++) memcpy(&src[i], &cases[i][0], 4);
    float *d_src = dev_copy(src, n * sizeof(float));
    uint16_t *d_dst = gpu->alloc(n * sizeof(uint16_t));
    gpu->to_bf16(d_dst, d_src, n);
    uint16_t *dst = host_copy(d_dst, n * sizeof(uint16_t));
    for (size_t i = 0; i < n; i++)
        if (dst[i] != cases[i][1])
            fail_msg("to_bf16(0x%08x) = 0x%04x, want 0x%04x", (unsigned)cases[i][0],
                     (unsigned)dst[i], (unsigned)cases[i][1]);
    gpu->free(d_src); gpu->free(d_dst);
    free(src); free(dst);
}

// A whole model (dense block, PEER block): loss, every gradient, the gradient norm.
static void test_model(void **state) {
    (void)state;
    mp_config c;
    small_config(&c, MP_FFN_PEER, 1, MP_ACT_GELU, 32, 16, 2, 4, 8);
    int B = c.batch_size, T = c.context, N = B * T;
    mp_model *mc = mp_model_create(&c, cpu, B), *mg = mp_model_create(&c, gpu, B);
    mp_model_init(mc);
    mp_model_init(mg);
    int32_t in[64], tg[64];
    int rejected = 0;
    float lc;
    for (;; rejected++) {
        for (int i = 0; i < N; i++) {
            in[i] = (int32_t)(mp_hash3(5 + rejected, 1, i) % c.vocab_size);
            tg[i] = (int32_t)(mp_hash3(5 + rejected, 2, i) % c.vocab_size);
        }
        lc = mp_model_forward(mc, in, tg, B, T, 1);
        // GELU experts: no pre-activations to check, so no layer input needed
        if (decision_margin(mp_model_retrieval_layer(mc, 1), NULL, N) > 1e-4) break;
        if (rejected == 50) fail_msg("no input without near-ties in 50 tries");
    }
    mp_model_init(mc);
    mp_model_zero_grad(mc);
    mp_model_zero_grad(mg);
    lc = mp_model_forward(mc, in, tg, B, T, 1);
    float lg = mp_model_forward(mg, in, tg, B, T, 1);
    expect_close("model loss", &lg, &lc, 1, TOL);
    mp_model_backward(mc, 1.0f);
    mp_model_backward(mg, 1.0f);
    expect_grads(mg, mc, "model");
    mp_adamw oc, og;
    mp_adamw_init(&oc, mc);
    mp_adamw_init(&og, mg);
    // the step's gradient norm (device sum_squares over every group). The parameters after
    // the step are not compared: AdamW's first step moves each parameter by about lr *
    // sign(g), and gradients that are zero up to rounding (the attention key bias) have
    // backend-dependent signs; the adamw op itself is compared in test_optim.
    float nc = mp_adamw_step(&oc, mc, 0), ng = mp_adamw_step(&og, mg, 0);
    expect_close("model grad norm", &ng, &nc, 1, TOL);
    printf("model: loss %.6f (CPU %.6f), %d inputs rejected for near-ties\n", lg, lc, rejected);
    mp_adamw_free(&oc, mc);
    mp_adamw_free(&og, mg);
    mp_model_free(mc);
    mp_model_free(mg);
}

// ---------------------------------------------------------------------------------------
// determinism: the same work twice on the GPU gives the same bits

static void *snapshot_grads(mp_model *m, size_t *bytes) {
    size_t total = 0;
    for (int g = 0; g < MP_N_GROUPS; g++) total += mp_model_group_size(m, g) * sizeof(float);
    char *h = malloc(total ? total : 1), *p = h;
    for (int g = 0; g < MP_N_GROUPS; g++) {
        size_t b = mp_model_group_size(m, g) * sizeof(float);
        gpu->to_host(p, mp_model_grads(m, g), b);
        p += b;
    }
    *bytes = total;
    return h;
}

static void check_determinism(int bf16) {
    // larger: many records per expert row and per sub-key, several sort passes
    mp_config c;
    small_config(&c, MP_FFN_PEER, 1, MP_ACT_GELU, 64, 32, 4, 8, 16);
    c.batch_size = 8;
    c.context = 32;
    if (bf16) {
        snprintf(c.backend, sizeof c.backend, "cuda");
        snprintf(c.precision, sizeof c.precision, "bf16");
    }
    int B = c.batch_size, T = c.context, N = B * T;
    int32_t *in = malloc(N * 4), *tg = malloc(N * 4);
    for (int i = 0; i < N; i++) {
        in[i] = (int32_t)(mp_hash3(8, 1, i) % c.vocab_size);
        tg[i] = (int32_t)(mp_hash3(8, 2, i) % c.vocab_size);
    }
    void *first = NULL;
    size_t bytes = 0;
    float loss0 = 0.0f;
    for (int run = 0; run < 2; run++) {
        mp_model *m = mp_model_create(&c, gpu, B);
        mp_model_init(m);
        mp_model_zero_grad(m);
        float loss = mp_model_forward(m, in, tg, B, T, 1);
        mp_model_backward(m, 1.0f);
        size_t b;
        void *g = snapshot_grads(m, &b);
        if (run == 0) {
            first = g;
            bytes = b;
            loss0 = loss;
        } else {
            assert_true(b == bytes);
            assert_memory_equal(&loss, &loss0, sizeof loss);
            if (memcmp(g, first, bytes) != 0) fail_msg("gradients differ between two identical runs");
            free(g);
        }
        mp_model_free(m);
    }
    free(first);
    free(in);
    free(tg);
}

static void test_determinism(void **state) {
    (void)state;
    check_determinism(0);
    check_determinism(1);
}

// every test starts at the fp32 tolerance, also after one that failed inside check_layer_at
static int reset_tolerance(void **state) {
    (void)state;
    g_tol = TOL;
    g_track = &g_worst;
    return 0;
}

int main(void) {
    char err[512];
    gpu = mp_backend_cuda(err, sizeof err);
    if (!gpu) {
        printf("SKIPPED: %s\n", err);
        return 77;   // ctest: SKIP_RETURN_CODE
    }
    cpu = mp_backend_cpu();
#ifdef MP_HAVE_CUDA
    printf("GPU: %s\n", mp_cuda_device_name());
#endif
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup(test_memory, reset_tolerance),
        cmocka_unit_test_setup(test_encoder, reset_tolerance),
        cmocka_unit_test_setup(test_layernorm, reset_tolerance),
        cmocka_unit_test_setup(test_matmul, reset_tolerance),
        cmocka_unit_test_setup(test_attention, reset_tolerance),
        cmocka_unit_test_setup(test_elementwise, reset_tolerance),
        cmocka_unit_test_setup(test_crossentropy, reset_tolerance),
        cmocka_unit_test_setup(test_optim, reset_tolerance),
        cmocka_unit_test_setup(test_optim_rows, reset_tolerance),
        cmocka_unit_test_setup(test_topk, reset_tolerance),
        cmocka_unit_test_setup(test_query_bn_ops, reset_tolerance),
        cmocka_unit_test_setup(test_layer_peer, reset_tolerance),
        cmocka_unit_test_setup(test_layer_peer_eval, reset_tolerance),
        cmocka_unit_test_setup(test_layer_peer_relu_nobn, reset_tolerance),
        cmocka_unit_test_setup(test_layer_pkm, reset_tolerance),
        cmocka_unit_test_setup(test_layer_balanced, reset_tolerance),
        cmocka_unit_test_setup(test_to_bf16, reset_tolerance),
        cmocka_unit_test_setup(test_layer_peer_bf16_exact, reset_tolerance),
        cmocka_unit_test_setup(test_layer_pkm_bf16_exact, reset_tolerance),
        cmocka_unit_test_setup(test_layer_peer_bf16, reset_tolerance),
        cmocka_unit_test_setup(test_model, reset_tolerance),
        cmocka_unit_test_setup(test_determinism, reset_tolerance),
    };
    int rc = cmocka_run_group_tests(tests, NULL, NULL);
    printf("largest relative error against the CPU: %.3g (fp32, and bf16 copies of "
           "bf16-representable tables)\n", g_worst);
    printf("largest relative error of bf16 tables against the CPU's fp32: %.3g\n", g_worst_bf16);
    return rc;
}
