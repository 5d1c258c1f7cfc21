// Counter-based random numbers: every value is a pure function of (seed, stream, index),
// so initialisation and data order never depend on the rank count or thread schedule.
#pragma once
#include <stddef.h>
#include <stdint.h>

static inline uint64_t mp_mix64(uint64_t z) {   // splitmix64 finaliser
    z += 0x9e3779b97f4a7c15ULL;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}
static inline uint64_t mp_hash3(uint64_t seed, uint64_t stream, uint64_t index) {
    return mp_mix64(mp_mix64(mp_mix64(seed) ^ stream) ^ index);
}
// Uniform in [0, 1) with 24 random bits.
static inline float mp_uniform(uint64_t seed, uint64_t stream, uint64_t index) {
    return (float)(mp_hash3(seed, stream, index) >> 40) * (1.0f / 16777216.0f);
}
// Standard normal (Box-Muller on two hashed uniforms).
float mp_normal(uint64_t seed, uint64_t stream, uint64_t index);
// 64-bit FNV-1a of n bytes: a stable name for a text (a path, a tokenizer's model file).
static inline uint64_t mp_fnv1a64(const void *data, size_t n) {
    const unsigned char *p = data;
    uint64_t h = 0xcbf29ce484222325ULL;
    for (size_t i = 0; i < n; i++) h = (h ^ p[i]) * 0x100000001b3ULL;
    return h;
}
