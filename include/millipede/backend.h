// The compute backend: one table of operations that the model calls. The CPU backend
// (OpenBLAS + OpenMP, fp32) is the reference; the CUDA backend implements the same table.
// Conventions (as in llm.c): tensors are row-major, shapes are written next to them,
// N = B*T rows. Backward ops ACCUMULATE (+=) into every gradient they write (parameter
// gradients and input gradients alike); the caller zeroes them.
#pragma once
#include <stddef.h>
#include <stdint.h>

typedef struct mp_retrieval_layer mp_retrieval_layer;   // PEER / PKM, src/model/retrieval.h

typedef struct mp_backend {
    const char *name;
    // 1: the backend's memory is host memory that the host may read and write directly (CPU);
    // 0: device memory, reached only through to_host / from_host (CUDA), so host code such as
    // the expert exchange in src/model/retrieval.c works on host copies.
    int host_memory;
    // memory
    void *(*alloc)(size_t bytes);                       // zero-filled
    void (*free)(void *p);
    void (*zero)(void *p, size_t bytes);
    void (*to_host)(void *host, const void *src, size_t bytes);
    void (*from_host)(void *dst, const void *host, size_t bytes);

    // token + position embedding: out (B,T,C) = wte[inp] + wpe[t]
    void (*encoder_forward)(float *out, const int32_t *inp, const float *wte, const float *wpe,
                            int B, int T, int C);
    void (*encoder_backward)(float *dwte, float *dwpe, const float *dout, const int32_t *inp,
                             int B, int T, int C);
    // LayerNorm over C, eps 1e-5: out (N,C), mean (N), rstd (N)
    void (*layernorm_forward)(float *out, float *mean, float *rstd, const float *inp,
                              const float *w, const float *b, int N, int C);
    void (*layernorm_backward)(float *dinp, float *dw, float *db, const float *dout,
                               const float *inp, const float *w, const float *mean,
                               const float *rstd, int N, int C);
    // out (N,OC) = inp (N,C) @ w^T (w: (OC,C)) + bias (OC) (bias may be NULL)
    void (*matmul_forward)(float *out, const float *inp, const float *w, const float *bias,
                           int N, int C, int OC);
    void (*matmul_backward)(float *dinp, float *dw, float *dbias, const float *dout,
                            const float *inp, const float *w, int N, int C, int OC);
    // causal self-attention: qkv (B,T,3C) as [q|k|v], heads contiguous in C;
    // out (B,T,C); att (B,NH,T,T) softmax probabilities kept for backward
    void (*attention_forward)(float *out, float *att, const float *qkv, int B, int T, int C,
                              int NH);
    void (*attention_backward)(float *dqkv, const float *dout, const float *qkv,
                               const float *att, int B, int T, int C, int NH);
    // exact (erf) GELU, elementwise over n
    void (*gelu_forward)(float *out, const float *inp, long n);
    void (*gelu_backward)(float *dinp, const float *inp, const float *dout, long n);
    // out = a + b, elementwise (out may alias a)
    void (*residual_forward)(float *out, const float *a, const float *b, long n);
    // probs (N,V) = softmax(logits); losses (N) = -log probs[target]
    void (*crossentropy_forward)(float *losses, float *probs, const float *logits,
                                 const int32_t *targets, int N, int V);
    // dlogits (N,V) += dloss * (probs - onehot(target))
    void (*crossentropy_backward)(float *dlogits, const float *probs, const int32_t *targets,
                                  float dloss, int N, int V);

    // PEER / PKM layer, in two halves (src/model/retrieval.c moves data between them).
    // Where the token lives: queries q (N, H*dk) = x (N,C) wq^T, BatchNorm (train: over the
    // global batch, reduced through l->comm), sub-key scores, product-key top-k and gates
    // into l->sel, l->sel_a, l->sel_b, l->gate (N, H, k). With l->key_bias, the top-k
    // ranks score + bias and the gates are the softmax of the plain scores.
    void (*retrieval_route)(mp_retrieval_layer *l, const float *x, int N, int train);
    // counts (2, H, n) = how often each head selected each first-half (0) and second-half
    // (1) sub-key, from sel_a, sel_b (N, H, k)
    void (*subkey_counts)(int32_t *counts, const int32_t *sel_a, const int32_t *sel_b, int N,
                          int H, int k, int n);
    // ...and its backward from the gate gradients in l->dgate (N, H, k): softmax, sub-keys,
    // BatchNorm, W_q; dx (N,C) += the query path's contribution.
    void (*retrieval_route_backward)(mp_retrieval_layer *l, float *dx, const float *x, int N);
    // Where the expert rows live: M received tokens x (M,C) and R records (slot, local row,
    // gate) grouped by slot (records of slot m are [slot_start[m], slot_start[m+1])).
    // y (M,C) = per slot, sum of gate * act(u_row . x) * v_row (PEER) or gate * v_row (PKM);
    // pre (R) keeps u_row . x for backward.
    void (*experts_forward)(mp_retrieval_layer *l, float *y, const float *x, int64_t M,
                            const int64_t *slot_start, const int32_t *slot, const int32_t *row,
                            const float *gate, float *pre, int64_t R);
    // dx (M,C) and dgate (R) are written (not accumulated); l->du, l->dv += this batch's part.
    void (*experts_backward)(mp_retrieval_layer *l, float *dx, float *dgate, const float *dy,
                             const float *x, int64_t M, const int64_t *slot_start,
                             const int32_t *slot, const int32_t *row, const float *gate,
                             const float *pre, int64_t R);

    // AdamW on one contiguous range: p -= lr * (m_hat / (sqrt(v_hat) + eps) + wd * p)
    // t is the 1-based step for bias correction; g is scaled by grad_scale first.
    void (*adamw)(float *p, const float *g, float *m, float *v, size_t n, float lr, float beta1,
                  float beta2, float eps, float wd, long t, float grad_scale);
    // sum of squares of x (n), accumulated in double
    double (*sum_squares)(const float *x, size_t n);
    // dst (n) = src rounded to bfloat16 (to nearest, ties to even), as raw bits; NULL when
    // the backend has no bf16 mode (the CPU)
    void (*to_bf16)(uint16_t *dst, const float *src, size_t n);
} mp_backend;

const mp_backend *mp_backend_cpu(void);
// NULL with a reason in err when CUDA was not compiled in or no GPU is present.
const mp_backend *mp_backend_cuda(char *err, size_t err_len);
