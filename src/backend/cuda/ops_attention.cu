// CUDA causal self-attention (the math of src/backend/cpu/ops_attention.c): for each
// sequence, strided-batched cuBLAS GEMMs over the heads (head h is the column slice
// [h*hs, (h+1)*hs) of q, k, v, so consecutive heads are hs floats apart) and one warp per
// score row for the causal softmax and its backward. Simple and exact rather than fused:
// the full (T, T) score block is computed and the upper triangle masked.
#include <math.h>
#include "backend/cuda/cuda_common.h"

// softmax of score row t over keys [0, t], zeros after: one warp per row of (rows, T)
static __global__ void causal_softmax_kernel(float *att, long rows, int T) {
    long r = (blockIdx.x * (long)blockDim.x + threadIdx.x) / 32;
    int lane = threadIdx.x % 32;
    if (r >= rows) return;
    int t = (int)(r % T);
    float *a = att + r * T;
    float mx = -INFINITY;
    for (int i = lane; i <= t; i += 32) mx = fmaxf(mx, a[i]);
    mx = mp_warp_max(mx);
    float s = 0.0f;
    for (int i = lane; i <= t; i += 32) {
        float e = expf(a[i] - mx);
        a[i] = e;
        s += e;
    }
    float inv = 1.0f / mp_warp_sum(s);
    for (int i = lane; i < T; i += 32) a[i] = i <= t ? a[i] * inv : 0.0f;
}

// dS = P (dP - rowsum(P dP)) * scale in place of dP; masked entries exactly 0
static __global__ void causal_softmax_backward_kernel(float *dp, const float *att, long rows,
                                                      int T, float scale) {
    long r = (blockIdx.x * (long)blockDim.x + threadIdx.x) / 32;
    int lane = threadIdx.x % 32;
    if (r >= rows) return;
    int t = (int)(r % T);
    const float *a = att + r * T;
    float *d = dp + r * T;
    float dot = 0.0f;
    for (int i = lane; i <= t; i += 32) dot += a[i] * d[i];
    dot = mp_warp_sum(dot);
    for (int i = lane; i < T; i += 32) d[i] = i <= t ? a[i] * (d[i] - dot) * scale : 0.0f;
}

void mp_cuda_attention_forward(float *out, float *att, const float *qkv, int B, int T, int C,
                               int NH) {
    // out (B,T,C), att (B,NH,T,T), qkv (B,T,3C)
    if (B <= 0 || T <= 0) return;
    int C3 = 3 * C, hs = C / NH;
    float scale = 1.0f / sqrtf((float)hs);
    long long TT = (long long)T * T;
    for (int b = 0; b < B; b++) {
        const float *q = qkv + (size_t)b * T * C3, *k = q + C, *v = q + 2 * C;
        float *a = att + (size_t)b * NH * TT;
        // scores (T,T) = scale q k^T per head
        mp_cuda_sgemm_batched(0, 1, T, T, hs, scale, q, C3, hs, k, C3, hs, 0.0f, a, T, TT, NH);
        long rows = (long)NH * T;
        causal_softmax_kernel<<<mp_blocks((size_t)rows * 32, 256), 256>>>(a, rows, T);
        KERNEL_CHECK();
        // out (T,hs) = P v per head, written into the head's columns of out
        mp_cuda_sgemm_batched(0, 0, T, hs, T, 1.0f, a, T, TT, v, C3, hs, 0.0f,
                              out + (size_t)b * T * C, C, hs, NH);
    }
}

void mp_cuda_attention_backward(float *dqkv, const float *dout, const float *qkv,
                                const float *att, int B, int T, int C, int NH) {
    // dqkv (B,T,3C) +=, dout (B,T,C), qkv (B,T,3C), att (B,NH,T,T)
    if (B <= 0 || T <= 0) return;
    int C3 = 3 * C, hs = C / NH;
    float scale = 1.0f / sqrtf((float)hs);
    long long TT = (long long)T * T;
    float *ds = (float *)mp_cuda_scratch(SCR_ATT, (size_t)NH * TT * sizeof(float));   // (NH,T,T)
    for (int b = 0; b < B; b++) {
        const float *q = qkv + (size_t)b * T * C3, *k = q + C, *v = q + 2 * C;
        float *dq = dqkv + (size_t)b * T * C3, *dk = dq + C, *dv = dq + 2 * C;
        const float *a = att + (size_t)b * NH * TT;
        const float *d = dout + (size_t)b * T * C;
        // o = P v: dP = dO v^T, dv += P^T dO
        mp_cuda_sgemm_batched(0, 1, T, T, hs, 1.0f, d, C, hs, v, C3, hs, 0.0f, ds, T, TT, NH);
        mp_cuda_sgemm_batched(1, 0, T, hs, T, 1.0f, a, T, TT, d, C, hs, 1.0f, dv, C3, hs, NH);
        long rows = (long)NH * T;
        causal_softmax_backward_kernel<<<mp_blocks((size_t)rows * 32, 256), 256>>>(ds, a, rows, T,
                                                                                   scale);
        KERNEL_CHECK();
        // scores = scale q k^T (scale folded into dS): dq += dS k, dk += dS^T q
        mp_cuda_sgemm_batched(0, 0, T, hs, T, 1.0f, ds, T, TT, k, C3, hs, 1.0f, dq, C3, hs, NH);
        mp_cuda_sgemm_batched(1, 0, T, hs, T, 1.0f, ds, T, TT, q, C3, hs, 1.0f, dk, C3, hs, NH);
    }
}
