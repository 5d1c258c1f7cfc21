// The compute backend: one table of operations that the model calls. The CPU backend
// (OpenBLAS + OpenMP, fp32) is the reference; the CUDA backend implements the same table.
// Conventions (as in llm.c): tensors are row-major, shapes are written next to them,
// N = B*T rows. Backward ops ACCUMULATE (+=) into parameter gradients (the caller zeroes
// them once per step: micro-batches add up); the expert tables' gradients, which
// experts_backward overwrites or accumulates as told, are the exception. Input gradients
// are WRITTEN where they have one producer, which saves zeroing them and reading the zeros
// back (docs/cuda.md, "Fusing the dense elementwise ops"): dlogits (crossentropy_backward),
// dinp of gelu_backward, dqkv of attention_backward, and matmul_backward's dinp unless told
// to add. layernorm_backward adds into its dinp (the residual stream's gradient collects
// both branches of a block).
//
// bf16 twins (system.precision = bf16; docs/cuda.md, "bf16 GEMM operands from their
// producers"): an op that produces a GEMM operand may also write it rounded to bf16 (to
// nearest even, as to_bf16 rounds) into an *_bf16 twin, in the same pass, and matmul reads
// such a twin instead of rounding the operand itself: the GEMMs see the same bits, and
// the separate rounding passes (forward, and again in backward for dw) are gone. A twin
// holds the rounding of what its op leaves in the fp32 output (after the addition, where
// the op adds). Every twin is optional (NULL: not written, or rounded by matmul); a backend
// without to_bf16 (the CPU) takes NULL for all of them.
#pragma once
#include <stddef.h>
#include <stdint.h>

// The expert tables of one PEER / PKM layer as the expert ops see them: rows (rows, C)
// of this rank's shard, backend memory.
typedef struct {
    const float *u, *v;               // fp32 masters; u NULL: PKM (values only)
    const uint16_t *u_bf16, *v_bf16;  // bf16 copies the kernels read instead, or NULL (fp32)
    float *du, *dv;                   // gradients (du NULL for PKM), written by experts_backward
    // (rows) backend memory, kept by experts_backward: 1 where a row of du, dv may be
    // nonzero; a row marked 0 reads zero (so a step's start needs no pass over du, dv)
    uint8_t *dirty;
    long rows;
} mp_expert_tables;

// system.precision as the backend's set_precision takes it
enum { MP_PRECISION_FP32 = 0, MP_PRECISION_BF16 = 1 };

// One row of the kernel timer (kernel_times): the GPU work queued at one site under one
// label, in all since the last read. The strings are static (valid for the process).
typedef struct {
    const char *label;   // the model's phase when it was queued ("fwd.attention", ...)
    const char *what;    // the launching function, or the library call ("cublasSgemm")
    const char *file;    // the site: source file name and line
    int line;
    long calls;
    double ms;           // device time, the GPU's idle time before each call included
} mp_kernel_time;

typedef struct mp_backend {
    const char *name;
    // 1: the backend's memory is host memory that the host may read and write directly (CPU);
    // 0: device memory, reached only through to_host / from_host (CUDA). The expert exchange
    // (src/model/exchange.c) keeps its payload in backend memory either way and copies only
    // routing indices to the host.
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
    // dwte (V,C) += each position's dout row at its token, dwpe (T,C) += by position; every
    // token in inp is below V
    void (*encoder_backward)(float *dwte, float *dwpe, const float *dout, const int32_t *inp,
                             int B, int T, int C, int V);
    // LayerNorm over C, eps 1e-5: out (N,C) and its twin, mean (N), rstd (N). out may be
    // NULL where the twin is given (bf16 mode keeps only the twin where GEMMs alone read it)
    void (*layernorm_forward)(float *out, uint16_t *out_bf16, float *mean, float *rstd,
                              const float *inp, const float *w, const float *b, int N, int C);
    // res (N,C) = a + b (res may alias a), then layernorm_forward of res: the same bits as
    // residual_forward and layernorm_forward one after the other, in one pass over a and b
    // instead of a second read of res
    void (*residual_layernorm_forward)(float *res, float *out, uint16_t *out_bf16, float *mean,
                                       float *rstd, const float *a, const float *b,
                                       const float *w, const float *bias, int N, int C);
    // dinp (N,C) += ..., and dinp_bf16 = the sum rounded
    void (*layernorm_backward)(float *dinp, uint16_t *dinp_bf16, float *dw, float *db,
                               const float *dout, const float *inp, const float *w,
                               const float *mean, const float *rstd, int N, int C);
    // out (N,OC) = inp (N,C) @ w^T (w: (OC,C)) + bias (OC) (bias may be NULL). inp_bf16:
    // inp's twin, read instead of inp in bf16 mode (then inp may be NULL), or NULL; w_bf16
    // likewise w's bf16 copy (the model keeps one of its dense weights, refreshed by the
    // optimizer; then w may be NULL), or NULL to have w rounded for the call.
    void (*matmul_forward)(float *out, const float *inp, const uint16_t *inp_bf16,
                           const float *w, const uint16_t *w_bf16, const float *bias, int N,
                           int C, int OC);
    // dinp (N,C) = dout @ w, or += with dinp_accumulate 1 (the route's query gradient joins
    // the experts' in the PEER layer's dx); dw (OC,C) += dout^T @ inp; dbias (OC) += the
    // column sums of dout. NULL gradients are skipped. In bf16 mode the GEMMs read the
    // twins dout_bf16 and inp_bf16 and the copy w_bf16 where given (and the fp32 tensors
    // they stand for may be NULL; dout only if dbias is: the LM head, whose fp32 dlogits
    // need never exist).
    void (*matmul_backward)(float *dinp, float *dw, float *dbias, const float *dout,
                            const uint16_t *dout_bf16, const float *inp,
                            const uint16_t *inp_bf16, const float *w, const uint16_t *w_bf16,
                            int N, int C, int OC, int dinp_accumulate);
    // The arithmetic of the GEMMs in the ops that follow, one setting per process:
    // MP_PRECISION_FP32, fp32 throughout; MP_PRECISION_BF16, matmul's GEMMs (out, dinp, dw)
    // on bf16-rounded operands with fp32 accumulation and output; the PEER route's sub-key
    // scores stay fp32, as they pick experts (docs/cuda.md, "Precision"). Returns the previous setting, so that a caller can run
    // one op in fp32 and restore it (the query projection, src/model/route.c). The model
    // sets it from system.precision at each entry that runs ops (src/model/model.c), so two
    // models of different precision may take turns. NULL: fp32 only (the CPU).
    int (*set_precision)(int precision);
    // Waits until the work queued so far is done (phase timing, train.profile). NULL: the
    // ops run synchronously (the CPU).
    void (*synchronize)(void);
    // The kernel timer (train.profile). kernel_timer(label): from now on each kernel, GEMM,
    // sort, memset, copy and collective the backend queues is timed on the device and
    // counted under (label, its launch site) until the label changes; NULL stops it.
    // kernel_times: the totals since the last call, which resets them, longest first, at
    // most max rows into out (NULL: only the reset); returns the rows written. NULL ops: no
    // timer (the CPU, whose ops the phase times already separate).
    void (*kernel_timer)(const char *label);
    int (*kernel_times)(mp_kernel_time *out, int max);
    // causal self-attention: qkv (B,T,3C) as [q|k|v], heads contiguous in C;
    // out (B,T,C); att is the backend's attention state that forward keeps for backward, of
    // attention_state_floats(B, T, C, NH) floats (CPU: the (B,NH,T,T) softmax probabilities;
    // CUDA: the (B,NH,T) log-sum-exp of each score row). That call also refuses, with one
    // input-error line, a head size C / NH the backend cannot run; the model calls it when
    // it is built. Backward reads out, the forward's output (the CUDA backend needs it).
    size_t (*attention_state_floats)(int B, int T, int C, int NH);
    void (*attention_forward)(float *out, uint16_t *out_bf16, float *att, const float *qkv,
                              int B, int T, int C, int NH);
    // dqkv (B,T,3C) and its twin are written (dqkv may be NULL where the twin is given:
    // bf16 mode keeps only the twin, which is all the qkv GEMM's backward reads). dbias
    // (3C), if not NULL, += the column sums of dqkv: the qkv GEMM's bias gradient (its
    // matmul_backward then takes dbias NULL), in the order matmul_backward sums it, so the
    // same bits, where the rows' blocks allow (the CUDA tensor-core kernels: T a multiple
    // of 64 and B T <= 65535 x 64; else another fixed order).
    void (*attention_backward)(float *dqkv, uint16_t *dqkv_bf16, float *dbias, const float *dout,
                               const float *qkv, const float *out, const float *att, int B,
                               int T, int C, int NH);
    // exact (erf) GELU, elementwise over n; out may be NULL where the twin is given
    void (*gelu_forward)(float *out, uint16_t *out_bf16, const float *inp, long n);
    // dinp (N,C) = GELU'(inp) * dout, written, and its twin (either may be NULL: bf16 mode
    // keeps only the twin, which is all the GEMMs after it read); dbias (C), if not NULL, +=
    // the column sums of dinp: the bias gradient of the GEMM that produced inp, summed in the
    // pass that writes dinp (that GEMM's matmul_backward then takes dbias NULL) in the order
    // matmul_backward sums it, so the bits are the same
    void (*gelu_backward)(float *dinp, uint16_t *dinp_bf16, float *dbias, const float *inp,
                          const float *dout, int N, int C);
    // out = a + b, elementwise (out may alias a)
    void (*residual_forward)(float *out, const float *a, const float *b, long n);
    // losses (N) = -log softmax(logits)[target]; stats (N, 2) = each row's (max, 1 / sum of
    // exp(logit - max)), all the backward needs: no (N, V) probabilities are kept
    void (*crossentropy_forward)(float *losses, float *stats, const float *logits,
                                 const int32_t *targets, int N, int V);
    // dlogits (N,V) = dloss * (softmax(logits) - onehot(target)), the softmax recomputed
    // from logits and stats as exp(logit - max) * (1 / sum). Written, not added; either
    // dlogits or its twin may be NULL (bf16 mode keeps only the twin).
    void (*crossentropy_backward)(float *dlogits, uint16_t *dlogits_bf16, const float *logits,
                                  const float *stats, const int32_t *targets, float dloss,
                                  int N, int V);

    // PEER / PKM layer (docs/model.md), op by op. src/model/route.c strings these together
    // with the all-reduces between them; no op here talks to other ranks. Shapes: H heads,
    // dk key width (even), HD = H*dk, n sub-keys per half, k selections per head; a query
    // row (N, HD) is H heads of dk, the first dk/2 scored against K1, the rest against K2.
    // Query BatchNorm statistics over THIS rank's rows, summed in double in a fixed order
    // (the caller sums them over ranks): sums (HD) = the column sums of q (N, HD), or, with
    // mean (HD) given, the column sums of (q - mean)^2. sums and mean are backend memory.
    void (*query_bn_stats)(double *sums, const float *q, const double *mean, int N, int HD);
    // qn (N, HD) = w * (q - mean) * rstd + b, per column j
    void (*query_bn_forward)(float *qn, const float *q, const float *w, const float *b,
                             const float *mean, const float *rstd, int N, int HD);
    // Where the token lives: sub-key scores of qn (N, HD) against k1, k2 (n, dk/2), the
    // product-key top-k of each (token, head) and its softmax gates into sel (expert id
    // a*n + b), sel_a, sel_b, gate (N, H, k). With key_bias (2, H, n) (else NULL) the top-k
    // ranks score + bias and the gates are the softmax of the plain scores.
    void (*retrieval_route)(int32_t *sel, int32_t *sel_a, int32_t *sel_b, float *gate,
                            const float *qn, const float *k1, const float *k2,
                            const float *key_bias, int N, int H, int dk, int n, int k);
    // counts (2, H, n) = how often each head selected each first-half (0) and second-half
    // (1) sub-key, from sel_a, sel_b (N, H, k)
    void (*subkey_counts)(int32_t *counts, const int32_t *sel_a, const int32_t *sel_b, int N,
                          int H, int k, int n);
    // ...its backward: dgate (N, H, k) holds the gate gradients on entry and the score
    // gradients on exit (softmax backward); dqn (N, HD) is WRITTEN (the query gradient
    // through the selected sub-keys); dk1, dk2 (n, dk/2) += this batch's part.
    void (*retrieval_route_backward)(float *dqn, float *dk1, float *dk2, float *dgate,
                                     const float *gate, const int32_t *sel_a,
                                     const int32_t *sel_b, const float *qn, const float *k1,
                                     const float *k2, int N, int H, int dk, int n, int k);
    // Query BatchNorm backward, the sums over THIS rank's rows: sums (2, HD) = the column
    // sums of dqn and of dqn * xhat, xhat = (q - mean) * rstd, in double; dw, db (HD) +=
    // (float) of them (the BN affine's local gradient).
    void (*query_bn_backward_stats)(double *sums, float *dw, float *db, const float *dqn,
                                    const float *q, const float *mean, const float *rstd, int N,
                                    int HD);
    // dq (N, HD) in place, d(qn) in, d(q) out. train: the batch statistics' formula with
    // sums (2, HD) over all ranks' count rows, w rstd (dqn - sums[0,j]/count - xhat
    // sums[1,j]/count); else (eval: the statistics were constants) dqn w rstd, sums unread.
    void (*query_bn_backward)(float *dq, const float *q, const float *w, const float *mean,
                              const float *rstd, const double *sums, double count, int train,
                              int N, int HD);
    // Where the expert rows live: M received tokens x (M,C) and R records (slot, local row,
    // gate) grouped by slot (records of slot m are [slot_start[m], slot_start[m+1])).
    // y (M,C) = per slot, sum of gate * act(u_row . x) * v_row (PEER: t->u given) or
    // gate * v_row (PKM: t->u NULL); pre (R) keeps u_row . x for backward. act: relu 1 ReLU,
    // 0 exact GELU.
    void (*experts_forward)(const mp_expert_tables *t, float *y, const float *x, int64_t M,
                            const int64_t *slot_start, const int32_t *slot, const int32_t *row,
                            const float *gate, float *pre, int64_t R, int C, int relu);
    // dx (M,C) and dgate (R) are written (not accumulated). Each row of t->du, t->dv with
    // records gets their sum: added to it (overwrite 0: a later micro-batch of a step) or in
    // its place (overwrite 1: the step's first); overwrite 1 also zeroes the rows marked in
    // t->dirty that have no record, so then every row without one reads zero. t->dirty is
    // kept (rows with records become 1, zeroed rows 0). row_ss (rows) (backend memory, or
    // NULL): per row with records, the sum of squares of its du row plus its dv row after
    // the update (double, a fixed order); overwrite 1 writes 0 for every other row, so after
    // a step's last micro-batch row_ss holds each row's part of the gradient norm.
    void (*experts_backward)(const mp_expert_tables *t, float *dx, float *dgate, const float *dy,
                             const float *x, int64_t M, const int64_t *slot_start,
                             const int32_t *slot, const int32_t *row, const float *gate,
                             const float *pre, int64_t R, int C, int relu, int overwrite,
                             double *row_ss);

    // The exchange's pack and unpack (src/model/exchange.c), in backend memory:
    // dst (n, C) = src[idx[i]] rows (src (*, C), idx (n))
    void (*gather_rows)(float *dst, const float *src, const int32_t *idx, int64_t n, int C);
    // dst[idx[i]] (C) += src[i] rows; idx (n) has no repeated entry, so rows may be summed
    // in parallel and each row's sum is in call order
    void (*scatter_add_rows)(float *dst, const float *src, const int32_t *idx, int64_t n, int C);

    // AdamW on one contiguous range: p -= lr * (m_hat / (sqrt(v_hat) + eps) + wd * p)
    // t is the 1-based step for bias correction; g is scaled by grad_scale first.
    // p_bf16 (n), if not NULL, receives the updated p rounded as to_bf16 rounds it, in the
    // same pass (the bf16 copy of the expert tables: no second read of p); it must be NULL
    // on a backend without to_bf16. p, m, v come out the same bits either way.
    void (*adamw)(float *p, const float *g, float *m, float *v, uint16_t *p_bf16, size_t n,
                  float lr, float beta1, float beta2, float eps, float wd, long t,
                  float grad_scale);
    // sum of squares of x (n), accumulated in double
    double (*sum_squares)(const float *x, size_t n);
    // sum of x (n) in double, in an order that depends only on n (blocks of 16384 elements,
    // the block sums added in block order)
    double (*sum_f64)(const double *x, size_t n);
    // train.expert_optimizer = lazy_adamw (docs/model.md, "Lazy AdamW"): the three ops
    // below touch rows rows[i] (i < n_rows, distinct, local row indices) of (*, C) tables
    // and no other byte of them, so their cost is proportional to n_rows. Each row is
    // handled by one thread (group), no atomics. rows is backend memory.
    // The adamw above, element for element, on those rows of p, g, m, v (and of p_bf16,
    // when given: then no other row of it is written either).
    void (*adamw_rows)(float *p, const float *g, float *m, float *v, uint16_t *p_bf16,
                       const int32_t *rows, int64_t n_rows, int C, float lr, float beta1,
                       float beta2, float eps, float wd, long t, float grad_scale);
    // dst (n) = src rounded to bfloat16 (to nearest, ties to even), as raw bits; NULL when
    // the backend has no bf16 mode (the CPU)
    void (*to_bf16)(uint16_t *dst, const float *src, size_t n);
} mp_backend;

const mp_backend *mp_backend_cpu(void);
// NULL with a reason in err when CUDA was not compiled in or no GPU is present.
const mp_backend *mp_backend_cuda(char *err, size_t err_len);
