// What the CUDA backend's files share (CUDA C++, included by src/backend/cuda/*.cu only):
// checked calls, the cuBLAS handle, grow-only device scratch, row-major GEMM wrappers, warp
// reductions and the ops each file exports to the backend table.
//
// Everything runs on the legacy default stream, so kernels, cuBLAS calls and cudaMemcpy are
// ordered without explicit synchronisation. No floating-point sum uses atomics or an order
// that depends on scheduling (integer atomics only count, or hand out places in a list):
// every output element has one writer and sums run in a fixed order, so results are bitwise
// repeatable on the same GPU, toolkit and shapes (cuBLAS guarantees
// the same for its GEMMs on one architecture and SM count).
#pragma once
#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <stddef.h>
#include <stdint.h>
extern "C" {
#include "core/log.h"
#include "millipede/backend.h"
}

// Every CUDA runtime and cuBLAS call goes through these: a failure ends the process with
// file:line, the call and the library's own message.
void mp_cuda_check_at(cudaError_t rc, const char *what, const char *file, int line);
void mp_cublas_check_at(cublasStatus_t rc, const char *what, const char *file, int line);
#define CUDA_CHECK(call) mp_cuda_check_at((call), #call, __FILE__, __LINE__)
#define CUBLAS_CHECK(call) mp_cublas_check_at((call), #call, __FILE__, __LINE__)
// after every kernel launch: launch-configuration errors show up here, at their line, and
// the kernel timer (kernel_timer.cu) marks the launch
void mp_cuda_launched(const char *file, int line, const char *func);
#define KERNEL_CHECK() mp_cuda_launched(__FILE__, __LINE__, __func__)
// The kernel timer (kernel_timer.cu): mp_cuda_mark after any other queued GPU work (what:
// a static string naming it), mp_cuda_timer_synchronized after each wait for the device.
void mp_cuda_mark(const char *what, const char *file, int line);
void mp_cuda_timer_synchronized(void);
void mp_cuda_kernel_timer(const char *label);
int mp_cuda_kernel_times(mp_kernel_time *out, int max);

cublasHandle_t mp_cuda_blas(void);

// Grow-only device scratch, one buffer per slot: valid until the next request of the same
// slot. An op and the helpers it calls use distinct slots.
enum {
    SCR_COLSUM,      // column-sum partials
    SCR_ATT_D,       // attention backward: D = rowsum(dO * out) per row
    SCR_SS,          // sum_squares partials
    SCR_S1, SCR_S2,  // sub-key scores of a chunk of queries
    SCR_SORT_KEYS, SCR_SORT_VALS, SCR_SORT_TMP, SCR_SORT_IDX, SCR_SORT_OFF,   // mp_cuda_sort_by_key
    SCR_DPRE,        // experts backward: d(pre-activation) per record
    SCR_XB, SCR_DYB, // experts backward, bf16 mode: x and dy rounded to bf16
    SCR_GEMM_A, SCR_GEMM_B,   // matmul, bf16 mode: GEMM operands rounded to bf16
    SCR_ROW_SS,      // experts backward: sums of squares per (column block, row)
    SCR_HOT_PLAN,    // mp_cuda_plan_hot_keys
    SCR_HOT_PART,    // partial sums of the hot keys' segments (experts and sub-key gradients)
    SCR_LT_WORKSPACE,   // cuBLASLt's workspace (gemm_lt.cu)
    SCR_COUNT
};
void *mp_cuda_scratch(int slot, size_t bytes);
void mp_cuda_zero(void *p, size_t bytes);   // the backend's zero: a memset on the stream

// Lets `kernel` launch with up to `bytes` of dynamic shared memory (above 48 KiB a kernel has
// to opt in), calling the runtime only when bytes exceeds what *allowed, the caller's static
// for that kernel, says was set before.
template <class F> static inline void mp_cuda_allow_shared(F *kernel, size_t bytes, size_t *allowed) {
    if (bytes <= *allowed) return;
    CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes));
    *allowed = bytes;
}

static inline unsigned mp_blocks(size_t n, int threads) {
    size_t b = (n + (size_t)threads - 1) / (size_t)threads;
    return (unsigned)(b ? b : 1);
}

// Rows per block of a row-blocked reduction whose blocks run along grid.y (at most 65535
// blocks): `want`, or more when N needs it. Depends only on N, so the order is fixed.
static inline int mp_rows_per_block(int N, int want) {
    int need = (N + 65534) / 65535;
    return need > want ? need : want;
}

// GEMMs. The backend's precision setting (backend.h set_precision, system.precision) picks
// the arithmetic:
// - MP_PRECISION_FP32: every GEMM is cublasSgemm in the default math mode (no TF32).
// - MP_PRECISION_BF16: matmul takes its operands' bf16 twins (backend.h) or rounds them to
//   bf16 (mp_cuda_round_bf16) and runs mp_cuda_gemm_bf16 (tensor cores, fp32 accumulation
//   and output), or, in the forward with a bias, mp_cuda_gemm_bf16_bias. The only GEMMs
//   that keep fp32 operands are the PEER route's (the query forward, src/model/route.c,
//   and the sub-key scores, retrieval_route.cu), and they stay plain fp32 rather than
//   TF32: they pick experts (docs/cuda.md, "Precision"). Attention has its own kernels.
int mp_cuda_precision(void);   // MP_PRECISION_FP32 or MP_PRECISION_BF16

// Row-major C (M,N) = alpha op(A) op(B) + beta C, like mp_cpu_sgemm: op = transpose when
// trans_x is non-zero (A is then stored (K,M), B (N,K)). cuBLAS is column-major, so this is
// C^T = op(B)^T op(A)^T with the operands swapped and the same transpose flags. fp32
// (cublasSgemm, CUBLAS_DEFAULT_MATH: no TF32).
void mp_cuda_sgemm(int trans_a, int trans_b, int M, int N, int K, float alpha, const float *A,
                   int lda, const float *B, int ldb, float beta, float *C, int ldc);
// dst (rows, cols), contiguous = src (rows, cols, leading dimension ld >= cols) rounded to
// bf16 (to nearest, ties to even: mp_float_to_bf16).
void mp_cuda_round_bf16(uint16_t *dst, const float *src, int rows, int cols, int ld);
// mp_cuda_gemm on bf16 operands (raw bits, e.g. from mp_cuda_round_bf16): the products of
// two bf16 values are exact in fp32, the sums fp32 (cublasGemmEx: CUDA_R_16BF A and B,
// CUDA_R_32F C, CUBLAS_COMPUTE_32F). C, alpha and beta stay fp32.
void mp_cuda_gemm_bf16(int trans_a, int trans_b, int M, int N, int K, float alpha,
                       const uint16_t *A, int lda, const uint16_t *B, int ldb, float beta,
                       float *C, int ldc);
// Row-major C (M,N) = A (M,K) . B^T (B stored (N,K)) + bias (N) broadcast over the rows, bf16
// operands, the bias added to the fp32 sums in the GEMM's epilogue (cuBLASLt, gemm_lt.cu).
// Returns 0, having queued nothing, where cuBLASLt has no algorithm for the call (or the
// bias is not 16-byte aligned): the caller then runs mp_cuda_gemm_bf16 and adds the bias.
int mp_cuda_gemm_bf16_bias(int M, int N, int K, const uint16_t *A, int lda, const uint16_t *B,
                           int ldb, const float *bias, float *C, int ldc);

// out (C) += column sums of in (N, C), in a fixed order: each block of
// mp_rows_per_block(N, COLSUM_ROWS) rows sums its rows in order into a partial (part
// (nblk, C)), then mp_cuda_colsum_finish adds the partials in block order. A kernel that
// produces in can form the partials itself and call only the finish (gelu_backward, the
// tensor-core attention backward).
#define COLSUM_ROWS 64
void mp_cuda_colsum_add(float *out, const float *in, int N, int C);
void mp_cuda_colsum_finish(float *out, const float *part, int nblk, int C);

// Stable sort of the records [0, R) by key (non-negative int32): *idx (R) the record
// indices in key order, ties in index order, and *skey (R) the sorted keys. When key_bound
// > 0 (all keys < key_bound) and off is not NULL, *off (key_bound + 1) is where each key's
// run starts in idx. The results live in scratch (SCR_SORT_*) until the next sort.
void mp_cuda_sort_by_key(const int32_t *key, int64_t R, int64_t key_bound, const int32_t **idx,
                         const int32_t **skey, const int32_t **off);
// The hot keys of a sort's grouping: those of `keys` with more than seg of the R records
// (off from mp_cuda_sort_by_key), each cut into segments of seg records, the last of seg to
// 2 seg - 1 (it takes the remainder).
// For the sums that give each key one worker: a key holding most of the records (a
// collapsed router's expert row or sub-key) would keep its worker busy long after the rest
// of the GPU had finished, so those keys are left to one worker per segment, writing a
// partial sum, and one per key adding its partials in segment order: another fixed order.
// The lists are device memory (scratch SCR_HOT_PLAN, until the next plan), filled on the
// stream by one kernel; their sizes are read there by the kernels that use them, and the
// host knows only a bound: at most R / seg segments, and so hot keys. Integer atomics hand
// out the places in the lists, so which key lands where varies; no sum depends on it.
typedef struct {
    int32_t *count;                 // (2) hot keys, segments
    int32_t *key, *first, *nseg;    // (max_seg) each hot key, its first segment, its segments
    int32_t *seg_begin, *seg_end;   // (max_seg) each segment's records [begin, end) in idx
    int64_t max_seg;                // host: the bound on both counts
} mp_hot_keys;
mp_hot_keys mp_cuda_plan_hot_keys(const int32_t *off, int64_t keys, int64_t R, int seg);
// 16-byte accesses (float4, uint4) must be 16-byte aligned: a GPU faults on one that is not,
// x86 does it quietly, so the emulator (tests/cuda_emu) defines this check; here it is free.
#ifndef MP_CHECK_ALIGN16
#define MP_CHECK_ALIGN16(p) ((void)0)
#endif
// whether p is a multiple of `bytes` (a power of two): the test before a vector path
__host__ __device__ __forceinline__ bool mp_aligned(const void *p, uintptr_t bytes) {
    return ((uintptr_t)p & (bytes - 1)) == 0;
}
#ifndef MP_CHECK_ALIGN8   // the same for 8-byte accesses (float2, uint2) and 4-byte ones
#define MP_CHECK_ALIGN8(p) ((void)0)
#endif
#ifndef MP_CHECK_ALIGN4
#define MP_CHECK_ALIGN4(p) ((void)0)
#endif

// Loops over register arrays with compile-time trip counts: nvcc unrolls them, so the
// arrays stay in registers; the CPU emulator's C++ compiler has no such pragma.
// UNROLL4: a loop with a run-time trip count unrolled by 4, so that 4 iterations' loads are
// in flight at once.
#ifdef __CUDACC__
#define UNROLL _Pragma("unroll")
#define UNROLL4 _Pragma("unroll 4")
#else
#define UNROLL
#define UNROLL4
#endif

// warp sums (every lane gets the total); the butterfly order is fixed
__device__ __forceinline__ float mp_warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ double mp_warp_sum_d(double v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// bfloat16 as raw bits (uint16_t), the top half of a float: converted by hand rather than
// through cuda_bf16.h, so the same code runs in the CPU emulator (tests/cuda_emu).
__device__ __forceinline__ float mp_bf16_to_float(uint16_t b) {
    return __uint_as_float((uint32_t)b << 16);
}
__device__ __forceinline__ uint16_t mp_float_to_bf16(float f) {
    uint32_t u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u);   // quiet NaN
    u += 0x7fffu + ((u >> 16) & 1u);   // to nearest, ties to even; overflow carries to inf
    return (uint16_t)(u >> 16);
}
// two floats rounded to bf16 as one 32-bit word: lo at the lower address (little-endian)
__device__ __forceinline__ uint32_t mp_bf16_pair(float lo, float hi) {
    return (uint32_t)mp_float_to_bf16(lo) | (uint32_t)mp_float_to_bf16(hi) << 16;
}
// an expert-table (or activation) element as float: fp32, or bf16 bits widened
__device__ __forceinline__ float mp_table_load(const float *p) { return *p; }
__device__ __forceinline__ float mp_table_load(const uint16_t *p) { return mp_bf16_to_float(*p); }

// GELU (exact, erf) and ReLU with their derivatives; the CPU's formulas
__device__ __forceinline__ float mp_act_fwd(int relu, float x) {
    if (relu) return x > 0.0f ? x : 0.0f;
    return 0.5f * x * (1.0f + erff(x * 0.70710678118654752440f));
}
__device__ __forceinline__ float mp_act_grad(int relu, float x) {
    if (relu) return x > 0.0f ? 1.0f : 0.0f;
    float cdf = 0.5f * (1.0f + erff(x * 0.70710678118654752440f));
    float pdf = expf(-0.5f * x * x) * 0.39894228040143267794f;
    return cdf + x * pdf;
}

// the ops of the table, one group per file
void mp_cuda_encoder_forward(float *out, const int32_t *inp, const float *wte, const float *wpe,
                             int B, int T, int C);
void mp_cuda_encoder_backward(float *dwte, float *dwpe, const float *dout, const int32_t *inp,
                              int B, int T, int C, int V);
void mp_cuda_layernorm_forward(float *out, uint16_t *out_bf16, float *mean, float *rstd,
                               const float *inp, const float *w, const float *b, int N, int C);
void mp_cuda_layernorm_backward(float *dinp, uint16_t *dinp_bf16, float *dw, float *db,
                                const float *dout, const float *inp, const float *w,
                                const float *mean, const float *rstd, int N, int C);
void mp_cuda_matmul_forward(float *out, const float *inp, const uint16_t *inp_bf16,
                            const float *w, const uint16_t *w_bf16, const float *bias, int N,
                            int C, int OC);
void mp_cuda_matmul_backward(float *dinp, float *dw, float *dbias, const float *dout,
                             const uint16_t *dout_bf16, const float *inp,
                             const uint16_t *inp_bf16, const float *w, const uint16_t *w_bf16,
                             int N, int C, int OC, int dinp_accumulate);
size_t mp_cuda_attention_state_floats(int B, int T, int C, int NH);
void mp_cuda_attention_forward(float *out, uint16_t *out_bf16, float *att, const float *qkv,
                               int B, int T, int C, int NH);
void mp_cuda_attention_backward(float *dqkv, uint16_t *dqkv_bf16, float *dbias,
                                const float *dout, const float *qkv, const float *out,
                                const float *att, int B, int T, int C, int NH);
// the tensor-core kernels that bf16 mode runs (ops_attention_tc.cu); nf: the head's columns
// over 16, rounded up to 1, 2, 4 or 8; D (B, NH, T) = rowsum(dO * out); the twins out_bf16
// and dqkv_bf16 (backend.h) written in the same stores, when not NULL, and dbias's column
// sums formed from the values stored, block by block of rows (dqkv itself may be NULL)
void mp_cuda_attention_forward_tc(float *out, uint16_t *out_bf16, float *lse, const float *qkv,
                                  int B, int T, int C, int NH, float scale, int nf);
void mp_cuda_attention_backward_tc(float *dqkv, uint16_t *dqkv_bf16, float *dbias,
                                   const float *dout, const float *qkv, const float *lse,
                                   const float *D, int B, int T, int C, int NH, float scale,
                                   int nf);
void mp_cuda_gelu_forward(float *out, uint16_t *out_bf16, const float *inp, long n);
void mp_cuda_gelu_backward(float *dinp, uint16_t *dinp_bf16, float *dbias, const float *inp,
                           const float *dout, int N, int C);
void mp_cuda_residual_forward(float *out, const float *a, const float *b, long n);
void mp_cuda_residual_layernorm_forward(float *res, float *out, uint16_t *out_bf16, float *mean,
                                        float *rstd, const float *a, const float *b,
                                        const float *w, const float *bias, int N, int C);
void mp_cuda_gather_rows(float *dst, const float *src, const int32_t *idx, int64_t n, int C);
void mp_cuda_scatter_add_rows(float *dst, const float *src, const int32_t *idx, int64_t n, int C);
void mp_cuda_crossentropy_forward(float *losses, float *stats, const float *logits,
                                  const int32_t *targets, int N, int V);
void mp_cuda_crossentropy_backward(float *dlogits, uint16_t *dlogits_bf16, const float *logits,
                                   const float *stats, const int32_t *targets, float dloss, int N,
                                   int V);
void mp_cuda_adamw(float *p, const float *g, float *m, float *v, uint16_t *p_bf16, size_t n,
                   float lr, float beta1, float beta2, float eps, float wd, long t,
                   float grad_scale);
double mp_cuda_sum_squares(const float *x, size_t n);
double mp_cuda_sum_f64(const double *x, size_t n);
void mp_cuda_adamw_rows(float *p, const float *g, float *m, float *v, uint16_t *p_bf16,
                        const int32_t *rows, int64_t n_rows, int C, float lr, float beta1,
                        float beta2, float eps, float wd, long t, float grad_scale);
void mp_cuda_to_bf16(uint16_t *dst, const float *src, size_t n);
void mp_cuda_query_bn_stats(double *sums, const float *q, const double *mean, int N, int HD);
void mp_cuda_query_bn_forward(float *qn, const float *q, const float *w, const float *b,
                              const float *mean, const float *rstd, int N, int HD);
void mp_cuda_retrieval_route(int32_t *sel, int32_t *sel_a, int32_t *sel_b, float *gate,
                             const float *qn, const float *k1, const float *k2,
                             const float *key_bias, int N, int H, int dk, int n, int k);
void mp_cuda_subkey_counts(int32_t *counts, const int32_t *sel_a, const int32_t *sel_b, int N,
                           int H, int k, int n);
void mp_cuda_retrieval_route_backward(float *dqn, float *dk1, float *dk2, float *dgate,
                                      const float *gate, const int32_t *sel_a,
                                      const int32_t *sel_b, const float *qn, const float *k1,
                                      const float *k2, int N, int H, int dk, int n, int k);
void mp_cuda_query_bn_backward_stats(double *sums, float *dw, float *db, const float *dqn,
                                     const float *q, const float *mean, const float *rstd, int N,
                                     int HD);
void mp_cuda_query_bn_backward(float *dq, const float *q, const float *w, const float *mean,
                               const float *rstd, const double *sums, double count, int train,
                               int N, int HD);
void mp_cuda_experts_forward(const mp_expert_tables *t, float *y, const float *x, int64_t M,
                             const int64_t *slot_start, const int32_t *slot, const int32_t *row,
                             const float *gate, float *pre, int64_t R, int C, int relu);
void mp_cuda_experts_backward(const mp_expert_tables *t, float *dx, float *dgate, const float *dy,
                              const float *x, int64_t M, const int64_t *slot_start,
                              const int32_t *slot, const int32_t *row, const float *gate,
                              const float *pre, int64_t R, int C, int relu, int overwrite,
                              double *row_ss);
