// The CUDA backend's extras beyond the backend table, callable from C (tests, the benchmark
// driver tools/bench/bench_peer_cuda.c). Only present when MP_HAVE_CUDA is defined; every
// function needs mp_backend_cuda() to have succeeded first. Pointers are device memory
// (the backend's alloc) unless a name says host.
#pragma once
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// Records per segment of a hot row in the expert gradients (retrieval_experts.cu): a row
// with more records is summed by segments, then the segments' sums in order. Exposed for
// the test that gives rows more.
#define MP_CUDA_GRAD_SEG 1024
// The same for the sub-key gradients (retrieval_route.cu), whose keys hold N H k / n records
// each on average (2048 at the paper's shape).
#define MP_CUDA_SUBKEY_SEG 4096

// Waits for all queued GPU work (benchmarks time with events, tests read results after it).
void mp_cuda_synchronize(void);
// GPU timing: an event marks a point in the queued work; mp_cuda_event_ms waits for `to`
// and returns the milliseconds between the two.
typedef struct mp_cuda_event mp_cuda_event;
mp_cuda_event *mp_cuda_event_new(void);
void mp_cuda_event_record(mp_cuda_event *e);
float mp_cuda_event_ms(mp_cuda_event *from, mp_cuda_event *to);
void mp_cuda_event_free(mp_cuda_event *e);
// The device's name and its memory in use now (cudaMemGetInfo: total - free), in bytes.
const char *mp_cuda_device_name(void);
size_t mp_cuda_memory_used(void);
// Product-key top-k of `rows` queries from their sub-key scores s1, s2 (rows, n): the k best
// of s1[a] + s2[b] (ties to the lower expert id a*n + b), written as the route writes them:
// sel, sel_a, sel_b and the softmax gates (rows, k). k <= 32, k <= n. With bias (2, H, n)
// (row r is head r % H), the ranking is of (s1[a] + b1[a]) + (s2[b] + b2[b]) and the gates
// stay the softmax of the plain sums. Exposed for the brute-force test.
void mp_cuda_product_topk(const float *s1, const float *s2, const float *bias, int H, long rows,
                          int n, int k, int32_t *sel, int32_t *sel_a, int32_t *sel_b,
                          float *gate);
// Row-major C (M,N) = alpha op(A) op(B) + beta C (as mp_cpu_sgemm) in the arithmetic `math`
// of the backend's GEMMs: fp32 (cublasSgemm), or bf16 (A and B rounded to bf16 into
// scratch, then the bf16 GEMM with fp32 accumulation). Exposed for the GEMM test.
enum { MP_CUDA_GEMM_TEST_FP32, MP_CUDA_GEMM_TEST_BF16 };
// Frees the bias-epilogue GEMMs' cuBLASLt plans (gemm_lt.cu), so that the next call of each
// shape plans again: for the tests, after one that planned with no algorithm to be had.
void mp_cuda_lt_forget_plans(void);
void mp_cuda_gemm_test(int math, int trans_a, int trans_b, int M, int N, int K, float alpha,
                       const float *A, int lda, const float *B, int ldb, float beta, float *C,
                       int ldc);

#ifdef __cplusplus
}
#endif
