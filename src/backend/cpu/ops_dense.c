// CPU dense ops: embeddings, LayerNorm, matmul (OpenBLAS), GELU, residual, cross-entropy.
// The math is docs/model.md; shapes, and which gradients backward accumulates into and
// which it writes, are include/millipede/backend.h. See cpu.h for how determinism is kept.
#include <cblas.h>
#include <math.h>
#include <omp.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include "core/log.h"
#include "cpu.h"

#define LN_EPS 1e-5f
#define INV_SQRT2 0.70710678118654752440f
#define INV_SQRT_2PI 0.39894228040143267794f
// Rows per partial-sum block where a gradient is a sum over rows (LayerNorm dw, db).
// Fixed, so the summation order does not depend on the thread count.
#define LN_ROW_BLOCK 32

// This thread's share [c0, c1) of C columns inside a parallel region, cut at multiples of
// 16 floats (one cache line) so that threads never write the same line.
static void thread_columns(int C, int *c0, int *c1) {
    int nt = omp_get_num_threads(), tid = omp_get_thread_num();
    long lines = (C + 15) / 16;
    long a = lines * tid / nt * 16, b = lines * (tid + 1) / nt * 16;
    *c0 = (int)(a < C ? a : C);
    *c1 = (int)(b < C ? b : C);
}

// ---------------------------------------------------------------------------------------
// token + position embedding

void mp_cpu_encoder_forward(float *out, const int32_t *inp, const float *wte, const float *wpe,
                            int B, int T, int C) {
    // out (B,T,C), inp (B,T), wte (V,C), wpe (>=T,C). Token ids are checked by the loader.
    #pragma omp parallel for collapse(2) schedule(static)
    for (int b = 0; b < B; b++) {
        for (int t = 0; t < T; t++) {
            float *o = out + ((size_t)b * T + t) * C;
            const float *we = wte + (size_t)inp[(size_t)b * T + t] * C;
            const float *pe = wpe + (size_t)t * C;
            #pragma omp simd
            for (int c = 0; c < C; c++) o[c] = we[c] + pe[c];
        }
    }
}

void mp_cpu_encoder_backward(float *dwte, float *dwpe, const float *dout, const int32_t *inp,
                             int B, int T, int C, int V) {
    (void)V;   // the rows are addressed by token directly
    // Many positions scatter into the same dwte row, so threads split the C columns and
    // each walks all positions in order: no two threads touch one element, and every
    // element is summed in position order whatever the thread count.
    #pragma omp parallel
    {
        int c0, c1;
        thread_columns(C, &c0, &c1);
        for (int b = 0; b < B; b++) {
            for (int t = 0; t < T; t++) {
                const float *d = dout + ((size_t)b * T + t) * C;   // (C)
                float *gw = dwte + (size_t)inp[(size_t)b * T + t] * C;
                float *gp = dwpe + (size_t)t * C;
                #pragma omp simd
                for (int c = c0; c < c1; c++) {
                    gw[c] += d[c];
                    gp[c] += d[c];
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// LayerNorm over the last dimension (biased variance, eps 1e-5)

void mp_cpu_layernorm_forward(float *out, uint16_t *out_bf16, float *mean, float *rstd,
                              const float *inp, const float *w, const float *b, int N, int C) {
    mp_cpu_no_bf16(out_bf16, "layernorm_forward");
    // out (N,C), mean (N), rstd (N), inp (N,C), w (C), b (C)
    #pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        const float *x = inp + (size_t)n * C;
        float *o = out + (size_t)n * C;
        float m = mp_sum8(x, C) / C;
        // two passes (mean, then squared deviations) rather than E[x^2] - m^2, which
        // cancels badly when |mean| >> std
        float acc[8] = {0}, tail = 0.0f;
        int c = 0;
        for (; c + 8 <= C; c += 8)
            for (int j = 0; j < 8; j++) {
                float d = x[c + j] - m;
                acc[j] += d * d;
            }
        for (; c < C; c++) tail += (x[c] - m) * (x[c] - m);
        float var = ((((acc[0] + acc[4]) + (acc[1] + acc[5])) +
                      ((acc[2] + acc[6]) + (acc[3] + acc[7]))) + tail) / C;
        float s = 1.0f / sqrtf(var + LN_EPS);
        #pragma omp simd
        for (int i = 0; i < C; i++) o[i] = (x[i] - m) * s * w[i] + b[i];
        if (mean) mean[n] = m;
        if (rstd) rstd[n] = s;
    }
}

void mp_cpu_layernorm_backward(float *dinp, uint16_t *dinp_bf16, float *dw, float *db,
                               const float *dout, const float *inp, const float *w,
                               const float *mean, const float *rstd, int N, int C) {
    mp_cpu_no_bf16(dinp_bf16, "layernorm_backward");
    // dinp (N,C), dw (C), db (C), dout (N,C), inp (N,C), w (C), mean (N), rstd (N)
    // dw and db are sums over rows: each block of LN_ROW_BLOCK rows writes its own partial
    // sums, which are then added in block order.
    int nblk = (N + LN_ROW_BLOCK - 1) / LN_ROW_BLOCK;
    float *part = mp_calloc((size_t)nblk * 2 * C, sizeof(float));   // (nblk, 2, C)
    #pragma omp parallel
    {
        float *dnorm = mp_malloc((size_t)C * sizeof(float));          // (C) row scratch
        #pragma omp for schedule(static)
        for (int k = 0; k < nblk; k++) {
            float *pw = part + (size_t)k * 2 * C, *pb = pw + C;
            int n1 = (k + 1) * LN_ROW_BLOCK < N ? (k + 1) * LN_ROW_BLOCK : N;
            for (int n = k * LN_ROW_BLOCK; n < n1; n++) {
                const float *x = inp + (size_t)n * C, *d = dout + (size_t)n * C;
                float *dx = dinp + (size_t)n * C;
                float m = mean[n], s = rstd[n];
                // norm = (x - m) s; dnorm = w * dout; the input gradient is
                // s * (dnorm - mean(dnorm) - norm * mean(dnorm * norm))
                #pragma omp simd
                for (int c = 0; c < C; c++) dnorm[c] = w[c] * d[c];
                float dn_mean = mp_sum8(dnorm, C) / C;
                float acc[8] = {0}, tail = 0.0f;
                int c = 0;
                for (; c + 8 <= C; c += 8)
                    for (int j = 0; j < 8; j++) acc[j] += dnorm[c + j] * ((x[c + j] - m) * s);
                for (; c < C; c++) tail += dnorm[c] * ((x[c] - m) * s);
                float dnn_mean = ((((acc[0] + acc[4]) + (acc[1] + acc[5])) +
                                   ((acc[2] + acc[6]) + (acc[3] + acc[7]))) + tail) / C;
                #pragma omp simd
                for (int i = 0; i < C; i++) {
                    float norm = (x[i] - m) * s;
                    pw[i] += d[i] * norm;
                    pb[i] += d[i];
                    dx[i] += (dnorm[i] - dn_mean - norm * dnn_mean) * s;
                }
            }
        }
        free(dnorm);
        // the implicit barrier of the omp for above has passed: all partials are written
        int c0, c1;
        thread_columns(C, &c0, &c1);
        for (int i = c0; i < c1; i++) {
            float sw = 0.0f, sb = 0.0f;
            for (int k = 0; k < nblk; k++) {
                sw += part[(size_t)k * 2 * C + i];
                sb += part[(size_t)k * 2 * C + C + i];
            }
            dw[i] += sw;
            db[i] += sb;
        }
    }
    free(part);
}

// ---------------------------------------------------------------------------------------
// matmul: out = inp @ w^T + bias (the nn.Linear layout), via OpenBLAS sgemm
//
// Threading: OpenMP owns the cores. OpenBLAS (the pthreads build) would otherwise keep a
// second pool of threads that fights OpenMP's spinning workers for the same cores (measured:
// 2.6x slower sgemm right after any OpenMP loop). So OpenBLAS is set to one thread and
// mp_cpu_sgemm splits the output into one block per OpenMP thread, one sgemm call each.

static pthread_once_t blas_once = PTHREAD_ONCE_INIT;
static void blas_one_thread(void) { openblas_set_num_threads(1); }
void mp_cpu_blas_init(void) { pthread_once(&blas_once, blas_one_thread); }

// Below this many multiply-adds one call is cheaper than waking the team.
#define SGEMM_PARALLEL_MIN (1 << 18)

void mp_cpu_sgemm(int trans_a, int trans_b, int M, int N, int K, float alpha, const float *A,
                  int lda, const float *B, int ldb, float beta, float *C, int ldc) {
    if (M <= 0 || N <= 0) return;
    mp_cpu_blas_init();
    CBLAS_TRANSPOSE ta = trans_a ? CblasTrans : CblasNoTrans;
    CBLAS_TRANSPOSE tb = trans_b ? CblasTrans : CblasNoTrans;
    if (K <= 0) {   // empty sum (sgemm rejects K = 0 leading dimensions): C = beta C
        for (int i = 0; i < M; i++)
            for (int j = 0; j < N; j++) {
                float *c = C + (size_t)i * ldc + j;
                *c = beta == 0.0f ? 0.0f : beta * *c;   // beta = 0: C is not read (BLAS rule)
            }
        return;
    }
    if ((double)M * N * K < SGEMM_PARALLEL_MIN || omp_get_max_threads() == 1 ||
        omp_in_parallel()) {
        cblas_sgemm(CblasRowMajor, ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
        return;
    }
    // Split the larger output dimension; column blocks are cut at 16 floats (a cache line).
    int split_rows = M >= N;
    #pragma omp parallel
    {
        int nt = omp_get_num_threads(), tid = omp_get_thread_num();
        if (split_rows) {
            int m0 = (int)((long)M * tid / nt), m1 = (int)((long)M * (tid + 1) / nt);
            if (m1 > m0) {
                // row m of op(A) starts at A + m*lda, or at A + m when A is stored (K,M)
                const float *a = A + (trans_a ? (size_t)m0 : (size_t)m0 * lda);
                cblas_sgemm(CblasRowMajor, ta, tb, m1 - m0, N, K, alpha, a, lda, B, ldb, beta,
                            C + (size_t)m0 * ldc, ldc);
            }
        } else {
            int n0, n1;
            thread_columns(N, &n0, &n1);
            if (n1 > n0) {
                // column n of op(B) starts at B + n, or at B + n*ldb when B is stored (N,K)
                const float *b = B + (trans_b ? (size_t)n0 * ldb : (size_t)n0);
                cblas_sgemm(CblasRowMajor, ta, tb, M, n1 - n0, K, alpha, A, lda, b, ldb, beta,
                            C + n0, ldc);
            }
        }
    }
}

// out (C) += the column sums of x (N, C): threads own column ranges and sum the rows in
// order (the bias gradients of matmul_backward, gelu_backward and attention_backward)
void mp_cpu_colsum_add(float *out, const float *x, int N, int C) {
    #pragma omp parallel
    {
        int c0, c1;
        thread_columns(C, &c0, &c1);
        if (c1 > c0) {
            float *acc = mp_calloc((size_t)(c1 - c0), sizeof(float));
            for (int n = 0; n < N; n++) {
                const float *d = x + (size_t)n * C;
                #pragma omp simd
                for (int j = c0; j < c1; j++) acc[j - c0] += d[j];
            }
            for (int j = c0; j < c1; j++) out[j] += acc[j - c0];
            free(acc);
        }
    }
}

void mp_cpu_matmul_forward(float *out, const float *inp, const uint16_t *inp_bf16,
                           const float *w, const uint16_t *w_bf16, const float *bias, int N,
                           int C, int OC) {
    // out (N,OC), inp (N,C), w (OC,C), bias (OC) or NULL
    mp_cpu_no_bf16(inp_bf16, "matmul_forward");
    mp_cpu_no_bf16(w_bf16, "matmul_forward");
    if (N <= 0 || OC <= 0) return;
    mp_cpu_sgemm(0, 1, N, OC, C, 1.0f, inp, C, w, C, 0.0f, out, OC);
    if (bias) {
        #pragma omp parallel for schedule(static)
        for (int n = 0; n < N; n++) {
            float *o = out + (size_t)n * OC;
            #pragma omp simd
            for (int j = 0; j < OC; j++) o[j] += bias[j];
        }
    }
}

void mp_cpu_matmul_backward(float *dinp, float *dw, float *dbias, const float *dout,
                            const uint16_t *dout_bf16, const float *inp,
                            const uint16_t *inp_bf16, const float *w, const uint16_t *w_bf16,
                            int N, int C, int OC, int dinp_accumulate) {
    mp_cpu_no_bf16(dout_bf16, "matmul_backward");
    mp_cpu_no_bf16(inp_bf16, "matmul_backward");
    mp_cpu_no_bf16(w_bf16, "matmul_backward");
    // dinp (N,C) = (or +=) dout (N,OC) @ w (OC,C); dw (OC,C) += dout^T @ inp (N,C);
    // dbias (OC) += column sums of dout. beta = 1 makes sgemm accumulate, beta = 0 write
    // (sgemm then never reads C).
    if (N <= 0 || C <= 0) return;
    if (OC <= 0) {   // empty sums: a written dinp is 0, the rest keeps its values
        if (dinp && !dinp_accumulate) memset(dinp, 0, (size_t)N * C * sizeof(float));
        return;
    }
    if (dinp)
        mp_cpu_sgemm(0, 0, N, C, OC, 1.0f, dout, OC, w, C, dinp_accumulate ? 1.0f : 0.0f, dinp,
                     C);
    if (dw) mp_cpu_sgemm(1, 0, OC, C, N, 1.0f, dout, OC, inp, C, 1.0f, dw, C);
    if (dbias) mp_cpu_colsum_add(dbias, dout, N, OC);
}

// ---------------------------------------------------------------------------------------
// GELU, exact (erf) form

void mp_cpu_gelu_forward(float *out, uint16_t *out_bf16, const float *inp, long n) {
    mp_cpu_no_bf16(out_bf16, "gelu_forward");
    #pragma omp parallel for schedule(static)
    for (long i = 0; i < n; i++) {
        float x = inp[i];
        out[i] = 0.5f * x * (1.0f + erff(x * INV_SQRT2));
    }
}

void mp_cpu_gelu_backward(float *dinp, uint16_t *dinp_bf16, float *dbias, const float *inp,
                          const float *dout, int N, int C) {
    mp_cpu_no_bf16(dinp_bf16, "gelu_backward");
    if (!dinp) mp_fatal("gelu_backward on the CPU backend needs dinp (it has no bf16 twin)");
    // d/dx [x Phi(x)] = Phi(x) + x phi(x)
    long n = (long)N * C;
    #pragma omp parallel for schedule(static)
    for (long i = 0; i < n; i++) {
        float x = inp[i];
        float cdf = 0.5f * (1.0f + erff(x * INV_SQRT2));
        float pdf = expf(-0.5f * x * x) * INV_SQRT_2PI;
        dinp[i] = (cdf + x * pdf) * dout[i];
    }
    // a second pass here (host memory, no traffic to save): matmul_backward's sums
    if (dbias) mp_cpu_colsum_add(dbias, dinp, N, C);
}

void mp_cpu_residual_forward(float *out, const float *a, const float *b, long n) {
    #pragma omp parallel for simd schedule(static)
    for (long i = 0; i < n; i++) out[i] = a[i] + b[i];
}

// host memory, no traffic to save: the two ops in turn
void mp_cpu_residual_layernorm_forward(float *res, float *out, uint16_t *out_bf16, float *mean,
                                       float *rstd, const float *a, const float *b,
                                       const float *w, const float *bias, int N, int C) {
    mp_cpu_residual_forward(res, a, b, (long)N * C);
    mp_cpu_layernorm_forward(out, out_bf16, mean, rstd, res, w, bias, N, C);
}

// ---------------------------------------------------------------------------------------
// softmax cross-entropy

void mp_cpu_crossentropy_forward(float *losses, float *stats, const float *logits,
                                 const int32_t *targets, int N, int V) {
    // losses (N), stats (N, 2), logits (N,V), targets (N)
    #pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        const float *x = logits + (size_t)n * V;
        float mx = mp_max8(x, V);
        // the normaliser over a large vocabulary is summed in double, in fixed lanes
        double acc[4] = {0}, tail = 0.0;
        int v = 0;
        for (; v + 4 <= V; v += 4)
            for (int j = 0; j < 4; j++) acc[j] += expf(x[v + j] - mx);
        for (; v < V; v++) tail += expf(x[v] - mx);
        double sum = ((acc[0] + acc[2]) + (acc[1] + acc[3])) + tail;
        stats[2 * (size_t)n] = mx;
        stats[2 * (size_t)n + 1] = (float)(1.0 / sum);
        // -log softmax[target] = log(sum) - (x[target] - max): no log of an underflowed 0
        losses[n] = (float)(log(sum) - (double)(x[targets[n]] - mx));
    }
}

void mp_cpu_crossentropy_backward(float *dlogits, uint16_t *dlogits_bf16, const float *logits,
                                  const float *stats, const int32_t *targets, float dloss, int N,
                                  int V) {
    mp_cpu_no_bf16(dlogits_bf16, "crossentropy_backward");
    if (!dlogits) mp_fatal("crossentropy_backward on the CPU backend needs dlogits (it has no bf16 twin)");
    // dlogits (N,V) = dloss * (softmax - onehot(target)), written
    #pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        const float *x = logits + (size_t)n * V;
        float *d = dlogits + (size_t)n * V;
        float mx = stats[2 * (size_t)n], inv = stats[2 * (size_t)n + 1];
        int32_t tg = targets[n];
        for (int v = 0; v < V; v++) d[v] = dloss * (expf(x[v] - mx) * inv - (v == tg ? 1.0f : 0.0f));
    }
}
