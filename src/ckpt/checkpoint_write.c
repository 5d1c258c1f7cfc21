// Writing a checkpoint (checkpoint.h, docs/checkpoints.md). Every rank writes its own
// shard file with the serial HDF5 API, then rank 0 writes index.h5 with the replicated
// state and the virtual datasets over the shards, and commits:
//   1. rank 0: remove leftovers of interrupted writes, create step_%08d.tmp/
//   2. every rank: write and fsync shard_%05d.h5 (its expert rows and their moments)
//   3. rank 0: write and fsync index.h5 (it records each shard's size), fsync the
//      directory, remove any checkpoint of this step or later (ck_drop_from), rename it
//      to step_%08d/, fsync checkpoints/, replace `latest`, prune
// Each stage ends in an agreement, so all ranks return the same outcome.
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "ckpt/checkpoint_private.h"
#include "core/fs.h"
#include "core/agree.h"
#include "core/log.h"
#include "core/watchdog.h"

#define STAGE_BYTES ((size_t)64 << 20)   // host staging buffer for device -> file copies

// Test hook: MILLIPEDE_FAULT_CKPT="RANK:STEP" makes that rank die by SIGKILL halfway
// through writing its shard of the step-STEP checkpoint, as a node crash would.
static int fault_ckpt(int rank, long step) {
    const char *f = getenv("MILLIPEDE_FAULT_CKPT");
    int r;
    long s;
    return f && sscanf(f, "%d:%ld", &r, &s) == 2 && r == rank && s == step;
}

// Writes the rows of d's buffer (rows x cols) into dataset dset (same shape), in blocks of
// whole chunks through a host buffer.
static int write_rows(hid_t dset, const ck_ds *d, const mp_backend *be, float *host,
                      size_t host_floats) {
    hsize_t cols = ck_cols(d), rows = d->rows, chunk[2];
    hsize_t dims[2] = {rows, cols};
    mp_h5_chunk_dims(d->ndim, dims, chunk);
    hsize_t block = host_floats / cols;
    block = block < chunk[0] ? chunk[0] : block / chunk[0] * chunk[0];
    if (block * cols > host_floats) mp_fatal("%s: a chunk does not fit the staging buffer", d->path);
    hid_t fspace = MP_CHECK_H5(H5Dget_space(dset));
    int rc = 0;
    for (hsize_t r0 = 0; r0 < rows && rc == 0; r0 += block) {
        mp_watchdog_beat("writing a checkpoint");
        hsize_t n = rows - r0 < block ? rows - r0 : block;
        be->to_host(host, d->buf + r0 * cols, n * cols * sizeof(float));
        hsize_t start[2] = {r0, 0}, count[2] = {n, cols};
        hid_t mspace = MP_CHECK_H5(H5Screate_simple(d->ndim, count, NULL));
        MP_CHECK_H5(H5Sselect_hyperslab(fspace, H5S_SELECT_SET, start, NULL, count, NULL));
        if (H5Dwrite(dset, H5T_NATIVE_FLOAT, mspace, fspace, H5P_DEFAULT, host) < 0) rc = -1;
        MP_CHECK_H5(H5Sclose(mspace));
    }
    MP_CHECK_H5(H5Sclose(fspace));
    return rc;
}

static size_t stage_floats(const ck_ds *ds, int n) {
    size_t most = 1;
    for (int i = 0; i < n; i++) {
        size_t e = (size_t)(ds[i].rows * ck_cols(&ds[i]));
        if (e > most) most = e;
    }
    size_t cap = STAGE_BYTES / sizeof(float);
    return most < cap ? most : cap;
}

static void create_groups(hid_t file, int with_state) {
    for (int g = 0; g < CK_N_GROUPS; g++)
        if (g != CK_STATE || with_state) mp_h5_create_group(file, ck_group_names[g]);
}

// Closes, fsyncs and measures a file we wrote. Returns -1 with err set.
static int finish_file(hid_t file, const char *path, long long *bytes, char *err, size_t err_len) {
    if (H5Fclose(file) < 0) {
        snprintf(err, err_len, "%s: closing failed (disk full?)", path);
        return -1;
    }
    struct stat st;
    // HDF5 does not fsync; without it a crash after the rename could leave a complete-looking
    // checkpoint whose data never reached the disk.
    if (mp_fsync_path(path, O_RDONLY) != 0 || stat(path, &st) != 0) {
        snprintf(err, err_len, "%s: fsync failed: %s", path, strerror(errno));
        return -1;
    }
    *bytes = (long long)st.st_size;
    return 0;
}

// Stage 2: this rank's shard. Returns -1 with err set.
static int write_shard(const char *path, const ck_ds *ds, int n, const mp_backend *be, int rank,
                       int P, long step, long long *bytes, char *err, size_t err_len) {
    mp_h5_quiet q = mp_h5_quiet_begin();
    hid_t fapl = ck_fapl();
    hid_t file = H5Fcreate(path, H5F_ACC_EXCL, H5P_DEFAULT, fapl);
    H5Pclose(fapl);
    if (file < 0) {
        char h5[256];
        snprintf(err, err_len, "%s: cannot create checkpoint shard (rank %d): %s", path, rank,
                 mp_h5_last_error(h5));
        mp_h5_quiet_end(q);
        return -1;
    }
    mp_h5_quiet_end(q);
    mp_h5_write_str_attr(file, "format", MP_CKPT_SHARD_FORMAT);
    mp_h5_write_i64_attr(file, "version", MP_CKPT_VERSION);
    mp_h5_write_i64_attr(file, "rank", rank);
    mp_h5_write_i64_attr(file, "n_ranks", P);
    mp_h5_write_i64_attr(file, "step", step);
    create_groups(file, 0);
    size_t nf = stage_floats(ds, n);
    float *host = mp_malloc(nf * sizeof(float));
    int rc = 0, written = 0;
    for (int i = 0; i < n && rc == 0; i++) {
        const ck_ds *d = &ds[i];
        if (!d->sharded) continue;
        hsize_t dims[2] = {d->rows, ck_cols(d)};
        hid_t dset = mp_h5_create_f32(file, d->path, d->ndim, dims);
        mp_h5_write_i64_attr(dset, "row_start", (long long)d->row_start);
        mp_h5_write_i64_attr(dset, "global_rows", (long long)d->dims[0]);
        rc = write_rows(dset, d, be, host, nf);
        MP_CHECK_H5(H5Dclose(dset));
        if (rc != 0) snprintf(err, err_len, "%s: writing '%s' failed (disk full?)", path, d->path);
        if (++written == 1 && fault_ckpt(rank, step)) {
            H5Fflush(file, H5F_SCOPE_GLOBAL);
            fprintf(stderr, "millipede: rank %d: MILLIPEDE_FAULT_CKPT: killing myself while "
                    "writing %s\n", rank, path);
            fflush(stderr);
            raise(SIGKILL);
        }
    }
    free(host);
    if (rc != 0) {
        H5Fclose(file);
        return -1;
    }
    return finish_file(file, path, bytes, err, err_len);
}

// A small chunked, checksummed dataset of int64 (1-D or 2-D) or fixed strings.
static void write_small(hid_t file, const char *path, hid_t file_type, hid_t mem_type, int ndim,
                        const hsize_t *dims, const void *data) {
    hid_t dcpl = MP_CHECK_H5(H5Pcreate(H5P_DATASET_CREATE));
    MP_CHECK_H5(H5Pset_chunk(dcpl, ndim, dims));
    MP_CHECK_H5(H5Pset_fletcher32(dcpl));
    hid_t sp = MP_CHECK_H5(H5Screate_simple(ndim, dims, NULL));
    hid_t d = MP_CHECK_H5(H5Dcreate2(file, path, file_type, sp, H5P_DEFAULT, dcpl, H5P_DEFAULT));
    MP_CHECK_H5(H5Dwrite(d, mem_type, H5S_ALL, H5S_ALL, H5P_DEFAULT, data));
    MP_CHECK_H5(H5Dclose(d));
    MP_CHECK_H5(H5Sclose(sp));
    MP_CHECK_H5(H5Pclose(dcpl));
}

// The virtual dataset of expert table d: rows [start_p, end_p) map onto shard p's dataset
// of the same path. Source files are named relative to the index, so the directory can be
// moved or renamed. Unmapped or unreadable source data would read as the fill value, NaN,
// never as plausible numbers.
static void create_virtual(hid_t file, const ck_ds *d, const ck_layout *lay, int t) {
    hsize_t cols = ck_cols(d);
    hid_t vspace = MP_CHECK_H5(H5Screate_simple(d->ndim, d->dims, NULL));
    hid_t dcpl = MP_CHECK_H5(H5Pcreate(H5P_DATASET_CREATE));
    float nan = NAN;
    MP_CHECK_H5(H5Pset_fill_value(dcpl, H5T_NATIVE_FLOAT, &nan));
    for (int p = 0; p < lay->P; p++) {
        const long long *r = lay->rows + ((size_t)t * lay->P + p) * 2;
        hsize_t start[2] = {(hsize_t)r[0], 0}, count[2] = {(hsize_t)(r[1] - r[0]), cols};
        if (count[0] == 0) continue;
        hid_t src = MP_CHECK_H5(H5Screate_simple(d->ndim, count, NULL));
        MP_CHECK_H5(H5Sselect_hyperslab(vspace, H5S_SELECT_SET, start, NULL, count, NULL));
        MP_CHECK_H5(H5Pset_virtual(dcpl, vspace, lay->files[p], d->path, src));
        MP_CHECK_H5(H5Sclose(src));
    }
    MP_CHECK_H5(H5Sselect_all(vspace));
    hid_t dset = MP_CHECK_H5(H5Dcreate2(file, d->path, H5T_IEEE_F32LE, vspace, H5P_DEFAULT, dcpl,
                                        H5P_DEFAULT));
    MP_CHECK_H5(H5Dclose(dset));
    MP_CHECK_H5(H5Pclose(dcpl));
    MP_CHECK_H5(H5Sclose(vspace));
}

// Stage 3 (rank 0): index.h5. Returns -1 with err set.
static int write_index(const char *path, mp_model *m, const mp_adamw *opt, const ck_ds *ds,
                       int n, const ck_layout *lay, long step, long long *bytes, char *err,
                       size_t err_len) {
    const mp_config *cfg = mp_model_config(m);
    mp_h5_quiet q = mp_h5_quiet_begin();
    hid_t fapl = ck_fapl();
    hid_t file = H5Fcreate(path, H5F_ACC_EXCL, H5P_DEFAULT, fapl);
    H5Pclose(fapl);
    if (file < 0) {
        char h5[256];
        snprintf(err, err_len, "%s: cannot create checkpoint index: %s", path, mp_h5_last_error(h5));
        mp_h5_quiet_end(q);
        return -1;
    }
    mp_h5_quiet_end(q);

    size_t ini_len = mp_config_to_ini(cfg, NULL, 0) + 1;
    char *ini = mp_malloc(ini_len);
    mp_config_to_ini(cfg, ini, ini_len);
    mp_h5_write_str_attr(file, "format", MP_CKPT_FORMAT);
    mp_h5_write_i64_attr(file, "version", MP_CKPT_VERSION);
    mp_h5_write_i64_attr(file, "step", step);
    mp_h5_write_i64_attr(file, "n_ranks", lay->P);
    mp_h5_write_str_attr(file, "config", ini);
    free(ini);
    // The training state beyond the tensors. Every random number of millipede is a pure
    // function of (train.seed, stream, counter) (src/core/rng.h), so the RNG state and the
    // data position are the seed and the next step; they are stored explicitly anyway.
    mp_h5_write_i64_attr(file, "adam_t", opt ? opt->t : 0);
    uint64_t seed = cfg->seed;
    mp_h5_write_scalar_attr(file, "seed", H5T_STD_U64LE, H5T_NATIVE_UINT64, &seed);
    mp_h5_write_i64_attr(file, "data_next_step", step);     // sampler stream 0, next step
    mp_h5_write_i64_attr(file, "schedule_step", step);      // lr schedule position
    mp_h5_write_str_attr(file, "rng",
                         "counter-based splitmix64: value = f(seed, stream, index); streams: "
                         "0 train batches, 1 validation batches, 2 sampling, FNV-1a(tensor "
                         "name) init; no state beyond seed and step");
    char when[64];
    time_t now = time(NULL);
    strftime(when, sizeof when, "%Y-%m-%dT%H:%M:%SZ", gmtime(&now));
    mp_h5_write_str_attr(file, "created", when);
    unsigned maj = 0, min = 0, rel = 0;
    H5get_libversion(&maj, &min, &rel);
    char ver[64];
    snprintf(ver, sizeof ver, "HDF5 %u.%u.%u", maj, min, rel);
    mp_h5_write_str_attr(file, "writer", ver);

    mp_h5_write_tokenizer(file, mp_model_tokenizer(m));
    create_groups(file, 1);
    mp_h5_create_group(file, "layout");
    mp_h5_create_group(file, "layout/rows");
    size_t nf = stage_floats(ds, n);
    float *host = mp_malloc(nf * sizeof(float));
    int rc = 0;
    for (int i = 0; i < n && rc == 0; i++) {
        const ck_ds *d = &ds[i];
        if (d->sharded) {
            create_virtual(file, d, lay, ck_layout_table(lay, d->name));
            continue;
        }
        hid_t dset = mp_h5_create_f32(file, d->path, d->ndim, d->dims);
        rc = write_rows(dset, d, mp_model_backend(m), host, nf);
        MP_CHECK_H5(H5Dclose(dset));
        if (rc != 0) snprintf(err, err_len, "%s: writing '%s' failed (disk full?)", path, d->path);
    }
    free(host);
    hsize_t dims[2] = {(hsize_t)lay->P, 2};
    hid_t strtype = MP_CHECK_H5(H5Tcopy(H5T_C_S1));
    MP_CHECK_H5(H5Tset_size(strtype, sizeof lay->files[0]));
    write_small(file, "/layout/shard_files", strtype, strtype, 1, dims, lay->files);
    MP_CHECK_H5(H5Tclose(strtype));
    write_small(file, "/layout/shard_bytes", H5T_STD_I64LE, H5T_NATIVE_LLONG, 1, dims, lay->bytes);
    for (int t = 0; t < lay->n_tables; t++) {
        char p[128];
        snprintf(p, sizeof p, "/layout/rows/%s", lay->names[t]);
        write_small(file, p, H5T_STD_I64LE, H5T_NATIVE_LLONG, 2, dims,
                    lay->rows + (size_t)t * lay->P * 2);
    }
    if (rc != 0) {
        H5Fclose(file);
        return -1;
    }
    return finish_file(file, path, bytes, err, err_len);
}

// The layout as written: every rank's rows of every expert table and its shard's size,
// gathered by a sum over ranks (each contributes its own entries; values < 2^53 are exact).
static void gather_layout(mp_comm *comm, const ck_ds *ds, int n, long long my_bytes,
                          ck_layout *lay) {
    int P = comm ? comm->size : 1, rank = comm ? comm->rank : 0;
    memset(lay, 0, sizeof *lay);
    lay->P = P;
    for (int i = 0; i < n; i++) lay->n_tables += ds[i].sharded && ds[i].group == CK_PARAMS;
    int T = lay->n_tables;
    lay->files = mp_calloc((size_t)P, sizeof *lay->files);
    lay->bytes = mp_calloc((size_t)P, sizeof *lay->bytes);
    lay->names = mp_calloc((size_t)(T ? T : 1), sizeof *lay->names);
    lay->rows = mp_calloc((size_t)(T ? T : 1) * P * 2, sizeof *lay->rows);
    double *g = mp_calloc((size_t)(T * 2 + 1) * P, sizeof(double));
    int t = 0;
    for (int i = 0; i < n; i++) {
        if (!(ds[i].sharded && ds[i].group == CK_PARAMS)) continue;
        snprintf(lay->names[t], sizeof lay->names[0], "%s", ds[i].name);
        g[((size_t)t * P + rank) * 2] = (double)ds[i].row_start;
        g[((size_t)t * P + rank) * 2 + 1] = (double)(ds[i].row_start + ds[i].rows);
        t++;
    }
    g[(size_t)T * 2 * P + rank] = (double)my_bytes;
    if (comm && P > 1) comm->allreduce_f64(comm, g, (size_t)(T * 2 + 1) * P);
    for (size_t k = 0; k < (size_t)T * P * 2; k++) lay->rows[k] = (long long)g[k];
    for (int p = 0; p < P; p++) {
        lay->bytes[p] = (long long)g[(size_t)T * 2 * P + p];
        snprintf(lay->files[p], sizeof lay->files[0], CK_SHARD_NAME, p);
    }
    free(g);
}

int mp_ckpt_save(const char *root, mp_model *m, const mp_adamw *opt, long step, int keep,
                 char *dir_out, size_t dir_len, mp_ckpt_stats *stats, char *err, size_t err_len) {
    double t0 = mp_now();
    mp_comm *comm = mp_model_comm(m);
    int rank = comm ? comm->rank : 0, P = comm ? comm->size : 1;
    char name[32], final[CK_PATH], tmp[CK_PATH + 16], path[CK_PATH + 32], shard[32];
    snprintf(name, sizeof name, CK_STEP_NAME, step);
    ck_join(final, sizeof final, root, name);
    snprintf(tmp, sizeof tmp, "%s.tmp", final);
    if (dir_out) snprintf(dir_out, dir_len, "%s", final);
    err[0] = '\0';

    // 1. a fresh .tmp directory
    int rc = 0;
    if (rank == 0) {
        rc = mp_mkdirs(root, err, err_len);
        if (rc == 0) {
            ck_remove_tmp_dirs(root);
            if (mkdir(tmp, 0755) != 0) {
                snprintf(err, err_len, "%s: cannot create checkpoint directory: %s", tmp,
                         strerror(errno));
                rc = -1;
            }
        }
    }
    if (mp_agree(rc, err, err_len) != 0) return -1;

    // 2. the shards
    ck_ds *ds;
    int n = ck_datasets(m, opt, &ds);
    snprintf(shard, sizeof shard, CK_SHARD_NAME, rank);
    ck_join(path, sizeof path, tmp, shard);
    long long my_bytes = 0;
    rc = write_shard(path, ds, n, mp_model_backend(m), rank, P, step, &my_bytes, err, err_len);
    if (mp_agree(rc, err, err_len) != 0) {
        free(ds);
        return -1;
    }
    ck_layout lay;
    gather_layout(comm, ds, n, my_bytes, &lay);

    // 3. the index and the commit
    double total = 0;
    for (int p = 0; p < P; p++) total += (double)lay.bytes[p];
    if (rank == 0) {
        long long index_bytes = 0;
        ck_join(path, sizeof path, tmp, MP_CKPT_INDEX);
        rc = write_index(path, m, opt, ds, n, &lay, step, &index_bytes, err, err_len);
        total += (double)index_bytes;
        if (rc == 0 && mp_fsync_path(tmp, O_RDONLY | O_DIRECTORY) != 0) {
            snprintf(err, err_len, "%s: fsync failed: %s", tmp, strerror(errno));
            rc = -1;
        }
        // Checkpoints of this step or later (an abandoned history, or a bad one we fell
        // back from) go first: the new one must be the newest (ck_drop_from).
        if (rc == 0) rc = ck_drop_from(root, step, err, err_len);
        if (rc == 0 && rename(tmp, final) != 0) {
            snprintf(err, err_len, "%s: cannot rename to %s: %s", tmp, final, strerror(errno));
            rc = -1;
        }
        if (rc == 0) {
            mp_fsync_path(root, O_RDONLY | O_DIRECTORY);   // best effort, as in ck_set_latest
            rc = ck_set_latest(root, step, err, err_len);
        }
        if (rc == 0) ck_prune(root, step, keep);
    }
    if (comm && P > 1) comm->broadcast(comm, &total, sizeof total, 0);
    rc = mp_agree(rc, err, err_len);
    if (stats) {
        stats->bytes = total;
        stats->seconds = mp_now() - t0;
        stats->n_files = P + 1;
    }
    ck_layout_free(&lay);
    free(ds);
    return rc;
}
