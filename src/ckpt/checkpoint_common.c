// What the checkpoint reader, writer and verifier share: the list of datasets, the index
// and its layout, and agreement between ranks.
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "ckpt/checkpoint_private.h"
#include "core/log.h"

const char *const ck_group_names[CK_N_GROUPS] = {"params", "adam_m", "adam_v", "state"};

void ck_join(char *out, size_t len, const char *dir, const char *name) {
    size_t n = strlen(dir);
    while (n > 1 && dir[n - 1] == '/') n--;   // "run/checkpoints/" + name
    snprintf(out, len, "%.*s/%s", (int)n, dir, name);
}

hid_t ck_fapl(void) {
    hid_t fapl = MP_CHECK_H5(H5Pcreate(H5P_FILE_ACCESS));
    MP_CHECK_H5(H5Pset_libver_bounds(fapl, H5F_LIBVER_V18, H5F_LIBVER_LATEST));
    return fapl;
}

static void add_tensor(ck_ds *d, int group, const mp_tensor *t, float *buf) {
    d->group = group;
    snprintf(d->name, sizeof d->name, "%s", t->name);
    snprintf(d->path, sizeof d->path, "/%s/%s", ck_group_names[group], t->name);
    d->buf = buf;
    d->ndim = t->ndim;
    d->dims[0] = (hsize_t)(t->global_rows > 0 ? t->global_rows : t->shape[0]);
    d->dims[1] = t->ndim == 2 ? (hsize_t)t->shape[1] : 1;
    d->row_start = (hsize_t)t->row_start;
    d->rows = (hsize_t)t->shape[0];
    d->sharded = t->group == MP_GROUP_EXPERTS;
}

int ck_datasets(mp_model *m, const mp_adamw *opt, ck_ds **out) {
    int nt = mp_model_n_tensors(m);
    ck_ds *ds = mp_calloc((size_t)3 * nt + MP_MAX_STATE_DATASETS, sizeof *ds);
    int n = 0;
    for (int group = CK_PARAMS; group <= CK_ADAM_V; group++) {
        if (group != CK_PARAMS && !opt) break;
        for (int i = 0; i < nt; i++) {
            const mp_tensor *t = mp_model_tensor(m, i);
            float *base = group == CK_PARAMS ? mp_model_params(m, t->group)
                          : group == CK_ADAM_M ? opt->m[t->group]
                                               : opt->v[t->group];
            add_tensor(&ds[n++], group, t, base + t->offset);
        }
    }
    mp_state_dataset st[MP_MAX_STATE_DATASETS];
    int n_st = mp_router_datasets(m, st);
    for (int i = 0; i < n_st; i++) {
        ck_ds *d = &ds[n++];
        d->group = CK_STATE;
        snprintf(d->name, sizeof d->name, "%.*s", (int)sizeof st[i].name, st[i].name);
        snprintf(d->path, sizeof d->path, "/state/%s", d->name);
        d->buf = mp_model_router_state(m) + st[i].offset;
        d->ndim = st[i].ndim;
        d->dims[0] = d->rows = st[i].rows;
        d->dims[1] = st[i].cols;
    }
    *out = ds;
    return n;
}

// ----------------------------------------------------------------------------
// the index

hid_t ck_open_index(const char *dir, mp_ckpt_info *info, char **config_text, char *err,
                    size_t err_len) {
    char path[CK_PATH];
    ck_join(path, sizeof path, dir, MP_CKPT_INDEX);
    struct stat st;
    if (stat(dir, &st) != 0) {
        snprintf(err, err_len, "%s: cannot open checkpoint directory: %s", dir, strerror(errno));
        return -1;
    }
    if (!S_ISDIR(st.st_mode)) {
        snprintf(err, err_len, "%s: not a directory (expected a checkpoint directory)", dir);
        return -1;
    }
    if (stat(path, &st) != 0) {
        snprintf(err, err_len, "%s: missing (not a checkpoint directory, or an incomplete one): %s",
                 path, strerror(errno));
        return -1;
    }
    hid_t file =
        mp_h5_open_read(path, "truncated or corrupt", "truncated or corrupt file", err, err_len);
    if (file < 0) return -1;
    char *format = mp_h5_read_str_attr(file, "format");
    long long version = 0, step = 0, t = 0, P = 0, seed = 0;
    const char *bad = NULL;
    if (!format || strcmp(format, MP_CKPT_FORMAT))
        bad = "root attribute 'format' is not '" MP_CKPT_FORMAT "'";
    else if (mp_h5_read_int_attr(file, "version", &version) < 0)
        bad = "root attribute 'version' missing or not an integer";
    else if (version != MP_CKPT_VERSION)
        bad = "unsupported version (expected " MP_CKPT_FORMAT " version 1)";
    else if (mp_h5_read_int_attr(file, "step", &step) < 0 || step < 0)
        bad = "root attribute 'step' missing or invalid";
    else if (mp_h5_read_int_attr(file, "adam_t", &t) < 0 || t < 0)
        bad = "root attribute 'adam_t' missing or invalid";
    else if (mp_h5_read_int_attr(file, "n_ranks", &P) < 0 || P < 1)
        bad = "root attribute 'n_ranks' missing or invalid";
    else if (mp_h5_read_int_attr(file, "seed", &seed) < 0)
        bad = "root attribute 'seed' missing or not an integer";
    free(format);
    char *text = NULL;
    if (!bad && !(text = mp_h5_read_str_attr(file, "config")))
        bad = "root attribute 'config' missing or not a string";
    if (bad) {
        snprintf(err, err_len, "%s: not a millipede checkpoint index: %s", path, bad);
        free(text);
        H5Fclose(file);
        return -1;
    }
    if (info) {
        info->step = (long)step;
        info->adam_t = (long)t;
        info->seed = (uint64_t)seed;
        info->n_ranks = (int)P;
    }
    if (config_text)
        *config_text = text;
    else
        free(text);
    return file;
}

// Reads a small 1-D or 2-D int64 dataset of known shape; -1 when missing or misshapen.
static int read_i64(hid_t file, const char *path, int ndim, const hsize_t *dims, long long *out) {
    if (!mp_h5_exists(file, path)) return -1;
    hid_t d = H5Dopen2(file, path, H5P_DEFAULT);
    if (d < 0) return -1;
    hid_t sp = H5Dget_space(d);
    hsize_t have[2] = {0, 0};
    int rc = -1;
    if (sp >= 0 && H5Sget_simple_extent_ndims(sp) == ndim) {
        H5Sget_simple_extent_dims(sp, have, NULL);
        if (have[0] == dims[0] && (ndim == 1 || have[1] == dims[1]) &&
            H5Dread(d, H5T_NATIVE_LLONG, H5S_ALL, H5S_ALL, H5P_DEFAULT, out) >= 0)
            rc = 0;
    }
    if (sp >= 0) H5Sclose(sp);
    H5Dclose(d);
    return rc;
}

static herr_t collect_name(hid_t g, const char *name, const H5L_info_t *info, void *data) {
    (void)g;
    (void)info;
    ck_layout *lay = data;
    if (strlen(name) >= sizeof lay->names[0]) return -1;
    for (const char *c = name; *c; c++)   // messages name the table: no control characters
        if ((unsigned char)*c < 0x20 || *c == 0x7f) return -1;
    lay->names = realloc(lay->names, (size_t)(lay->n_tables + 1) * sizeof *lay->names);
    if (!lay->names) mp_fatal("out of memory");
    snprintf(lay->names[lay->n_tables++], sizeof lay->names[0], "%s", name);
    return 0;
}

static int layout_read(hid_t index, const char *path, ck_layout *lay, char *err, size_t err_len);

// On failure the partly read layout is freed here, so no caller leaks it.
int ck_layout_read(hid_t index, const char *path, ck_layout *lay, char *err, size_t err_len) {
    memset(lay, 0, sizeof *lay);
    int rc = layout_read(index, path, lay, err, err_len);
    if (rc != 0) ck_layout_free(lay);
    return rc;
}

static int layout_read(hid_t index, const char *path, ck_layout *lay, char *err, size_t err_len) {
    long long P = 0;
    if (mp_h5_read_int_attr(index, "n_ranks", &P) < 0 || P < 1 || P > 1 << 24) {
        snprintf(err, err_len, "%s: root attribute 'n_ranks' missing or invalid", path);
        return -1;
    }
    lay->P = (int)P;
    lay->files = mp_calloc((size_t)P, sizeof *lay->files);
    lay->bytes = mp_calloc((size_t)P, sizeof *lay->bytes);
    hsize_t dims[2] = {(hsize_t)P, 2};
    if (read_i64(index, "/layout/shard_bytes", 1, dims, lay->bytes) < 0) {
        snprintf(err, err_len, "%s: dataset '/layout/shard_bytes' missing or not (%lld) integers",
                 path, P);
        return -1;
    }
    // shard file names: fixed-length strings
    int ok = 0;
    if (mp_h5_exists(index, "/layout/shard_files")) {
        hid_t d = H5Dopen2(index, "/layout/shard_files", H5P_DEFAULT);
        hid_t sp = d >= 0 ? H5Dget_space(d) : -1;
        hsize_t n = 0;
        if (sp >= 0 && H5Sget_simple_extent_ndims(sp) == 1) H5Sget_simple_extent_dims(sp, &n, NULL);
        if (n == (hsize_t)P) {
            hid_t mt = MP_CHECK_H5(H5Tcopy(H5T_C_S1));
            MP_CHECK_H5(H5Tset_size(mt, sizeof lay->files[0]));
            ok = H5Dread(d, mt, H5S_ALL, H5S_ALL, H5P_DEFAULT, lay->files) >= 0;
            MP_CHECK_H5(H5Tclose(mt));
        }
        if (sp >= 0) H5Sclose(sp);
        if (d >= 0) H5Dclose(d);
    }
    for (int p = 0; ok && p < P; p++) {
        lay->files[p][sizeof lay->files[0] - 1] = '\0';
        // names are ours: plain "shard_%05d.h5", never a path that leaves the directory, nor
        // a byte that would break the one-line messages naming the file
        if (!lay->files[p][0] || strchr(lay->files[p], '/')) ok = 0;
        for (const char *c = lay->files[p]; *c; c++)
            if ((unsigned char)*c < 0x20 || *c == 0x7f) ok = 0;
    }
    if (!ok) {
        snprintf(err, err_len, "%s: dataset '/layout/shard_files' missing or invalid", path);
        return -1;
    }
    if (!mp_h5_exists(index, "/layout/rows")) {
        snprintf(err, err_len, "%s: group '/layout/rows' is missing", path);
        return -1;
    }
    hid_t g = H5Gopen2(index, "/layout/rows", H5P_DEFAULT);   // fails on a damaged file
    hsize_t idx = 0;
    herr_t it = g < 0 ? -1 : H5Literate(g, H5_INDEX_NAME, H5_ITER_INC, &idx, collect_name, lay);
    if (g >= 0) H5Gclose(g);
    if (it < 0) {
        snprintf(err, err_len, "%s: group '/layout/rows' cannot be listed", path);
        return -1;
    }
    lay->rows = mp_calloc((size_t)(lay->n_tables ? lay->n_tables : 1) * P * 2, sizeof *lay->rows);
    for (int t = 0; t < lay->n_tables; t++) {
        char dpath[128];
        snprintf(dpath, sizeof dpath, "/layout/rows/%s", lay->names[t]);
        long long *r = lay->rows + (size_t)t * P * 2;
        if (read_i64(index, dpath, 2, dims, r) < 0) {
            snprintf(err, err_len, "%s: dataset '%s' missing or not (%lld, 2) integers", path,
                     dpath, P);
            return -1;
        }
        // contiguous, in rank order, from row 0
        for (int p = 0; p < P; p++)
            if (r[2 * p] != (p ? r[2 * p - 1] : 0) || r[2 * p + 1] < r[2 * p]) {
                snprintf(err, err_len, "%s: dataset '%s': shard %d's rows [%lld, %lld) do not "
                         "continue the previous shard's", path, dpath, p, r[2 * p], r[2 * p + 1]);
                return -1;
            }
    }
    return 0;
}

void ck_layout_free(ck_layout *lay) {
    free(lay->files);
    free(lay->bytes);
    free(lay->names);
    free(lay->rows);
    memset(lay, 0, sizeof *lay);
}

int ck_layout_table(const ck_layout *lay, const char *name) {
    for (int t = 0; t < lay->n_tables; t++)
        if (!strcmp(lay->names[t], name)) return t;
    return -1;
}

int ck_check_shard(const char *dir, const ck_layout *lay, int p, long step, char *err,
                   size_t err_len) {
    char path[CK_PATH];
    ck_join(path, sizeof path, dir, lay->files[p]);
    struct stat st;
    if (stat(path, &st) != 0) {
        snprintf(err, err_len, "%s: shard %d of %d is missing: %s", path, p, lay->P,
                 strerror(errno));
        return -1;
    }
    if ((long long)st.st_size != lay->bytes[p]) {
        snprintf(err, err_len, "%s: %s: %lld bytes, the index records %lld", path,
                 (long long)st.st_size < lay->bytes[p] ? "truncated" : "wrong size",
                 (long long)st.st_size, lay->bytes[p]);
        return -1;
    }
    hid_t f = mp_h5_open_read(path, NULL, "corrupt file", err, err_len);
    if (f < 0) return -1;
    char *format = mp_h5_read_str_attr(f, "format");
    long long rank = -1, P = -1, s = -1;
    int rc = 0;
    if (!format || strcmp(format, MP_CKPT_SHARD_FORMAT) || mp_h5_read_int_attr(f, "rank", &rank) < 0 ||
        mp_h5_read_int_attr(f, "n_ranks", &P) < 0 || mp_h5_read_int_attr(f, "step", &s) < 0) {
        snprintf(err, err_len, "%s: not a millipede checkpoint shard (root attributes format, "
                 "rank, n_ranks, step)", path);
        rc = -1;
    } else if (rank != p || P != lay->P || s != step) {
        snprintf(err, err_len, "%s: holds shard %lld of %lld at step %lld, the index expects "
                 "shard %d of %d at step %ld", path, rank, P, s, p, lay->P, step);
        rc = -1;
    }
    free(format);
    H5Fclose(f);
    return rc;
}
