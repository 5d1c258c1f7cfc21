// CPU causal self-attention (docs/model.md): qkv (B,T,3C) laid out [q|k|v] along the last
// dimension, head h in columns [h*hs, (h+1)*hs) of each part; scores scaled by 1/sqrt(hs).
//
// The products (Q K^T, P V and their gradients) are single-threaded sgemm calls on blocks
// of ATT_ROWS query rows of one (b, h): OpenBLAS's kernels are several times faster than
// scalar loops, and a block of rows [r0, r1) only needs keys [0, r1), which skips most of
// the masked upper triangle. Threads own (b, h[, row block]) units, never share an output.
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include "core/log.h"
#include "cpu.h"

#define ATT_ROWS 64

// Softmax of one score row in place over keys [0, t], zeros after it (up to n). One loop
// per step so that the exponentials pipeline and the max and sum vectorise.
static void causal_softmax_row(float *a, int t, int n) {
    int m = t + 1;
    float mx = mp_max8(a, m);
    for (int i = 0; i < m; i++) a[i] = expf(a[i] - mx);
    float inv = 1.0f / mp_sum8(a, m);
    #pragma omp simd
    for (int i = 0; i < m; i++) a[i] *= inv;
    for (int i = m; i < n; i++) a[i] = 0.0f;
}

// the state is the probabilities themselves; any head size runs here
size_t mp_cpu_attention_state_floats(int B, int T, int C, int NH) {
    (void)C;
    return (size_t)B * NH * T * T;
}

void mp_cpu_attention_forward(float *out, uint16_t *out_bf16, float *att, const float *qkv,
                              int B, int T, int C, int NH) {
    mp_cpu_no_bf16(out_bf16, "attention_forward");
    // out (B,T,C), att (B,NH,T,T) post-softmax probabilities (0 above the diagonal)
    int C3 = 3 * C, hs = C / NH, nrb = (T + ATT_ROWS - 1) / ATT_ROWS;
    float scale = 1.0f / sqrtf((float)hs);
    // every (b, h, row block) writes its own att rows and its own slices of out; the blocks
    // differ in cost (causal), so they are handed out dynamically (no effect on results)
    #pragma omp parallel for collapse(3) schedule(dynamic)
    for (int b = 0; b < B; b++) {
        for (int h = 0; h < NH; h++) {
            for (int r = 0; r < nrb; r++) {
                int r0 = r * ATT_ROWS, r1 = r0 + ATT_ROWS < T ? r0 + ATT_ROWS : T, nr = r1 - r0;
                const float *base = qkv + (size_t)b * T * C3;        // (T,3C) of this sequence
                const float *q = base + (size_t)r0 * C3 + h * hs;    // (nr,hs), stride 3C
                const float *k = base + C + h * hs;                  // (r1,hs), stride 3C
                const float *v = base + 2 * C + h * hs;              // (r1,hs), stride 3C
                float *a = att + (((size_t)b * NH + h) * T + r0) * T;   // (nr,T)
                float *o = out + ((size_t)b * T + r0) * C + h * hs;      // (nr,hs), stride C
                // scores against keys [0, r1): the later ones are masked for all these rows
                mp_cpu_sgemm(0, 1, nr, r1, hs, scale, q, C3, k, C3, 0.0f, a, T);
                for (int t = r0; t < r1; t++) causal_softmax_row(a + (size_t)(t - r0) * T, t, T);
                mp_cpu_sgemm(0, 0, nr, hs, r1, 1.0f, a, T, v, C3, 0.0f, o, C);
            }
        }
    }
}

void mp_cpu_attention_backward(float *dqkv, uint16_t *dqkv_bf16, float *dbias,
                               const float *dout, const float *qkv, const float *out,
                               const float *att, int B, int T, int C, int NH) {
    mp_cpu_no_bf16(dqkv_bf16, "attention_backward");
    // dqkv (B,T,3C) written, dout (B,T,C), qkv (B,T,3C), att (B,NH,T,T); out is not needed
    // here: with the probabilities kept, rowsum(P dP) comes from them directly
    (void)out;
    // dk and dv of position t2 collect contributions from every t >= t2, so one thread owns
    // a whole (b, h) pair and walks its row blocks in order: race-free and in a fixed order.
    // The only scratch is one (ATT_ROWS, T) block per thread (no (B,NH,T,T) buffer).
    int C3 = 3 * C, hs = C / NH, nrb = (T + ATT_ROWS - 1) / ATT_ROWS;
    float scale = 1.0f / sqrtf((float)hs);
    #pragma omp parallel
    {
        float *ds = mp_malloc((size_t)ATT_ROWS * (T > 0 ? T : 1) * sizeof(float));   // (RB,T)
        #pragma omp for collapse(2) schedule(static)
        for (int b = 0; b < B; b++) {
            for (int h = 0; h < NH; h++) {
                const float *base = qkv + (size_t)b * T * C3;
                float *dbase = dqkv + (size_t)b * T * C3;
                const float *k = base + C + h * hs, *v = base + 2 * C + h * hs;   // (T,hs)
                float *dk = dbase + C + h * hs, *dv = dbase + 2 * C + h * hs;     // (T,hs)
                for (int t = 0; t < T; t++) {   // dk, dv collect over row blocks: from 0
                    memset(dk + (size_t)t * C3, 0, (size_t)hs * sizeof(float));
                    memset(dv + (size_t)t * C3, 0, (size_t)hs * sizeof(float));
                }
                for (int r = 0; r < nrb; r++) {
                    int r0 = r * ATT_ROWS, r1 = r0 + ATT_ROWS < T ? r0 + ATT_ROWS : T;
                    int nr = r1 - r0;
                    const float *a = att + (((size_t)b * NH + h) * T + r0) * T;   // (nr,T)
                    const float *d = dout + ((size_t)b * T + r0) * C + h * hs;    // (nr,hs)
                    const float *q = base + (size_t)r0 * C3 + h * hs;             // (nr,hs)
                    float *dq = dbase + (size_t)r0 * C3 + h * hs;                 // (nr,hs)
                    // o = P v: dP = dO v^T (nr, r1), dv += P^T dO
                    mp_cpu_sgemm(0, 1, nr, r1, hs, 1.0f, d, C, v, C3, 0.0f, ds, T);
                    mp_cpu_sgemm(1, 0, r1, hs, nr, 1.0f, a, T, d, C, 1.0f, dv, C3);
                    // softmax: dscore = P (dP - rowsum(P dP)), times the score scale;
                    // masked entries (P = 0) come out exactly 0
                    for (int t = r0; t < r1; t++) {
                        const float *ar = a + (size_t)(t - r0) * T;
                        float *dr = ds + (size_t)(t - r0) * T;
                        float dot = mp_dot8(ar, dr, t + 1);
                        for (int t2 = 0; t2 <= t; t2++) dr[t2] = ar[t2] * (dr[t2] - dot) * scale;
                        for (int t2 = t + 1; t2 < r1; t2++) dr[t2] = 0.0f;
                    }
                    // scores = scale q k^T: dq = dS k (its rows are this block's alone),
                    // dk += dS^T q
                    mp_cpu_sgemm(0, 0, nr, hs, r1, 1.0f, ds, T, k, C3, 0.0f, dq, C3);
                    mp_cpu_sgemm(1, 0, r1, hs, nr, 1.0f, ds, T, q, C3, 1.0f, dk, C3);
                }
            }
        }
        free(ds);
    }
    if (dbias) mp_cpu_colsum_add(dbias, dqkv, B * T, C3);   // matmul_backward's sum
}
