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

// Rows [r0, r0 + ROWS) of one head's (T, hs) slice of src (row stride ld), columns [0, DP),
// zero past T and past hs, handed to put(r, d, v) four columns at a time (v: columns d to
// d + 3 of row r), by the block's THREADS threads. Where 16-byte loads are legal (hs and ld
// multiples of 4, src 16-byte aligned: one answer for every block of a launch) each thread
// issues a batch of up to 8 of them before its first put, so that a tile costs about one
// memory latency; a loop of scalar loads, which nvcc unrolls by 4 at most when the trip
// count depends on the thread, costs one latency per 4 floats of the thread's share (8 for
// a 64 x 64 tile at 128 threads). Other head sizes load float by float.
template <int ROWS, int DP, int THREADS, class Put>
static __device__ __forceinline__ void att_fetch_tile(const float *src, long ld, int r0, int T,
                                                      int hs, Put put) {
    constexpr int Q = DP / 4, N = ROWS * Q, PER = (N + THREADS - 1) / THREADS;
    constexpr int BATCH = PER < 8 ? PER : 8;
    static_assert(DP % 4 == 0 && PER % BATCH == 0, "tile shape");
    if (((hs | (int)ld) & 3) == 0 && mp_aligned(src, 16)) {
        UNROLL
        for (int j0 = 0; j0 < PER; j0 += BATCH) {
            float4 v[BATCH];
            UNROLL
            for (int j = 0; j < BATCH; j++) {
                int e = (int)threadIdx.x + (j0 + j) * THREADS, r = e / Q, d = 4 * (e % Q);
                v[j] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
                if ((N % THREADS == 0 || e < N) && r0 + r < T && d < hs) {
                    const float *p = src + (size_t)(r0 + r) * ld + d;
                    MP_CHECK_ALIGN16(p);
                    v[j] = *(const float4 *)p;
                }
            }
            UNROLL
            for (int j = 0; j < BATCH; j++) {
                int e = (int)threadIdx.x + (j0 + j) * THREADS;
                if (N % THREADS == 0 || e < N) put(e / Q, 4 * (e % Q), v[j]);
            }
        }
    } else {
        for (int e = threadIdx.x; e < N; e += THREADS) {
            int r = e / Q, d = 4 * (e % Q), t = r0 + r;
            const float *p = src + (size_t)t * ld + d;
            bool in = t < T;
            float4 v = make_float4(in && d < hs ? p[0] : 0.0f, in && d + 1 < hs ? p[1] : 0.0f,
                                   in && d + 2 < hs ? p[2] : 0.0f, in && d + 3 < hs ? p[3] : 0.0f);
            put(r, d, v);
        }
    }
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
