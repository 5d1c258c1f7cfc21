// The emulator's stand-in for CUDA's mma.h (nvcuda::wmma): the 16 x 16 x 16 bf16 tiles with
// fp32 accumulators that the tensor-core attention kernels use, and nothing else.
//
// Each lane of a real warp holds a slice of a fragment, in an unspecified layout; here every
// lane holds the whole tile, widened to float exactly. Kernels that only load, multiply,
// fill and store fragments (as the API intends) cannot tell the difference; one that read a
// fragment's elements by index would depend on the GPU's layout and is not supported. The
// operations are warp-collective on a GPU: a load and a product wait here for all 32 lanes
// (a lane that skips one deadlocks the warp, with the emulator's message). They do not order
// memory for the kernel, so the emulator must not either: a load reads before it waits, so
// lanes that reach it before the others have written what it reads (a missing __syncwarp)
// read stale memory; a store writes only this lane's share of the tile (elements lane,
// lane + 32, ...) and does not wait, so lanes that read the tile before every share is
// written, or write it while others still read the old contents, see the difference. A
// product's fp32 sum runs in k order, rounded to nearest; tensor cores may sum in another
// order and truncate, which the tests' bounds allow for. Load and store check the API's
// rules, which a GPU does not check (it faults or returns garbage): 32-byte aligned
// pointers, ldm a multiple of 8 bf16 or 4 floats.
#pragma once
#include <stdio.h>
#include <string.h>
#include <type_traits>
#include "cuda_bf16.h"   // cuda_emu.h comes first in every translated file

namespace mp_emu {
[[noreturn]] void misused(const char *what);
}

namespace nvcuda {
namespace wmma {

struct row_major {};
struct col_major {};
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
enum layout_t { mem_row_major, mem_col_major };

template <class Use, int M, int N, int K, class T, class Layout = void>
struct fragment {
    static_assert(M == 16 && N == 16 && K == 16, "the emulator has the 16 x 16 x 16 shape only");
    static_assert(std::is_same<Use, accumulator>::value ? std::is_same<T, float>::value
                                                        : std::is_same<T, __nv_bfloat16>::value,
                  "the emulator has bf16 operands with fp32 accumulators only");
    static constexpr int num_elements = 256;
    float x[256];   // element (i, j) of the tile at x[16 i + j]: A (m, k), B (k, n), C (m, n)
};

template <class T> inline float emu_widen(const T &v) {
    if constexpr (std::is_same<T, float>::value) {
        return v;
    } else {
        uint32_t u = (uint32_t)v.bits << 16;
        float f;
        memcpy(&f, &u, 4);
        return f;
    }
}

template <class T> inline void emu_check(const T *p, unsigned ldm, const char *op) {
    if ((uintptr_t)(const void *)p & 31u) mp_emu::misaligned((const void *)p, 32);
    unsigned mult = sizeof(T) == 2 ? 8u : 4u;
    if (ldm % mult) {
        static char msg[96];
        snprintf(msg, sizeof msg, "%s with ldm %u, not a multiple of %u elements", op, ldm, mult);
        mp_emu::misused(msg);
    }
}

template <class Use, class T, class Layout>
inline void load_matrix_sync(fragment<Use, 16, 16, 16, T, Layout> &f, const T *p, unsigned ldm) {
    static_assert(!std::is_same<Use, accumulator>::value, "an accumulator load names its layout");
    emu_check(p, ldm, "load_matrix_sync");
    bool row = std::is_same<Layout, row_major>::value;
    for (int i = 0; i < 16; i++)
        for (int j = 0; j < 16; j++)
            f.x[16 * i + j] = emu_widen(row ? p[(size_t)i * ldm + j] : p[(size_t)j * ldm + i]);
    mp_emu::syncwarp(0xffffffffu);   // warp-collective, after the reads (above)
}

inline void load_matrix_sync(fragment<accumulator, 16, 16, 16, float> &f, const float *p,
                             unsigned ldm, layout_t layout) {
    emu_check(p, ldm, "load_matrix_sync");
    for (int i = 0; i < 16; i++)
        for (int j = 0; j < 16; j++)
            f.x[16 * i + j] = layout == mem_row_major ? p[(size_t)i * ldm + j] : p[(size_t)j * ldm + i];
    mp_emu::syncwarp(0xffffffffu);
}

inline void store_matrix_sync(float *p, const fragment<accumulator, 16, 16, 16, float> &f,
                              unsigned ldm, layout_t layout) {
    emu_check(p, ldm, "store_matrix_sync");
    for (int e = (int)mp_emu::g_thread->lane; e < 256; e += 32) {   // this lane's share only
        int i = e / 16, j = e % 16;
        (layout == mem_row_major ? p[(size_t)i * ldm + j] : p[(size_t)j * ldm + i]) = f.x[e];
    }
}

template <class Use, class T, class Layout>
inline void fill_fragment(fragment<Use, 16, 16, 16, T, Layout> &f, float v) {
    for (int i = 0; i < 256; i++) f.x[i] = v;
}

template <class LA, class LB>
inline void mma_sync(fragment<accumulator, 16, 16, 16, float> &d,
                     const fragment<matrix_a, 16, 16, 16, __nv_bfloat16, LA> &a,
                     const fragment<matrix_b, 16, 16, 16, __nv_bfloat16, LB> &b,
                     const fragment<accumulator, 16, 16, 16, float> &c) {
    mp_emu::syncwarp(0xffffffffu);
    float r[256];
    for (int i = 0; i < 16; i++)
        for (int j = 0; j < 16; j++) {
            float s = c.x[16 * i + j];
            for (int k = 0; k < 16; k++) s += a.x[16 * i + k] * b.x[16 * k + j];   // exact products
            r[16 * i + j] = s;
        }
    memcpy(d.x, r, sizeof r);
}

}  // namespace wmma
}  // namespace nvcuda
