// CUDA causal self-attention on tensor cores (system.precision = bf16): the same FlashAttention-
// 2 scheme as ops_attention.cu (online softmax forward storing L = m + log l per row; backward
// as D, a dK/dV kernel over query tiles and a dQ kernel over key tiles, no atomics, bitwise
// repeatable), with every tile product a bf16 x bf16 -> fp32 WMMA (16 x 16 x 16) product:
// S = Q K^T, O += P V, dP = dO V^T, dV += P^T dO, dK += dS^T Q, dQ += dS K. The scores, the
// softmax statistics, P and dS are formed in fp32; Q, K, V, dO are rounded to bf16 as they
// are loaded into shared memory, and P and dS as they are written there for the next
// product. The products of two bf16 values are exact in fp32, so the rounding of those six
// operands is the only difference from fp32 arithmetic beyond the order of the sums
// (tests/unit/test_cuda_backend.c, check_attention_bf16, bounds it element by element).
//
// Blocks of 4 warps own a tile of 64 rows (queries; keys in the dK/dV kernel), 16 per warp,
// and stream tiles of 64 rows of the other side through shared memory. A warp's tile
// products land in its own fp32 scratch (16 x 64, or 16 x head size), where its lanes do the
// elementwise work: lane l takes row l / 2 and half l % 2 of the columns, two at a time in
// an order rotated per lane so that no two lanes share a bank (tc_pair), so a row's max and
// sum are one shuffle between a lane pair. The forward's running output stays in registers
// in that same layout (rescaled by exp(m_old - m_new) there), as the fragments' own layout is
// unspecified; the backward's sums over the streamed tiles stay in accumulator fragments.
// Head sizes up to 128 (DP = 16 NF columns, NF a power of two, zero-padded past hs).
//
// Checked against a host reference on the CUDA emulator, whose WMMA (tests/cuda_emu/include/
// mma.h) keeps the API's rules. The kernels as they were before the 16-byte tile loads
// (attention.h, att_fetch_tile) and the bank rotation below also passed on an H200, within
// the same bounds; this version has not run on a GPU.
#include <cuda_bf16.h>
#include <math.h>
#include <mma.h>
#include "backend/cuda/attention.h"
#include "backend/cuda/cuda_common.h"

#define TC_WARPS 4
#define TC_THREADS (32 * TC_WARPS)
#define TC_ROWS 64     // rows of a block's own tile: 16 per warp
#define TC_COLS 64     // rows of a streamed tile
#define TC_PLD (TC_COLS + 8)   // bf16 row stride of a warp's P or dS tile (16, TC_COLS)
#define TC_SLD (TC_COLS + 4)   // float row stride of a warp's score scratch (16, TC_COLS)
static_assert(TC_ROWS == COLSUM_ROWS, "dbias's row blocks are the column-sum kernel's");

// bf16 WMMA exists from sm_80 on. A build that also targets older GPUs gets kernels there
// that trap; bf16 mode refuses such a GPU before any of them runs (backend_cuda.cu).
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
namespace wmma = nvcuda::wmma;

typedef wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> frag_a;
typedef wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::row_major> frag_b_row;
typedef wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::col_major> frag_b_col;
typedef wmma::fragment<wmma::accumulator, 16, 16, 16, float> frag_acc;

// Strides: a bf16 tile row of the head is DP + 8 elements, a scratch row of the head DP + 4
// floats (or TC_SLD when wider). WMMA wants 32-byte aligned tile pointers and ldm a multiple
// of 8 bf16 / 4 floats: every tile below starts at a multiple of 16 rows and 16 columns of
// these, and every array's size is a multiple of 32 bytes.
// FWD_BLOCKS, DKV_BLOCKS, DQ_BLOCKS: the blocks per SM each kernel is compiled for
// (__launch_bounds__ caps its registers to fit them): as many as its shared memory allows
// (tc_*_shared below; 228 KB an SM), less where ptxas (nvcc 13, sm_90) would spill to fit:
// the forward at NF = 1 (6 would), and at NF = 4, where 3 blocks take 168 registers and 4
// (128) would spill. Left to itself ptxas gave the forward at NF = 4 253 registers, so 2
// blocks; with a floor that is too high it pads the registers to the cap and loses blocks.
template <int NF> struct tc_dims {
    static constexpr int DP = 16 * NF, LD = DP + 8, OW = (DP > TC_COLS ? DP : TC_COLS) + 4;
    static constexpr int FWD_BLOCKS = NF <= 2 ? 5 : NF == 4 ? 3 : 2;
    static constexpr int DKV_BLOCKS = NF <= 2 ? 3 : NF == 4 ? 2 : 1;
    static constexpr int DQ_BLOCKS = NF == 1 ? 4 : NF == 2 ? 3 : NF == 4 ? 2 : 1;
};

static __device__ __forceinline__ const __nv_bfloat16 *bf(const uint16_t *p) {
    return reinterpret_cast<const __nv_bfloat16 *>(p);
}

// A lane's elementwise share of its warp's 16-row tiles (the fp32 scratch of scores, dP or
// output at row stride TC_SLD or OW, the bf16 P or dS tile at TC_PLD): row i = lane / 2,
// half hf = lane % 2 of the columns, taken two columns at a time. The lane's pair u is pair
// tc_pair(u, n) of its half (n pairs in a half, a power of two): rotated by hf + 2 (i / 8),
// so that the 16 lanes of each half-warp read 16 different bank pairs (float2) and all 32
// lanes store their packed bf16 pairs to 32 different banks. Without it, at these row
// strides (68 or 132 floats, 72 bf16), rows i and i + 8 and the two halves met on one bank:
// 4-way conflicts on the 4- and 2-byte accesses of the softmax, P / dS and output passes,
// 2-way on the 16-byte ones (counted for every stride and half width used).
static __device__ __forceinline__ int tc_pair(int u, int n) {
    int lane = threadIdx.x % 32;
    return (u + lane % 2 + 2 * (lane / 16)) & (n - 1);   // lane / 16 = i / 8
}
static __device__ __forceinline__ float2 ld_pair(const float *p) {
    MP_CHECK_ALIGN8(p);
    return *(const float2 *)p;
}
static __device__ __forceinline__ void st_bf16_pair(uint16_t *p, float lo, float hi) {
    MP_CHECK_ALIGN4(p);   // an even column
    *(uint32_t *)p = mp_bf16_pair(lo, hi);
}

// dst (n, LD) bf16 = rows [r0, r0 + n) of one head's (T, hs) slice of src (row stride ld),
// rounded to nearest; zero past T and past hs (exact zeros in every product)
template <int NF, int ROWS>
static __device__ __forceinline__ void load_tile_bf16(uint16_t *dst, const float *src, long ld,
                                                      int r0, int T, int hs) {
    constexpr int DP = tc_dims<NF>::DP, LD = tc_dims<NF>::LD;
    att_fetch_tile<ROWS, DP, TC_THREADS>(src, ld, r0, T, hs, [&](int r, int d, float4 v) {
        uint16_t *q = dst + r * LD + d;   // LD and d multiples of 4: 8-byte aligned
        MP_CHECK_ALIGN8(q);
        *(uint2 *)q = make_uint2(mp_bf16_pair(v.x, v.y), mp_bf16_pair(v.z, v.w));
    });
}

// out (16, TC_COLS) fp32 at ldm TC_SLD = A (16, DP) . B^T, B (TC_COLS, DP): the rows of A
// against the rows of B (B^T read as a column-major matrix_b)
template <int NF>
static __device__ __forceinline__ void rows_dot_rows(float *out, const uint16_t *A,
                                                     const uint16_t *B) {
    constexpr int LD = tc_dims<NF>::LD;
    frag_a a[NF];
    for (int f = 0; f < NF; f++) wmma::load_matrix_sync(a[f], bf(A + 16 * f), LD);
    for (int j = 0; j < TC_COLS / 16; j++) {
        frag_acc acc;
        wmma::fill_fragment(acc, 0.0f);
        for (int f = 0; f < NF; f++) {
            frag_b_col b;
            wmma::load_matrix_sync(b, bf(B + 16 * j * LD + 16 * f), LD);
            wmma::mma_sync(acc, a[f], b, acc);
        }
        wmma::store_matrix_sync(out + 16 * j, acc, TC_SLD, wmma::mem_row_major);
    }
}

// acc[f] (+)= P (16, TC_COLS; ldm TC_PLD) . M (TC_COLS, DP), column block f of 16
template <int NF>
static __device__ __forceinline__ void tile_times_rows(frag_acc *acc, const uint16_t *P,
                                                       const uint16_t *M) {
    constexpr int LD = tc_dims<NF>::LD;
    for (int j = 0; j < TC_COLS / 16; j++) {
        frag_a p;
        wmma::load_matrix_sync(p, bf(P + 16 * j), TC_PLD);
        for (int f = 0; f < NF; f++) {
            frag_b_row m;
            wmma::load_matrix_sync(m, bf(M + 16 * j * LD + 16 * f), LD);
            wmma::mma_sync(acc[f], p, m, acc[f]);
        }
    }
}

// grid (query tiles, NH, B), the longest tiles (last queries, most keys) first
template <int NF>
static __global__ void __launch_bounds__(TC_THREADS, tc_dims<NF>::FWD_BLOCKS)
attention_forward_tc_kernel(float *out, uint16_t *out_bf16, float *lse, const float *qkv, int T,
                            int C, int NH, float scale) {
    constexpr int DP = tc_dims<NF>::DP, LD = tc_dims<NF>::LD, OW = tc_dims<NF>::OW;
    constexpr int HALF = DP / 2;   // output columns per lane
    extern __shared__ __align__(128) uint16_t smem[];
    uint16_t *Qs = smem;              // (TC_ROWS, LD) this block's queries
    uint16_t *Ks = Qs + TC_ROWS * LD;             // (TC_COLS, LD) a key tile
    uint16_t *Vs = Ks + TC_COLS * LD;             // (TC_COLS, LD) its values
    uint16_t *Ps = Vs + TC_COLS * LD;             // (TC_WARPS, 16, TC_PLD) P per warp
    float *Ws = (float *)(Ps + TC_WARPS * 16 * TC_PLD);   // (TC_WARPS, 16, OW) scratch
    int hs = C / NH, C3 = 3 * C, h = blockIdx.y, b = blockIdx.z;
    int r0 = ((T + TC_ROWS - 1) / TC_ROWS - 1 - (int)blockIdx.x) * TC_ROWS;
    int w = threadIdx.x / 32, lane = threadIdx.x % 32, i = lane / 2, hf = lane % 2;
    int r = r0 + 16 * w + i;   // this lane's query row
    uint16_t *Pw = Ps + w * 16 * TC_PLD;
    float *Sw = Ws + w * 16 * OW;
    const att_head a = att_head_of(qkv, T, C, NH);   // (T, hs) slices
    load_tile_bf16<NF, TC_ROWS>(Qs, a.q, C3, r0, T, hs);
    float o[HALF], m = -INFINITY, l = 0.0f;
    UNROLL
    for (int t = 0; t < HALF; t++) o[t] = 0.0f;
    int kend = min(r0 + TC_ROWS, T);   // keys [0, kend) reach some row of the tile
    for (int c0 = 0; c0 < kend; c0 += TC_COLS) {
        __syncthreads();   // the previous key tile is read
        load_tile_bf16<NF, TC_COLS>(Ks, a.k, C3, c0, T, hs);
        load_tile_bf16<NF, TC_COLS>(Vs, a.v, C3, c0, T, hs);
        __syncthreads();
        rows_dot_rows<NF>(Sw, Qs + 16 * w * LD, Ks);   // S (16, TC_COLS)
        __syncwarp();
        // key 0 is in the first tile and unmasked for every row, so m is finite from then
        // on; columns masked for this lane's half alone are covered by its partner's max
        constexpr int NP = TC_COLS / 4;   // column pairs in a half
        float2 s[NP];
        float mx = -INFINITY;
        UNROLL
        for (int u = 0; u < NP; u++) {
            int cc = hf * (TC_COLS / 2) + 2 * tc_pair(u, NP), c = c0 + cc;
            float2 v = ld_pair(Sw + i * TC_SLD + cc);
            s[u].x = c <= r ? v.x * scale : -INFINITY;
            s[u].y = c + 1 <= r ? v.y * scale : -INFINITY;
            mx = fmaxf(mx, fmaxf(s[u].x, s[u].y));
        }
        float mnew = fmaxf(m, fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1)));
        float alpha = expf(m - mnew), ps = 0.0f;   // alpha = 0 on the first tile (m = -inf)
        UNROLL
        for (int u = 0; u < NP; u++) {
            float px = expf(s[u].x - mnew), py = expf(s[u].y - mnew);   // masked: exp(-inf) = 0
            st_bf16_pair(Pw + i * TC_PLD + hf * (TC_COLS / 2) + 2 * tc_pair(u, NP), px, py);
            ps += px;
            ps += py;
        }
        l = l * alpha + ps + __shfl_xor_sync(0xffffffffu, ps, 1);
        m = mnew;
        __syncwarp();   // P written, S read: the scratch takes P V next
        frag_acc acc[NF];
        for (int f = 0; f < NF; f++) wmma::fill_fragment(acc[f], 0.0f);
        tile_times_rows<NF>(acc, Pw, Vs);
        for (int f = 0; f < NF; f++)
            wmma::store_matrix_sync(Sw + 16 * f, acc[f], OW, wmma::mem_row_major);
        __syncwarp();
        UNROLL
        for (int u = 0; u < HALF / 2; u++) {   // o[2u], o[2u + 1]: the columns of pair tc_pair(u)
            float2 v = ld_pair(Sw + i * OW + hf * HALF + 2 * tc_pair(u, HALF / 2));
            o[2 * u] = o[2 * u] * alpha + v.x;
            o[2 * u + 1] = o[2 * u + 1] * alpha + v.y;
        }
    }
    if (r < T) {
        size_t at = ((size_t)b * T + r) * C + h * hs;
        float *orow = out + at, inv = 1.0f / l;
        uint16_t *brow = out_bf16 ? out_bf16 + at : NULL;
        UNROLL
        for (int t = 0; t < HALF; t++) {
            int d = hf * HALF + 2 * tc_pair(t / 2, HALF / 2) + t % 2;
            if (d >= hs) continue;
            float y = o[t] * inv;
            orow[d] = y;
            if (brow) brow[d] = mp_float_to_bf16(y);
        }
        if (hf == 0) lse[((size_t)b * NH + h) * T + r] = m + logf(l);
    }
}

// P and dS of two neighbouring scores (s, dp from the fp32 scratch) into the warp's bf16
// tiles at the even element `at`: p = exp(s scale - L) where kept, else 0; ds = p (dp - D)
// scale. The pair's L and D: one row's twice (dQ) or two rows' (dK, dV).
static __device__ __forceinline__ void p_ds(uint16_t *P, uint16_t *dS, int at, float2 s,
                                            float2 dp, float2 L, float2 D, bool keep_x,
                                            bool keep_y, float scale) {
    float px = keep_x ? expf(s.x * scale - L.x) : 0.0f;
    float py = keep_y ? expf(s.y * scale - L.y) : 0.0f;
    if (P) st_bf16_pair(P + at, px, py);
    st_bf16_pair(dS + at, px * (dp.x - D.x) * scale, py * (dp.y - D.y) * scale);
}

// the warp's accumulators (16, DP), finished sums, stored into rows [rw, rw + 16) of one
// head's slice of dqkv (column offset col of the head's q, k or v part), through the
// scratch, where they stay for block_colsum; dqkv_bf16 (same offsets), if not NULL, gets
// each value rounded (either may be NULL)
template <int NF>
static __device__ void store_rows(float *dqkv, uint16_t *dqkv_bf16, const frag_acc *acc,
                                  float *Sw, int rw, int T, int C3, int col, int hs) {
    constexpr int OW = tc_dims<NF>::OW;
    for (int f = 0; f < NF; f++) wmma::store_matrix_sync(Sw + 16 * f, acc[f], OW, wmma::mem_row_major);
    __syncwarp();
    int lane = threadIdx.x % 32;
    for (int e = lane; e < 16 * hs; e += 32) {
        int i = e / hs, d = e % hs;
        if (rw + i >= T) continue;
        size_t at = (size_t)(rw + i) * C3 + col + d;
        float g = Sw[i * OW + d];
        if (dqkv) dqkv[at] = g;
        if (dqkv_bf16) dqkv_bf16[at] = mp_float_to_bf16(g);
    }
    __syncwarp();   // the scratch is read before the next store into it
}

// part (hs) = the column sums of the block's TC_ROWS rows, from r0 on, as store_rows left
// them in the warps' scratches (Ws: warp w's 16 rows at w * 16 * OW), rows past T skipped:
// each column summed in row order from 0, as mp_cuda_colsum_add's partial kernel sums a
// block of rows of dqkv, so that with its blocks (64 rows of one sequence: T a multiple of
// 64) the bias gradient has matmul_backward's bits. Every thread of the block calls it.
template <int NF>
static __device__ void block_colsum(float *part, const float *Ws, int r0, int T, int hs) {
    constexpr int OW = tc_dims<NF>::OW;
    __syncthreads();   // every warp's rows are in its scratch
    for (int d = threadIdx.x; d < hs; d += TC_THREADS) {
        float s = 0.0f;
        for (int r = 0; r < TC_ROWS && r0 + r < T; r++) s += Ws[r * OW + d];
        part[d] = s;
    }
    __syncthreads();   // read before a warp stores its next rows there
}

// dK, dV: grid (key tiles, NH, B), a block per tile of TC_ROWS keys (the first keys, which
// the most queries see, first), walking the query tiles from the diagonal to T in order
template <int NF>
static __global__ void __launch_bounds__(TC_THREADS, tc_dims<NF>::DKV_BLOCKS)
attention_dkv_tc_kernel(float *dqkv, uint16_t *dqkv_bf16, float *part, const float *dout,
                        const float *qkv, const float *lse, const float *D, int T, int C, int NH,
                        float scale) {
    constexpr int LD = tc_dims<NF>::LD, OW = tc_dims<NF>::OW;
    extern __shared__ __align__(128) uint16_t smem[];
    uint16_t *Ks = smem;              // (TC_ROWS, LD) this block's keys
    uint16_t *Vs = Ks + TC_ROWS * LD;             // (TC_ROWS, LD) and values
    uint16_t *Qs = Vs + TC_ROWS * LD;             // (TC_COLS, LD) a query tile
    uint16_t *dOs = Qs + TC_COLS * LD;            // (TC_COLS, LD) its output gradients
    uint16_t *Ps = dOs + TC_COLS * LD;            // (TC_WARPS, 16, TC_PLD) P^T per warp
    uint16_t *dSs = Ps + TC_WARPS * 16 * TC_PLD;  // (TC_WARPS, 16, TC_PLD) dS^T per warp
    float *Ws = (float *)(dSs + TC_WARPS * 16 * TC_PLD);   // (TC_WARPS, 16, OW) S^T scratch
    float *dPs = Ws + TC_WARPS * 16 * OW;                 // (TC_WARPS, 16, TC_SLD) dP^T
    float *Ls = dPs + TC_WARPS * 16 * TC_SLD;             // (TC_COLS) L of the query tile
    float *Ds = Ls + TC_COLS;                             // (TC_COLS) D of the query tile
    int hs = C / NH, C3 = 3 * C, h = blockIdx.y, b = blockIdx.z;
    int c0 = (int)blockIdx.x * TC_ROWS;
    int w = threadIdx.x / 32, lane = threadIdx.x % 32, i = lane / 2, hf = lane % 2;
    int c = c0 + 16 * w + i;   // this lane's key
    uint16_t *Pw = Ps + w * 16 * TC_PLD, *dSw = dSs + w * 16 * TC_PLD;
    float *Sw = Ws + w * 16 * OW, *dPw = dPs + w * 16 * TC_SLD;
    const att_head a = att_head_grads_of(qkv, dout, lse, D, T, C, NH);   // (T, hs) slices, L, D
    load_tile_bf16<NF, TC_ROWS>(Ks, a.k, C3, c0, T, hs);
    load_tile_bf16<NF, TC_ROWS>(Vs, a.v, C3, c0, T, hs);
    frag_acc dk[NF], dv[NF];
    for (int f = 0; f < NF; f++) {
        wmma::fill_fragment(dk[f], 0.0f);
        wmma::fill_fragment(dv[f], 0.0f);
    }
    // queries before c0 see none of these keys; TC_ROWS is a multiple of TC_COLS
    for (int r0 = c0; r0 < T; r0 += TC_COLS) {
        __syncthreads();   // the previous query tile is read
        load_tile_bf16<NF, TC_COLS>(Qs, a.q, C3, r0, T, hs);
        load_tile_bf16<NF, TC_COLS>(dOs, a.dO, C, r0, T, hs);
        att_load_ld<TC_THREADS>(Ls, Ds, a, r0, TC_COLS, T);
        __syncthreads();
        rows_dot_rows<NF>(Sw, Ks + 16 * w * LD, Qs);    // S^T = k_c . q_r
        rows_dot_rows<NF>(dPw, Vs + 16 * w * LD, dOs);  // dP^T = v_c . dO_r
        __syncwarp();
        UNROLL
        for (int u = 0; u < TC_COLS / 4; u++) {   // query rows rr, rr + 1
            int rr = hf * (TC_COLS / 2) + 2 * tc_pair(u, TC_COLS / 4), r = r0 + rr;
            p_ds(Pw, dSw, i * TC_PLD + rr, ld_pair(Sw + i * TC_SLD + rr),
                 ld_pair(dPw + i * TC_SLD + rr), ld_pair(Ls + rr), ld_pair(Ds + rr),
                 r >= c && r < T, r + 1 >= c && r + 1 < T, scale);
        }
        __syncwarp();   // P^T, dS^T written by the warp's lanes, read by its fragments
        tile_times_rows<NF>(dv, Pw, dOs);   // dV += P^T dO
        tile_times_rows<NF>(dk, dSw, Qs);   // dK += dS^T q
    }
    size_t head = (size_t)b * T * C3 + h * hs;
    float *hd = dqkv ? dqkv + head : NULL;
    uint16_t *hb = dqkv_bf16 ? dqkv_bf16 + head : NULL;
    // part: (B, key tiles, 3C) column sums, this block's row of them
    float *pr = part ? part + ((size_t)b * gridDim.x + blockIdx.x) * C3 + h * hs : NULL;
    store_rows<NF>(hd, hb, dk, Sw, c0 + 16 * w, T, C3, C, hs);
    if (pr) block_colsum<NF>(pr + C, Ws, c0, T, hs);
    store_rows<NF>(hd, hb, dv, Sw, c0 + 16 * w, T, C3, 2 * C, hs);
    if (pr) block_colsum<NF>(pr + 2 * C, Ws, c0, T, hs);
}

// dQ: grid (query tiles, NH, B), a block per tile of TC_ROWS queries (the longest first),
// walking the key tiles up to the diagonal in order
template <int NF>
static __global__ void __launch_bounds__(TC_THREADS, tc_dims<NF>::DQ_BLOCKS)
attention_dq_tc_kernel(float *dqkv, uint16_t *dqkv_bf16, float *part, const float *dout,
                       const float *qkv, const float *lse, const float *D, int T, int C, int NH,
                       float scale) {
    constexpr int LD = tc_dims<NF>::LD, OW = tc_dims<NF>::OW;
    extern __shared__ __align__(128) uint16_t smem[];
    uint16_t *Qs = smem;              // (TC_ROWS, LD) this block's queries
    uint16_t *dOs = Qs + TC_ROWS * LD;            // (TC_ROWS, LD) and output gradients
    uint16_t *Ks = dOs + TC_ROWS * LD;            // (TC_COLS, LD) a key tile
    uint16_t *Vs = Ks + TC_COLS * LD;             // (TC_COLS, LD) its values
    uint16_t *dSs = Vs + TC_COLS * LD;            // (TC_WARPS, 16, TC_PLD) dS per warp
    float *Ws = (float *)(dSs + TC_WARPS * 16 * TC_PLD);   // (TC_WARPS, 16, OW) S scratch
    float *dPs = Ws + TC_WARPS * 16 * OW;                 // (TC_WARPS, 16, TC_SLD) dP
    int hs = C / NH, C3 = 3 * C, h = blockIdx.y, b = blockIdx.z;
    int r0 = ((T + TC_ROWS - 1) / TC_ROWS - 1 - (int)blockIdx.x) * TC_ROWS;
    int w = threadIdx.x / 32, lane = threadIdx.x % 32, i = lane / 2, hf = lane % 2;
    int r = r0 + 16 * w + i;   // this lane's query row
    uint16_t *dSw = dSs + w * 16 * TC_PLD;
    float *Sw = Ws + w * 16 * OW, *dPw = dPs + w * 16 * TC_SLD;
    const att_head a = att_head_grads_of(qkv, dout, lse, D, T, C, NH);   // (T, hs) slices, L, D
    load_tile_bf16<NF, TC_ROWS>(Qs, a.q, C3, r0, T, hs);
    load_tile_bf16<NF, TC_ROWS>(dOs, a.dO, C, r0, T, hs);
    float L = r < T ? a.L[r] : 0.0f, Dr = r < T ? a.D[r] : 0.0f;
    frag_acc dq[NF];
    for (int f = 0; f < NF; f++) wmma::fill_fragment(dq[f], 0.0f);
    int kend = min(r0 + TC_ROWS, T);
    for (int c0 = 0; c0 < kend; c0 += TC_COLS) {
        __syncthreads();   // the previous key tile is read
        load_tile_bf16<NF, TC_COLS>(Ks, a.k, C3, c0, T, hs);
        load_tile_bf16<NF, TC_COLS>(Vs, a.v, C3, c0, T, hs);
        __syncthreads();
        rows_dot_rows<NF>(Sw, Qs + 16 * w * LD, Ks);    // S = q_r . k_c
        rows_dot_rows<NF>(dPw, dOs + 16 * w * LD, Vs);  // dP = dO_r . v_c
        __syncwarp();
        UNROLL
        for (int u = 0; u < TC_COLS / 4; u++) {   // keys cc, cc + 1
            int cc = hf * (TC_COLS / 2) + 2 * tc_pair(u, TC_COLS / 4), c = c0 + cc;
            p_ds(NULL, dSw, i * TC_PLD + cc, ld_pair(Sw + i * TC_SLD + cc),
                 ld_pair(dPw + i * TC_SLD + cc), make_float2(L, L), make_float2(Dr, Dr),
                 c <= r && r < T, c + 1 <= r && r < T, scale);
        }
        __syncwarp();   // dS written by the warp's lanes, read by its fragments
        tile_times_rows<NF>(dq, dSw, Ks);   // dQ += dS k
    }
    size_t head = (size_t)b * T * C3 + h * hs;
    store_rows<NF>(dqkv ? dqkv + head : NULL, dqkv_bf16 ? dqkv_bf16 + head : NULL, dq, Sw,
                   r0 + 16 * w, T, C3, 0, hs);
    if (part)   // this block's row of the (B, query tiles, 3C) column sums
        block_colsum<NF>(part + ((size_t)b * gridDim.x + r0 / TC_ROWS) * C3 + h * hs, Ws, r0, T,
                         hs);
}

#else
template <int NF>
static __global__ void attention_forward_tc_kernel(float *, uint16_t *, float *, const float *, int,
                                                   int, int, float) {
    __trap();
}
template <int NF>
static __global__ void attention_dkv_tc_kernel(float *, uint16_t *, float *, const float *,
                                               const float *, const float *, const float *, int,
                                               int, int, float) {
    __trap();
}
template <int NF>
static __global__ void attention_dq_tc_kernel(float *, uint16_t *, float *, const float *,
                                              const float *, const float *, const float *, int,
                                              int, int, float) {
    __trap();
}
#endif

// the kernels' shared memory, as they lay it out
static size_t tc_forward_shared(int NF) {
    size_t LD = 16 * NF + 8, OW = (16 * NF > TC_COLS ? 16 * NF : TC_COLS) + 4;
    return 2 * (TC_ROWS * LD + 2 * TC_COLS * LD + TC_WARPS * 16 * TC_PLD) + 4 * TC_WARPS * 16 * OW;
}
static size_t tc_dkv_shared(int NF) {
    size_t LD = 16 * NF + 8, OW = (16 * NF > TC_COLS ? 16 * NF : TC_COLS) + 4;
    return 2 * (2 * TC_ROWS * LD + 2 * TC_COLS * LD + 2 * TC_WARPS * 16 * TC_PLD) +
           4 * (TC_WARPS * 16 * (OW + TC_SLD) + 2 * TC_COLS);
}
static size_t tc_dq_shared(int NF) {
    size_t LD = 16 * NF + 8, OW = (16 * NF > TC_COLS ? 16 * NF : TC_COLS) + 4;
    return 2 * (2 * TC_ROWS * LD + 2 * TC_COLS * LD + TC_WARPS * 16 * TC_PLD) +
           4 * TC_WARPS * 16 * (OW + TC_SLD);
}

template <int NF>
static void tc_forward_launch(float *out, uint16_t *out_bf16, float *lse, const float *qkv, int B,
                              int T, int C, int NH, float scale) {
    static size_t allowed;
    size_t shb = tc_forward_shared(NF);
    mp_cuda_allow_shared(attention_forward_tc_kernel<NF>, shb, &allowed);
    dim3 grid((unsigned)((T + TC_ROWS - 1) / TC_ROWS), (unsigned)NH, (unsigned)B);
    attention_forward_tc_kernel<NF><<<grid, TC_THREADS, shb>>>(out, out_bf16, lse, qkv, T, C, NH,
                                                               scale);
    KERNEL_CHECK();
}

template <int NF>
static void tc_backward_launch(float *dqkv, uint16_t *dqkv_bf16, float *part, const float *dout,
                               const float *qkv, const float *lse, const float *D, int B, int T,
                               int C, int NH, float scale) {
    static size_t allowed_kv, allowed_q;
    dim3 grid((unsigned)((T + TC_ROWS - 1) / TC_ROWS), (unsigned)NH, (unsigned)B);
    size_t shb = tc_dkv_shared(NF);
    mp_cuda_allow_shared(attention_dkv_tc_kernel<NF>, shb, &allowed_kv);
    attention_dkv_tc_kernel<NF><<<grid, TC_THREADS, shb>>>(dqkv, dqkv_bf16, part, dout, qkv, lse,
                                                           D, T, C, NH, scale);
    KERNEL_CHECK();
    shb = tc_dq_shared(NF);
    mp_cuda_allow_shared(attention_dq_tc_kernel<NF>, shb, &allowed_q);
    attention_dq_tc_kernel<NF><<<grid, TC_THREADS, shb>>>(dqkv, dqkv_bf16, part, dout, qkv, lse,
                                                          D, T, C, NH, scale);
    KERNEL_CHECK();
}

// nf: the head's 16-column blocks, rounded up to a power of two (ops_attention.cu checked
// hs <= 128 when the model was built)
void mp_cuda_attention_forward_tc(float *out, uint16_t *out_bf16, float *lse, const float *qkv,
                                  int B, int T, int C, int NH, float scale, int nf) {
    auto launch = nf == 1 ? tc_forward_launch<1> : nf == 2 ? tc_forward_launch<2>
                  : nf == 4 ? tc_forward_launch<4> : tc_forward_launch<8>;
    launch(out, out_bf16, lse, qkv, B, T, C, NH, scale);
}

void mp_cuda_attention_backward_tc(float *dqkv, uint16_t *dqkv_bf16, float *dbias,
                                   const float *dout, const float *qkv, const float *lse,
                                   const float *D, int B, int T, int C, int NH, float scale,
                                   int nf) {
    // dbias's partial sums: a row of 3C per block of TC_ROWS rows of one sequence, which
    // the dK/dV kernel (k, v columns) and the dQ kernel (q columns) fill; then added in
    // block order. With T a multiple of TC_ROWS (= COLSUM_ROWS) and B T <= 65535 TC_ROWS
    // these are mp_cuda_colsum_add's blocks, so the sums are matmul_backward's.
    int nblk = B * ((T + TC_ROWS - 1) / TC_ROWS);
    size_t part_bytes = (size_t)nblk * 3 * C * sizeof(float);
    float *part = dbias ? (float *)mp_cuda_scratch(SCR_COLSUM, part_bytes) : NULL;
    auto launch = nf == 1 ? tc_backward_launch<1> : nf == 2 ? tc_backward_launch<2>
                  : nf == 4 ? tc_backward_launch<4> : tc_backward_launch<8>;
    launch(dqkv, dqkv_bf16, part, dout, qkv, lse, D, B, T, C, NH, scale);
    if (dbias) mp_cuda_colsum_finish(dbias, part, nblk, 3 * C);
}
