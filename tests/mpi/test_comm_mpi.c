// The MPI transport's all-to-all-v under mpirun with 3 ranks, on both of its paths: one
// MPI_Alltoallv when every count and offset fits MPI's int, and rounds of point-to-point
// pieces otherwise (src/dist/comm_mpi.c). MP_MPI_MAX_COUNT lowers the bound so that a few
// hundred elements take the chunked path; the data then has to arrive exactly as the
// single call delivers it, gaps between the receive segments left alone.
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>
#include <mpi.h>
#include "millipede/comm.h"

// what rank `src` sends to rank `dst` at position i: exact in float and in int32
static int32_t value(int src, int dst, int64_t i) { return (int32_t)(src * 1000000 + dst * 10000 + i); }

// uneven counts, some zero: rank s sends count(s, d) elements to d
static int64_t count(int s, int d) { return (s + 2 * d) % 4 == 0 ? 0 : 37 * (s + 1) + 11 * d; }

// One exchange on comm c; receive segments are placed with a gap of 3 elements between
// them, filled with -7 beforehand, which must survive.
static void exchange(mp_comm *c, int ints) {
    int P = c->size, me = c->rank;
    int64_t sc[P], sd[P], rc[P], rd[P], so = 0, ro = 0;
    for (int r = 0; r < P; r++) {
        sc[r] = count(me, r), sd[r] = so, so += sc[r];
        rc[r] = count(r, me), rd[r] = ro, ro += rc[r] + 3;
    }
    float *sf = malloc((size_t)(so + 1) * sizeof(float)), *rf = malloc((size_t)(ro + 1) * sizeof(float));
    int32_t *si = malloc((size_t)(so + 1) * sizeof(int32_t)), *ri = malloc((size_t)(ro + 1) * sizeof(int32_t));
    for (int r = 0; r < P; r++)
        for (int64_t i = 0; i < sc[r]; i++) sf[sd[r] + i] = (float)(si[sd[r] + i] = value(me, r, i));
    for (int64_t i = 0; i < ro; i++) rf[i] = -7.0f, ri[i] = -7;
    if (ints) c->alltoallv_i32(c, si, sc, sd, ri, rc, rd);
    else c->alltoallv_f32(c, sf, sc, sd, rf, rc, rd);
    for (int r = 0; r < P; r++) {
        for (int64_t i = 0; i < rc[r]; i++) {
            int32_t got = ints ? ri[rd[r] + i] : (int32_t)rf[rd[r] + i];
            assert_int_equal(got, value(r, me, i));
        }
        for (int64_t g = 0; g < 3; g++) {   // the gap after this segment
            int32_t got = ints ? ri[rd[r] + rc[r] + g] : (int32_t)rf[rd[r] + rc[r] + g];
            assert_int_equal(got, -7);
        }
    }
    free(sf); free(rf); free(si); free(ri);
}

static void one_call(void **state) {
    (void)state;
    unsetenv("MP_MPI_MAX_COUNT");
    mp_comm *c = mp_comm_mpi();
    exchange(c, 0);
    exchange(c, 1);
    mp_comm_free(c);
}

static void chunked(void **state) {
    (void)state;
    // the largest count above is 37*3 + 22 = 133: pieces of 16 make up to 9 rounds, and a
    // displacement beyond the bound forces the path even for small counts
    setenv("MP_MPI_MAX_COUNT", "16", 1);
    mp_comm *c = mp_comm_mpi();
    exchange(c, 0);
    exchange(c, 1);
    mp_comm_free(c);
    setenv("MP_MPI_MAX_COUNT", "1", 1);   // one element per message
    c = mp_comm_mpi();
    exchange(c, 0);
    mp_comm_free(c);
    unsetenv("MP_MPI_MAX_COUNT");
}

int main(int argc, char **argv) {
    MPI_Init(&argc, &argv);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(one_call),
        cmocka_unit_test(chunked),
    };
    int rc = cmocka_run_group_tests(tests, NULL, NULL);
    MPI_Finalize();
    return rc;
}
