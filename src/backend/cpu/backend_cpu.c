// The CPU backend table, and host memory for it.
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "core/log.h"
#include "cpu.h"

// 64 bytes: a cache line, and the widest vector load (AVX-512) the compiler may emit.
#define MP_CPU_ALIGN 64

void *mp_cpu_alloc(size_t bytes) {
    if (bytes > SIZE_MAX - MP_CPU_ALIGN) mp_fatal("allocation of %zu bytes is too large", bytes);
    // aligned_alloc wants a multiple of the alignment
    size_t size = (bytes + MP_CPU_ALIGN - 1) / MP_CPU_ALIGN * MP_CPU_ALIGN;
    if (size == 0) size = MP_CPU_ALIGN;
    void *p = aligned_alloc(MP_CPU_ALIGN, size);
    if (!p) mp_fatal("out of host memory allocating %zu bytes", bytes);
    memset(p, 0, size);
    return p;
}

void mp_cpu_free(void *p) { free(p); }

void mp_cpu_zero(void *p, size_t bytes) {
    if (bytes) memset(p, 0, bytes);
}

// to_host and from_host: the backend's memory is host memory
void mp_cpu_copy(void *dst, const void *src, size_t bytes) {
    if (bytes && dst != src) memcpy(dst, src, bytes);
}

static const mp_backend cpu_backend = {
    .name = "cpu",
    .host_memory = 1,
    .alloc = mp_cpu_alloc,
    .free = mp_cpu_free,
    .zero = mp_cpu_zero,
    .to_host = mp_cpu_copy,
    .from_host = mp_cpu_copy,
    .encoder_forward = mp_cpu_encoder_forward,
    .encoder_backward = mp_cpu_encoder_backward,
    .layernorm_forward = mp_cpu_layernorm_forward,
    .layernorm_backward = mp_cpu_layernorm_backward,
    .residual_layernorm_forward = mp_cpu_residual_layernorm_forward,
    .matmul_forward = mp_cpu_matmul_forward,
    .matmul_backward = mp_cpu_matmul_backward,
    .attention_state_floats = mp_cpu_attention_state_floats,
    .attention_forward = mp_cpu_attention_forward,
    .attention_backward = mp_cpu_attention_backward,
    .gelu_forward = mp_cpu_gelu_forward,
    .gelu_backward = mp_cpu_gelu_backward,
    .residual_forward = mp_cpu_residual_forward,
    .crossentropy_forward = mp_cpu_crossentropy_forward,
    .crossentropy_backward = mp_cpu_crossentropy_backward,
    .query_bn_stats = mp_cpu_query_bn_stats,
    .query_bn_forward = mp_cpu_query_bn_forward,
    .retrieval_route = mp_cpu_retrieval_route,
    .subkey_counts = mp_cpu_subkey_counts,
    .retrieval_route_backward = mp_cpu_retrieval_route_backward,
    .query_bn_backward_stats = mp_cpu_query_bn_backward_stats,
    .query_bn_backward = mp_cpu_query_bn_backward,
    .experts_forward = mp_cpu_experts_forward,
    .experts_backward = mp_cpu_experts_backward,
    .gather_rows = mp_cpu_gather_rows,
    .scatter_add_rows = mp_cpu_scatter_add_rows,
    .adamw = mp_cpu_adamw,
    .sum_squares = mp_cpu_sum_squares,
    .sum_f64 = mp_cpu_sum_f64,
    .adamw_rows = mp_cpu_adamw_rows,
};

const mp_backend *mp_backend_cpu(void) {
    mp_cpu_blas_init();
    return &cpu_backend;
}
