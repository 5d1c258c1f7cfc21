// Unit tests of the CPU backend's dense ops (src/backend/cpu/ops_*.c).
//
// Gradients: every backward op is compared with central finite differences of a scalar
// objective L = sum(out * R) (R random), evaluated with the float forward op and summed in
// double. Tolerance FD_TOL = 1e-3 on ||grad - fd|| / ||fd||. With h = 1e-2 and O(1) inputs
// the truncation error is h^2 |f'''| / 6 ~ 2e-5 relative; the float rounding of the outputs
// (u = 2^-24 ~ 6e-8 relative each, ~sqrt(n) u |out| ~ 1e-6 absolute in L over n <= 1000
// outputs, whatever order OpenBLAS's kernel sums in) divided by the 2h step adds ~5e-5
// absolute per component against O(0.1..1) gradients. The errors seen (printed) are
// 2e-7..4e-5 on every OpenBLAS kernel family; a wrong formula (a missing term, a sign, a
// factor, overwriting instead of accumulating) gives O(0.01..1).
// Gradient buffers that backward ACCUMULATES into (+=: parameter gradients, and the input
// gradients of layernorm, encoder and matmul told to add) are pre-filled with random values
// before backward and those values are subtracted afterwards; the ones it WRITES (dlogits,
// the input gradients of gelu, attention and matmul's default) are pre-filled with NaN, so
// that adding to them, or leaving an element unwritten, shows.
//
// Forward values: compared with naive double-precision implementations written here, on the
// same float inputs, FWD_TOL = 1e-5 on ||got - ref|| / ||ref||. The float side rounds each
// product and each partial sum: a K-term dot product of random-sign terms errs by
// ~u sqrt(K / 6) of its value when summed in sequence (~3e-7 at K = 129, the largest here),
// less in blocks or with FMA, and the norm over thousands of outputs concentrates on that;
// exp, erf, sqrt and AdamW's few operations per step add a few u. Measured 3e-8..3e-7 on
// every OpenBLAS kernel family. One term missing from one of 8000 outputs (a dropped tail,
// an off-by-one) is ~1e-3.
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
#include "backend/cpu/cpu.h"
#include "core/rng.h"
#include "millipede/backend.h"

#define FD_TOL 1e-3    // see the top
#define FWD_TOL 1e-5   // float vs double forward, relative on the norm (see the top)

static const mp_backend *be;
static uint64_t g_stream = 1;

// ---------------------------------------------------------------------------------------
// helpers

static float *fbuf(size_t n) { return calloc(n ? n : 1, sizeof(float)); }
static double *dbuf(size_t n) { return calloc(n ? n : 1, sizeof(double)); }
static void fill_nan(float *x, size_t n) {   // a gradient that backward must write
    for (size_t i = 0; i < n; i++) x[i] = NAN;
}

// uniform in [lo, hi), a fresh stream per call
static void fill(float *x, size_t n, float lo, float hi) {
    uint64_t s = g_stream++;
    for (size_t i = 0; i < n; i++) x[i] = lo + (hi - lo) * mp_uniform(1234, s, i);
}

static double dot_r(const float *out, const float *R, size_t n) {
    double L = 0.0;
    for (size_t i = 0; i < n; i++) L += (double)out[i] * R[i];
    return L;
}

// ||a - b|| / ||b||
static double rel_err(const float *a, const double *b, size_t n) {
    double num = 0.0, den = 0.0;
    for (size_t i = 0; i < n; i++) {
        num += (a[i] - b[i]) * (a[i] - b[i]);
        den += b[i] * b[i];
    }
    return den > 0.0 ? sqrt(num / den) : sqrt(num);
}

static void check(const char *what, double err, double tol) {
    print_message("  %-34s rel err %.3e (tol %.0e)\n", what, err, tol);
    if (!(err <= tol)) fail_msg("%s: relative error %.3e above %.0e", what, err, tol);
}

// grad -= g0: what backward added on top of the random pre-fill
static void sub_prefill(float *grad, const float *g0, size_t n) {
    for (size_t i = 0; i < n; i++) grad[i] -= g0[i];
}

typedef double (*objective_fn)(void *ctx);

// Central differences of obj with respect to every element of x, compared with grad.
static double fd_rel_error(objective_fn obj, void *ctx, float *x, size_t n, const float *grad,
                           float h) {
    // Thousands of tiny forward calls: on one thread, because waking a team per call costs
    // milliseconds each when the machine is busy. Backward ran with the normal team.
    int threads = omp_get_max_threads();
    omp_set_num_threads(1);
    double num = 0.0, den = 0.0;
    for (size_t i = 0; i < n; i++) {
        float x0 = x[i];
        x[i] = x0 + h;
        double lp = obj(ctx);
        x[i] = x0 - h;
        double lm = obj(ctx);
        x[i] = x0;
        double step = (double)(x0 + h) - (double)(x0 - h);   // the step float really took
        double fd = (lp - lm) / step;
        num += (grad[i] - fd) * (grad[i] - fd);
        den += fd * fd;
    }
    omp_set_num_threads(threads);
    assert_true(den > 0.0);
    return sqrt(num / den);
}

// ---------------------------------------------------------------------------------------
// backend table and memory

static void test_table(void **state) {
    (void)state;
    assert_non_null(be);
    assert_string_equal(be->name, "cpu");
    void *fns[] = {
        (void *)be->alloc, (void *)be->free, (void *)be->zero, (void *)be->to_host,
        (void *)be->from_host, (void *)be->encoder_forward, (void *)be->encoder_backward,
        (void *)be->layernorm_forward, (void *)be->layernorm_backward,
        (void *)be->residual_layernorm_forward,
        (void *)be->matmul_forward, (void *)be->matmul_backward, (void *)be->attention_forward,
        (void *)be->attention_state_floats, (void *)be->attention_backward,
        (void *)be->gelu_forward, (void *)be->gelu_backward,
        (void *)be->residual_forward, (void *)be->crossentropy_forward,
        (void *)be->crossentropy_backward, (void *)be->retrieval_route,
        (void *)be->retrieval_route_backward, (void *)be->experts_forward,
        (void *)be->experts_backward, (void *)be->adamw, (void *)be->sum_squares,
        (void *)be->sum_f64, (void *)be->adamw_rows};
    for (size_t i = 0; i < sizeof fns / sizeof fns[0]; i++) assert_non_null(fns[i]);
#ifndef MP_HAVE_CUDA
    char err[256] = "";
    assert_null(mp_backend_cuda(err, sizeof err));
    assert_non_null(strstr(err, "no CUDA backend"));
#endif
}

static void test_memory(void **state) {
    (void)state;
    size_t sizes[] = {0, 1, 63, 64, 1000, 1 << 20};
    for (size_t s = 0; s < sizeof sizes / sizeof sizes[0]; s++) {
        unsigned char *p = be->alloc(sizes[s]);
        assert_non_null(p);
        assert_int_equal((uintptr_t)p % 64, 0);
        for (size_t i = 0; i < sizes[s]; i++) assert_int_equal(p[i], 0);
        be->free(p);
    }
    size_t n = 1001;
    float *host = fbuf(n), *back = fbuf(n), *dev = be->alloc(n * sizeof(float));
    fill(host, n, -1, 1);
    be->from_host(dev, host, n * sizeof(float));
    be->to_host(back, dev, n * sizeof(float));
    assert_memory_equal(host, back, n * sizeof(float));
    be->zero(dev, n * sizeof(float));
    for (size_t i = 0; i < n; i++) assert_true(dev[i] == 0.0f);
    be->free(dev);
    free(host);
    free(back);
}

// ---------------------------------------------------------------------------------------
// encoder

typedef struct {
    float *out, *wte, *wpe, *R;
    int32_t *inp;
    int B, T, C;
} enc_ctx;

static double enc_obj(void *p) {
    enc_ctx *c = p;
    be->encoder_forward(c->out, c->inp, c->wte, c->wpe, c->B, c->T, c->C);
    return dot_r(c->out, c->R, (size_t)c->B * c->T * c->C);
}

static void test_encoder(void **state) {
    (void)state;
    int B = 2, T = 3, C = 21, V = 4;
    int32_t inp[] = {1, 3, 1, 0, 1, 3};   // repeated tokens: dwte rows sum several positions
    size_t no = (size_t)B * T * C;
    enc_ctx c = {fbuf(no), fbuf((size_t)V * C), fbuf((size_t)T * C), fbuf(no), inp, B, T, C};
    fill(c.wte, (size_t)V * C, -1, 1);
    fill(c.wpe, (size_t)T * C, -1, 1);
    fill(c.R, no, -1, 1);

    enc_obj(&c);
    double *ref = dbuf(no);
    for (int b = 0; b < B; b++)
        for (int t = 0; t < T; t++)
            for (int i = 0; i < C; i++)
                ref[((size_t)b * T + t) * C + i] =
                    (double)c.wte[inp[b * T + t] * C + i] + c.wpe[t * C + i];
    check("encoder forward", rel_err(c.out, ref, no), FWD_TOL);

    float *dwte = fbuf((size_t)V * C), *dwpe = fbuf((size_t)T * C);
    float *g0te = fbuf((size_t)V * C), *g0pe = fbuf((size_t)T * C);
    fill(g0te, (size_t)V * C, -1, 1);
    fill(g0pe, (size_t)T * C, -1, 1);
    memcpy(dwte, g0te, (size_t)V * C * sizeof(float));
    memcpy(dwpe, g0pe, (size_t)T * C * sizeof(float));
    be->encoder_backward(dwte, dwpe, c.R, inp, B, T, C, V);
    sub_prefill(dwte, g0te, (size_t)V * C);
    sub_prefill(dwpe, g0pe, (size_t)T * C);
    check("encoder dwte vs FD", fd_rel_error(enc_obj, &c, c.wte, (size_t)V * C, dwte, 1e-2f),
          FD_TOL);
    check("encoder dwpe vs FD", fd_rel_error(enc_obj, &c, c.wpe, (size_t)T * C, dwpe, 1e-2f),
          FD_TOL);
    // token 2 never occurs: its gradient row stays exactly untouched
    for (int i = 0; i < C; i++) assert_true(dwte[2 * C + i] == 0.0f);

    free(c.out); free(c.wte); free(c.wpe); free(c.R); free(ref);
    free(dwte); free(dwpe); free(g0te); free(g0pe);
}

// ---------------------------------------------------------------------------------------
// layernorm

typedef struct {
    float *out, *mean, *rstd, *inp, *w, *b, *R;
    int N, C;
} ln_ctx;

static double ln_obj(void *p) {
    ln_ctx *c = p;
    be->layernorm_forward(c->out, NULL, c->mean, c->rstd, c->inp, c->w, c->b, c->N, c->C);
    return dot_r(c->out, c->R, (size_t)c->N * c->C);
}

static void test_layernorm(void **state) {
    (void)state;
    // N = 37 spans two row blocks of the dw/db partial sums; C = 19 hits the 8-lane
    // sums and their tail
    int N = 37, C = 19;
    size_t n = (size_t)N * C;
    ln_ctx c = {fbuf(n), fbuf(N), fbuf(N), fbuf(n), fbuf(C), fbuf(C), fbuf(n), N, C};
    fill(c.inp, n, -2, 3);
    for (int i = 0; i < N; i++) c.inp[(size_t)i * C] += 3.0f;   // some rows far from zero-mean
    fill(c.w, C, 0.5f, 1.5f);
    fill(c.b, C, -0.5f, 0.5f);
    fill(c.R, n, -1, 1);

    ln_obj(&c);
    double *ref = dbuf(n), *rmean = dbuf(N), *rrstd = dbuf(N);
    for (int r = 0; r < N; r++) {
        const float *x = c.inp + (size_t)r * C;
        double m = 0, v = 0;
        for (int i = 0; i < C; i++) m += x[i];
        m /= C;
        for (int i = 0; i < C; i++) v += (x[i] - m) * (x[i] - m);
        v /= C;
        double s = 1.0 / sqrt(v + 1e-5);
        for (int i = 0; i < C; i++) ref[(size_t)r * C + i] = (x[i] - m) * s * c.w[i] + c.b[i];
        rmean[r] = m;
        rrstd[r] = s;
    }
    check("layernorm forward out", rel_err(c.out, ref, n), FWD_TOL);
    check("layernorm forward mean", rel_err(c.mean, rmean, N), FWD_TOL);
    check("layernorm forward rstd", rel_err(c.rstd, rrstd, N), FWD_TOL);

    float *dinp = fbuf(n), *dw = fbuf(C), *db = fbuf(C);
    float *g0i = fbuf(n), *g0w = fbuf(C), *g0b = fbuf(C);
    fill(g0i, n, -1, 1);
    fill(g0w, C, -1, 1);
    fill(g0b, C, -1, 1);
    memcpy(dinp, g0i, n * sizeof(float));
    memcpy(dw, g0w, C * sizeof(float));
    memcpy(db, g0b, C * sizeof(float));
    be->layernorm_backward(dinp, NULL, dw, db, c.R, c.inp, c.w, c.mean, c.rstd, N, C);
    sub_prefill(dinp, g0i, n);
    sub_prefill(dw, g0w, C);
    sub_prefill(db, g0b, C);
    check("layernorm dinp vs FD", fd_rel_error(ln_obj, &c, c.inp, n, dinp, 1e-2f), FD_TOL);
    check("layernorm dw vs FD", fd_rel_error(ln_obj, &c, c.w, C, dw, 1e-2f), FD_TOL);
    check("layernorm db vs FD", fd_rel_error(ln_obj, &c, c.b, C, db, 1e-2f), FD_TOL);

    free(c.out); free(c.mean); free(c.rstd); free(c.inp); free(c.w); free(c.b); free(c.R);
    free(ref); free(rmean); free(rrstd);
    free(dinp); free(dw); free(db); free(g0i); free(g0w); free(g0b);
}

// ---------------------------------------------------------------------------------------
// matmul

typedef struct {
    float *out, *inp, *w, *bias, *R;
    int N, C, OC;
} mm_ctx;

static double mm_obj(void *p) {
    mm_ctx *c = p;
    be->matmul_forward(c->out, c->inp, NULL, c->w, NULL, c->bias, c->N, c->C, c->OC);
    return dot_r(c->out, c->R, (size_t)c->N * c->OC);
}

static void naive_matmul(double *out, const float *inp, const float *w, const float *bias, int N,
                         int C, int OC) {
    for (int n = 0; n < N; n++)
        for (int o = 0; o < OC; o++) {
            double s = bias ? bias[o] : 0.0;
            for (int i = 0; i < C; i++) s += (double)inp[(size_t)n * C + i] * w[(size_t)o * C + i];
            out[(size_t)n * OC + o] = s;
        }
}

static void test_matmul_fd(void **state) {
    (void)state;
    int N = 5, C = 11, OC = 7;
    mm_ctx c = {fbuf((size_t)N * OC), fbuf((size_t)N * C), fbuf((size_t)OC * C), fbuf(OC),
                fbuf((size_t)N * OC), N, C, OC};
    fill(c.inp, (size_t)N * C, -1, 1);
    fill(c.w, (size_t)OC * C, -1, 1);
    fill(c.bias, OC, -1, 1);
    fill(c.R, (size_t)N * OC, -1, 1);
    mm_obj(&c);

    size_t ni = (size_t)N * C, nw = (size_t)OC * C;
    float *dinp = fbuf(ni), *dw = fbuf(nw), *db = fbuf(OC);
    float *g0i = fbuf(ni), *g0w = fbuf(nw), *g0b = fbuf(OC);
    fill(g0i, ni, -1, 1);
    fill(g0w, nw, -1, 1);
    fill(g0b, OC, -1, 1);
    memcpy(dinp, g0i, ni * sizeof(float));
    memcpy(dw, g0w, nw * sizeof(float));
    memcpy(db, g0b, OC * sizeof(float));
    be->matmul_backward(dinp, dw, db, c.R, NULL, c.inp, NULL, c.w, NULL, N, C, OC, 1);
    sub_prefill(dinp, g0i, ni);
    sub_prefill(dw, g0w, nw);
    sub_prefill(db, g0b, OC);
    check("matmul dinp (added) vs FD", fd_rel_error(mm_obj, &c, c.inp, ni, dinp, 1e-2f), FD_TOL);
    check("matmul dw vs FD", fd_rel_error(mm_obj, &c, c.w, nw, dw, 1e-2f), FD_TOL);
    check("matmul dbias vs FD", fd_rel_error(mm_obj, &c, c.bias, OC, db, 1e-2f), FD_TOL);
    fill_nan(dinp, ni);
    be->matmul_backward(dinp, NULL, NULL, c.R, NULL, c.inp, NULL, c.w, NULL, N, C, OC, 0);
    check("matmul dinp (written) vs FD", fd_rel_error(mm_obj, &c, c.inp, ni, dinp, 1e-2f), FD_TOL);

    free(c.out); free(c.inp); free(c.w); free(c.bias); free(c.R);
    free(dinp); free(dw); free(db); free(g0i); free(g0w); free(g0b);
}

// Shapes large and odd enough for OpenBLAS's blocked kernels, for the threaded split of
// mp_cpu_sgemm (above its size threshold) and for the column split of dbias. The two shapes
// make each of the three products split by rows once and by columns once.
static void matmul_naive_case(int N, int C, int OC) {
    size_t no = (size_t)N * OC, ni = (size_t)N * C, nw = (size_t)OC * C;
    float *out = fbuf(no), *inp = fbuf(ni), *w = fbuf(nw), *bias = fbuf(OC), *dout = fbuf(no);
    fill(inp, ni, -1, 1);
    fill(w, nw, -1, 1);
    fill(bias, OC, -1, 1);
    fill(dout, no, -1, 1);
    fill(out, no, 5, 6);   // stale values: forward overwrites
    double *ref = dbuf(no);
    char what[64];
    print_message("  N=%d C=%d OC=%d\n", N, C, OC);

    be->matmul_forward(out, inp, NULL, w, NULL, bias, N, C, OC);
    naive_matmul(ref, inp, w, bias, N, C, OC);
    check("matmul forward (bias)", rel_err(out, ref, no), FWD_TOL);
    be->matmul_forward(out, inp, NULL, w, NULL, NULL, N, C, OC);
    naive_matmul(ref, inp, w, NULL, N, C, OC);
    check("matmul forward (no bias)", rel_err(out, ref, no), FWD_TOL);

    float *dinp = fbuf(ni), *dw = fbuf(nw), *db = fbuf(OC);
    fill_nan(dinp, ni);
    be->matmul_backward(dinp, dw, db, dout, NULL, inp, NULL, w, NULL, N, C, OC, 0);
    double *rdi = dbuf(ni), *rdw = dbuf(nw), *rdb = dbuf(OC);
    for (int n = 0; n < N; n++)
        for (int o = 0; o < OC; o++) {
            double d = dout[(size_t)n * OC + o];
            for (int i = 0; i < C; i++) {
                rdi[(size_t)n * C + i] += d * w[(size_t)o * C + i];
                rdw[(size_t)o * C + i] += d * inp[(size_t)n * C + i];
            }
            rdb[o] += d;
        }
    check("matmul dinp vs naive", rel_err(dinp, rdi, ni), FWD_TOL);
    check("matmul dw vs naive", rel_err(dw, rdw, nw), FWD_TOL);
    check("matmul dbias vs naive", rel_err(db, rdb, OC), FWD_TOL);
    // NULL gradients are skipped, the others still accumulate
    be->matmul_backward(NULL, dw, NULL, dout, NULL, inp, NULL, w, NULL, N, C, OC, 0);
    for (size_t i = 0; i < nw; i++) rdw[i] *= 2.0;
    snprintf(what, sizeof what, "matmul dw accumulates");
    check(what, rel_err(dw, rdw, nw), FWD_TOL);
    // the same inputs give the same bits
    float *out2 = fbuf(no), *dinp2 = fbuf(ni), *dw2 = fbuf(nw);
    be->matmul_forward(out, inp, NULL, w, NULL, bias, N, C, OC);
    be->matmul_forward(out2, inp, NULL, w, NULL, bias, N, C, OC);
    assert_memory_equal(out, out2, no * sizeof(float));
    memset(dinp, 0, ni * sizeof(float));
    memset(dw, 0, nw * sizeof(float));
    be->matmul_backward(dinp, dw, NULL, dout, NULL, inp, NULL, w, NULL, N, C, OC, 0);
    be->matmul_backward(dinp2, dw2, NULL, dout, NULL, inp, NULL, w, NULL, N, C, OC, 0);
    assert_memory_equal(dinp, dinp2, ni * sizeof(float));
    assert_memory_equal(dw, dw2, nw * sizeof(float));

    free(out); free(inp); free(w); free(bias); free(dout); free(ref);
    free(dinp); free(dw); free(db); free(rdi); free(rdw); free(rdb);
    free(out2); free(dinp2); free(dw2);
}

static void test_matmul_naive(void **state) {
    (void)state;
    matmul_naive_case(67, 129, 65);
    matmul_naive_case(33, 64, 200);
}

// ---------------------------------------------------------------------------------------
// attention

typedef struct {
    float *out, *att, *qkv, *R;
    int B, T, C, NH;
} at_ctx;

static double at_obj(void *p) {
    at_ctx *c = p;
    be->attention_forward(c->out, NULL, c->att, c->qkv, c->B, c->T, c->C, c->NH);
    return dot_r(c->out, c->R, (size_t)c->B * c->T * c->C);
}

static void naive_attention(double *out, double *att, const float *qkv, int B, int T, int C,
                            int NH) {
    int hs = C / NH;
    double *s = dbuf(T);
    for (int b = 0; b < B; b++)
        for (int h = 0; h < NH; h++)
            for (int t = 0; t < T; t++) {
                const float *q = qkv + ((size_t)b * T + t) * 3 * C + h * hs;
                double mx = -INFINITY, sum = 0;
                for (int u = 0; u <= t; u++) {
                    const float *k = qkv + ((size_t)b * T + u) * 3 * C + C + h * hs;
                    double d = 0;
                    for (int i = 0; i < hs; i++) d += (double)q[i] * k[i];
                    s[u] = d / sqrt((double)hs);
                    if (s[u] > mx) mx = s[u];
                }
                for (int u = 0; u <= t; u++) sum += exp(s[u] - mx);
                double *a = att + (((size_t)b * NH + h) * T + t) * T;
                for (int u = 0; u < T; u++) a[u] = u <= t ? exp(s[u] - mx) / sum : 0.0;
                double *o = out + ((size_t)b * T + t) * C + h * hs;
                for (int i = 0; i < hs; i++) {
                    double acc = 0;
                    for (int u = 0; u <= t; u++)
                        acc += a[u] * qkv[((size_t)b * T + u) * 3 * C + 2 * C + h * hs + i];
                    o[i] = acc;
                }
            }
    free(s);
}

// dqkv (B,T,3C) = gradient of sum(out * dout), from the naive double forward's att
static void naive_attention_backward(double *dqkv, const double *att, const float *dout,
                                     const float *qkv, int B, int T, int C, int NH) {
    int hs = C / NH;
    double scale = 1.0 / sqrt((double)hs);
    double *dp = dbuf(T);
    for (int b = 0; b < B; b++)
        for (int h = 0; h < NH; h++)
            for (int t = 0; t < T; t++) {
                const double *a = att + (((size_t)b * NH + h) * T + t) * T;
                const float *d = dout + ((size_t)b * T + t) * C + h * hs;
                size_t qo = ((size_t)b * T + t) * 3 * C + h * hs;
                double s = 0;
                for (int u = 0; u <= t; u++) {
                    size_t vo = ((size_t)b * T + u) * 3 * C + 2 * C + h * hs;
                    dp[u] = 0;
                    for (int i = 0; i < hs; i++) {
                        dp[u] += (double)d[i] * qkv[vo + i];
                        dqkv[vo + i] += a[u] * d[i];
                    }
                    s += a[u] * dp[u];
                }
                for (int u = 0; u <= t; u++) {
                    double dsc = a[u] * (dp[u] - s) * scale;
                    size_t ko = ((size_t)b * T + u) * 3 * C + C + h * hs;
                    for (int i = 0; i < hs; i++) {
                        dqkv[qo + i] += dsc * qkv[ko + i];
                        dqkv[ko + i] += dsc * qkv[qo + i];
                    }
                }
            }
    free(dp);
}

static void test_attention(void **state) {
    (void)state;
    // hs = 9: one 8-lane block plus a tail in every dot product
    int B = 2, T = 5, NH = 2, C = 18;
    size_t nq = (size_t)B * T * 3 * C, no = (size_t)B * T * C, na = (size_t)B * NH * T * T;
    at_ctx c = {fbuf(no), fbuf(na), fbuf(nq), fbuf(no), B, T, C, NH};
    fill(c.qkv, nq, -1.5f, 1.5f);
    fill(c.R, no, -1, 1);
    fill(c.att, na, 5, 6);   // stale values: forward must write every element, zeros included

    at_obj(&c);
    double *rout = dbuf(no), *ratt = dbuf(na);
    naive_attention(rout, ratt, c.qkv, B, T, C, NH);
    check("attention forward out", rel_err(c.out, rout, no), FWD_TOL);
    check("attention forward att", rel_err(c.att, ratt, na), FWD_TOL);
    for (int r = 0; r < B * NH * T; r++) {   // rows are distributions, masked exactly
        int t = r % T;
        for (int u = t + 1; u < T; u++) assert_true(c.att[(size_t)r * T + u] == 0.0f);
    }

    float *dqkv = fbuf(nq);
    fill_nan(dqkv, nq);
    be->attention_backward(dqkv, NULL, NULL, c.R, c.qkv, c.out, c.att, B, T, C, NH);
    check("attention dqkv vs FD", fd_rel_error(at_obj, &c, c.qkv, nq, dqkv, 1e-2f), FD_TOL);

    free(c.out); free(c.att); free(c.qkv); free(c.R); free(rout); free(ratt);
    free(dqkv);
}

// Long enough for several blocks of query rows (and a partial last one) in the blocked
// implementation; compared with the naive double forward and backward.
static void test_attention_blocks(void **state) {
    (void)state;
    int B = 2, T = 150, NH = 3, C = 27;
    size_t nq = (size_t)B * T * 3 * C, no = (size_t)B * T * C, na = (size_t)B * NH * T * T;
    float *qkv = fbuf(nq), *out = fbuf(no), *att = fbuf(na), *dout = fbuf(no);
    float *dqkv = fbuf(nq);
    fill(qkv, nq, -1.5f, 1.5f);
    fill(dout, no, -1, 1);
    fill(att, na, 5, 6);
    be->attention_forward(out, NULL, att, qkv, B, T, C, NH);
    double *rout = dbuf(no), *ratt = dbuf(na), *rd = dbuf(nq);
    naive_attention(rout, ratt, qkv, B, T, C, NH);
    check("attention T=150 forward out", rel_err(out, rout, no), FWD_TOL);
    check("attention T=150 forward att", rel_err(att, ratt, na), FWD_TOL);

    fill_nan(dqkv, nq);
    // with qkv's bias gradient: db0 plus dqkv's column sums, each summed over the rows in
    // order from 0 (matmul_backward's order): the same additions here, so the same bits
    float *db = fbuf((size_t)3 * C), *db0 = fbuf((size_t)3 * C);
    fill(db0, (size_t)3 * C, -1, 1);
    memcpy(db, db0, (size_t)3 * C * sizeof(float));
    be->attention_backward(dqkv, NULL, db, dout, qkv, out, att, B, T, C, NH);
    naive_attention_backward(rd, ratt, dout, qkv, B, T, C, NH);
    check("attention T=150 dqkv vs naive", rel_err(dqkv, rd, nq), FWD_TOL);
    for (int j = 0; j < 3 * C; j++) {
        float s = 0.0f;
        for (int n = 0; n < B * T; n++) s += dqkv[(size_t)n * 3 * C + j];
        if (db[j] != db0[j] + s)
            fail_msg("attention dbias [%d]: %.9g, want %.9g", j, db[j], db0[j] + s);
    }
    free(db); free(db0);
    free(qkv); free(out); free(att); free(dout); free(dqkv);
    free(rout); free(ratt); free(rd);
}

// Changing a later position's k and v leaves every earlier output and att row bit-identical.
static void test_attention_causal(void **state) {
    (void)state;
    // t0 lies inside the first block of 64 query rows, so rows before it share a score
    // block with it and only the mask keeps it out
    int B = 2, T = 100, NH = 2, C = 16, t0 = 40;
    size_t nq = (size_t)B * T * 3 * C, no = (size_t)B * T * C, na = (size_t)B * NH * T * T;
    float *qkv = fbuf(nq), *out1 = fbuf(no), *att1 = fbuf(na), *out2 = fbuf(no),
          *att2 = fbuf(na);
    fill(qkv, nq, -1, 1);
    be->attention_forward(out1, NULL, att1, qkv, B, T, C, NH);
    for (int i = C; i < 3 * C; i++) qkv[((size_t)0 * T + t0) * 3 * C + i] += 0.5f;   // k, v
    be->attention_forward(out2, NULL, att2, qkv, B, T, C, NH);

    assert_memory_equal(out1, out2, (size_t)t0 * C * sizeof(float));   // b = 0, t < t0
    for (int h = 0; h < NH; h++)
        assert_memory_equal(att1 + (size_t)h * T * T, att2 + (size_t)h * T * T,
                            (size_t)t0 * T * sizeof(float));
    assert_memory_equal(out1 + (size_t)T * C, out2 + (size_t)T * C,   // b = 1 untouched
                        (size_t)T * C * sizeof(float));
    // and the change is visible from t0 on (so the comparison above is not vacuous)
    assert_memory_not_equal(out1 + (size_t)t0 * C, out2 + (size_t)t0 * C, C * sizeof(float));
    free(qkv); free(out1); free(att1); free(out2); free(att2);
}

// ---------------------------------------------------------------------------------------
// gelu, residual

typedef struct {
    float *out, *inp, *R;
    long n;
} gelu_ctx;

static double gelu_obj(void *p) {
    gelu_ctx *c = p;
    be->gelu_forward(c->out, NULL, c->inp, c->n);
    return dot_r(c->out, c->R, (size_t)c->n);
}

static void test_gelu(void **state) {
    (void)state;
    long n = 61;
    gelu_ctx c = {fbuf(n), fbuf(n), fbuf(n), n};
    fill(c.inp, n, -4, 4);
    fill(c.R, n, -1, 1);
    gelu_obj(&c);
    double *ref = dbuf(n);
    for (long i = 0; i < n; i++) ref[i] = 0.5 * c.inp[i] * (1.0 + erf(c.inp[i] / sqrt(2.0)));
    check("gelu forward", rel_err(c.out, ref, n), FWD_TOL);

    float *dinp = fbuf(n);
    fill_nan(dinp, n);
    be->gelu_backward(dinp, NULL, NULL, c.inp, c.R, 1, (int)n);
    check("gelu dinp vs FD", fd_rel_error(gelu_obj, &c, c.inp, n, dinp, 1e-2f), FD_TOL);
    // with the bias gradient, on a (5, 12) view of the first 60 values: dinp as above, and
    // dbias (C) += its column sums (5 float additions each: within FWD_TOL)
    int R = 5, C = 12;
    float *dinp2 = fbuf(R * C), *db = fbuf(C);
    fill(db, C, -1, 1);
    double *want = dbuf(C);
    for (int j = 0; j < C; j++) want[j] = db[j];
    be->gelu_backward(dinp2, NULL, db, c.inp, c.R, R, C);
    for (int i = 0; i < R * C; i++) {
        if (memcmp(dinp2 + i, dinp + i, 4)) fail_msg("gelu dinp with dbias differs at %d", i);
        want[i % C] += dinp[i];
    }
    check("gelu dbias", rel_err(db, want, C), FWD_TOL);
    free(c.out); free(c.inp); free(c.R); free(ref); free(dinp); free(dinp2); free(db); free(want);
}

static void test_residual(void **state) {
    (void)state;
    long n = 37;
    float *a = fbuf(n), *b = fbuf(n), *out = fbuf(n), *a0 = fbuf(n);
    fill(a, n, -1, 1);
    fill(b, n, -1, 1);
    memcpy(a0, a, n * sizeof(float));
    be->residual_forward(out, a, b, n);
    for (long i = 0; i < n; i++) assert_true(out[i] == a[i] + b[i]);
    be->residual_forward(a, a, b, n);   // out may alias a
    assert_memory_equal(a, out, n * sizeof(float));
    free(a); free(b); free(out); free(a0);
}

// ---------------------------------------------------------------------------------------
// cross-entropy

typedef struct {
    float *losses, *stats, *logits;
    int32_t *targets;
    int N, V;
} ce_ctx;

static double ce_obj(void *p) {   // the mean loss
    ce_ctx *c = p;
    be->crossentropy_forward(c->losses, c->stats, c->logits, c->targets, c->N, c->V);
    double s = 0;
    for (int i = 0; i < c->N; i++) s += c->losses[i];
    return s / c->N;
}

static void test_crossentropy(void **state) {
    (void)state;
    int N = 5, V = 13;
    int32_t targets[] = {0, 12, 5, 7, 3};
    size_t n = (size_t)N * V;
    ce_ctx c = {fbuf(N), fbuf(2 * N), fbuf(n), targets, N, V};
    fill(c.logits, n, -3, 3);
    for (int v = 0; v < V; v++) c.logits[4 * V + v] += 1000.0f;   // needs the max shift
    ce_obj(&c);

    // the reference in double: losses, and dloss (softmax - onehot) with dloss = 1 / N
    double *rl = dbuf(N), *rd = dbuf(n), *rs = dbuf(2 * N);
    for (int r = 0; r < N; r++) {
        const float *x = c.logits + (size_t)r * V;
        double mx = -INFINITY, s = 0;
        for (int v = 0; v < V; v++) mx = x[v] > mx ? x[v] : mx;
        for (int v = 0; v < V; v++) s += exp(x[v] - mx);
        for (int v = 0; v < V; v++)
            rd[(size_t)r * V + v] = (exp(x[v] - mx) / s - (v == targets[r])) / N;
        rl[r] = -(x[targets[r]] - mx - log(s));
        rs[2 * r] = mx;
        rs[2 * r + 1] = 1.0 / s;
    }
    for (int r = 0; r < N; r++) assert_true(isfinite(c.losses[r]));
    check("crossentropy forward losses", rel_err(c.losses, rl, N), FWD_TOL);
    check("crossentropy forward (max, 1 / sum)", rel_err(c.stats, rs, 2 * N), FWD_TOL);

    float *dl = fbuf(n);
    fill_nan(dl, n);
    be->crossentropy_backward(dl, NULL, c.logits, c.stats, targets, 1.0f / N, N, V);
    check("crossentropy dlogits", rel_err(dl, rd, n), FWD_TOL);
    check("crossentropy dlogits vs FD", fd_rel_error(ce_obj, &c, c.logits, n, dl, 1e-2f),
          FD_TOL);
    free(c.losses); free(c.stats); free(c.logits); free(rl); free(rd); free(rs); free(dl);
}

// ---------------------------------------------------------------------------------------
// optimizer

static void test_adamw(void **state) {
    (void)state;
    size_t n = 37;
    float lr = 1e-2f, b1 = 0.9f, b2 = 0.95f, eps = 1e-8f, wd = 0.1f, gs = 0.5f;
    float *p = fbuf(n), *g = fbuf(n), *m = fbuf(n), *v = fbuf(n);
    double *rp = dbuf(n), *rm = dbuf(n), *rv = dbuf(n);
    fill(p, n, -1, 1);
    for (size_t i = 0; i < n; i++) rp[i] = p[i];
    for (long t = 1; t <= 3; t++) {   // a few steps: the bias correction changes with t
        fill(g, n, -2, 2);
        be->adamw(p, g, m, v, NULL, n, lr, b1, b2, eps, wd, t, gs);
        for (size_t i = 0; i < n; i++) {
            double gi = (double)g[i] * gs;
            rm[i] = b1 * rm[i] + (1.0 - b1) * gi;
            rv[i] = b2 * rv[i] + (1.0 - b2) * gi * gi;
            double mhat = rm[i] / (1.0 - pow(b1, (double)t));
            double vhat = rv[i] / (1.0 - pow(b2, (double)t));
            rp[i] -= lr * (mhat / (sqrt(vhat) + eps) + wd * rp[i]);
        }
    }
    check("adamw p after 3 steps", rel_err(p, rp, n), FWD_TOL);
    check("adamw m after 3 steps", rel_err(m, rm, n), FWD_TOL);
    check("adamw v after 3 steps", rel_err(v, rv, n), FWD_TOL);
    free(p); free(g); free(m); free(v); free(rp); free(rm); free(rv);
}

// Lazy AdamW's row ops: adamw_rows over listed rows is adamw on those rows bit for bit (the
// same element formula; docs/model.md promises a touched row moves exactly as under adamw),
// unlisted rows are not written.
static void test_adamw_rows(void **state) {
    (void)state;
    int R = 9, C = 13;
    size_t n = (size_t)R * C;
    int32_t rows[4] = {7, 2, 5, 0};   // out of order
    float *p = fbuf(n), *g = fbuf(n), *m = fbuf(n), *v = fbuf(n);
    float *q = fbuf(n), *mq = fbuf(n), *vq = fbuf(n);   // the dense op's copy
    fill(p, n, -1, 1);
    memcpy(q, p, n * sizeof(float));
    for (long t = 1; t <= 3; t++) {
        fill(g, n, -2, 2);
        be->adamw_rows(p, g, m, v, NULL, rows, 4, C, 1e-2f, 0.9f, 0.95f, 1e-8f, 0.1f, t, 0.5f);
        for (int i = 0; i < 4; i++) {
            size_t o = (size_t)rows[i] * C;
            be->adamw(q + o, g + o, mq + o, vq + o, NULL, C, 1e-2f, 0.9f, 0.95f, 1e-8f, 0.1f, t,
                      0.5f);
        }
    }
    assert_memory_equal(p, q, n * sizeof(float));   // unlisted rows: both untouched
    assert_memory_equal(m, mq, n * sizeof(float));
    assert_memory_equal(v, vq, n * sizeof(float));
    int moved = 0;
    for (int r = 0; r < R; r++) moved += m[(size_t)r * C] != 0.0f;
    assert_int_equal(moved, 4);
    free(p); free(g); free(m); free(v); free(q); free(mq); free(vq);
}

static void test_sum_squares(void **state) {
    (void)state;
    size_t sizes[] = {0, 5, 16384, 100003};   // one block, exactly one, several
    for (size_t s = 0; s < sizeof sizes / sizeof sizes[0]; s++) {
        size_t n = sizes[s];
        float *x = fbuf(n);
        fill(x, n, -1, 1);
        double ref = 0;
        for (size_t i = 0; i < n; i++) ref += (double)x[i] * x[i];
        double got = be->sum_squares(x, n);
        // Both sides add exact double squares of floats (24 x 24 bits < 53) of one sign: a sum
        // of n positive terms errs by <= (n - 1) 2^-53 of the sum in any order (1.1e-11 at
        // n = 100003, worst case), so 2 n 2^-53 bounds the difference of the two orders.
        // Rounding the result to float (2^-24 ~ 6e-8) or a lost block or tail is far above.
        double tol = (double)n * 0x1p-52 * (ref > 1 ? ref : 1);
        if (!(fabs(got - ref) <= tol)) fail_msg("sum_squares n %zu: %.17g, want %.17g", n, got, ref);
        omp_set_num_threads(1);
        double one = be->sum_squares(x, n);
        omp_set_num_threads(2);
        double two = be->sum_squares(x, n);
        assert_memory_equal(&one, &two, sizeof(double));   // independent of thread count
        free(x);
    }
}

// sum_f64 (the gradient norm from per-row sums of squares): nonnegative doubles with all 53
// bits in use, as those sums are
static void test_sum_f64(void **state) {
    (void)state;
    size_t sizes[] = {0, 5, 16384, 100003};   // one block, exactly one, several
    for (size_t s = 0; s < sizeof sizes / sizeof sizes[0]; s++) {
        size_t n = sizes[s];
        float *a = fbuf(n), *b = fbuf(n);
        double *x = dbuf(n);
        fill(a, n, 0, 1);
        fill(b, n, 0, 1);
        for (size_t i = 0; i < n; i++) x[i] = (double)a[i] + (double)b[i] * 0x1p-30;
        double ref = 0;
        for (size_t i = 0; i < n; i++) ref += x[i];
        double got = be->sum_f64(x, n);
        // n terms of one sign: each order errs by <= (n - 1) 2^-53 of the sum, so the two
        // differ by <= 2 n 2^-53 of it (2.2e-11 at n = 100003); a float accumulation
        // (2^-24 ~ 6e-8 per step) or a lost block is far above
        double tol = (double)n * 0x1p-52 * ref;
        if (!(fabs(got - ref) <= tol)) fail_msg("sum_f64 n %zu: %.17g, want %.17g", n, got, ref);
        omp_set_num_threads(1);
        double one = be->sum_f64(x, n);
        omp_set_num_threads(2);
        double two = be->sum_f64(x, n);
        assert_memory_equal(&one, &two, sizeof(double));   // independent of thread count
        free(a); free(b); free(x);
    }
}

// ---------------------------------------------------------------------------------------
// determinism: the same inputs give bitwise identical gradients, run to run and (by the
// design in cpu.h) for 1 and 2 threads

static void test_determinism(void **state) {
    (void)state;
    int threads[3] = {2, 2, 1};

    {   // attention backward
        int B = 2, T = 100, C = 64, NH = 4;
        size_t nq = (size_t)B * T * 3 * C, no = (size_t)B * T * C, na = (size_t)B * NH * T * T;
        float *qkv = fbuf(nq), *out = fbuf(no), *att = fbuf(na), *dout = fbuf(no);
        float *d[3];
        fill(qkv, nq, -1, 1);
        fill(dout, no, -1, 1);
        be->attention_forward(out, NULL, att, qkv, B, T, C, NH);
        for (int r = 0; r < 3; r++) {
            omp_set_num_threads(threads[r]);
            d[r] = fbuf(nq);
            be->attention_backward(d[r], NULL, NULL, dout, qkv, out, att, B, T, C, NH);
        }
        assert_memory_equal(d[0], d[1], nq * sizeof(float));
        assert_memory_equal(d[0], d[2], nq * sizeof(float));
        free(qkv); free(out); free(att); free(dout);
        for (int r = 0; r < 3; r++) free(d[r]);
    }
    {   // encoder backward: few distinct tokens, so rows collect many positions
        int B = 4, T = 64, C = 72, V = 3;
        size_t no = (size_t)B * T * C;
        int32_t *inp = malloc((size_t)B * T * sizeof(int32_t));
        for (int i = 0; i < B * T; i++) inp[i] = (int32_t)(mp_hash3(7, 7, i) % V);
        float *dout = fbuf(no), *dte[3], *dpe[3];
        fill(dout, no, -1, 1);
        for (int r = 0; r < 3; r++) {
            omp_set_num_threads(threads[r]);
            dte[r] = fbuf((size_t)V * C);
            dpe[r] = fbuf((size_t)T * C);
            be->encoder_backward(dte[r], dpe[r], dout, inp, B, T, C, V);
        }
        for (int r = 1; r < 3; r++) {
            assert_memory_equal(dte[0], dte[r], (size_t)V * C * sizeof(float));
            assert_memory_equal(dpe[0], dpe[r], (size_t)T * C * sizeof(float));
        }
        free(inp); free(dout);
        for (int r = 0; r < 3; r++) { free(dte[r]); free(dpe[r]); }
    }
    {   // layernorm backward: dw, db sum over many row blocks
        int N = 300, C = 72;
        size_t n = (size_t)N * C;
        float *inp = fbuf(n), *w = fbuf(C), *b = fbuf(C), *out = fbuf(n), *mean = fbuf(N),
              *rstd = fbuf(N), *dout = fbuf(n);
        float *di[3], *dw[3], *db[3];
        fill(inp, n, -1, 1);
        fill(w, C, 0.5f, 1.5f);
        fill(b, C, -1, 1);
        fill(dout, n, -1, 1);
        be->layernorm_forward(out, NULL, mean, rstd, inp, w, b, N, C);
        for (int r = 0; r < 3; r++) {
            omp_set_num_threads(threads[r]);
            di[r] = fbuf(n);
            dw[r] = fbuf(C);
            db[r] = fbuf(C);
            be->layernorm_backward(di[r], NULL, dw[r], db[r], dout, inp, w, mean, rstd, N, C);
        }
        for (int r = 1; r < 3; r++) {
            assert_memory_equal(di[0], di[r], n * sizeof(float));
            assert_memory_equal(dw[0], dw[r], C * sizeof(float));
            assert_memory_equal(db[0], db[r], C * sizeof(float));
        }
        free(inp); free(w); free(b); free(out); free(mean); free(rstd); free(dout);
        for (int r = 0; r < 3; r++) { free(di[r]); free(dw[r]); free(db[r]); }
    }
    omp_set_num_threads(2);
}

int main(void) {
    be = mp_backend_cpu();
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_table),          cmocka_unit_test(test_memory),
        cmocka_unit_test(test_encoder),        cmocka_unit_test(test_layernorm),
        cmocka_unit_test(test_matmul_fd),      cmocka_unit_test(test_matmul_naive),
        cmocka_unit_test(test_attention),      cmocka_unit_test(test_attention_blocks),
        cmocka_unit_test(test_attention_causal),
        cmocka_unit_test(test_gelu),           cmocka_unit_test(test_residual),
        cmocka_unit_test(test_crossentropy),   cmocka_unit_test(test_adamw), cmocka_unit_test(test_adamw_rows),
        cmocka_unit_test(test_sum_squares),    cmocka_unit_test(test_sum_f64),
        cmocka_unit_test(test_determinism),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
