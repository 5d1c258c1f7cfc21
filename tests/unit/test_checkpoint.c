// The checkpoint API without MPI ranks: a save/load round trip restores parameters, AdamW
// moments and step count and BN statistics bit for bit; a model holding part of the expert
// rows (as rank 1 of 3 would) reads exactly its rows through the global view; the return
// codes tell a bad checkpoint from one of another shape; `latest`, keep-K pruning and path
// resolution behave as docs/checkpoints.md says.
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
#include "millipede/checkpoint.h"
#include "small_config.h"

static char dir[256];

// Fills every buffer with distinct values derived from `salt`.
static void fill(mp_model *m, mp_adamw *opt, float salt) {
    for (int g = 0; g < MP_N_GROUPS; g++) {
        size_t n = mp_model_group_size(m, g);
        float *p = mp_model_params(m, g);
        for (size_t i = 0; i < n; i++) {
            p[i] = salt + 0.001f * (float)i + (float)g;
            opt->m[g][i] = -p[i];
            opt->v[g][i] = p[i] * p[i];
        }
    }
    size_t n = mp_model_router_state_size(m);
    for (size_t i = 0; i < n; i++) mp_model_router_state(m)[i] = salt * 2 + (float)i;
    opt->t = (long)salt;
}

static int same(mp_model *a, mp_adamw *oa, mp_model *b, mp_adamw *ob) {
    for (int g = 0; g < MP_N_GROUPS; g++) {
        size_t n = mp_model_group_size(a, g) * sizeof(float);
        if (memcmp(mp_model_params(a, g), mp_model_params(b, g), n) ||
            memcmp(oa->m[g], ob->m[g], n) || memcmp(oa->v[g], ob->v[g], n))
            return 0;
    }
    return oa->t == ob->t && !memcmp(mp_model_router_state(a), mp_model_router_state(b),
                                      mp_model_router_state_size(a) * sizeof(float));
}

static void path(char *out, size_t len, const char *name) { snprintf(out, len, "%s/%s", dir, name); }

static void save(mp_model *m, mp_adamw *opt, const char *root, long step, int keep) {
    char err[1024];
    mp_ckpt_stats st;
    if (mp_ckpt_save(root, m, opt, step, keep, NULL, 0, &st, err, sizeof err) != 0)
        fail_msg("save: %s", err);
    assert_true(st.bytes > 0);
    assert_int_equal(st.n_files, 2);
}

static void test_round_trip(void **state) {
    (void)state;
    mp_config c;
    small_config(&c);
    validate(&c);
    mp_model *a = mp_model_create(&c, mp_backend_cpu(), 1);
    mp_model *b = mp_model_create(&c, mp_backend_cpu(), 1);
    mp_adamw oa, ob;
    mp_adamw_init(&oa, a);
    mp_adamw_init(&ob, b);
    fill(a, &oa, 3.0f);
    fill(b, &ob, 5.0f);
    char root[300], ck[320], err[1024];
    path(root, sizeof root, "rt");
    save(a, &oa, root, 7, 3);
    snprintf(ck, sizeof ck, "%s/step_00000007", root);
    mp_ckpt_info info;
    assert_false(same(a, &oa, b, &ob));
    if (mp_ckpt_load(ck, b, &ob, "test", &info, err, sizeof err) != 0) fail_msg("load: %s", err);
    assert_true(same(a, &oa, b, &ob));
    assert_int_equal(info.step, 7);
    assert_int_equal(info.adam_t, 3);
    assert_int_equal(info.n_ranks, 1);
    assert_int_equal(info.seed, c.seed);

    // rank 1 of 3 holds the rows of sub-keys [2, 5): rows [16, 40) of each expert table
    mp_model *p = mp_model_create_part(&c, mp_backend_cpu(), 1, 1, 3);
    mp_adamw op;
    mp_adamw_init(&op, p);
    if (mp_ckpt_load(ck, p, &op, "test", NULL, err, sizeof err) != 0) fail_msg("part: %s", err);
    const char *tables[] = {"h1.peer.u", "h1.peer.v", "h2.pkm.v"};
    for (int i = 0; i < 3; i++) {
        const mp_tensor *tp = mp_model_find(p, tables[i]), *ta = mp_model_find(a, tables[i]);
        assert_int_equal(tp->row_start, 16);
        assert_int_equal(tp->shape[0], 24);
        size_t off = (size_t)tp->row_start * 16;
        assert_memory_equal(mp_model_params(p, tp->group) + tp->offset,
                            mp_model_params(a, ta->group) + ta->offset + off, tp->numel * sizeof(float));
        assert_memory_equal(op.v[tp->group] + tp->offset, oa.v[ta->group] + ta->offset + off,
                            tp->numel * sizeof(float));
    }
    mp_adamw_free(&op, p);
    mp_model_free(p);

    // the stored configuration
    mp_config fc;
    assert_int_equal(mp_ckpt_read_config(ck, &fc, &info, err, sizeof err), 0);
    assert_int_equal(fc.d_model, 16);
    assert_int_equal(fc.ffn[2], MP_FFN_PKM);

    // another shape: MP_CKPT_EMISMATCH naming index.h5 and the key
    mp_config c2 = c;
    c2.d_model = 32;
    c2.dense_hidden = 48;
    mp_model *w = mp_model_create(&c2, mp_backend_cpu(), 1);
    assert_int_equal(mp_ckpt_load(ck, w, NULL, "run.ini", NULL, err, sizeof err), MP_CKPT_EMISMATCH);
    assert_non_null(strstr(err, "step_00000007/index.h5: key 'model.d_model' is 16 in the "
                                "checkpoint but 32 in run.ini"));
    mp_model_free(w);

    // a missing shard: MP_CKPT_EBAD naming it
    char shard[400];
    snprintf(shard, sizeof shard, "%s/shard_00000.h5", ck);
    assert_int_equal(unlink(shard), 0);
    assert_int_equal(mp_ckpt_load(ck, b, &ob, "test", NULL, err, sizeof err), MP_CKPT_EBAD);
    assert_non_null(strstr(err, "shard_00000.h5: shard 0 of 1 is missing"));
    assert_null(strchr(err, '\n'));
    // not a checkpoint at all
    assert_int_equal(mp_ckpt_load(root, b, &ob, "test", NULL, err, sizeof err), MP_CKPT_EBAD);
    assert_non_null(strstr(err, "index.h5: missing"));

    mp_adamw_free(&oa, a);
    mp_adamw_free(&ob, b);
    mp_model_free(a);
    mp_model_free(b);
}

static int exists(const char *root, const char *name) {
    char p[400];
    snprintf(p, sizeof p, "%s/%s", root, name);
    struct stat st;
    return lstat(p, &st) == 0;
}

static void test_latest_keep_resolve(void **state) {
    (void)state;
    mp_config c;
    small_config(&c);
    validate(&c);
    c.n_layers = 1;   // a dense model: quick, and no expert tables at all
    c.ffn[0] = MP_FFN_DENSE;
    mp_model *m = mp_model_create(&c, mp_backend_cpu(), 1);
    mp_model_init(m);
    mp_adamw opt;
    mp_adamw_init(&opt, m);
    char run[300], root[320], out[600], err[1024];
    path(run, sizeof run, "run");
    snprintf(root, sizeof root, "%s/checkpoints", run);
    for (long s = 2; s <= 10; s += 2) save(m, &opt, root, s, 2);
    char target[64] = "";
    snprintf(out, sizeof out, "%s/latest", root);
    assert_true(readlink(out, target, sizeof target - 1) > 0);
    assert_string_equal(target, "step_00000010");
    assert_true(exists(root, "step_00000008") && exists(root, "step_00000010"));
    assert_false(exists(root, "step_00000006"));
    // a leftover of an interrupted write disappears with the next checkpoint
    snprintf(out, sizeof out, "%s/step_00000012.tmp", root);
    assert_int_equal(mkdir(out, 0755), 0);
    // writing an older step (after --no-resume) removes the newer, abandoned ones
    save(m, &opt, root, 4, 2);
    assert_false(exists(root, "step_00000012.tmp"));
    assert_false(exists(root, "step_00000008") || exists(root, "step_00000010"));
    assert_true(exists(root, "step_00000004"));

    // resolution: a run dir, a checkpoints dir, latest, a step dir
    char want[400];
    snprintf(want, sizeof want, "%s/step_00000004", root);
    assert_int_equal(mp_ckpt_resolve(run, out, sizeof out, err, sizeof err), 0);
    assert_string_equal(out, want);
    assert_int_equal(mp_ckpt_resolve(root, out, sizeof out, err, sizeof err), 0);
    assert_string_equal(out, want);
    assert_int_equal(mp_ckpt_resolve(want, out, sizeof out, err, sizeof err), 0);
    assert_string_equal(out, want);
    assert_int_equal(mp_ckpt_resolve(dir, out, sizeof out, err, sizeof err), -1);
    assert_non_null(strstr(err, "no checkpoints/latest"));
    snprintf(want, sizeof want, "%s/nope", dir);
    assert_int_equal(mp_ckpt_resolve(want, out, sizeof out, err, sizeof err), -1);
    assert_non_null(strstr(err, "no such checkpoint"));
    mp_adamw_free(&opt, m);
    mp_model_free(m);
}

static int setup(void **state) {
    (void)state;
    const char *tmp = getenv("TMPDIR");
    snprintf(dir, sizeof dir, "%s/mp_ckpt_XXXXXX", tmp && *tmp ? tmp : "/tmp");
    return mkdtemp(dir) ? 0 : -1;
}

static int teardown(void **state) {
    (void)state;
    char cmd[400];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    return system(cmd) == 0 ? 0 : -1;
}

int main(int argc, char **argv) {
    MPI_Init(&argc, &argv);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_round_trip),
        cmocka_unit_test(test_latest_keep_resolve),
    };
    int rc = cmocka_run_group_tests(tests, setup, teardown);
    MPI_Finalize();
    return rc;
}
