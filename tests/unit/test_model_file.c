// The single-file model format: a save/load round trip restores every parameter and the
// BatchNorm state bit for bit; the file layout is what docs/outputs.md says (read back
// with plain HDF5 calls); a sharded model reads its own rows; wrong shapes, truncated
// files, corrupted chunks and files that are not millipede models fail with one line.
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <cmocka.h>
#include <hdf5.h>
#include <mpi.h>
#include "millipede/model.h"
#include "millipede/model_file.h"
#include "small_config.h"

static char dir[256];          // scratch directory for this test run
static char saved[300];        // the model saved by the group setup
static mp_config base;         // its config

static mp_model *make_model(const mp_config *c) {
    validate(c);
    mp_model *m = mp_model_create(c, mp_backend_cpu(), 1);
    mp_model_init(m);
    return m;
}

static void path_in_dir(char *out, size_t len, const char *name) {
    snprintf(out, len, "%s/%s", dir, name);
}

static long file_size(const char *path) {
    FILE *f = fopen(path, "rb");
    assert_non_null(f);
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fclose(f);
    return n;
}

static void write_bytes(const char *path, const void *data, size_t n) {
    FILE *f = fopen(path, "wb");
    assert_non_null(f);
    assert_int_equal(fwrite(data, 1, n, f), n);
    fclose(f);
}

static void copy_prefix(const char *from, const char *to, long n) {
    char *buf = malloc((size_t)n);
    FILE *f = fopen(from, "rb");
    assert_non_null(f);
    assert_int_equal(fread(buf, 1, (size_t)n, f), (size_t)n);
    fclose(f);
    write_bytes(to, buf, (size_t)n);
    free(buf);
}

static int group_setup(void **state) {
    (void)state;
    const char *tmp = getenv("TMPDIR");
    snprintf(dir, sizeof dir, "%s/mp_model_file_XXXXXX", tmp && *tmp ? tmp : "/tmp");
    if (!mkdtemp(dir)) return -1;
    small_config(&base);
    path_in_dir(saved, sizeof saved, "model.h5");
    mp_model *m = make_model(&base);
    char err[512];
    int rc = mp_model_save(m, saved, 7, err, sizeof err);
    mp_model_free(m);
    if (rc != 0) fprintf(stderr, "save: %s\n", err);
    return rc;
}

static int group_teardown(void **state) {
    (void)state;
    char cmd[400];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    return system(cmd) == 0 ? 0 : -1;
}

// Distinct, non-default BN statistics, so a load that skipped /state would be caught.
static void fill_bn(mp_model *m, float base_value) {
    size_t n = mp_model_router_state_size(m);
    float *host = malloc(n * sizeof *host);
    for (size_t i = 0; i < n; i++) host[i] = base_value + 0.25f * (float)i;
    mp_model_backend(m)->from_host(mp_model_router_state(m), host, n * sizeof *host);
    free(host);
}

static int buffers_equal(mp_model *a, mp_model *b) {
    for (int g = 0; g < MP_N_GROUPS; g++) {
        size_t n = mp_model_group_size(a, g);
        if (n != mp_model_group_size(b, g)) return 0;
        if (n && memcmp(mp_model_params(a, g), mp_model_params(b, g), n * sizeof(float)))
            return 0;
    }
    size_t n = mp_model_router_state_size(a);
    return n == mp_model_router_state_size(b) &&
           !memcmp(mp_model_router_state(a), mp_model_router_state(b), n * sizeof(float));
}

static void test_round_trip(void **state) {
    (void)state;
    char path[300], tmp[310], err[512];
    path_in_dir(path, sizeof path, "round.h5");
    mp_model *a = make_model(&base);
    assert_true(mp_model_router_state_size(a) == 2 * 2 * (2 * 4));   // 2 layers x (mean, var) x H*dk
    fill_bn(a, 3.0f);
    assert_int_equal(mp_model_save(a, path, 123, err, sizeof err), 0);
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    assert_int_equal(access(path, F_OK), 0);
    assert_int_not_equal(access(tmp, F_OK), 0);   // renamed away

    mp_config c2 = base;
    c2.seed = base.seed + 1;   // different init, so the load has to replace every value
    mp_model *b = make_model(&c2);
    assert_false(buffers_equal(a, b));
    assert_int_equal(mp_model_load(b, path, err, sizeof err), 0);
    assert_true(buffers_equal(a, b));

    mp_config fc;
    assert_int_equal(mp_model_file_config(path, &fc, err, sizeof err), 0);
    assert_int_equal(fc.d_model, 16);
    assert_int_equal(fc.n_layers, 3);
    assert_int_equal(fc.ffn[1], MP_FFN_PEER);
    assert_int_equal(fc.ffn[2], MP_FFN_PKM);
    assert_int_equal(fc.peer.n_experts, 64);
    assert_int_equal(fc.pkm.key_dim, 4);
    assert_int_equal(mp_model_file_check_config(&fc, &base, path, "base.ini", err, sizeof err), 0);
    mp_model_free(a);
    mp_model_free(b);
}

// The layout, read with plain HDF5 calls: attributes, shapes, chunking with Fletcher32,
// and the stored values of a dense and an expert tensor.
static void test_layout(void **state) {
    (void)state;
    mp_model *m = make_model(&base);   // the same init as the model the setup saved
    hid_t f = H5Fopen(saved, H5F_ACC_RDONLY, H5P_DEFAULT);
    assert_true(f >= 0);

    char format[64] = {0};
    hid_t a = H5Aopen(f, "format", H5P_DEFAULT);
    hid_t t = H5Aget_type(a);
    assert_true(H5Tget_size(t) < sizeof format);
    assert_true(H5Aread(a, t, format) >= 0);
    assert_string_equal(format, "millipede-model");
    H5Tclose(t);
    H5Aclose(a);
    long long v = 0;
    a = H5Aopen(f, "version", H5P_DEFAULT);
    assert_true(H5Aread(a, H5T_NATIVE_LLONG, &v) >= 0);
    assert_int_equal(v, 1);
    H5Aclose(a);
    a = H5Aopen(f, "step", H5P_DEFAULT);
    assert_true(H5Aread(a, H5T_NATIVE_LLONG, &v) >= 0);
    assert_int_equal(v, 7);
    H5Aclose(a);
    assert_true(H5Aexists(f, "config") > 0);

    const char *names[] = {"wte", "h1.peer.u", "h2.pkm.v", "h1.peer.bn.w"};
    for (int i = 0; i < 4; i++) {
        const mp_tensor *ten = mp_model_find(m, names[i]);
        assert_non_null(ten);
        char dpath[80];
        snprintf(dpath, sizeof dpath, "/params/%s", names[i]);
        hid_t d = H5Dopen2(f, dpath, H5P_DEFAULT);
        assert_true(d >= 0);
        hid_t sp = H5Dget_space(d);
        hsize_t dims[2] = {0, 0};
        assert_int_equal(H5Sget_simple_extent_ndims(sp), ten->ndim);
        H5Sget_simple_extent_dims(sp, dims, NULL);
        assert_int_equal(dims[0], ten->global_rows);
        if (ten->ndim == 2) assert_int_equal(dims[1], ten->shape[1]);
        hid_t dcpl = H5Dget_create_plist(d);
        assert_int_equal(H5Pget_layout(dcpl), H5D_CHUNKED);
        int has_fletcher = 0;
        for (int k = 0; k < H5Pget_nfilters(dcpl); k++) {
            unsigned flags;
            size_t nelem = 0;
            char fname[64];
            if (H5Pget_filter2(dcpl, (unsigned)k, &flags, &nelem, NULL, sizeof fname, fname,
                               NULL) == H5Z_FILTER_FLETCHER32)
                has_fletcher = 1;
        }
        assert_true(has_fletcher);
        float *got = malloc(ten->numel * sizeof *got);
        assert_true(H5Dread(d, H5T_NATIVE_FLOAT, H5S_ALL, H5S_ALL, H5P_DEFAULT, got) >= 0);
        const float *want = mp_model_params(m, ten->group) + ten->offset;
        assert_memory_equal(got, want, ten->numel * sizeof *got);
        free(got);
        H5Pclose(dcpl);
        H5Sclose(sp);
        H5Dclose(d);
    }
    // BN running statistics: a fresh model has mean 0 and var 1 (docs/model.md).
    float st[8];
    hid_t d = H5Dopen2(f, "/state/h1.peer.bn.running_var", H5P_DEFAULT);
    assert_true(d >= 0);
    assert_true(H5Dread(d, H5T_NATIVE_FLOAT, H5S_ALL, H5S_ALL, H5P_DEFAULT, st) >= 0);
    for (int i = 0; i < 8; i++) assert_true(st[i] == 1.0f);
    H5Dclose(d);
    d = H5Dopen2(f, "/state/h2.pkm.bn.running_mean", H5P_DEFAULT);
    assert_true(d >= 0);
    H5Dclose(d);
    H5Fclose(f);
    mp_model_free(m);
}

// A model holding only part of the expert rows reads exactly those rows; it cannot be saved.
static void test_partial_load(void **state) {
    (void)state;
    char err[512], path[300];
    mp_model *full = make_model(&base);
    mp_model *part = mp_model_create_part(&base, mp_backend_cpu(), 1, 1, 3);   // a in [2, 5)
    mp_model_init(part);
    memset(mp_model_params(part, MP_GROUP_EXPERTS), 0,
           mp_model_group_size(part, MP_GROUP_EXPERTS) * sizeof(float));
    assert_int_equal(mp_model_load(part, saved, err, sizeof err), 0);
    const char *names[] = {"h1.peer.u", "h1.peer.v", "h2.pkm.v"};
    for (int i = 0; i < 3; i++) {
        const mp_tensor *tp = mp_model_find(part, names[i]), *tf = mp_model_find(full, names[i]);
        assert_int_equal(tp->row_start, 2 * 8);
        assert_int_equal(tp->shape[0], 3 * 8);
        const float *got = mp_model_params(part, tp->group) + tp->offset;
        const float *want = mp_model_params(full, tf->group) + tf->offset + tp->row_start * 16;
        assert_memory_equal(got, want, tp->numel * sizeof(float));
    }
    path_in_dir(path, sizeof path, "part.h5");
    assert_int_equal(mp_model_save(part, path, 1, err, sizeof err), -1);
    assert_non_null(strstr(err, "needs all rows"));
    mp_model_free(part);
    mp_model_free(full);
}

static void expect_load_error(const mp_config *c, const char *path, const char *want1,
                              const char *want2) {
    char err[512] = "";
    mp_model *m = make_model(c);
    int rc = mp_model_load(m, path, err, sizeof err);
    mp_model_free(m);
    if (rc == 0) fail_msg("load of %s succeeded, expected an error with '%s'", path, want1);
    if (!strstr(err, want1) || (want2 && !strstr(err, want2)))
        fail_msg("error '%s' lacks '%s' / '%s'", err, want1, want2 ? want2 : "");
    if (strchr(err, '\n')) fail_msg("error is not one line: '%s'", err);
}

static void test_shape_mismatch(void **state) {
    (void)state;
    // More experts: the first table whose shape changes is h1.peer.k1, (n, dk/2).
    mp_config c = base;
    c.peer.n_experts = 256;
    c.peer.n_sub = 16;
    expect_load_error(&c, saved, "dataset '/params/h1.peer.k1' has shape (8, 2), expected (16, 2)",
                      saved);
    // Wider model: wte is (V, C).
    c = base;
    c.d_model = 32;
    c.dense_hidden = 48;
    expect_load_error(&c, saved, "'/params/wte' has shape (32, 16), expected (32, 32)", NULL);
    // A dense block where the file has a PEER layer.
    c = base;
    c.ffn[1] = MP_FFN_DENSE;
    expect_load_error(&c, saved, "'/params/h1.mlp.fc.w' is missing", NULL);
    // Fewer blocks: every tensor of the model is there, but the file has more.
    c = base;
    c.n_layers = 2;
    expect_load_error(&c, saved, "/params holds", NULL);
}

static void test_config_check(void **state) {
    (void)state;
    char err[512];
    mp_config f = base, c = base;
    c.d_model = 64;
    assert_int_equal(mp_model_file_check_config(&f, &c, "m.h5", "run.ini", err, sizeof err), -1);
    assert_string_equal(err, "m.h5: key 'model.d_model' is 16 in the model file but 64 in run.ini");
    c = base;
    c.ffn[2] = MP_FFN_PEER;
    assert_int_equal(mp_model_file_check_config(&f, &c, "m.h5", "run.ini", err, sizeof err), -1);
    assert_non_null(strstr(err, "'model.ffn' is dense,peer,pkm in the model file but dense,peer,peer"));
    c = base;
    c.pkm.topk = 4;
    assert_int_equal(mp_model_file_check_config(&f, &c, "m.h5", "run.ini", err, sizeof err), -1);
    assert_non_null(strstr(err, "'pkm.topk' is 3"));
    // Retrieval keys of a kind no layer uses do not matter.
    f.ffn[2] = c.ffn[2] = MP_FFN_DENSE;
    assert_int_equal(mp_model_file_check_config(&f, &c, "m.h5", "run.ini", err, sizeof err), 0);
}

static void test_truncated(void **state) {
    (void)state;
    char path[300], err[512];
    path_in_dir(path, sizeof path, "truncated.h5");
    copy_prefix(saved, path, file_size(saved) / 2);
    expect_load_error(&base, path, path, NULL);
    mp_config c;
    assert_int_equal(mp_model_file_config(path, &c, err, sizeof err), -1);
    assert_non_null(strstr(err, path));
}

// Flips bytes inside the stored data of /params/wte (located with H5Dget_chunk_info): the
// Fletcher32 check must fail the read and the message must name the dataset.
static void test_corrupt_chunk(void **state) {
    (void)state;
    char path[300];
    path_in_dir(path, sizeof path, "corrupt.h5");
    copy_prefix(saved, path, file_size(saved));
    hid_t f = H5Fopen(path, H5F_ACC_RDONLY, H5P_DEFAULT);
    hid_t d = H5Dopen2(f, "/params/wte", H5P_DEFAULT);
    hid_t sp = H5Dget_space(d);
    hsize_t offset[2], size = 0;
    haddr_t addr = 0;
    unsigned mask = 0;
    assert_true(H5Dget_chunk_info(d, sp, 0, offset, &mask, &addr, &size) >= 0);
    H5Sclose(sp);
    H5Dclose(d);
    H5Fclose(f);
    assert_true(size > 64);

    FILE *fp = fopen(path, "r+b");
    assert_non_null(fp);
    unsigned char buf[8];
    assert_int_equal(fseek(fp, (long)(addr + size / 2), SEEK_SET), 0);
    assert_int_equal(fread(buf, 1, sizeof buf, fp), sizeof buf);
    // XOR with 0x5a, not 0xff: Fletcher32 works mod 65535 and cannot see 0x0000 <-> 0xffff.
    for (size_t i = 0; i < sizeof buf; i++) buf[i] ^= 0x5a;
    assert_int_equal(fseek(fp, (long)(addr + size / 2), SEEK_SET), 0);
    assert_int_equal(fwrite(buf, 1, sizeof buf, fp), sizeof buf);
    fclose(fp);
    expect_load_error(&base, path, "dataset '/params/wte': read failed", "checksum");
}

static void test_not_a_model(void **state) {
    (void)state;
    char path[300], err[512];
    mp_config c;
    path_in_dir(path, sizeof path, "text.h5");
    const char *text = "this is not an HDF5 file\n";
    write_bytes(path, text, strlen(text));
    expect_load_error(&base, path, "not an HDF5 file", path);
    assert_int_equal(mp_model_file_config(path, &c, err, sizeof err), -1);
    assert_non_null(strstr(err, "not an HDF5 file"));

    path_in_dir(path, sizeof path, "missing.h5");
    expect_load_error(&base, path, "cannot open", path);

    // An HDF5 file of something else.
    path_in_dir(path, sizeof path, "other.h5");
    hid_t f = H5Fcreate(path, H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT);
    assert_true(f >= 0);
    H5Fclose(f);
    expect_load_error(&base, path, "not a millipede model file", path);
    assert_int_equal(mp_model_file_config(path, &c, err, sizeof err), -1);
    assert_non_null(strstr(err, "not a millipede model file"));

    // Saving into a directory that does not exist is a one-line error too.
    mp_model *m = make_model(&base);
    path_in_dir(path, sizeof path, "no/such/dir/model.h5");
    assert_int_equal(mp_model_save(m, path, 0, err, sizeof err), -1);
    assert_non_null(strstr(err, "cannot create model file"));
    mp_model_free(m);
}

int main(int argc, char **argv) {
    MPI_Init(&argc, &argv);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_round_trip),   cmocka_unit_test(test_layout),
        cmocka_unit_test(test_partial_load), cmocka_unit_test(test_shape_mismatch),
        cmocka_unit_test(test_config_check), cmocka_unit_test(test_truncated),
        cmocka_unit_test(test_corrupt_chunk), cmocka_unit_test(test_not_a_model),
    };
    int rc = cmocka_run_group_tests(tests, group_setup, group_teardown);
    MPI_Finalize();
    return rc;
}
