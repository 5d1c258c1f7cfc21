// Helpers shared by the model file and the checkpoints (h5util.h).
#include "ckpt/h5util.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "core/log.h"

mp_h5_quiet mp_h5_quiet_begin(void) {
    mp_h5_quiet q;
    MP_CHECK_H5(H5Eget_auto2(H5E_DEFAULT, &q.fn, &q.data));
    MP_CHECK_H5(H5Eset_auto2(H5E_DEFAULT, NULL, NULL));
    return q;
}

void mp_h5_quiet_end(mp_h5_quiet q) { MP_CHECK_H5(H5Eset_auto2(H5E_DEFAULT, q.fn, q.data)); }

static herr_t last_error_cb(unsigned n, const H5E_error2_t *e, void *data) {
    (void)n;
    char *buf = data;
    if (e->desc && e->desc[0]) snprintf(buf, 256, "%s", e->desc);
    return 0;
}

const char *mp_h5_last_error(char buf[256]) {
    buf[0] = '\0';
    H5Ewalk2(H5E_DEFAULT, H5E_WALK_DOWNWARD, last_error_cb, buf);
    return buf[0] ? buf : "unknown HDF5 error";
}

hid_t mp_h5_open_read(const char *path, const char *not_hdf5, const char *corrupt, char *err,
                      size_t err_len) {
    if (not_hdf5 && H5Fis_hdf5(path) <= 0) {
        snprintf(err, err_len, "%s: not an HDF5 file (%s)", path, not_hdf5);
        return -1;
    }
    hid_t file = H5Fopen(path, H5F_ACC_RDONLY, H5P_DEFAULT);
    if (file < 0) {
        char h5[256];
        snprintf(err, err_len, "%s: cannot open as HDF5 (%s): %s", path, corrupt,
                 mp_h5_last_error(h5));
        return -1;
    }
    return file;
}

void mp_h5_write_str_attr(hid_t obj, const char *name, const char *s) {
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

void mp_h5_write_scalar_attr(hid_t obj, const char *name, hid_t file_type, hid_t mem_type,
                             const void *value) {
    hid_t sp = MP_CHECK_H5(H5Screate(H5S_SCALAR));
    hid_t a = MP_CHECK_H5(H5Acreate2(obj, name, file_type, sp, H5P_DEFAULT, H5P_DEFAULT));
    MP_CHECK_H5(H5Awrite(a, mem_type, value));
    MP_CHECK_H5(H5Aclose(a));
    MP_CHECK_H5(H5Sclose(sp));
}

void mp_h5_write_i64_attr(hid_t obj, const char *name, long long v) {
    mp_h5_write_scalar_attr(obj, name, H5T_STD_I64LE, H5T_NATIVE_LLONG, &v);
}

char *mp_h5_read_str_attr(hid_t obj, const char *name) {
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

char *mp_h5_printable(char *s) {
    for (char *p = s; *p; p++)
        if ((unsigned char)*p < 0x20 || *p == 0x7f) *p = '?';
    return s;
}

int mp_h5_read_int_attr(hid_t obj, const char *name, long long *value) {
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

void mp_h5_shape_str(char *buf, size_t len, int ndim, const hsize_t *dims) {
    if (ndim == 1)
        snprintf(buf, len, "(%llu)", (unsigned long long)dims[0]);
    else if (ndim == 2)
        snprintf(buf, len, "(%llu, %llu)", (unsigned long long)dims[0],
                 (unsigned long long)dims[1]);
    else
        snprintf(buf, len, "(%d dimensions)", ndim);
}

void mp_h5_chunk_dims(int ndim, const hsize_t *dims, hsize_t *chunk) {
    hsize_t cols = ndim == 2 ? dims[1] : 1;
    hsize_t r = MP_H5_CHUNK_BYTES / (sizeof(float) * (cols ? cols : 1));
    if (r < 1) r = 1;
    if (r > dims[0]) r = dims[0];
    chunk[0] = r ? r : 1;
    if (ndim == 2) chunk[1] = cols ? cols : 1;
}

hid_t mp_h5_create_f32(hid_t loc, const char *path, int ndim, const hsize_t *dims) {
    hsize_t chunk[2];
    mp_h5_chunk_dims(ndim, dims, chunk);
    hid_t dcpl = MP_CHECK_H5(H5Pcreate(H5P_DATASET_CREATE));
    MP_CHECK_H5(H5Pset_chunk(dcpl, ndim, chunk));
    MP_CHECK_H5(H5Pset_fletcher32(dcpl));
    hid_t fspace = MP_CHECK_H5(H5Screate_simple(ndim, dims, NULL));
    hid_t dset = MP_CHECK_H5(H5Dcreate2(loc, path, H5T_IEEE_F32LE, fspace, H5P_DEFAULT, dcpl,
                                        H5P_DEFAULT));
    MP_CHECK_H5(H5Sclose(fspace));
    MP_CHECK_H5(H5Pclose(dcpl));
    return dset;
}

void mp_h5_create_group(hid_t loc, const char *path) {
    hid_t g = MP_CHECK_H5(H5Gcreate2(loc, path, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT));
    MP_CHECK_H5(H5Gclose(g));
}

int mp_h5_exists(hid_t file, const char *path) {
    char buf[512];
    snprintf(buf, sizeof buf, "%s", path);
    for (char *p = buf + 1; *p; p++) {
        if (*p != '/') continue;
        *p = '\0';
        int e = H5Lexists(file, buf, H5P_DEFAULT);
        *p = '/';
        if (e <= 0) return 0;
    }
    return H5Lexists(file, buf, H5P_DEFAULT) > 0;
}

int mp_fsync_path(const char *path, int flags) {
    int fd = open(path, flags);
    if (fd < 0) return -1;
    int rc = fsync(fd);
    int saved = errno;
    close(fd);
    errno = saved;
    return rc;
}

// ----------------------------------------------------------------------------
// configuration checks for loading a stored model into a run's configuration

static const char *ffn_name(mp_ffn_kind k) {
    return k == MP_FFN_PEER ? "peer" : k == MP_FFN_PKM ? "pkm" : "dense";
}

static void ffn_list(char *buf, size_t len, const mp_config *c) {
    size_t used = 0;
    buf[0] = '\0';
    for (int l = 0; l < c->n_layers && used < len; l++)
        used += (size_t)snprintf(buf + used, len - used, "%s%s", l ? "," : "", ffn_name(c->ffn[l]));
}

static int key_differs(const char *key, long a, long b, const char *file, const char *what,
                       const char *cfg_path, char *err, size_t err_len) {
    if (a == b) return 0;
    snprintf(err, err_len, "%s: key '%s' is %ld in %s but %ld in %s", file, key, a, what, b,
             cfg_path);
    return 1;
}

int mp_check_shape_config(const mp_config *f, const mp_config *c, const char *file,
                          const char *what, const char *cfg_path, char *err, size_t err_len) {
#define SAME(key, field)                                                                   \
    if (key_differs(key, (long)f->field, (long)c->field, file, what, cfg_path, err, err_len)) \
    return -1
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
            snprintf(err, err_len, "%s: key 'model.ffn' is %s in %s but %s in %s", file, a, what,
                     b, cfg_path);
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
            snprintf(err, err_len, "%s: key 'peer.activation' is %s in %s but %s in %s", file,
                     f->peer.activation == MP_ACT_RELU ? "relu" : "gelu", what,
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

// The sub-key balance biases are state (stored beside the BN statistics) only when the
// rate is > 0; the rate itself may change between runs, like a learning rate.
static int balance_differs(const char *sec, const mp_retrieval_config *f,
                           const mp_retrieval_config *c, const char *file, const char *what,
                           const char *cfg_path, char *err, size_t err_len) {
    if ((f->balance_rate > 0) == (c->balance_rate > 0)) return 0;
    snprintf(err, err_len,
             "%s: key '%s.balance_rate' is %g in %s but %g in %s (the sub-key balance biases "
             "exist only when it is > 0: --set %s.balance_rate=%g continues it as it was)",
             file, sec, (double)f->balance_rate, what, (double)c->balance_rate, cfg_path, sec,
             (double)f->balance_rate);
    return 1;
}

int mp_check_state_config(const mp_config *f, const mp_config *c, const char *file,
                          const char *what, const char *cfg_path, char *err, size_t err_len) {
    int has[3] = {0, 0, 0};
    for (int l = 0; l < f->n_layers; l++) has[f->ffn[l]] = 1;
    if (has[MP_FFN_PEER] && balance_differs("peer", &f->peer, &c->peer, file, what, cfg_path, err, err_len))
        return -1;
    if (has[MP_FFN_PKM] && balance_differs("pkm", &f->pkm, &c->pkm, file, what, cfg_path, err, err_len))
        return -1;
    return 0;
}

void mp_merge_model_config(mp_config *out, const mp_config *cfg, const mp_config *f) {
    // Shapes (and BN epsilon, init) come from the file; data, system and train from cfg.
    *out = *cfg;
    out->vocab_size = f->vocab_size;
    out->context = f->context;
    out->d_model = f->d_model;
    out->n_layers = f->n_layers;
    out->n_heads = f->n_heads;
    out->dense_hidden = f->dense_hidden;
    memcpy(out->ffn, f->ffn, sizeof f->ffn);
    out->peer = f->peer;
    out->pkm = f->pkm;
    out->init_std = f->init_std;
}

int mp_router_datasets(mp_model *m, mp_state_dataset *out) {
    const mp_config *cfg = mp_model_config(m);
    size_t off = 0;
    int n = 0;
    for (int l = 0; l < cfg->n_layers; l++) {
        const mp_retrieval_config *rc = mp_config_retrieval(cfg, l);
        if (!rc) continue;
        const char *kind = cfg->ffn[l] == MP_FFN_PEER ? "peer" : "pkm";
        hsize_t hd = (hsize_t)rc->heads * (hsize_t)rc->key_dim;
        for (int s = 0; s < 2 && rc->query_bn; s++) {
            mp_state_dataset *b = &out[n++];
            snprintf(b->name, sizeof b->name, "h%d.%s.bn.%s", l, kind,
                     s == 0 ? "running_mean" : "running_var");
            b->offset = off;
            b->ndim = 1;
            b->rows = hd;
            b->cols = 1;
            off += hd;
        }
        for (int s = 0; s < 2 && rc->balance_rate > 0; s++) {
            mp_state_dataset *b = &out[n++];
            snprintf(b->name, sizeof b->name, "h%d.%s.k%d_bias", l, kind, s + 1);
            b->offset = off;
            b->ndim = 2;
            b->rows = (hsize_t)rc->heads;
            b->cols = (hsize_t)rc->n_sub;
            off += b->rows * b->cols;
        }
    }
    if (off != mp_model_router_state_size(m))
        mp_fatal("router state holds %zu floats, the config implies %zu",
                 mp_model_router_state_size(m), off);
    return n;
}
