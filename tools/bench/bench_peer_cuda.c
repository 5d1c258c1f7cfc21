// One PEER (or PKM) layer on the GPU through the CUDA backend, timed with CUDA events:
// forward (route: query GEMM, BatchNorm, sub-key scores, top-k, gates; then the experts)
// and forward + backward (experts backward with the sorted dU/dV sums, route backward),
// one process, as training runs it (src/model/route.c, src/model/exchange.c: with one rank
// the exchange is the identity and the experts run on the route's tensors). Prints one JSON line:
// median times per phase, memory (cudaMemGetInfo) split into tables, gradients, activations
// and everything else (scratch, cuBLAS workspace). For bandwidth it gives two byte counts
// over the forward+backward time: what the kernels move (an estimate), and what the layer
// must move counted from the expert rows the batch actually touched. The second is also
// given as a fraction of the device's copy bandwidth, measured in the same run.
// tools/bench/run_gpu_bench.sh runs it beside the PyTorch layer of
// tools/bench/bench_peer_torch.py.
//
//   bench_peer_cuda [--d 1024] [--n 1024] [--heads 8] [--topk 16] [--dk 128]
//                   [--tokens 16384] [--iters 20] [--warmup 5] [--pkm] [--no-bn]
//                   [--precision fp32|bf16] [--no-check] [--collapse]
//
// After the timing it checks the layer's values (check_layer below: a few tokens' y and a
// few touched rows of dU and dV recomputed in double on the host) and prints a second JSON
// line, "check": "ok" or "FAILED: ..."; a failure makes the exit status 1. --no-check
// skips it.
//
// --precision bf16: the expert tables U, V are read only as bf16 (what system.precision =
// bf16 reads; the fp32 masters belong to the optimizer, which is not part of the layer),
// their gradients are fp32. (PEER still holds an fp32 U, all NaN and not counted: the
// backend tells PEER from PKM by it; see main.)
//
// --collapse: a router collapsed onto k experts. Sub-key balance biases (docs/model.md) of
// +1000 on the first m = ceil(sqrt(k)) sub-keys of each half, in every head, make every
// token and head select among the same m^2 >= k experts (the gates stay the softmax of the
// plain scores). When k is a square (16, the paper's) k rows get tokens x heads records each
// (131,072 at the paper's shape) and each of the m sub-keys a half m times as many: the
// worst case of the expert and sub-key gradients' hot rows (docs/cuda.md, "Expert
// gradients"). Its experts-backward and route-backward times beside a run without it are
// that case's cost; its forward is not comparable: the biases stay put (balance rate 0) but
// their update still runs, as in training, a copy of the counts to the host per step.
//
// Exits 77 (and says why) when no GPU is usable.
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "backend/cuda/cuda.h"
#include "core/log.h"
#include "core/rng.h"
#include "millipede/backend.h"
#include "model/exchange.h"
#include "model/retrieval.h"
#include "model/route.h"


static const mp_backend *be;
static size_t g_bytes_params, g_bytes_grads, g_bytes_acts;

static void *dalloc(size_t bytes, size_t *account) {
    *account += bytes;
    return be->alloc(bytes);
}

// Device tensor of n floats: kind 0 normal(0, s), 1 uniform(-s, s), 2 the constant s.
// Large tables repeat one random block of 2^24 values (the values do not affect timing).
static float *dtensor(size_t n, int kind, float s, uint64_t stream, size_t *account) {
    float *d = dalloc(n * sizeof(float), account);
    size_t blk = n < ((size_t)1 << 24) ? n : ((size_t)1 << 24);
    float *h = mp_malloc((blk ? blk : 1) * sizeof(float));
    for (size_t i = 0; i < blk; i++)
        h[i] = kind == 0 ? s * mp_normal(1, stream, i)
             : kind == 1 ? s * (2.0f * mp_uniform(1, stream, i) - 1.0f)
                         : s;
    for (size_t o = 0; o < n; o += blk) {
        size_t len = n - o < blk ? n - o : blk;
        be->from_host(d + o, h, len * sizeof(float));
    }
    free(h);
    return d;
}

// A bf16 table of n values normal(0, s): one random fp32 slice of up to 2^24 values (as
// dtensor repeats it), rounded on the device into each part of the table.
static uint16_t *bf16_table(size_t n, float s, uint64_t stream) {
    uint16_t *t = dalloc(n * sizeof(uint16_t), &g_bytes_params);
    size_t blk = n < ((size_t)1 << 24) ? n : ((size_t)1 << 24), unused = 0;
    float *tmp = dtensor(blk, 0, s, stream, &unused);
    for (size_t o = 0; o < n; o += blk) be->to_bf16(t + o, tmp, n - o < blk ? n - o : blk);
    be->free(tmp);
    return t;
}

// Bytes of the route's backward: gate softmax, dq, dK sums, the dWq and dx GEMMs (fp32).
static double route_b_bytes(double N, double NS, double HD, double half, double d, double NC) {
    return 4.0 * (6.0 * NS + 2.0 * NS * half + 4.0 * N * HD          // softmax, dq, dK
                  + 2.0 * (N * HD + NC + 2.0 * HD * d)               // dWq GEMM
                  + (N * HD + HD * d + 2.0 * NC));                   // dx GEMM
}

static int cmp_float(const void *a, const void *b) {
    float x = *(const float *)a, y = *(const float *)b;
    return (x > y) - (x < y);
}

static float median(float *v, int n) {
    qsort(v, (size_t)n, sizeof(float), cmp_float);
    return n % 2 ? v[n / 2] : 0.5f * (v[n / 2 - 1] + v[n / 2]);
}

// The device's copy bandwidth in TB/s (bytes read + written): a device-to-device copy of
// `bytes`, the median of 5.
static double copy_tbps(size_t bytes) {
    size_t unused = 0;
    void *a = dalloc(bytes, &unused), *b = dalloc(bytes, &unused);
    mp_cuda_event *e0 = mp_cuda_event_new(), *e1 = mp_cuda_event_new();
    float t[5];
    be->to_host(b, a, bytes);   // warm-up
    for (int i = 0; i < 5; i++) {
        mp_cuda_event_record(e0);
        be->to_host(b, a, bytes);   // both device pointers: a device-to-device copy
        mp_cuda_event_record(e1);
        t[i] = mp_cuda_event_ms(e0, e1);
    }
    mp_cuda_event_free(e0);
    mp_cuda_event_free(e1);
    be->free(a);
    be->free(b);
    return 2.0 * bytes / (median(t, 5) * 1e-3) / 1e12;
}

static int cmp_i32(const void *a, const void *b) {
    int32_t x = *(const int32_t *)a, y = *(const int32_t *)b;
    return (x > y) - (x < y);
}

// ---------------------------------------------------------------------------------------
// The value check (on unless --no-check): after the timing, one more forward and backward
// with fresh expert gradients; then a few tokens' y and all of a few touched rows' dU and
// dV are recomputed in double on the host from host copies of what the kernels read (x,
// dy, the selected ids and gates, the expert rows of U and V at their precision) and
// compared element by element with a bound on the fp32 rounding of that arithmetic. The
// route (query, BN, scores, top-k) is checked by unit.test_cuda_backend against the CPU;
// here its outputs are inputs, checked only for what holds exactly: ids in range, distinct
// within a head, gates in [0, 1].

typedef struct {
    double y, du, dv;             // largest |got - ref| / bound (<= 1 passes)
    double y_rel, du_rel, dv_rel; // largest |got - ref| / largest |ref| (for the log)
    int tokens, rows;             // how many were checked
    char what[160];               // the first failure, "" if none
} check_result;

static const double U32 = 1.0 / 16777216.0;   // fp32 unit roundoff 2^-24
static const double U16 = 1.0 / 256.0;        // bf16 unit roundoff 2^-8

// gamma_n = n u / (1 - n u): the relative bound of n fp32 roundings in a row (Higham)
static double gamma32(double n) { return n * U32 / (1.0 - n * U32); }

static double bf16_value(uint16_t h) {
    uint32_t b = (uint32_t)h << 16;
    float f;
    memcpy(&f, &b, sizeof f);
    return f;
}

// Expert row `row` (d values) of a table, as the kernels read it (fp32 or bf16), in double.
static void table_row(double *out, const float *f32, const uint16_t *b16, long row, int d) {
    if (b16) {
        uint16_t *h = mp_malloc((size_t)d * sizeof(uint16_t));
        be->to_host(h, b16 + (size_t)row * d, (size_t)d * sizeof(uint16_t));
        for (int c = 0; c < d; c++) out[c] = bf16_value(h[c]);
        free(h);
    } else {
        float *h = mp_malloc((size_t)d * sizeof(float));
        be->to_host(h, f32 + (size_t)row * d, (size_t)d * sizeof(float));
        for (int c = 0; c < d; c++) out[c] = h[c];
        free(h);
    }
}

// One record (token t selected row e with gate g) in double, with the fp32 error bounds of
// what the kernels compute from it. PEER with GELU (exact, erf), what this benchmark builds:
//   p = u_e . x_t (d products summed in fp32): |error| <= gamma_d P, P = sum |u_i x_i|;
//   a = gelu(p): |gelu'| <= 1.13, so p's error moves a by <= 1.13 gamma_d P; evaluating it
//     (erff to 2 ulp, 0.5 p + 0.5 p erf: terms of size <= |p|/2) adds <= 8 u (|a| + |p|);
//   s = dy_t . v_e (backward, fp32 dy): |error| <= gamma_d S, S = sum |dy_i v_i|;
//   a' = gelu'(p) from the stored fp32 p: |gelu''| <= 0.8, so <= 0.8 gamma_d P, plus 16 u
//     for its evaluation (terms 0.5 (1 + erf) <= 1 and p phi(p) <= 0.25).
// PKM: a = 1 exactly (values only).
typedef struct {
    double g, a, da, ad, dad, s, ds;
} record;

static record eval_record(const double *urow, const double *vrow, const float *x, const float *dy,
                          float g, int d, int pkm) {
    record r = {.g = g, .a = 1.0, .ad = 0.0};
    double p = 0, P = 0, s = 0, S = 0;
    for (int c = 0; c < d; c++) {
        if (!pkm) {
            p += urow[c] * x[c];
            P += fabs(urow[c] * x[c]);
        }
        s += (double)dy[c] * vrow[c];
        S += fabs((double)dy[c] * vrow[c]);
    }
    if (!pkm) {
        double cdf = 0.5 * (1.0 + erf(p / sqrt(2.0))), pdf = exp(-0.5 * p * p) / sqrt(2.0 * M_PI);
        r.a = p * cdf;
        r.ad = cdf + p * pdf;
        r.da = 1.13 * gamma32(d) * P + 8.0 * U32 * (fabs(r.a) + fabs(p));
        r.dad = 0.8 * gamma32(d) * P + 16.0 * U32;
    }
    r.s = s;
    r.ds = gamma32(d) * S;
    return r;
}

// |got - ref| against bound, recorded into *worst (ratio) and *rel; the first failure named.
static void compare(check_result *cr, double *worst, double *rel, double *refmax, double got,
                    double ref, double bound, const char *what, long i, int c) {
    double err = fabs(got - ref);
    // NaN (an element not written: y starts as NaN) fails: !(x <= b) is true for NaN
    if (!(err <= bound) && !cr->what[0])
        snprintf(cr->what, sizeof cr->what, "%s[%ld][%d] = %.9g, expected %.9g (bound %.3g)",
                 what, i, c, got, ref, bound);
    double ratio = bound > 0 ? err / bound : (err > 0 ? INFINITY : 0);
    if (!(ratio <= *worst)) *worst = ratio;
    if (fabs(ref) > *refmax) *refmax = fabs(ref);
    if (!(err <= *rel)) *rel = err;
}

// Runs the layer once more (y poisoned with NaN first, dU and dV zeroed by the caller),
// then checks as above. Returns 0 when every checked element is within its bound.
static int check_layer(mp_retrieval_layer *l, const float *x, const float *dy, float *y,
                       float *dx, int N, int d, int bf16, int pkm, check_result *cr) {
    const mp_retrieval_config *rc = l->rc;
    int H = rc->heads, k = rc->topk, S = H * k;
    size_t NC = (size_t)N * d, NS = (size_t)N * S;
    memset(cr, 0, sizeof *cr);
    float *hy = mp_malloc(NC * sizeof(float));
    for (size_t i = 0; i < NC; i++) hy[i] = NAN;
    be->from_host(y, hy, NC * sizeof(float));
    mp_route_forward(l, be, x, N, 1);
    mp_exchange_forward(&l->ex, l, y, x, N);
    l->grad_overwrite = 1;   // a training step's first backward: the rows written afresh
    mp_exchange_backward(&l->ex, l, dx, dy, x, N);

    float *hx = mp_malloc(NC * sizeof(float)), *hdy = mp_malloc(NC * sizeof(float));
    float *hgate = mp_malloc(NS * sizeof(float));
    int32_t *hsel = mp_malloc(NS * sizeof(int32_t));
    be->to_host(hy, y, NC * sizeof(float));
    be->to_host(hx, x, NC * sizeof(float));
    be->to_host(hdy, dy, NC * sizeof(float));
    be->to_host(hgate, l->gate, NS * sizeof(float));
    be->to_host(hsel, l->sel, NS * sizeof(int32_t));

    // the route's outputs: exact properties only
    for (size_t th = 0; th < (size_t)N * H && !cr->what[0]; th++) {
        const int32_t *id = hsel + th * k;
        const float *g = hgate + th * k;
        for (int j = 0; j < k && !cr->what[0]; j++) {
            if (id[j] < 0 || id[j] >= rc->n_experts || !(g[j] >= 0.0f && g[j] <= 1.0f))
                snprintf(cr->what, sizeof cr->what, "route: token %zu head %zu: id %d gate %g",
                         th / H, th % H, id[j], g[j]);
            for (int j2 = 0; j2 < j && !cr->what[0]; j2++)
                if (id[j2] == id[j])
                    snprintf(cr->what, sizeof cr->what, "route: token %zu head %zu: id %d twice",
                             th / H, th % H, id[j]);
        }
    }

    double *urow = mp_calloc((size_t)d, sizeof(double)), *vrow = mp_calloc((size_t)d, sizeof(double));
    double *ref = mp_malloc((size_t)d * sizeof(double)), *bnd = mp_malloc((size_t)d * sizeof(double));
    double *ref2 = mp_malloc((size_t)d * sizeof(double)), *bnd2 = mp_malloc((size_t)d * sizeof(double));
    const float *U = pkm ? NULL : l->u, *V = l->v;
    const uint16_t *U16b = pkm ? NULL : l->u_bf16, *V16b = l->v_bf16;
    double y_max = 0, du_max = 0, dv_max = 0;

    // y of a few tokens: y_t = sum over its S records of g a v_e, summed in fp32
    int toks[6] = {0, 1, N / 4, N / 2, (3 * N) / 4, N - 1};
    for (int ti = 0; ti < 6; ti++) toks[ti] = toks[ti] < N ? toks[ti] : N - 1;   // N = 1
    for (int ti = 0; ti < 6 && !cr->what[0]; ti++) {
        int t = toks[ti];
        int dup = 0;   // tiny N: the same token again
        for (int t2 = 0; t2 < ti; t2++) dup |= toks[t2] == t;
        if (dup) continue;
        for (int c = 0; c < d; c++) ref[c] = bnd[c] = 0;
        double *mag = ref2;   // sum |g a v_c|, for the summation's rounding
        for (int c = 0; c < d; c++) mag[c] = 0;
        for (int j = 0; j < S; j++) {
            long e = hsel[(size_t)t * S + j];
            if (!pkm) table_row(urow, U, U16b, e, d);
            table_row(vrow, V, V16b, e, d);
            record r = eval_record(urow, vrow, hx + (size_t)t * d, hdy + (size_t)t * d,
                                   hgate[(size_t)t * S + j], d, pkm);
            for (int c = 0; c < d; c++) {
                ref[c] += r.g * r.a * vrow[c];
                bnd[c] += fabs(r.g * vrow[c]) * r.da;
                mag[c] += fabs(r.g * r.a * vrow[c]);
            }
        }
        // the product g a v (2 roundings) and a sum of S terms: gamma_{S+2} of the magnitudes;
        // x2 for the second-order terms the first-order bounds above leave out
        for (int c = 0; c < d; c++)
            compare(cr, &cr->y, &cr->y_rel, &y_max, hy[(size_t)t * d + c], ref[c],
                    2.0 * (bnd[c] + gamma32(S + 2) * mag[c]), "y", t, c);
        cr->tokens++;
    }

    // dU, dV of a few touched rows: the rows of the checked tokens' first records and the
    // largest id touched (the far end of the table, where 32-bit offsets would wrap)
    long rows_chk[7];
    int nrows = 0;
    int32_t emax = 0;
    for (size_t i = 0; i < NS; i++) emax = hsel[i] > emax ? hsel[i] : emax;
    for (int ti = 0; ti < 6; ti++) rows_chk[nrows++] = hsel[(size_t)toks[ti] * S];
    rows_chk[nrows++] = emax;
    float *hdu = mp_malloc((size_t)d * sizeof(float)), *hdv = mp_malloc((size_t)d * sizeof(float));
    // bf16: the dU / dV sums read x and dy rounded to bf16 (docs/cuda.md): 2^-8 relative
    // per term; the dx side (s = dy . v) and the forward keep fp32 activations
    double eps_act = bf16 ? U16 : 0.0;
    for (int ri = 0; ri < nrows && !cr->what[0]; ri++) {
        long e = rows_chk[ri];
        int dup = 0;
        for (int r2 = 0; r2 < ri; r2++) dup |= rows_chk[r2] == e;
        if (dup) continue;
        if (!pkm) table_row(urow, U, U16b, e, d);
        table_row(vrow, V, V16b, e, d);
        double *mu = mp_calloc((size_t)d, sizeof(double)), *mv = mp_calloc((size_t)d, sizeof(double));
        for (int c = 0; c < d; c++) ref[c] = bnd[c] = ref2[c] = bnd2[c] = 0;
        long R = 0;
        for (size_t i = 0; i < NS; i++) {
            if (hsel[i] != e) continue;
            size_t t = i / S;
            const float *xt = hx + t * d, *dyt = hdy + t * d;
            record r = eval_record(urow, vrow, xt, dyt, hgate[i], d, pkm);
            // dpre = g a' s and its error: |g| (|a'| ds + |s| da' + ds da' + 4 u |a' s|)
            double dpre = r.g * r.ad * r.s;
            double ddpre = fabs(r.g) * (fabs(r.ad) * r.ds + fabs(r.s) * r.dad + r.ds * r.dad +
                                        4.0 * U32 * fabs(r.ad * r.s));
            for (int c = 0; c < d; c++) {
                ref[c] += dpre * xt[c];                       // dU
                bnd[c] += fabs((double)xt[c]) * ddpre;
                mu[c] += fabs(dpre * xt[c]);
                ref2[c] += r.g * r.a * dyt[c];                // dV
                bnd2[c] += fabs(r.g * (double)dyt[c]) * r.da;
                mv[c] += fabs(r.g * r.a * dyt[c]);
            }
            R++;
        }
        if (!pkm) be->to_host(hdu, l->du + (size_t)e * d, (size_t)d * sizeof(float));
        be->to_host(hdv, l->dv + (size_t)e * d, (size_t)d * sizeof(float));
        // R terms summed (and each a product of 2 or 3 roundings), x2 as for y
        for (int c = 0; c < d; c++) {
            if (!pkm)
                compare(cr, &cr->du, &cr->du_rel, &du_max, hdu[c], ref[c],
                        2.0 * (bnd[c] + (eps_act + gamma32((double)R + 3)) * mu[c]), "dU", e, c);
            compare(cr, &cr->dv, &cr->dv_rel, &dv_max, hdv[c], ref2[c],
                    2.0 * (bnd2[c] + (eps_act + gamma32((double)R + 3)) * mv[c]), "dV", e, c);
        }
        free(mu);
        free(mv);
        cr->rows++;
    }
    cr->y_rel = y_max > 0 ? cr->y_rel / y_max : cr->y_rel;
    cr->du_rel = du_max > 0 ? cr->du_rel / du_max : cr->du_rel;
    cr->dv_rel = dv_max > 0 ? cr->dv_rel / dv_max : cr->dv_rel;
    free(hy); free(hx); free(hdy); free(hgate); free(hsel); free(urow); free(vrow);
    free(ref); free(bnd); free(ref2); free(bnd2); free(hdu); free(hdv);
    return cr->what[0] != 0;
}

int main(int argc, char **argv) {
    int d = 1024, n = 1024, H = 8, k = 16, dk = 128, N = 16384, iters = 20, warmup = 5;
    int pkm = 0, bn = 1, bf16 = 0, check = 1, collapse = 0;
    for (int i = 1; i < argc; i++) {
        int *dst = NULL;
        if (!strcmp(argv[i], "--d")) dst = &d;
        else if (!strcmp(argv[i], "--n")) dst = &n;
        else if (!strcmp(argv[i], "--heads")) dst = &H;
        else if (!strcmp(argv[i], "--topk")) dst = &k;
        else if (!strcmp(argv[i], "--dk")) dst = &dk;
        else if (!strcmp(argv[i], "--tokens")) dst = &N;
        else if (!strcmp(argv[i], "--iters")) dst = &iters;
        else if (!strcmp(argv[i], "--warmup")) dst = &warmup;
        else if (!strcmp(argv[i], "--pkm")) pkm = 1;
        else if (!strcmp(argv[i], "--no-bn")) bn = 0;
        else if (!strcmp(argv[i], "--no-check")) check = 0;
        else if (!strcmp(argv[i], "--collapse")) collapse = 1;
        else if (!strcmp(argv[i], "--precision") && i + 1 < argc) {
            const char *p = argv[++i];
            if (strcmp(p, "fp32") && strcmp(p, "bf16"))
                mp_input_error("bench_peer_cuda: --precision: expected fp32 or bf16, got '%s'", p);
            bf16 = !strcmp(p, "bf16");
        }
        else mp_input_error("bench_peer_cuda: unknown option '%s'", argv[i]);
        if (dst) {
            // --warmup 0: one iteration in all (what ncu profiles in tools/gpu_check.sh)
            if (i + 1 >= argc || (*dst = atoi(argv[++i])) < (dst == &warmup ? 0 : 1))
                mp_input_error("bench_peer_cuda: %s needs a %s integer", argv[i - 1],
                               dst == &warmup ? "non-negative" : "positive");
        }
    }
    if (dk % 2 || k > n || k > 32) mp_input_error("bench_peer_cuda: need dk even and k <= min(n, 32)");
    char err[512];
    be = mp_backend_cuda(err, sizeof err);
    if (!be) {
        printf("{\"impl\": \"millipede-cuda\", \"skipped\": \"%s\"}\n", err);
        return 77;
    }
    size_t mem0 = mp_cuda_memory_used();

    mp_retrieval_config rc = {0};
    rc.n_experts = (long)n * n;
    rc.n_sub = n;
    rc.heads = H;
    rc.topk = k;
    rc.key_dim = dk;
    rc.query_bn = bn;
    rc.bn_momentum = 0.1f;
    rc.bn_eps = 1e-5f;
    rc.activation = MP_ACT_GELU;
    mp_retrieval_layer l;
    memset(&l, 0, sizeof l);
    l.kind = pkm ? MP_FFN_PKM : MP_FFN_PEER;
    l.rc = &rc;
    l.C = d;
    l.maxN = N;
    l.row_start = 0;
    l.rows = (long)n * n;
    int HD = H * dk, S = H * k, half = dk / 2;
    size_t rows = (size_t)l.rows, NC = (size_t)N * d, NS = (size_t)N * S;
    // bf16: the GEMMs as system.precision = bf16 runs them (the W_q backward on tensor
    // cores; the route keeps its forward GEMMs fp32 itself), as the model sets it
    if (bf16 && be->set_precision) be->set_precision(MP_PRECISION_BF16);
    // parameters (the initialisation of docs/model.md) and their gradients
    l.wq = dtensor((size_t)HD * d, 0, 0.02f, 1, &g_bytes_params);
    l.bn_w = dtensor(HD, 2, 1.0f, 2, &g_bytes_params);
    l.bn_b = dtensor(HD, 2, 0.0f, 3, &g_bytes_params);
    l.k1 = dtensor((size_t)n * half, 1, 1.0f / sqrtf((float)half), 4, &g_bytes_params);
    l.k2 = dtensor((size_t)n * half, 1, 1.0f / sqrtf((float)half), 5, &g_bytes_params);
    if (bf16) {
        if (!pkm) l.u_bf16 = bf16_table(rows * d, 1.0f / sqrtf((float)d), 6);
        l.v_bf16 = bf16_table(rows * d, 1.0f / sqrtf((float)d), 7);
        // The backend tells PEER from PKM by u != NULL (mp_expert_tables: "u NULL: PKM"), so
        // PEER needs an fp32 u even where the kernels read only u_bf16. NaN: a kernel that
        // read it would fail the value check. Not counted: the optimizer's, not the layer's.
        // (Before this, the bf16 PEER benchmark ran the PKM kernels: the check found it.)
        size_t unused = 0;
        if (!pkm) l.u = dtensor(rows * d, 2, NAN, 12, &unused);
    } else {
        if (!pkm) l.u = dtensor(rows * d, 0, 1.0f / sqrtf((float)d), 6, &g_bytes_params);
        l.v = dtensor(rows * d, 0, 1.0f / sqrtf((float)d), 7, &g_bytes_params);
    }
    l.running_mean = dtensor(HD, 2, 0.0f, 8, &g_bytes_params);
    l.running_var = dtensor(HD, 2, 1.0f, 9, &g_bytes_params);
    l.dwq = dalloc((size_t)HD * d * 4, &g_bytes_grads);
    l.dbn_w = dalloc((size_t)HD * 4, &g_bytes_grads);
    l.dbn_b = dalloc((size_t)HD * 4, &g_bytes_grads);
    l.dk1 = dalloc((size_t)n * half * 4, &g_bytes_grads);
    l.dk2 = dalloc((size_t)n * half * 4, &g_bytes_grads);
    if (!pkm) l.du = dalloc(rows * d * 4, &g_bytes_grads);
    l.dv = dalloc(rows * d * 4, &g_bytes_grads);
    // which rows of dU, dV may be nonzero (retrieval.h), as the model keeps it: all clean
    l.grad_dirty = dalloc(rows, &g_bytes_grads);
    be->zero(l.grad_dirty, rows);
    // activations kept for backward, inputs and outputs (the records, pre-activations and
    // the experts' dx are the single-process path's own buffers: counted in extra_gib)
    l.q = dalloc((size_t)N * HD * 4, &g_bytes_acts);
    l.qn = dalloc((size_t)N * HD * 4, &g_bytes_acts);
    l.dq = dalloc((size_t)N * HD * 4, &g_bytes_acts);
    l.bn_mean = dalloc((size_t)HD * 4, &g_bytes_acts);
    l.bn_rstd = dalloc((size_t)HD * 4, &g_bytes_acts);
    l.bn_sums = dalloc((size_t)3 * HD * sizeof(double), &g_bytes_acts);   // route.c's statistics
    l.bn_sums_host = mp_calloc(2 * (size_t)HD + 1, sizeof(double));
    l.bn_host = mp_calloc(4 * (size_t)HD, sizeof(float));
    l.sel = dalloc(NS * 4, &g_bytes_acts);
    l.sel_a = dalloc(NS * 4, &g_bytes_acts);
    l.sel_b = dalloc(NS * 4, &g_bytes_acts);
    l.gate = dalloc(NS * 4, &g_bytes_acts);
    l.dgate = dalloc(NS * 4, &g_bytes_acts);
    float *x = dtensor(NC, 0, 1.0f, 10, &g_bytes_acts), *dy = dtensor(NC, 0, 1.0f, 11, &g_bytes_acts);
    float *y = dalloc(NC * 4, &g_bytes_acts), *dx = dalloc(NC * 4, &g_bytes_acts);
    if (collapse) {
        size_t G = 2 * (size_t)H * n;
        int m = (int)ceil(sqrt((double)k));
        float *bias = mp_calloc(G, sizeof(float));
        for (size_t g = 0; g < 2 * (size_t)H; g++)
            for (int a = 0; a < m; a++) bias[g * n + a] = 1000.0f;
        l.key_bias = dalloc(G * sizeof(float), &g_bytes_params);
        be->from_host(l.key_bias, bias, G * sizeof(float));
        free(bias);
        l.key_counts = dalloc(G * sizeof(int32_t), &g_bytes_acts);
        l.key_counts_i32 = mp_calloc(G, sizeof(int32_t));
        l.key_counts_host = mp_calloc(G + 1, sizeof(double));
        l.key_bias_host = mp_calloc(G, sizeof(float));
    }
    mp_exchange_init(&l.ex, NULL, be);
    mp_cuda_synchronize();
    size_t mem1 = mp_cuda_memory_used();

    enum { P_ROUTE, P_EXPERTS, P_EXPERTS_BWD, P_ROUTE_BWD, P_N };
    mp_cuda_event *ev[P_N + 1];
    for (int i = 0; i <= P_N; i++) ev[i] = mp_cuda_event_new();
    float *t_phase[P_N], *t_fwd = mp_malloc(iters * 4), *t_all = mp_malloc(iters * 4);
    for (int p = 0; p < P_N; p++) t_phase[p] = mp_malloc(iters * 4);
    int64_t R = (int64_t)NS;
    for (int it = -warmup; it < iters; it++) {
        mp_cuda_event_record(ev[0]);
        mp_route_forward(&l, be, x, N, 1);
        mp_cuda_event_record(ev[1]);
        mp_exchange_forward(&l.ex, &l, y, x, N);
        mp_cuda_event_record(ev[2]);
        mp_exchange_backward(&l.ex, &l, dx, dy, x, N);
        mp_cuda_event_record(ev[3]);
        mp_route_backward(&l, be, dx, x, NULL, N);
        mp_cuda_event_record(ev[4]);
        if (it < 0) continue;
        for (int p = 0; p < P_N; p++) t_phase[p][it] = mp_cuda_event_ms(ev[p], ev[p + 1]);
        t_fwd[it] = mp_cuda_event_ms(ev[0], ev[2]);
        t_all[it] = mp_cuda_event_ms(ev[0], ev[4]);
    }
    // zeroing the expert gradients, once per training step (not part of the layer)
    float t_zero = 0.0f;
    mp_cuda_event_record(ev[0]);
    if (!pkm) be->zero(l.du, rows * d * 4);
    be->zero(l.dv, rows * d * 4);
    mp_cuda_event_record(ev[1]);
    t_zero = mp_cuda_event_ms(ev[0], ev[1]);
    for (int i = 0; i <= P_N; i++) mp_cuda_event_free(ev[i]);
    size_t mem2 = mp_cuda_memory_used();
    // the value check, on the zeroed expert gradients (outside the timing and the memory)
    check_result ck;
    int check_failed = check ? check_layer(&l, x, dy, y, dx, N, d, bf16, pkm, &ck) : 0;

    // expert rows the batch touched (outside the timing)
    int32_t *hsel = mp_malloc(NS * 4);
    be->to_host(hsel, l.sel, NS * 4);
    qsort(hsel, NS, sizeof(int32_t), cmp_i32);
    double touched = NS ? 1 : 0;
    for (size_t i = 1; i < NS; i++) touched += hsel[i] != hsel[i - 1];
    free(hsel);

    // Bytes the kernels move, each tensor once per pass that reads or writes it, expert rows
    // once per record (the kernels re-read a row for each record that selects it); the
    // tables' reads at their precision (tb bytes), everything else fp32 except, in bf16, the
    // x and dy copies that the dU/dV sums read per record.
    double f = 4.0, tabs = pkm ? 1.0 : 2.0, tb = bf16 ? 2.0 : 4.0;
    double topk_reads = n <= 1024 ? 1.0 : (double)k;   // register path: each score row once
    double route_f = f * ((double)NC + (double)HD * d + 4.0 * N * HD        // GEMM, BN passes
                          + 2.0 * (double)N * H * n                           // scores written
                          + 2.0 * topk_reads * (double)N * H * n              // top-k reads
                          + 4.0 * NS);                                        // sel, gate out
    double experts_f = tb * tabs * R * d + f * (2.0 * NC + 4.0 * R);
    double experts_b = tb * tabs * R * d + f * (2.0 * NC + 5.0 * R)           // dx, dgate
                     + f * 2.0 * tabs * touched * d                           // dU, dV rows
                     + (bf16 ? 2.0 : 4.0) * tabs * R * d + f * 3.0 * R        // x, dy rows
                     + (bf16 ? 6.0 * tabs * NC : 0.0);                        // bf16 x, dy
    // The same counted from the rows actually touched (the measure): each touched
    // expert row read once per pass and its gradient rows read and written once, activations
    // once; what a perfect kernel of this layer could not avoid.
    double ideal_f = route_f + tb * tabs * touched * d + f * 2.0 * NC;
    double ideal_b = tb * tabs * touched * d + f * 2.0 * tabs * touched * d + f * 3.0 * NC +
                     route_b_bytes(N, NS, HD, half, d, NC);
    double route_b = route_b_bytes(N, NS, HD, half, d, NC);
    float m_phase[P_N];
    for (int p = 0; p < P_N; p++) m_phase[p] = median(t_phase[p], iters);
    float m_fwd = median(t_fwd, iters), m_all = median(t_all, iters);
    double fwd_bytes = route_f + experts_f, all_bytes = fwd_bytes + experts_b + route_b;
    double ideal_all = ideal_f + ideal_b;
    // after the layer's buffers: 1 GiB each way, or what the shape used if less
    size_t cbytes = NC * sizeof(float) * 4 < ((size_t)1 << 30) ? NC * sizeof(float) * 4 : ((size_t)1 << 30);
    double copy = copy_tbps(cbytes);
    const double GiB = 1024.0 * 1024.0 * 1024.0;
    printf("{\"impl\": \"millipede-cuda\", \"layer\": \"%s\", \"precision\": \"%s\", "
           "\"device\": \"%s\", \"d\": %d, \"n_experts\": %ld, \"heads\": %d, \"topk\": %d, "
           "\"dk\": %d, \"tokens\": %d, \"query_bn\": %d, \"collapse\": %d, \"iters\": %d, "
           "\"fwd_ms\": %.4f, \"fwdbwd_ms\": %.4f, \"route_ms\": %.4f, \"experts_ms\": %.4f, "
           "\"experts_bwd_ms\": %.4f, \"route_bwd_ms\": %.4f, \"zero_expert_grads_ms\": %.4f, "
           "\"params_gib\": %.3f, \"grads_gib\": %.3f, \"acts_gib\": %.3f, "
           "\"extra_gib\": %.3f, \"context_gib\": %.3f, \"touched_rows\": %.0f, \"fwd_bytes\": %.4g, "
           "\"fwdbwd_bytes\": %.4g, \"fwd_tbps\": %.3f, \"fwdbwd_tbps\": %.3f, "
           "\"fwdbwd_touched_bytes\": %.4g, \"fwdbwd_touched_tbps\": %.3f, \"copy_tbps\": %.3f, "
           "\"fwdbwd_touched_of_copy\": %.3f}\n",
           pkm ? "pkm" : "peer", bf16 ? "bf16" : "fp32", mp_cuda_device_name(), d, rc.n_experts, H, k, dk, N, bn, collapse, iters,
           m_fwd, m_all, m_phase[P_ROUTE], m_phase[P_EXPERTS], m_phase[P_EXPERTS_BWD],
           m_phase[P_ROUTE_BWD], t_zero, g_bytes_params / GiB, g_bytes_grads / GiB,
           g_bytes_acts / GiB, (double)(mem2 > mem1 ? mem2 - mem1 : 0) / GiB, mem0 / GiB, touched,
           fwd_bytes, all_bytes, fwd_bytes / (m_fwd * 1e-3) / 1e12,
           all_bytes / (m_all * 1e-3) / 1e12, ideal_all, ideal_all / (m_all * 1e-3) / 1e12, copy,
           ideal_all / (m_all * 1e-3) / 1e12 / copy);
    if (check)   // the check's own line: a failure must not hide among the numbers above
        printf("{\"impl\": \"millipede-cuda\", \"precision\": \"%s\", \"d\": %d, "
               "\"n_experts\": %ld, \"check\": \"%s%s\", \"check_tokens\": %d, "
               "\"check_rows\": %d, \"y_err_over_bound\": %.3g, \"du_err_over_bound\": %.3g, "
               "\"dv_err_over_bound\": %.3g, \"y_rel_err\": %.3g, \"du_rel_err\": %.3g, "
               "\"dv_rel_err\": %.3g}\n",
               bf16 ? "bf16" : "fp32", d, rc.n_experts, check_failed ? "FAILED: " : "ok",
               ck.what, ck.tokens, ck.rows, ck.y, ck.du, ck.dv, ck.y_rel, ck.du_rel, ck.dv_rel);
    mp_exchange_free(&l.ex);   // the tensors above live until the process ends
    return check_failed;
}
