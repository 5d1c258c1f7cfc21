// Rank agreement (src/core/agree.c) under mpirun with 3 ranks: a failure on some ranks
// reaches all of them with the lowest failing rank's reason, and the collective model
// save (model_file.c) returns the same error on every rank when rank 0 alone fails to
// commit the file (it used to return early while the others waited in a barrier: a hang
// that ctest's timeout turns into a failure).
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <cmocka.h>
#include <mpi.h>
#include "core/agree.h"
#include "core/log.h"
#include "millipede/comm.h"
#include "millipede/model.h"
#include "millipede/model_file.h"
#include "../unit/small_config.h"

static void all_fine(void **state) {
    (void)state;
    char err[64] = "untouched";
    assert_int_equal(mp_agree(0, err, sizeof err), 0);
    assert_string_equal(err, "untouched");   // nothing to report: err is left alone
}

static void one_rank_fails(void **state) {
    (void)state;
    char err[64] = "";
    int rc = 0;
    if (mp_rank() == 1) rc = 3, snprintf(err, sizeof err, "disk full on rank 1");
    assert_int_equal(mp_agree(rc, err, sizeof err), 3);
    assert_string_equal(err, "disk full on rank 1");
}

static void lowest_failing_rank_speaks(void **state) {
    (void)state;
    char err[64] = "";
    int rc = 0;
    if (mp_rank() >= 1) rc = 10 + mp_rank(), snprintf(err, sizeof err, "reason of rank %d", mp_rank());
    assert_int_equal(mp_agree(rc, err, sizeof err), 11);
    assert_string_equal(err, "reason of rank 1");
}

static void broadcast_from_rank0(void **state) {
    (void)state;
    long v[3] = {mp_rank(), -1, 7};
    mp_broadcast0(v, sizeof v);
    assert_int_equal(v[0], 0);
}

// Rank 0's rename fails (the destination is a directory that holds a file); every rank
// must get -1 and the same message.
static void model_save_commit_fails_on_rank0(void **state) {
    (void)state;
    char dir[256] = "";
    if (mp_rank() == 0) {
        snprintf(dir, sizeof dir, "%s/mp_test_agree.XXXXXX", getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp");
        assert_non_null(mkdtemp(dir));
    }
    mp_broadcast0(dir, sizeof dir);
    char path[300], inside[320];
    snprintf(path, sizeof path, "%s/model.h5", dir);
    if (mp_rank() == 0) {
        assert_int_equal(mkdir(path, 0755), 0);
        snprintf(inside, sizeof inside, "%s/keep", path);
        FILE *f = fopen(inside, "w");
        assert_non_null(f);
        fclose(f);
    }
    MPI_Barrier(MPI_COMM_WORLD);
    mp_config c;
    small_config(&c);
    c.batch_size = 3;
    validate(&c);
    mp_comm *comm = mp_comm_mpi();
    mp_model *m = mp_model_create_sharded(&c, mp_backend_cpu(), 1, comm);
    mp_model_init(m);
    char err[1024] = "";
    assert_int_equal(mp_model_save(m, path, 5, err, sizeof err), -1);
    assert_non_null(strstr(err, "cannot rename to"));
    assert_non_null(strstr(err, path));
    mp_model_free(m);
    mp_comm_free(comm);
    MPI_Barrier(MPI_COMM_WORLD);
    if (mp_rank() == 0) {
        char cmd[400];
        snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
        assert_int_equal(system(cmd), 0);
    }
}

int main(int argc, char **argv) {
    MPI_Init(&argc, &argv);
    if (mp_world() != 3) {
        fprintf(stderr, "test_agree: run under mpirun -n 3 (got %d ranks)\n", mp_world());
        MPI_Finalize();
        return 1;
    }
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(all_fine),
        cmocka_unit_test(one_rank_fails),
        cmocka_unit_test(lowest_failing_rank_speaks),
        cmocka_unit_test(broadcast_from_rank0),
        cmocka_unit_test(model_save_commit_fails_on_rank0),
    };
    int failed = cmocka_run_group_tests(tests, NULL, NULL);
    MPI_Finalize();
    return failed ? 1 : 0;
}
