// cub::DeviceRadixSort::SortPairs for 32-bit unsigned keys and 32-bit values: a stable sort
// on the CPU over the bits [begin_bit, end_bit), with CUB's two-call temporary-storage
// protocol (a NULL buffer asks for the size).
#pragma once
#include "cuda_emu.h"

namespace cub {
struct DeviceRadixSort {
    static cudaError_t SortPairs(void *tmp, size_t &tmp_bytes, const uint32_t *keys_in,
                                 uint32_t *keys_out, const int32_t *vals_in, int32_t *vals_out,
                                 int n, int begin_bit = 0, int end_bit = 32,
                                 cudaStream_t stream = 0);
};
}  // namespace cub
