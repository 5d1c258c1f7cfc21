// The emulator's stand-in for cuda_bf16.h: only the type, as the tensor-core fragments
// (mma.h here) name it. The backend keeps bf16 values as raw bits (uint16_t) and passes
// them to the fragments through a cast, so no arithmetic on the type is emulated.
#pragma once
#include <stdint.h>

struct __nv_bfloat16 {
    uint16_t bits;
};
static_assert(sizeof(__nv_bfloat16) == 2, "bf16 is two bytes");
