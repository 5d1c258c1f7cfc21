// What the attention kernels of ops_attention.cu (fp32) and ops_attention_tc.cu (tensor
// cores) share: where one (sequence, head)'s slices lie, and the load of a tile's L and D.
#pragma once
#include "backend/cuda/cuda_common.h"

// The slices of sequence b = blockIdx.z, head h = blockIdx.y (the grid of every attention
// kernel): q, k, v (T, hs) at row stride 3C in qkv (B, T, 3C); for the backward, dO (T, hs)
// at stride C in dout (B, T, C), L and D (T) in lse and D (B, NH, T).
struct att_head {
    const float *q, *k, *v, *dO, *L, *D;
};

static __device__ __forceinline__ att_head att_head_of(const float *qkv, int T, int C, int NH) {
    int hs = C / NH, h = blockIdx.y, b = blockIdx.z;
    att_head a;
    a.q = qkv + (size_t)b * T * 3 * C + h * hs;
    a.k = a.q + C;
    a.v = a.q + 2 * C;
    a.dO = a.L = a.D = NULL;
    return a;
}

static __device__ __forceinline__ att_head att_head_grads_of(const float *qkv, const float *dout,
                                                             const float *lse, const float *D,
                                                             int T, int C, int NH) {
    int hs = C / NH, h = blockIdx.y, b = blockIdx.z;
    att_head a = att_head_of(qkv, T, C, NH);
    a.dO = dout + (size_t)b * T * C + h * hs;
    a.L = lse + ((size_t)b * NH + h) * T;
    a.D = D + ((size_t)b * NH + h) * T;
    return a;
}

// Ls, Ds (n, shared memory) = L and D of rows [r0, r0 + n), 0 past T; by the block's threads
template <int THREADS>
static __device__ __forceinline__ void att_load_ld(float *Ls, float *Ds, const att_head &a,
                                                   int r0, int n, int T) {
    for (int e = threadIdx.x; e < n; e += THREADS) {
        Ls[e] = r0 + e < T ? a.L[r0 + e] : 0.0f;
        Ds[e] = r0 + e < T ? a.D[r0 + e] : 0.0f;
    }
}
