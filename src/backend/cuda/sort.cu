// Stable sort of records by key (CUB's LSD radix sort, stable by construction), the basis
// of every deterministic gradient that sums scattered contributions: expert rows (dU, dV),
// sub-keys (dK1, dK2) and token embeddings (dwte). After the sort each key's records are
// contiguous and in their original order, so one thread per output element sums them in a
// fixed order, without atomics; where one key holds too many of them, its segments are
// summed apart (mp_cuda_plan_hot_keys). The only CUB user, to keep compile times down.
#include <cub/device/device_radix_sort.cuh>
#include "backend/cuda/cuda_common.h"

static __global__ void iota_kernel(int32_t *v, int64_t n) {
    size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    if (i < (size_t)n) v[i] = (int32_t)i;
}

// off[k] = the first position p with skey[p] >= k (k = 0..nkeys)
static __global__ void lower_bound_kernel(int32_t *off, const uint32_t *skey, int64_t R,
                                          int64_t nkeys) {
    size_t k = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    if (k > (size_t)nkeys) return;
    int64_t lo = 0, hi = R;
    while (lo < hi) {
        int64_t mid = (lo + hi) / 2;
        if (skey[mid] < (uint32_t)k) lo = mid + 1;
        else hi = mid;
    }
    off[k] = (int32_t)lo;
}

void mp_cuda_sort_by_key(const int32_t *key, int64_t R, int64_t key_bound, const int32_t **idx,
                         const int32_t **skey, const int32_t **off) {
    if (R >= INT32_MAX) mp_fatal("sort of %lld records: more than int32 can index", (long long)R);
    size_t n = (size_t)(R ? R : 1);
    uint32_t *keys_out = (uint32_t *)mp_cuda_scratch(SCR_SORT_KEYS, n * sizeof(uint32_t));
    int32_t *vals_in = (int32_t *)mp_cuda_scratch(SCR_SORT_VALS, n * sizeof(int32_t));
    int32_t *vals_out = (int32_t *)mp_cuda_scratch(SCR_SORT_IDX, n * sizeof(int32_t));
    // keys are non-negative, so their bits sort as unsigned; only the bits a key can use
    int end_bit = 31;
    if (key_bound > 0) {
        end_bit = 1;
        while (end_bit < 31 && ((int64_t)1 << end_bit) < key_bound) end_bit++;
    }
    if (R > 0) {
        iota_kernel<<<mp_blocks(R, 256), 256>>>(vals_in, R);
        KERNEL_CHECK();
        size_t tmp_bytes = 0;
        CUDA_CHECK(cub::DeviceRadixSort::SortPairs(NULL, tmp_bytes, (const uint32_t *)key, keys_out,
                                                   vals_in, vals_out, (int)R, 0, end_bit));
        void *tmp = mp_cuda_scratch(SCR_SORT_TMP, tmp_bytes ? tmp_bytes : 1);
        CUDA_CHECK(cub::DeviceRadixSort::SortPairs(tmp, tmp_bytes, (const uint32_t *)key, keys_out,
                                                   vals_in, vals_out, (int)R, 0, end_bit));
        mp_cuda_mark("cub::DeviceRadixSort", __FILE__, __LINE__);
    }
    *idx = vals_out;
    if (skey) *skey = (const int32_t *)keys_out;
    if (off && key_bound > 0) {
        int32_t *o = (int32_t *)mp_cuda_scratch(SCR_SORT_OFF, (size_t)(key_bound + 1) * sizeof(int32_t));
        lower_bound_kernel<<<mp_blocks((size_t)key_bound + 1, 256), 256>>>(o, keys_out, R, key_bound);
        KERNEL_CHECK();
        *off = o;
    }
}

static __global__ void plan_hot_keys_kernel(mp_hot_keys hot, const int32_t *off, int64_t keys,
                                            int seg) {
    int64_t key = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
    if (key >= keys) return;
    int p0 = off[key], p1 = off[key + 1];
    if (p1 - p0 <= seg) return;
    int nseg = (p1 - p0) / seg;   // the last takes the remainder: no p0 + seg past p1
    int h = atomicAdd(&hot.count[0], 1), s0 = atomicAdd(&hot.count[1], nseg);
    hot.key[h] = (int32_t)key;
    hot.first[h] = s0;
    hot.nseg[h] = nseg;
    for (int s = 0; s < nseg; s++) {
        hot.seg_begin[s0 + s] = p0 + s * seg;
        hot.seg_end[s0 + s] = s + 1 < nseg ? p0 + (s + 1) * seg : p1;
    }
}

mp_hot_keys mp_cuda_plan_hot_keys(const int32_t *off, int64_t keys, int64_t R, int seg) {
    mp_hot_keys hot;
    // a hot key of n records has floor(n / seg) >= 1 segments, so all of them, and the hot
    // keys, number at most R / seg
    hot.max_seg = R / seg;
    int32_t *ints = (int32_t *)mp_cuda_scratch(SCR_HOT_PLAN,
                                               (size_t)(2 + 5 * hot.max_seg) * sizeof(int32_t));
    hot.count = ints;
    hot.key = ints + 2;
    hot.first = hot.key + hot.max_seg;
    hot.nseg = hot.first + hot.max_seg;
    hot.seg_begin = hot.nseg + hot.max_seg;
    hot.seg_end = hot.seg_begin + hot.max_seg;
    mp_cuda_zero(hot.count, 2 * sizeof(int32_t));
    if (keys > 0 && hot.max_seg > 0) {
        plan_hot_keys_kernel<<<mp_blocks((size_t)keys, 256), 256>>>(hot, off, keys, seg);
        KERNEL_CHECK();
    }
    return hot;
}
