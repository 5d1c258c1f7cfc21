// PEER / PKM experts on the GPU, where the expert rows live (the math and order of
// src/backend/cpu/retrieval_cpu.c). The tables are read as fp32, or as their bf16 copies
// (system.precision = bf16, which also rounds x and dy for the gradient sums); every sum is
// fp32.
//
// Forward and the input side of backward run one block per slot (received token): its x
// (or dy) row is staged in shared memory, one warp per record computes u_row . x (or
// dy . v_row), then every thread owns a set of columns and sums its records' rows in record
// order. The expert gradients run one block per expert row over the records sorted by row
// (a stable radix sort, sort.cu): each touched row of dU and dV is read and written once per
// batch, its value a sum over its records in record order, without atomics, so gradients are
// bitwise repeatable. Nothing of shape (tokens, H, k, d) is ever stored: per record only the
// pre-activation (forward) and its gradient (backward) are kept.
#include "backend/cuda/cuda_common.h"

#define EXP_THREADS 256
#define EXP_CHUNK 64   // records whose scalars are staged in shared memory at once
#define EXP_MAX_C 8192 // x, y rows in shared memory: 2 * 8192 floats = 64 KiB

static int threads_for(int C) { return C < EXP_THREADS ? 32 * ((C + 31) / 32) : EXP_THREADS; }

static size_t shared_bytes(int C) {
    return (size_t)2 * C * sizeof(float) + EXP_CHUNK * (sizeof(float) + sizeof(int32_t));
}

static void check_width(int C) {
    if (C > EXP_MAX_C) mp_fatal("CUDA experts support d_model <= %d, got %d", EXP_MAX_C, C);
}

// y[m] = sum over the slot's records of w_i v_row, w_i = gate_i act(u_row . x[m]) (PEER) or
// gate_i (PKM); pre_i = u_row . x[m]. T: the tables' element type, float (fp32) or uint16_t
// (bf16 bits); sums in fp32 either way.
template <bool PEER, class T>
static __global__ void experts_forward_kernel(float *y, const float *x, const int64_t *slot_start,
                                              const int32_t *row, const float *gate, float *pre,
                                              const T *U, const T *V, int C, int relu) {
    extern __shared__ float sh[];
    float *xs = sh, *ys = sh + C, *ws = sh + 2 * C;   // (C), (C), (EXP_CHUNK)
    int32_t *rs = (int32_t *)(ws + EXP_CHUNK);         // (EXP_CHUNK)
    int64_t m = blockIdx.x;
    int tid = threadIdx.x, nthr = blockDim.x, lane = tid % 32, wid = tid / 32, nw = nthr / 32;
    for (int c = tid; c < C; c += nthr) {
        xs[c] = x[m * C + c];
        ys[c] = 0.0f;
    }
    int64_t r0 = slot_start[m], r1 = slot_start[m + 1];
    __syncthreads();
    for (int64_t base = r0; base < r1; base += EXP_CHUNK) {
        int cnt = (int)min((int64_t)EXP_CHUNK, r1 - base);
        if (PEER) {
            for (int j = wid; j < cnt; j += nw) {
                int64_t i = base + j;
                const T *u = U + (size_t)row[i] * C;
                float s = 0.0f;
                for (int c = lane; c < C; c += 32) s += mp_table_load(u + c) * xs[c];
                s = mp_warp_sum(s);
                if (lane == 0) {
                    pre[i] = s;
                    ws[j] = gate[i] * mp_act_fwd(relu, s);
                    rs[j] = row[i];
                }
            }
        } else {
            for (int j = tid; j < cnt; j += nthr) {
                ws[j] = gate[base + j];
                rs[j] = row[base + j];
            }
        }
        __syncthreads();
        for (int c = tid; c < C; c += nthr) {
            float acc = ys[c];
            for (int j = 0; j < cnt; j++) acc += ws[j] * mp_table_load(V + (size_t)rs[j] * C + c);
            ys[c] = acc;
        }
        __syncthreads();
    }
    for (int c = tid; c < C; c += nthr) y[m * C + c] = ys[c];
}

// one launch per (kind, table type); above 48 KiB of shared memory a kernel has to opt in
template <bool PEER, class T>
static void forward_launch(float *y, const float *x, int64_t M, const int64_t *slot_start,
                           const int32_t *row, const float *gate, float *pre, const T *U,
                           const T *V, int C, int relu) {
    size_t shb = shared_bytes(C);
    CUDA_CHECK(cudaFuncSetAttribute(experts_forward_kernel<PEER, T>,
                                    cudaFuncAttributeMaxDynamicSharedMemorySize, (int)shb));
    experts_forward_kernel<PEER, T><<<(unsigned)M, threads_for(C), shb>>>(
        y, x, slot_start, row, gate, pre, U, V, C, relu);
    KERNEL_CHECK();
}

void mp_cuda_experts_forward(const mp_expert_tables *t, float *y, const float *x, int64_t M,
                             const int64_t *slot_start, const int32_t *slot, const int32_t *row,
                             const float *gate, float *pre, int64_t R, int C, int relu) {
    (void)slot;
    (void)R;
    if (M <= 0) return;
    check_width(C);
    int peer = t->u != NULL;   // PKM: values only
    if (peer && t->v_bf16)
        forward_launch<true>(y, x, M, slot_start, row, gate, pre, t->u_bf16, t->v_bf16, C, relu);
    else if (peer)
        forward_launch<true>(y, x, M, slot_start, row, gate, pre, t->u, t->v, C, relu);
    else if (t->v_bf16)
        forward_launch<false>(y, x, M, slot_start, row, gate, pre, (const uint16_t *)NULL,
                              t->v_bf16, C, relu);
    else
        forward_launch<false>(y, x, M, slot_start, row, gate, pre, (const float *)NULL, t->v, C,
                              relu);
}

// Per slot: dv_dot_i = dy[m] . v_row; dgate_i = act(pre_i) dv_dot (PEER) or dv_dot (PKM);
// dpre_i = gate_i dv_dot act'(pre_i); dx[m] = sum of dpre_i u_row (written; 0 for PKM)
template <bool PEER, class T>
static __global__ void experts_dx_kernel(float *dx, float *dgate, float *dpre, const float *dy,
                                         const int64_t *slot_start, const int32_t *row,
                                         const float *gate, const float *pre, const T *U,
                                         const T *V, int C, int relu) {
    extern __shared__ float sh[];
    float *dys = sh, *dxs = sh + C, *ws = sh + 2 * C;
    int32_t *rs = (int32_t *)(ws + EXP_CHUNK);
    int64_t m = blockIdx.x;
    int tid = threadIdx.x, nthr = blockDim.x, lane = tid % 32, wid = tid / 32, nw = nthr / 32;
    for (int c = tid; c < C; c += nthr) {
        dys[c] = dy[m * C + c];
        dxs[c] = 0.0f;
    }
    int64_t r0 = slot_start[m], r1 = slot_start[m + 1];
    __syncthreads();
    for (int64_t base = r0; base < r1; base += EXP_CHUNK) {
        int cnt = (int)min((int64_t)EXP_CHUNK, r1 - base);
        for (int j = wid; j < cnt; j += nw) {
            int64_t i = base + j;
            const T *v = V + (size_t)row[i] * C;
            float s = 0.0f;
            for (int c = lane; c < C; c += 32) s += dys[c] * mp_table_load(v + c);
            s = mp_warp_sum(s);
            if (lane == 0) {
                if (PEER) {
                    float h = pre[i];
                    float dp = gate[i] * s * mp_act_grad(relu, h);
                    dgate[i] = mp_act_fwd(relu, h) * s;
                    dpre[i] = dp;
                    ws[j] = dp;
                    rs[j] = row[i];
                } else {
                    dgate[i] = s;
                }
            }
        }
        __syncthreads();
        if (PEER) {
            for (int c = tid; c < C; c += nthr) {
                float acc = dxs[c];
                for (int j = 0; j < cnt; j++) acc += ws[j] * mp_table_load(U + (size_t)rs[j] * C + c);
                dxs[c] = acc;
            }
        }
        __syncthreads();
    }
    for (int c = tid; c < C; c += nthr) dx[m * C + c] = dxs[c];
}

// One block per expert row: dv_row += sum of gate_i act(pre_i) dy[slot_i] and du_row +=
// sum of dpre_i x[slot_i] over the row's records in record order (idx, off from the sort).
// A: the activations' element type. Here x and dy rows are read once per record (not once
// per token), so in bf16 mode they are read as bf16 copies.
template <bool PEER, class A>
static __global__ void experts_grad_kernel(float *du, float *dv, const int32_t *idx,
                                           const int32_t *off, const int32_t *slot,
                                           const float *gate, const float *pre,
                                           const float *dpre, const A *x, const A *dy,
                                           int C, int relu) {
    __shared__ float gs[EXP_CHUNK], ds[EXP_CHUNK];
    __shared__ int32_t ms[EXP_CHUNK];
    int64_t r = blockIdx.x;
    int p0 = off[r], p1 = off[r + 1];
    if (p0 == p1) return;   // untouched row: no read, no write
    int tid = threadIdx.x, nthr = blockDim.x;
    float *dvr = dv + r * C, *dur = PEER ? du + r * C : NULL;
    for (int base = p0; base < p1; base += EXP_CHUNK) {
        int cnt = min(EXP_CHUNK, p1 - base);
        for (int j = tid; j < cnt; j += nthr) {
            int i = idx[base + j];
            ms[j] = slot[i];
            gs[j] = PEER ? gate[i] * mp_act_fwd(relu, pre[i]) : gate[i];
            ds[j] = PEER ? dpre[i] : 0.0f;
        }
        __syncthreads();
        for (int c = tid; c < C; c += nthr) {
            float av = dvr[c];
            for (int j = 0; j < cnt; j++) av += gs[j] * mp_table_load(dy + (size_t)ms[j] * C + c);
            dvr[c] = av;
            if (PEER) {
                float au = dur[c];
                for (int j = 0; j < cnt; j++) au += ds[j] * mp_table_load(x + (size_t)ms[j] * C + c);
                dur[c] = au;
            }
        }
        __syncthreads();
    }
}

template <bool PEER, class T>
static void dx_launch(float *dx, float *dgate, float *dpre, const float *dy, int64_t M,
                      const int64_t *slot_start, const int32_t *row, const float *gate,
                      const float *pre, const T *U, const T *V, int C, int relu) {
    size_t shb = shared_bytes(C);
    CUDA_CHECK(cudaFuncSetAttribute(experts_dx_kernel<PEER, T>,
                                    cudaFuncAttributeMaxDynamicSharedMemorySize, (int)shb));
    experts_dx_kernel<PEER, T><<<(unsigned)M, threads_for(C), shb>>>(
        dx, dgate, dpre, dy, slot_start, row, gate, pre, U, V, C, relu);
    KERNEL_CHECK();
}

template <class A>
static void grad_launch(const mp_expert_tables *t, int peer, const int32_t *idx,
                        const int32_t *off, const int32_t *slot, const float *gate,
                        const float *pre, const float *dpre, const A *x, const A *dy, int C,
                        int relu) {
    if (peer)
        experts_grad_kernel<true, A><<<(unsigned)t->rows, threads_for(C)>>>(
            t->du, t->dv, idx, off, slot, gate, pre, dpre, x, dy, C, relu);
    else
        experts_grad_kernel<false, A><<<(unsigned)t->rows, threads_for(C)>>>(
            NULL, t->dv, idx, off, slot, gate, pre, dpre, x, dy, C, relu);
    KERNEL_CHECK();
}

void mp_cuda_experts_backward(const mp_expert_tables *t, float *dx, float *dgate, const float *dy,
                              const float *x, int64_t M, const int64_t *slot_start,
                              const int32_t *slot, const int32_t *row, const float *gate,
                              const float *pre, int64_t R, int C, int relu) {
    int peer = t->u != NULL;   // PKM: values only
    if (M <= 0) return;
    check_width(C);
    float *dpre = (float *)mp_cuda_scratch(SCR_DPRE, (size_t)(R ? R : 1) * sizeof(float));   // (R)
    if (peer && t->v_bf16)
        dx_launch<true>(dx, dgate, dpre, dy, M, slot_start, row, gate, pre, t->u_bf16, t->v_bf16,
                        C, relu);
    else if (peer)
        dx_launch<true>(dx, dgate, dpre, dy, M, slot_start, row, gate, pre, t->u, t->v, C, relu);
    else if (t->v_bf16)
        dx_launch<false>(dx, dgate, dpre, dy, M, slot_start, row, gate, pre,
                         (const uint16_t *)NULL, t->v_bf16, C, relu);
    else
        dx_launch<false>(dx, dgate, dpre, dy, M, slot_start, row, gate, pre, (const float *)NULL,
                         t->v, C, relu);
    if (R <= 0 || t->rows <= 0) return;
    const int32_t *idx, *off;
    mp_cuda_sort_by_key(row, R, t->rows, &idx, NULL, &off);
    if (t->v_bf16) {   // bf16 mode: x and dy rounded once, then read once per record
        size_t MC = (size_t)M * C;
        uint16_t *xb = (uint16_t *)mp_cuda_scratch(SCR_XB, MC * sizeof(uint16_t));   // (M, C)
        uint16_t *dyb = (uint16_t *)mp_cuda_scratch(SCR_DYB, MC * sizeof(uint16_t)); // (M, C)
        if (peer) mp_cuda_to_bf16(xb, x, MC);
        mp_cuda_to_bf16(dyb, dy, MC);
        grad_launch<uint16_t>(t, peer, idx, off, slot, gate, pre, dpre, xb, dyb, C, relu);
    } else {
        grad_launch<float>(t, peer, idx, off, slot, gate, pre, dpre, x, dy, C, relu);
    }
}
