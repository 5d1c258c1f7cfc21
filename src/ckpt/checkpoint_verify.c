// `millipede ckpt inspect` and `ckpt verify` (checkpoint.h). Verify reads every byte of
// data once, straight from the file that holds it (the index for replicated tensors, each
// shard for its expert rows), so every Fletcher32 checksum is checked exactly once; the
// virtual datasets are checked by their mappings, not read again.
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "ckpt/checkpoint_private.h"
#include "core/log.h"
#include "millipede/tokenizer.h"

#define STAGE_BYTES ((size_t)64 << 20)

static long long file_bytes(const char *path) {
    struct stat st;
    return stat(path, &st) == 0 ? (long long)st.st_size : -1;
}

// ----------------------------------------------------------------------------
// inspect

typedef struct {
    FILE *out;
    const char *group;
} list_ctx;

static herr_t print_dataset(hid_t g, const char *name, const H5L_info_t *info, void *data) {
    (void)info;
    list_ctx *c = data;
    hid_t d = H5Dopen2(g, name, H5P_DEFAULT);
    if (d < 0) {
        fprintf(c->out, "  %-7s %-36s (not a dataset)\n", c->group, name);
        return 0;
    }
    hid_t sp = H5Dget_space(d), dcpl = H5Dget_create_plist(d);
    hsize_t dims[H5S_MAX_RANK] = {0};
    int ndim = sp >= 0 ? H5Sget_simple_extent_ndims(sp) : -1;
    if (ndim > 0 && ndim <= H5S_MAX_RANK) H5Sget_simple_extent_dims(sp, dims, NULL);
    char shape[64];
    mp_h5_shape_str(shape, sizeof shape, ndim, dims);
    const char *where = "index.h5";
    char vbuf[64];
    size_t nmap = 0;
    if (dcpl >= 0 && H5Pget_layout(dcpl) == H5D_VIRTUAL && H5Pget_virtual_count(dcpl, &nmap) >= 0) {
        snprintf(vbuf, sizeof vbuf, "virtual over %zu shard%s", nmap, nmap == 1 ? "" : "s");
        where = vbuf;
    }
    double mib = 4.0 * (double)(ndim >= 1 ? dims[0] : 0) * (double)(ndim == 2 ? dims[1] : 1) / 1048576.0;
    fprintf(c->out, "  %-7s %-36s %-16s %10.2f MiB  %s\n", c->group, name, shape, mib, where);
    if (dcpl >= 0) H5Pclose(dcpl);
    if (sp >= 0) H5Sclose(sp);
    H5Dclose(d);
    return 0;
}

int mp_ckpt_inspect(const char *dir, FILE *out, char *err, size_t err_len) {
    mp_ckpt_info info;
    char *text = NULL, index[CK_PATH];
    ck_join(index, sizeof index, dir, MP_CKPT_INDEX);
    mp_h5_quiet q = mp_h5_quiet_begin();
    hid_t file = ck_open_index(dir, &info, &text, err, err_len);
    if (file < 0) {
        mp_h5_quiet_end(q);
        return -1;
    }
    ck_layout lay;
    if (ck_layout_read(file, index, &lay, err, err_len) != 0) {
        free(text);
        H5Fclose(file);
        mp_h5_quiet_end(q);
        return -1;
    }
    char *created = mp_h5_read_str_attr(file, "created"), *writer = mp_h5_read_str_attr(file, "writer");
    fprintf(out, "checkpoint   %s\n", dir);
    fprintf(out, "format       %s version %d, written %s by %s\n", MP_CKPT_FORMAT, MP_CKPT_VERSION,
            created ? created : "?", writer ? writer : "?");
    fprintf(out, "step         %ld (AdamW updates %ld; train.seed %llu; next data step %ld)\n",
            info.step, info.adam_t, (unsigned long long)info.seed, info.step);
    struct mp_tokenizer *tok;
    char terr[512];
    if (mp_h5_read_tokenizer(file, index, &tok, terr, sizeof terr) != 0)
        fprintf(out, "tokenizer    unreadable: %s\n", terr);
    else if (tok)
        fprintf(out, "tokenizer    %s, %d tokens (hash %016llx)\n", mp_tokenizer_kind(tok),
                mp_tokenizer_vocab(tok), (unsigned long long)mp_tokenizer_hash(tok));
    else
        fprintf(out, "tokenizer    bytes\n");
    mp_tokenizer_free(tok);
    fprintf(out, "ranks        %d (one shard file each)\n", lay.P);
    free(created);
    free(writer);

    long long idx_bytes = file_bytes(index), total = idx_bytes > 0 ? idx_bytes : 0;
    fprintf(out, "files\n  %-16s %14lld bytes  replicated state, virtual datasets\n", MP_CKPT_INDEX,
            idx_bytes);
    for (int p = 0; p < lay.P; p++) {
        char path[CK_PATH];
        ck_join(path, sizeof path, dir, lay.files[p]);
        long long b = file_bytes(path);
        total += b > 0 ? b : 0;
        fprintf(out, "  %-16s %14lld bytes  rank %d%s\n", lay.files[p], b, p,
                b < 0 ? "  MISSING" : b != lay.bytes[p] ? "  SIZE DIFFERS FROM THE INDEX" : "");
    }
    fprintf(out, "  total            %14lld bytes (%.2f MiB)\n", total, (double)total / 1048576.0);
    fprintf(out, "layout       expert rows [start, end) per shard\n");
    for (int t = 0; t < lay.n_tables; t++) {
        fprintf(out, "  %-20s", lay.names[t]);
        for (int p = 0; p < lay.P; p++) {
            const long long *r = lay.rows + ((size_t)t * lay.P + p) * 2;
            fprintf(out, " %d:[%lld, %lld)", p, r[0], r[1]);
        }
        fprintf(out, "\n");
    }
    fprintf(out, "datasets     (group, name, global shape, float32 size, where)\n");
    for (int g = 0; g < CK_N_GROUPS; g++) {
        char gpath[16];
        snprintf(gpath, sizeof gpath, "/%s", ck_group_names[g]);
        if (!mp_h5_exists(file, gpath)) continue;
        hid_t grp = H5Gopen2(file, gpath, H5P_DEFAULT);
        if (grp < 0) {   // a damaged index: verify names it; inspect lists what there is
            fprintf(out, "  %-7s (not a group)\n", ck_group_names[g]);
            continue;
        }
        list_ctx c = {out, ck_group_names[g]};
        hsize_t i = 0;
        H5Literate(grp, H5_INDEX_NAME, H5_ITER_INC, &i, print_dataset, &c);
        H5Gclose(grp);
    }
    fprintf(out, "config\n");
    for (char *line = strtok(text, "\n"); line; line = strtok(NULL, "\n"))
        fprintf(out, "  %s\n", line);
    ck_layout_free(&lay);
    free(text);
    H5Fclose(file);
    mp_h5_quiet_end(q);
    return 0;
}

// ----------------------------------------------------------------------------
// verify

typedef struct {
    FILE *errs;
    int problems;
    double bytes_read;
} verifier;

static void problem(verifier *v, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void problem(verifier *v, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fputs("millipede: error: ", v->errs);
    vfprintf(v->errs, fmt, ap);
    fputc('\n', v->errs);
    va_end(ap);
    v->problems++;
}

// Opens dataset `path` of file and checks it is float32 of shape dims; reads all of it
// (every chunk's checksum) unless it is virtual. Returns the open dataset or -1.
static hid_t check_dataset(verifier *v, hid_t file, const char *fname, const char *path, int ndim,
                           const hsize_t *dims, int want_virtual, float *host, size_t host_floats) {
    char want[64], have[64];
    mp_h5_shape_str(want, sizeof want, ndim, dims);
    if (!mp_h5_exists(file, path)) {
        problem(v, "%s: dataset '%s' is missing (expected shape %s)", fname, path, want);
        return -1;
    }
    hid_t d = H5Dopen2(file, path, H5P_DEFAULT);
    if (d < 0) {
        problem(v, "%s: '%s' is not a readable dataset", fname, path);
        return -1;
    }
    hid_t sp = H5Dget_space(d), ft = H5Dget_type(d), dcpl = H5Dget_create_plist(d);
    hsize_t got[H5S_MAX_RANK] = {0};
    int nd = sp >= 0 ? H5Sget_simple_extent_ndims(sp) : -1;
    if (nd > 0 && nd <= H5S_MAX_RANK) H5Sget_simple_extent_dims(sp, got, NULL);
    int ok = 1;
    if (nd != ndim || got[0] != dims[0] || (ndim == 2 && got[1] != dims[1])) {
        mp_h5_shape_str(have, sizeof have, nd, got);
        problem(v, "%s: dataset '%s' has shape %s, expected %s", fname, path, have, want);
        ok = 0;
    } else if (ft < 0 || H5Tget_class(ft) != H5T_FLOAT || H5Tget_size(ft) != 4) {
        problem(v, "%s: dataset '%s' is not float32", fname, path);
        ok = 0;
    } else if (want_virtual != (dcpl >= 0 && H5Pget_layout(dcpl) == H5D_VIRTUAL)) {
        problem(v, "%s: dataset '%s' should %sbe a virtual dataset", fname, path,
                want_virtual ? "" : "not ");
        ok = 0;
    } else if (!want_virtual) {
        int filtered = 0;
        for (int k = 0; dcpl >= 0 && k < H5Pget_nfilters(dcpl); k++) {
            unsigned flags;
            size_t ne = 0;
            char nm[32];
            if (H5Pget_filter2(dcpl, (unsigned)k, &flags, &ne, NULL, sizeof nm, nm, NULL) ==
                H5Z_FILTER_FLETCHER32)
                filtered = 1;
        }
        if (!filtered) problem(v, "%s: dataset '%s' has no Fletcher32 checksum", fname, path);
        hsize_t cols = ndim == 2 ? dims[1] : 1, block = host_floats / cols;
        if (block < 1) block = 1;
        for (hsize_t r0 = 0; r0 < dims[0]; r0 += block) {
            hsize_t n = dims[0] - r0 < block ? dims[0] - r0 : block;
            hsize_t start[2] = {r0, 0}, count[2] = {n, cols};
            hid_t ms = MP_CHECK_H5(H5Screate_simple(ndim, count, NULL));
            MP_CHECK_H5(H5Sselect_hyperslab(sp, H5S_SELECT_SET, start, NULL, count, NULL));
            herr_t rc = H5Dread(d, H5T_NATIVE_FLOAT, ms, sp, H5P_DEFAULT, host);
            H5Sclose(ms);
            if (rc < 0) {
                problem(v, "%s: dataset '%s': checksum mismatch or corrupt data in rows [%llu, %llu)",
                        fname, path, (unsigned long long)r0, (unsigned long long)(r0 + n));
                ok = 0;
                break;
            }
            v->bytes_read += (double)(n * cols) * 4.0;
        }
    }
    if (dcpl >= 0) H5Pclose(dcpl);
    if (ft >= 0) H5Tclose(ft);
    if (sp >= 0) H5Sclose(sp);
    if (!ok) {
        H5Dclose(d);
        return -1;
    }
    return d;
}

// The virtual dataset's mappings must be exactly the layout's: shard p's file and the same
// dataset path for rows [start_p, end_p).
static void check_mapping(verifier *v, hid_t d, const char *index, const ck_ds *e,
                          const ck_layout *lay, int t) {
    hid_t dcpl = H5Dget_create_plist(d);
    size_t count = 0;
    H5Pget_virtual_count(dcpl, &count);
    size_t want = 0;
    for (int p = 0; p < lay->P; p++) {
        const long long *r = lay->rows + ((size_t)t * lay->P + p) * 2;
        if (r[1] > r[0]) want++;
    }
    if (count != want) {
        problem(v, "%s: dataset '%s' maps %zu shards, the layout has %zu", index, e->path, count, want);
        H5Pclose(dcpl);
        return;
    }
    size_t i = 0;
    for (int p = 0; p < lay->P; p++) {
        const long long *r = lay->rows + ((size_t)t * lay->P + p) * 2;
        if (r[1] <= r[0]) continue;
        char fname[64] = "", dname[128] = "";
        H5Pget_virtual_filename(dcpl, i, fname, sizeof fname);
        H5Pget_virtual_dsetname(dcpl, i, dname, sizeof dname);
        hid_t vs = H5Pget_virtual_vspace(dcpl, i);
        hsize_t lo[2] = {0, 0}, hi[2] = {0, 0};
        if (vs >= 0) H5Sget_select_bounds(vs, lo, hi);
        if (vs >= 0) H5Sclose(vs);
        if (strcmp(fname, lay->files[p]) || strcmp(dname, e->path) || lo[0] != (hsize_t)r[0] ||
            hi[0] + 1 != (hsize_t)r[1])
            problem(v, "%s: dataset '%s': mapping %zu (%s:%s rows [%llu, %llu]) differs from the "
                    "layout (%s rows [%lld, %lld))", index, e->path, i, mp_h5_printable(fname),
                    mp_h5_printable(dname),
                    (unsigned long long)lo[0], (unsigned long long)hi[0], lay->files[p], r[0], r[1]);
        i++;
    }
    H5Pclose(dcpl);
}

// A lower bound on the parameters of cfg's model, in double so that no configuration
// overflows it: the matrices (embeddings, attention, MLP, query, sub-keys, expert tables);
// biases and norms are left out.
static double min_params(const mp_config *c) {
    double C = c->d_model, T = c->context, V = c->vocab_size;
    double F = c->dense_hidden > 0 ? c->dense_hidden : 4.0 * C, total = V * C + T * C;
    for (int l = 0; l < c->n_layers; l++) {
        const mp_retrieval_config *r = mp_config_retrieval(c, l);
        total += 4.0 * C * C;   // qkv (3C, C), proj (C, C)
        if (!r) {
            total += 2.0 * F * C;
            continue;
        }
        total += (double)r->heads * r->key_dim * C + (double)r->n_sub * r->key_dim +
                 (c->ffn[l] == MP_FFN_PEER ? 2.0 : 1.0) * (double)r->n_experts * C;
    }
    return total;
}

// The bytes of the index and of the shard files the layout names, as they are on disk.
// A checkpoint holds every parameter and both AdamW moments as float32, uncompressed, so it
// is at least 12 bytes per parameter.
static double stored_bytes(const char *index, const char *dir, const ck_layout *lay) {
    double total = 0;
    long long b = file_bytes(index);
    if (b > 0) total += (double)b;
    for (int p = 0; p < lay->P; p++) {
        char path[CK_PATH];
        ck_join(path, sizeof path, dir, lay->files[p]);
        if ((b = file_bytes(path)) > 0) total += (double)b;
    }
    return total;
}

static int count_links(hid_t file, const char *group) {
    if (!mp_h5_exists(file, group)) return 0;
    H5G_info_t gi;
    hid_t g = H5Gopen2(file, group, H5P_DEFAULT);
    if (g < 0 || H5Gget_info(g, &gi) < 0) return -1;
    H5Gclose(g);
    return (int)gi.nlinks;
}

int mp_ckpt_verify(const char *dir, FILE *out, FILE *errs) {
    verifier v = {errs, 0, 0};
    char err[1024], index[CK_PATH], *text = NULL;
    ck_join(index, sizeof index, dir, MP_CKPT_INDEX);
    mp_ckpt_info info;
    mp_h5_quiet q = mp_h5_quiet_begin();
    hid_t file = ck_open_index(dir, &info, &text, err, sizeof err);
    if (file < 0) {
        problem(&v, "%s", err);
        mp_h5_quiet_end(q);
        return v.problems;
    }
    ck_layout lay = {0};
    mp_model *m = NULL;
    ck_ds *ds = NULL;
    float *host = NULL;
    int n = 0;
    mp_config cfg;
    mp_config_defaults(&cfg);
    if (mp_config_from_ini_string(&cfg, text, index, err, sizeof err) != 0 ||
        mp_config_validate(&cfg, err, sizeof err) != 0) {
        problem(&v, "%s", err);
        goto done;
    }
    if (ck_layout_read(file, index, &lay, err, sizeof err) != 0) {
        problem(&v, "%s", err);
        goto done;
    }
    struct mp_tokenizer *tok;   // a tokenizer that loads and matches its hash
    if (mp_h5_read_tokenizer(file, index, &tok, err, sizeof err) != 0) problem(&v, "%s", err);
    if (tok && mp_tokenizer_vocab(tok) != cfg.vocab_size)
        problem(&v, "%s: dataset '/tokenizer' has %d tokens, model.vocab_size is %d", index,
                mp_tokenizer_vocab(tok), cfg.vocab_size);
    mp_tokenizer_free(tok);
    // The stored configuration is input too: a damaged one may describe a model far larger
    // than these files, which must be reported, not allocated.
    double need = 12.0 * min_params(&cfg), have = stored_bytes(index, dir, &lay);
    if (need > have) {
        problem(&v, "%s: the stored configuration implies at least %.0f bytes of parameters and "
                "AdamW moments, but the checkpoint's files hold %.0f bytes", index, need, have);
        goto done;
    }
    // The datasets the configuration implies, from a model that holds only a sliver of the
    // expert rows (its table has the global shapes; only those matter here). It is built for
    // context 1, so that its activations (attention is context^2) cost nothing; wpe's global
    // shape is set back below.
    int parts = 0;
    for (int l = 0; l < cfg.n_layers; l++) {
        const mp_retrieval_config *rc = mp_config_retrieval(&cfg, l);
        if (rc && (parts == 0 || rc->n_sub < parts)) parts = rc->n_sub;
    }
    mp_config shape_cfg = cfg;
    shape_cfg.context = 1;
    m = mp_model_create_part(&shape_cfg, mp_backend_cpu(), 1, 0, parts ? parts : 1);
    mp_adamw shape_only;
    for (int g = 0; g < MP_N_GROUPS; g++) shape_only.m[g] = shape_only.v[g] = mp_model_params(m, g);
    n = ck_datasets(m, &shape_only, &ds);
    for (int i = 0; i < n; i++)
        if (!strcmp(ds[i].name, "wpe")) ds[i].dims[0] = ds[i].rows = (hsize_t)cfg.context;
    // staging for the largest dataset, at most STAGE_BYTES (a small checkpoint needs little)
    size_t nf = 1, cap = STAGE_BYTES / sizeof(float);
    for (int i = 0; i < n; i++)
        if ((size_t)(ds[i].dims[0] * ck_cols(&ds[i])) > nf) nf = (size_t)(ds[i].dims[0] * ck_cols(&ds[i]));
    if (nf > cap) nf = cap;
    host = mp_malloc(nf * sizeof(float));

    // the index: replicated datasets read in full, virtual ones checked against the layout
    int n_tensors = mp_model_n_tensors(m), n_tables = 0;
    for (int i = 0; i < n; i++) {
        const ck_ds *d = &ds[i];
        int t = d->sharded ? ck_layout_table(&lay, d->name) : -1;
        if (d->sharded && t < 0) {
            problem(&v, "%s: dataset '/layout/rows/%s' is missing", index, d->name);
            continue;
        }
        if (d->sharded && (hsize_t)lay.rows[((size_t)t * lay.P + lay.P - 1) * 2 + 1] != d->dims[0])
            problem(&v, "%s: dataset '/layout/rows/%s' does not cover the %llu rows of '%s'", index,
                    d->name, (unsigned long long)d->dims[0], d->path);
        n_tables += d->sharded && d->group == CK_PARAMS;
        hid_t h = check_dataset(&v, file, index, d->path, d->ndim, d->dims, d->sharded, host, nf);
        if (h < 0) continue;
        if (d->sharded) check_mapping(&v, h, index, d, &lay, t);
        H5Dclose(h);
    }
    int want_links[CK_N_GROUPS] = {n_tensors, n_tensors, n_tensors, n - 3 * n_tensors};
    for (int g = 0; g < CK_N_GROUPS; g++) {
        char gpath[16];
        snprintf(gpath, sizeof gpath, "/%s", ck_group_names[g]);
        int have = count_links(file, gpath);
        if (have != want_links[g])
            problem(&v, "%s: group '%s' holds %d datasets, the configuration implies %d", index, gpath,
                    have, want_links[g]);
    }
    if (lay.n_tables != n_tables)
        problem(&v, "%s: /layout/rows lists %d expert tables, the configuration implies %d", index,
                lay.n_tables, n_tables);

    // every shard: present, its recorded size, then every dataset read in full
    for (int p = 0; p < lay.P; p++) {
        char path[CK_PATH];
        ck_join(path, sizeof path, dir, lay.files[p]);
        if (ck_check_shard(dir, &lay, p, info.step, err, sizeof err) != 0) {
            problem(&v, "%s", err);
            continue;
        }
        hid_t f = H5Fopen(path, H5F_ACC_RDONLY, H5P_DEFAULT);
        if (f < 0) {
            problem(&v, "%s: cannot open as HDF5", path);
            continue;
        }
        int expected = 0;
        for (int i = 0; i < n; i++) {
            const ck_ds *d = &ds[i];
            int t = d->sharded ? ck_layout_table(&lay, d->name) : -1;
            if (t < 0) continue;
            expected++;
            const long long *r = lay.rows + ((size_t)t * lay.P + p) * 2;
            hsize_t dims[2] = {(hsize_t)(r[1] - r[0]), ck_cols(d)};
            hid_t h = check_dataset(&v, f, path, d->path, d->ndim, dims, 0, host, nf);
            if (h < 0) continue;
            long long start = -1;
            if (mp_h5_read_int_attr(h, "row_start", &start) < 0 || start != r[0])
                problem(&v, "%s: dataset '%s': attribute row_start is %lld, the layout says %lld",
                        path, d->path, start, r[0]);
            H5Dclose(h);
        }
        int have = count_links(f, "/params") + count_links(f, "/adam_m") + count_links(f, "/adam_v");
        if (have != expected)
            problem(&v, "%s: holds %d datasets, the layout implies %d", path, have, expected);
        H5Fclose(f);
    }
done:
    if (v.problems == 0)
        fprintf(out, "ok: %s: step %ld, %d shard%s + index, %d datasets, %.1f MiB read, all "
                "checksums good\n", dir, info.step, lay.P, lay.P == 1 ? "" : "s", n,
                v.bytes_read / 1048576.0);
    else
        fprintf(out, "%s: %d problem%s\n", dir, v.problems, v.problems == 1 ? "" : "s");
    free(host);
    free(ds);
    if (m) mp_model_free(m);
    ck_layout_free(&lay);
    free(text);
    H5Fclose(file);
    mp_h5_quiet_end(q);
    return v.problems;
}
