// The expert exchange's pack and unpack on the CPU (backend.h, gather_rows and
// scatter_add_rows).
#include <string.h>
#include "backend/cpu/cpu.h"

void mp_cpu_gather_rows(float *dst, const float *src, const int32_t *idx, int64_t n, int C) {
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n; i++)
        memcpy(dst + i * C, src + (size_t)idx[i] * C, (size_t)C * sizeof(float));
}

void mp_cpu_scatter_add_rows(float *dst, const float *src, const int32_t *idx, int64_t n, int C) {
    // idx has no repeats: no two threads share a row
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n; i++) {
        float *d = dst + (size_t)idx[i] * C;
        const float *s = src + i * C;
        for (int c = 0; c < C; c++) d[c] += s[c];
    }
}
