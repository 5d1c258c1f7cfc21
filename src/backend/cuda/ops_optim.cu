// CUDA optimizer ops: AdamW on one contiguous range or on a list of rows (lazy AdamW),
// writing the bf16 copy of what they update in the same pass when asked, and the sums of
// squares for clipping
// (src/backend/cpu/ops_optim.c has the same math and block order), and the bf16 copies of
// the expert tables that system.precision = bf16 reads.
#include <math.h>
#include <stdlib.h>
#include "backend/cuda/cuda_common.h"

// elements per partial sum, as on the CPU: the order of the final sum depends only on n
#define SS_BLOCK 16384
#define SS_THREADS 256

// One element's AdamW step from its scaled gradient gi, the CPU's formula; the dense
// kernel and the row kernel both take it.
__device__ __forceinline__ void adamw_element(float *p, float *m, float *v, float gi, float lr,
                                              float beta1, float beta2, float eps, float wd,
                                              float bc1, float bc2) {
    float mi = beta1 * *m + (1.0f - beta1) * gi;
    float vi = beta2 * *v + (1.0f - beta2) * gi * gi;
    *m = mi;
    *v = vi;
    float mhat = mi / bc1, vhat = vi / bc2;
    *p -= lr * (mhat / (sqrtf(vhat) + eps) + wd * *p);
}

// The bf16 copy (pb, or NULL) of the p just written, rounded as to_bf16 rounds: p is
// still in a register, so the copy costs a 2-byte store instead of to_bf16's second pass
// over p (4-byte read, 2-byte store).
static __global__ void adamw_kernel(float *p, const float *g, float *m, float *v, uint16_t *pb,
                                    size_t n, float lr, float beta1, float beta2, float eps,
                                    float wd, float bc1, float bc2, float grad_scale) {
    size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    if (i >= n) return;
    adamw_element(p + i, m + i, v + i, g[i] * grad_scale, lr, beta1, beta2, eps, wd, bc1, bc2);
    if (pb) pb[i] = mp_float_to_bf16(p[i]);
}

// adamw_kernel 4 elements a thread, with 16-byte loads and stores (8-byte for the copy): the
// same element math, so the same bits. AdamW over the expert tables is the step's largest
// stream (about 30 bytes a parameter), and 4-byte accesses put a quarter as many bytes in
// flight per load instruction.
static __global__ void adamw4_kernel(float *p, const float *g, float *m, float *v, uint16_t *pb,
                                     size_t n4, float lr, float beta1, float beta2, float eps,
                                     float wd, float bc1, float bc2, float grad_scale) {
    size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    if (i >= n4) return;
    float4 *p4 = (float4 *)p + i, *m4 = (float4 *)m + i, *v4 = (float4 *)v + i;
    const float4 *g4 = (const float4 *)g + i;
    MP_CHECK_ALIGN16(p4);
    MP_CHECK_ALIGN16(g4);
    MP_CHECK_ALIGN16(m4);
    MP_CHECK_ALIGN16(v4);
    float4 pv = *p4, gv = *g4, mv = *m4, vv = *v4;
    adamw_element(&pv.x, &mv.x, &vv.x, gv.x * grad_scale, lr, beta1, beta2, eps, wd, bc1, bc2);
    adamw_element(&pv.y, &mv.y, &vv.y, gv.y * grad_scale, lr, beta1, beta2, eps, wd, bc1, bc2);
    adamw_element(&pv.z, &mv.z, &vv.z, gv.z * grad_scale, lr, beta1, beta2, eps, wd, bc1, bc2);
    adamw_element(&pv.w, &mv.w, &vv.w, gv.w * grad_scale, lr, beta1, beta2, eps, wd, bc1, bc2);
    *p4 = pv;
    *m4 = mv;
    *v4 = vv;
    if (pb) {
        uint2 *b = (uint2 *)pb + i;
        MP_CHECK_ALIGN8(b);
        *b = make_uint2(mp_bf16_pair(pv.x, pv.y), mp_bf16_pair(pv.z, pv.w));
    }
}

void mp_cuda_adamw(float *p, const float *g, float *m, float *v, uint16_t *p_bf16, size_t n,
                   float lr, float beta1, float beta2, float eps, float wd, long t,
                   float grad_scale) {
    if (!n) return;
    // bias corrections on the host, exactly as the CPU computes them
    float bc1 = 1.0f - powf(beta1, (float)t);
    float bc2 = 1.0f - powf(beta2, (float)t);
    // 4 at a time where the range starts 16-byte aligned (its offset in the group a multiple
    // of 4 floats, as every tensor's of d_model % 4 == 0 models is), the last n % 4 alone;
    // a range that starts elsewhere element by element
    bool vec = mp_aligned(p, 16) && mp_aligned(g, 16) && mp_aligned(m, 16) && mp_aligned(v, 16) &&
               (!p_bf16 || mp_aligned(p_bf16, 8));
    size_t n4 = vec ? n / 4 : 0, done = 4 * n4;
    if (n4) {
        adamw4_kernel<<<mp_blocks(n4, 256), 256>>>(p, g, m, v, p_bf16, n4, lr, beta1, beta2, eps,
                                                   wd, bc1, bc2, grad_scale);
        KERNEL_CHECK();
    }
    if (done < n) {
        adamw_kernel<<<mp_blocks(n - done, 256), 256>>>(p + done, g + done, m + done, v + done,
                                                        p_bf16 ? p_bf16 + done : NULL, n - done,
                                                        lr, beta1, beta2, eps, wd, bc1, bc2,
                                                        grad_scale);
        KERNEL_CHECK();
    }
}

// one block per listed row, its threads striding over the row's C elements: each row is
// updated by one block, so the update needs no atomics; pb (or NULL) as in adamw_kernel
static __global__ void adamw_rows_kernel(float *p, const float *g, float *m, float *v,
                                         uint16_t *pb, const int32_t *rows, int C, float lr,
                                         float beta1, float beta2, float eps, float wd,
                                         float bc1, float bc2, float grad_scale) {
    size_t o = (size_t)rows[blockIdx.x] * (size_t)C;
    for (int j = threadIdx.x; j < C; j += blockDim.x) {
        size_t i = o + j;
        adamw_element(p + i, m + i, v + i, g[i] * grad_scale, lr, beta1, beta2, eps, wd, bc1,
                      bc2);
        if (pb) pb[i] = mp_float_to_bf16(p[i]);
    }
}

void mp_cuda_adamw_rows(float *p, const float *g, float *m, float *v, uint16_t *p_bf16,
                        const int32_t *rows, int64_t n_rows, int C, float lr, float beta1,
                        float beta2, float eps, float wd, long t, float grad_scale) {
    if (n_rows <= 0) return;
    float bc1 = 1.0f - powf(beta1, (float)t);
    float bc2 = 1.0f - powf(beta2, (float)t);
    adamw_rows_kernel<<<(unsigned)n_rows, 256>>>(p, g, m, v, p_bf16, rows, C, lr, beta1, beta2,
                                                 eps, wd, bc1, bc2, grad_scale);
    KERNEL_CHECK();
}

// part[blockIdx.x] = the sum of every thread's s over the block of SS_THREADS threads, in a
// fixed tree: warp butterflies, then the warps in order
__device__ __forceinline__ void block_partial(double *part, double s) {
    __shared__ double sh[SS_THREADS / 32];
    s = mp_warp_sum_d(s);
    if (threadIdx.x % 32 == 0) sh[threadIdx.x / 32] = s;
    __syncthreads();
    if (threadIdx.x == 0) {
        double t = 0.0;
        for (int w = 0; w < SS_THREADS / 32; w++) t += sh[w];
        part[blockIdx.x] = t;
    }
}

// one block per SS_BLOCK elements: a double partial, summed in a fixed tree
static __global__ void sum_squares_kernel(double *part, const float *x, size_t n) {
    size_t lo = (size_t)blockIdx.x * SS_BLOCK, hi = lo + SS_BLOCK < n ? lo + SS_BLOCK : n;
    double s = 0.0;
    for (size_t i = lo + threadIdx.x; i < hi; i += SS_THREADS) s += (double)x[i] * x[i];
    block_partial(part, s);
}

// the sum of the blocks' partials (device), on the host in block order
static double sum_partials(const double *part, size_t nblk) {
    double *host = (double *)mp_malloc(nblk * sizeof(double));
    CUDA_CHECK(cudaMemcpy(host, part, nblk * sizeof(double), cudaMemcpyDeviceToHost));
    mp_cuda_mark("cudaMemcpy", __FILE__, __LINE__);
    double s = 0.0;
    for (size_t k = 0; k < nblk; k++) s += host[k];
    free(host);
    return s;
}

double mp_cuda_sum_squares(const float *x, size_t n) {
    if (!n) return 0.0;
    size_t nblk = (n + SS_BLOCK - 1) / SS_BLOCK;
    double *part = (double *)mp_cuda_scratch(SCR_SS, nblk * sizeof(double));
    sum_squares_kernel<<<(unsigned)nblk, SS_THREADS>>>(part, x, n);
    KERNEL_CHECK();
    return sum_partials(part, nblk);
}

// one block per SS_BLOCK doubles, as sum_squares_kernel: the block's sum in a fixed tree
static __global__ void sum_f64_kernel(double *part, const double *x, size_t n) {
    size_t lo = (size_t)blockIdx.x * SS_BLOCK, hi = lo + SS_BLOCK < n ? lo + SS_BLOCK : n;
    double s = 0.0;
    for (size_t i = lo + threadIdx.x; i < hi; i += SS_THREADS) s += x[i];
    block_partial(part, s);
}

double mp_cuda_sum_f64(const double *x, size_t n) {
    if (!n) return 0.0;
    size_t nblk = (n + SS_BLOCK - 1) / SS_BLOCK;
    // SCR_SS: sum_squares's partials, free again once either op has returned
    double *part = (double *)mp_cuda_scratch(SCR_SS, nblk * sizeof(double));   // (nblk)
    sum_f64_kernel<<<(unsigned)nblk, SS_THREADS>>>(part, x, n);
    KERNEL_CHECK();
    return sum_partials(part, nblk);
}

static __global__ void to_bf16_kernel(uint16_t *dst, const float *src, size_t n) {
    size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    if (i < n) dst[i] = mp_float_to_bf16(src[i]);
}

void mp_cuda_to_bf16(uint16_t *dst, const float *src, size_t n) {
    if (!n) return;
    to_bf16_kernel<<<mp_blocks(n, 256), 256>>>(dst, src, n);
    KERNEL_CHECK();
}
