// CPU backend (fp32, OpenBLAS + OpenMP): the operations behind mp_backend_cpu(), exported
// so that other CPU code (tests) can call them directly.
// Shapes and conventions are those of include/millipede/backend.h: backward ops accumulate
// into parameter gradients and write or add input gradients as it says.
//
// Determinism: every op gives bitwise identical results for the same inputs on every run.
// No atomics, no OpenMP float reductions; every output element is written by one thread
// in a fixed order, and sums over rows use fixed row blocks (independent of the thread
// count). Dot products and row sums use the fixed 8-lane order of mp_dot8 / mp_sum8 below,
// so results do not depend on how the compiler vectorises or on data alignment either.
// Everything except matmul is also independent of the thread count (attention makes one
// single-threaded sgemm call per unit of work); matmul splits its sgemm by thread count, so
// it is bitwise reproducible for a fixed OMP_NUM_THREADS.
#pragma once
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include "millipede/backend.h"

// memory (host): zero-filled, 64-byte aligned
void *mp_cpu_alloc(size_t bytes);
void mp_cpu_free(void *p);
void mp_cpu_zero(void *p, size_t bytes);
void mp_cpu_copy(void *dst, const void *src, size_t bytes);

void mp_cpu_encoder_forward(float *out, const int32_t *inp, const float *wte, const float *wpe,
                            int B, int T, int C);
void mp_cpu_encoder_backward(float *dwte, float *dwpe, const float *dout, const int32_t *inp,
                             int B, int T, int C, int V);
// The CPU has no bf16 mode: every bf16 twin (backend.h) it is given must be NULL; one that
// is not is the caller's mistake (fatal, naming op), not something to round here.
void mp_cpu_no_bf16(const void *twin, const char *op);
void mp_cpu_layernorm_forward(float *out, uint16_t *out_bf16, float *mean, float *rstd,
                              const float *inp, const float *w, const float *b, int N, int C);
void mp_cpu_layernorm_backward(float *dinp, uint16_t *dinp_bf16, float *dw, float *db,
                               const float *dout, const float *inp, const float *w,
                               const float *mean, const float *rstd, int N, int C);
// Sets OpenBLAS to one thread (once; mp_backend_cpu and mp_cpu_sgemm call it): OpenMP
// threads share the work instead, see ops_dense.c.
void mp_cpu_blas_init(void);
// Row-major C (M,N) = alpha op(A) op(B) + beta C, op = transpose when trans_x is non-zero
// (A is then stored (K,M), B (N,K)). Threads with OpenMP, one single-threaded OpenBLAS call
// per thread's block of C; inside a parallel region it is one plain call. Use this rather
// than cblas_sgemm directly, which would run on one thread only.
void mp_cpu_sgemm(int trans_a, int trans_b, int M, int N, int K, float alpha, const float *A,
                  int lda, const float *B, int ldb, float beta, float *C, int ldc);
// bias may be NULL; in backward any of dinp, dw, dbias may be NULL (not wanted).
void mp_cpu_matmul_forward(float *out, const float *inp, const uint16_t *inp_bf16,
                           const float *w, const uint16_t *w_bf16, const float *bias, int N,
                           int C, int OC);
void mp_cpu_matmul_backward(float *dinp, float *dw, float *dbias, const float *dout,
                            const uint16_t *dout_bf16, const float *inp,
                            const uint16_t *inp_bf16, const float *w, const uint16_t *w_bf16,
                            int N, int C, int OC, int dinp_accumulate);
size_t mp_cpu_attention_state_floats(int B, int T, int C, int NH);
// out (C) += the column sums of x (N, C), each summed over the rows in order
void mp_cpu_colsum_add(float *out, const float *x, int N, int C);
void mp_cpu_attention_forward(float *out, uint16_t *out_bf16, float *att, const float *qkv,
                              int B, int T, int C, int NH);
void mp_cpu_attention_backward(float *dqkv, uint16_t *dqkv_bf16, float *dbias,
                               const float *dout, const float *qkv, const float *out,
                               const float *att, int B, int T, int C, int NH);
void mp_cpu_gelu_forward(float *out, uint16_t *out_bf16, const float *inp, long n);
void mp_cpu_gelu_backward(float *dinp, uint16_t *dinp_bf16, float *dbias, const float *inp,
                          const float *dout, int N, int C);
void mp_cpu_residual_forward(float *out, const float *a, const float *b, long n);
void mp_cpu_residual_layernorm_forward(float *res, float *out, uint16_t *out_bf16, float *mean,
                                       float *rstd, const float *a, const float *b,
                                       const float *w, const float *bias, int N, int C);
void mp_cpu_gather_rows(float *dst, const float *src, const int32_t *idx, int64_t n, int C);
void mp_cpu_scatter_add_rows(float *dst, const float *src, const int32_t *idx, int64_t n, int C);
void mp_cpu_crossentropy_forward(float *losses, float *stats, const float *logits,
                                 const int32_t *targets, int N, int V);
void mp_cpu_crossentropy_backward(float *dlogits, uint16_t *dlogits_bf16, const float *logits,
                                  const float *stats, const int32_t *targets, float dloss, int N,
                                  int V);
void mp_cpu_adamw(float *p, const float *g, float *m, float *v, uint16_t *p_bf16, size_t n,
                  float lr, float beta1, float beta2, float eps, float wd, long t,
                  float grad_scale);
double mp_cpu_sum_squares(const float *x, size_t n);
double mp_cpu_sum_f64(const double *x, size_t n);
void mp_cpu_adamw_rows(float *p, const float *g, float *m, float *v, uint16_t *p_bf16,
                       const int32_t *rows, int64_t n_rows, int C, float lr, float beta1,
                       float beta2, float eps, float wd, long t, float grad_scale);

// PEER / PKM layer on the CPU (src/backend/cpu/retrieval_cpu.c); the table entries of the
// same names in include/millipede/backend.h say what they do.
void mp_cpu_query_bn_stats(double *sums, const float *q, const double *mean, int N, int HD);
void mp_cpu_query_bn_forward(float *qn, const float *q, const float *w, const float *b,
                             const float *mean, const float *rstd, int N, int HD);
void mp_cpu_retrieval_route(int32_t *sel, int32_t *sel_a, int32_t *sel_b, float *gate,
                            const float *qn, const float *k1, const float *k2,
                            const float *key_bias, int N, int H, int dk, int n, int k);
void mp_cpu_subkey_counts(int32_t *counts, const int32_t *sel_a, const int32_t *sel_b, int N,
                          int H, int k, int n);
void mp_cpu_retrieval_route_backward(float *dqn, float *dk1, float *dk2, float *dgate,
                                     const float *gate, const int32_t *sel_a,
                                     const int32_t *sel_b, const float *qn, const float *k1,
                                     const float *k2, int N, int H, int dk, int n, int k);
void mp_cpu_query_bn_backward_stats(double *sums, float *dw, float *db, const float *dqn,
                                    const float *q, const float *mean, const float *rstd, int N,
                                    int HD);
void mp_cpu_query_bn_backward(float *dq, const float *q, const float *w, const float *mean,
                              const float *rstd, const double *sums, double count, int train,
                              int N, int HD);
void mp_cpu_experts_forward(const mp_expert_tables *t, float *y, const float *x, int64_t M,
                            const int64_t *slot_start, const int32_t *slot, const int32_t *row,
                            const float *gate, float *pre, int64_t R, int C, int relu);
void mp_cpu_experts_backward(const mp_expert_tables *t, float *dx, float *dgate, const float *dy,
                             const float *x, int64_t M, const int64_t *slot_start,
                             const int32_t *slot, const int32_t *row, const float *gate,
                             const float *pre, int64_t R, int C, int relu, int overwrite,
                             double *row_ss);
// Top-k of s (n) by score, ties to the lower index: vals (k) descending, idxs (k).
void mp_topk(const float *s, int n, int k, float *vals, long *idxs);
// Product-key top-k of one query: the k best of s1[a] + s2[b] over all n*n pairs, from the
// top-k of each half. vals (k) descending, experts (k) = a*n + b, sub_a/sub_b (k).
void mp_product_topk(const float *s1, const float *s2, int n, int k, float *vals, long *experts,
                     int32_t *sub_a, int32_t *sub_b);

// Dot product in a fixed order: 8 independent lanes (the compiler turns them into one or two
// vector registers without reassociating anything), then the lanes pairwise, then the tail.
static inline float mp_dot8(const float *a, const float *b, int n) {
    float acc[8] = {0};
    int i = 0;
    for (; i + 8 <= n; i += 8)
        for (int j = 0; j < 8; j++) acc[j] += a[i + j] * b[i + j];
    float tail = 0.0f;
    for (; i < n; i++) tail += a[i] * b[i];
    return (((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])))
           + tail;
}

// Sum in the same fixed order.
static inline float mp_sum8(const float *a, int n) {
    float acc[8] = {0};
    int i = 0;
    for (; i + 8 <= n; i += 8)
        for (int j = 0; j < 8; j++) acc[j] += a[i + j];
    float tail = 0.0f;
    for (; i < n; i++) tail += a[i];
    return (((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])))
           + tail;
}

// Maximum in 8 lanes (a > m ? a : m vectorises, fmaxf does not without -ffast-math);
// -INFINITY for n = 0. Max is exact, so the lane order does not matter.
static inline float mp_max8(const float *a, int n) {
    float acc[8];
    for (int j = 0; j < 8; j++) acc[j] = -INFINITY;
    int i = 0;
    for (; i + 8 <= n; i += 8)
        for (int j = 0; j < 8; j++) acc[j] = a[i + j] > acc[j] ? a[i + j] : acc[j];
    for (; i < n; i++) acc[0] = a[i] > acc[0] ? a[i] : acc[0];
    float m = acc[0];
    for (int j = 1; j < 8; j++) m = acc[j] > m ? acc[j] : m;
    return m;
}
