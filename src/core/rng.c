#include "rng.h"
#include <math.h>

float mp_normal(uint64_t seed, uint64_t stream, uint64_t index) {
    // 2 uniforms per normal; u1 in (0, 1] so the log is finite.
    double u1 = ((mp_hash3(seed, stream, 2 * index) >> 11) + 1.0) * (1.0 / 9007199254740992.0);
    double u2 = (mp_hash3(seed, stream, 2 * index + 1) >> 11) * (1.0 / 9007199254740992.0);
    return (float)(sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2));
}
