// Product-key top-k equals brute-force top-k over all n*n keys (score s1[a] + s2[b],
// higher first, ties to the lower expert id), on random cases and on heavy ties.
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <cmocka.h>
#include "core/rng.h"
#include "backend/cpu/cpu.h"

// Brute force: a full selection over all n*n sums, written independently of mp_topk.
static void brute_topk(const float *s1, const float *s2, int n, int k, long *out) {
    long N = (long)n * n;
    char *taken = calloc(N, 1);
    for (int j = 0; j < k; j++) {
        long best = -1;
        float bv = 0.0f;
        for (long e = 0; e < N; e++) {
            if (taken[e]) continue;
            float v = s1[e / n] + s2[e % n];
            if (best < 0 || v > bv) { best = e; bv = v; }   // strict: keeps the lowest id on ties
        }
        taken[best] = 1;
        out[j] = best;
    }
    free(taken);
}

static void check_case(const float *s1, const float *s2, int n, int k) {
    float vals[64];
    long got[64], want[64];
    int32_t a[64], b[64];
    mp_product_topk(s1, s2, n, k, vals, got, a, b);
    brute_topk(s1, s2, n, k, want);
    for (int j = 0; j < k; j++) {
        assert_int_equal(got[j], want[j]);
        assert_int_equal(a[j], want[j] / n);
        assert_int_equal(b[j], want[j] % n);
        assert_true(vals[j] == s1[a[j]] + s2[b[j]]);
        if (j) assert_true(vals[j] <= vals[j - 1]);
    }
}

static void test_random(void **state) {
    (void)state;
    const int shapes[][2] = {{4, 1}, {4, 4}, {8, 3}, {16, 8}, {32, 16}, {64, 5}, {11, 11}};
    float s1[64], s2[64];
    for (size_t c = 0; c < sizeof shapes / sizeof shapes[0]; c++) {
        int n = shapes[c][0], k = shapes[c][1];
        for (int rep = 0; rep < 200; rep++) {
            for (int i = 0; i < n; i++) {
                s1[i] = mp_normal(7, c * 1000 + rep, i);
                s2[i] = mp_normal(8, c * 1000 + rep, i);
            }
            check_case(s1, s2, n, k);
        }
    }
}

// Scores drawn from a handful of values: many exact ties in the halves and in the sums.
static void test_ties(void **state) {
    (void)state;
    float s1[32], s2[32];
    for (int rep = 0; rep < 500; rep++) {
        int n = 4 + rep % 29, k = 1 + rep % (n < 16 ? n : 16);
        for (int i = 0; i < n; i++) {
            s1[i] = (float)(mp_hash3(9, rep, i) % 4) * 0.5f;
            s2[i] = (float)(mp_hash3(10, rep, i) % 3) * 0.25f;
        }
        check_case(s1, s2, n, k);
    }
}

static void test_single_topk(void **state) {
    (void)state;
    float s[6] = {1.0f, 3.0f, 3.0f, -1.0f, 2.0f, 3.0f};
    float v[3];
    long ix[3];
    mp_topk(s, 6, 3, v, ix);
    assert_int_equal(ix[0], 1);
    assert_int_equal(ix[1], 2);
    assert_int_equal(ix[2], 5);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_random),
        cmocka_unit_test(test_ties),
        cmocka_unit_test(test_single_topk),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
