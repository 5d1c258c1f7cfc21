// Reading a checkpoint (checkpoint.h, docs/checkpoints.md). Each rank opens index.h5 and
// reads the rows it holds now, [row_start, row_start + rows), of every dataset: the
// replicated ones whole, the expert tables through their virtual datasets, whatever rank
// count wrote them. Before that it checks the shard files behind its rows (present, the
// recorded size, the right shard), because HDF5 reads a missing source file of a virtual
// dataset as fill values; after a failed read it re-reads those shards directly to name
// the file and dataset that is bad.
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "ckpt/checkpoint_private.h"
#include "core/agree.h"
#include "core/log.h"
#include "core/watchdog.h"
#include "millipede/model_file.h"

#define STAGE_BYTES ((size_t)64 << 20)   // host staging buffer for file -> device copies

int mp_ckpt_read_config(const char *dir, mp_config *cfg, mp_ckpt_info *info, char *err,
                        size_t err_len) {
    char *text = NULL, index[CK_PATH];
    mp_h5_quiet q = mp_h5_quiet_begin();
    hid_t file = ck_open_index(dir, info, &text, err, err_len);
    if (file >= 0) H5Fclose(file);
    mp_h5_quiet_end(q);
    if (file < 0) return -1;
    ck_join(index, sizeof index, dir, MP_CKPT_INDEX);
    mp_config_defaults(cfg);
    int rc = mp_config_from_ini_string(cfg, text, index, err, err_len);
    if (rc == 0) rc = mp_config_validate(cfg, err, err_len);
    free(text);
    return rc;
}

// Reads rows [r0, r0 + n) of dataset dset (rows x cols) into dst (backend memory) through
// a host buffer of host_floats. Returns -1 when HDF5 fails (a checksum, most likely).
static int read_rows(hid_t dset, int ndim, hsize_t r0, hsize_t n, hsize_t cols, float *dst,
                     const mp_backend *be, float *host, size_t host_floats) {
    hsize_t block = host_floats / cols;
    if (block < 1)
        mp_fatal("rows of %llu floats do not fit the staging buffer", (unsigned long long)cols);
    hid_t fspace = H5Dget_space(dset);
    if (fspace < 0) return -1;
    int rc = 0;
    for (hsize_t done = 0; done < n && rc == 0; done += block) {
        mp_watchdog_beat("reading a checkpoint");
        hsize_t k = n - done < block ? n - done : block;
        hsize_t start[2] = {r0 + done, 0}, count[2] = {k, cols};
        // The selection fails on a dataset of another rank or shape (a damaged shard file
        // that diagnose() reads directly): bad input, reported like a failed read.
        hid_t mspace = H5Screate_simple(ndim, count, NULL);
        if (mspace < 0 ||
            H5Sselect_hyperslab(fspace, H5S_SELECT_SET, start, NULL, count, NULL) < 0 ||
            H5Dread(dset, H5T_NATIVE_FLOAT, mspace, fspace, H5P_DEFAULT, host) < 0)
            rc = -1;
        else if (dst)
            be->from_host(dst + done * cols, host, k * cols * sizeof(float));
        if (mspace >= 0) H5Sclose(mspace);
    }
    H5Sclose(fspace);
    return rc;
}

// After a failed read of expert table d through the index: reads the rows behind it from
// each shard directly and names the first one that fails. 0 when all of them read.
static int diagnose(const char *dir, const ck_layout *lay, const ck_ds *d, float *host,
                    size_t host_floats, char *err, size_t err_len) {
    int t = ck_layout_table(lay, d->name);
    if (t < 0) return 0;
    hsize_t lo = d->row_start, hi = d->row_start + d->rows;
    for (int p = 0; p < lay->P; p++) {
        const long long *r = lay->rows + ((size_t)t * lay->P + p) * 2;
        hsize_t a = (hsize_t)r[0] > lo ? (hsize_t)r[0] : lo, b = (hsize_t)r[1] < hi ? (hsize_t)r[1] : hi;
        if (a >= b) continue;
        char path[CK_PATH];
        ck_join(path, sizeof path, dir, lay->files[p]);
        hid_t f = H5Fopen(path, H5F_ACC_RDONLY, H5P_DEFAULT);
        if (f < 0) {
            snprintf(err, err_len, "%s: cannot open as HDF5 (corrupt file)", path);
            return -1;
        }
        hid_t dset = mp_h5_exists(f, d->path) ? H5Dopen2(f, d->path, H5P_DEFAULT) : -1;
        int rc = dset < 0 ? -1
                          : read_rows(dset, d->ndim, a - (hsize_t)r[0], b - a, ck_cols(d), NULL,
                                      NULL, host, host_floats);
        if (dset >= 0) H5Dclose(dset);
        H5Fclose(f);
        if (rc != 0) {
            snprintf(err, err_len, "%s: dataset '%s': %s", path, d->path,
                     dset < 0 ? "missing" : "read failed (checksum mismatch or corrupt data)");
            return -1;
        }
    }
    return 0;
}

// Checks one dataset of the index (presence, type, global shape) and reads the held rows.
static int read_dataset(hid_t file, const char *index, const char *dir, const ck_layout *lay,
                        const ck_ds *d, const mp_backend *be, float *host, size_t host_floats,
                        char *err, size_t err_len) {
    char want[64], have[64];
    mp_h5_shape_str(want, sizeof want, d->ndim, d->dims);
    if (!mp_h5_exists(file, d->path)) {
        snprintf(err, err_len, "%s: dataset '%s' is missing (expected shape %s for this config)",
                 index, d->path, want);
        return -1;
    }
    hid_t dset = H5Dopen2(file, d->path, H5P_DEFAULT);
    if (dset < 0) {
        snprintf(err, err_len, "%s: '%s' is not a readable dataset", index, d->path);
        return -1;
    }
    int rc = -1;
    hid_t ft = H5Dget_type(dset), fspace = H5Dget_space(dset);
    hsize_t dims[H5S_MAX_RANK];
    int ndim = fspace >= 0 ? H5Sget_simple_extent_ndims(fspace) : -1;
    if (ft < 0 || ndim < 0 || ndim > 2) {
        snprintf(err, err_len, "%s: dataset '%s': cannot read its type or shape", index, d->path);
    } else if (H5Sget_simple_extent_dims(fspace, dims, NULL),
               ndim != d->ndim || dims[0] != d->dims[0] || (ndim == 2 && dims[1] != d->dims[1])) {
        mp_h5_shape_str(have, sizeof have, ndim, dims);
        snprintf(err, err_len, "%s: dataset '%s' has shape %s, expected %s for this config",
                 index, d->path, have, want);
    } else if (H5Tget_class(ft) != H5T_FLOAT) {
        snprintf(err, err_len, "%s: dataset '%s' is not floating point (expected float32)", index,
                 d->path);
    } else if (read_rows(dset, d->ndim, d->row_start, d->rows, ck_cols(d), d->buf, be, host,
                         host_floats) != 0) {
        if (!d->sharded || diagnose(dir, lay, d, host, host_floats, err, err_len) == 0)
            snprintf(err, err_len, "%s: dataset '%s': read failed (checksum mismatch or corrupt "
                     "data)", index, d->path);
    } else {
        rc = 0;
    }
    if (fspace >= 0) H5Sclose(fspace);
    if (ft >= 0) H5Tclose(ft);
    H5Dclose(dset);
    return rc;
}

// Every shard file behind the expert rows this model holds must be there and intact before
// the virtual datasets are read (see the top of this file).
static int check_my_shards(const char *dir, const char *index, const ck_layout *lay,
                           const ck_ds *ds, int n, long step, char *err, size_t err_len) {
    char *checked = mp_calloc((size_t)lay->P, 1);
    int rc = 0;
    for (int i = 0; i < n && rc == 0; i++) {
        const ck_ds *d = &ds[i];
        if (!d->sharded || d->group != CK_PARAMS) continue;
        int t = ck_layout_table(lay, d->name);
        if (t < 0) {
            snprintf(err, err_len, "%s: dataset '/layout/rows/%s' is missing", index, d->name);
            rc = -1;
            break;
        }
        const long long *r = lay->rows + (size_t)t * lay->P * 2;
        if ((hsize_t)r[2 * lay->P - 1] != d->dims[0]) {
            snprintf(err, err_len, "%s: dataset '/layout/rows/%s' covers %lld rows, expected %llu",
                     index, d->name, r[2 * lay->P - 1], (unsigned long long)d->dims[0]);
            rc = -1;
            break;
        }
        for (int p = 0; p < lay->P && rc == 0; p++) {
            if (checked[p] || (hsize_t)r[2 * p + 1] <= d->row_start ||
                (hsize_t)r[2 * p] >= d->row_start + d->rows)
                continue;
            checked[p] = 1;
            rc = ck_check_shard(dir, lay, p, step, err, err_len);
        }
    }
    free(checked);
    return rc;
}

int mp_ckpt_load(const char *dir, mp_model *m, mp_adamw *opt, const char *cfg_name,
                 mp_ckpt_info *info, char *err, size_t err_len) {
    char index[CK_PATH], *text = NULL;
    ck_join(index, sizeof index, dir, MP_CKPT_INDEX);
    mp_ckpt_info inf;
    mp_h5_quiet q = mp_h5_quiet_begin();
    hid_t file = ck_open_index(dir, &inf, &text, err, err_len);
    if (file < 0) {
        mp_h5_quiet_end(q);
        return MP_CKPT_EBAD;
    }
    int rc = MP_CKPT_EBAD;
    ck_layout lay = {0};
    ck_ds *ds = NULL;
    float *host = NULL;
    mp_config fcfg;
    mp_config_defaults(&fcfg);
    if (mp_config_from_ini_string(&fcfg, text, index, err, err_len) != 0 ||
        mp_config_validate(&fcfg, err, err_len) != 0)
        goto done;
    if (mp_check_shape_config(&fcfg, mp_model_config(m), index, "the checkpoint", cfg_name, err,
                              err_len) != 0 ||
        mp_check_state_config(&fcfg, mp_model_config(m), index, "the checkpoint", cfg_name, err,
                              err_len) != 0) {
        rc = MP_CKPT_EMISMATCH;
        goto done;
    }
    if (ck_layout_read(file, index, &lay, err, err_len) != 0) goto done;
    int n = ck_datasets(m, opt, &ds);
    if (check_my_shards(dir, index, &lay, ds, n, inf.step, err, err_len) != 0) goto done;
    size_t most = 1, cap = STAGE_BYTES / sizeof(float);
    for (int i = 0; i < n; i++)
        if ((size_t)(ds[i].rows * ck_cols(&ds[i])) > most) most = (size_t)(ds[i].rows * ck_cols(&ds[i]));
    size_t nf = most < cap ? most : cap;
    host = mp_malloc(nf * sizeof(float));
    for (int i = 0; i < n; i++)
        if (read_dataset(file, index, dir, &lay, &ds[i], mp_model_backend(m), host, nf, err,
                         err_len) != 0)
            goto done;
    // A checkpoint with extra parameters is a different model even if ours are all there.
    H5G_info_t gi;
    hid_t g = MP_CHECK_H5(H5Gopen2(file, "/params", H5P_DEFAULT));
    MP_CHECK_H5(H5Gget_info(g, &gi));
    MP_CHECK_H5(H5Gclose(g));
    if (gi.nlinks != (hsize_t)mp_model_n_tensors(m)) {
        snprintf(err, err_len, "%s: /params holds %llu tensors, expected %d for this config", index,
                 (unsigned long long)gi.nlinks, mp_model_n_tensors(m));
        rc = MP_CKPT_EMISMATCH;
        goto done;
    }
    struct mp_tokenizer *tok;   // the checkpoint's (NULL: bytes) replaces the model's
    if (mp_h5_read_tokenizer(file, index, &tok, err, err_len) != 0) goto done;
    mp_model_set_tokenizer(m, tok);
    if (opt) opt->t = inf.adam_t;
    if (info) *info = inf;
    rc = 0;
done:
    free(host);
    free(ds);
    free(text);
    ck_layout_free(&lay);
    H5Fclose(file);
    mp_h5_quiet_end(q);
    return rc;
}

// ----------------------------------------------------------------------------
// resume (collective)

// Rank 0 alone looks at the checkpoints directory: on a network file system two nodes can
// list it differently (a cached listing, a rename not yet seen), and ranks that tried
// different checkpoints would resume different states, or a different number of times.
// The others follow its order; a checkpoint that some rank cannot read is skipped by all.
static int resume_order(const char *root, long **order_out) {
    int k = 0;
    long *order = NULL;
    if (mp_rank() == 0) {
        long *steps;
        int n = ck_list_steps(root, &steps);
        long latest = ck_latest_step(root);
        char link[CK_PATH];
        ck_join(link, sizeof link, root, MP_CKPT_LATEST);
        struct stat st;
        if (latest < 0 && lstat(link, &st) == 0)
            fprintf(stderr, "millipede: warning: %s: not a link to a step_%%08d directory; looking "
                    "for checkpoints by name\n", link);
        order = mp_calloc((size_t)n + 1, sizeof *order);
        // newest first, `latest` in its place: a step_%08d directory newer than `latest`
        // was committed by a writer killed before it moved the link (checkpoint_dir.c)
        for (int i = 0; i < n; i++)
            if (steps[i] > latest) order[k++] = steps[i];
        if (latest >= 0) order[k++] = latest;
        for (int i = 0; i < n; i++)
            if (steps[i] < latest) order[k++] = steps[i];
        free(steps);
    }
    mp_broadcast0(&k, sizeof k);
    if (mp_rank() != 0) order = mp_calloc((size_t)k + 1, sizeof *order);
    mp_broadcast0(order, (size_t)k * sizeof *order);
    *order_out = order;
    return k;
}

int mp_ckpt_resume(const mp_config *cfg, mp_resume_mode mode, const char *path, mp_model *m,
                   mp_adamw *opt, mp_ckpt_info *info, char *used, size_t used_len) {
    if (mode == MP_RESUME_NONE) return 0;
    char err[1024], dir[CK_PATH], root[CK_PATH];
    const char *cfg_name = "the run's configuration";
    if (mode == MP_RESUME_PATH) {
        // rank 0 resolves the path (a `latest` link may move under us); all load that one
        char msg[1100];
        int rc = mp_rank() == 0 ? mp_ckpt_resolve(path, dir, sizeof dir, err, sizeof err) : 0;
        snprintf(msg, sizeof msg, "--resume %s", err);
        mp_agree_or_exit(rc, msg);
        mp_broadcast0(dir, sizeof dir);
        rc = mp_ckpt_load(dir, m, opt, cfg_name, info, err, sizeof err);
        snprintf(msg, sizeof msg, "--resume: %s", err);
        mp_agree_or_exit(rc, msg);
        snprintf(used, used_len, "%s", dir);
        return 1;
    }
    // automatic: from the newest, `latest` before older ones (resume_order)
    ck_join(root, sizeof root, cfg->run_dir, "checkpoints");
    long *order;
    int k = resume_order(root, &order);
    int resumed = 0;
    for (int i = 0; i < k && !resumed; i++) {
        char name[32];
        snprintf(name, sizeof name, CK_STEP_NAME, order[i]);
        ck_join(dir, sizeof dir, root, name);
        int rc = mp_ckpt_load(dir, m, opt, cfg_name, info, err, sizeof err);
        rc = mp_agree(rc, err, sizeof err);
        if (rc == 0) {
            resumed = 1;
        } else if (rc == MP_CKPT_EMISMATCH) {
            mp_input_error("%s (resuming from %s; use --no-resume or another run.dir to start "
                           "a different model)", err, dir);
        } else if (mp_rank() == 0) {
            fprintf(stderr, "millipede: warning: checkpoint %s is unusable: %s; %s\n", dir, err,
                    i + 1 < k ? "trying the previous one" : "no older checkpoint left");
        }
    }
    free(order);
    if (resumed) {
        snprintf(used, used_len, "%s", dir);
        return 1;
    }
    if (k > 0)
        mp_input_error("%s: no usable checkpoint among %d (see the warnings above); use "
                       "--no-resume to start from scratch", root, k);
    return 0;
}

// ----------------------------------------------------------------------------
// eval and sample

mp_model *mp_open_stored_model(const char *path, const mp_config *cfg, const char *cfg_path,
                               const mp_backend *be, int B, mp_comm *comm, mp_config *model_cfg,
                               char *err, size_t err_len) {
    struct stat st;
    if (stat(path, &st) != 0 || !S_ISDIR(st.st_mode))   // a model file (or nothing)
        return mp_model_open_file(path, cfg, cfg_path, be, B, comm, model_cfg, err, err_len);
    char dir[CK_PATH], index[CK_PATH];
    if (mp_ckpt_resolve(path, dir, sizeof dir, err, err_len) != 0) return NULL;
    mp_config fcfg;
    if (mp_ckpt_read_config(dir, &fcfg, NULL, err, err_len) != 0) return NULL;
    ck_join(index, sizeof index, dir, MP_CKPT_INDEX);
    if (mp_check_shape_config(&fcfg, cfg, index, "the checkpoint", cfg_path, err, err_len) != 0)
        return NULL;
    mp_merge_model_config(model_cfg, cfg, &fcfg);
    mp_model *m = comm ? mp_model_create_sharded(model_cfg, be, B, comm)
                       : mp_model_create(model_cfg, be, B);
    if (mp_ckpt_load(dir, m, NULL, cfg_path, NULL, err, err_len) != 0) {
        mp_model_free(m);
        return NULL;
    }
    return m;
}
