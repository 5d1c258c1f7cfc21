// The CUDA backend table: device discovery, device memory, checked calls, scratch, cuBLAS
// GEMM wrappers. Linked against the runtime API only (cudart, cublas, cublasLt), so a binary
// built with CUDA starts on a machine without a GPU or driver: mp_backend_cuda then returns
// NULL with the reason and the caller stays on the CPU or reports it.
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "backend/cuda/cuda.h"
#include "backend/cuda/cuda_common.h"

static cublasHandle_t g_blas;
static char g_device_name[256];
static mp_backend g_backend;
static int g_ready;

void mp_cuda_check_at(cudaError_t rc, const char *what, const char *file, int line) {
    if (rc != cudaSuccess)
        mp_fatal_at(file, line, "CUDA error %s (%s) in %s", cudaGetErrorName(rc),
                    cudaGetErrorString(rc), what);
}

static const char *cublas_status_name(cublasStatus_t s) {
    switch (s) {
    case CUBLAS_STATUS_SUCCESS: return "CUBLAS_STATUS_SUCCESS";
    case CUBLAS_STATUS_NOT_INITIALIZED: return "CUBLAS_STATUS_NOT_INITIALIZED";
    case CUBLAS_STATUS_ALLOC_FAILED: return "CUBLAS_STATUS_ALLOC_FAILED";
    case CUBLAS_STATUS_INVALID_VALUE: return "CUBLAS_STATUS_INVALID_VALUE";
    case CUBLAS_STATUS_ARCH_MISMATCH: return "CUBLAS_STATUS_ARCH_MISMATCH";
    case CUBLAS_STATUS_MAPPING_ERROR: return "CUBLAS_STATUS_MAPPING_ERROR";
    case CUBLAS_STATUS_EXECUTION_FAILED: return "CUBLAS_STATUS_EXECUTION_FAILED";
    case CUBLAS_STATUS_INTERNAL_ERROR: return "CUBLAS_STATUS_INTERNAL_ERROR";
    case CUBLAS_STATUS_NOT_SUPPORTED: return "CUBLAS_STATUS_NOT_SUPPORTED";
    case CUBLAS_STATUS_LICENSE_ERROR: return "CUBLAS_STATUS_LICENSE_ERROR";
    default: return "unknown cuBLAS status";
    }
}

void mp_cublas_check_at(cublasStatus_t rc, const char *what, const char *file, int line) {
    if (rc != CUBLAS_STATUS_SUCCESS)
        mp_fatal_at(file, line, "cuBLAS error %s (%d) in %s", cublas_status_name(rc), (int)rc, what);
}

cublasHandle_t mp_cuda_blas(void) { return g_blas; }

// ---------------------------------------------------------------------------------------
// memory: zero-filled device allocations; to_host / from_host are cudaMemcpy with the
// direction taken from the pointers (unified addressing), so a host or device pointer on
// either side works

static void *cuda_alloc(size_t bytes) {
    void *p = NULL;
    size_t size = bytes ? bytes : 256;
    cudaError_t rc = cudaMalloc(&p, size);
    if (rc != cudaSuccess) {
        size_t free_b = 0, total_b = 0;
        cudaMemGetInfo(&free_b, &total_b);
        mp_fatal("out of GPU memory allocating %zu bytes (%zu of %zu bytes free): %s", bytes,
                 free_b, total_b, cudaGetErrorString(rc));
    }
    CUDA_CHECK(cudaMemset(p, 0, size));
    return p;
}

static void cuda_free(void *p) {
    if (p) CUDA_CHECK(cudaFree(p));
}

void mp_cuda_zero(void *p, size_t bytes) {
    if (!bytes) return;
    CUDA_CHECK(cudaMemset(p, 0, bytes));
    mp_cuda_mark("cudaMemset", __FILE__, __LINE__);
}

static void cuda_copy(void *dst, const void *src, size_t bytes) {
    if (!bytes || dst == src) return;
    CUDA_CHECK(cudaMemcpy(dst, src, bytes, cudaMemcpyDefault));
    mp_cuda_mark("cudaMemcpy", __FILE__, __LINE__);
}

// ---------------------------------------------------------------------------------------
// scratch

static void *g_scratch[SCR_COUNT];
static size_t g_scratch_cap[SCR_COUNT];

void *mp_cuda_scratch(int slot, size_t bytes) {
    if (bytes > g_scratch_cap[slot]) {
        // queued kernels may still read the old buffer: cudaFree waits for the device
        if (g_scratch[slot]) CUDA_CHECK(cudaFree(g_scratch[slot]));
        g_scratch[slot] = NULL;
        size_t cap = bytes + bytes / 4;   // some headroom against regrowing every step
        cudaError_t rc = cudaMalloc(&g_scratch[slot], cap);
        if (rc != cudaSuccess)
            mp_fatal("out of GPU memory allocating %zu bytes of scratch: %s", cap,
                     cudaGetErrorString(rc));
        g_scratch_cap[slot] = cap;
    }
    return g_scratch[slot];
}

// ---------------------------------------------------------------------------------------
// GEMMs (the arithmetic of each: cuda_common.h)

static int g_precision = MP_PRECISION_FP32;
static int g_cc_major;   // the GPU's compute capability (major)

int mp_cuda_precision(void) { return g_precision; }

static int cuda_set_precision(int precision) {
    if (precision != MP_PRECISION_FP32 && precision != MP_PRECISION_BF16)
        mp_fatal("set_precision: unknown precision %d", precision);
    if (precision == MP_PRECISION_BF16 && g_cc_major < 8)
        mp_input_error("system.precision = bf16 needs bf16 tensor cores (compute capability 8.0 "
                       "or later); this GPU is %s: use fp32", g_device_name);
    int old = g_precision;
    g_precision = precision;
    return old;
}

static __global__ void scale_rows_kernel(float *C, int M, int N, int ldc, float beta) {
    size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    if (i >= (size_t)M * N) return;
    float *c = C + (i / N) * ldc + i % N;
    *c = beta == 0.0f ? 0.0f : beta * *c;   // beta = 0: C is not read (BLAS rule)
}

// An empty sum (K = 0) is C = beta C, which cuBLAS does not promise for k = 0: done here.
// Returns 1 when nothing is left for cuBLAS.
static int gemm_trivial(int M, int N, int K, float beta, float *C, int ldc) {
    if (M <= 0 || N <= 0) return 1;
    if (K > 0) return 0;
    if (beta != 1.0f) {
        scale_rows_kernel<<<mp_blocks((size_t)M * N, 256), 256>>>(C, M, N, ldc, beta);
        KERNEL_CHECK();
    }
    return 1;
}

void mp_cuda_sgemm(int trans_a, int trans_b, int M, int N, int K, float alpha, const float *A,
                   int lda, const float *B, int ldb, float beta, float *C, int ldc) {
    if (gemm_trivial(M, N, K, beta, C, ldc)) return;
    cublasOperation_t ta = trans_a ? CUBLAS_OP_T : CUBLAS_OP_N;
    cublasOperation_t tb = trans_b ? CUBLAS_OP_T : CUBLAS_OP_N;
    CUBLAS_CHECK(cublasSgemm(g_blas, tb, ta, N, M, K, &alpha, B, ldb, A, lda, &beta, C, ldc));
    mp_cuda_mark("cublasSgemm", __FILE__, __LINE__);
}

static __global__ void round_bf16_kernel(uint16_t *dst, const float *src, size_t n, int cols,
                                         int ld) {
    size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    if (i >= n) return;
    dst[i] = mp_float_to_bf16(src[ld == cols ? i : i / cols * ld + i % cols]);
}

void mp_cuda_round_bf16(uint16_t *dst, const float *src, int rows, int cols, int ld) {
    size_t n = (size_t)(rows > 0 ? rows : 0) * (cols > 0 ? cols : 0);
    if (!n) return;
    round_bf16_kernel<<<mp_blocks(n, 256), 256>>>(dst, src, n, cols, ld);
    KERNEL_CHECK();
}

void mp_cuda_gemm_bf16(int trans_a, int trans_b, int M, int N, int K, float alpha,
                       const uint16_t *A, int lda, const uint16_t *B, int ldb, float beta,
                       float *C, int ldc) {
    if (gemm_trivial(M, N, K, beta, C, ldc)) return;
    cublasOperation_t ta = trans_a ? CUBLAS_OP_T : CUBLAS_OP_N;
    cublasOperation_t tb = trans_b ? CUBLAS_OP_T : CUBLAS_OP_N;
    CUBLAS_CHECK(cublasGemmEx(g_blas, tb, ta, N, M, K, &alpha, B, CUDA_R_16BF, ldb, A,
                              CUDA_R_16BF, lda, &beta, C, CUDA_R_32F, ldc, CUBLAS_COMPUTE_32F,
                              CUBLAS_GEMM_DEFAULT));
    mp_cuda_mark("cublasGemmEx bf16", __FILE__, __LINE__);
}

// for the tests (cuda.h): one GEMM in the given arithmetic, the operands rounded here in bf16
extern "C" void mp_cuda_gemm_test(int math, int trans_a, int trans_b, int M, int N, int K,
                                  float alpha, const float *A, int lda, const float *B, int ldb,
                                  float beta, float *C, int ldc) {
    if (math != MP_CUDA_GEMM_TEST_BF16) {
        mp_cuda_sgemm(trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
        return;
    }
    // stored shapes: A (M,K) or, transposed, (K,M); B (K,N) or (N,K)
    int ar = trans_a ? K : M, ac = trans_a ? M : K, br = trans_b ? N : K, bc = trans_b ? K : N;
    uint16_t *a = (uint16_t *)mp_cuda_scratch(SCR_GEMM_A, (size_t)ar * ac * sizeof(uint16_t));
    uint16_t *b = (uint16_t *)mp_cuda_scratch(SCR_GEMM_B, (size_t)br * bc * sizeof(uint16_t));
    mp_cuda_round_bf16(a, A, ar, ac, lda);
    mp_cuda_round_bf16(b, B, br, bc, ldb);
    mp_cuda_gemm_bf16(trans_a, trans_b, M, N, K, alpha, a, ac, b, bc, beta, C, ldc);
}

// ---------------------------------------------------------------------------------------
// column sums in a fixed order (cuda_common.h): each block of rows writes a partial per
// column, then one thread per column adds the partials in block order

static __global__ void colsum_partial_kernel(float *part, const float *in, int N, int C,
                                             int rows_per) {
    int c = blockIdx.x * blockDim.x + threadIdx.x, blk = blockIdx.y;
    if (c >= C) return;
    int n0 = blk * rows_per, n1 = min(N, n0 + rows_per);
    float s = 0.0f;
    for (int n = n0; n < n1; n++) s += in[(size_t)n * C + c];
    part[(size_t)blk * C + c] = s;
}

static __global__ void colsum_final_kernel(float *out, const float *part, int nblk, int C) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    float s = 0.0f;
    for (int k = 0; k < nblk; k++) s += part[(size_t)k * C + c];
    out[c] += s;
}

void mp_cuda_colsum_add(float *out, const float *in, int N, int C) {
    if (N <= 0 || C <= 0) return;
    int rows_per = mp_rows_per_block(N, COLSUM_ROWS), nblk = (N + rows_per - 1) / rows_per;
    float *part = (float *)mp_cuda_scratch(SCR_COLSUM, (size_t)nblk * C * sizeof(float));
    dim3 grid(mp_blocks(C, 128), nblk);
    colsum_partial_kernel<<<grid, 128>>>(part, in, N, C, rows_per);
    KERNEL_CHECK();
    mp_cuda_colsum_finish(out, part, nblk, C);
}

void mp_cuda_colsum_finish(float *out, const float *part, int nblk, int C) {
    if (C <= 0) return;
    colsum_final_kernel<<<mp_blocks(C, 128), 128>>>(out, part, nblk, C);
    KERNEL_CHECK();
}

// ---------------------------------------------------------------------------------------
// extras (backend/cuda/cuda.h)

extern "C" void mp_cuda_synchronize(void) {
    CUDA_CHECK(cudaDeviceSynchronize());
    mp_cuda_timer_synchronized();
}

struct mp_cuda_event {
    cudaEvent_t ev;
};

extern "C" mp_cuda_event *mp_cuda_event_new(void) {
    mp_cuda_event *e = (mp_cuda_event *)mp_malloc(sizeof *e);
    CUDA_CHECK(cudaEventCreate(&e->ev));
    return e;
}

extern "C" void mp_cuda_event_record(mp_cuda_event *e) { CUDA_CHECK(cudaEventRecord(e->ev, 0)); }

extern "C" float mp_cuda_event_ms(mp_cuda_event *from, mp_cuda_event *to) {
    float ms = 0.0f;
    CUDA_CHECK(cudaEventSynchronize(to->ev));
    CUDA_CHECK(cudaEventElapsedTime(&ms, from->ev, to->ev));
    return ms;
}

extern "C" void mp_cuda_event_free(mp_cuda_event *e) {
    if (!e) return;
    CUDA_CHECK(cudaEventDestroy(e->ev));
    free(e);
}

extern "C" const char *mp_cuda_device_name(void) { return g_device_name; }

extern "C" size_t mp_cuda_memory_used(void) {
    size_t free_b = 0, total_b = 0;
    CUDA_CHECK(cudaMemGetInfo(&free_b, &total_b));
    return total_b - free_b;
}

// ---------------------------------------------------------------------------------------
// discovery

// With several ranks on one node each takes GPU (local rank mod count); launchers export
// the local rank under one of these names.
static int local_rank(void) {
    const char *names[] = {"OMPI_COMM_WORLD_LOCAL_RANK", "SLURM_LOCALID", "MPI_LOCALRANKID",
                           "MV2_COMM_WORLD_LOCAL_RANK", "PMI_LOCAL_RANK"};
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
        const char *v = getenv(names[i]);
        if (v && *v) return atoi(v);
    }
    return 0;
}

static void fill_table(mp_backend *b) {
    memset(b, 0, sizeof *b);
    b->name = "cuda";
    b->host_memory = 0;
    b->alloc = cuda_alloc;
    b->free = cuda_free;
    b->zero = mp_cuda_zero;
    b->to_host = cuda_copy;
    b->from_host = cuda_copy;
    b->encoder_forward = mp_cuda_encoder_forward;
    b->encoder_backward = mp_cuda_encoder_backward;
    b->layernorm_forward = mp_cuda_layernorm_forward;
    b->layernorm_backward = mp_cuda_layernorm_backward;
    b->residual_layernorm_forward = mp_cuda_residual_layernorm_forward;
    b->matmul_forward = mp_cuda_matmul_forward;
    b->matmul_backward = mp_cuda_matmul_backward;
    b->set_precision = cuda_set_precision;
    b->synchronize = mp_cuda_synchronize;
    b->kernel_timer = mp_cuda_kernel_timer;
    b->kernel_times = mp_cuda_kernel_times;
    b->attention_state_floats = mp_cuda_attention_state_floats;
    b->attention_forward = mp_cuda_attention_forward;
    b->attention_backward = mp_cuda_attention_backward;
    b->gelu_forward = mp_cuda_gelu_forward;
    b->gelu_backward = mp_cuda_gelu_backward;
    b->residual_forward = mp_cuda_residual_forward;
    b->crossentropy_forward = mp_cuda_crossentropy_forward;
    b->crossentropy_backward = mp_cuda_crossentropy_backward;
    b->query_bn_stats = mp_cuda_query_bn_stats;
    b->query_bn_forward = mp_cuda_query_bn_forward;
    b->retrieval_route = mp_cuda_retrieval_route;
    b->subkey_counts = mp_cuda_subkey_counts;
    b->retrieval_route_backward = mp_cuda_retrieval_route_backward;
    b->query_bn_backward_stats = mp_cuda_query_bn_backward_stats;
    b->query_bn_backward = mp_cuda_query_bn_backward;
    b->experts_forward = mp_cuda_experts_forward;
    b->experts_backward = mp_cuda_experts_backward;
    b->gather_rows = mp_cuda_gather_rows;
    b->scatter_add_rows = mp_cuda_scatter_add_rows;
    b->adamw = mp_cuda_adamw;
    b->sum_squares = mp_cuda_sum_squares;
    b->sum_f64 = mp_cuda_sum_f64;
    b->adamw_rows = mp_cuda_adamw_rows;
    b->to_bf16 = mp_cuda_to_bf16;
}

extern "C" const mp_backend *mp_backend_cuda(char *err, size_t err_len) {
    if (g_ready) return &g_backend;
    int count = 0;
    cudaError_t rc = cudaGetDeviceCount(&count);
    if (rc != cudaSuccess || count == 0) {
        if (err && err_len) {
            if (rc == cudaErrorInsufficientDriver || rc == cudaErrorNoDevice)
                snprintf(err, err_len, "no usable GPU: cudaGetDeviceCount failed with %s (no "
                         "NVIDIA driver or GPU visible here, or a driver older than this CUDA "
                         "%d.%d runtime; check nvidia-smi)", cudaGetErrorName(rc),
                         CUDART_VERSION / 1000, CUDART_VERSION % 1000 / 10);
            else if (rc != cudaSuccess)
                snprintf(err, err_len, "no usable GPU: cudaGetDeviceCount failed with %s (%s)",
                         cudaGetErrorName(rc), cudaGetErrorString(rc));
            else
                snprintf(err, err_len, "no usable GPU: cudaGetDeviceCount found 0 devices");
        }
        return NULL;
    }
    int dev = local_rank() % count;
    cudaDeviceProp prop;
    if ((rc = cudaSetDevice(dev)) != cudaSuccess ||
        (rc = cudaGetDeviceProperties(&prop, dev)) != cudaSuccess) {
        if (err && err_len)
            snprintf(err, err_len, "GPU %d of %d cannot be used: %s", dev, count,
                     cudaGetErrorString(rc));
        return NULL;
    }
    cublasStatus_t bs = cublasCreate(&g_blas);
    if (bs != CUBLAS_STATUS_SUCCESS) {
        if (err && err_len)
            snprintf(err, err_len, "cublasCreate failed on GPU %d: %s", dev, cublas_status_name(bs));
        return NULL;
    }
    // plain fp32 GEMMs (no TF32 tensor-core rounding): fp32 mode must match the CPU
    // backend to 1e-4; bf16 mode's GEMMs ask for bf16 per call, by data type
    CUBLAS_CHECK(cublasSetMathMode(g_blas, CUBLAS_DEFAULT_MATH));
    snprintf(g_device_name, sizeof g_device_name, "%.200s (GPU %d of %d, sm_%d%d)", prop.name, dev,
             count, prop.major, prop.minor);
    g_cc_major = prop.major;
    fill_table(&g_backend);
    g_ready = 1;
    return &g_backend;
}
