// CPU optimizer ops: AdamW on one contiguous range or on a list of rows (lazy AdamW), and
// the sums of squares for clipping.
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include "core/log.h"
#include "cpu.h"

// Elements per partial sum in sum_squares. Fixed, so the order of the final sum depends
// only on n, not on the thread count.
#define SS_BLOCK 16384

// One element's AdamW step from its scaled gradient gi (docs/model.md, Training); the
// dense op and the row op both take it, so a listed row moves exactly as under the dense op.
static inline void adamw_element(float *p, float *m, float *v, float gi, float lr, float beta1,
                                 float beta2, float eps, float wd, float bc1, float bc2) {
    float mi = beta1 * *m + (1.0f - beta1) * gi;
    float vi = beta2 * *v + (1.0f - beta2) * gi * gi;
    *m = mi;
    *v = vi;
    float mhat = mi / bc1, vhat = vi / bc2;
    *p -= lr * (mhat / (sqrtf(vhat) + eps) + wd * *p);
}

void mp_cpu_no_bf16(const void *twin, const char *op) {
    if (twin) mp_fatal("the CPU backend has no bf16 mode: %s takes no bf16 destination or operand", op);
}

void mp_cpu_adamw(float *p, const float *g, float *m, float *v, uint16_t *p_bf16, size_t n,
                  float lr, float beta1, float beta2, float eps, float wd, long t,
                  float grad_scale) {
    // p, g, m, v (n); t is the 1-based step (docs/model.md, Training)
    mp_cpu_no_bf16(p_bf16, "adamw");
    float bc1 = 1.0f - powf(beta1, (float)t);
    float bc2 = 1.0f - powf(beta2, (float)t);
    #pragma omp parallel for simd schedule(static)
    for (size_t i = 0; i < n; i++) {
        adamw_element(p + i, m + i, v + i, g[i] * grad_scale, lr, beta1, beta2, eps, wd, bc1, bc2);
    }
}

void mp_cpu_adamw_rows(float *p, const float *g, float *m, float *v, uint16_t *p_bf16,
                       const int32_t *rows, int64_t n_rows, int C, float lr, float beta1,
                       float beta2, float eps, float wd, long t, float grad_scale) {
    // p, g, m, v (*, C); rows (n_rows) distinct. The bias corrections and the element
    // formula are mp_cpu_adamw's, so a listed row moves exactly as under the dense op.
    mp_cpu_no_bf16(p_bf16, "adamw");
    float bc1 = 1.0f - powf(beta1, (float)t);
    float bc2 = 1.0f - powf(beta2, (float)t);
    #pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < n_rows; r++) {   // one row per iteration: no two threads share one
        size_t o = (size_t)rows[r] * (size_t)C;
        float *pr = p + o, *mr = m + o, *vr = v + o;
        const float *gr = g + o;
        #pragma omp simd
        for (int i = 0; i < C; i++) {
            adamw_element(pr + i, mr + i, vr + i, gr[i] * grad_scale, lr, beta1, beta2, eps, wd,
                          bc1, bc2);
        }
    }
}

static double block_sum_squares(const float *x, size_t n) {
    double acc[4] = {0}, tail = 0.0;
    size_t i = 0;
    for (; i + 4 <= n; i += 4)
        for (int j = 0; j < 4; j++) acc[j] += (double)x[i + j] * x[i + j];
    for (; i < n; i++) tail += (double)x[i] * x[i];
    return ((acc[0] + acc[2]) + (acc[1] + acc[3])) + tail;
}

double mp_cpu_sum_squares(const float *x, size_t n) {
    size_t nblk = (n + SS_BLOCK - 1) / SS_BLOCK;
    if (nblk <= 1) return block_sum_squares(x, n);
    // each block's partial is written by one thread; the partials are added in block order
    double *part = mp_malloc(nblk * sizeof(double));
    #pragma omp parallel for schedule(static)
    for (size_t k = 0; k < nblk; k++) {
        size_t lo = k * SS_BLOCK, len = n - lo < SS_BLOCK ? n - lo : SS_BLOCK;
        part[k] = block_sum_squares(x + lo, len);
    }
    double s = 0.0;
    for (size_t k = 0; k < nblk; k++) s += part[k];
    free(part);
    return s;
}

double mp_cpu_sum_f64(const double *x, size_t n) {
    // x (n): one partial per SS_BLOCK elements, each added in element order by one thread,
    // the partials in block order; the CUDA op adds in another fixed order
    size_t nblk = (n + SS_BLOCK - 1) / SS_BLOCK;
    double *part = mp_malloc((nblk ? nblk : 1) * sizeof(double));   // (nblk)
    #pragma omp parallel for schedule(static)
    for (size_t k = 0; k < nblk; k++) {
        size_t lo = k * SS_BLOCK, hi = n - lo < SS_BLOCK ? n : lo + SS_BLOCK;
        double s = 0.0;
        for (size_t i = lo; i < hi; i++) s += x[i];
        part[k] = s;
    }
    double s = 0.0;
    for (size_t k = 0; k < nblk; k++) s += part[k];
    free(part);
    return s;
}

