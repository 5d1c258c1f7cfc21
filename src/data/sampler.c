// The batch sampler. Every sequence's start offset is a pure function of
// (seed, stream, step, micro, j), so the global batch is the same whatever the rank
// count: each rank fills only its rows [j0, j0+B) of the same global micro-batch, and a
// resume at step s on any number of ranks continues the same stream (docs/data.md).
#include "millipede/data.h"
#include <inttypes.h>
#include "core/log.h"
#include "core/rng.h"

// (step, micro, j) are packed into one 64-bit counter, step in the high 32 bits, micro in
// the next 12, j in the low 20 (the MP_SAMPLER_*_BITS of data.h):
//     index = step << 32 | micro << 20 | j
// The packing is injective within these limits and mp_hash3 is a bijection of the
// index for fixed (seed, stream), so two different sequences never share a hash (their
// offsets can still coincide after the modulo, as with any sampling with replacement).

uint64_t mp_batch_offset(uint64_t seed, uint32_t stream, uint64_t step, uint32_t micro,
                         uint32_t j, uint64_t n_tokens, int T) {
    if (T < 1 || n_tokens < (uint64_t)T + 1)
        mp_fatal("batch sampler: %" PRIu64 " tokens cannot hold one window of context %d + 1",
                 n_tokens, T);
    if (step >> MP_SAMPLER_STEP_BITS || micro >> MP_SAMPLER_MICRO_BITS || j >> MP_SAMPLER_J_BITS)
        mp_fatal("batch sampler: step %" PRIu64 ", micro-batch %" PRIu32 " or sequence %" PRIu32
                 " exceeds the limits 2^32, 2^12, 2^20", step, micro, j);
    uint64_t index = step << (MP_SAMPLER_MICRO_BITS + MP_SAMPLER_J_BITS) |
                     (uint64_t)micro << MP_SAMPLER_J_BITS | j;
    // Offsets lie in [0, n_tokens - T - 1] so that the targets window (one further) fits.
    // The modulo bias is at most (n_tokens - T) / 2^64: negligible for any real corpus.
    return mp_hash3(seed, stream, index) % (n_tokens - (uint64_t)T);
}

// inputs, targets: (B, T); row i is sequence j0 + i; targets are the inputs shifted by one.
void mp_batch_fill(const mp_shard *s, uint64_t seed, uint32_t stream, uint64_t step,
                   uint32_t micro, uint32_t j0, int B, int T, int32_t *inputs, int32_t *targets) {
    if (T < 1 || s->n_tokens < (uint64_t)T + 1)
        mp_fatal("%s: %" PRIu64 " tokens cannot hold one window of context %d + 1", s->path,
                 s->n_tokens, T);
    for (int i = 0; i < B; i++) {
        uint64_t off = mp_batch_offset(seed, stream, step, micro, j0 + (uint32_t)i, s->n_tokens, T);
        const uint16_t *src = s->tokens + off;   // (T + 1,)
        int32_t *in = inputs + (size_t)i * T;    // (T,)
        int32_t *tg = targets + (size_t)i * T;   // (T,)
        for (int t = 0; t < T; t++) {
            in[t] = src[t];
            tg[t] = src[t + 1];
        }
    }
}
