// The expert exchange's pack and unpack on the GPU (backend.h, gather_rows and
// scatter_add_rows): the payload stays in device memory from the route to the transport
// and back. One thread per element; each output element has one writer.
#include "backend/cuda/cuda_common.h"

static __global__ void gather_rows_kernel(float *dst, const float *src, const int32_t *idx,
                                          int64_t n, int C) {
    size_t o = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    if (o >= (size_t)n * C) return;
    size_t i = o / C, c = o % C;
    dst[o] = src[(size_t)idx[i] * C + c];
}

static __global__ void scatter_add_rows_kernel(float *dst, const float *src, const int32_t *idx,
                                               int64_t n, int C) {
    size_t o = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    if (o >= (size_t)n * C) return;
    size_t i = o / C, c = o % C;
    dst[(size_t)idx[i] * C + c] += src[o];   // idx has no repeats: one writer per element
}

void mp_cuda_gather_rows(float *dst, const float *src, const int32_t *idx, int64_t n, int C) {
    if (n <= 0) return;
    gather_rows_kernel<<<mp_blocks((size_t)n * C, 256), 256>>>(dst, src, idx, n, C);
    KERNEL_CHECK();
}

void mp_cuda_scatter_add_rows(float *dst, const float *src, const int32_t *idx, int64_t n, int C) {
    if (n <= 0) return;
    scatter_add_rows_kernel<<<mp_blocks((size_t)n * C, 256), 256>>>(dst, src, idx, n, C);
    KERNEL_CHECK();
}
