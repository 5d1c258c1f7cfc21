// PEER / PKM experts on the GPU, where the expert rows live (the math and order of
// src/backend/cpu/retrieval_cpu.c). The tables are read as fp32, or as their bf16 copies
// (system.precision = bf16, which also rounds x and dy for the gradient sums); every sum is
// fp32.
//
// Forward and the input side of backward run one block per slot (received token): its x
// (or dy) row is staged in shared memory, one warp per record computes u_row . x (or
// dy . v_row), then every thread owns a set of columns and sums its records' rows in record
// order. The expert gradients run a persistent grid over (column block, row) items, the
// records sorted by row (a stable radix sort, sort.cu): each touched row of dU and dV is
// written once per batch (read too when a later micro-batch adds to it), its value a sum
// over its records in record order, without atomics, so gradients are bitwise repeatable.
// The step's first micro-batch overwrites instead of adding and zeroes the rows written
// before that it does not touch (mp_expert_tables.dirty), so no pass over the whole tables
// is needed. Table,
// x and dy rows are read 16 bytes at a time when C and the bases allow. Nothing of shape
// (tokens, H, k, d) is ever stored: per record only the pre-activation (forward) and its
// gradient (backward) are kept.
#include "backend/cuda/cuda.h"
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

// V consecutive elements at p as floats: V = 1, or 16-byte loads (4 floats, 8 bf16 whose
// element 2i is the low half of word i: little-endian)
template <int V>
__device__ __forceinline__ void load_vals(float *o, const float *p) {
    if (V == 1)
        o[0] = *p;
    else
        for (int k = 0; k < V; k += 4) {
            MP_CHECK_ALIGN16(p + k);
            float4 f = *(const float4 *)(p + k);
            o[k] = f.x; o[k + 1] = f.y; o[k + 2] = f.z; o[k + 3] = f.w;
        }
}
template <int V>
__device__ __forceinline__ void load_vals(float *o, const uint16_t *p) {
    if (V == 1)
        o[0] = mp_bf16_to_float(*p);
    else
        for (int k = 0; k < V; k += 8) {
            MP_CHECK_ALIGN16(p + k);
            uint4 u = *(const uint4 *)(p + k);
            unsigned w[4] = {u.x, u.y, u.z, u.w};
            for (int i = 0; i < 4; i++) {
                o[k + 2 * i] = __uint_as_float(w[i] << 16);
                o[k + 2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
            }
        }
}
// Streaming stores (st.global.cs, evict first): the gradient rows are written once and not
// read again in the pass, so they should not push the per-record x and dy rows out of L2
template <int V>
__device__ __forceinline__ void store_vals(float *p, const float *o) {
    if (V == 1)
        __stcs(p, o[0]);
    else
        for (int k = 0; k < V; k += 4) {
            MP_CHECK_ALIGN16(p + k);
            __stcs((float4 *)(p + k), make_float4(o[k], o[k + 1], o[k + 2], o[k + 3]));
        }
}

// y[m] = sum over the slot's records of w_i v_row, w_i = gate_i act(u_row . x[m]) (PEER) or
// gate_i (PKM); pre_i = u_row . x[m]. T: the tables' element type, float (fp32) or uint16_t
// (bf16 bits); sums in fp32 either way. W: table elements per 16-byte load (4 fp32, 8
// bf16), or 1 (scalar); y's sums do not depend on W, pre's order does (each lane's columns).
template <bool PEER, class T, int W>
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
                float s = 0.0f, a[W];
                for (int c = lane * W; c < C; c += 32 * W) {
                    load_vals<W>(a, u + c);
                    for (int k = 0; k < W; k++) s += a[k] * xs[c + k];
                }
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
        for (int c = tid * W; c < C; c += nthr * W) {
            float acc[W], a[W];
            for (int k = 0; k < W; k++) acc[k] = ys[c + k];
            for (int j = 0; j < cnt; j++) {
                load_vals<W>(a, V + (size_t)rs[j] * C + c);
                for (int k = 0; k < W; k++) acc[k] += ws[j] * a[k];
            }
            for (int k = 0; k < W; k++) ys[c + k] = acc[k];
        }
        __syncthreads();
    }
    for (int c = tid; c < C; c += nthr) y[m * C + c] = ys[c];
}

// 16-byte loads of table rows when every row starts 16-byte aligned: C a multiple of the
// elements per load and the tables' bases aligned (a table inside a group may not be)
template <class T>
static bool rows_vec(const T *U, const T *V, int C) {
    return C % (int)(16 / sizeof(T)) == 0 && mp_aligned(U, 16) && mp_aligned(V, 16);
}

// one launch per (kind, table type, load width); above 48 KiB of shared memory a kernel has
// to opt in
template <bool PEER, class T, int W>
static void forward_launch_w(float *y, const float *x, int64_t M, const int64_t *slot_start,
                             const int32_t *row, const float *gate, float *pre, const T *U,
                             const T *V, int C, int relu) {
    static size_t allowed;   // per instantiation
    size_t shb = shared_bytes(C);
    mp_cuda_allow_shared(experts_forward_kernel<PEER, T, W>, shb, &allowed);
    experts_forward_kernel<PEER, T, W><<<(unsigned)M, threads_for(C), shb>>>(
        y, x, slot_start, row, gate, pre, U, V, C, relu);
    KERNEL_CHECK();
}

template <bool PEER, class T>
static void forward_launch(float *y, const float *x, int64_t M, const int64_t *slot_start,
                           const int32_t *row, const float *gate, float *pre, const T *U,
                           const T *V, int C, int relu) {
    if (rows_vec(U, V, C))
        forward_launch_w<PEER, T, 16 / sizeof(T)>(y, x, M, slot_start, row, gate, pre, U, V, C,
                                                  relu);
    else
        forward_launch_w<PEER, T, 1>(y, x, M, slot_start, row, gate, pre, U, V, C, relu);
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
// dpre_i = gate_i dv_dot act'(pre_i); dx[m] = sum of dpre_i u_row (written; 0 for PKM).
// W as in the forward: dx's sums do not depend on it, dv_dot's order does.
template <bool PEER, class T, int W>
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
            float s = 0.0f, a[W];
            for (int c = lane * W; c < C; c += 32 * W) {
                load_vals<W>(a, v + c);
                for (int k = 0; k < W; k++) s += dys[c + k] * a[k];
            }
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
            for (int c = tid * W; c < C; c += nthr * W) {
                float acc[W], a[W];
                for (int k = 0; k < W; k++) acc[k] = dxs[c + k];
                for (int j = 0; j < cnt; j++) {
                    load_vals<W>(a, U + (size_t)rs[j] * C + c);
                    for (int k = 0; k < W; k++) acc[k] += ws[j] * a[k];
                }
                for (int k = 0; k < W; k++) dxs[c + k] = acc[k];
            }
        }
        __syncthreads();
    }
    for (int c = tid; c < C; c += nthr) dx[m * C + c] = dxs[c];
}

// The expert gradients, per row r of the table: dv_row (+)= sum of gate_i act(pre_i)
// dy[slot_i] and du_row (+)= sum of dpre_i x[slot_i] over the row's records in record order
// (idx, off from the sort; off NULL: no records). overwrite: the sums start from zero (0 + a
// == a, the bits of zeroing first) and a row without records that dirty marks is zeroed.
// A: the activations' element type; x and dy rows are read once per record (not once per
// token), so in bf16 mode they are read as bf16 copies.
//
// Work items are (column block, row) pairs, one per warp at a time: a block of WC = 32 V
// columns (each lane V consecutive ones, 16-byte loads when V > 1) of one row. A persistent
// grid takes them column block by column block (item = cb * rows + r), so that while it
// works through the rows, the x and dy rows it reads are those of one column block only:
// 16384 tokens x 256 bf16 columns x 2 = 16 MB at the paper's shape, which L2 keeps, where
// the whole rows (64 MB) did not (12 GB read from memory per backward, measured). Every
// element has one writer and its sum the same order whatever V and the grid: bitwise
// repeatable. ss_part (or NULL): the item's sum of squares after the update (the lane's
// columns in order, then warp butterflies), item-indexed; grad_rows_done folds it per row
// and updates dirty, after this kernel, which only reads dirty.
//
// A hot row, one with more than GRAD_SEG records (a router that sends most tokens to a few
// experts: at the paper's shape a collapsed row can get 131,072), would keep its warp busy
// long after the rest of the grid had finished. Its records are cut into segments of
// GRAD_SEG, the last taking the remainder (mp_cuda_plan_hot_keys): one warp per (column block, segment) sums its segment
// into a partial row (experts_grad_seg_kernel), then one per (column block, hot row) adds
// the partials in segment order (experts_grad_hot_kernel). Another fixed order, so still
// repeatable; a row with at most GRAD_SEG records keeps the one sum in record order.
#define GRAD_WARPS 8
#define GRAD_SEG MP_CUDA_GRAD_SEG   // cuda.h

// One lane's share of one column block: av (+)= sum over records [p0, p1) of g_i dy[slot_i]
// (g_i = gate_i act(pre_i), or gate_i for PKM), au (+)= sum of dpre_i x[slot_i], in record
// order. gs, ds, ms: the warp's shared staging for EXP_CHUNK records' scalars. has: whether
// the lane's columns exist (c < C); every lane stages, only those with columns sum.
template <bool PEER, class A, int V>
__device__ __forceinline__ void grad_sum_records(float *av, float *au, int p0, int p1, int c,
                                                 bool has, float *gs, float *ds, int32_t *ms,
                                                 const int32_t *idx, const int32_t *slot,
                                                 const float *gate, const float *pre,
                                                 const float *dpre, const A *x, const A *dy,
                                                 int C, int relu) {
    int lane = threadIdx.x % 32;
    for (int base = p0; base < p1; base += EXP_CHUNK) {
        int cnt = min(EXP_CHUNK, p1 - base);
        __syncwarp();   // the previous chunk's scalars are read
        for (int j = lane; j < cnt; j += 32) {
            int i = idx[base + j];
            ms[j] = slot[i];
            gs[j] = PEER ? gate[i] * mp_act_fwd(relu, pre[i]) : gate[i];
            ds[j] = PEER ? dpre[i] : 0.0f;
        }
        __syncwarp();
        if (!has) continue;
        float a[V];
        for (int j = 0; j < cnt; j++) {
            load_vals<V>(a, dy + (size_t)ms[j] * C + c);
            for (int k = 0; k < V; k++) av[k] += gs[j] * a[k];
        }
        if (PEER)
            for (int j = 0; j < cnt; j++) {
                load_vals<V>(a, x + (size_t)ms[j] * C + c);
                for (int k = 0; k < V; k++) au[k] += ds[j] * a[k];
            }
    }
}

// the row's new values stored, and the warp's sum of squares of them into ss_part[it]
template <bool PEER, int V>
__device__ __forceinline__ void grad_store_row(float *dur, float *dvr, const float *au,
                                               const float *av, int c, bool has,
                                               double *ss_part, int64_t it) {
    double ss = 0.0;
    if (has) {
        store_vals<V>(dvr + c, av);
        if (PEER) store_vals<V>(dur + c, au);
        for (int k = 0; k < V; k++) ss += (double)au[k] * au[k] + (double)av[k] * av[k];
    }
    ss = mp_warp_sum_d(ss);
    if (threadIdx.x % 32 == 0 && ss_part) ss_part[it] = ss;
}

template <bool PEER, class A, int V>
static __global__ void __launch_bounds__(32 * GRAD_WARPS)
experts_grad_kernel(float *du, float *dv, const uint8_t *dirty, double *ss_part,
                    const int32_t *idx, const int32_t *off, const int32_t *slot,
                    const float *gate, const float *pre, const float *dpre, const A *x,
                    const A *dy, int64_t rows, int C, int relu, int overwrite) {
    __shared__ float gs[GRAD_WARPS][EXP_CHUNK], ds[GRAD_WARPS][EXP_CHUNK];
    __shared__ int32_t ms[GRAD_WARPS][EXP_CHUNK];
    constexpr int WC = 32 * V;
    int w = threadIdx.x / 32, lane = threadIdx.x % 32, nblk = (C + WC - 1) / WC;
    int64_t items = rows * nblk, stride = (int64_t)gridDim.x * GRAD_WARPS;
    for (int64_t it = (int64_t)blockIdx.x * GRAD_WARPS + w; it < items; it += stride) {
        int64_t r = it % rows;
        int c = (int)(it / rows) * WC + lane * V;   // this lane's first column
        bool has = c < C;   // V > 1 only when V divides C: then c < C means c + V <= C
        int p0 = off ? off[r] : 0, p1 = off ? off[r + 1] : 0;
        if (p1 - p0 > GRAD_SEG) continue;   // a hot row: the segment kernels' (below)
        float *dvr = dv + (size_t)r * C, *dur = PEER ? du + (size_t)r * C : NULL;
        float av[V], au[V];
        for (int k = 0; k < V; k++) av[k] = au[k] = 0.0f;
        if (p0 == p1) {   // no record: kept, or in overwrite mode zeroed if written before
            if (overwrite && dirty[r] && has) {
                store_vals<V>(dvr + c, av);
                if (PEER) store_vals<V>(dur + c, au);
            }
            continue;
        }
        if (!overwrite && has) {
            load_vals<V>(av, dvr + c);
            if (PEER) load_vals<V>(au, dur + c);
        }
        grad_sum_records<PEER, A, V>(av, au, p0, p1, c, has, gs[w], ds[w], ms[w], idx, slot,
                                     gate, pre, dpre, x, dy, C, relu);
        grad_store_row<PEER, V>(dur, dvr, au, av, c, has, ss_part, it);
    }
}

// Per (column block, segment): the segment's sums from zero into its partial rows
// (pu, pv: (segments, C); pu unused for PKM), item = cb * segments + segment.
template <bool PEER, class A, int V>
static __global__ void __launch_bounds__(32 * GRAD_WARPS)
experts_grad_seg_kernel(float *pu, float *pv, mp_hot_keys hot, const int32_t *idx,
                        const int32_t *slot, const float *gate, const float *pre,
                        const float *dpre, const A *x, const A *dy, int C, int relu) {
    __shared__ float gs[GRAD_WARPS][EXP_CHUNK], ds[GRAD_WARPS][EXP_CHUNK];
    __shared__ int32_t ms[GRAD_WARPS][EXP_CHUNK];
    constexpr int WC = 32 * V;
    int w = threadIdx.x / 32, lane = threadIdx.x % 32, nblk = (C + WC - 1) / WC;
    int64_t segs = hot.count[1], items = segs * nblk, stride = (int64_t)gridDim.x * GRAD_WARPS;
    for (int64_t it = (int64_t)blockIdx.x * GRAD_WARPS + w; it < items; it += stride) {
        int64_t s = it % segs;
        int c = (int)(it / segs) * WC + lane * V;
        bool has = c < C;
        int p0 = hot.seg_begin[s], p1 = hot.seg_end[s];
        float av[V], au[V];
        for (int k = 0; k < V; k++) av[k] = au[k] = 0.0f;
        grad_sum_records<PEER, A, V>(av, au, p0, p1, c, has, gs[w], ds[w], ms[w], idx, slot,
                                     gate, pre, dpre, x, dy, C, relu);
        if (!has) continue;
        store_vals<V>(pv + (size_t)s * C + c, av);   // plain stores: read back soon, from L2
        if (PEER) store_vals<V>(pu + (size_t)s * C + c, au);
    }
}

// Per (column block, hot row): the row's value (0 in overwrite mode) plus its partials in
// segment order, stored, with its sum of squares at the main kernel's item index.
template <bool PEER, int V>
static __global__ void __launch_bounds__(32 * GRAD_WARPS)
experts_grad_hot_kernel(float *du, float *dv, double *ss_part, const float *pu, const float *pv,
                        mp_hot_keys hot, int64_t rows, int C, int overwrite) {
    constexpr int WC = 32 * V;
    int w = threadIdx.x / 32, lane = threadIdx.x % 32, nblk = (C + WC - 1) / WC;
    int64_t nhot = hot.count[0], items = nhot * nblk, stride = (int64_t)gridDim.x * GRAD_WARPS;
    for (int64_t it = (int64_t)blockIdx.x * GRAD_WARPS + w; it < items; it += stride) {
        int64_t h = it % nhot, cb = it / nhot;
        int c = (int)cb * WC + lane * V;
        bool has = c < C;
        int64_t r = hot.key[h];
        float *dvr = dv + (size_t)r * C, *dur = PEER ? du + (size_t)r * C : NULL;
        float av[V], au[V], a[V];
        for (int k = 0; k < V; k++) av[k] = au[k] = 0.0f;
        if (has) {
            if (!overwrite) {
                load_vals<V>(av, dvr + c);
                if (PEER) load_vals<V>(au, dur + c);
            }
            for (int s = hot.first[h], e = s + hot.nseg[h]; s < e; s++) {
                load_vals<V>(a, pv + (size_t)s * C + c);
                for (int k = 0; k < V; k++) av[k] += a[k];
                if (PEER) {
                    load_vals<V>(a, pu + (size_t)s * C + c);
                    for (int k = 0; k < V; k++) au[k] += a[k];
                }
            }
        }
        grad_store_row<PEER, V>(dur, dvr, au, av, c, has, ss_part, cb * rows + r);
    }
}

// After experts_grad_kernel and the hot rows' kernels, per row: row_ss (or NULL) = the row's item sums in column-block
// order for a row with records, 0 for a row the overwrite pass left zero, kept otherwise; and
// dirty = whether the row may be nonzero now.
static __global__ void grad_rows_done_kernel(uint8_t *dirty, double *row_ss, const double *ss_part,
                                             const int32_t *off, int64_t rows, int nblk,
                                             int overwrite) {
    int64_t r = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
    if (r >= rows) return;
    if (off && off[r + 1] > off[r]) {
        if (row_ss) {
            double t = 0.0;
            for (int cb = 0; cb < nblk; cb++) t += ss_part[(size_t)cb * rows + r];
            row_ss[r] = t;
        }
        dirty[r] = 1;
    } else if (overwrite) {
        if (row_ss) row_ss[r] = 0.0;
        dirty[r] = 0;
    }
}

template <bool PEER, class T, int W>
static void dx_launch_w(float *dx, float *dgate, float *dpre, const float *dy, int64_t M,
                        const int64_t *slot_start, const int32_t *row, const float *gate,
                        const float *pre, const T *U, const T *V, int C, int relu) {
    static size_t allowed;   // per instantiation
    size_t shb = shared_bytes(C);
    mp_cuda_allow_shared(experts_dx_kernel<PEER, T, W>, shb, &allowed);
    experts_dx_kernel<PEER, T, W><<<(unsigned)M, threads_for(C), shb>>>(
        dx, dgate, dpre, dy, slot_start, row, gate, pre, U, V, C, relu);
    KERNEL_CHECK();
}

template <bool PEER, class T>
static void dx_launch(float *dx, float *dgate, float *dpre, const float *dy, int64_t M,
                      const int64_t *slot_start, const int32_t *row, const float *gate,
                      const float *pre, const T *U, const T *V, int C, int relu) {
    if (rows_vec(U, V, C))
        dx_launch_w<PEER, T, 16 / sizeof(T)>(dx, dgate, dpre, dy, M, slot_start, row, gate, pre,
                                             U, V, C, relu);
    else
        dx_launch_w<PEER, T, 1>(dx, dgate, dpre, dy, M, slot_start, row, gate, pre, U, V, C,
                                relu);
}

// A few blocks per SM, each looping over (column block, row) items: 1M rows take no
// 1M-block launch.
static unsigned grad_blocks(int64_t items) {
    static int sms;
    if (!sms) {
        int dev;
        cudaDeviceProp prop;
        CUDA_CHECK(cudaGetDevice(&dev));
        CUDA_CHECK(cudaGetDeviceProperties(&prop, dev));
        sms = prop.multiProcessorCount;
    }
    int64_t want = (int64_t)sms * 8, need = (items + GRAD_WARPS - 1) / GRAD_WARPS;
    return (unsigned)(need < want ? need : want);
}

// The hot rows' passes (above experts_grad_kernel), after it; the kernels read the actual
// counts from the plan, the grids are sized by its bounds.
template <class A, int V>
static void grad_hot_launch(const mp_expert_tables *t, int peer, const int32_t *idx,
                            const int32_t *off, const int32_t *slot, const float *gate,
                            const float *pre, const float *dpre, const A *x, const A *dy,
                            int64_t R, int C, int relu, int overwrite, double *ss_part) {
    int nblk = (C + 32 * V - 1) / (32 * V);
    mp_hot_keys hot = mp_cuda_plan_hot_keys(off, t->rows, R, GRAD_SEG);
    float *pv = (float *)mp_cuda_scratch(SCR_HOT_PART,
                                         (size_t)hot.max_seg * C * (peer ? 2 : 1) * sizeof(float));
    float *pu = peer ? pv + (size_t)hot.max_seg * C : NULL;   // (max_seg, C) each
    unsigned nb = grad_blocks(hot.max_seg * nblk);
    if (peer)
        experts_grad_seg_kernel<true, A, V><<<nb, 32 * GRAD_WARPS>>>(
            pu, pv, hot, idx, slot, gate, pre, dpre, x, dy, C, relu);
    else
        experts_grad_seg_kernel<false, A, V><<<nb, 32 * GRAD_WARPS>>>(
            NULL, pv, hot, idx, slot, gate, pre, dpre, x, dy, C, relu);
    KERNEL_CHECK();
    nb = grad_blocks(hot.max_seg * nblk);   // hot rows: no more than segments
    if (peer)
        experts_grad_hot_kernel<true, V><<<nb, 32 * GRAD_WARPS>>>(t->du, t->dv, ss_part, pu, pv,
                                                                  hot, t->rows, C, overwrite);
    else
        experts_grad_hot_kernel<false, V><<<nb, 32 * GRAD_WARPS>>>(NULL, t->dv, ss_part, NULL, pv,
                                                                   hot, t->rows, C, overwrite);
    KERNEL_CHECK();
}

template <class A, int V>
static void grad_launch(const mp_expert_tables *t, int peer, const int32_t *idx,
                        const int32_t *off, const int32_t *slot, const float *gate,
                        const float *pre, const float *dpre, const A *x, const A *dy, int64_t R,
                        int C, int relu, int overwrite, double *row_ss) {
    int nblk = (C + 32 * V - 1) / (32 * V);
    int64_t items = t->rows * nblk;
    double *ss_part = row_ss ? (double *)mp_cuda_scratch(SCR_ROW_SS, (size_t)items * sizeof(double))
                             : NULL;   // (nblk, rows)
    unsigned nb = grad_blocks(items);
    if (peer)
        experts_grad_kernel<true, A, V><<<nb, 32 * GRAD_WARPS>>>(
            t->du, t->dv, t->dirty, ss_part, idx, off, slot, gate, pre, dpre, x, dy, t->rows, C,
            relu, overwrite);
    else
        experts_grad_kernel<false, A, V><<<nb, 32 * GRAD_WARPS>>>(
            NULL, t->dv, t->dirty, ss_part, idx, off, slot, gate, pre, dpre, x, dy, t->rows, C,
            relu, overwrite);
    KERNEL_CHECK();
    if (off && R > GRAD_SEG)   // else no row can be hot
        grad_hot_launch<A, V>(t, peer, idx, off, slot, gate, pre, dpre, x, dy, R, C, relu,
                              overwrite, ss_part);
    grad_rows_done_kernel<<<mp_blocks((size_t)t->rows, 256), 256>>>(t->dirty, row_ss, ss_part, off,
                                                                    t->rows, nblk, overwrite);
    KERNEL_CHECK();
}

// 16-byte loads when every row starts 16-byte aligned: C a multiple of the vector width and
// the bases aligned (cudaMalloc's are; a pointer into a buffer may not be); else scalar
template <class A>
static void grad_launch_any(const mp_expert_tables *t, int peer, const int32_t *idx,
                            const int32_t *off, const int32_t *slot, const float *gate,
                            const float *pre, const float *dpre, const A *x, const A *dy,
                            int64_t R, int C, int relu, int overwrite, double *row_ss) {
    const int V = 16 / sizeof(A);   // 4 floats, 8 bf16
    bool vec = C % V == 0 && mp_aligned(dy, 16) && mp_aligned(t->dv, 16) &&
               (!peer || (mp_aligned(x, 16) && mp_aligned(t->du, 16)));
    if (vec)
        grad_launch<A, 16 / sizeof(A)>(t, peer, idx, off, slot, gate, pre, dpre, x, dy, R, C,
                                       relu, overwrite, row_ss);
    else
        grad_launch<A, 1>(t, peer, idx, off, slot, gate, pre, dpre, x, dy, R, C, relu, overwrite,
                          row_ss);
}

void mp_cuda_experts_backward(const mp_expert_tables *t, float *dx, float *dgate, const float *dy,
                              const float *x, int64_t M, const int64_t *slot_start,
                              const int32_t *slot, const int32_t *row, const float *gate,
                              const float *pre, int64_t R, int C, int relu, int overwrite,
                              double *row_ss) {
    int peer = t->u != NULL;   // PKM: values only
    check_width(C);
    float *dpre = (float *)mp_cuda_scratch(SCR_DPRE, (size_t)(R ? R : 1) * sizeof(float));   // (R)
    if (M > 0) {
        if (peer && t->v_bf16)
            dx_launch<true>(dx, dgate, dpre, dy, M, slot_start, row, gate, pre, t->u_bf16,
                            t->v_bf16, C, relu);
        else if (peer)
            dx_launch<true>(dx, dgate, dpre, dy, M, slot_start, row, gate, pre, t->u, t->v, C,
                            relu);
        else if (t->v_bf16)
            dx_launch<false>(dx, dgate, dpre, dy, M, slot_start, row, gate, pre,
                             (const uint16_t *)NULL, t->v_bf16, C, relu);
        else
            dx_launch<false>(dx, dgate, dpre, dy, M, slot_start, row, gate, pre,
                             (const float *)NULL, t->v, C, relu);
    }
    // no records: nothing to add, but the step's first backward still zeroes dirty rows
    if (t->rows <= 0 || (R <= 0 && !overwrite)) return;
    const int32_t *idx = NULL, *off = NULL;
    if (R > 0) mp_cuda_sort_by_key(row, R, t->rows, &idx, NULL, &off);
    if (t->v_bf16) {   // bf16 mode: x and dy rounded once, then read once per record
        size_t MC = (size_t)M * C;
        uint16_t *xb = (uint16_t *)mp_cuda_scratch(SCR_XB, (MC ? MC : 1) * sizeof(uint16_t));   // (M, C)
        uint16_t *dyb = (uint16_t *)mp_cuda_scratch(SCR_DYB, (MC ? MC : 1) * sizeof(uint16_t)); // (M, C)
        if (peer && MC) mp_cuda_to_bf16(xb, x, MC);
        if (MC) mp_cuda_to_bf16(dyb, dy, MC);
        grad_launch_any<uint16_t>(t, peer, idx, off, slot, gate, pre, dpre, xb, dyb, R, C,
                                  relu, overwrite, row_ss);
    } else {
        grad_launch_any<float>(t, peer, idx, off, slot, gate, pre, dpre, x, dy, R, C, relu,
                               overwrite, row_ss);
    }
}
