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
// the longest float sums (K = 300 and more: the cross-entropy normaliser over V = 5000 is
// summed in double, each float exp within an ulp, and its online rescalings, at most one
// per thread and entry, multiply by an exp of an exact double difference: ~1e-7 of the
// loss), outside the backward of BN and softmax, which subtract nearly equal terms
// (measured there: 7e-7); a wrong formula, index or a missed accumulation gives O(1e-2..1).
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
#include "core/log.h"
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

// frequent: a token in about half the positions (a run longer than the unrolled loop)
static void check_encoder(int B, int T, int C, int V, int frequent) {
    int N = B * T;
    int32_t *inp = malloc((size_t)N * sizeof(int32_t));
    for (int i = 0; i < N; i++)   // repeats
        inp[i] = frequent && mp_hash3(3, 4, i) % 2 ? 3 : (int32_t)(mp_hash3(1, 2, i) % V);
    float *wte = frand((size_t)V * C, -1, 1), *wpe = frand((size_t)T * C, -1, 1);
    float *out = frand((size_t)N * C, 0, 0);
    cpu->encoder_forward(out, inp, wte, wpe, B, T, C);
    int32_t *d_inp = dev_copy(inp, (size_t)N * sizeof(int32_t));
    float *d_wte = dev_copy(wte, (size_t)V * C * 4), *d_wpe = dev_copy(wpe, (size_t)T * C * 4);
    float *d_out = gpu->alloc((size_t)N * C * 4);
    gpu->encoder_forward(d_out, d_inp, d_wte, d_wpe, B, T, C);
    expect_dev("encoder out", d_out, out, (size_t)N * C);
    // backward: gradients start from random values (accumulation)
    float *dout = frand((size_t)N * C, -1, 1);
    float *dwte = frand((size_t)V * C, -1, 1), *dwpe = frand((size_t)T * C, -1, 1);
    float *d_dout = dev_copy(dout, (size_t)N * C * 4);
    float *d_dwte = dev_copy(dwte, (size_t)V * C * 4), *d_dwpe = dev_copy(dwpe, (size_t)T * C * 4);
    cpu->encoder_backward(dwte, dwpe, dout, inp, B, T, C, V);
    gpu->encoder_backward(d_dwte, d_dwpe, d_dout, d_inp, B, T, C, V);
    // both sum each row's positions in position order, with no products: the same bits
    float *got = host_copy(d_dwte, (size_t)V * C * 4);
    for (size_t i = 0; i < (size_t)V * C; i++)
        if (memcmp(got + i, dwte + i, 4))
            fail_msg("encoder dwte [%zu]: %.9g, want %.9g bit for bit", i, got[i], dwte[i]);
    free(got);
    expect_dev("encoder dwpe", d_dwpe, dwpe, (size_t)T * C);
    void *dev[] = {d_inp, d_wte, d_wpe, d_out, d_dout, d_dwte, d_dwpe};
    for (size_t i = 0; i < 7; i++) gpu->free(dev[i]);
    free(inp); free(wte); free(wpe); free(out); free(dout); free(dwte); free(dwpe);
}

static void test_encoder(void **state) {
    (void)state;
    check_encoder(3, 5, 37, 7, 0);
    check_encoder(4, 64, 1100, 50, 1);   // more columns than a block's threads
}

static void test_layernorm(void **state) {
    (void)state;
    int N = 19, C = 70;
    size_t NC = (size_t)N * C;
    float *x = frand(NC, -2, 3), *w = frand(C, 0.5, 1.5), *b = frand(C, -1, 1);
    float *out = frand(NC, 0, 0), *mean = frand(N, 0, 0), *rstd = frand(N, 0, 0);
    cpu->layernorm_forward(out, NULL, mean, rstd, x, w, b, N, C);
    float *d_x = dev_copy(x, NC * 4), *d_w = dev_copy(w, C * 4), *d_b = dev_copy(b, C * 4);
    float *d_out = gpu->alloc(NC * 4), *d_mean = gpu->alloc(N * 4), *d_rstd = gpu->alloc(N * 4);
    gpu->layernorm_forward(d_out, NULL, d_mean, d_rstd, d_x, d_w, d_b, N, C);
    expect_dev("layernorm out", d_out, out, NC);
    expect_dev("layernorm mean", d_mean, mean, N);
    expect_dev("layernorm rstd", d_rstd, rstd, N);
    float *dout = frand(NC, -1, 1), *dx = frand(NC, -1, 1), *dw = frand(C, -1, 1), *db = frand(C, -1, 1);
    float *d_dout = dev_copy(dout, NC * 4), *d_dx = dev_copy(dx, NC * 4);
    float *d_dw = dev_copy(dw, C * 4), *d_db = dev_copy(db, C * 4);
    cpu->layernorm_backward(dx, NULL, dw, db, dout, x, w, mean, rstd, N, C);
    gpu->layernorm_backward(d_dx, NULL, d_dw, d_db, d_dout, d_x, d_w, d_mean, d_rstd, N, C);
    expect_dev("layernorm dx", d_dx, dx, NC);
    expect_dev("layernorm dw", d_dw, dw, C);
    expect_dev("layernorm db", d_db, db, C);
    void *dev[] = {d_x, d_w, d_b, d_out, d_mean, d_rstd, d_dout, d_dx, d_dw, d_db};
    for (size_t i = 0; i < 10; i++) gpu->free(dev[i]);
    void *host[] = {x, w, b, out, mean, rstd, dout, dx, dw, db};
    for (size_t i = 0; i < 10; i++) free(host[i]);
}

// Sums that two backends add in different orders (a GEMM's dw, a bias gradient): each got[i]
// within 2 (terms + 1) u of mag[i], the sum of its terms' magnitudes (first-order bound of
// recursive summation with rounded products, on each side; u = 2^-24). It holds however
// far a sum cancels, where a relative check does not: 200 terms of size 1 can sum to 0.04.
static void expect_sums_host(const char *what, const float *got, const float *want,
                             const double *mag, size_t n, int terms) {
    for (size_t i = 0; i < n; i++) {
        double err = fabs((double)got[i] - want[i]), bound = 2.0 * (terms + 1) * 0x1p-24 * mag[i];
        if (!(err <= bound))
            fail_msg("%s [%zu]: got %.9g want %.9g: |error| %.3g > bound %.3g", what, i, got[i],
                     want[i], err, bound);
    }
}
static void expect_sums(const char *what, const float *d_got, const float *want,
                        const double *mag, size_t n, int terms) {
    float *got = host_copy(d_got, n * 4);
    expect_sums_host(what, got, want, mag, n, terms);
    free(got);
}

// got (M) against start (M) + the column sums of x (N, M), formed here in double, within
// expect_sums's bound: a bias gradient that a backend sums in its own order
static void expect_colsum(const char *what, const float *got, const float *start,
                          const float *x, int N, int M) {
    float *want = malloc((size_t)M * sizeof(float));
    double *mag = malloc((size_t)M * sizeof(double));
    for (int j = 0; j < M; j++) {
        double s = start[j], a = fabs(start[j]);
        for (int n = 0; n < N; n++) {
            s += x[(size_t)n * M + j];
            a += fabs(x[(size_t)n * M + j]);
        }
        want[j] = (float)s;
        mag[j] = a;
    }
    expect_sums_host(what, got, want, mag, (size_t)M, N);
    free(want);
    free(mag);
}

static void check_matmul(int N, int C, int OC, int with_bias) {
    size_t nx = (size_t)N * C, nw = (size_t)OC * C, no = (size_t)N * OC;
    float *x = frand(nx, -1, 1), *w = frand(nw, -1, 1), *bias = frand(OC, -1, 1);
    float *out = frand(no, 0, 0);
    cpu->matmul_forward(out, x, NULL, w, NULL, with_bias ? bias : NULL, N, C, OC);
    float *d_x = dev_copy(x, nx * 4), *d_w = dev_copy(w, nw * 4), *d_bias = dev_copy(bias, OC * 4);
    float *d_out = gpu->alloc(no * 4);
    gpu->matmul_forward(d_out, d_x, NULL, d_w, NULL, with_bias ? d_bias : NULL, N, C, OC);
    expect_dev("matmul out", d_out, out, no);
    float *dout = frand(no, -1, 1), *dx = frand(nx, -1, 1), *dw = frand(nw, -1, 1), *db = frand(OC, -1, 1);
    float *d_dout = dev_copy(dout, no * 4), *d_dx = dev_copy(dx, nx * 4), *d_dw = dev_copy(dw, nw * 4);
    float *d_db = dev_copy(db, OC * 4);
    // the magnitudes of dw's and dbias's terms: the value each starts from, then N products
    // (dw) or N values (dbias); mw2 for dw after a second backward adds the products again
    double *mw = malloc(nw * sizeof(double)), *mw2 = malloc(nw * sizeof(double));
    double *mb = malloc(OC * sizeof(double));
    for (int o = 0; o < OC; o++) {
        mb[o] = fabs(db[o]);
        for (int n = 0; n < N; n++) mb[o] += fabs(dout[(size_t)n * OC + o]);
        for (int c = 0; c < C; c++) {
            double s = 0.0;
            for (int n = 0; n < N; n++) s += fabs((double)dout[(size_t)n * OC + o] * x[(size_t)n * C + c]);
            mw[(size_t)o * C + c] = fabs(dw[(size_t)o * C + c]) + s;
            mw2[(size_t)o * C + c] = mw[(size_t)o * C + c] + s;
        }
    }
    cpu->matmul_backward(dx, dw, with_bias ? db : NULL, dout, NULL, x, NULL, w, NULL, N, C, OC, 1);
    gpu->matmul_backward(d_dx, d_dw, with_bias ? d_db : NULL, d_dout, NULL, d_x, NULL, d_w, NULL, N, C, OC, 1);
    expect_dev("matmul dx (added)", d_dx, dx, nx);
    expect_sums("matmul dw", d_dw, dw, mw, nw, N);
    expect_sums("matmul dbias", d_db, db, mb, OC, N);
    // dx written: NaN before, on both sides
    for (size_t i = 0; i < nx; i++) dx[i] = NAN;
    gpu->from_host(d_dx, dx, nx * 4);
    cpu->matmul_backward(dx, NULL, NULL, dout, NULL, x, NULL, w, NULL, N, C, OC, 0);
    gpu->matmul_backward(d_dx, NULL, NULL, d_dout, NULL, d_x, NULL, d_w, NULL, N, C, OC, 0);
    expect_dev("matmul dx (written)", d_dx, dx, nx);
    // NULL gradients are not written
    gpu->matmul_backward(NULL, d_dw, NULL, d_dout, NULL, d_x, NULL, d_w, NULL, N, C, OC, 0);
    cpu->matmul_backward(NULL, dw, NULL, dout, NULL, x, NULL, w, NULL, N, C, OC, 0);
    expect_sums("matmul dw only", d_dw, dw, mw2, nw, 2 * N);
    expect_dev("matmul dx untouched", d_dx, dx, nx);
    void *dev[] = {d_x, d_w, d_bias, d_out, d_dout, d_dx, d_dw, d_db};
    for (size_t i = 0; i < 8; i++) gpu->free(dev[i]);
    void *host[] = {x, w, bias, out, dout, dx, dw, db, mw, mw2, mb};
    for (size_t i = 0; i < 11; i++) free(host[i]);
}

static void test_matmul(void **state) {
    (void)state;
    check_matmul(33, 45, 29, 1);
    check_matmul(7, 64, 130, 0);
    check_matmul(200, 3, 1, 1);
}

// ---------------------------------------------------------------------------------------
// bf16 GEMMs (system.precision = bf16), elementwise against error bounds
//
// Unit roundoffs. An operand rounded to bf16 (8 significant bits) to nearest errs by at most
// 2^-8 of itself. Sums: each fp32 addition errs by at most 2^-24 of the partial sum rounded
// to nearest, 2^-23 if the tensor cores' adders truncate, and the reference's own sums add
// 2^-24: 2^-22 covers both.
#define U_BF16 0x1p-8
#define U_SUM 0x1p-22

// float bits (7 explicit mantissa bits, bf16; 10, TF32) of f rounded to nearest, ties to
// even, from the definition (the low 16 or 13 bits decide; finite inputs only)
static float round_bits(float f, int drop) {
    uint32_t u, half = (1u << (drop - 1)) - 1u;
    memcpy(&u, &f, 4);
    u += half + ((u >> drop) & 1u);
    u &= ~((1u << drop) - 1u);
    memcpy(&f, &u, 4);
    return f;
}
static float host_bf16(float f) { return round_bits(f, 16); }

// Row-major C (M,N) = op(A) op(B) + C0 (C0 (M,N) or NULL) in double on the host, the
// operands passed through round (NULL: as they are): ref (M,N), and S (M,N) the sum of the
// absolute values of its terms, sum_k |a_ik b_kj| + |C0_ij|.
static void gemm_ref(double *ref, double *S, int ta, int tb, int M, int N, int K, const float *A,
                     int lda, const float *B, int ldb, const float *C0, float (*round)(float)) {
    for (int i = 0; i < M; i++)
        for (int j = 0; j < N; j++) {
            double c = C0 ? C0[(size_t)i * N + j] : 0.0, s = fabs(c);
            for (int k = 0; k < K; k++) {
                float a = ta ? A[(size_t)k * lda + i] : A[(size_t)i * lda + k];
                float b = tb ? B[(size_t)j * ldb + k] : B[(size_t)k * ldb + j];
                if (round) { a = round(a); b = round(b); }
                c += (double)a * b;
                s += fabs((double)a * b);
            }
            ref[(size_t)i * N + j] = c;
            S[(size_t)i * N + j] = s;
        }
}

// |got[i] - want[i]| <= e S[i] + floor for each of n elements (host arrays), rows of `row`
static void check_bound(const char *what, const float *got, const double *want, const double *S,
                        size_t n, size_t row, double e, double floor) {
    for (size_t i = 0; i < n; i++) {
        double d = fabs(got[i] - want[i]);
        if (!(d <= e * S[i] + floor))
            fail_msg("%s: [%zu][%zu] got %.9g, want %.9g: |error| %.3g > bound %.3g (%.3g x sum "
                     "of |terms| %.3g + %.3g)", what, i / row, i % row, got[i], want[i], d,
                     e * S[i] + floor, e, S[i], floor);
    }
}

// got (device, `rows` rows of n with leading dimension ld) against want (rows, n)
// elementwise: |got - want| <= (2u + u^2 + (K + 2) U_SUM) S. A product of two operands that
// each err by at most u relative errs by at most (2u + u^2) |a b|; each of at most K + 2
// additions (the K products, C0, a bias) errs by at most U_SUM of a partial sum, itself at
// most S.
static void expect_bound(const char *what, const float *dev, int rows, int n, int ld,
                         const double *want, const double *S, int K, double u) {
    float *h = host_copy(dev, ((size_t)(rows - 1) * ld + n) * sizeof(float));
    float *got = malloc((size_t)rows * n * sizeof(float));
    for (int r = 0; r < rows; r++) memcpy(got + (size_t)r * n, h + (size_t)r * ld, n * sizeof(float));
    check_bound(what, got, want, S, (size_t)rows * n, n, 2 * u + u * u + (K + 2) * U_SUM, 0.0);
    free(h);
    free(got);
}

static double *to_double(const float *x, size_t n) {
    double *d = malloc((n ? n : 1) * sizeof(double));
    for (size_t i = 0; i < n; i++) d[i] = x[i];
    return d;
}

// matmul in bf16 mode: out, dinp, dw (each a bf16 GEMM) against the CPU's fp32 op within the
// operand rounding's bound, and against the exact GEMM of the bf16-rounded operands within
// the sums' bound alone (which a wrong rounding, truncation say, or none at all, exceeds:
// it moves the products by up to 2^-7 of themselves, the bound there is (K + 2) 2^-22);
// dbias (an fp32 column sum in bf16 mode too) within the sums' bound. add: dinp added to
// (dinp_accumulate 1) or written over NaN.
static void check_matmul_bf16(int N, int C, int OC, int with_bias, int add) {
    size_t nx = (size_t)N * C, nw = (size_t)OC * C, no = (size_t)N * OC;
    float *x = frand(nx, -1, 1), *w = frand(nw, -1, 1), *bias = frand(OC, -1, 1);
    float *dout = frand(no, -1, 1), *dx = frand(nx, -1, 1), *dw = frand(nw, -1, 1), *db = frand(OC, -1, 1);
    float *out = frand(no, 0, 0), *dx0 = malloc(nx * 4), *dw0 = malloc(nw * 4), *db0 = malloc(OC * 4);
    memcpy(dx0, dx, nx * 4);   // the gradients' values before the += of backward
    memcpy(dw0, dw, nw * 4);
    memcpy(db0, db, OC * 4);
    float *d_x = dev_copy(x, nx * 4), *d_w = dev_copy(w, nw * 4), *d_bias = dev_copy(bias, OC * 4);
    float *d_dout = dev_copy(dout, no * 4), *d_dx = dev_copy(dx, nx * 4), *d_dw = dev_copy(dw, nw * 4);
    float *d_db = dev_copy(db, OC * 4), *d_out = gpu->alloc(no * 4);
    if (!add) {   // written: what was there must not count
        memset(dx0, 0, nx * 4);
        for (size_t i = 0; i < nx; i++) dx[i] = NAN;
        gpu->from_host(d_dx, dx, nx * 4);
    }
    assert_int_equal(gpu->set_precision(MP_PRECISION_BF16), MP_PRECISION_FP32);
    gpu->matmul_forward(d_out, d_x, NULL, d_w, NULL, with_bias ? d_bias : NULL, N, C, OC);
    gpu->matmul_backward(d_dx, d_dw, with_bias ? d_db : NULL, d_dout, NULL, d_x, NULL, d_w, NULL, N, C, OC, add);
    assert_int_equal(gpu->set_precision(MP_PRECISION_FP32), MP_PRECISION_BF16);
    cpu->matmul_forward(out, x, NULL, w, NULL, with_bias ? bias : NULL, N, C, OC);
    cpu->matmul_backward(dx, dw, with_bias ? db : NULL, dout, NULL, x, NULL, w, NULL, N, C, OC, add);
    size_t big = no > nx ? (no > nw ? no : nw) : (nx > nw ? nx : nw);
    double *ref = malloc(big * sizeof(double)), *S = malloc(big * sizeof(double));
    double *want = malloc(big * sizeof(double));
    char what[96];
    for (int exact = 0; exact < 2; exact++) {   // 0: the CPU op, 1: the rounded operands' GEMM
        float (*rnd)(float) = exact ? host_bf16 : NULL;
        double u = exact ? 0.0 : U_BF16;
        const char *vs = exact ? "vs the bf16 operands' GEMM" : "vs the CPU";
        gemm_ref(ref, S, 0, 1, N, OC, C, x, C, w, C, NULL, rnd);   // out = x w^T (+ bias)
        for (size_t i = 0; i < no; i++) {
            double b = with_bias ? bias[i % OC] : 0.0;
            want[i] = exact ? ref[i] + b : out[i];
            S[i] += fabs(b);
        }
        snprintf(what, sizeof what, "bf16 matmul (%d, %d, %d) out %s", N, C, OC, vs);
        expect_bound(what, d_out, N, OC, OC, want, S, C, u);
        gemm_ref(ref, S, 0, 0, N, C, OC, dout, OC, w, C, dx0, rnd);   // dx0 + dout w
        for (size_t i = 0; i < nx; i++) want[i] = exact ? ref[i] : dx[i];
        snprintf(what, sizeof what, "bf16 matmul (%d, %d, %d) dinp %s", N, C, OC, vs);
        expect_bound(what, d_dx, N, C, C, want, S, OC, u);
        gemm_ref(ref, S, 1, 0, OC, C, N, dout, OC, x, C, dw0, rnd);   // dw0 + dout^T x
        for (size_t i = 0; i < nw; i++) want[i] = exact ? ref[i] : dw[i];
        snprintf(what, sizeof what, "bf16 matmul (%d, %d, %d) dw %s", N, C, OC, vs);
        expect_bound(what, d_dw, OC, C, C, want, S, N, u);
    }
    if (with_bias) {   // db0 + column sums of dout, fp32: the sums' bound
        float *ones = malloc(N * sizeof(float));
        for (int i = 0; i < N; i++) ones[i] = 1.0f;
        gemm_ref(ref, S, 1, 0, OC, 1, N, dout, OC, ones, 1, db0, NULL);
        double *dbw = to_double(db, OC);
        snprintf(what, sizeof what, "bf16 matmul (%d, %d, %d) dbias", N, C, OC);
        expect_bound(what, d_db, 1, OC, OC, dbw, S, N, 0.0);
        free(ones); free(dbw);
    }
    void *dev[] = {d_x, d_w, d_bias, d_dout, d_dx, d_dw, d_db, d_out};
    for (size_t i = 0; i < 8; i++) gpu->free(dev[i]);
    void *host[] = {x, w, bias, dout, dx, dw, db, out, dx0, dw0, db0, ref, S, want};
    for (size_t i = 0; i < 14; i++) free(host[i]);
}

static void test_matmul_bf16(void **state) {
    (void)state;
    check_matmul_bf16(33, 45, 29, 1, 1);
    check_matmul_bf16(7, 64, 130, 0, 0);
    check_matmul_bf16(200, 3, 1, 1, 0);
}

// ---------------------------------------------------------------------------------------
// bf16 twins (backend.h, system.precision = bf16): an op given a twin writes the same fp32
// output as without one, bit for bit, and in every element of the twin that output rounded
// to nearest even (round_bits, from the definition); matmul reading twins gives what it
// gives rounding the operands itself, bit for bit, since the GEMMs see the same bits. The
// twins start as a NaN pattern, so an element left unwritten fails.

#define TWIN_NAN 0x7fc1u

static uint16_t *twin_alloc(size_t n) {
    uint16_t *h = malloc((n ? n : 1) * sizeof(uint16_t));
    for (size_t i = 0; i < n; i++) h[i] = TWIN_NAN;
    uint16_t *d = dev_copy(h, n * sizeof(uint16_t));
    free(h);
    return d;
}

static uint16_t bf16_bits(float f) {
    float r = host_bf16(f);
    uint32_t u;
    memcpy(&u, &r, 4);
    return (uint16_t)(u >> 16);
}

// d_got (n floats) equals d_want bit for bit (d_want NULL: not compared), and d_twin holds
// the rounding of d_got
static void expect_twin(const char *what, const float *d_got, const float *d_want,
                        const uint16_t *d_twin, size_t n) {
    float *got = host_copy(d_got, n * 4);
    if (d_want) {
        float *want = host_copy(d_want, n * 4);
        for (size_t i = 0; i < n; i++)
            if (memcmp(got + i, want + i, 4))
                fail_msg("%s: the fp32 output at %zu is %.9g with a twin, %.9g without", what, i,
                         got[i], want[i]);
        free(want);
    }
    uint16_t *tw = host_copy(d_twin, n * sizeof(uint16_t));
    for (size_t i = 0; i < n; i++)
        if (tw[i] != bf16_bits(got[i]))
            fail_msg("%s: twin at %zu is 0x%04x, the output %.9g rounds to 0x%04x", what, i,
                     (unsigned)tw[i], got[i], (unsigned)bf16_bits(got[i]));
    free(got);
    free(tw);
}

static void expect_same_bits(const char *what, const float *d_got, const float *d_want, size_t n) {
    float *got = host_copy(d_got, n * 4), *want = host_copy(d_want, n * 4);
    for (size_t i = 0; i < n; i++)
        if (memcmp(got + i, want + i, 4))
            fail_msg("%s at %zu: %.9g, want %.9g bit for bit", what, i, got[i], want[i]);
    free(got); free(want);
}

static float *dev_rand(size_t n, float lo, float hi) {
    float *h = frand(n, lo, hi), *d = dev_copy(h, n * 4);
    free(h);
    return d;
}

// The residual add fused with the LayerNorm after it, against residual_forward then
// layernorm_forward on the same backend, bit for bit in every output: with the fp32 output
// and the twin, the fp32 output alone, the twin alone, and res aliasing a. Outputs start as
// NaN, so one left unwritten fails. Against the CPU's fused op: res bit for bit, the rest
// within TOL (its LayerNorm sums in another order: test_layernorm). C = 70: lanes of 2 and 3
// columns; 768: GPT-2's.
static void check_residual_layernorm(int N, int C) {
    size_t NC = (size_t)N * C;
    float *ha = frand(NC, -2, 3), *hb = frand(NC, -1, 1), *hw = frand(C, 0.5, 1.5);
    float *hbias = frand(C, -1, 1), *nan = frand(NC, NAN, NAN);
    float *a = dev_copy(ha, NC * 4), *b = dev_copy(hb, NC * 4), *w = dev_copy(hw, C * 4);
    float *bias = dev_copy(hbias, C * 4);
    float *res_ref = gpu->alloc(NC * 4), *out_ref = gpu->alloc(NC * 4);
    float *st_ref = gpu->alloc(2 * N * 4);
    uint16_t *tw_ref = twin_alloc(NC);
    gpu->residual_forward(res_ref, a, b, (long)NC);
    gpu->layernorm_forward(out_ref, tw_ref, st_ref, st_ref + N, res_ref, w, bias, N, C);
    uint16_t *want_tw = host_copy(tw_ref, NC * 2);
    for (int mode = 0; mode < 4; mode++) {   // out and twin, out, twin, out with res = a
        float *res = dev_copy(mode == 3 ? ha : nan, NC * 4), *out = NULL;
        float *st = dev_copy(nan, 2 * N * 4);
        uint16_t *tw = mode == 0 || mode == 2 ? twin_alloc(NC) : NULL;
        if (mode != 2) out = dev_copy(nan, NC * 4);
        gpu->residual_layernorm_forward(res, out, tw, st, st + N, mode == 3 ? res : a, b, w, bias,
                                        N, C);
        char what[80];
        snprintf(what, sizeof what, "residual_layernorm_forward res (mode %d)", mode);
        expect_same_bits(what, res, res_ref, NC);
        snprintf(what, sizeof what, "residual_layernorm_forward out (mode %d)", mode);
        if (out) expect_same_bits(what, out, out_ref, NC);
        if (tw) {
            uint16_t *got = host_copy(tw, NC * 2);
            for (size_t i = 0; i < NC; i++)
                if (got[i] != want_tw[i])
                    fail_msg("residual_layernorm_forward twin at %zu (mode %d): 0x%04x, "
                             "want 0x%04x", i, mode, (unsigned)got[i], (unsigned)want_tw[i]);
            free(got);
            gpu->free(tw);
        }
        snprintf(what, sizeof what, "residual_layernorm_forward mean, rstd (mode %d)", mode);
        expect_same_bits(what, st, st_ref, 2 * (size_t)N);
        gpu->free(res);
        gpu->free(out);
        gpu->free(st);
    }
    float *res = frand(NC, 0, 0), *out = frand(NC, 0, 0), *st = frand(2 * (size_t)N, 0, 0);
    cpu->residual_layernorm_forward(res, out, NULL, st, st + N, ha, hb, hw, hbias, N, C);
    float *got_res = host_copy(res_ref, NC * 4);   // one rounded add: the same on both
    if (memcmp(got_res, res, NC * 4))
        fail_msg("residual_layernorm_forward res: not the CPU's bits");
    free(got_res);
    expect_dev("residual_layernorm_forward out (CPU)", out_ref, out, NC);
    expect_dev("residual_layernorm_forward mean, rstd (CPU)", st_ref, st, 2 * (size_t)N);
    void *dev[] = {a, b, w, bias, res_ref, out_ref, st_ref, tw_ref};
    for (size_t i = 0; i < 8; i++) gpu->free(dev[i]);
    void *host[] = {ha, hb, hw, hbias, nan, want_tw, res, out, st};
    for (size_t i = 0; i < 9; i++) free(host[i]);
}

static void test_residual_layernorm(void **state) {
    (void)state;
    check_residual_layernorm(19, 70);
    check_residual_layernorm(9, 768);
}

static void test_bf16_twins_elementwise(void **state) {
    (void)state;
    int N = 19, C = 70;
    size_t NC = (size_t)N * C;
    float *x = dev_rand(NC, -2, 3), *w = dev_rand(C, 0.5, 1.5), *b = dev_rand(C, -1, 1);
    float *out = gpu->alloc(NC * 4), *ref = gpu->alloc(NC * 4), *st = gpu->alloc(4 * N * 4);
    uint16_t *tw = twin_alloc(NC);
    gpu->layernorm_forward(ref, NULL, st, st + N, x, w, b, N, C);
    gpu->layernorm_forward(out, tw, st + 2 * N, st + 3 * N, x, w, b, N, C);
    expect_twin("layernorm_forward", out, ref, tw, NC);
    expect_same_bits("layernorm_forward mean, rstd", st + 2 * N, st, 2 * N);
    uint16_t *tw9 = twin_alloc(NC);   // bf16 mode's LayerNorm before a GEMM: the twin alone
    gpu->zero(st + 2 * N, 2 * N * sizeof(float));   // mean, rstd written again
    gpu->layernorm_forward(NULL, tw9, st + 2 * N, st + 3 * N, x, w, b, N, C);
    expect_twin("layernorm_forward, twin alone", ref, NULL, tw9, NC);
    expect_same_bits("layernorm_forward mean, rstd (twin alone)", st + 2 * N, st, 2 * N);
    gpu->free(tw9);
    // backward adds into dinp: the twin is the sum's rounding
    float *dout = dev_rand(NC, -1, 1), *dx0 = frand(NC, -1, 1);
    float *dx = dev_copy(dx0, NC * 4), *dxr = dev_copy(dx0, NC * 4);
    float *dw = gpu->alloc(C * 4), *db = gpu->alloc(C * 4);
    uint16_t *tw2 = twin_alloc(NC);
    gpu->layernorm_backward(dxr, NULL, dw, db, dout, x, w, st, st + N, N, C);
    gpu->layernorm_backward(dx, tw2, dw, db, dout, x, w, st, st + N, N, C);
    expect_twin("layernorm_backward", dx, dxr, tw2, NC);
    // GELU, both ways, n not a multiple of the block
    long n = 1001;
    float *gx = dev_rand(n, -4, 4), *gy = dev_rand(n, -1, 1);
    float *go = gpu->alloc(n * 4), *gr = gpu->alloc(n * 4);
    uint16_t *tw3 = twin_alloc(n), *tw4 = twin_alloc(n);
    gpu->gelu_forward(gr, NULL, gx, n);
    gpu->gelu_forward(go, tw3, gx, n);
    expect_twin("gelu_forward", go, gr, tw3, n);
    uint16_t *tw10 = twin_alloc(n);
    gpu->gelu_forward(NULL, tw10, gx, n);   // bf16 mode's: the twin alone
    expect_twin("gelu_forward, twin alone", gr, NULL, tw10, n);
    gpu->free(tw10);
    gpu->gelu_backward(gr, NULL, NULL, gx, gy, 7, 143);
    gpu->gelu_backward(go, tw4, NULL, gx, gy, 7, 143);
    expect_twin("gelu_backward", go, gr, tw4, n);
    float *nans = frand(n, NAN, NAN);   // dinp written over NaN
    float *gb = gpu->alloc(143 * 4), *gn = dev_copy(nans, n * 4);
    uint16_t *tw7 = twin_alloc(n), *tw8 = twin_alloc(n);
    free(nans);
    gpu->gelu_backward(gn, tw7, gb, gx, gy, 7, 143);   // the kernel that also sums columns
    expect_twin("gelu_backward with dbias", gn, gr, tw7, n);
    gpu->gelu_backward(NULL, tw8, gb, gx, gy, 7, 143);   // bf16 mode's: the twin alone
    expect_twin("gelu_backward with dbias, twin alone", gr, NULL, tw8, n);
    gpu->free(gb);
    gpu->free(gn);
    gpu->free(tw7);
    gpu->free(tw8);
    // cross-entropy backward: fp32 and twin together, and the twin alone (bf16 mode's LM head)
    int Nc = 7, V = 300;
    size_t nv = (size_t)Nc * V;
    float *logits = dev_rand(nv, -5, 5), *stats = gpu->alloc(2 * Nc * 4), *losses = gpu->alloc(Nc * 4);
    int32_t tg[7];
    for (int i = 0; i < Nc; i++) tg[i] = (int32_t)(mp_hash3(5, 6, i) % V);
    int32_t *d_tg = dev_copy(tg, sizeof tg);
    gpu->crossentropy_forward(losses, stats, logits, d_tg, Nc, V);
    float *dl = gpu->alloc(nv * 4), *dlr = gpu->alloc(nv * 4);
    uint16_t *tw5 = twin_alloc(nv), *tw6 = twin_alloc(nv);
    gpu->crossentropy_backward(dlr, NULL, logits, stats, d_tg, 0.37f, Nc, V);
    gpu->crossentropy_backward(dl, tw5, logits, stats, d_tg, 0.37f, Nc, V);
    expect_twin("crossentropy_backward", dl, dlr, tw5, nv);
    gpu->crossentropy_backward(NULL, tw6, logits, stats, d_tg, 0.37f, Nc, V);
    expect_twin("crossentropy_backward (twin only)", dlr, NULL, tw6, nv);
    void *dev[] = {x, w, b, out, ref, st, tw, dout, dx, dxr, dw, db, tw2, gx, gy, go, gr, tw3, tw4,
                   logits, stats, losses, d_tg, dl, dlr, tw5, tw6};
    for (size_t i = 0; i < sizeof dev / sizeof dev[0]; i++) gpu->free(dev[i]);
    free(dx0);
}

// The column-sum scratch (the backend's grow-only SCR_COLSUM) filled with nblk rows of M NaN
// partials, through matmul_backward's bias sum over a NaN (nblk * 64, M) input: an op that
// then leaves a partial of that many unwritten gives NaN sums, instead of reading what an
// earlier column sum of the same shape left there (the same bits, by construction)
static void poison_colsum(int nblk, int M) {
    size_t n = (size_t)nblk * 64 * M;
    float *nan = frand(n, NAN, NAN), *d = dev_copy(nan, n * 4), *junk = gpu->alloc((size_t)M * 4);
    gpu->matmul_backward(NULL, NULL, junk, d, NULL, NULL, NULL, NULL, NULL, nblk * 64, 1, M, 0);
    gpu->free(d);
    gpu->free(junk);
    free(nan);
}

// attention in bf16 mode (the tensor-core kernels store the twins) and in fp32 mode (a
// rounding pass after the kernels): T past one 64-row tile, head size not a multiple of 16
static void check_attention_twins(int precision, int B, int T, int NH, int hs) {
    int C = NH * hs;
    size_t n3 = (size_t)B * T * 3 * C, n1 = (size_t)B * T * C;
    size_t ns = gpu->attention_state_floats(B, T, C, NH);
    float *qkv = dev_rand(n3, -1, 1), *dout = dev_rand(n1, -1, 1);
    float *out = gpu->alloc(n1 * 4), *ref = gpu->alloc(n1 * 4);
    float *att = gpu->alloc(ns * 4), *att2 = gpu->alloc(ns * 4);
    float *dq = gpu->alloc(n3 * 4), *dqr = gpu->alloc(n3 * 4);
    uint16_t *tw = twin_alloc(n1), *tw2 = twin_alloc(n3);
    char what[96];
    int old = gpu->set_precision(precision);
    gpu->attention_forward(ref, NULL, att, qkv, B, T, C, NH);
    gpu->attention_forward(out, tw, att2, qkv, B, T, C, NH);
    snprintf(what, sizeof what, "attention_forward (%s, T %d, hs %d)",
             precision == MP_PRECISION_BF16 ? "bf16" : "fp32", T, hs);
    expect_twin(what, out, ref, tw, n1);
    expect_same_bits(what, att2, att, ns);
    gpu->attention_backward(dqr, NULL, NULL, dout, qkv, ref, att, B, T, C, NH);
    gpu->attention_backward(dq, tw2, NULL, dout, qkv, ref, att, B, T, C, NH);
    snprintf(what, sizeof what, "attention_backward (%s, T %d, NULL, hs %d)",
             precision == MP_PRECISION_BF16 ? "bf16" : "fp32", T, hs);
    expect_twin(what, dq, dqr, tw2, n3);
    // qkv's bias gradient formed in the same pass (backend.h): matmul_backward's column sum
    // of the same dqkv bit for bit where the kernels' row blocks are its (fp32 mode sums
    // dqkv after the kernels; bf16's blocks match when T is a multiple of 64), else within
    // the bound of two summation orders; dqkv itself unchanged by it; and in bf16 mode with
    // dqkv NULL (the twin alone) the same twin and the same bits again
    size_t nb = (size_t)3 * C;
    float *db0 = frand(nb, -1, 1);
    float *dbr = dev_copy(db0, nb * 4), *db1 = dev_copy(db0, nb * 4), *db2 = dev_copy(db0, nb * 4);
    float *dq3 = gpu->alloc(n3 * 4);
    uint16_t *tw3 = twin_alloc(n3);
    gpu->matmul_backward(NULL, NULL, dbr, dqr, NULL, NULL, NULL, NULL, NULL, B * T, 1, 3 * C, 0);
    int nblk = B * ((T + 63) / 64);   // the tensor-core kernels' partial rows
    poison_colsum(nblk, 3 * C);
    gpu->attention_backward(dq3, NULL, db1, dout, qkv, ref, att, B, T, C, NH);
    snprintf(what, sizeof what, "attention_backward with dbias (%s, T %d, hs %d)",
             precision == MP_PRECISION_BF16 ? "bf16" : "fp32", T, hs);
    expect_same_bits(what, dq3, dqr, n3);
    if (precision == MP_PRECISION_FP32 || T % 64 == 0) {
        expect_same_bits(what, db1, dbr, nb);
    } else {
        float *hq = host_copy(dqr, n3 * 4), *hb = host_copy(db1, nb * 4);
        expect_colsum(what, hb, db0, hq, B * T, 3 * C);
        free(hq);
        free(hb);
    }
    if (precision == MP_PRECISION_BF16) {
        poison_colsum(nblk, 3 * C);
        gpu->attention_backward(NULL, tw3, db2, dout, qkv, ref, att, B, T, C, NH);
        snprintf(what, sizeof what, "attention_backward, twin alone (T %d, hs %d)", T, hs);
        expect_twin(what, dqr, NULL, tw3, n3);
        expect_same_bits(what, db2, db1, nb);
    }
    free(db0);
    gpu->set_precision(old);
    void *dev[] = {qkv, dout, out, ref, att, att2, dq, dqr, tw, tw2, dbr, db1, db2, dq3, tw3};
    for (size_t i = 0; i < sizeof dev / sizeof dev[0]; i++) gpu->free(dev[i]);
}

static void test_bf16_twins_attention(void **state) {
    (void)state;
    check_attention_twins(MP_PRECISION_BF16, 2, 70, 3, 24);
    check_attention_twins(MP_PRECISION_BF16, 1, 33, 2, 64);
    check_attention_twins(MP_PRECISION_BF16, 2, 128, 2, 32);   // dbias's blocks are colsum's
    check_attention_twins(MP_PRECISION_BF16, 1, 64, 2, 16);    // the narrowest kernels
    check_attention_twins(MP_PRECISION_BF16, 1, 64, 1, 128);   // the widest
    check_attention_twins(MP_PRECISION_FP32, 2, 70, 3, 24);
}

// matmul in bf16 mode: with the twins of inp and dout (to_bf16 of them) it gives out, dinp
// and dw bit for bit as without; with inp NULL (forward) or dout NULL (backward without
// dbias) likewise, and with w NULL beside its bf16 copy (the model's dense weights). (dbias
// is an fp32 column sum of dout either way.)
static void check_matmul_twins(int N, int C, int OC, int with_bias) {
    size_t nx = (size_t)N * C, nw = (size_t)OC * C, no = (size_t)N * OC;
    float *x = dev_rand(nx, -1, 1), *w = dev_rand(nw, -1, 1), *bias = dev_rand(OC, -1, 1);
    float *dout = dev_rand(no, -1, 1), *b = with_bias ? bias : NULL;
    uint16_t *xb = gpu->alloc(nx * 2), *doutb = gpu->alloc(no * 2), *wb = gpu->alloc(nw * 2);
    gpu->to_bf16(xb, x, nx);
    gpu->to_bf16(doutb, dout, no);
    gpu->to_bf16(wb, w, nw);   // the model's copy of a dense weight
    float *o[3], *dx[3], *dw[3], *db[3];
    float *dw0 = frand(nw, -1, 1), *db0 = frand(OC, -1, 1);
    for (int k = 0; k < 3; k++) {
        o[k] = gpu->alloc(no * 4);
        dx[k] = gpu->alloc(nx * 4);
        dw[k] = dev_copy(dw0, nw * 4);
        db[k] = dev_copy(db0, OC * 4);
    }
    int old = gpu->set_precision(MP_PRECISION_BF16);
    gpu->matmul_forward(o[0], x, NULL, w, NULL, b, N, C, OC);
    gpu->matmul_forward(o[1], x, xb, w, NULL, b, N, C, OC);
    gpu->matmul_forward(o[2], NULL, xb, NULL, wb, b, N, C, OC);
    gpu->matmul_backward(dx[0], dw[0], b ? db[0] : NULL, dout, NULL, x, NULL, w, NULL, N, C, OC, 0);
    gpu->matmul_backward(dx[1], dw[1], b ? db[1] : NULL, dout, doutb, x, xb, w, NULL, N, C, OC, 0);
    gpu->matmul_backward(dx[2], dw[2], NULL, NULL, doutb, NULL, xb, NULL, wb, N, C, OC, 0);
    gpu->set_precision(old);
    char what[96];
    for (int k = 1; k < 3; k++) {
        const char *how = k == 1 ? "twins" : "twins and the weight's copy alone";
        snprintf(what, sizeof what, "bf16 matmul (%d, %d, %d) out, %s", N, C, OC, how);
        expect_same_bits(what, o[k], o[0], no);
        snprintf(what, sizeof what, "bf16 matmul (%d, %d, %d) dinp, %s", N, C, OC, how);
        expect_same_bits(what, dx[k], dx[0], nx);
        snprintf(what, sizeof what, "bf16 matmul (%d, %d, %d) dw, %s", N, C, OC, how);
        expect_same_bits(what, dw[k], dw[0], nw);
    }
    for (int k = 0; k < 3; k++) {
        gpu->free(o[k]); gpu->free(dx[k]); gpu->free(dw[k]); gpu->free(db[k]);
    }
    void *dev[] = {x, w, bias, dout, xb, doutb, wb};
    for (size_t i = 0; i < sizeof dev / sizeof dev[0]; i++) gpu->free(dev[i]);
    free(dw0); free(db0);
}

static void test_bf16_twins_matmul(void **state) {
    (void)state;
    check_matmul_twins(33, 45, 29, 1);
    check_matmul_twins(7, 64, 130, 0);
}

#ifdef MP_HAVE_CUDA
// One GEMM of each arithmetic through the backend's wrappers, both transposes and leading
// dimensions beyond the row (the bf16 rounding kernel's strided path): fp32 within the sums'
// bound, bf16 within the operand rounding's and within the sums' bound of the exact GEMM of
// the rounded operands.
static void check_gemm(int ta, int tb, int M, int N, int K) {
    int ar = ta ? K : M, ac = ta ? M : K, br = tb ? N : K, bc = tb ? K : N;
    int lda = ac + 3, ldb = bc + 1, ldc = N + 2;
    float *A = frand((size_t)ar * lda, -1, 1), *B = frand((size_t)br * ldb, -1, 1);
    float *C0 = frand((size_t)M * N, -1, 1), *Cpad = frand((size_t)M * ldc, -1, 1);
    for (int i = 0; i < M; i++) memcpy(Cpad + (size_t)i * ldc, C0 + (size_t)i * N, N * sizeof(float));
    float *d_A = dev_copy(A, (size_t)ar * lda * 4), *d_B = dev_copy(B, (size_t)br * ldb * 4);
    double *ref = malloc((size_t)M * N * sizeof(double)), *S = malloc((size_t)M * N * sizeof(double));
    const char *names[2] = {"fp32", "bf16"};
    const double us[2] = {0.0, U_BF16};
    char what[96];
    for (int math = MP_CUDA_GEMM_TEST_FP32; math <= MP_CUDA_GEMM_TEST_BF16; math++)
        for (int exact = 0; exact < (math == MP_CUDA_GEMM_TEST_BF16 ? 2 : 1); exact++) {
            float *d_C = dev_copy(Cpad, (size_t)M * ldc * 4);
            // C = 1 op(A) op(B) + 1 C0: beta reads C (alpha, beta 1: exact scalings)
            mp_cuda_gemm_test(math, ta, tb, M, N, K, 1.0f, d_A, lda, d_B, ldb, 1.0f, d_C, ldc);
            gemm_ref(ref, S, ta, tb, M, N, K, A, lda, B, ldb, C0, exact ? host_bf16 : NULL);
            snprintf(what, sizeof what, "%s gemm ta %d tb %d (%d, %d, %d)%s", names[math], ta, tb,
                     M, N, K, exact ? " vs the bf16 operands' GEMM" : "");
            expect_bound(what, d_C, M, N, ldc, ref, S, K, exact ? 0.0 : us[math]);
            gpu->free(d_C);
        }
    gpu->free(d_A); gpu->free(d_B);
    free(A); free(B); free(C0); free(Cpad); free(ref); free(S);
}

#endif

static void test_gemm_precision(void **state) {
    (void)state;
#ifdef MP_HAVE_CUDA
    for (int ta = 0; ta < 2; ta++)
        for (int tb = 0; tb < 2; tb++) check_gemm(ta, tb, 19, 23, 70);
    check_gemm(0, 1, 5, 3, 1);
#endif
}

// Attention against the CPU at one shape; head size hs = C / NH.
//
// Tolerance, from the arithmetic (u = 2^-24). Both backends are fp32; they differ in
// summation order, FMA contraction and how the softmax is formed: the CPU normalises each
// score row with its maximum over all keys, the CUDA kernels use an online softmax over key
// tiles of 32 (the running sum and output rescaled by exp(m_old - m_new) up to T/32 times)
// and the backward recomputes P = exp(S - L) from the log-sum-exp L rather than reading it.
// Per element each result is within K u of the exact one relative to the sum of the
// absolute values of its terms (recursive summation, Higham), K the roundings on the
// longest chain:
// - a score is a dot product of hs terms, |q|, |k| <= 1 here, times 1/sqrt(hs): its
//   absolute error is <= hs u * hs / sqrt(hs) = hs^1.5 u, which is also the relative
//   error it gives p = exp(s - L) (and the same holds for dP = dO . v and D = dO . out,
//   relative to their sums of |terms| <= hs);
// - then sums over <= T keys or queries, <= T / 32 rescalings and a few ulps for exp, log
//   and the division (16 below).
// Every term here is O(1) (inputs in [-1, 1]) and the outputs are averages or sums of them
// that cancel at most to the inputs' scale over sqrt(T) or so: so the relative error of
// the whole tensor is bounded by 2 (two backends) * (hs^1.5 + 2 T + T / 32 + 16) u times a
// factor for that cancellation, 4 below (so tol = 8 (...) u: 3.3e-4 at T = 150, hs = 64; a
// wrong mask, a skipped key tile, a lost rescaling or a missed element (NaN) give errors of
// 1e-2..1).
// It is never below TOL, the file's general tolerance.
//
// The state is not compared: the CPU's is the (B,NH,T,T) probabilities, the CUDA one the
// (B,NH,T) log-sum-exp of each score row, each sized by its own attention_state_floats.
static void check_attention(int B, int T, int NH, int hs) {
    int C = NH * hs;
    size_t nq = (size_t)B * T * 3 * C, no = (size_t)B * T * C;
    size_t na = cpu->attention_state_floats(B, T, C, NH);
    size_t ng = gpu->attention_state_floats(B, T, C, NH);
    assert_true(na == (size_t)B * NH * T * T);
    assert_true(ng == (size_t)B * NH * T);
    double tol = 8.0 * (pow(hs, 1.5) + 2.0 * T + T / 32.0 + 16.0) * 0x1p-24;
    g_tol = tol > TOL ? tol : TOL;
    double worst = 0.0;
    g_track = &worst;
    char what[96];
    float *qkv = frand(nq, -1, 1), *out = frand(no, 0, 0), *att = frand(na, 0, 0);
    cpu->attention_forward(out, NULL, att, qkv, B, T, C, NH);
    float *d_qkv = dev_copy(qkv, nq * 4), *d_out = gpu->alloc(no * 4), *d_att = gpu->alloc(ng * 4);
    gpu->attention_forward(d_out, NULL, d_att, d_qkv, B, T, C, NH);
    snprintf(what, sizeof what, "attention B %d T %d NH %d hs %d: out", B, T, NH, hs);
    expect_dev(what, d_out, out, no);
    // dqkv is written: NaN before on both sides, so an element added to or left out shows
    float *dout = frand(no, -1, 1), *dqkv = frand(nq, 0, 0);
    for (size_t i = 0; i < nq; i++) dqkv[i] = NAN;
    float *d_dout = dev_copy(dout, no * 4), *d_dqkv = dev_copy(dqkv, nq * 4);
    // with qkv's bias gradient: each backend's against the column sums of its own dqkv
    float *db0 = frand((size_t)3 * C, -1, 1), *db = malloc((size_t)3 * C * 4);
    float *d_db = dev_copy(db0, (size_t)3 * C * 4);
    memcpy(db, db0, (size_t)3 * C * 4);
    cpu->attention_backward(dqkv, NULL, db, dout, qkv, out, att, B, T, C, NH);
    gpu->attention_backward(d_dqkv, NULL, d_db, d_dout, d_qkv, d_out, d_att, B, T, C, NH);
    float *got = host_copy(d_dqkv, nq * 4), *g = malloc(no * 4), *w = malloc(no * 4);
    float *gdb = host_copy(d_db, (size_t)3 * C * 4);
    snprintf(what, sizeof what, "attention B %d T %d NH %d hs %d: dbias", B, T, NH, hs);
    expect_colsum(what, db, db0, dqkv, B * T, 3 * C);
    expect_colsum(what, gdb, db0, got, B * T, 3 * C);
    free(db0); free(db); free(gdb);
    gpu->free(d_db);
    // dq, dk and dv compared one by one: their scales differ
    const char *part[3] = {"dq", "dk", "dv"};
    for (int p = 0; p < 3; p++) {
        for (size_t r = 0; r < (size_t)B * T; r++) {
            memcpy(g + r * C, got + r * 3 * C + p * C, (size_t)C * 4);
            memcpy(w + r * C, dqkv + r * 3 * C + p * C, (size_t)C * 4);
        }
        snprintf(what, sizeof what, "attention B %d T %d NH %d hs %d: %s", B, T, NH, hs, part[p]);
        expect_close(what, g, w, no, g_tol);
    }
    g_track = &g_worst;
    if (worst > g_worst) g_worst = worst;
    printf("attention B %d T %d NH %d hs %d: largest relative error %.2g (tolerance %.2g)\n", B,
           T, NH, hs, worst, g_tol);
    void *dev[] = {d_qkv, d_out, d_att, d_dout, d_dqkv};
    for (size_t i = 0; i < 5; i++) gpu->free(dev[i]);
    free(qkv); free(out); free(att); free(dout); free(dqkv); free(got); free(g); free(w);
}

// shapes: T below one tile, T = 150 over three 64-row tiles (the last partial) and five
// 32-key tiles; hs 64 (GPT-2), a small odd hs, hs 128 (the largest) and one between the
// kernels' instantiations (37 runs the 64-wide one)
static void test_attention(void **state) {
    (void)state;
    check_attention(2, 13, 3, 8);
    check_attention(2, 5, 3, 64);
    check_attention(2, 150, 3, 64);
    check_attention(2, 150, 3, 5);
    check_attention(1, 70, 1, 128);
    check_attention(1, 33, 2, 37);
}

// Attention in bf16 mode (tensor cores, ops_attention_tc.cu) element by element against a
// host reference in double computed from the bf16-rounded q, k, v and dO (the values the
// kernels multiply), within bounds built from the arithmetic, per element, to first order
// (u = U_BF16 for a rounding to bf16, U_SUM per fp32 addition; every product of two bf16
// values is exact in fp32):
// - a score s = scale sum_d q k errs by at most eS = (hs + 4) U_SUM max_c sigma_rc, sigma
//   the scaled sum of |q k|; the softmax weights p_c / l then err relatively by at most
//   dW = 3 eS + (T + 8) U_SUM (2 eS from the scores in numerator and normaliser, exp, the
//   running sum and its T/64 rescalings in the rest). The backward's P = exp(s - L) errs by
//   the same, L carrying the forward's error.
// - out: P is rounded to bf16 for P V (u) and the sums add (T + 2) U_SUM, each relative to
//   sum_c P |v|.
// - dV = P^T dO: as out, relative to sum_r P |dO|.
// - dS = P (dP - D) scale, rounded to bf16 (u |dS|): P's dW relative to P |dP - D|; dP's
//   (hs + 2) U_SUM relative to sum |dO v|; D = dO . out (fp32, from the unrounded dO and the
//   kernel's out) errs by sum_d |dO| ((u + (hs + 2) U_SUM) |out| + the out bound).
// - dK = dS^T q, dQ = dS k: each dS's bound times |q| or |k|, plus (T + 2) U_SUM sum |dS q|.
//   dqkv is written (the finished sum, no further rounding): NaN before, so an element
//   added to or left out fails.
// Second-order terms are below 2^-6 of these (every relative error here is below 2^-6), so
// the bounds are taken 1.25 times. A wrong mask, a lost rescaling or a missing tile breaks
// them (checked by breaking the kernels on purpose). Smaller terms are left to the slack in
// U_SUM (4 x 2^-24 per operation): the three roundings of p (dp - D) scale and the error of
// the rescaling factor exp(m_old - m_new).
typedef struct {
    int B, T, NH, hs, C;
    const float *qkv, *dout;
} att_case;

static float att_in(const att_case *a, int b, int t, int part, int h, int d) {
    return host_bf16(a->qkv[((size_t)b * a->T + t) * 3 * a->C + part * a->C + h * a->hs + d]);
}

static void check_attention_bf16(int B, int T, int NH, int hs) {
    int C = NH * hs;
    size_t nq = (size_t)B * T * 3 * C, no = (size_t)B * T * C;
    assert_int_equal(gpu->set_precision(MP_PRECISION_BF16), MP_PRECISION_FP32);
    float *qkv = frand(nq, -1, 1), *dout = frand(no, -1, 1), *nan = frand(nq, 0, 0);
    for (size_t i = 0; i < nq; i++) nan[i] = NAN;
    size_t ng = gpu->attention_state_floats(B, T, C, NH);
    float *d_qkv = dev_copy(qkv, nq * 4), *d_out = gpu->alloc(no * 4), *d_att = gpu->alloc(ng * 4);
    float *d_dout = dev_copy(dout, no * 4), *d_dqkv = dev_copy(nan, nq * 4);
    gpu->attention_forward(d_out, NULL, d_att, d_qkv, B, T, C, NH);
    gpu->attention_backward(d_dqkv, NULL, NULL, d_dout, d_qkv, d_out, d_att, B, T, C, NH);
    assert_int_equal(gpu->set_precision(MP_PRECISION_FP32), MP_PRECISION_BF16);
    float *out = host_copy(d_out, no * 4), *dqkv = host_copy(d_dqkv, nq * 4);
    att_case a = {B, T, NH, hs, C, qkv, dout};
    double scale = 1.0 / sqrt((double)hs), u = U_BF16, us = U_SUM, worst = 0.0;
    double *P = malloc((size_t)T * T * sizeof(double)), *dS = malloc((size_t)T * T * sizeof(double));
    double *E = malloc((size_t)T * T * sizeof(double)), *dW = malloc((size_t)T * sizeof(double));
    double *ob = malloc((size_t)T * hs * sizeof(double)), *oref = malloc((size_t)T * hs * sizeof(double));
    for (int b = 0; b < B; b++)
        for (int h = 0; h < NH; h++) {
            // forward: P, out and its bound
            for (int r = 0; r < T; r++) {
                double mx = -INFINITY, smax = 0.0, l = 0.0;
                for (int c = 0; c <= r; c++) {
                    double s = 0.0, sg = 0.0;
                    for (int d = 0; d < hs; d++) {
                        double t = (double)att_in(&a, b, r, 0, h, d) * att_in(&a, b, c, 1, h, d);
                        s += t;
                        sg += fabs(t);
                    }
                    P[(size_t)r * T + c] = s * scale;
                    if (s * scale > mx) mx = s * scale;
                    if (sg * scale > smax) smax = sg * scale;
                }
                for (int c = 0; c <= r; c++) l += exp(P[(size_t)r * T + c] - mx);
                for (int c = 0; c < T; c++)
                    P[(size_t)r * T + c] = c <= r ? exp(P[(size_t)r * T + c] - mx) / l : 0.0;
                dW[r] = 3.0 * (hs + 4) * us * smax + (T + 8) * us;
                for (int d = 0; d < hs; d++) {
                    double o = 0.0, sa = 0.0;
                    for (int c = 0; c <= r; c++) {
                        double v = att_in(&a, b, c, 2, h, d);
                        o += P[(size_t)r * T + c] * v;
                        sa += P[(size_t)r * T + c] * fabs(v);
                    }
                    oref[(size_t)r * hs + d] = o;
                    ob[(size_t)r * hs + d] = (dW[r] + u + (T + 2) * us) * sa;
                    double g = out[((size_t)b * T + r) * C + h * hs + d], e = fabs(g - o);
                    double bound = 1.25 * ob[(size_t)r * hs + d];
                    if (!(e <= bound))
                        fail_msg("bf16 attention B %d T %d NH %d hs %d: out [%d][%d][%d][%d] got "
                                 "%.9g, want %.9g: |error| %.3g > bound %.3g", B, T, NH, hs, b, r,
                                 h, d, g, o, e, bound);
                    if (e > worst * bound) worst = e / bound;
                }
            }
            // backward: dS and its bound E
            for (int r = 0; r < T; r++) {
                double D = 0.0, dD = 0.0;
                for (int d = 0; d < hs; d++) {
                    double go = fabs((double)host_bf16(dout[((size_t)b * T + r) * C + h * hs + d]));
                    D += (double)host_bf16(dout[((size_t)b * T + r) * C + h * hs + d]) * oref[(size_t)r * hs + d];
                    dD += go * ((u + (hs + 2) * us) * fabs(oref[(size_t)r * hs + d]) + 1.25 * ob[(size_t)r * hs + d]);
                }
                for (int c = 0; c < T; c++) {
                    double p = P[(size_t)r * T + c];
                    if (c > r) {
                        dS[(size_t)r * T + c] = E[(size_t)r * T + c] = 0.0;
                        continue;
                    }
                    double dp = 0.0, tau = 0.0;
                    for (int d = 0; d < hs; d++) {
                        double t = (double)host_bf16(dout[((size_t)b * T + r) * C + h * hs + d]) *
                                   att_in(&a, b, c, 2, h, d);
                        dp += t;
                        tau += fabs(t);
                    }
                    double ds = p * (dp - D) * scale;
                    dS[(size_t)r * T + c] = ds;
                    E[(size_t)r * T + c] = scale * ((dW[r] + 2 * us) * p * fabs(dp - D) +
                                                    p * ((hs + 2) * us * tau + dD)) + u * fabs(ds);
                }
            }
            // dq (part 0), dk (1), dv (2), each element against its bound
            for (int part = 0; part < 3; part++)
                for (int x = 0; x < T; x++)
                    for (int d = 0; d < hs; d++) {
                        size_t at = ((size_t)b * T + x) * 3 * C + part * C + h * hs + d;
                        double s = 0.0, err = 0.0, sa = 0.0;
                        for (int y = 0; y < T; y++) {
                            if (part == 0) {   // dQ_x = sum_c dS[x][c] k_c
                                double kk = att_in(&a, b, y, 1, h, d);
                                s += dS[(size_t)x * T + y] * kk;
                                err += E[(size_t)x * T + y] * fabs(kk);
                                sa += fabs(dS[(size_t)x * T + y] * kk);
                            } else if (part == 1) {   // dK_x = sum_r dS[r][x] q_r
                                double qq = att_in(&a, b, y, 0, h, d);
                                s += dS[(size_t)y * T + x] * qq;
                                err += E[(size_t)y * T + x] * fabs(qq);
                                sa += fabs(dS[(size_t)y * T + x] * qq);
                            } else {   // dV_x = sum_r P[r][x] dO_r
                                double g = host_bf16(dout[((size_t)b * T + y) * C + h * hs + d]);
                                double p = P[(size_t)y * T + x];
                                s += p * g;
                                err += (y >= x ? dW[y] + u : 0.0) * p * fabs(g);
                                sa += p * fabs(g);
                            }
                        }
                        double want = s;
                        double bound = 1.25 * (err + (T + 2) * us * sa);
                        double e = fabs(dqkv[at] - want);
                        if (!(e <= bound))
                            fail_msg("bf16 attention B %d T %d NH %d hs %d: %s [%d][%d][%d][%d] got "
                                     "%.9g, want %.9g: |error| %.3g > bound %.3g", B, T, NH, hs,
                                     part == 0 ? "dq" : part == 1 ? "dk" : "dv", b, x, h, d,
                                     dqkv[at], want, e, bound);
                        if (e > worst * bound) worst = e / bound;
                    }
        }
    printf("bf16 attention B %d T %d NH %d hs %d: largest error %.2f of its bound\n", B, T, NH,
           hs, worst);
    void *dev[] = {d_qkv, d_out, d_att, d_dout, d_dqkv};
    for (size_t i = 0; i < 5; i++) gpu->free(dev[i]);
    free(qkv); free(dout); free(nan); free(out); free(dqkv);
    free(P); free(dS); free(E); free(dW); free(ob); free(oref);
}

// the fp32 test's shapes in bf16 mode: 64-row tiles, so T = 150 has three of them, the last
// partial, and every instantiation (hs 5 and 8: 16 columns; 37 and 64: 64; 128)
static void test_attention_bf16(void **state) {
    (void)state;
    check_attention_bf16(2, 13, 3, 8);
    check_attention_bf16(2, 5, 3, 64);
    check_attention_bf16(2, 150, 3, 64);
    check_attention_bf16(2, 150, 3, 5);
    check_attention_bf16(1, 70, 1, 128);
    check_attention_bf16(1, 33, 2, 37);
    check_attention_bf16(1, 40, 2, 24);
}

// emu_large: GPT-2's context and head size (16 query tiles, 32 key tiles per head), and a
// head size the 128-wide kernels pad (96)
static void test_attention_large(void **state) {
    (void)state;
    check_attention(1, 1024, 2, 64);
    check_attention(2, 200, 2, 96);
    check_attention_bf16(1, 1024, 1, 64);
    check_attention_bf16(1, 200, 1, 96);
}

static void test_elementwise(void **state) {
    (void)state;
    long n = 1001;
    float *x = frand(n, -4, 4), *y = frand(n, -1, 1), *out = frand(n, 0, 0);
    float *d_x = dev_copy(x, n * 4), *d_y = dev_copy(y, n * 4), *d_out = gpu->alloc(n * 4);
    cpu->gelu_forward(out, NULL, x, n);
    gpu->gelu_forward(d_out, NULL, d_x, n);
    expect_dev("gelu", d_out, out, n);
    float *dx = frand(n, 0, 0);   // written: NaN before on both sides
    for (long i = 0; i < n; i++) dx[i] = NAN;
    float *d_dx = dev_copy(dx, n * 4);
    cpu->gelu_backward(dx, NULL, NULL, x, y, 1, (int)n);
    gpu->gelu_backward(d_dx, NULL, NULL, d_x, d_y, 1, (int)n);
    expect_dev("gelu backward", d_dx, dx, n);
    // with the bias gradient (1001 = 7 rows of 143; 130 rows past one row block of 64):
    // dinp as without, dbias += its column sums against the CPU, and bit for bit what
    // matmul_backward sums from the same dinp
    for (int shape = 0; shape < 2; shape++) {
        int R = shape ? 130 : 7, Cc = shape ? 9 : 143;
        long m = (long)R * Cc;
        float *gx = frand(m, -4, 4), *gy = frand(m, -1, 1), *b0 = frand(Cc, -1, 1);
        float *gd = frand(m, 0, 0), *b = malloc(Cc * 4);
        memcpy(b, b0, Cc * 4);
        float *d_gx = dev_copy(gx, m * 4), *d_gy = dev_copy(gy, m * 4), *d_gd = gpu->alloc(m * 4);
        float *d_b = dev_copy(b0, Cc * 4), *d_b2 = dev_copy(b0, Cc * 4), *d_gd2 = gpu->alloc(m * 4);
        cpu->gelu_backward(gd, NULL, b, gx, gy, R, Cc);
        gpu->gelu_backward(d_gd, NULL, d_b, d_gx, d_gy, R, Cc);
        expect_dev("gelu backward (with dbias) dinp", d_gd, gd, m);
        expect_dev("gelu backward dbias", d_b, b, Cc);
        gpu->gelu_backward(d_gd2, NULL, NULL, d_gx, d_gy, R, Cc);
        expect_same_bits("gelu backward dinp, with dbias and without", d_gd, d_gd2, m);
        gpu->matmul_backward(NULL, NULL, d_b2, d_gd2, NULL, NULL, NULL, NULL, NULL, R, 1, Cc, 0);
        expect_same_bits("gelu backward dbias against matmul_backward's", d_b, d_b2, Cc);
        void *dv[] = {d_gx, d_gy, d_gd, d_b, d_b2, d_gd2};
        for (size_t i = 0; i < 6; i++) gpu->free(dv[i]);
        free(gx); free(gy); free(b0); free(gd); free(b);
    }
    cpu->residual_forward(out, x, y, n);
    gpu->residual_forward(d_out, d_x, d_y, n);
    expect_dev("residual", d_out, out, n);
    gpu->residual_forward(d_x, d_x, d_y, n);   // out may alias a
    expect_dev("residual in place", d_x, out, n);
    gpu->free(d_x); gpu->free(d_y); gpu->free(d_out); gpu->free(d_dx);
    free(x); free(y); free(out); free(dx);
}

// The kernel timer (kernel_timer.cu): each queued operation counted once under the label
// and site it was queued at, reading resets the totals, nothing is counted while it is off,
// and the device times add up to no more than the wall time around them (the operations
// run one after another on one stream, on a GPU and on the emulator alike).
static const mp_kernel_time *timer_row(const mp_kernel_time *k, int n, const char *label,
                                       const char *what) {
    for (int i = 0; i < n; i++)
        if (!strcmp(k[i].label, label) && !strcmp(k[i].what, what)) return &k[i];
    fail_msg("kernel timer: no row (%s, %s) among %d", label, what, n);
    return NULL;
}

static void test_kernel_timer(void **state) {
    (void)state;
    int N = 40, C = 24;
    float *x = frand((size_t)N * C, -1, 1), *w = frand(C, 0.5f, 1.5f), *b = frand(C, -1, 1);
    float *d_x = dev_copy(x, (size_t)N * C * 4), *d_w = dev_copy(w, C * 4), *d_b = dev_copy(b, C * 4);
    float *d_out = gpu->alloc((size_t)N * C * 4), *d_stat = gpu->alloc(2 * N * 4);
    mp_kernel_time k[16];
    gpu->synchronize();
    double t0 = mp_now();
    gpu->kernel_timer("first");
    gpu->layernorm_forward(d_out, NULL, d_stat, d_stat + N, d_x, d_w, d_b, N, C);
    gpu->layernorm_forward(d_out, NULL, d_stat, d_stat + N, d_x, d_w, d_b, N, C);
    gpu->zero(d_out, (size_t)N * C * 4);
    gpu->kernel_timer("second");
    gpu->residual_forward(d_out, d_x, d_x, (long)N * C);
    int n = gpu->kernel_times(k, 16);
    double wall_ms = (mp_now() - t0) * 1e3;
    assert_int_equal(n, 3);
    assert_int_equal(timer_row(k, n, "first", "mp_cuda_layernorm_forward")->calls, 2);
    assert_int_equal(timer_row(k, n, "first", "cudaMemset")->calls, 1);
    const mp_kernel_time *r = timer_row(k, n, "second", "mp_cuda_residual_forward");
    assert_int_equal(r->calls, 1);
    assert_string_equal(r->file, "ops_dense.cu");
    double sum = 0.0;
    for (int i = 0; i < n; i++) {
        assert_true(k[i].ms >= 0.0);
        if (i) assert_true(k[i].ms <= k[i - 1].ms);   // longest first
        sum += k[i].ms;
    }
    // event times are rounded to about a microsecond on a GPU: a slack of 0.01 ms
    if (sum > wall_ms + 0.01) fail_msg("kernel timer: %.4f ms of operations in %.4f ms", sum, wall_ms);
    assert_int_equal(gpu->kernel_times(k, 16), 0);   // read: reset
    gpu->kernel_timer(NULL);
    gpu->residual_forward(d_out, d_x, d_x, (long)N * C);
    assert_int_equal(gpu->kernel_times(k, 16), 0);   // off: nothing counted
    gpu->free(d_x); gpu->free(d_w); gpu->free(d_b); gpu->free(d_out); gpu->free(d_stat);
    free(x); free(w); free(b);
}

// matmul forward in bf16 mode with a bias: the GEMM's epilogue adds it (cuBLASLt) where the
// bias is 16-byte aligned, the bias kernel after a plain GEMM where it is not or where
// cuBLASLt has no algorithm (the emulator's MP_EMU_LT_NO_ALGO); the epilogue GEMM is planned
// for its operands' own alignment (rows of 128 bytes, so that a twin 2 bytes off its
// allocation is 2-byte aligned and must get a plan of its own: the emulator refuses a plan
// run on pointers less aligned than the heuristic was promised). Which path ran is read off
// the kernel timer; on a GPU, whose heuristic may find no algorithm for an operand 2 bytes
// off, either path passes there. Either way out is the exact GEMM of the bf16 operands plus
// the bias, within the sums' bound ((K + 2) 2^-22 of the terms' magnitudes, the bias's among
// them: check_matmul_bf16's argument, with one rounding for the bias add).
static void test_matmul_bias_paths(void **state) {
    (void)state;
    int N = 33, C = 64, OC = 32;
    size_t nx = (size_t)N * C, nw = (size_t)OC * C, no = (size_t)N * OC;
    float *x = frand(nx, -1, 1), *w = frand(nw, -1, 1), *bias = frand(OC + 1, -1, 1);
    float *d_x = dev_copy(x, nx * 4), *d_w = dev_copy(w, nw * 4);
    float *d_bias = dev_copy(bias, (OC + 1) * 4), *d_out = gpu->alloc(no * 4);
    uint16_t *d_xb = gpu->alloc((nx + 1) * 2);
    double *ref = malloc(no * sizeof(double)), *S = malloc(no * sizeof(double));
    gemm_ref(ref, S, 0, 1, N, OC, C, x, C, w, C, NULL, host_bf16);   // x w^T, bf16 operands
#ifdef MP_HAVE_CUDA
    int emu = strstr(mp_cuda_device_name(), "emulator") != NULL;
#else
    int emu = 0;   // no CUDA backend in this build: the test is skipped before it runs
#endif
    // epilogue: 1 must run, 0 must not, 2 either (a GPU's heuristic decides)
    struct { int twin_off, bias_off, rows, no_algo, epilogue; } cases[] = {
        {0, 0, N, 0, 1}, {1, 0, N, 0, emu ? 1 : 2}, {0, 1, N, 0, 0}, {0, 0, N - 1, 1, 0}};
    mp_kernel_time k[16];
    int old = gpu->set_precision(MP_PRECISION_BF16);
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
        if (cases[c].no_algo && !emu) continue;   // the emulator's knob only
        int rows = cases[c].rows;   // another shape: a plan of its own
        uint16_t *xb = d_xb + cases[c].twin_off;      // 2 bytes off: 2-byte aligned
        const float *b = d_bias + cases[c].bias_off;  // 4 bytes off: 4-byte aligned
        gpu->to_bf16(xb, d_x, nx);
        gpu->zero(d_out, no * 4);
        if (cases[c].no_algo) setenv("MP_EMU_LT_NO_ALGO", "1", 1);
        gpu->kernel_timer("bias");
        gpu->matmul_forward(d_out, NULL, xb, d_w, NULL, b, rows, C, OC);
        int n = gpu->kernel_times(k, 16);
        gpu->kernel_timer(NULL);
        unsetenv("MP_EMU_LT_NO_ALGO");
#ifdef MP_HAVE_CUDA
        if (cases[c].no_algo) mp_cuda_lt_forget_plans();   // no later call inherits that plan
#endif
        int lt = 0, gemm = 0, kernel = 0;
        for (int i = 0; i < n; i++) {
            lt += !strcmp(k[i].what, "cublasLtMatmul bf16 + bias") ? (int)k[i].calls : 0;
            gemm += !strcmp(k[i].what, "cublasGemmEx bf16") ? (int)k[i].calls : 0;
            kernel += !strcmp(k[i].what, "mp_cuda_matmul_forward") ? (int)k[i].calls : 0;
        }
        int want = cases[c].epilogue == 2 ? lt : cases[c].epilogue;
        if (lt != want || gemm != !want || kernel != !want)
            fail_msg("bias case %zu (twin +%d, bias +%d): %d epilogue GEMMs, %d plain GEMMs and "
                     "%d bias kernels, want %d, %d, %d", c, cases[c].twin_off, cases[c].bias_off,
                     lt, gemm, kernel, want, !want, !want);
        double *ws = malloc(no * sizeof(double)), *Sb = malloc(no * sizeof(double));
        for (size_t i = 0; i < no; i++) {
            double bi = bias[cases[c].bias_off + i % OC];
            ws[i] = ref[i] + bi;
            Sb[i] = S[i] + fabs(bi);
        }
        char what[96];
        snprintf(what, sizeof what, "bf16 matmul with bias, case %zu (%s)", c,
                 lt ? "epilogue" : "bias kernel");
        expect_bound(what, d_out, rows, OC, OC, ws, Sb, C, 0.0);
        free(ws);
        free(Sb);
    }
    gpu->set_precision(old);
    void *dev[] = {d_x, d_w, d_bias, d_out, d_xb};
    for (size_t i = 0; i < sizeof dev / sizeof dev[0]; i++) gpu->free(dev[i]);
    free(x); free(w); free(bias); free(ref); free(S);
}

// shape: 0 random logits; 1 rising along the row, so that each thread's entries arrive in
// increasing order and every one rescales its running sum (the online normaliser's worst
// case), V past 10 entries per thread; 2 random with -inf logits (they add 0)
static void check_crossentropy(int N, int V, int shape) {
    size_t nv = (size_t)N * V;
    float *logits = frand(nv, -5, 5), *stats = frand(2 * N, 0, 0), *losses = frand(N, 0, 0);
    for (size_t i = 0; i < nv; i++) {
        if (shape == 1) logits[i] = 8.0f * (float)(i % V) / V + 0.01f * logits[i];
        if (shape == 2 && i % V % 7 == 3) logits[i] = -INFINITY;
    }
    int32_t tg[8];
    for (int i = 0; i < N; i++) tg[i] = (int32_t)(mp_hash3(3, 4, i) % V) / 7 * 7;   // not -inf
    cpu->crossentropy_forward(losses, stats, logits, tg, N, V);
    float *d_logits = dev_copy(logits, nv * 4), *d_stats = gpu->alloc(2 * N * 4);
    float *d_losses = gpu->alloc(N * 4);
    int32_t *d_tg = dev_copy(tg, sizeof tg);
    gpu->crossentropy_forward(d_losses, d_stats, d_logits, d_tg, N, V);
    expect_dev("crossentropy losses", d_losses, losses, N);
    expect_dev("crossentropy (max, 1 / sum)", d_stats, stats, 2 * N);
    // dlogits is written: both sides start from NaN, which any += would keep
    float *dl = frand(nv, NAN, NAN), *d_dl = dev_copy(dl, nv * 4);
    cpu->crossentropy_backward(dl, NULL, logits, stats, tg, 0.37f, N, V);
    gpu->crossentropy_backward(d_dl, NULL, d_logits, d_stats, d_tg, 0.37f, N, V);
    expect_dev("crossentropy dlogits", d_dl, dl, nv);
    gpu->free(d_logits); gpu->free(d_stats); gpu->free(d_losses); gpu->free(d_tg); gpu->free(d_dl);
    free(logits); free(stats); free(losses); free(dl);
}

static void test_crossentropy(void **state) {
    (void)state;
    check_crossentropy(7, 300, 0);
    check_crossentropy(3, 5000, 1);
    check_crossentropy(5, 1000, 2);
    check_crossentropy(4, 100, 0);   // fewer entries than threads: threads with none
    // A NaN or +inf logit makes its row's loss NaN (as the CPU's two passes do) wherever it
    // lies. Thread t of a row's block sees entries t, t + 256, ...; row 0: thread 5 sees
    // -inf, NaN, then finite ones (the NaN comes before any finite entry and stays through
    // the rescaling); row 1: thread 6 sees only NaN and -inf (a state with no finite entry,
    // merged into the others); row 2: a NaN after finite ones; row 3: +inf.
    int N = 4, V = 1000;
    float *logits = frand((size_t)N * V, -5, 5);
    logits[5] = -INFINITY;
    logits[5 + 256] = NAN;
    logits[V + 6] = NAN;
    for (int v = 6 + 256; v < V; v += 256) logits[V + v] = -INFINITY;
    logits[2 * V + 700] = NAN;
    logits[3 * V + 300] = INFINITY;
    int32_t tg[4] = {0, 1, 2, 3};
    float *d_logits = dev_copy(logits, (size_t)N * V * 4), *d_stats = gpu->alloc(2 * N * 4);
    float *d_losses = gpu->alloc(N * 4);
    int32_t *d_tg = dev_copy(tg, sizeof tg);
    gpu->crossentropy_forward(d_losses, d_stats, d_logits, d_tg, N, V);
    float losses[4];
    gpu->to_host(losses, d_losses, sizeof losses);
    for (int i = 0; i < N; i++)
        if (!isnan(losses[i]))
            fail_msg("crossentropy: row %d with a NaN or inf logit has loss %g, want NaN", i,
                     losses[i]);
    gpu->free(d_logits); gpu->free(d_stats); gpu->free(d_losses); gpu->free(d_tg);
    free(logits);
}

// The fused op (adamw with a bf16 destination) against the separate ops on the same
// backend, bit for bit: p, m, v as adamw without one, and the copy as to_bf16 of that p.
// d_pb must hold p rounded where a row was updated (mask NULL: everywhere) and its old
// bits (pb0) elsewhere.
static void expect_fused(const char *what, const float *d_p, const float *d_m, const float *d_v,
                         const float *d_p2, const float *d_m2, const float *d_v2,
                         const uint16_t *d_pb, const uint16_t *pb0, const int *mask, int C,
                         size_t n) {
    const float *d1[3] = {d_p, d_m, d_v}, *d2[3] = {d_p2, d_m2, d_v2};
    const char *name[3] = {"p", "m", "v"};
    for (int k = 0; k < 3; k++) {
        float *a = host_copy(d1[k], n * 4), *b = host_copy(d2[k], n * 4);
        if (memcmp(a, b, n * 4)) fail_msg("%s: %s differs from the op without bf16", what, name[k]);
        free(a); free(b);
    }
    uint16_t *d_want = gpu->alloc(n * 2);
    gpu->to_bf16(d_want, d_p, n);
    uint16_t *want = host_copy(d_want, n * 2), *got = host_copy(d_pb, n * 2);
    for (size_t i = 0; i < n; i++) {
        uint16_t w = !mask || mask[i / C] ? want[i] : pb0[i];
        if (got[i] != w) fail_msg("%s: bf16 copy [%zu] 0x%04x, want 0x%04x", what, i, got[i], w);
    }
    gpu->free(d_want);
    free(want); free(got);
}

static void test_optim(void **state) {
    (void)state;
    size_t n = 5000;
    float *p = frand(n, -1, 1), *m = frand(n, 0, 0), *v = frand(n, 0, 0);
    float *d_p = dev_copy(p, n * 4), *d_m = gpu->alloc(n * 4), *d_v = gpu->alloc(n * 4);
    // the fused op's copy of the state, and its bf16 destination
    float *d_p2 = dev_copy(p, n * 4), *d_m2 = gpu->alloc(n * 4), *d_v2 = gpu->alloc(n * 4);
    uint16_t *d_pb = gpu->alloc(n * 2);
    // in two calls, so that each of the CUDA op's paths runs: [0, 2001) starts 16-byte
    // aligned (4 elements a thread, then a tail of 1), [2001, n) does not (one a thread)
    size_t seg[3] = {0, 2001, n};
    for (long t = 1; t <= 3; t++) {
        float *g = frand(n, -1, 1), *d_g = dev_copy(g, n * 4);
        for (int s = 0; s < 2; s++) {
            size_t o = seg[s], k = seg[s + 1] - o;
            cpu->adamw(p + o, g + o, m + o, v + o, NULL, k, 1e-2f, 0.9f, 0.95f, 1e-8f, 0.1f, t,
                       0.5f);
            gpu->adamw(d_p + o, d_g + o, d_m + o, d_v + o, NULL, k, 1e-2f, 0.9f, 0.95f, 1e-8f,
                       0.1f, t, 0.5f);
            gpu->adamw(d_p2 + o, d_g + o, d_m2 + o, d_v2 + o, d_pb + o, k, 1e-2f, 0.9f, 0.95f,
                       1e-8f, 0.1f, t, 0.5f);
        }
        gpu->free(d_g);
        free(g);
    }
    expect_dev("adamw p", d_p, p, n);
    expect_dev("adamw m", d_m, m, n);
    expect_dev("adamw v", d_v, v, n);
    expect_fused("adamw with bf16", d_p, d_m, d_v, d_p2, d_m2, d_v2, d_pb, NULL, NULL, 1, n);
    gpu->free(d_p2); gpu->free(d_m2); gpu->free(d_v2); gpu->free(d_pb);
    size_t big = 70001;   // several partial-sum blocks and a tail
    float *x = frand(big, -3, 3), *d_x = dev_copy(x, big * 4);
    double want = cpu->sum_squares(x, big), got = gpu->sum_squares(d_x, big);
    // exact double squares, all positive: each side errs by at most (terms one value passes
    // through) 2^-53 of the sum: CPU <= 4096 + 8 (4 lanes of a 16384 block, the blocks),
    // GPU <= 64 + 5 + 8 + 5 (a thread's stride, the warp tree, the warps, the blocks), so
    // the two differ by <= 4.6e-13 of the sum; a float accumulation or a lost block is >= 6e-8.
    if (fabs(got - want) > 1e-12 * want) fail_msg("sum_squares %.17g, CPU %.17g", got, want);
    assert_true(gpu->sum_squares(d_x, 0) == 0.0);
    // sum_f64 over nonnegative doubles (per-row sums of squares): the same bound, CPU
    // <= 16384 + 5 terms per value (a block in order, the blocks), GPU <= 64 + 5 + 8 + 5:
    // <= 2e-12 of the sum apart; a float accumulation or a lost block is >= 6e-8
    double *xd = malloc(big * sizeof(double));
    for (size_t i = 0; i < big; i++) xd[i] = (double)x[i] * x[i] + (double)x[(i * 7) % big] * 0x1p-30;
    double *d_xd = dev_copy(xd, big * sizeof(double));
    want = cpu->sum_f64(xd, big);
    got = gpu->sum_f64(d_xd, big);
    if (fabs(got - want) > 1e-11 * want) fail_msg("sum_f64 %.17g, CPU %.17g", got, want);
    assert_true(gpu->sum_f64(d_xd, 0) == 0.0);
    gpu->free(d_p); gpu->free(d_m); gpu->free(d_v); gpu->free(d_x); gpu->free(d_xd);
    free(p); free(m); free(v); free(x); free(xd);
}

static float *fdup(const float *x, size_t n) {
    float *y = malloc(n * sizeof(float));
    memcpy(y, x, n * sizeof(float));
    return y;
}

// Lazy AdamW's row op (adamw_rows) against the CPU's: 40 of
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
    // the fused op's copy of the state; its bf16 destination starts as a marker that the
    // unlisted rows must keep
    float *d_p2 = dev_copy(p, n * 4), *d_m2 = dev_copy(m, n * 4), *d_v2 = dev_copy(v, n * 4);
    uint16_t *pb0 = malloc(n * 2);
    for (size_t i = 0; i < n; i++) pb0[i] = (uint16_t)(0xa5c3u ^ i);
    uint16_t *d_pb = dev_copy(pb0, n * 2);
    int32_t *d_rows = dev_copy(rows, sizeof rows);
    for (long t = 1; t <= 3; t++) {
        float *g = frand(n, -1, 1), *d_g = dev_copy(g, n * 4);
        cpu->adamw_rows(p, g, m, v, NULL, rows, nr, C, 1e-2f, 0.9f, 0.95f, 1e-8f, 0.1f, t, 0.5f);
        gpu->adamw_rows(d_p, d_g, d_m, d_v, NULL, d_rows, nr, C, 1e-2f, 0.9f, 0.95f, 1e-8f, 0.1f,
                        t, 0.5f);
        gpu->adamw_rows(d_p2, d_g, d_m2, d_v2, d_pb, d_rows, nr, C, 1e-2f, 0.9f, 0.95f, 1e-8f,
                        0.1f, t, 0.5f);
        gpu->free(d_g);
        free(g);
    }
    expect_dev("adamw_rows p", d_p, p, n);
    expect_dev("adamw_rows m", d_m, m, n);
    expect_dev("adamw_rows v", d_v, v, n);
    int listed[97] = {0};
    for (int i = 0; i < nr; i++) listed[rows[i]] = 1;
    expect_fused("adamw_rows with bf16", d_p, d_m, d_v, d_p2, d_m2, d_v2, d_pb, pb0, listed, C, n);
    gpu->free(d_p2); gpu->free(d_m2); gpu->free(d_v2); gpu->free(d_pb);
    free(pb0);
    // the CPU left unlisted rows alone, and the GPU's unlisted rows are the CPU's bits
    float *hp = host_copy(d_p, n * 4);
    for (int r = 0; r < R; r++) {
        size_t o = (size_t)r * C;
        int same = !memcmp(p + o, p0 + o, C * 4) && !memcmp(m + o, m0 + o, C * 4) &&
                   !memcmp(v + o, v0 + o, C * 4) && !memcmp(hp + o, p0 + o, C * 4);
        if (listed[r] == same) fail_msg("adamw_rows: row %d %s", r, listed[r] ? "not updated" : "written");
    }
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
// are exact in float; grid = 0: uniform random floats; grid = 2: uniform, with the columns of
// lane 0 (i % 32 == 0) raised by 1, so that the pruned top-k keeps about n / 32 entries
// instead of about k (its worst case)
static void check_topk(long rows, int n, int k, int grid) {
    size_t ns = (size_t)rows * n, nk = (size_t)rows * k;
    float *s1 = malloc(ns * 4), *s2 = malloc(ns * 4);
    uint64_t st = g_stream++;
    for (size_t i = 0; i < ns; i++) {
        if (grid == 1) {
            s1[i] = 1.0f + (float)(mp_hash3(9, st, i) % 8) * 0x1p-20f;
            s2[i] = 1.0f + (float)(mp_hash3(9, st + 1000, i) % 8) * 0x1p-20f;
        } else {
            s1[i] = mp_uniform(9, st, i) + (grid == 2 && i % n % 32 == 0);
            s2[i] = mp_uniform(9, st + 1000, i) + (grid == 2 && i % n % 32 == 0);
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
        if (grid == 1) brute_topk(r1, r2, n, k, best);
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
    // the pruned rounds (NPL >= 2) when one lane holds the best entries: n / 32 survivors
    check_topk(8, 1024, 16, 2);
    check_topk(8, 300, 4, 2);
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
            // n = 100, row 1: numbers only in lanes 0-3 (16 per half, fewer lanes than k)
            if (n == 100 && i % ns / n == 1)
                s[i] = i % n % 32 < 4 ? 1.0f + (float)(mp_hash3(10, n, i) % 8) * 0x1p-20f : NAN;
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
    // Halves with fewer than k numbers (2 and 1 here, so 2 real pairs for k = 4): a half's
    // missing picks are padding, (-inf, sub-key 0), so candidates built on them can share an
    // id, and a padded one can even carry a real pair's id. The documented picks are the
    // rounds': k times the best (score, id) ranked strictly after the previous pick over the
    // k*k candidates, computed here on the host from the halves' padded picks. The real
    // pairs come first, as the brute force ranks them, and the padded picks have gate 0.
    // k * k <= 32 candidates, one per lane: what a sort would take if it were allowed to.
    {
        int n = 64, k = 4, rows = 3, real = 2;
        size_t ns = (size_t)rows * n, nk = (size_t)rows * k;
        float *s = malloc(2 * ns * 4), *inf = malloc(2 * ns * 4);
        for (size_t i = 0; i < 2 * ns; i++) {
            s[i] = mp_uniform(14, n, i);
            if (i % n >= (i < ns ? 2u : 1u)) s[i] = NAN;
            inf[i] = isnan(s[i]) ? -INFINITY : s[i];
        }
        float *d_s = dev_copy(s, 2 * ns * 4), *d_gate = gpu->alloc(nk * 4);
        int32_t *d_sel = gpu->alloc(3 * nk * 4);
        mp_cuda_product_topk(d_s, d_s + ns, NULL, 1, rows, n, k, d_sel, d_sel + nk, d_sel + 2 * nk, d_gate);
        int32_t *sel = host_copy(d_sel, nk * 4);
        float *gate = host_copy(d_gate, nk * 4);
        long best[4];
        for (int r = 0; r < rows; r++) {
            brute_topk(inf + r * n, inf + ns + r * n, n, k, best);
            // each half's picks: its numbers best first, then (-inf, 0)
            float hv[2][4];
            int hi[2][4];
            for (int h = 0; h < 2; h++) {
                const float *row = s + h * ns + (size_t)r * n;
                int m = 0;
                for (int q = 0; q < k; q++) {
                    int bi = -1;
                    for (int e = 0; e < n; e++) {
                        int taken = 0;
                        for (int t = 0; t < m; t++) taken |= hi[h][t] == e;
                        if (!isnan(row[e]) && !taken && (bi < 0 || row[e] > row[bi])) bi = e;
                    }
                    if (bi >= 0) { hv[h][m] = row[bi]; hi[h][m++] = bi; }
                }
                for (; m < k; m++) { hv[h][m] = -INFINITY; hi[h][m] = 0; }
            }
            float pv = INFINITY;
            long pid = -1;
            for (int j = 0; j < k; j++) {
                float bv = 0.0f;
                long bid = -1;
                for (int a = 0; a < k; a++)
                    for (int b = 0; b < k; b++) {
                        float v = hv[0][a] + hv[1][b];
                        long id = (long)hi[0][a] * n + hi[1][b];
                        int after = pv > v || (pv == v && pid < id);
                        if (after && (bid < 0 || v > bv || (v == bv && id < bid))) { bv = v; bid = id; }
                    }
                if (sel[r * k + j] != bid)
                    fail_msg("top-k, halves short of numbers: row %d position %d: GPU expert %d, "
                             "the rounds' %ld", r, j, sel[r * k + j], bid);
                if (j < real && sel[r * k + j] != best[j])
                    fail_msg("top-k, halves short of numbers: row %d position %d: GPU expert %d, "
                             "brute force %ld", r, j, sel[r * k + j], best[j]);
                if (j >= real && gate[r * k + j] != 0.0f)
                    fail_msg("top-k, halves short of numbers: row %d padded pick %d has gate %g", r,
                             j, gate[r * k + j]);
                pv = bv;
                pid = bid;
            }
        }
        gpu->free(d_s); gpu->free(d_gate); gpu->free(d_sel);
        free(s); free(inf); free(sel); free(gate);
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
    c->n_heads = C > 256 ? 4 : 2;   // head size <= 128: the CUDA attention refuses more
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
// Both models' gradients set to the same random values, so that the backward's += is
// checked. For the expert tables this writes rows from outside the backward, which training
// must not do (model.h, mp_model_zero_grad: such a row may not be zeroed later); it is
// sound here because a new model's backward accumulates and no mp_model_zero_grad follows.
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
// (skip: tensors whose name contains it are left out; NULL: none)
static void expect_grads(mp_model *mg, mp_model *mc, const char *ctx, const char *skip) {
    for (int i = 0; i < mp_model_n_tensors(mc); i++) {
        const mp_tensor *t = mp_model_tensor(mc, i);
        if (skip && strstr(t->name, skip)) continue;
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
// differs (TOL), except in the query projection's backward, a bf16 GEMM on dq
// (expect_route_backward_bf16); BF16: ordinary values, which the GPU rounds, against the
// CPU's unrounded fp32 (BF16_TOL).
enum { FP32, BF16_EXACT, BF16 };
// Each rounded element (the tables; x and dy in the expert gradient sums; dq, W_q and x in
// the query projection's backward GEMMs) is rounded to nearest with 8 significant bits:
// relative error at most 2^-8 ~ 3.9e-3, spread evenly over [-2^-8, 2^-8] for ordinary
// values, so sums of such errors with random signs stay near 2^-8/sqrt(3) ~ 2.3e-3 of the
// result's norm per rounded operand, ~3.2e-3 with two (U and V; a GEMM's two operands),
// 7.8e-3 if every error had one sign. Measured (emulator, two input draws): the worst of y,
// dx and every gradient 3.6e-3 and 4.6e-3 (with the tables alone rounded, earlier draws: y
// 2.2e-3 and 2.6e-3, dK1 5.6e-3, where the gate softmax backward subtracts nearly equal
// terms). 1e-2 bounds that; a wrong row, a stale copy or a missing term is O(1e-1) and more.
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
// The shape check_layer_at builds: C, n, H, k, dk, batch, context. exact_router: W_q, the
// sub-keys and x multiples of powers of two small enough that every query and score is exact
// in fp32 whatever the summation order (see dyadic_router), so CPU and GPU select the same
// experts, ties included (both rank ties by the lower index), and no input needs rejecting:
// at 1024 tokens x 8 heads near-ties at the top-k boundary are certain.
typedef struct { int C, n, H, k, dk, B, T, exact_router; } layer_shape;
static const layer_shape small_shape = {48, 16, 2, 4, 8, 4, 8, 0};
static const layer_shape *g_shape = &small_shape;

// W_q entries in {-1, 0, 1} 2^-5, x in {-1, 0, 1} 2^-1: q sums C <= 2^10 products that are
// multiples of 2^-6, |q| <= C 2^-6 <= 16, exact. Sub-keys in {-1, 0, 1} 2^-3: a score sums
// dk/2 <= 64 products, multiples of 2^-9 of size <= 2, so |score| <= 128 = 2^16 units of
// 2^-9, and s1 + s2 doubles that: 2^17 < 2^24, exact.
static float trit(uint64_t a, uint64_t b, size_t i, float scale) {
    return scale * (float)((int)(mp_hash3(a, b, i) % 3) - 1);
}
static void dyadic_router(mp_model *m) {
    mp_retrieval_layer *l = mp_model_retrieval_layer(m, 1);
    const mp_backend *be = mp_model_backend(m);
    const mp_retrieval_config *rc = l->rc;
    size_t nq = (size_t)rc->heads * rc->key_dim * l->C, nk = (size_t)rc->n_sub * (rc->key_dim / 2);
    float *h = malloc((nq > nk ? nq : nk) * sizeof(float));
    for (size_t i = 0; i < nq; i++) h[i] = trit(31, 1, i, 0x1p-5f);
    be->from_host(l->wq, h, nq * sizeof(float));
    for (size_t i = 0; i < nk; i++) h[i] = trit(31, 2, i, 0x1p-3f);
    be->from_host(l->k1, h, nk * sizeof(float));
    for (size_t i = 0; i < nk; i++) h[i] = trit(31, 3, i, 0x1p-3f);
    be->from_host(l->k2, h, nk * sizeof(float));
    free(h);
}

// BF16_EXACT: the query projection's backward (dx += dq W_q, dW_q += dq^T x) is a bf16 GEMM
// whose operand dq is not bf16-representable (nor are W_q's entries). dx and dW_q against the
// CPU elementwise: |got - want| <= (2 U_BF16 + U_BF16^2 + (K + 2) U_SUM) S + TOL max|want|,
// S the element's sum of |dq w| (|dq x|) terms: that GEMM's bound (expect_bound) on top of
// the summation-order tolerance the rest of the layer, exact in bf16, is held to (TOL).
static void expect_route_backward_bf16(const char *ctx, mp_model *mg, mp_model *mc,
                                       const float *d_dx, const float *dx, const float *x, int N) {
    mp_retrieval_layer *l = mp_model_retrieval_layer(mc, 1);   // CPU: l->dq holds d(q) (N, HD)
    int C = l->C, HD = l->rc->heads * l->rc->key_dim;
    size_t NC = (size_t)N * C, nw = (size_t)HD * C, big = NC > nw ? NC : nw;
    double *ref = malloc(big * sizeof(double)), *S = malloc(big * sizeof(double));
    double *want = malloc(big * sizeof(double)), e = 2 * U_BF16 + U_BF16 * U_BF16, wmax = 0.0;
    char what[200];
    gemm_ref(ref, S, 0, 0, N, C, HD, l->dq, HD, l->wq, C, NULL, NULL);   // dq (N,HD) W_q (HD,C)
    float *got = host_copy(d_dx, NC * 4);
    for (size_t i = 0; i < NC; i++) {
        want[i] = dx[i];
        if (fabs(dx[i]) > wmax) wmax = fabs(dx[i]);
    }
    snprintf(what, sizeof what, "%s: dx", ctx);
    check_bound(what, got, want, S, NC, C, e + (HD + 2) * U_SUM, TOL * wmax);
    free(got);
    const mp_tensor *t = NULL;
    for (int i = 0; i < mp_model_n_tensors(mc) && !t; i++)
        if (strstr(mp_model_tensor(mc, i)->name, ".wq")) t = mp_model_tensor(mc, i);
    assert_non_null(t);
    gemm_ref(ref, S, 1, 0, HD, C, N, l->dq, HD, x, C, NULL, NULL);   // dq^T (HD,N) x (N,C)
    const float *gc = mp_model_grads(mc, t->group) + t->offset;
    got = host_copy(mp_model_grads(mg, t->group) + t->offset, nw * 4);
    wmax = 0.0;
    for (size_t i = 0; i < nw; i++) {
        want[i] = gc[i];
        S[i] = 2 * S[i] + fabs(gc[i]);   // |before the +=| <= |after| + the terms' sum
        if (fabs(gc[i]) > wmax) wmax = fabs(gc[i]);
    }
    snprintf(what, sizeof what, "%s: grad %s", ctx, t->name);
    check_bound(what, got, want, S, nw, C, e + (N + 2) * U_SUM, TOL * wmax);
    free(got); free(ref); free(S); free(want);
}

static void check_layer_at(mp_ffn_kind kind, int query_bn, mp_activation act, int train,
                           int precision, float balance) {
    mp_config c;
    const layer_shape *sh = g_shape;
    small_config(&c, kind, query_bn, act, sh->C, sh->n, sh->H, sh->k, sh->dk);
    c.batch_size = sh->B;
    c.context = sh->T;
    if (c.d_model / c.n_heads > 64) c.n_heads = c.d_model / 64;   // CUDA attention's head limit
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
    if (sh->exact_router) {
        dyadic_router(mc);
        dyadic_router(mg);
    }
    for (;; rejected++) {   // inputs without near-ties at the top-k boundary (see the top)
        free(x);
        x = frand(NC, -1.5, 1.5);
        if (sh->exact_router)
            for (size_t i = 0; i < NC; i++) x[i] = trit(32, rejected, i, 0.5f);
        if (precision == BF16_EXACT) truncate_bf16(x, NC);
        mp_model_ffn_forward(mc, 1, yc, x, NULL, N, train);
        if (sh->exact_router || decision_margin(lc, x, N) > 1e-4) break;
        if (rejected == 50) fail_msg("no input without near-ties in 50 tries");
    }
    // running statistics and biases back to their start (the rejected tries moved them)
    mp_model_init(mc);
    if (sh->exact_router) dyadic_router(mc);
    if (precision == BF16_EXACT) truncate_tables_bf16(mc);
    same_random_biases(mc, mg);
    same_random_grads(mc, mg);
    mp_model_ffn_forward(mc, 1, yc, x, NULL, N, train);
    float *d_x = dev_copy(x, NC * 4), *d_y = gpu->alloc(NC * 4);
    mp_model_ffn_forward(mg, 1, d_y, d_x, NULL, N, train);
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
    // the query projection stays fp32 in bf16 mode (route.c): q to the fp32 tolerance
    size_t NQ = (size_t)N * c.peer.heads * c.peer.key_dim;
    float *q = host_copy(lg->q, NQ * 4);
    snprintf(what, sizeof what, "%s: q", ctx);
    expect_close(what, q, lc->q, NQ, TOL);
    free(q);
    size_t NS = (size_t)N * c.peer.heads * c.peer.topk;
    int32_t *sel = host_copy(lg->sel, NS * 4);
    assert_memory_equal(sel, lc->sel, NS * 4);
    snprintf(what, sizeof what, "%s: gates", ctx);
    expect_dev(what, lg->gate, lc->gate, NS);
    if (query_bn || balance > 0) {   // the biases moved by integer counts: equal
        snprintf(what, sizeof what, "%s: router state", ctx);
        expect_dev(what, mp_model_router_state(mg), mp_model_router_state(mc), mp_model_router_state_size(mc));
    }
    // backward: dx is written (mp_model_ffn_backward): NaN before on both sides
    float *dy = frand(NC, -1, 1), *dx = frand(NC, 0, 0);
    for (size_t i = 0; i < NC; i++) dx[i] = NAN;
    if (precision == BF16_EXACT) truncate_bf16(dy, NC);
    float *d_dy = dev_copy(dy, NC * 4), *d_dx = dev_copy(dx, NC * 4);
    mp_model_ffn_backward(mc, 1, dx, dy, NULL, x, NULL, N);
    mp_model_ffn_backward(mg, 1, d_dx, d_dy, NULL, d_x, NULL, N);
    if (precision == BF16_EXACT) {
        expect_route_backward_bf16(ctx, mg, mc, d_dx, dx, x, N);
        expect_grads(mg, mc, ctx, ".wq");   // checked there
    } else {
        snprintf(what, sizeof what, "%s: dx", ctx);
        expect_dev(what, d_dx, dx, NC);
        expect_grads(mg, mc, ctx, NULL);
    }
    if (precision == BF16_EXACT) {
        // new masters (what an optimizer step does): the next forward must read their copies
        new_tables_bf16(mc, mg);
        mp_model_ffn_forward(mc, 1, yc, x, NULL, N, 0);
        mp_model_ffn_forward(mg, 1, d_y, d_x, NULL, N, 0);
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

// emu_large: the paper's heads and top-k (H k = 128 records per token, two EXP_CHUNKs),
// C = 320 (blocks of 256 threads, columns wrapping), N = 1024 experts, 1024 tokens. Query
// BN off: its statistics are not exact, the router below is (see layer_shape).
static void test_layer_mid(void **s) {
    (void)s;
    static const layer_shape mid = {320, 32, 8, 16, 32, 16, 64, 1};
    g_shape = &mid;
    check_layer(MP_FFN_PEER, 0, MP_ACT_GELU, 1);
    check_layer(MP_FFN_PKM, 0, MP_ACT_GELU, 1);
    g_shape = &small_shape;
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

// experts_backward's gradient modes against the CPU's (tests/unit/test_experts.c checks the
// CPU's against double sums): a step of (overwrite, accumulate), a step whose overwrite
// zeroes the earlier rows it does not touch, one with no records at all. C = 40 (16-byte
// loads: 4 floats or 8 bf16 per thread) and C = 42 (scalar): one row gets 80 records, more than a chunk of EXP_CHUNK = 64, so the overwrite
// must start from zero in the first chunk only. dU, dV to TOL (fp32 sums of the same terms
// in the same record order; the dot products dy . v differ in order), rows without records
// exactly zero, the dirty flags equal, and row_ss against the double sum of squares of the
// GPU's own rows: squares are exact in double, two orders of 2C nonnegative terms differ by
// at most 2 (2C) 2^-53 relative. bf16: tables, x and dy bf16-representable (see BF16_EXACT).
typedef struct {
    int M;
    int64_t R;
    int64_t *start;
    int32_t *slot, *row;
    float *x, *dy, *gate, *pre;
} grad_batch;

static grad_batch grad_batch_make(int M, int S, int C, const int32_t *set, int n_set, int bf16) {
    grad_batch b = {.M = M, .R = (int64_t)M * S};
    size_t R = (size_t)(b.R ? b.R : 1), MC = (size_t)(M ? M : 1) * C;
    b.start = malloc((size_t)(M + 1) * sizeof(int64_t));
    b.slot = malloc(R * sizeof(int32_t));
    b.row = malloc(R * sizeof(int32_t));
    for (int m = 0; m <= M; m++) b.start[m] = (int64_t)m * S;
    for (int64_t i = 0; i < b.R; i++) {   // even records: one heavy row; odd: the set in turn
        b.slot[i] = (int32_t)(i / S);
        b.row[i] = i % 2 == 0 ? set[0] : set[(i / 2) % n_set];
    }
    b.x = frand(MC, -1, 1);
    b.dy = frand(MC, -1, 1);
    if (bf16) { truncate_bf16(b.x, MC); truncate_bf16(b.dy, MC); }
    b.gate = frand(R, 0, 1);
    b.pre = frand(R, 0.1f, 1);   // ReLU: away from the kink
    for (int64_t i = 0; i < b.R; i += 3) b.pre[i] = -b.pre[i];
    return b;
}

static void grad_batch_free(grad_batch *b) {
    free(b->start); free(b->slot); free(b->row); free(b->x); free(b->dy); free(b->gate); free(b->pre);
}

// The expert tables of a gradient test on both sides: the CPU's (tc) and the GPU's (tg, with
// bf16 copies in bf16 mode), from U and V (host, taken over), their gradients garbage and
// every row dirty, as after an earlier step. PKM: the same buffers, but no u or du in the
// tables (the backend tells the kinds apart by u).
typedef struct {
    mp_expert_tables tc, tg;
    float *U, *V, *du, *dv, *d_U, *d_V, *d_du, *d_dv;
    uint16_t *d_Ub, *d_Vb;
    uint8_t *dirty, *d_dirty;
    double *row_ss, *d_ss;
    long rows;
    int C, peer;
} grad_tables;

static grad_tables grad_tables_make(int peer, int bf16, long rows, int C, float *U, float *V) {
    size_t n = (size_t)rows * C;
    grad_tables g = {.U = U, .V = V, .rows = rows, .C = C, .peer = peer};
    g.du = frand(n, -1, 1);
    g.dv = frand(n, -1, 1);
    g.dirty = malloc((size_t)rows);
    memset(g.dirty, 1, (size_t)rows);
    g.row_ss = calloc((size_t)rows, sizeof(double));
    g.d_U = dev_copy(U, n * 4);
    g.d_V = dev_copy(V, n * 4);
    g.d_du = dev_copy(g.du, n * 4);
    g.d_dv = dev_copy(g.dv, n * 4);
    g.d_dirty = dev_copy(g.dirty, (size_t)rows);
    g.d_ss = dev_copy(g.row_ss, (size_t)rows * sizeof(double));
    if (bf16) {
        g.d_Ub = gpu->alloc(n * 2);
        g.d_Vb = gpu->alloc(n * 2);
        gpu->to_bf16(g.d_Ub, g.d_U, n);
        gpu->to_bf16(g.d_Vb, g.d_V, n);
    }
    g.tc = (mp_expert_tables){.u = peer ? U : NULL, .v = V, .du = peer ? g.du : NULL,
                              .dv = g.dv, .dirty = g.dirty, .rows = rows};
    g.tg = (mp_expert_tables){.u = peer ? g.d_U : NULL, .v = g.d_V,
                              .u_bf16 = peer ? g.d_Ub : NULL, .v_bf16 = g.d_Vb,
                              .du = peer ? g.d_du : NULL, .dv = g.d_dv, .dirty = g.d_dirty,
                              .rows = rows};
    return g;
}

static void grad_tables_free(grad_tables *g) {
    void *dev[] = {g->d_U, g->d_V, g->d_du, g->d_dv, g->d_Ub, g->d_Vb, g->d_dirty, g->d_ss};
    for (size_t i = 0; i < sizeof dev / sizeof dev[0]; i++) gpu->free(dev[i]);
    free(g->U); free(g->V); free(g->du); free(g->dv); free(g->dirty); free(g->row_ss);
}

// One experts backward of batch b on both sides (with forward, the forward before it, its y
// and pre against the CPU's), then dU and dV against the CPU's to tol, the dirty flags
// equal, clean rows exactly zero, and row_ss against the double sum of squares of the GPU's
// own rows: squares are exact in double, and two orders of 2C nonnegative terms differ by at
// most 2 (2C) 2^-53 relative. name: the step, for the messages.
static void grad_step(grad_tables *g, const grad_batch *b, int overwrite, int forward,
                      double tol, const char *name) {
    int C = g->C, peer = g->peer;
    long rows = g->rows;
    size_t n = (size_t)rows * C, MC = (size_t)(b->M ? b->M : 1) * C, R = (size_t)(b->R ? b->R : 1);
    float *dx = malloc(MC * 4), *dgate = malloc(R * 4);
    cpu->experts_backward(&g->tc, dx, dgate, b->dy, b->x, b->M, b->start, b->slot, b->row,
                          b->gate, b->pre, b->R, C, 1, overwrite, g->row_ss);
    void *d_start = dev_copy(b->start, (size_t)(b->M + 1) * 8), *d_slot = dev_copy(b->slot, R * 4),
         *d_row = dev_copy(b->row, R * 4), *d_x = dev_copy(b->x, MC * 4),
         *d_dy = dev_copy(b->dy, MC * 4), *d_gate = dev_copy(b->gate, R * 4),
         *d_pre = dev_copy(b->pre, R * 4), *d_dx = gpu->alloc(MC * 4), *d_dg = gpu->alloc(R * 4);
    gpu->experts_backward(&g->tg, d_dx, d_dg, d_dy, d_x, b->M, d_start, d_slot, d_row, d_gate,
                          d_pre, b->R, C, 1, overwrite, g->d_ss);
    char what[200];
    if (forward && b->M > 0) {
        float *y = malloc(MC * 4), *pre = malloc(R * 4);
        cpu->experts_forward(&g->tc, y, b->x, b->M, b->start, b->slot, b->row, b->gate, pre,
                             b->R, C, 1);
        gpu->experts_forward(&g->tg, d_dx, d_x, b->M, d_start, d_slot, d_row, d_gate, d_pre,
                             b->R, C, 1);
        snprintf(what, sizeof what, "%s: forward y", name);
        expect_dev(what, d_dx, y, MC);
        if (peer) {
            snprintf(what, sizeof what, "%s: forward pre", name);
            expect_dev(what, d_pre, pre, R);
        }
        free(y); free(pre);
    }
    float *gu = host_copy(g->d_du, n * 4), *gv = host_copy(g->d_dv, n * 4);
    snprintf(what, sizeof what, "%s: dv", name);
    expect_close(what, gv, g->dv, n, tol);
    if (peer) {
        what[strlen(what) - 1] = 'u';
        expect_close(what, gu, g->du, n, tol);
    }
    uint8_t *gd = host_copy(g->d_dirty, (size_t)rows);
    assert_memory_equal(gd, g->dirty, (size_t)rows);
    double *gs = host_copy(g->d_ss, (size_t)rows * sizeof(double));
    for (long r = 0; r < rows; r++) {
        double ss = 0.0;
        for (int c = 0; c < C; c++) {
            size_t o = (size_t)r * C + c;
            float a = peer ? gu[o] : 0.0f, v = gv[o];
            if (!gd[r] && (a != 0.0f || v != 0.0f))
                fail_msg("%s: row %ld is clean but reads %g, %g", what, r, a, v);
            ss += (double)a * a + (double)v * v;
        }
        if (!(fabs(gs[r] - ss) <= 4.0 * C * ldexp(1.0, -53) * ss))
            fail_msg("%s: row_ss[%ld] = %.17g, the row's sum of squares %.17g", what, r, gs[r], ss);
        if (!gd[r] && gs[r] != 0.0) fail_msg("%s: row_ss[%ld] of a clean row %g", what, r, gs[r]);
    }
    free(gd); free(gu); free(gv); free(gs); free(dx); free(dgate);
    void *dev[] = {d_start, d_slot, d_row, d_x, d_dy, d_gate, d_pre, d_dx, d_dg};
    for (size_t i = 0; i < sizeof dev / sizeof dev[0]; i++) gpu->free(dev[i]);
}

static void check_grad_modes(int peer, int bf16, int C) {
    int S = 4;
    long rows = 12;
    size_t n = (size_t)rows * C;
    float *U = frand(n, -1, 1), *V = frand(n, -1, 1);
    if (bf16) { truncate_bf16(U, n); truncate_bf16(V, n); }
    grad_tables g = grad_tables_make(peer, bf16, rows, C, U, V);
    static const int32_t A[] = {0, 1, 2, 5}, B[] = {2, 3, 7}, Cs[] = {1, 3, 11};
    struct { const int32_t *set; int n_set, M, overwrite; const char *name; } plan[] = {
        {A, 4, 40, 1, "step 1, overwrite"},
        {B, 3, 10, 0, "step 1, accumulate"},
        {Cs, 3, 12, 1, "step 2, overwrite"},
        {Cs, 3, 0, 1, "step 3, overwrite, no records"},
    };
    for (int p = 0; p < 4; p++) {
        grad_batch b = grad_batch_make(plan[p].M, S, C, plan[p].set, plan[p].n_set, bf16);
        char name[120];
        snprintf(name, sizeof name, "grad modes %s%s C %d, %s", peer ? "peer" : "pkm",
                 bf16 ? " bf16" : "", C, plan[p].name);
        // the forward too: its 16-byte (C = 40) and scalar (C = 42) passes
        grad_step(&g, &b, plan[p].overwrite, 1, g_tol, name);
        grad_batch_free(&b);
    }
    grad_tables_free(&g);
}

static void test_expert_grad_modes(void **state) {
    (void)state;
    for (int C = 40; C <= 42; C += 2) {   // 16-byte loads (C % 8 == 0), and scalar ones
        check_grad_modes(1, 0, C);
        check_grad_modes(0, 0, C);
        check_grad_modes(1, 1, C);
        check_grad_modes(0, 1, C);
    }
}

#ifdef MP_HAVE_CUDA
// Rows with more than MP_CUDA_GRAD_SEG records (a collapsed router's), which the CUDA
// backend sums segment by segment (the last one takes the remainder) and then adds the
// segments' sums in order, against the CPU's one sum in record order: three segments (the
// last of 1576 records), two (the last of 1025), one (a row of 1025), exactly
// MP_CUDA_GRAD_SEG records (one sum, the boundary) in an overwrite and in an accumulate
// step, a hot row added to (accumulate) and one zeroed by the next step's overwrite. Exact arithmetic makes the two
// orders comparable bit for bit: x, dy, U and V are multiples of 1/4 in [-1/2, 1/2] (bf16
// values too), gates k/4 (k = 1..4), pre-activations multiples of 1/16 in [-2, 2] with ReLU
// (act' is 0 or 1). Then dy . v is a multiple of 1/16 of magnitude <= C/4, dpre = gate
// (dy . v) act' and g = gate act(pre) multiples of 1/64, and every term of dU (dpre x, at
// most 5.25 at C = 42) and dV (g dy, at most 1) a multiple of 2^-8; a row's sums over at
// most 3624 + 1100 records stay below 2^15 in magnitude, so every partial sum, in any order,
// is a multiple of 2^-8 that fp32's 24 bits hold exactly. A missed, repeated or misplaced
// record or segment changes a sum unless its terms happen to cancel.
static float *dyadic(size_t n, int lo, int hi, float unit) {   // k unit, k in [lo, hi]
    float *x = frand(n, 0, 1);
    for (size_t i = 0; i < n; i++) {
        int k = lo + (int)(x[i] * (float)(hi - lo + 1));
        x[i] = (float)(k > hi ? hi : k) * unit;
    }
    return x;
}

static void shuffle_i32(int32_t *v, int64_t n) {   // Fisher-Yates, from the test's stream
    float *u01 = frand((size_t)n, 0, 1);
    for (int64_t a = n - 1; a > 0; a--) {
        int64_t b = (int64_t)(u01[a] * (float)(a + 1));
        if (b > a) b = a;
        int32_t t = v[a]; v[a] = v[b]; v[b] = t;
    }
    free(u01);
}

static void check_grad_hot_rows(int peer, int bf16, int C) {
    const int SEG = MP_CUDA_GRAD_SEG, S = 2;   // S records per token
    long rows = 8;
    size_t n = (size_t)rows * C;
    grad_tables g = grad_tables_make(peer, bf16, rows, C, dyadic(n, -2, 2, 0.25f),
                                     dyadic(n, -2, 2, 0.25f));
    struct { int count[8], overwrite; const char *name; } plan[] = {   // records per row
        {{3 * SEG + 552, 0, 0, SEG + 1, 0, SEG, 7, 0}, 1, "step 1, overwrite"},
        {{SEG + 76, 7, 0, SEG, 0, 2 * SEG + 1, 0, 0}, 0, "step 1, accumulate"},
        {{0, 0, SEG + 476, 0, 0, 0, 4, 0}, 1, "step 2, overwrite"},
    };
    for (int p = 0; p < 3; p++) {
        grad_batch b = {0};
        for (int r = 0; r < rows; r++) b.R += plan[p].count[r];
        b.M = (int)(b.R / S);   // the counts add up to an even R
        size_t MC = (size_t)b.M * C;
        b.start = malloc((size_t)(b.M + 1) * sizeof(int64_t));
        b.slot = malloc((size_t)b.R * 4);
        b.row = malloc((size_t)b.R * 4);
        for (int m = 0; m <= b.M; m++) b.start[m] = (int64_t)m * S;
        int64_t i = 0;
        for (int r = 0; r < rows; r++)
            for (int j = 0; j < plan[p].count[r]; j++) b.row[i++] = r;
        shuffle_i32(b.row, b.R);
        for (i = 0; i < b.R; i++) b.slot[i] = (int32_t)(i / S);
        b.x = dyadic(MC, -2, 2, 0.25f);
        b.dy = dyadic(MC, -2, 2, 0.25f);
        b.gate = dyadic((size_t)b.R, 1, 4, 0.25f);
        b.pre = dyadic((size_t)b.R, -32, 32, 1.0f / 16);
        char name[120];
        snprintf(name, sizeof name, "hot rows %s%s C %d, %s", peer ? "peer" : "pkm",
                 bf16 ? " bf16" : "", C, plan[p].name);
        grad_step(&g, &b, plan[p].overwrite, 0, 0.0, name);
        grad_batch_free(&b);
    }
    grad_tables_free(&g);
}

static void test_expert_grad_hot_rows(void **state) {
    (void)state;
    for (int C = 40; C <= 42; C += 2) {   // 16-byte loads (C % 8 == 0), and scalar ones
        check_grad_hot_rows(1, 0, C);
        check_grad_hot_rows(0, 0, C);
        check_grad_hot_rows(1, 1, C);
        check_grad_hot_rows(0, 1, C);
    }
}

// The route's backward with sub-keys that hold more than MP_CUDA_SUBKEY_SEG records (a
// router collapsed onto a few sub-keys), which the CUDA backend sums by segments and then
// adds the segments' sums in order, against the CPU's one sum in record order: three
// segments (the last of 4796 records), two (the last of 4097), one (keys of 4097, 7096 and
// 4747 records), exactly MP_CUDA_SUBKEY_SEG records (the boundary) and a key without
// records. Bit for bit, by
// exact arithmetic as in check_grad_hot_rows: gates are multiples of 1/8 in [1/8, 1/2],
// the gate gradients multiples of 1/8 in [-1/2, 1/2], qn, K1 and K2 multiples of 1/4 in
// [-1/2, 1/2]. With k = 4 the softmax's sum is a multiple of 1/64 of magnitude <= 1, the
// score gradient ds a multiple of 2^-9 of magnitude <= 3/4, each term ds qn of dK a
// multiple of 2^-11 of magnitude <= 3/8, and a key's sum over at most 12988 records (plus
// its old value, a multiple of 1/16 of magnitude <= 1/2) below 2^13: 24 bits, which fp32
// holds exactly in any order. dqn (sums of ds K over k) and ds are exact likewise.
static void test_subkey_grad_hot_keys(void **state) {
    (void)state;
    const int SEG = MP_CUDA_SUBKEY_SEG, H = 2, k = 4, dk = 16, n = 8, S = H * k, half = dk / 2;
    const int counts[2][8] = {   // records per sub-key, first and second half
        {3 * SEG + 700, 529, 529, SEG + 1, 529, SEG, 528, 0},
        {652, SEG + 3000, 652, 652, 652, 652, 2 * SEG + 1, 4747},
    };
    int64_t R = 0;
    for (int a = 0; a < n; a++) R += counts[0][a];
    int N = (int)(R / S);   // 23296 records, 2912 tokens
    int32_t *sel[2];
    for (int side = 0; side < 2; side++) {
        sel[side] = malloc((size_t)R * 4);
        int64_t i = 0;
        for (int a = 0; a < n; a++)
            for (int j = 0; j < counts[side][a]; j++) sel[side][i++] = a;
        assert_int_equal(i, R);
        shuffle_i32(sel[side], R);   // the records' keys in a shuffled order
    }
    size_t NHD = (size_t)N * H * dk, NK = (size_t)n * half;
    float *gate = dyadic((size_t)R, 1, 4, 0.125f), *dgate = dyadic((size_t)R, -4, 4, 0.125f);
    float *qn = dyadic(NHD, -2, 2, 0.25f), *k1 = dyadic(NK, -2, 2, 0.25f);
    float *k2 = dyadic(NK, -2, 2, 0.25f);
    float *dk1 = dyadic(NK, -8, 8, 0.0625f), *dk2 = dyadic(NK, -8, 8, 0.0625f);
    float *d_gate = dev_copy(gate, (size_t)R * 4), *d_dgate = dev_copy(dgate, (size_t)R * 4);
    float *d_qn = dev_copy(qn, NHD * 4), *d_k1 = dev_copy(k1, NK * 4), *d_k2 = dev_copy(k2, NK * 4);
    float *d_dk1 = dev_copy(dk1, NK * 4), *d_dk2 = dev_copy(dk2, NK * 4);
    int32_t *d_sa = dev_copy(sel[0], (size_t)R * 4), *d_sb = dev_copy(sel[1], (size_t)R * 4);
    float *dqn = malloc(NHD * 4), *d_dqn = gpu->alloc(NHD * 4);
    cpu->retrieval_route_backward(dqn, dk1, dk2, dgate, gate, sel[0], sel[1], qn, k1, k2, N, H,
                                  dk, n, k);
    gpu->retrieval_route_backward(d_dqn, d_dk1, d_dk2, d_dgate, d_gate, d_sa, d_sb, d_qn, d_k1,
                                  d_k2, N, H, dk, n, k);
    float *g = host_copy(d_dk1, NK * 4);
    expect_close("hot sub-keys: dK1", g, dk1, NK, 0.0);
    free(g);
    g = host_copy(d_dk2, NK * 4);
    expect_close("hot sub-keys: dK2", g, dk2, NK, 0.0);
    free(g);
    g = host_copy(d_dqn, NHD * 4);
    expect_close("hot sub-keys: dqn", g, dqn, NHD, 0.0);
    free(g);
    g = host_copy(d_dgate, (size_t)R * 4);
    expect_close("hot sub-keys: score gradients", g, dgate, (size_t)R, 0.0);
    free(g);
    void *dev[] = {d_gate, d_dgate, d_qn, d_k1, d_k2, d_dk1, d_dk2, d_sa, d_sb, d_dqn};
    for (size_t i = 0; i < sizeof dev / sizeof dev[0]; i++) gpu->free(dev[i]);
    free(sel[0]); free(sel[1]); free(gate); free(dgate); free(qn); free(k1); free(k2);
    free(dk1); free(dk2); free(dqn);
}
#endif

// "huge": element offsets past 2^31, checked by value. Expert tables of C = 1024 and
// 2^21 + 64 rows (2^31 + 2^16 elements, 8 GiB each of U, V, dU, dV: on the emulator with
// MP_EMU_SPARSE=1 only the pages written are committed), records on rows on both sides of
// the 2^31-element mark and on the last row. y, pre, dx, dgate, the touched rows of dU, dV
// and their row_ss, and the dirty flags (the touched rows and no other) against a host
// computation of just those rows in double. Tolerance TOL: fp32 sums of C = 1024 products of
// values in [-1, 1] (and of <= 48 record terms) whose rounding errors, 2^-24 relative each,
// add up like a random walk, ~sqrt(C) 2^-24 ~ 2e-6 of the result's norm; an offset computed
// in 32 bits reads another row, an O(1) error.
static double gelu_d(double x) { return 0.5 * x * (1.0 + erf(x * M_SQRT1_2)); }
static double gelu_grad_d(double x) {
    return 0.5 * (1.0 + erf(x * M_SQRT1_2)) + x * exp(-0.5 * x * x) * 0.3989422804014327;
}

static void test_experts_huge(void **state) {
    (void)state;
    int C = 1024, M = 8, S = 6, R = M * S;
    long rows = (1L << 21) + 64;
    size_t n = (size_t)rows * C;   // 2^31 + 2^16 elements
    static const int32_t set[] = {3, (1 << 20) + 7, (1 << 21) - 1, 1 << 21, (1 << 21) + 1,
                                  (1 << 21) + 63};
    enum { NSET = 6 };
    float *Uh = frand((size_t)NSET * C, -1, 1), *Vh = frand((size_t)NSET * C, -1, 1);
    float *x = frand((size_t)M * C, -1, 1), *dy = frand((size_t)M * C, -1, 1);
    float *gate = frand(R, 0, 1);
    int64_t start[9];
    int32_t slot[48], row[48], which[48];   // which: the record's row as an index into set
    for (int m = 0; m <= M; m++) start[m] = (int64_t)m * S;
    for (int i = 0; i < R; i++) {
        slot[i] = i / S;
        which[i] = (i + i / S) % NSET;
        row[i] = set[which[i]];
    }
    float *d_U = gpu->alloc(n * 4), *d_V = gpu->alloc(n * 4), *d_du = gpu->alloc(n * 4),
          *d_dv = gpu->alloc(n * 4);
    uint8_t *d_dirty = gpu->alloc((size_t)rows);
    double *d_ss = gpu->alloc((size_t)rows * sizeof(double));
    for (int j = 0; j < NSET; j++) {
        gpu->from_host(d_U + (size_t)set[j] * C, Uh + (size_t)j * C, (size_t)C * 4);
        gpu->from_host(d_V + (size_t)set[j] * C, Vh + (size_t)j * C, (size_t)C * 4);
    }
    void *d_start = dev_copy(start, sizeof start), *d_slot = dev_copy(slot, sizeof slot),
         *d_row = dev_copy(row, sizeof row), *d_gate = dev_copy(gate, (size_t)R * 4),
         *d_x = dev_copy(x, (size_t)M * C * 4), *d_dy = dev_copy(dy, (size_t)M * C * 4);
    float *d_y = gpu->alloc((size_t)M * C * 4), *d_pre = gpu->alloc((size_t)R * 4),
          *d_dx = gpu->alloc((size_t)M * C * 4), *d_dg = gpu->alloc((size_t)R * 4);
    mp_expert_tables t = {.u = d_U, .v = d_V, .du = d_du, .dv = d_dv, .dirty = d_dirty,
                          .rows = rows};
    gpu->experts_forward(&t, d_y, d_x, M, d_start, d_slot, d_row, d_gate, d_pre, R, C, 0);
    gpu->experts_backward(&t, d_dx, d_dg, d_dy, d_x, M, d_start, d_slot, d_row, d_gate, d_pre, R,
                          C, 0, 1, d_ss);
    float *pre = host_copy(d_pre, (size_t)R * 4);
    // the host's: forward from the tables, backward from the GPU's pre (as the op takes it)
    size_t MC = (size_t)M * C, SC = (size_t)NSET * C;
    float *y_r = calloc(MC, 4), *dx_r = calloc(MC, 4), *du_r = calloc(SC, 4), *dv_r = calloc(SC, 4);
    float *pre_r = malloc((size_t)R * 4), *dg_r = malloc((size_t)R * 4);
    double *acc = calloc(MC + 2 * SC, sizeof(double));   // y, dx (M, C); du, dv sums (NSET, C)
    double *y_a = acc, *du_a = acc + MC, *dv_a = acc + MC + SC, *dx_a = calloc(MC, sizeof(double));
    for (int i = 0; i < R; i++) {
        const float *u = Uh + (size_t)which[i] * C, *v = Vh + (size_t)which[i] * C;
        const float *xm = x + (size_t)slot[i] * C, *dym = dy + (size_t)slot[i] * C;
        double h = 0.0, dot = 0.0;
        for (int c = 0; c < C; c++) { h += (double)u[c] * xm[c]; dot += (double)dym[c] * v[c]; }
        pre_r[i] = (float)h;
        double w = gate[i] * gelu_d(h), hp = pre[i];
        double dpre = gate[i] * dot * gelu_grad_d(hp);
        dg_r[i] = (float)(gelu_d(hp) * dot);
        for (int c = 0; c < C; c++) {
            y_a[(size_t)slot[i] * C + c] += w * v[c];
            dx_a[(size_t)slot[i] * C + c] += dpre * u[c];
            dv_a[(size_t)which[i] * C + c] += gate[i] * gelu_d(hp) * dym[c];
            du_a[(size_t)which[i] * C + c] += dpre * xm[c];
        }
    }
    for (size_t i = 0; i < MC; i++) { y_r[i] = (float)y_a[i]; dx_r[i] = (float)dx_a[i]; }
    for (size_t i = 0; i < SC; i++) { du_r[i] = (float)du_a[i]; dv_r[i] = (float)dv_a[i]; }
    expect_dev("huge: y", d_y, y_r, MC);
    expect_close("huge: pre", pre, pre_r, (size_t)R, TOL);
    expect_dev("huge: dx", d_dx, dx_r, MC);
    expect_dev("huge: dgate", d_dg, dg_r, (size_t)R);
    float *gu = malloc(SC * 4), *gv = malloc(SC * 4);
    double *gs = host_copy(d_ss, (size_t)rows * sizeof(double));
    for (int j = 0; j < NSET; j++) {
        gpu->to_host(gu + (size_t)j * C, d_du + (size_t)set[j] * C, (size_t)C * 4);
        gpu->to_host(gv + (size_t)j * C, d_dv + (size_t)set[j] * C, (size_t)C * 4);
        double ss = 0.0;
        for (int c = 0; c < C; c++)
            ss += (double)gu[(size_t)j * C + c] * gu[(size_t)j * C + c] +
                  (double)gv[(size_t)j * C + c] * gv[(size_t)j * C + c];
        // squares exact in double; two orders of 2C terms: 2 (2C) 2^-53 relative
        if (!(fabs(gs[set[j]] - ss) <= 4.0 * C * ldexp(1.0, -53) * ss))
            fail_msg("huge: row_ss[%d] = %.17g, the row's sum of squares %.17g", set[j], gs[set[j]], ss);
    }
    expect_close("huge: du rows", gu, du_r, SC, TOL);
    expect_close("huge: dv rows", gv, dv_r, SC, TOL);
    uint8_t *dirty = host_copy(d_dirty, (size_t)rows);
    long n_dirty = 0;
    for (long r = 0; r < rows; r++) n_dirty += dirty[r];
    for (int j = 0; j < NSET; j++) assert_int_equal(dirty[set[j]], 1);
    assert_int_equal(n_dirty, NSET);
    printf("huge: %ld rows x %d (%zu elements), rows up to %d: ok\n", rows, C, n, set[NSET - 1]);
    void *dev[] = {d_U, d_V, d_du, d_dv, d_dirty, d_ss, d_start, d_slot, d_row, d_gate, d_x,
                   d_dy, d_y, d_pre, d_dx, d_dg};
    for (size_t i = 0; i < sizeof dev / sizeof dev[0]; i++) gpu->free(dev[i]);
    free(Uh); free(Vh); free(x); free(dy); free(gate); free(pre); free(y_r); free(dx_r);
    free(du_r); free(dv_r); free(pre_r); free(dg_r); free(acc); free(dx_a); free(gu); free(gv);
    free(gs); free(dirty);
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
    mp_adamw oc, og;
    mp_adamw_init(&oc, mc);
    mp_adamw_init(&og, mg);
    mp_model_zero_grad(mc);
    mp_model_zero_grad(mg);
    lc = mp_model_forward(mc, in, tg, B, T, 1);
    float lg = mp_model_forward(mg, in, tg, B, T, 1);
    expect_close("model loss", &lg, &lc, 1, TOL);
    mp_model_backward(mc, 1.0f);
    mp_model_backward(mg, 1.0f);
    expect_grads(mg, mc, "model", NULL);
    // the norm from the experts' row norms against the gradients' own squares (CPU model,
    // host memory): sums of positive doubles in two orders, <= 1e-12 apart, then sqrt and
    // rounding to float, so the two floats are at most 1 ulp (2^-23) apart; without the
    // expert part the norm falls by expert_ss / (2 total) (checked to be >= 1e-3 here)
    double ss_all = 0.0, ss_exp = 0.0;
    for (int g = 0; g < MP_N_GROUPS; g++) {
        double s = cpu->sum_squares(mp_model_grads(mc, g), mp_model_group_size(mc, g));
        ss_all += s;
        if (g == MP_GROUP_EXPERTS) ss_exp = s;
    }
    if (ss_exp < 2e-3 * ss_all) fail_msg("expert gradients too small to test: %g of %g", ss_exp, ss_all);
    float want_norm = (float)sqrt(ss_all), got_norm = mp_grad_norm(mc);
    expect_close("model grad norm from expert row norms", &got_norm, &want_norm, 1, 0x1p-22);
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

// A bf16 model with its twins and the same model without (mp_model_without_bf16_twins: every
// GEMM rounds its own activation operands) train bit for bit alike: a twin that its producer did not
// write in this step, or wrote from other values, changes the GEMM's operand. Blocks dense,
// PEER, dense, so that a dense block sits above and below the PEER one; two micro-batches
// (the second accumulates), and the losses and every gradient compared.
static void test_bf16_twins_model(void **state) {
    (void)state;
    mp_config c;
    small_config(&c, MP_FFN_PEER, 1, MP_ACT_GELU, 64, 8, 2, 4, 16);
    c.n_layers = 3;
    c.ffn[2] = MP_FFN_DENSE;
    c.context = 16;
    snprintf(c.backend, sizeof c.backend, "cuda");
    snprintf(c.precision, sizeof c.precision, "bf16");
    int B = c.batch_size, T = c.context, N = B * T;
    int32_t *in = malloc(N * 4), *tg = malloc(N * 4);
    void *grads[2];
    size_t bytes[2];
    float loss[2][2];
    for (int with = 0; with < 2; with++) {
        mp_model *m = mp_model_create(&c, gpu, B);
        if (!with) mp_model_without_bf16_twins(m);
        mp_model_init(m);
        mp_model_zero_grad(m);
        for (int mb = 0; mb < 2; mb++) {
            for (int i = 0; i < N; i++) {
                in[i] = (int32_t)(mp_hash3(9, 2 * mb, i) % c.vocab_size);
                tg[i] = (int32_t)(mp_hash3(9, 2 * mb + 1, i) % c.vocab_size);
            }
            loss[with][mb] = mp_model_forward(m, in, tg, B, T, 1);
            mp_model_backward(m, 0.5f);
        }
        grads[with] = snapshot_grads(m, &bytes[with]);
        mp_model_free(m);
    }
    assert_true(bytes[0] == bytes[1]);
    if (memcmp(loss[0], loss[1], sizeof loss[0]))
        fail_msg("bf16 losses with twins %.9g, %.9g; without %.9g, %.9g", loss[1][0], loss[1][1],
                 loss[0][0], loss[0][1]);
    if (memcmp(grads[0], grads[1], bytes[0]))
        fail_msg("bf16 gradients with twins differ from those without");
    free(grads[0]); free(grads[1]); free(in); free(tg);
}

static void test_determinism(void **state) {
    (void)state;
    check_determinism(0);
    check_determinism(1);
}

// system.precision = bf16: after an optimizer step the model says its bf16 copies of the
// dense weights and of the experts are fresh, and they are: every element equals its
// master rounded to bf16, bit for bit (the forward that follows reads the copy as it is).
// Under lazy AdamW the step rewrites only the touched expert rows' copy, so that holds
// only while the untouched rows' masters did not move otherwise: before the second step
// every expert master is halved through mp_model_params (as a load would), and then the
// copy must be refreshed by the next forward, not trusted; after the steps the dense
// masters are halved the same way. Two steps each, adamw and lazy_adamw, two micro-batches.
static void check_bf16_copy_after_steps(const char *optimizer) {
    mp_config c;
    small_config(&c, MP_FFN_PEER, 1, MP_ACT_GELU, 64, 32, 4, 8, 16);
    snprintf(c.backend, sizeof c.backend, "cuda");
    snprintf(c.precision, sizeof c.precision, "bf16");
    snprintf(c.expert_optimizer, sizeof c.expert_optimizer, "%s", optimizer);
    int B = c.batch_size, T = c.context, N = B * T;
    int32_t *in = malloc(N * 4), *tg = malloc(N * 4);
    mp_model *m = mp_model_create(&c, gpu, B);
    mp_model_init(m);
    mp_adamw opt;
    mp_adamw_init(&opt, m);
    for (int step = 0; step < 2; step++) {
        mp_model_zero_grad(m);
        for (int micro = 0; micro < 2; micro++) {
            for (int i = 0; i < N; i++) {
                in[i] = (int32_t)(mp_hash3(21 + step, micro, i) % c.vocab_size);
                tg[i] = (int32_t)(mp_hash3(22 + step, micro, i) % c.vocab_size);
            }
            mp_model_forward(m, in, tg, B, T, 1);
            mp_model_backward(m, 0.5f);
        }
        if (step == 1) {
            size_t n = mp_model_group_size(m, MP_GROUP_EXPERTS);
            float *d = mp_model_params(m, MP_GROUP_EXPERTS), *h = host_copy(d, n * 4);
            for (size_t e = 0; e < n; e++) h[e] *= 0.5f;
            gpu->from_host(d, h, n * 4);
            free(h);
        }
        mp_adamw_step(&opt, m, step);
        if (!mp_model_bf16_fresh(m, MP_GROUP_DENSE))   // AdamW rewrites every dense weight's
            fail_msg("%s: the dense weights' bf16 copy is stale after a step", optimizer);
        if (step == 0 && !mp_model_bf16_fresh(m, MP_GROUP_EXPERTS))
            fail_msg("%s: the experts' bf16 copy is stale after a step", optimizer);
    }
    // the dense masters changed as a load would change them: the next forward refreshes
    size_t nd = mp_model_group_size(m, MP_GROUP_DENSE);
    float *dd = mp_model_params(m, MP_GROUP_DENSE), *hd = host_copy(dd, nd * 4);
    for (size_t e = 0; e < nd; e++) hd[e] *= 0.5f;
    gpu->from_host(dd, hd, nd * 4);
    free(hd);
    if (mp_model_bf16_fresh(m, MP_GROUP_DENSE))
        fail_msg("%s: the dense copy is fresh after its masters were taken", optimizer);
    mp_model_forward(m, in, tg, B, T, 1);   // refreshes a copy that is stale
    if (!mp_model_bf16_fresh(m, MP_GROUP_DENSE) || !mp_model_bf16_fresh(m, MP_GROUP_EXPERTS))
        fail_msg("%s: a bf16 copy is stale after a forward", optimizer);
    int checked[MP_N_GROUPS] = {0};
    for (int i = 0; i < mp_model_n_tensors(m); i++) {
        const mp_tensor *t = mp_model_tensor(m, i);
        const uint16_t *copy = mp_model_bf16(m, t);
        if (!copy) {
            if (t->group != MP_GROUP_KEYS) fail_msg("%s: %s has no bf16 copy", optimizer, t->name);
            continue;
        }
        uint16_t *hc = host_copy(copy, t->numel * 2);
        // (taking the masters marks the copy stale: read after the freshness checks above)
        float *hp = host_copy(mp_model_params(m, t->group) + t->offset, t->numel * 4);
        for (size_t e = 0; e < t->numel; e++) {
            float want = host_bf16(hp[e]);
            uint32_t bits;
            memcpy(&bits, &want, 4);
            if (hc[e] != (uint16_t)(bits >> 16))
                fail_msg("%s: %s[%zu]: bf16 copy 0x%04x, master %.9g rounds to 0x%04x", optimizer,
                         t->name, e, hc[e], hp[e], (unsigned)(bits >> 16));
        }
        free(hc);
        free(hp);
        checked[t->group]++;
    }
    assert_int_equal(checked[MP_GROUP_EXPERTS], 2);   // U and V
    assert_true(checked[MP_GROUP_DENSE] > 10);        // embeddings, blocks, final LayerNorm
    mp_adamw_free(&opt, m);
    mp_model_free(m);
    free(in);
    free(tg);
}

static void test_bf16_copy_after_steps(void **state) {
    (void)state;
    check_bf16_copy_after_steps("adamw");
    check_bf16_copy_after_steps("lazy_adamw");
}

// every test starts at the fp32 tolerance, also after one that failed inside check_layer_at
static int reset_tolerance(void **state) {
    (void)state;
    gpu->set_precision(MP_PRECISION_FP32);   // and fp32 GEMMs, also after a bf16 test
    g_tol = TOL;
    g_track = &g_worst;
    return 0;
}

// argv[1]: "large" runs the emu_large tests (tests/CMakeLists.txt) instead of the default
// suite (argv[2]: a name filter), "huge" the test of offsets past 2^31 (32 GiB of device
// memory; the emulator needs MP_EMU_SPARSE=1); any other word is a cmocka name filter on the
// default suite (e.g. "test_layer*").
int main(int argc, char **argv) {
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
        cmocka_unit_test_setup(test_matmul_bf16, reset_tolerance),
        cmocka_unit_test_setup(test_gemm_precision, reset_tolerance),
        cmocka_unit_test_setup(test_residual_layernorm, reset_tolerance),
        cmocka_unit_test_setup(test_bf16_twins_elementwise, reset_tolerance),
        cmocka_unit_test_setup(test_bf16_twins_attention, reset_tolerance),
        cmocka_unit_test_setup(test_bf16_twins_matmul, reset_tolerance),
        cmocka_unit_test_setup(test_bf16_twins_model, reset_tolerance),
        cmocka_unit_test_setup(test_attention, reset_tolerance),
        cmocka_unit_test_setup(test_attention_bf16, reset_tolerance),
        cmocka_unit_test_setup(test_elementwise, reset_tolerance),
        cmocka_unit_test_setup(test_crossentropy, reset_tolerance),
        cmocka_unit_test_setup(test_kernel_timer, reset_tolerance),
        cmocka_unit_test_setup(test_matmul_bias_paths, reset_tolerance),
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
        cmocka_unit_test_setup(test_expert_grad_modes, reset_tolerance),
#ifdef MP_HAVE_CUDA
        cmocka_unit_test_setup(test_expert_grad_hot_rows, reset_tolerance),
        cmocka_unit_test_setup(test_subkey_grad_hot_keys, reset_tolerance),
#endif
        cmocka_unit_test_setup(test_model, reset_tolerance),
        cmocka_unit_test_setup(test_determinism, reset_tolerance),
        cmocka_unit_test_setup(test_bf16_copy_after_steps, reset_tolerance),
    };
    const struct CMUnitTest large_tests[] = {
        cmocka_unit_test_setup(test_layer_mid, reset_tolerance),
        cmocka_unit_test_setup(test_attention_large, reset_tolerance),
    };
    const struct CMUnitTest huge_tests[] = {
        cmocka_unit_test_setup(test_experts_huge, reset_tolerance),
    };
    int rc;
    if (argc > 1 && !strcmp(argv[1], "large")) {
        if (argc > 2) cmocka_set_test_filter(argv[2]);
        rc = cmocka_run_group_tests(large_tests, NULL, NULL);
    } else if (argc > 1 && !strcmp(argv[1], "huge")) {
        rc = cmocka_run_group_tests(huge_tests, NULL, NULL);
    } else {
        if (argc > 1) cmocka_set_test_filter(argv[1]);
        rc = cmocka_run_group_tests(tests, NULL, NULL);
    }
    printf("largest relative error against the CPU: %.3g (fp32, and bf16 copies of "
           "bf16-representable tables)\n", g_worst);
    printf("largest relative error of bf16 tables against the CPU's fp32: %.3g\n", g_worst_bf16);
    return rc;
}
