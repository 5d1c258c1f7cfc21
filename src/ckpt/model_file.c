// The single-file HDF5 model format (include/millipede/model_file.h, docs/outputs.md).
// Serial HDF5 API only, so it works with both serial and parallel HDF5 builds.
// Failures a user can cause (missing file, not HDF5, wrong shapes, corrupt data) become
// one-line messages; HDF5 calls that can only fail on a bug or a broken system go
// through MP_CHECK_H5.
#include "millipede/model_file.h"

#include <errno.h>
#include <fcntl.h>
#include <hdf5.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "ckpt/h5util.h"
#include "core/agree.h"
#include "core/log.h"

// One dataset the model file holds: where it lives in the model and its global shape.
typedef struct {
    char path[80];       // "/params/h2.peer.u"
    float *buf;          // backend memory
    int ndim;
    hsize_t dims[2];     // global shape
    hsize_t row_start;   // first row held in buf
    hsize_t rows;        // rows held in buf (dims[0] unless sharded)
} ds_spec;

static hsize_t ds_cols(const ds_spec *d) { return d->ndim == 2 ? d->dims[1] : 1; }

// Every dataset of m in file order: parameters (table order), then the router state.
// Returns the count; *out is malloc'd.
static int model_datasets(mp_model *m, ds_spec **out) {
    int nt = mp_model_n_tensors(m);
    ds_spec *ds = mp_calloc((size_t)nt + MP_MAX_STATE_DATASETS, sizeof *ds);
    int n = 0;
    for (int i = 0; i < nt; i++) {
        const mp_tensor *t = mp_model_tensor(m, i);
        ds_spec *d = &ds[n++];
        snprintf(d->path, sizeof d->path, "/params/%s", t->name);
        d->buf = mp_model_params(m, t->group) + t->offset;
        d->ndim = t->ndim;
        d->dims[0] = (hsize_t)(t->global_rows > 0 ? t->global_rows : t->shape[0]);
        d->dims[1] = t->ndim == 2 ? (hsize_t)t->shape[1] : 1;
        d->row_start = (hsize_t)t->row_start;
        d->rows = (hsize_t)t->shape[0];
    }
    mp_state_dataset st[MP_MAX_STATE_DATASETS];
    int n_st = mp_router_datasets(m, st);
    for (int i = 0; i < n_st; i++) {
        ds_spec *d = &ds[n++];
        snprintf(d->path, sizeof d->path, "/state/%.*s", (int)sizeof st[i].name, st[i].name);
        d->buf = mp_model_router_state(m) + st[i].offset;
        d->ndim = st[i].ndim;
        d->dims[0] = d->rows = st[i].rows;
        d->dims[1] = st[i].cols;
        d->row_start = 0;
    }
    *out = ds;
    return n;
}

// Opens an existing model file for reading and checks format and version. Returns the
// file id, or -1 with err set. Call inside quiet_begin/quiet_end.
static hid_t open_model_file(const char *path, char *err, size_t err_len) {
    FILE *f = fopen(path, "rb");
    if (!f) {
        snprintf(err, err_len, "%s: cannot open model file: %s", path, strerror(errno));
        return -1;
    }
    fclose(f);
    hid_t file = mp_h5_open_read(path, "expected a millipede model file",
                                 "truncated or corrupt file", err, err_len);
    if (file < 0) return -1;
    char *format = mp_h5_read_str_attr(file, "format");
    if (!format || strcmp(format, MP_MODEL_FORMAT)) {
        if (format)
            snprintf(err, err_len, "%s: not a millipede model file (format '%s', expected '%s')",
                     path, mp_h5_printable(format), MP_MODEL_FORMAT);
        else
            snprintf(err, err_len,
                     "%s: not a millipede model file (no root attribute 'format' = '%s')", path,
                     MP_MODEL_FORMAT);
        free(format);
        H5Fclose(file);
        return -1;
    }
    free(format);
    long long version = 0;
    if (mp_h5_read_int_attr(file, "version", &version) < 0) {
        snprintf(err, err_len, "%s: root attribute 'version' missing or not an integer", path);
        H5Fclose(file);
        return -1;
    }
    if (version != MP_MODEL_VERSION) {
        snprintf(err, err_len, "%s: model file version %lld is not supported (expected %d)", path,
                 version, MP_MODEL_VERSION);
        H5Fclose(file);
        return -1;
    }
    return file;
}

// ----------------------------------------------------------------------------
// save

static void create_dataset(hid_t file, const ds_spec *d) {
    MP_CHECK_H5(H5Dclose(mp_h5_create_f32(file, d->path, d->ndim, d->dims)));
}

// Local rows go to [row_start, row_start + rows) of the global dataset.
static void write_rows(hid_t file, const ds_spec *d, const mp_backend *be, float *host) {
    hsize_t cols = ds_cols(d);
    hid_t dset = MP_CHECK_H5(H5Dopen2(file, d->path, H5P_DEFAULT));
    hid_t fspace = MP_CHECK_H5(H5Dget_space(dset));
    be->to_host(host, d->buf, d->rows * cols * sizeof(float));
    hsize_t start[2] = {d->row_start, 0}, count[2] = {d->rows, cols};
    hid_t mspace = MP_CHECK_H5(H5Screate_simple(d->ndim, count, NULL));
    MP_CHECK_H5(H5Sselect_hyperslab(fspace, H5S_SELECT_SET, start, NULL, count, NULL));
    MP_CHECK_H5(H5Dwrite(dset, H5T_NATIVE_FLOAT, mspace, fspace, H5P_DEFAULT, host));
    MP_CHECK_H5(H5Sclose(mspace));
    MP_CHECK_H5(H5Dclose(dset));
    MP_CHECK_H5(H5Sclose(fspace));
}

// Rank `rank` writes its part into tmp: rank 0 creates the file with every dataset at its
// global shape and writes all it holds; each later rank writes only its own expert rows.
static int write_part(mp_model *m, const char *tmp, long step, int rank, char *err,
                      size_t err_len) {
    const mp_backend *be = mp_model_backend(m);
    ds_spec *ds;
    int n = model_datasets(m, &ds);
    size_t max_elems = 1;
    for (int i = 0; i < n; i++) {
        size_t e = (size_t)(ds[i].rows * ds_cols(&ds[i]));
        if (e > max_elems) max_elems = e;
    }
    mp_h5_quiet q = mp_h5_quiet_begin();
    hid_t file = rank == 0 ? H5Fcreate(tmp, H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT)
                           : H5Fopen(tmp, H5F_ACC_RDWR, H5P_DEFAULT);
    if (file < 0) {
        char h5[256];
        snprintf(err, err_len, "%s: cannot %s model file (rank %d): %s", tmp,
                 rank == 0 ? "create" : "open", rank, mp_h5_last_error(h5));
        mp_h5_quiet_end(q);
        free(ds);
        return -1;
    }
    mp_h5_quiet_end(q);
    if (rank == 0) {
        const mp_config *cfg = mp_model_config(m);
        char probe[1];
        size_t ini_len = mp_config_to_ini(cfg, probe, sizeof probe);
        char *ini = mp_malloc(ini_len + 1);
        mp_config_to_ini(cfg, ini, ini_len + 1);
        mp_h5_write_str_attr(file, "format", MP_MODEL_FORMAT);
        int version = MP_MODEL_VERSION;
        mp_h5_write_scalar_attr(file, "version", H5T_STD_I32LE, H5T_NATIVE_INT, &version);
        mp_h5_write_str_attr(file, "config", ini);
        mp_h5_write_tokenizer(file, mp_model_tokenizer(m));
        int64_t step64 = step;
        mp_h5_write_scalar_attr(file, "step", H5T_STD_I64LE, H5T_NATIVE_INT64, &step64);
        free(ini);
        hid_t g = MP_CHECK_H5(H5Gcreate2(file, "params", H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT));
        MP_CHECK_H5(H5Gclose(g));
        g = MP_CHECK_H5(H5Gcreate2(file, "state", H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT));
        MP_CHECK_H5(H5Gclose(g));
        for (int i = 0; i < n; i++) create_dataset(file, &ds[i]);
    }
    float *host = mp_malloc(max_elems * sizeof(float));
    for (int i = 0; i < n; i++)
        if (rank == 0 || ds[i].rows != ds[i].dims[0]) write_rows(file, &ds[i], be, host);
    free(host);
    free(ds);
    MP_CHECK_H5(H5Fflush(file, H5F_SCOPE_GLOBAL));
    MP_CHECK_H5(H5Fclose(file));
    return 0;
}

// Makes tmp the file path, durably. HDF5 does not fsync; without it a crash after the
// rename could leave a renamed file whose data never reached the disk.
static int commit_file(const char *tmp, const char *path, char *err, size_t err_len) {
    if (mp_fsync_path(tmp, O_RDONLY) < 0)
        return mp_errf(err, err_len, "%s: fsync failed: %s", tmp, strerror(errno));
    if (rename(tmp, path) < 0)
        return mp_errf(err, err_len, "%s: cannot rename to %s: %s", tmp, path, strerror(errno));
    // Make the rename itself durable. Some file systems refuse fsync on a directory; the
    // file is complete either way, so that is not an error.
    const char *slash = strrchr(path, '/');
    if (slash) {
        size_t dlen = slash == path ? 1 : (size_t)(slash - path);
        char *dir = mp_malloc(dlen + 1);
        memcpy(dir, path, dlen);
        dir[dlen] = '\0';
        mp_fsync_path(dir, O_RDONLY | O_DIRECTORY);
        free(dir);
    } else {
        mp_fsync_path(".", O_RDONLY | O_DIRECTORY);
    }
    return 0;
}

int mp_model_save(mp_model *m, const char *path, long step, char *err, size_t err_len) {
    mp_comm *comm = mp_model_comm(m);
    int rank = comm ? comm->rank : 0, P = comm ? comm->size : 1;
    if (!comm) {   // a model of one process must hold every row
        ds_spec *ds;
        int n = model_datasets(m, &ds);
        for (int i = 0; i < n; i++) {
            if (ds[i].rows == ds[i].dims[0]) continue;
            snprintf(err, err_len,
                     "%s: the model holds rows [%llu, %llu) of '%s' of %llu: a model file needs "
                     "all rows",
                     path, (unsigned long long)ds[i].row_start,
                     (unsigned long long)(ds[i].row_start + ds[i].rows), ds[i].path,
                     (unsigned long long)ds[i].dims[0]);
            free(ds);
            return -1;
        }
        free(ds);
    }
    size_t plen = strlen(path);
    char *tmp = mp_malloc(plen + 5);
    memcpy(tmp, path, plen);
    memcpy(tmp + plen, ".tmp", 5);
    // ranks take turns on one file, so serial HDF5 suffices; all agree on each outcome
    for (int r = 0; r < P; r++) {
        int rc = r == rank ? write_part(m, tmp, step, rank, err, err_len) : 0;
        if (mp_agree(rc, err, err_len) != 0) {
            free(tmp);
            return -1;
        }
    }
    // rank 0 commits; all ranks learn its outcome (a barrier here would leave the others
    // waiting for ever when rank 0 returned early on an error)
    int rc = rank == 0 ? commit_file(tmp, path, err, err_len) : 0;
    free(tmp);
    return mp_agree(rc, err, err_len) != 0 ? -1 : 0;
}

// ----------------------------------------------------------------------------
// load

int mp_model_file_config(const char *path, mp_config *cfg, char *err, size_t err_len) {
    mp_h5_quiet q = mp_h5_quiet_begin();
    hid_t file = open_model_file(path, err, err_len);
    if (file < 0) {
        mp_h5_quiet_end(q);
        return -1;
    }
    char *ini = mp_h5_read_str_attr(file, "config");
    H5Fclose(file);
    mp_h5_quiet_end(q);
    if (!ini) {
        snprintf(err, err_len, "%s: root attribute 'config' missing or not a string", path);
        return -1;
    }
    int rc = mp_config_from_ini_string(cfg, ini, path, err, err_len);
    free(ini);
    if (rc == 0) rc = mp_config_validate(cfg, err, err_len);
    return rc;
}

// Checks one dataset's presence, type and shape, then reads the held rows into d->buf.
static int read_dataset(hid_t file, const ds_spec *d, const char *path, const mp_backend *be,
                        float *host, char *err, size_t err_len) {
    char want[64], have[64];
    mp_h5_shape_str(want, sizeof want, d->ndim, d->dims);
    // H5Lexists needs each intermediate group to exist, so check the group first.
    const char *group = strncmp(d->path, "/params/", 8) ? "/state" : "/params";
    if (H5Lexists(file, group, H5P_DEFAULT) <= 0 || H5Lexists(file, d->path, H5P_DEFAULT) <= 0) {
        snprintf(err, err_len, "%s: dataset '%s' is missing (expected shape %s for this config)",
                 path, d->path, want);
        return -1;
    }
    hid_t dset = H5Dopen2(file, d->path, H5P_DEFAULT);
    if (dset < 0) {
        snprintf(err, err_len, "%s: '%s' is not a readable dataset", path, d->path);
        return -1;
    }
    int rc = -1;
    hid_t ft = H5Dget_type(dset), fspace = H5Dget_space(dset), mspace = -1;
    hsize_t dims[H5S_MAX_RANK];
    int ndim = fspace >= 0 ? H5Sget_simple_extent_ndims(fspace) : -1;
    if (ft < 0 || ndim < 0 || ndim > H5S_MAX_RANK) {
        snprintf(err, err_len, "%s: dataset '%s': cannot read its type or shape", path, d->path);
        goto done;
    }
    H5Sget_simple_extent_dims(fspace, dims, NULL);
    if (ndim != d->ndim || dims[0] != d->dims[0] || (ndim == 2 && dims[1] != d->dims[1])) {
        mp_h5_shape_str(have, sizeof have, ndim, dims);
        snprintf(err, err_len, "%s: dataset '%s' has shape %s, expected %s for this config", path,
                 d->path, have, want);
        goto done;
    }
    if (H5Tget_class(ft) != H5T_FLOAT) {
        snprintf(err, err_len, "%s: dataset '%s' is not floating point (expected float32)", path,
                 d->path);
        goto done;
    }
    hsize_t cols = ds_cols(d);
    hsize_t start[2] = {d->row_start, 0}, count[2] = {d->rows, cols};
    mspace = MP_CHECK_H5(H5Screate_simple(d->ndim, count, NULL));
    MP_CHECK_H5(H5Sselect_hyperslab(fspace, H5S_SELECT_SET, start, NULL, count, NULL));
    // The Fletcher32 filter checks every chunk as it is read: a mismatch fails the read.
    if (H5Dread(dset, H5T_NATIVE_FLOAT, mspace, fspace, H5P_DEFAULT, host) < 0) {
        snprintf(err, err_len, "%s: dataset '%s': read failed (checksum mismatch or corrupt data)",
                 path, d->path);
        goto done;
    }
    be->from_host(d->buf, host, d->rows * cols * sizeof(float));
    rc = 0;
done:
    if (mspace >= 0) H5Sclose(mspace);
    if (fspace >= 0) H5Sclose(fspace);
    if (ft >= 0) H5Tclose(ft);
    H5Dclose(dset);
    return rc;
}

int mp_model_load(mp_model *m, const char *path, char *err, size_t err_len) {
    const mp_backend *be = mp_model_backend(m);
    ds_spec *ds;
    int n = model_datasets(m, &ds);
    size_t max_elems = 1;
    int n_params = 0;
    for (int i = 0; i < n; i++) {
        size_t e = (size_t)(ds[i].rows * ds_cols(&ds[i]));
        if (e > max_elems) max_elems = e;
        if (!strncmp(ds[i].path, "/params/", 8)) n_params++;
    }

    mp_h5_quiet q = mp_h5_quiet_begin();
    hid_t file = open_model_file(path, err, err_len);
    int rc = file < 0 ? -1 : 0;
    float *host = mp_malloc(max_elems * sizeof(float));
    for (int i = 0; rc == 0 && i < n; i++)
        rc = read_dataset(file, &ds[i], path, be, host, err, err_len);
    // A file with extra parameters is a different model even if ours are all there.
    if (rc == 0) {
        H5G_info_t info;
        hid_t g = MP_CHECK_H5(H5Gopen2(file, "/params", H5P_DEFAULT));
        MP_CHECK_H5(H5Gget_info(g, &info));
        MP_CHECK_H5(H5Gclose(g));
        if (info.nlinks != (hsize_t)n_params) {
            snprintf(err, err_len, "%s: /params holds %llu tensors, expected %d for this config",
                     path, (unsigned long long)info.nlinks, n_params);
            rc = -1;
        }
    }
    struct mp_tokenizer *tok = NULL;   // the file's (NULL: bytes) replaces the model's
    if (rc == 0) rc = mp_h5_read_tokenizer(file, path, &tok, err, err_len);
    if (rc == 0) mp_model_set_tokenizer(m, tok);
    free(host);
    free(ds);
    if (file >= 0) H5Fclose(file);
    mp_h5_quiet_end(q);
    return rc;
}

// ----------------------------------------------------------------------------
// configuration checks for eval and sample

int mp_model_file_check_config(const mp_config *f, const mp_config *c, const char *file,
                               const char *cfg_path, char *err, size_t err_len) {
    return mp_check_shape_config(f, c, file, "the model file", cfg_path, err, err_len);
}

mp_model *mp_model_open_file(const char *file, const mp_config *cfg, const char *cfg_path,
                             const mp_backend *be, int B, mp_comm *comm, mp_config *model_cfg,
                             char *err, size_t err_len) {
    mp_config fcfg;
    mp_config_defaults(&fcfg);
    if (mp_model_file_config(file, &fcfg, err, err_len) < 0) return NULL;
    if (mp_model_file_check_config(&fcfg, cfg, file, cfg_path, err, err_len) < 0) return NULL;
    mp_merge_model_config(model_cfg, cfg, &fcfg);

    mp_model *m = comm ? mp_model_create_sharded(model_cfg, be, B, comm)
                       : mp_model_create(model_cfg, be, B);
    if (mp_model_load(m, file, err, err_len) < 0) {
        mp_model_free(m);
        return NULL;
    }
    return m;
}
