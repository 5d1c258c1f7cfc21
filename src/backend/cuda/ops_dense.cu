// CUDA dense ops: embeddings, LayerNorm, matmul (cuBLAS), GELU, residual, cross-entropy.
// The math and the order of the CPU reference (src/backend/cpu/ops_dense.c); backward ops
// accumulate into parameter gradients and write input gradients as backend.h says.
// Reductions over rows (dw, db, dbias, dwpe, dwte) run in a fixed order with one writer per
// element, never atomics (cuda_common.h).
#include "backend/cuda/cuda_common.h"

#define LN_EPS 1e-5f
#define INV_SQRT2 0.70710678118654752440f
#define INV_SQRT_2PI 0.39894228040143267794f
#define LN_ROW_BLOCK 32

// ---------------------------------------------------------------------------------------
// token + position embedding

static __global__ void encoder_forward_kernel(float *out, const int32_t *inp, const float *wte,
                                              const float *wpe, int N, int T, int C) {
    size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    if (i >= (size_t)N * C) return;
    size_t n = i / C, c = i % C, t = n % T;
    out[i] = wte[(size_t)inp[n] * C + c] + wpe[t * C + c];
}

void mp_cuda_encoder_forward(float *out, const int32_t *inp, const float *wte, const float *wpe,
                             int B, int T, int C) {
    size_t n = (size_t)B * T * C;
    if (!n) return;
    encoder_forward_kernel<<<mp_blocks(n, 256), 256>>>(out, inp, wte, wpe, B * T, T, C);
    KERNEL_CHECK();
}

// dwpe (t, c): the sum over sequences b in order
static __global__ void encoder_dwpe_kernel(float *dwpe, const float *dout, int B, int T, int C) {
    size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    if (i >= (size_t)T * C) return;
    float acc = dwpe[i];
    for (int b = 0; b < B; b++) acc += dout[(size_t)b * T * C + i];
    dwpe[i] = acc;
}

// dwte: positions sorted by token id (stable); the block at the first position of each
// token's run sums that run in position order, as the CPU does. The run ends where the next
// token's starts (off, from the sort), known before the loop, so nvcc unrolls it and keeps
// 4 rows' loads in flight; a loop that stopped at the first other token read its key, its
// index and its row one after another per position, and a frequent token (a few % of the
// positions in real text, hundreds in a batch of 16384) made that block the kernel's time.
static __global__ void __launch_bounds__(1024)
encoder_dwte_kernel(float *dwte, const float *dout, const int32_t *skey, const int32_t *idx,
                    const int32_t *off, int C) {
    int p = blockIdx.x;
    if (p > 0 && skey[p] == skey[p - 1]) return;
    int tok = skey[p], end = off[tok + 1];
    float *row = dwte + (size_t)tok * C;
    for (int c = threadIdx.x; c < C; c += blockDim.x) {
        float acc = row[c];
        UNROLL4
        for (int q = p; q < end; q++) acc += dout[(size_t)idx[q] * C + c];
        row[c] = acc;
    }
}

void mp_cuda_encoder_backward(float *dwte, float *dwpe, const float *dout, const int32_t *inp,
                              int B, int T, int C, int V) {
    int N = B * T;
    if (N <= 0 || C <= 0) return;
    if (V <= 0) mp_fatal("internal: encoder_backward with a vocabulary of %d", V);
    encoder_dwpe_kernel<<<mp_blocks((size_t)T * C, 256), 256>>>(dwpe, dout, B, T, C);
    KERNEL_CHECK();
    const int32_t *idx, *skey, *off;
    mp_cuda_sort_by_key(inp, N, V, &idx, &skey, &off);   // keys below V: log2 V bits sorted
    int threads = C < 1024 ? 32 * ((C + 31) / 32) : 1024;   // a column each, as far as that goes
    encoder_dwte_kernel<<<N, threads>>>(dwte, dout, skey, idx, off, C);
    KERNEL_CHECK();
}

// ---------------------------------------------------------------------------------------
// LayerNorm: one warp per row

// RESID: the row is first formed as res = inp + add and written (res may alias inp), the
// residual add fused with the LayerNorm after it: each lane reads back only the columns it
// wrote, so the passes below see exactly what the residual kernel would have stored, and
// the bits are those of the two kernels in turn.
template <bool RESID>
static __global__ void layernorm_forward_kernel(float *out, uint16_t *out_bf16, float *mean,
                                                float *rstd, float *res, const float *inp,
                                                const float *add, const float *w,
                                                const float *b, int N, int C) {
    int n = (blockIdx.x * blockDim.x + threadIdx.x) / 32, lane = threadIdx.x % 32;
    if (n >= N) return;
    const float *x = RESID ? res + (size_t)n * C : inp + (size_t)n * C;
    float *o = out ? out + (size_t)n * C : NULL;
    float s = 0.0f;
    if (RESID) {
        const float *xa = inp + (size_t)n * C, *xb = add + (size_t)n * C;
        float *xr = res + (size_t)n * C;
        for (int c = lane; c < C; c += 32) {
            float v = xa[c] + xb[c];
            xr[c] = v;
            s += v;
        }
    } else {
        for (int c = lane; c < C; c += 32) s += x[c];
    }
    float m = mp_warp_sum(s) / C;
    float v = 0.0f;   // two passes, as on the CPU
    for (int c = lane; c < C; c += 32) {
        float d = x[c] - m;
        v += d * d;
    }
    float var = mp_warp_sum(v) / C;
    float r = 1.0f / sqrtf(var + LN_EPS);
    uint16_t *ob = out_bf16 ? out_bf16 + (size_t)n * C : NULL;
    for (int c = lane; c < C; c += 32) {
        float y = (x[c] - m) * r * w[c] + b[c];
        if (o) o[c] = y;
        if (ob) ob[c] = mp_float_to_bf16(y);
    }
    if (lane == 0) {
        if (mean) mean[n] = m;
        if (rstd) rstd[n] = r;
    }
}

void mp_cuda_layernorm_forward(float *out, uint16_t *out_bf16, float *mean, float *rstd,
                               const float *inp, const float *w, const float *b, int N, int C) {
    if (N <= 0) return;
    layernorm_forward_kernel<false><<<mp_blocks((size_t)N * 32, 256), 256>>>(
        out, out_bf16, mean, rstd, NULL, inp, NULL, w, b, N, C);
    KERNEL_CHECK();
}

void mp_cuda_residual_layernorm_forward(float *res, float *out, uint16_t *out_bf16, float *mean,
                                        float *rstd, const float *a, const float *b,
                                        const float *w, const float *bias, int N, int C) {
    if (N <= 0) return;
    layernorm_forward_kernel<true><<<mp_blocks((size_t)N * 32, 256), 256>>>(
        out, out_bf16, mean, rstd, res, a, b, w, bias, N, C);
    KERNEL_CHECK();
}

static __global__ void layernorm_dinp_kernel(float *dinp, uint16_t *dinp_bf16, const float *dout,
                                             const float *inp, const float *w, const float *mean,
                                             const float *rstd, int N, int C) {
    int n = (blockIdx.x * blockDim.x + threadIdx.x) / 32, lane = threadIdx.x % 32;
    if (n >= N) return;
    const float *x = inp + (size_t)n * C, *d = dout + (size_t)n * C;
    float *dx = dinp + (size_t)n * C;
    float m = mean[n], s = rstd[n];
    float a = 0.0f, bsum = 0.0f;
    for (int c = lane; c < C; c += 32) {
        float dn = w[c] * d[c];
        a += dn;
        bsum += dn * ((x[c] - m) * s);
    }
    float dn_mean = mp_warp_sum(a) / C, dnn_mean = mp_warp_sum(bsum) / C;
    uint16_t *dxb = dinp_bf16 ? dinp_bf16 + (size_t)n * C : NULL;
    for (int c = lane; c < C; c += 32) {
        float norm = (x[c] - m) * s;
        float g = dx[c] + (w[c] * d[c] - dn_mean - norm * dnn_mean) * s;
        dx[c] = g;
        if (dxb) dxb[c] = mp_float_to_bf16(g);
    }
}

// partial dw, db of one block of LN_ROW_BLOCK rows: part (nblk, 2, C)
static __global__ void layernorm_dw_partial_kernel(float *part, const float *dout,
                                                   const float *inp, const float *mean,
                                                   const float *rstd, int N, int C,
                                                   int rows_per) {
    int c = blockIdx.x * blockDim.x + threadIdx.x, k = blockIdx.y;
    if (c >= C) return;
    int n1 = min(N, (k + 1) * rows_per);
    float pw = 0.0f, pb = 0.0f;
    for (int n = k * rows_per; n < n1; n++) {
        float d = dout[(size_t)n * C + c];
        pw += d * ((inp[(size_t)n * C + c] - mean[n]) * rstd[n]);
        pb += d;
    }
    part[(size_t)k * 2 * C + c] = pw;
    part[(size_t)k * 2 * C + C + c] = pb;
}

static __global__ void layernorm_dw_final_kernel(float *dw, float *db, const float *part,
                                                 int nblk, int C) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    float sw = 0.0f, sb = 0.0f;
    for (int k = 0; k < nblk; k++) {
        sw += part[(size_t)k * 2 * C + c];
        sb += part[(size_t)k * 2 * C + C + c];
    }
    dw[c] += sw;
    db[c] += sb;
}

void mp_cuda_layernorm_backward(float *dinp, uint16_t *dinp_bf16, float *dw, float *db,
                                const float *dout, const float *inp, const float *w,
                                const float *mean, const float *rstd, int N, int C) {
    if (N <= 0) return;
    layernorm_dinp_kernel<<<mp_blocks((size_t)N * 32, 256), 256>>>(dinp, dinp_bf16, dout, inp, w,
                                                                    mean, rstd, N, C);
    KERNEL_CHECK();
    int rows_per = mp_rows_per_block(N, LN_ROW_BLOCK), nblk = (N + rows_per - 1) / rows_per;
    float *part = (float *)mp_cuda_scratch(SCR_COLSUM, (size_t)nblk * 2 * C * sizeof(float));
    layernorm_dw_partial_kernel<<<dim3(mp_blocks(C, 128), nblk), 128>>>(part, dout, inp, mean,
                                                                         rstd, N, C, rows_per);
    KERNEL_CHECK();
    layernorm_dw_final_kernel<<<mp_blocks(C, 128), 128>>>(dw, db, part, nblk, C);
    KERNEL_CHECK();
}

// ---------------------------------------------------------------------------------------
// matmul: out = inp @ w^T + bias (cuBLAS)

// one column per thread, rows strided over grid.y: no 64-bit i % OC per element, which costs
// more instructions than the element's 8 bytes of traffic take time at these sizes
static __global__ void add_bias_kernel(float *out, const float *bias, int N, int OC) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= OC) return;
    float b = bias[c];
    for (int n = blockIdx.y; n < N; n += gridDim.y) out[(size_t)n * OC + c] += b;
}

// bf16 mode: the GEMMs run on tensor cores with fp32 sums on bf16 operands; out, dinp, dw
// and the bias stay fp32. An operand's twin (backend.h), written by the op that produced
// it, is read as it is, and so is a weight's bf16 copy; an operand without either is
// rounded into scratch here (one pass of 4 + 2 bytes per element).
static const uint16_t *bf16_operand(int slot, const float *x, const uint16_t *twin, int rows,
                                    int cols) {
    if (twin) return twin;
    if (!x) mp_fatal("internal: a bf16 GEMM operand (%d, %d) with neither fp32 values nor a twin",
                     rows, cols);
    uint16_t *b = (uint16_t *)mp_cuda_scratch(slot, (size_t)rows * cols * sizeof(uint16_t));
    mp_cuda_round_bf16(b, x, rows, cols, cols);
    return b;
}

// fp32 mode reads the fp32 operands, which must then be there
static void fp32_operand(const float *x, const char *what) {
    if (!x) mp_fatal("internal: matmul in fp32 without %s (its bf16 twin is only for bf16 mode)",
                     what);
}

void mp_cuda_matmul_forward(float *out, const float *inp, const uint16_t *inp_bf16,
                            const float *w, const uint16_t *w_bf16, const float *bias, int N,
                            int C, int OC) {
    if (N <= 0 || OC <= 0) return;
    if (mp_cuda_precision() == MP_PRECISION_BF16 && C > 0) {
        const uint16_t *ib = bf16_operand(SCR_GEMM_A, inp, inp_bf16, N, C);   // (N, C)
        const uint16_t *wb = bf16_operand(SCR_GEMM_B, w, w_bf16, OC, C);      // (OC, C)
        if (bias && mp_cuda_gemm_bf16_bias(N, OC, C, ib, C, wb, C, bias, out, OC)) return;
        mp_cuda_gemm_bf16(0, 1, N, OC, C, 1.0f, ib, C, wb, C, 0.0f, out, OC);
    } else {
        fp32_operand(inp, "inp");
        mp_cuda_sgemm(0, 1, N, OC, C, 1.0f, inp, C, w, C, 0.0f, out, OC);
    }
    if (bias) {
        dim3 grid(mp_blocks(OC, 256), N < 65535 ? N : 65535);
        add_bias_kernel<<<grid, 256>>>(out, bias, N, OC);
        KERNEL_CHECK();
    }
}

void mp_cuda_matmul_backward(float *dinp, float *dw, float *dbias, const float *dout,
                             const uint16_t *dout_bf16, const float *inp,
                             const uint16_t *inp_bf16, const float *w, const uint16_t *w_bf16,
                             int N, int C, int OC, int dinp_accumulate) {
    if (N <= 0 || C <= 0) return;
    if (OC <= 0) {   // empty sums: a written dinp is 0, the rest keeps its values
        if (dinp && !dinp_accumulate) mp_cuda_zero(dinp, (size_t)N * C * sizeof(float));
        return;
    }
    float beta_in = dinp_accumulate ? 1.0f : 0.0f;   // 0: cuBLAS writes dinp without reading it
    if (mp_cuda_precision() == MP_PRECISION_BF16 && (dinp || dw)) {
        const uint16_t *db = bf16_operand(SCR_GEMM_A, dout, dout_bf16, N, OC);   // (N, OC)
        if (dinp) {
            const uint16_t *wb = bf16_operand(SCR_GEMM_B, w, w_bf16, OC, C);      // (OC, C)
            mp_cuda_gemm_bf16(0, 0, N, C, OC, 1.0f, db, OC, wb, C, beta_in, dinp, C);
        }
        if (dw) {
            const uint16_t *ib = bf16_operand(SCR_GEMM_B, inp, inp_bf16, N, C);   // (N, C)
            mp_cuda_gemm_bf16(1, 0, OC, C, N, 1.0f, db, OC, ib, C, 1.0f, dw, C);
        }
    } else if (dinp || dw) {
        fp32_operand(dout, "dout");
        if (dinp) mp_cuda_sgemm(0, 0, N, C, OC, 1.0f, dout, OC, w, C, beta_in, dinp, C);
        if (dw) {
            fp32_operand(inp, "inp");
            mp_cuda_sgemm(1, 0, OC, C, N, 1.0f, dout, OC, inp, C, 1.0f, dw, C);
        }
    }
    if (dbias) {
        fp32_operand(dout, "dout (for dbias)");
        mp_cuda_colsum_add(dbias, dout, N, OC);
    }
}

// ---------------------------------------------------------------------------------------
// GELU (exact), residual

static __global__ void gelu_forward_kernel(float *out, uint16_t *out_bf16, const float *inp,
                                           long n) {
    size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    if (i >= (size_t)n) return;
    float x = inp[i];
    float y = 0.5f * x * (1.0f + erff(x * INV_SQRT2));
    if (out) out[i] = y;
    if (out_bf16) out_bf16[i] = mp_float_to_bf16(y);
}

// d/dx [x Phi(x)] = Phi(x) + x phi(x), times dout
static __device__ __forceinline__ float gelu_grad(float x, float dout) {
    float cdf = 0.5f * (1.0f + erff(x * INV_SQRT2));
    float pdf = expf(-0.5f * x * x) * INV_SQRT_2PI;
    return (cdf + x * pdf) * dout;
}

static __global__ void gelu_backward_kernel(float *dinp, uint16_t *dinp_bf16, const float *inp,
                                            const float *dout, long n) {
    size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    if (i >= (size_t)n) return;
    float g = gelu_grad(inp[i], dout[i]);
    if (dinp) dinp[i] = g;
    if (dinp_bf16) dinp_bf16[i] = mp_float_to_bf16(g);
}

// ...with the bias gradient: one thread per column walks one block of rows_per rows (the row
// blocks of mp_cuda_colsum_add), writes dinp and its twin, and leaves the block's column sum
// in part (nblk, C), summed in row order as colsum's partial kernel sums dinp: the bits of
// matmul_backward's dbias, without reading dinp again. __fadd_rn: the sum must add the
// rounded g, as the partial kernel adds the stored one; a plain += may be contracted with
// g's product into an FMA, which never rounds it.
static __global__ void gelu_backward_cols_kernel(float *dinp, uint16_t *dinp_bf16, float *part,
                                                 const float *inp, const float *dout, int N,
                                                 int C, int rows_per) {
    int c = blockIdx.x * blockDim.x + threadIdx.x, blk = blockIdx.y;
    if (c >= C) return;
    int n0 = blk * rows_per, n1 = min(N, n0 + rows_per);
    float s = 0.0f;
    for (int n = n0; n < n1; n++) {
        size_t i = (size_t)n * C + c;
        float g = gelu_grad(inp[i], dout[i]);
        if (dinp) dinp[i] = g;
        if (dinp_bf16) dinp_bf16[i] = mp_float_to_bf16(g);
        s = __fadd_rn(s, g);
    }
    part[(size_t)blk * C + c] = s;
}

static __global__ void residual_kernel(float *out, const float *a, const float *b, long n) {
    size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    if (i < (size_t)n) out[i] = a[i] + b[i];
}

void mp_cuda_gelu_forward(float *out, uint16_t *out_bf16, const float *inp, long n) {
    if (n <= 0) return;
    gelu_forward_kernel<<<mp_blocks(n, 256), 256>>>(out, out_bf16, inp, n);
    KERNEL_CHECK();
}

void mp_cuda_gelu_backward(float *dinp, uint16_t *dinp_bf16, float *dbias, const float *inp,
                           const float *dout, int N, int C) {
    long n = (long)N * C;
    if (N <= 0 || C <= 0) return;
    if (!dbias) {
        gelu_backward_kernel<<<mp_blocks(n, 256), 256>>>(dinp, dinp_bf16, inp, dout, n);
        KERNEL_CHECK();
        return;
    }
    int rows_per = mp_rows_per_block(N, COLSUM_ROWS), nblk = (N + rows_per - 1) / rows_per;
    float *part = (float *)mp_cuda_scratch(SCR_COLSUM, (size_t)nblk * C * sizeof(float));
    gelu_backward_cols_kernel<<<dim3(mp_blocks(C, 128), nblk), 128>>>(dinp, dinp_bf16, part, inp,
                                                                      dout, N, C, rows_per);
    KERNEL_CHECK();
    mp_cuda_colsum_finish(dbias, part, nblk, C);
}

void mp_cuda_residual_forward(float *out, const float *a, const float *b, long n) {
    if (n <= 0) return;
    residual_kernel<<<mp_blocks(n, 256), 256>>>(out, a, b, n);
    KERNEL_CHECK();
}

// ---------------------------------------------------------------------------------------
// softmax cross-entropy: one block of CE_THREADS per row

#define CE_THREADS 256

// A softmax normaliser's running state (m, s): s = the sum of exp(x - m) over the entries
// seen, m the largest finite one (-inf: none yet; s is then 0, or NaN after a NaN entry).
// merge gives the state of the union; the sums are in double, as on the CPU, so the
// rescaling by exp(m_old - m_new) costs nothing that matters (the summands are floats). A
// NaN stays in s through every rescaling (NaN * 0 is NaN), so the loss comes out NaN.
__device__ __forceinline__ void ce_merge(float &m, double &s, float m2, double s2) {
    float mn = fmaxf(m, m2);
    if (mn == -INFINITY) {   // no finite entry on either side: 0, or a NaN kept
        s += s2;
        return;
    }
    s = s * exp((double)m - (double)mn) + s2 * exp((double)m2 - (double)mn);   // exp(-inf) = 0
    m = mn;
}

// one read of the row (an online max and sum of exponentials: a new largest entry rescales
// the sum so far) and no (N, V) write: the backward recomputes the probabilities from the
// row's (max, 1 / sum). The lanes' and warps' states merge in a fixed order. A NaN logit is
// never the max and makes the sum, and so the loss, NaN, as in the two-pass form.
static __global__ void crossentropy_forward_kernel(float *losses, float *stats,
                                                   const float *logits, const int32_t *targets,
                                                   int V) {
    __shared__ float smax[CE_THREADS / 32];
    __shared__ double ssum[CE_THREADS / 32];
    int n = blockIdx.x, tid = threadIdx.x, lane = tid % 32, wid = tid / 32;
    const float *x = logits + (size_t)n * V;
    float mx = -INFINITY;
    double s = 0.0;
    for (int v = tid; v < V; v += CE_THREADS) {
        float xv = x[v];
        if (xv > mx) {   // the sum so far, rescaled to the new max, and this entry's exp(0)
            s = s * exp((double)mx - (double)xv) + 1.0;   // the difference exact in double
            mx = xv;
        } else if (xv != -INFINITY) {   // -inf adds 0 (exp(-inf - -inf) would be NaN)
            s += expf(xv - mx);
        }
    }
    for (int o = 16; o > 0; o >>= 1) {
        float m2 = __shfl_xor_sync(0xffffffffu, mx, o);
        double s2 = __shfl_xor_sync(0xffffffffu, s, o);
        ce_merge(mx, s, m2, s2);
    }
    if (lane == 0) {
        smax[wid] = mx;
        ssum[wid] = s;
    }
    __syncthreads();
    if (tid == 0) {
        mx = smax[0];
        s = ssum[0];
        for (int w = 1; w < CE_THREADS / 32; w++) ce_merge(mx, s, smax[w], ssum[w]);
        stats[2 * (size_t)n] = mx;
        stats[2 * (size_t)n + 1] = (float)(1.0 / s);
        losses[n] = (float)(log(s) - (double)(x[targets[n]] - mx));
    }
}

// one block per row: a read of logits and a write of dlogits (fp32, or bf16 only: the LM
// head's GEMMs read nothing else, and then 2 of the 4 bytes per element are never written),
// no read-modify-write
static __global__ void crossentropy_backward_kernel(float *dlogits, uint16_t *dlogits_bf16,
                                                    const float *logits, const float *stats,
                                                    const int32_t *targets, float dloss, int V) {
    int n = blockIdx.x, tg = targets[n];
    const float *x = logits + (size_t)n * V;
    float *d = dlogits ? dlogits + (size_t)n * V : NULL;
    uint16_t *db = dlogits_bf16 ? dlogits_bf16 + (size_t)n * V : NULL;
    float mx = stats[2 * (size_t)n], inv = stats[2 * (size_t)n + 1];
    for (int v = threadIdx.x; v < V; v += CE_THREADS) {
        float g = dloss * (expf(x[v] - mx) * inv - (v == tg ? 1.0f : 0.0f));
        if (d) d[v] = g;
        if (db) db[v] = mp_float_to_bf16(g);
    }
}

void mp_cuda_crossentropy_forward(float *losses, float *stats, const float *logits,
                                  const int32_t *targets, int N, int V) {
    if (N <= 0) return;
    crossentropy_forward_kernel<<<N, CE_THREADS>>>(losses, stats, logits, targets, V);
    KERNEL_CHECK();
}

void mp_cuda_crossentropy_backward(float *dlogits, uint16_t *dlogits_bf16, const float *logits,
                                   const float *stats, const int32_t *targets, float dloss, int N,
                                   int V) {
    if (N <= 0) return;
    crossentropy_backward_kernel<<<N, CE_THREADS>>>(dlogits, dlogits_bf16, logits, stats, targets,
                                                    dloss, V);
    KERNEL_CHECK();
}
