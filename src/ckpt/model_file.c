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

#include "core/log.h"

#define CHUNK_BYTES (1 << 20)   // ~1 MiB per chunk: one checksum per MiB of data

// ----------------------------------------------------------------------------
// quiet HDF5: while probing a file that may be bad, failures are expected and reported as
// one line by us, so HDF5's automatic error-stack printing is turned off.

typedef struct {
    H5E_auto2_t fn;
    void *data;
} h5_quiet;

static h5_quiet quiet_begin(void) {
    h5_quiet q;
    MP_CHECK_H5(H5Eget_auto2(H5E_DEFAULT, &q.fn, &q.data));
    MP_CHECK_H5(H5Eset_auto2(H5E_DEFAULT, NULL, NULL));
    return q;
}

static void quiet_end(h5_quiet q) { MP_CHECK_H5(H5Eset_auto2(H5E_DEFAULT, q.fn, q.data)); }

// The innermost (most specific) message of the current HDF5 error stack, e.g.
// "truncated file: eof = 4096, sblock->base_addr = 0, stored_eof = 9072".
static herr_t last_error_cb(unsigned n, const H5E_error2_t *e, void *data) {
    (void)n;
    char *buf = data;
    if (e->desc && e->desc[0]) snprintf(buf, 256, "%s", e->desc);
    return 0;
}

static const char *h5_last_error(char buf[256]) {
    buf[0] = '\0';
    H5Ewalk2(H5E_DEFAULT, H5E_WALK_DOWNWARD, last_error_cb, buf);
    return buf[0] ? buf : "unknown HDF5 error";
}

// ----------------------------------------------------------------------------
// small helpers

static void write_str_attr(hid_t obj, const char *name, const char *s) {
    hid_t t = MP_CHECK_H5(H5Tcopy(H5T_C_S1));
    MP_CHECK_H5(H5Tset_size(t, strlen(s) + 1));
    MP_CHECK_H5(H5Tset_strpad(t, H5T_STR_NULLTERM));
    hid_t sp = MP_CHECK_H5(H5Screate(H5S_SCALAR));
    hid_t a = MP_CHECK_H5(H5Acreate2(obj, name, t, sp, H5P_DEFAULT, H5P_DEFAULT));
    MP_CHECK_H5(H5Awrite(a, t, s));
    MP_CHECK_H5(H5Aclose(a));
    MP_CHECK_H5(H5Sclose(sp));
    MP_CHECK_H5(H5Tclose(t));
}

static void write_scalar_attr(hid_t obj, const char *name, hid_t file_type, hid_t mem_type,
                              const void *value) {
    hid_t sp = MP_CHECK_H5(H5Screate(H5S_SCALAR));
    hid_t a = MP_CHECK_H5(H5Acreate2(obj, name, file_type, sp, H5P_DEFAULT, H5P_DEFAULT));
    MP_CHECK_H5(H5Awrite(a, mem_type, value));
    MP_CHECK_H5(H5Aclose(a));
    MP_CHECK_H5(H5Sclose(sp));
}

// A scalar string attribute (fixed or variable length) as a malloc'd string; NULL when it
// is missing or not a single string. Call inside quiet_begin/quiet_end.
static char *read_str_attr(hid_t obj, const char *name) {
    if (H5Aexists(obj, name) <= 0) return NULL;
    hid_t a = H5Aopen(obj, name, H5P_DEFAULT);
    if (a < 0) return NULL;
    char *out = NULL;
    hid_t ft = H5Aget_type(a), sp = H5Aget_space(a);
    if (ft >= 0 && sp >= 0 && H5Tget_class(ft) == H5T_STRING &&
        H5Sget_simple_extent_npoints(sp) == 1) {
        if (H5Tis_variable_str(ft) > 0) {
            hid_t mt = MP_CHECK_H5(H5Tcopy(H5T_C_S1));
            MP_CHECK_H5(H5Tset_size(mt, H5T_VARIABLE));
            char *p = NULL;
            if (H5Aread(a, mt, &p) >= 0 && p) {
                out = mp_malloc(strlen(p) + 1);
                strcpy(out, p);
                H5free_memory(p);
            }
            MP_CHECK_H5(H5Tclose(mt));
        } else {
            size_t n = H5Tget_size(ft);
            hid_t mt = MP_CHECK_H5(H5Tcopy(ft));
            out = mp_calloc(n + 1, 1);   // +1: a NULLPAD string of exactly n bytes
            if (H5Aread(a, mt, out) < 0) {
                free(out);
                out = NULL;
            }
            MP_CHECK_H5(H5Tclose(mt));
        }
    }
    if (sp >= 0) H5Sclose(sp);
    if (ft >= 0) H5Tclose(ft);
    H5Aclose(a);
    return out;
}

// A scalar integer attribute; -1 when missing or not an integer.
static int read_int_attr(hid_t obj, const char *name, long long *value) {
    if (H5Aexists(obj, name) <= 0) return -1;
    hid_t a = H5Aopen(obj, name, H5P_DEFAULT);
    if (a < 0) return -1;
    int rc = -1;
    hid_t ft = H5Aget_type(a), sp = H5Aget_space(a);
    if (ft >= 0 && sp >= 0 && H5Tget_class(ft) == H5T_INTEGER &&
        H5Sget_simple_extent_npoints(sp) == 1 && H5Aread(a, H5T_NATIVE_LLONG, value) >= 0)
        rc = 0;
    if (sp >= 0) H5Sclose(sp);
    if (ft >= 0) H5Tclose(ft);
    H5Aclose(a);
    return rc;
}

static void shape_str(char *buf, size_t len, int ndim, const hsize_t *dims) {
    if (ndim == 1)
        snprintf(buf, len, "(%llu)", (unsigned long long)dims[0]);
    else if (ndim == 2)
        snprintf(buf, len, "(%llu, %llu)", (unsigned long long)dims[0],
                 (unsigned long long)dims[1]);
    else
        snprintf(buf, len, "(%d dimensions)", ndim);
}

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

// Every dataset of m in file order: parameters (table order), then BN running statistics.
// Returns the count; *out is malloc'd.
static int model_datasets(mp_model *m, ds_spec **out) {
    const mp_config *cfg = mp_model_config(m);
    int nt = mp_model_n_tensors(m);
    ds_spec *ds = mp_calloc((size_t)nt + 2 * MP_MAX_LAYERS, sizeof *ds);
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
    // BN state layout (model.h): per retrieval layer with query BN in block order,
    // running_mean (H*dk) then running_var (H*dk).
    float *bn = mp_model_bn_state(m);
    size_t off = 0;
    for (int l = 0; l < cfg->n_layers; l++) {
        const mp_retrieval_config *rc = mp_config_retrieval(cfg, l);
        if (!rc || !rc->query_bn) continue;
        const char *kind = cfg->ffn[l] == MP_FFN_PEER ? "peer" : "pkm";
        hsize_t hd = (hsize_t)rc->heads * (hsize_t)rc->key_dim;
        for (int s = 0; s < 2; s++) {
            ds_spec *d = &ds[n++];
            snprintf(d->path, sizeof d->path, "/state/h%d.%s.bn.%s", l, kind,
                     s == 0 ? "running_mean" : "running_var");
            d->buf = bn + off;
            d->ndim = 1;
            d->dims[0] = d->rows = hd;
            d->dims[1] = 1;
            d->row_start = 0;
            off += hd;
        }
    }
    if (off != mp_model_bn_state_size(m))
        mp_fatal("BN state holds %zu floats, the config implies %zu", mp_model_bn_state_size(m),
                 off);
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
    if (H5Fis_hdf5(path) <= 0) {
        snprintf(err, err_len, "%s: not an HDF5 file (expected a millipede model file)", path);
        return -1;
    }
    hid_t file = H5Fopen(path, H5F_ACC_RDONLY, H5P_DEFAULT);
    if (file < 0) {
        char h5[256];
        snprintf(err, err_len, "%s: cannot open as HDF5 (truncated or corrupt file): %s", path,
                 h5_last_error(h5));
        return -1;
    }
    char *format = read_str_attr(file, "format");
    if (!format || strcmp(format, MP_MODEL_FORMAT)) {
        if (format)
            snprintf(err, err_len, "%s: not a millipede model file (format '%s', expected '%s')",
                     path, format, MP_MODEL_FORMAT);
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
    if (read_int_attr(file, "version", &version) < 0) {
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
    hsize_t cols = ds_cols(d);
    hsize_t chunk[2];
    if (d->ndim == 2) {
        hsize_t r = CHUNK_BYTES / (sizeof(float) * cols);
        chunk[0] = r < 1 ? 1 : r > d->dims[0] ? d->dims[0] : r;
        chunk[1] = cols;
    } else {
        hsize_t r = CHUNK_BYTES / sizeof(float);
        chunk[0] = r > d->dims[0] ? d->dims[0] : r;
    }
    hid_t dcpl = MP_CHECK_H5(H5Pcreate(H5P_DATASET_CREATE));
    MP_CHECK_H5(H5Pset_chunk(dcpl, d->ndim, chunk));
    MP_CHECK_H5(H5Pset_fletcher32(dcpl));
    hid_t fspace = MP_CHECK_H5(H5Screate_simple(d->ndim, d->dims, NULL));
    hid_t dset = MP_CHECK_H5(H5Dcreate2(file, d->path, H5T_IEEE_F32LE, fspace, H5P_DEFAULT,
                                        dcpl, H5P_DEFAULT));
    MP_CHECK_H5(H5Dclose(dset));
    MP_CHECK_H5(H5Sclose(fspace));
    MP_CHECK_H5(H5Pclose(dcpl));
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

// fsync a file (or directory) by path; -1 with errno set on failure.
static int fsync_path(const char *path, int flags) {
    int fd = open(path, flags);
    if (fd < 0) return -1;
    int rc = fsync(fd);
    int saved = errno;
    close(fd);
    errno = saved;
    return rc;
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
    h5_quiet q = quiet_begin();
    hid_t file = rank == 0 ? H5Fcreate(tmp, H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT)
                           : H5Fopen(tmp, H5F_ACC_RDWR, H5P_DEFAULT);
    if (file < 0) {
        char h5[256];
        snprintf(err, err_len, "%s: cannot %s model file (rank %d): %s", tmp,
                 rank == 0 ? "create" : "open", rank, h5_last_error(h5));
        quiet_end(q);
        free(ds);
        return -1;
    }
    quiet_end(q);
    if (rank == 0) {
        const mp_config *cfg = mp_model_config(m);
        char probe[1];
        size_t ini_len = mp_config_to_ini(cfg, probe, sizeof probe);
        char *ini = mp_malloc(ini_len + 1);
        mp_config_to_ini(cfg, ini, ini_len + 1);
        write_str_attr(file, "format", MP_MODEL_FORMAT);
        int version = MP_MODEL_VERSION;
        write_scalar_attr(file, "version", H5T_STD_I32LE, H5T_NATIVE_INT, &version);
        write_str_attr(file, "config", ini);
        int64_t step64 = step;
        write_scalar_attr(file, "step", H5T_STD_I64LE, H5T_NATIVE_INT64, &step64);
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
        double failed = 0.0;
        if (r == rank) failed = write_part(m, tmp, step, rank, err, err_len) != 0;
        if (P > 1) comm->allreduce_f64(comm, &failed, 1);
        if (failed != 0.0) {
            if (r != rank) snprintf(err, err_len, "%s: rank %d failed to write its part", path, r);
            free(tmp);
            return -1;
        }
    }
    if (rank != 0) {
        free(tmp);
        comm->barrier(comm);   // rank 0 renames
        return 0;
    }

    // HDF5 does not fsync; without it a crash after the rename could leave a renamed
    // file whose data never reached the disk.
    if (fsync_path(tmp, O_RDONLY) < 0) {
        snprintf(err, err_len, "%s: fsync failed: %s", tmp, strerror(errno));
        free(tmp);
        return -1;
    }
    if (rename(tmp, path) < 0) {
        snprintf(err, err_len, "%s: cannot rename to %s: %s", tmp, path, strerror(errno));
        free(tmp);
        return -1;
    }
    free(tmp);
    // Make the rename itself durable. Some file systems refuse fsync on a directory; the
    // file is complete either way, so that is not an error.
    const char *slash = strrchr(path, '/');
    if (slash) {
        size_t dlen = slash == path ? 1 : (size_t)(slash - path);
        char *dir = mp_malloc(dlen + 1);
        memcpy(dir, path, dlen);
        dir[dlen] = '\0';
        fsync_path(dir, O_RDONLY | O_DIRECTORY);
        free(dir);
    } else {
        fsync_path(".", O_RDONLY | O_DIRECTORY);
    }
    if (P > 1) comm->barrier(comm);
    return 0;
}

// ----------------------------------------------------------------------------
// load

int mp_model_file_config(const char *path, mp_config *cfg, char *err, size_t err_len) {
    h5_quiet q = quiet_begin();
    hid_t file = open_model_file(path, err, err_len);
    if (file < 0) {
        quiet_end(q);
        return -1;
    }
    char *ini = read_str_attr(file, "config");
    H5Fclose(file);
    quiet_end(q);
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
    shape_str(want, sizeof want, d->ndim, d->dims);
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
        shape_str(have, sizeof have, ndim, dims);
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

    h5_quiet q = quiet_begin();
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
    free(host);
    free(ds);
    if (file >= 0) H5Fclose(file);
    quiet_end(q);
    return rc;
}

// ----------------------------------------------------------------------------
// configuration checks for eval and sample

static const char *ffn_name(mp_ffn_kind k) {
    return k == MP_FFN_PEER ? "peer" : k == MP_FFN_PKM ? "pkm" : "dense";
}

static void ffn_list(char *buf, size_t len, const mp_config *c) {
    size_t used = 0;
    buf[0] = '\0';
    for (int l = 0; l < c->n_layers && used < len; l++)
        used += (size_t)snprintf(buf + used, len - used, "%s%s", l ? "," : "", ffn_name(c->ffn[l]));
}

static int key_differs(const char *key, long a, long b, const char *file, const char *cfg_path,
                       char *err, size_t err_len) {
    if (a == b) return 0;
    snprintf(err, err_len, "%s: key '%s' is %ld in the model file but %ld in %s", file, key, a, b,
             cfg_path);
    return 1;
}

int mp_model_file_check_config(const mp_config *f, const mp_config *c, const char *file,
                               const char *cfg_path, char *err, size_t err_len) {
#define SAME(key, field) \
    if (key_differs(key, (long)f->field, (long)c->field, file, cfg_path, err, err_len)) return -1
    SAME("model.vocab_size", vocab_size);
    SAME("model.context", context);
    SAME("model.d_model", d_model);
    SAME("model.n_layers", n_layers);
    SAME("model.n_heads", n_heads);
    SAME("model.dense_hidden", dense_hidden);
    int has[3] = {0, 0, 0};
    for (int l = 0; l < f->n_layers; l++) {
        if (f->ffn[l] != c->ffn[l]) {
            char a[MP_MAX_LAYERS * 6 + 1], b[MP_MAX_LAYERS * 6 + 1];   // "dense," per layer
            ffn_list(a, sizeof a, f);
            ffn_list(b, sizeof b, c);
            snprintf(err, err_len, "%s: key 'model.ffn' is %s in the model file but %s in %s",
                     file, a, b, cfg_path);
            return -1;
        }
        has[f->ffn[l]] = 1;
    }
    // Retrieval settings fix shapes only when a layer of that kind exists.
    if (has[MP_FFN_PEER]) {
        SAME("peer.experts", peer.n_experts);
        SAME("peer.heads", peer.heads);
        SAME("peer.topk", peer.topk);
        SAME("peer.key_dim", peer.key_dim);
        SAME("peer.query_bn", peer.query_bn);
        if (f->peer.activation != c->peer.activation) {
            snprintf(err, err_len, "%s: key 'peer.activation' is %s in the model file but %s in %s",
                     file, f->peer.activation == MP_ACT_RELU ? "relu" : "gelu",
                     c->peer.activation == MP_ACT_RELU ? "relu" : "gelu", cfg_path);
            return -1;
        }
    }
    if (has[MP_FFN_PKM]) {
        SAME("pkm.experts", pkm.n_experts);
        SAME("pkm.heads", pkm.heads);
        SAME("pkm.topk", pkm.topk);
        SAME("pkm.key_dim", pkm.key_dim);
        SAME("pkm.query_bn", pkm.query_bn);
    }
#undef SAME
    return 0;
}

mp_model *mp_model_open_file(const char *file, const mp_config *cfg, const char *cfg_path,
                             const mp_backend *be, int B, mp_config *model_cfg, char *err,
                             size_t err_len) {
    mp_config fcfg;
    mp_config_defaults(&fcfg);
    if (mp_model_file_config(file, &fcfg, err, err_len) < 0) return NULL;
    if (mp_model_file_check_config(&fcfg, cfg, file, cfg_path, err, err_len) < 0) return NULL;
    // Shapes (and BN epsilon, init) come from the file; data, system and train from cfg.
    *model_cfg = *cfg;
    model_cfg->vocab_size = fcfg.vocab_size;
    model_cfg->context = fcfg.context;
    model_cfg->d_model = fcfg.d_model;
    model_cfg->n_layers = fcfg.n_layers;
    model_cfg->n_heads = fcfg.n_heads;
    model_cfg->dense_hidden = fcfg.dense_hidden;
    memcpy(model_cfg->ffn, fcfg.ffn, sizeof fcfg.ffn);
    model_cfg->peer = fcfg.peer;
    model_cfg->pkm = fcfg.pkm;
    model_cfg->init_std = fcfg.init_std;

    mp_model *m = mp_model_create(model_cfg, be, B);
    if (mp_model_load(m, file, err, err_len) < 0) {
        mp_model_free(m);
        return NULL;
    }
    return m;
}
