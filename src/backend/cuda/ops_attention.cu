// CUDA causal self-attention, fused in the manner of FlashAttention 2 (fp32, SIMT, shared-
// memory tiles): the (T, T) scores and probabilities never exist in memory. The math is
// src/backend/cpu/ops_attention.c's: per (sequence b, head h), S = q k^T / sqrt(hs) masked
// to keys <= query, P = softmax(S) by rows, out = P v.
//
// - forward: one block per (query tile, h, b). It walks the key tiles up to the diagonal
//   with an online softmax (running row max m and sum l; earlier partial outputs rescaled by
//   exp(m_old - m_new)) and writes out and the state L = m + log l per row (B, NH, T).
// - backward: D = rowsum(dO * out) per row (a small kernel), then P = exp(S - L) recomputed
//   tile by tile. dS = P (dP - D) / sqrt(hs) with dP = dO v^T. dK, dV are sums over queries
//   and dQ a sum over keys, so without atomics they come from two kernels: one block per key
//   tile walks the query tiles from the diagonal on (dK += dS^T q, dV += P^T dO), one block
//   per query tile walks the key tiles up to the diagonal (dQ += dS k). Each element of dqkv
//   has one writer, which stores its finished sum (dqkv is written, not added to), and
//   every sum runs in a fixed order: bitwise repeatable.
//
// Threads and tiles: 256 threads as 16 x 16, ty = tid / 16 owns the 4 rows 4 ty + i of a
// 64-row tile, tx = tid % 16 the columns tx + 16 j of a 32-column tile (scores) or of the
// head (d < hs, NJ = hs rounded up to 16, 32, 64 or 128, over 16). The 16 lanes of one ty
// sit in one half-warp, so a row's max and sum are half-warp shuffles and the score rows one
// ty writes to shared memory are read back by the same lanes (a __syncwarp orders them).
// Tiles sit in shared memory with a row stride of NJ * 16 + 4 floats: the inner loops read
// 4 consecutive floats of a row at once (16-byte loads, a quarter of the instructions of
// 4-byte ones), and the 8 lanes that one such load serves at a time, reading 8 different
// rows, hit 8 different groups of 4 banks.
//
// Checked against the CPU backend on the CUDA emulator (tests/cuda_emu). The kernels as they
// were before the 16-byte tile loads (attention.h, att_fetch_tile) also passed on an H200
// (unit test, compute-sanitizer clean); this version has not run on a GPU. bf16 mode runs
// the tensor-core version of these kernels instead (ops_attention_tc.cu).
#include <math.h>
#include "backend/cuda/attention.h"
#include "backend/cuda/cuda_common.h"

#define ATT_THREADS 256
#define ATT_ROWS 64       // rows of a block's own tile (queries; keys in the dK/dV kernel)
#define ATT_COLS 32       // rows of a tile the block streams through
#define ATT_MAX_HS 128    // head sizes the kernels take (NJ <= 8)
#define ATT_PAD 4         // floats of padding per shared row (16-byte rows, spread banks)

// every tile and row starts 16-byte aligned (the row strides and tile sizes are multiples of
// 4 floats), as MP_CHECK_ALIGN16 checks on the emulator

// dst (n, ST) = rows [r0, r0 + n) of one head's (T, hs) slice of src (row stride ld),
// zero past T and past hs (the padding then adds exact zeros to every dot product)
template <int NJ, int ROWS>
static __device__ __forceinline__ void load_tile(float *dst, const float *src, long ld, int r0,
                                                 int T, int hs) {
    constexpr int DP = 16 * NJ, ST = DP + ATT_PAD;
    att_fetch_tile<ROWS, DP, ATT_THREADS>(src, ld, r0, T, hs, [&](int r, int d, float4 v) {
        float *q = dst + r * ST + d;
        MP_CHECK_ALIGN16(q);
        *(float4 *)q = v;
    });
}

// acc[i][j] = A[4 ty + i] . Bm[tx + 16 j] over d = 0 .. hs - 1 in order; A, Bm stride ST.
// d runs on to the next multiple of 4, over load_tile's zeros: + 0 leaves a sum as it is.
template <int NJ>
static __device__ __forceinline__ void tile_dot(float acc[4][2], const float *A, const float *Bm,
                                                int hs) {
    constexpr int ST = 16 * NJ + ATT_PAD;
    const float *a = A + (threadIdx.x / 16) * 4 * ST, *b = Bm + (threadIdx.x % 16) * ST;
    UNROLL
    for (int i = 0; i < 4; i++) acc[i][0] = acc[i][1] = 0.0f;
    for (int d = 0; d < hs; d += 4) {
        float4 b0 = *(const float4 *)(b + d), b1 = *(const float4 *)(b + 16 * ST + d);
        UNROLL
        for (int i = 0; i < 4; i++) {
            float4 ai = *(const float4 *)(a + i * ST + d);
            acc[i][0] += ai.x * b0.x;
            acc[i][0] += ai.y * b0.y;
            acc[i][0] += ai.z * b0.z;
            acc[i][0] += ai.w * b0.w;
            acc[i][1] += ai.x * b1.x;
            acc[i][1] += ai.y * b1.y;
            acc[i][1] += ai.z * b1.z;
            acc[i][1] += ai.w * b1.w;
        }
    }
}

// acc[i][j] += sum over c < ATT_COLS in order of P[4 ty + i][c] * M[c][tx + 16 j];
// P (ATT_ROWS, PS), M (ATT_COLS, ST)
template <int NJ>
static __device__ __forceinline__ void tile_accum(float acc[4][NJ], const float *P,
                                                  const float *M) {
    constexpr int ST = 16 * NJ + ATT_PAD, PS = ATT_COLS + ATT_PAD;
    const float *p = P + (threadIdx.x / 16) * 4 * PS, *m = M + threadIdx.x % 16;
    for (int c0 = 0; c0 < ATT_COLS; c0 += 4) {
        float pc[4][4];   // [i][c - c0]
        UNROLL
        for (int i = 0; i < 4; i++) {
            float4 v = *(const float4 *)(p + i * PS + c0);
            pc[i][0] = v.x;
            pc[i][1] = v.y;
            pc[i][2] = v.z;
            pc[i][3] = v.w;
        }
        UNROLL
        for (int c = 0; c < 4; c++) {
            UNROLL
            for (int j = 0; j < NJ; j++) {
                float mj = m[(c0 + c) * ST + 16 * j];
                UNROLL
                for (int i = 0; i < 4; i++) acc[i][j] += pc[i][c] * mj;
            }
        }
    }
}

// max and sum over the 16 lanes of a half-warp (one ty); the butterfly gives every lane the
// same value
__device__ __forceinline__ float half_warp_max(float v) {
    for (int o = 8; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}
__device__ __forceinline__ float half_warp_sum(float v) {
    for (int o = 8; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// grid (query tiles, NH, B), the longest tiles (last queries, most keys) first
template <int NJ>
static __global__ void __launch_bounds__(ATT_THREADS)
attention_forward_kernel(float *out, float *lse, const float *qkv, int T, int C, int NH,
                         float scale) {
    constexpr int ST = 16 * NJ + ATT_PAD, PS = ATT_COLS + ATT_PAD;
    extern __shared__ __align__(16) float sh[];
    MP_CHECK_ALIGN16(sh);
    float *Qs = sh;                      // (ATT_ROWS, ST) this block's queries
    float *Ks = Qs + ATT_ROWS * ST;      // (ATT_COLS, ST) a key tile
    float *Vs = Ks + ATT_COLS * ST;      // (ATT_COLS, ST) its values
    float *Ps = Vs + ATT_COLS * ST;      // (ATT_ROWS, PS) probabilities of the key tile
    int hs = C / NH, C3 = 3 * C, h = blockIdx.y, b = blockIdx.z;
    int r0 = ((T + ATT_ROWS - 1) / ATT_ROWS - 1 - (int)blockIdx.x) * ATT_ROWS;
    int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
    const att_head a = att_head_of(qkv, T, C, NH);   // (T, hs) slices
    load_tile<NJ, ATT_ROWS>(Qs, a.q, C3, r0, T, hs);
    float o[4][NJ], m[4], l[4];
    UNROLL
    for (int i = 0; i < 4; i++) {
        m[i] = -INFINITY;
        l[i] = 0.0f;
        UNROLL
        for (int j = 0; j < NJ; j++) o[i][j] = 0.0f;
    }
    int kend = min(r0 + ATT_ROWS, T);    // keys [0, kend) reach some row of the tile
    for (int c0 = 0; c0 < kend; c0 += ATT_COLS) {
        __syncthreads();   // the previous tile's Ks, Vs, Ps are read
        load_tile<NJ, ATT_COLS>(Ks, a.k, C3, c0, T, hs);
        load_tile<NJ, ATT_COLS>(Vs, a.v, C3, c0, T, hs);
        __syncthreads();
        float s[4][2];
        tile_dot<NJ>(s, Qs, Ks, hs);
        UNROLL
        for (int i = 0; i < 4; i++) {
            int r = r0 + 4 * ty + i;
            float mx = -INFINITY;
            UNROLL
            for (int j = 0; j < 2; j++) {
                int c = c0 + tx + 16 * j;
                s[i][j] = c <= r ? s[i][j] * scale : -INFINITY;
                mx = fmaxf(mx, s[i][j]);
            }
            // key 0 is in the first tile and unmasked for every row, so m is finite from
            // then on; a tile wholly masked for this row leaves m as it was (alpha = 1, p = 0)
            float mnew = fmaxf(m[i], half_warp_max(mx));
            float alpha = expf(m[i] - mnew);   // 0 on the first tile (m = -inf)
            float ps = 0.0f;
            UNROLL
            for (int j = 0; j < 2; j++) {
                float p = expf(s[i][j] - mnew);   // masked: exp(-inf) = 0
                Ps[(4 * ty + i) * PS + tx + 16 * j] = p;
                ps += p;
            }
            l[i] = l[i] * alpha + half_warp_sum(ps);
            m[i] = mnew;
            UNROLL
            for (int j = 0; j < NJ; j++) o[i][j] *= alpha;
        }
        __syncwarp();   // this ty's rows of Ps, written by its own 16 lanes
        tile_accum<NJ>(o, Ps, Vs);
    }
    UNROLL
    for (int i = 0; i < 4; i++) {
        int r = r0 + 4 * ty + i;
        if (r >= T) continue;
        float *orow = out + ((size_t)b * T + r) * C + h * hs;
        float inv = 1.0f / l[i];
        UNROLL
        for (int j = 0; j < NJ; j++) {
            int d = tx + 16 * j;
            if (d < hs) orow[d] = o[i][j] * inv;
        }
        if (tx == 0) lse[((size_t)b * NH + h) * T + r] = m[i] + logf(l[i]);
    }
}

// D (B, NH, T) = rowsum(dO * out) of each head's row: one warp per (b, t, h), in a fixed order
static __global__ void attention_rowdot_kernel(float *D, const float *dout, const float *out,
                                               long rows, int T, int C, int NH) {
    long w = (blockIdx.x * (long)blockDim.x + threadIdx.x) / 32;
    int lane = threadIdx.x % 32;
    if (w >= rows) return;   // whole warps: blockDim is a multiple of 32
    int hs = C / NH, h = (int)(w % NH);
    long bt = w / NH;        // b * T + t
    const float *x = dout + bt * C + h * hs, *y = out + bt * C + h * hs;
    float s = 0.0f;
    for (int d = lane; d < hs; d += 32) s += x[d] * y[d];
    s = mp_warp_sum(s);
    if (lane == 0) D[((bt / T) * NH + h) * T + bt % T] = s;
}

// dK, dV: grid (key tiles, NH, B), one block per tile of ATT_ROWS keys, walking the query
// tiles of ATT_COLS rows from the diagonal to T in order
template <int NJ>
static __global__ void __launch_bounds__(ATT_THREADS)
attention_dkv_kernel(float *dqkv, const float *dout, const float *qkv, const float *lse,
                     const float *D, int T, int C, int NH, float scale) {
    constexpr int ST = 16 * NJ + ATT_PAD, PS = ATT_COLS + ATT_PAD;
    extern __shared__ __align__(16) float sh[];
    MP_CHECK_ALIGN16(sh);
    float *Ks = sh;                      // (ATT_ROWS, ST) this block's keys
    float *Vs = Ks + ATT_ROWS * ST;      // (ATT_ROWS, ST) and values
    float *Qs = Vs + ATT_ROWS * ST;      // (ATT_COLS, ST) a query tile
    float *dOs = Qs + ATT_COLS * ST;     // (ATT_COLS, ST) its output gradients
    float *Ps = dOs + ATT_COLS * ST;     // (ATT_ROWS, PS) P^T of the query tile
    float *dSs = Ps + ATT_ROWS * PS;     // (ATT_ROWS, PS) dS^T
    float *Ls = dSs + ATT_ROWS * PS;     // (ATT_COLS) L of the query tile
    float *Ds = Ls + ATT_COLS;           // (ATT_COLS) D of the query tile
    int hs = C / NH, C3 = 3 * C, h = blockIdx.y, b = blockIdx.z;
    int c0 = ((T + ATT_ROWS - 1) / ATT_ROWS - 1 - (int)blockIdx.x) * ATT_ROWS;
    int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
    const att_head a = att_head_grads_of(qkv, dout, lse, D, T, C, NH);   // (T, hs) slices, L, D
    load_tile<NJ, ATT_ROWS>(Ks, a.k, C3, c0, T, hs);
    load_tile<NJ, ATT_ROWS>(Vs, a.v, C3, c0, T, hs);
    float dk[4][NJ], dv[4][NJ];
    UNROLL
    for (int i = 0; i < 4; i++) {
        UNROLL
        for (int j = 0; j < NJ; j++) dk[i][j] = dv[i][j] = 0.0f;
    }
    // queries before c0 see none of these keys; ATT_ROWS is a multiple of ATT_COLS
    for (int r0 = c0; r0 < T; r0 += ATT_COLS) {
        __syncthreads();   // the previous tile's Qs, dOs, Ls, Ds are read
        load_tile<NJ, ATT_COLS>(Qs, a.q, C3, r0, T, hs);
        load_tile<NJ, ATT_COLS>(dOs, a.dO, C, r0, T, hs);
        att_load_ld<ATT_THREADS>(Ls, Ds, a, r0, ATT_COLS, T);
        __syncthreads();
        float s[4][2], dp[4][2];
        tile_dot<NJ>(s, Ks, Qs, hs);    // k_c . q_r, the same products as the forward's
        tile_dot<NJ>(dp, Vs, dOs, hs);  // dP^T = v_c . dO_r
        UNROLL
        for (int i = 0; i < 4; i++) {
            int c = c0 + 4 * ty + i;
            UNROLL
            for (int j = 0; j < 2; j++) {
                int rr = tx + 16 * j, r = r0 + rr;
                float p = r >= c && r < T ? expf(s[i][j] * scale - Ls[rr]) : 0.0f;
                Ps[(4 * ty + i) * PS + rr] = p;
                dSs[(4 * ty + i) * PS + rr] = p * (dp[i][j] - Ds[rr]) * scale;
            }
        }
        __syncwarp();   // this ty's rows of Ps, dSs, written by its own 16 lanes
        tile_accum<NJ>(dv, Ps, dOs);
        tile_accum<NJ>(dk, dSs, Qs);
    }
    UNROLL
    for (int i = 0; i < 4; i++) {
        int c = c0 + 4 * ty + i;
        if (c >= T) continue;
        float *g = dqkv + ((size_t)b * T + c) * C3 + h * hs;
        UNROLL
        for (int j = 0; j < NJ; j++) {
            int d = tx + 16 * j;
            if (d < hs) {
                g[C + d] = dk[i][j];
                g[2 * C + d] = dv[i][j];
            }
        }
    }
}

// dQ: grid (query tiles, NH, B), one block per tile of ATT_ROWS queries, walking the key
// tiles of ATT_COLS rows up to the diagonal in order
template <int NJ>
static __global__ void __launch_bounds__(ATT_THREADS)
attention_dq_kernel(float *dqkv, const float *dout, const float *qkv, const float *lse,
                    const float *D, int T, int C, int NH, float scale) {
    constexpr int ST = 16 * NJ + ATT_PAD, PS = ATT_COLS + ATT_PAD;
    extern __shared__ __align__(16) float sh[];
    MP_CHECK_ALIGN16(sh);
    float *Qs = sh;                      // (ATT_ROWS, ST) this block's queries
    float *dOs = Qs + ATT_ROWS * ST;     // (ATT_ROWS, ST) and output gradients
    float *Ks = dOs + ATT_ROWS * ST;     // (ATT_COLS, ST) a key tile
    float *Vs = Ks + ATT_COLS * ST;      // (ATT_COLS, ST) its values
    float *dSs = Vs + ATT_COLS * ST;     // (ATT_ROWS, PS) dS of the key tile
    int hs = C / NH, C3 = 3 * C, h = blockIdx.y, b = blockIdx.z;
    int r0 = ((T + ATT_ROWS - 1) / ATT_ROWS - 1 - (int)blockIdx.x) * ATT_ROWS;
    int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
    const att_head a = att_head_grads_of(qkv, dout, lse, D, T, C, NH);   // (T, hs) slices, L, D
    load_tile<NJ, ATT_ROWS>(Qs, a.q, C3, r0, T, hs);
    load_tile<NJ, ATT_ROWS>(dOs, a.dO, C, r0, T, hs);
    float L[4], Dr[4], dq[4][NJ];
    UNROLL
    for (int i = 0; i < 4; i++) {
        int r = r0 + 4 * ty + i;
        L[i] = r < T ? a.L[r] : 0.0f;
        Dr[i] = r < T ? a.D[r] : 0.0f;
        UNROLL
        for (int j = 0; j < NJ; j++) dq[i][j] = 0.0f;
    }
    int kend = min(r0 + ATT_ROWS, T);
    for (int c0 = 0; c0 < kend; c0 += ATT_COLS) {
        __syncthreads();   // the previous tile's Ks, Vs, dSs are read
        load_tile<NJ, ATT_COLS>(Ks, a.k, C3, c0, T, hs);
        load_tile<NJ, ATT_COLS>(Vs, a.v, C3, c0, T, hs);
        __syncthreads();
        float s[4][2], dp[4][2];
        tile_dot<NJ>(s, Qs, Ks, hs);
        tile_dot<NJ>(dp, dOs, Vs, hs);
        UNROLL
        for (int i = 0; i < 4; i++) {
            int r = r0 + 4 * ty + i;
            UNROLL
            for (int j = 0; j < 2; j++) {
                int c = c0 + tx + 16 * j;
                float p = c <= r && r < T ? expf(s[i][j] * scale - L[i]) : 0.0f;
                dSs[(4 * ty + i) * PS + tx + 16 * j] = p * (dp[i][j] - Dr[i]) * scale;
            }
        }
        __syncwarp();   // this ty's rows of dSs, written by its own 16 lanes
        tile_accum<NJ>(dq, dSs, Ks);
    }
    UNROLL
    for (int i = 0; i < 4; i++) {
        int r = r0 + 4 * ty + i;
        if (r >= T) continue;
        float *g = dqkv + ((size_t)b * T + r) * C3 + h * hs;
        UNROLL
        for (int j = 0; j < NJ; j++) {
            int d = tx + 16 * j;
            if (d < hs) g[d] = dq[i][j];
        }
    }
}

// the kernels' shared memory, as they lay it out (ST, PS as there)
static size_t forward_shared(int NJ) {
    size_t ST = 16 * NJ + ATT_PAD, PS = ATT_COLS + ATT_PAD;
    return sizeof(float) * (ATT_ROWS * ST + 2 * ATT_COLS * ST + ATT_ROWS * PS);
}
static size_t dkv_shared(int NJ) {
    size_t ST = 16 * NJ + ATT_PAD, PS = ATT_COLS + ATT_PAD;
    return sizeof(float) * (2 * ATT_ROWS * ST + 2 * ATT_COLS * ST + 2 * ATT_ROWS * PS +
                            2 * ATT_COLS);
}
static size_t dq_shared(int NJ) {
    size_t ST = 16 * NJ + ATT_PAD, PS = ATT_COLS + ATT_PAD;
    return sizeof(float) * (2 * ATT_ROWS * ST + 2 * ATT_COLS * ST + ATT_ROWS * PS);
}

template <int NJ>
static void forward_launch(float *out, float *lse, const float *qkv, int B, int T, int C, int NH,
                           float scale) {
    static size_t allowed;
    size_t shb = forward_shared(NJ);
    mp_cuda_allow_shared(attention_forward_kernel<NJ>, shb, &allowed);
    dim3 grid((unsigned)((T + ATT_ROWS - 1) / ATT_ROWS), (unsigned)NH, (unsigned)B);
    attention_forward_kernel<NJ><<<grid, ATT_THREADS, shb>>>(out, lse, qkv, T, C, NH, scale);
    KERNEL_CHECK();
}

template <int NJ>
static void backward_launch(float *dqkv, const float *dout, const float *qkv, const float *lse,
                            const float *D, int B, int T, int C, int NH, float scale) {
    dim3 grid((unsigned)((T + ATT_ROWS - 1) / ATT_ROWS), (unsigned)NH, (unsigned)B);
    static size_t allowed_kv, allowed_q;
    size_t shb = dkv_shared(NJ);
    mp_cuda_allow_shared(attention_dkv_kernel<NJ>, shb, &allowed_kv);
    attention_dkv_kernel<NJ><<<grid, ATT_THREADS, shb>>>(dqkv, dout, qkv, lse, D, T, C, NH,
                                                         scale);
    KERNEL_CHECK();
    shb = dq_shared(NJ);
    mp_cuda_allow_shared(attention_dq_kernel<NJ>, shb, &allowed_q);
    attention_dq_kernel<NJ><<<grid, ATT_THREADS, shb>>>(dqkv, dout, qkv, lse, D, T, C, NH, scale);
    KERNEL_CHECK();
}

// columns of the head per tx, rounded up to a power of two (one instantiation each)
static int head_nj(int hs) {
    if (hs > ATT_MAX_HS) mp_fatal("CUDA attention supports head sizes <= %d, got %d", ATT_MAX_HS, hs);
    return hs <= 16 ? 1 : hs <= 32 ? 2 : hs <= 64 ? 4 : 8;
}

// The state is L (B, NH, T). Refused here, where the model is built, rather than mid-step.
size_t mp_cuda_attention_state_floats(int B, int T, int C, int NH) {
    int hs = C / NH;
    if (hs > ATT_MAX_HS)
        mp_input_error("system.backend = cuda: attention head size %d (model.d_model %d / "
                       "model.n_heads %d) is above %d, the largest the CUDA attention kernels "
                       "take; use more heads", hs, C, NH, ATT_MAX_HS);
    return (size_t)B * NH * T;
}

void mp_cuda_attention_forward(float *out, uint16_t *out_bf16, float *att, const float *qkv,
                               int B, int T, int C, int NH) {
    // out (B,T,C) and its twin, att = L (B,NH,T), qkv (B,T,3C)
    if (B <= 0 || T <= 0) return;
    if (B > 65535 || NH > 65535) mp_fatal("CUDA attention: B %d or NH %d above 65535", B, NH);
    int hs = C / NH;
    float scale = 1.0f / sqrtf((float)hs);
    if (mp_cuda_precision() == MP_PRECISION_BF16) {   // tensor cores (ops_attention_tc.cu)
        mp_cuda_attention_forward_tc(out, out_bf16, att, qkv, B, T, C, NH, scale, head_nj(hs));
        return;
    }
    switch (head_nj(hs)) {
    case 1: forward_launch<1>(out, att, qkv, B, T, C, NH, scale); break;
    case 2: forward_launch<2>(out, att, qkv, B, T, C, NH, scale); break;
    case 4: forward_launch<4>(out, att, qkv, B, T, C, NH, scale); break;
    default: forward_launch<8>(out, att, qkv, B, T, C, NH, scale); break;
    }
    // fp32 mode has no use for a twin; one asked for anyway is a separate pass
    if (out_bf16) mp_cuda_to_bf16(out_bf16, out, (size_t)B * T * C);
}

void mp_cuda_attention_backward(float *dqkv, uint16_t *dqkv_bf16, float *dbias,
                                const float *dout, const float *qkv, const float *out,
                                const float *att, int B, int T, int C, int NH) {
    // dqkv (B,T,3C) and its twin written, dbias (3C) added to, dout (B,T,C), qkv (B,T,3C),
    // out (B,T,C), att = L (B,NH,T)
    if (B <= 0 || T <= 0) return;
    if (B > 65535 || NH > 65535) mp_fatal("CUDA attention: B %d or NH %d above 65535", B, NH);
    int hs = C / NH;
    float scale = 1.0f / sqrtf((float)hs);
    long rows = (long)B * T * NH;
    float *D = (float *)mp_cuda_scratch(SCR_ATT_D, (size_t)rows * sizeof(float));   // (B,NH,T)
    attention_rowdot_kernel<<<mp_blocks((size_t)rows * 32, 256), 256>>>(D, dout, out, rows, T, C,
                                                                        NH);
    KERNEL_CHECK();
    if (mp_cuda_precision() == MP_PRECISION_BF16) {
        mp_cuda_attention_backward_tc(dqkv, dqkv_bf16, dbias, dout, qkv, att, D, B, T, C, NH,
                                      scale, head_nj(hs));
        return;
    }
    if (!dqkv) mp_fatal("internal: attention_backward in fp32 without dqkv (its bf16 twin is only "
                        "for bf16 mode)");
    switch (head_nj(hs)) {
    case 1: backward_launch<1>(dqkv, dout, qkv, att, D, B, T, C, NH, scale); break;
    case 2: backward_launch<2>(dqkv, dout, qkv, att, D, B, T, C, NH, scale); break;
    case 4: backward_launch<4>(dqkv, dout, qkv, att, D, B, T, C, NH, scale); break;
    default: backward_launch<8>(dqkv, dout, qkv, att, D, B, T, C, NH, scale); break;
    }
    if (dqkv_bf16) mp_cuda_to_bf16(dqkv_bf16, dqkv, (size_t)B * T * 3 * C);
    if (dbias) mp_cuda_colsum_add(dbias, dqkv, B * T, 3 * C);   // matmul_backward's sum
}
