// Sub-key ownership and the routing plan: boundaries for uneven rank counts, a token whose
// selections all land on one rank, ranks that receive nothing, one expert chosen by
// several heads of a token.
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>
#include "core/rng.h"
#include "dist/shard_plan.h"

// Owner by definition: the r whose [floor(r n / P), floor((r+1) n / P)) holds e / n.
static int owner_by_scan(long e, long n, int P) {
    long a = e / n;
    for (int r = 0; r < P; r++)
        if ((long)r * n / P <= a && a < (long)(r + 1) * n / P) return r;
    return -1;
}

static void test_owner_uneven(void **state) {
    (void)state;
    for (long n = 1; n <= 40; n++) {
        for (int P = 1; P <= n; P++) {
            long rows = 0;
            for (int r = 0; r < P; r++) {
                long a0 = mp_shard_first_subkey(n, P, r), a1 = mp_shard_first_subkey(n, P, r + 1);
                assert_true(a1 > a0);   // P <= n: every rank owns at least one sub-key
                rows += (a1 - a0) * n;
            }
            assert_int_equal(rows, n * n);
            for (long e = 0; e < n * n; e++) assert_int_equal(mp_shard_owner(e, n, P), owner_by_scan(e, n, P));
        }
    }
    // the boundaries of n = 10 over P = 3: A = 0, 3, 6, 10
    assert_int_equal(mp_shard_first_subkey(10, 3, 1), 3);
    assert_int_equal(mp_shard_first_subkey(10, 3, 2), 6);
    assert_int_equal(mp_shard_owner(29, 10, 3), 0);
    assert_int_equal(mp_shard_owner(30, 10, 3), 1);
    assert_int_equal(mp_shard_owner(99, 10, 3), 2);
}

// Rebuilds every selection from the plan and checks the grouping invariants.
static void check_plan(const mp_shard_plan *p, const int32_t *sel, int N, int S, long n) {
    int P = p->P;
    char *seen = calloc((size_t)N * S, 1);
    for (int r = 0; r < P; r++) {
        long base = mp_shard_first_subkey(n, P, r) * n;
        int64_t t0 = p->tok_displ[r], t1 = t0 + p->tok_count[r];
        for (int64_t i = t0 + 1; i < t1; i++) assert_true(p->tok_list[i] > p->tok_list[i - 1]);
        int64_t prev_slot = 0;
        for (int64_t i = p->rec_displ[r]; i < p->rec_displ[r] + p->rec_count[r]; i++) {
            int32_t o = p->rec_sel[i];
            assert_false(seen[o]);
            seen[o] = 1;
            assert_int_equal(mp_shard_owner(sel[o], n, P), r);
            assert_int_equal(base + p->rec_row[i], sel[o]);
            assert_true(p->rec_slot[i] >= prev_slot);   // records follow their tokens
            prev_slot = p->rec_slot[i];
            assert_int_equal(p->tok_list[t0 + p->rec_slot[i]], o / S);
        }
    }
    for (long o = 0; o < (long)N * S; o++) assert_true(seen[o]);
    free(seen);
}

static void test_plan_random(void **state) {
    (void)state;
    const long n = 13;
    const int N = 40, S = 6;
    int32_t sel[40 * 6];
    for (int P = 1; P <= 13; P++) {
        for (int rep = 0; rep < 20; rep++) {
            for (int o = 0; o < N * S; o++) sel[o] = (int32_t)(mp_hash3(P, rep, o) % (n * n));
            mp_shard_plan p;
            mp_shard_plan_init(&p, P);
            mp_shard_plan_build(&p, sel, N, S, n);
            check_plan(&p, sel, N, S, n);
            mp_shard_plan_free(&p);
        }
    }
}

static void test_plan_edge_cases(void **state) {
    (void)state;
    const long n = 8;
    const int P = 4, S = 4;   // owners: a in [0,2) -> 0, [2,4) -> 1, [4,6) -> 2, [6,8) -> 3
    // token 0: all selections on rank 2; token 1: the same expert from two heads and two
    // more on rank 0; token 2: one per rank 0, 2. Rank 1 and 3 receive nothing.
    int32_t sel[3 * 4] = {4 * 8 + 1, 5 * 8 + 7, 4 * 8 + 0, 5 * 8 + 3,
                          1 * 8 + 2, 1 * 8 + 2, 0 * 8 + 0, 0 * 8 + 5,
                          0 * 8 + 6, 4 * 8 + 4, 4 * 8 + 5, 0 * 8 + 1};
    mp_shard_plan p;
    mp_shard_plan_init(&p, P);
    mp_shard_plan_build(&p, sel, 3, S, n);
    check_plan(&p, sel, 3, S, n);
    assert_int_equal(p.tok_count[0], 2);   // tokens 1 and 2
    assert_int_equal(p.rec_count[0], 6);
    assert_int_equal(p.tok_count[1], 0);
    assert_int_equal(p.rec_count[1], 0);
    assert_int_equal(p.tok_count[2], 2);   // tokens 0 and 2
    assert_int_equal(p.rec_count[2], 6);
    assert_int_equal(p.tok_count[3], 0);
    // token 1 goes to rank 0 once, with its duplicate expert as two records
    assert_int_equal(p.tok_list[p.tok_displ[0]], 1);
    int64_t r0 = p.rec_displ[0];
    assert_int_equal(p.rec_row[r0], 1 * 8 + 2);
    assert_int_equal(p.rec_row[r0 + 1], 1 * 8 + 2);
    assert_int_equal(p.rec_slot[r0], 0);
    assert_int_equal(p.rec_slot[r0 + 1], 0);
    // rank 2's rows are local: expert 4*8+1 is its row 1
    assert_int_equal(p.rec_row[p.rec_displ[2]], 1);
    // rebuilding with another batch reuses the buffers correctly
    int32_t one[4] = {7 * 8 + 7, 7 * 8 + 6, 6 * 8 + 0, 6 * 8 + 1};
    mp_shard_plan_build(&p, one, 1, S, n);
    check_plan(&p, one, 1, S, n);
    assert_int_equal(p.n_tok, 1);
    assert_int_equal(p.rec_count[3], 4);
    mp_shard_plan_free(&p);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_owner_uneven),
        cmocka_unit_test(test_plan_random),
        cmocka_unit_test(test_plan_edge_cases),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
