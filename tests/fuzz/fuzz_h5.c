// Structural mutation of HDF5 files (fuzz_h5.h).
#include "fuzz_h5.h"

#include <hdf5.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_OBJS 256
#define MAX_ATTRS 256
#define MAX_POINTS (1 << 16)   // datasets read whole for an edit (the seeds' largest: 2048)

typedef struct {
    const uint8_t *p;
    size_t n, at;
} prog;

static unsigned next(prog *g) { return g->at < g->n ? g->p[g->at++] : 0; }

typedef struct {
    char path[MAX_OBJS][160];
    int is_group[MAX_OBJS];
    int n;
    char attr_obj[MAX_ATTRS][160];
    char attr_name[MAX_ATTRS][64];
    int n_attr;
} listing;

static herr_t add_attr(hid_t loc, const char *name, const H5A_info_t *info, void *data) {
    (void)loc;
    (void)info;
    listing *l = data;
    if (l->n_attr < MAX_ATTRS && strlen(name) < sizeof l->attr_name[0]) {
        snprintf(l->attr_name[l->n_attr], sizeof l->attr_name[0], "%s", name);
        snprintf(l->attr_obj[l->n_attr], sizeof l->attr_obj[0], "%s", l->path[l->n - 1]);
        l->n_attr++;
    }
    return 0;
}

static void add_obj(hid_t file, listing *l, const char *path) {
    if (l->n >= MAX_OBJS || strlen(path) >= sizeof l->path[0]) return;
    H5O_info_t oi;
    if (H5Oget_info_by_name(file, path, &oi, H5P_DEFAULT) < 0) return;
    if (oi.type != H5O_TYPE_GROUP && oi.type != H5O_TYPE_DATASET) return;
    snprintf(l->path[l->n], sizeof l->path[0], "%s", path);
    l->is_group[l->n++] = oi.type == H5O_TYPE_GROUP;
    hid_t o = H5Oopen(file, path, H5P_DEFAULT);
    if (o < 0) return;
    hsize_t i = 0;
    H5Aiterate2(o, H5_INDEX_NAME, H5_ITER_INC, &i, add_attr, l);
    H5Oclose(o);
}

typedef struct {
    hid_t file;
    listing *l;
} visit_ctx;

static herr_t visit(hid_t g, const char *name, const H5L_info_t *info, void *data) {
    (void)g;
    visit_ctx *c = data;
    if (info->type != H5L_TYPE_HARD) return 0;
    char path[200];
    snprintf(path, sizeof path, "/%s", name);
    add_obj(c->file, c->l, path);
    return 0;
}

static void list_file(hid_t file, listing *l) {
    memset(l, 0, sizeof *l);
    add_obj(file, l, "/");
    visit_ctx c = {file, l};
    H5Lvisit(file, H5_INDEX_NAME, H5_ITER_INC, visit, &c);
}

// Values that sit on the edges of what the readers check: signs, zero, one past a count,
// the int32 and int64 limits, a rank count over the readers' cap.
static long long pick_int(unsigned b, long long old) {
    static const long long table[] = {0, 1, -1, 2, 3, 4, 16, 255, 256, 65536, INT_MAX,
                                      (long long)INT_MAX + 1, INT_MIN, LLONG_MAX, LLONG_MIN,
                                      (1LL << 24) + 1};
    if (b & 1) return table[(b >> 1) % 16];
    long long d = (long long)((b >> 1) % 9) - 4;   // old-4 .. old+4: off by one or a few
    if ((d < 0 && old < LLONG_MIN - d) || (d > 0 && old > LLONG_MAX - d)) return old;
    return old + d;
}

static double pick_float(unsigned b, double old) {
    static const double table[] = {NAN, INFINITY, -INFINITY, 3.4e38, -3.4e38, 1e30, 0.0,
                                   -0.0, 1e-45, 1.0, -1.0, 65504.0, 1e300, -1e-30};
    if (b & 1) return table[(b >> 1) % 14];
    return old * (double)((b >> 1) % 5) - 1.0;
}

// The values a configuration line may be given.
static const char *const cfg_values[] = {
    "0", "-1", "1", "2", "3", "7", "64", "65536", "2147483648", "99999999999999999999999",
    "1e30", "nan", "inf", "-inf", "", "x", "dense", "peer", "pkm", "dense,peer", "peer,peer,peer",
    "true", "false", "relu", "cuda", "bf16", "0x10", "1.5", "16", "256", "4,4", " = "};

static int obj_pick(const listing *l, unsigned b, int want_group) {
    int cand[MAX_OBJS], n = 0;
    for (int i = 0; i < l->n; i++)
        if ((want_group < 0 || l->is_group[i] == want_group) && strcmp(l->path[i], "/"))
            cand[n++] = i;
    return n ? cand[b % (unsigned)n] : -1;
}

static int write_str_attr(hid_t o, const char *name, const char *s, size_t len, int vlen) {
    hid_t t = H5Tcopy(H5T_C_S1), sp = H5Screate(H5S_SCALAR);
    int rc = -1;
    if (vlen ? H5Tset_size(t, H5T_VARIABLE) >= 0 : H5Tset_size(t, len ? len : 1) >= 0) {
        hid_t a = H5Acreate2(o, name, t, sp, H5P_DEFAULT, H5P_DEFAULT);
        if (a >= 0) {
            rc = H5Awrite(a, t, vlen ? (const void *)&s : (const void *)s) >= 0 ? 0 : -1;
            H5Aclose(a);
        }
    }
    H5Sclose(sp);
    H5Tclose(t);
    return rc;
}

static int edit_attr(hid_t file, const listing *l, prog *g, int op) {
    if (!l->n_attr) return 0;
    int k = (int)(next(g) % (unsigned)l->n_attr);
    hid_t o = H5Oopen(file, l->attr_obj[k], H5P_DEFAULT);
    if (o < 0) return 0;
    const char *name = l->attr_name[k];
    long long old = 0;
    {
        hid_t a = H5Aopen(o, name, H5P_DEFAULT);
        if (a >= 0) {
            hid_t t = H5Aget_type(a), sp = H5Aget_space(a);
            if (H5Tget_class(t) == H5T_INTEGER && H5Sget_simple_extent_npoints(sp) == 1)
                H5Aread(a, H5T_NATIVE_LLONG, &old);
            H5Sclose(sp);
            H5Tclose(t);
            H5Aclose(a);
        }
    }
    int done = H5Adelete(o, name) >= 0;
    unsigned b = next(g);
    if (done && op == 1) {   // an integer
        long long v = pick_int(b, old);
        hid_t sp = H5Screate(H5S_SCALAR);
        hid_t a = H5Acreate2(o, name, H5T_STD_I64LE, sp, H5P_DEFAULT, H5P_DEFAULT);
        if (a >= 0) H5Awrite(a, H5T_NATIVE_LLONG, &v), H5Aclose(a);
        H5Sclose(sp);
    } else if (done && op == 2) {   // a string of the program's bytes (NUL, newline, anything)
        char s[32];
        size_t len = b % 24;
        for (size_t i = 0; i < len; i++) s[i] = (char)next(g);
        write_str_attr(o, name, s, len, 0);
    } else if (done && op == 3) {   // the right value in the wrong kind, or a wrong one
        hid_t sp;
        switch (b % 4) {
        case 0: {   // float64
            double v = (double)old + 0.5;
            sp = H5Screate(H5S_SCALAR);
            hid_t a = H5Acreate2(o, name, H5T_IEEE_F64LE, sp, H5P_DEFAULT, H5P_DEFAULT);
            if (a >= 0) H5Awrite(a, H5T_NATIVE_DOUBLE, &v), H5Aclose(a);
            H5Sclose(sp);
            break;
        }
        case 1: {   // two integers
            long long v[2] = {old, old};
            hsize_t two = 2;
            sp = H5Screate_simple(1, &two, NULL);
            hid_t a = H5Acreate2(o, name, H5T_STD_I64LE, sp, H5P_DEFAULT, H5P_DEFAULT);
            if (a >= 0) H5Awrite(a, H5T_NATIVE_LLONG, v), H5Aclose(a);
            H5Sclose(sp);
            break;
        }
        case 2:   // a variable-length string
            write_str_attr(o, name, "millipede-checkpoint", 0, 1);
            break;
        default: {   // an empty dataspace
            sp = H5Screate(H5S_NULL);
            hid_t a = H5Acreate2(o, name, H5T_STD_I64LE, sp, H5P_DEFAULT, H5P_DEFAULT);
            if (a >= 0) H5Aclose(a);
            H5Sclose(sp);
        }
        }
    }
    H5Oclose(o);
    return done;
}

// One line of the stored configuration (root attribute "config") replaced, deleted,
// doubled, or a line of the program's bytes inserted.
static int edit_config(hid_t file, prog *g) {
    hid_t a = H5Aexists(file, "config") > 0 ? H5Aopen(file, "config", H5P_DEFAULT) : -1;
    if (a < 0) return 0;
    hid_t t = H5Aget_type(a);
    size_t n = H5Tget_class(t) == H5T_STRING && H5Tis_variable_str(t) == 0 ? H5Tget_size(t) : 0;
    char *text = n ? calloc(n + 1, 1) : NULL;
    int ok = text && H5Aread(a, t, text) >= 0;
    H5Tclose(t);
    H5Aclose(a);
    if (!ok) {
        free(text);
        return 0;
    }
    size_t len = strlen(text);
    char *lines[256];
    int nl = 0;
    for (char *s = strtok(text, "\n"); s && nl < 256; s = strtok(NULL, "\n")) lines[nl++] = s;
    int k = nl ? (int)(next(g) % (unsigned)nl) : 0;
    unsigned how = next(g) % 4, b = next(g);
    char *out = malloc(len + 256), extra[40];
    size_t o = 0;
    for (int i = 0; i < nl; i++) {
        if (i == k && how == 0 && strchr(lines[i], '=')) {   // a new value
            int key = (int)(strchr(lines[i], '=') - lines[i]);
            o += (size_t)sprintf(out + o, "%.*s= %s\n", key, lines[i],
                                 cfg_values[b % (sizeof cfg_values / sizeof *cfg_values)]);
            continue;
        }
        if (i == k && how == 1) continue;   // deleted
        o += (size_t)sprintf(out + o, "%s\n", lines[i]);
        if (i == k && how == 2) o += (size_t)sprintf(out + o, "%s\n", lines[i]);   // doubled
        if (i == k && how == 3) {   // a line of the program's bytes
            size_t m = b % 32;
            for (size_t j = 0; j < m; j++) extra[j] = (char)(next(g) | 1);   // no NUL inside
            o += (size_t)sprintf(out + o, "%.*s\n", (int)m, extra);
        }
    }
    free(text);
    H5Adelete(file, "config");
    write_str_attr(file, "config", out, o + 1, 0);
    free(out);
    return 1;
}

// Reads a dataset whole as doubles (NULL when it is too big or unreadable).
static double *read_all(hid_t d, hssize_t *np) {
    hid_t sp = H5Dget_space(d);
    *np = H5Sget_simple_extent_npoints(sp);
    H5Sclose(sp);
    if (*np < 0 || *np > MAX_POINTS) return NULL;
    double *v = calloc((size_t)*np + 1, sizeof *v);
    if (*np && H5Dread(d, H5T_NATIVE_DOUBLE, H5S_ALL, H5S_ALL, H5P_DEFAULT, v) < 0) {
        free(v);
        return NULL;
    }
    return v;
}

// Creates dataset path of type t and shape (ndim, dims), chunked with Fletcher32 when
// `checked` (as millipede writes them) or contiguous, and fills it from vals cyclically.
static void create_like(hid_t file, const char *path, hid_t t, int ndim, const hsize_t *dims,
                        int checked, const double *vals, hssize_t nvals) {
    hid_t sp = ndim ? H5Screate_simple(ndim, dims, NULL) : H5Screate(H5S_SCALAR);
    hssize_t np = H5Sget_simple_extent_npoints(sp);
    hid_t dcpl = H5Pcreate(H5P_DATASET_CREATE);
    if (checked && ndim && np > 0 && np <= MAX_POINTS) {
        H5Pset_chunk(dcpl, ndim, dims);
        H5Pset_fletcher32(dcpl);
    }
    hid_t d = H5Dcreate2(file, path, t, sp, H5P_DEFAULT, dcpl, H5P_DEFAULT);
    if (d >= 0 && np > 0 && np <= MAX_POINTS && vals && nvals > 0 && H5Tget_class(t) != H5T_STRING) {
        double *v = malloc((size_t)np * sizeof *v);
        for (hssize_t i = 0; i < np; i++) v[i] = vals[i % nvals];
        H5Dwrite(d, H5T_NATIVE_DOUBLE, H5S_ALL, H5S_ALL, H5P_DEFAULT, v);
        free(v);
    }
    if (d >= 0) H5Dclose(d);
    H5Pclose(dcpl);
    H5Sclose(sp);
}

// Replaces a dataset by one of another shape (op 6) or type (op 8), keeping its values.
static int reshape(hid_t file, const listing *l, prog *g, int op) {
    int k = obj_pick(l, next(g), 0);
    if (k < 0) return 0;
    hid_t d = H5Dopen2(file, l->path[k], H5P_DEFAULT);
    if (d < 0) return 0;
    hid_t t = H5Dget_type(d), sp = H5Dget_space(d);
    hsize_t old[H5S_MAX_RANK] = {0};
    int ndim = H5Sget_simple_extent_dims(sp, old, NULL);
    hssize_t nv = 0;
    double *vals = read_all(d, &nv);
    H5Sclose(sp);
    H5Dclose(d);
    unsigned b = next(g);
    hsize_t dims[3] = {old[0], ndim > 1 ? old[1] : 1, 1};
    hid_t nt = H5Tcopy(t);
    if (op == 6) {   // another shape: rank 0..3, each extent near the old ones or an edge
        ndim = (int)(b % 4);
        for (int i = 0; i < ndim; i++) {
            unsigned c = next(g);
            hsize_t base = i < 2 ? (i ? old[1] : old[0]) : 1;
            const hsize_t pick[8] = {base, base + 1, base ? base - 1 : 0, 0, 1, old[1 - (i & 1)],
                                     (hsize_t)1 << 20, 3};
            dims[i] = pick[c % 8];
        }
    } else {   // another type, same shape
        // (the H5T_ names are function calls, so no static table of them)
        hid_t types[6] = {H5T_STD_I32LE, H5T_STD_I64LE, H5T_IEEE_F64LE, H5T_STD_U8LE,
                          H5T_IEEE_F32BE, H5T_C_S1};
        H5Tclose(nt);
        nt = H5Tcopy(types[b % 6]);
        if (b % 6 == 5) H5Tset_size(nt, 8);
        if (ndim < 0) ndim = 1;
    }
    int done = H5Ldelete(file, l->path[k], H5P_DEFAULT) >= 0;
    if (done) create_like(file, l->path[k], nt, ndim, dims, (b >> 4) & 1, vals, nv);
    H5Tclose(nt);
    H5Tclose(t);
    free(vals);
    return done;
}

// Overwrites a few elements of a dataset in place (numbers) or bytes of its strings.
static int overwrite(hid_t file, const listing *l, prog *g) {
    int k = obj_pick(l, next(g), 0);
    if (k < 0) return 0;
    hid_t d = H5Dopen2(file, l->path[k], H5P_DEFAULT);
    if (d < 0) return 0;
    hid_t dcpl = H5Dget_create_plist(d), t = H5Dget_type(d);
    int done = 0;
    if (H5Pget_layout(dcpl) == H5D_VIRTUAL) {
        // writing through the mapping would edit the shard files: not this edit's job
    } else if (H5Tget_class(t) == H5T_STRING && H5Tis_variable_str(t) == 0) {
        hid_t sp = H5Dget_space(d);
        hssize_t np = H5Sget_simple_extent_npoints(sp);
        size_t n = (size_t)(np > 0 && np <= MAX_POINTS ? np : 0) * H5Tget_size(t);
        char *s = n ? malloc(n) : NULL;
        if (s && H5Dread(d, t, H5S_ALL, H5S_ALL, H5P_DEFAULT, s) >= 0) {
            static const char bytes[] = {'/', '\0', '.', 'x', '\n', '9'};
            s[next(g) % n] = bytes[next(g) % sizeof bytes];
            done = H5Dwrite(d, t, H5S_ALL, H5S_ALL, H5P_DEFAULT, s) >= 0;
        }
        free(s);
        H5Sclose(sp);
    } else {
        hssize_t np = 0;
        double *v = read_all(d, &np);
        if (v && np > 0) {
            int is_int = H5Tget_class(t) == H5T_INTEGER;
            for (unsigned r = next(g) % 3 + 1; r > 0; r--) {
                hssize_t i = (hssize_t)((next(g) | next(g) << 8) % (unsigned)np);
                unsigned b = next(g);
                double c = v[i] > 9.2e18 ? 9.2e18 : v[i] < -9.2e18 ? -9.2e18 : v[i];
                v[i] = is_int ? (double)pick_int(b, (long long)c) : pick_float(b, v[i]);
            }
            // an integer dataset gets exact int64 values (doubles would round the big ones)
            if (is_int) {
                long long *w = malloc((size_t)np * sizeof *w);
                for (hssize_t i = 0; i < np; i++)
                    w[i] = v[i] >= 9.2e18 ? LLONG_MAX : v[i] <= -9.2e18 ? LLONG_MIN : (long long)v[i];
                done = H5Dwrite(d, H5T_NATIVE_LLONG, H5S_ALL, H5S_ALL, H5P_DEFAULT, w) >= 0;
                free(w);
            } else {
                done = H5Dwrite(d, H5T_NATIVE_DOUBLE, H5S_ALL, H5S_ALL, H5P_DEFAULT, v) >= 0;
            }
        }
        free(v);
    }
    H5Tclose(t);
    H5Pclose(dcpl);
    H5Dclose(d);
    return done;
}

// Points one mapping of a virtual dataset at another file, another dataset, or drops it.
static int remap(hid_t file, const listing *l, prog *g) {
    int vds[MAX_OBJS], nv = 0;
    for (int i = 0; i < l->n; i++) {
        if (l->is_group[i]) continue;
        hid_t d = H5Dopen2(file, l->path[i], H5P_DEFAULT);
        if (d < 0) continue;
        hid_t dcpl = H5Dget_create_plist(d);
        if (H5Pget_layout(dcpl) == H5D_VIRTUAL) vds[nv++] = i;
        H5Pclose(dcpl);
        H5Dclose(d);
    }
    if (!nv) return 0;
    int k = vds[next(g) % (unsigned)nv];
    hid_t d = H5Dopen2(file, l->path[k], H5P_DEFAULT);
    hid_t dcpl = H5Dget_create_plist(d), t = H5Dget_type(d), sp = H5Dget_space(d);
    H5Dclose(d);
    size_t count = 0;
    H5Pget_virtual_count(dcpl, &count);
    hid_t nd = H5Pcreate(H5P_DATASET_CREATE);
    unsigned which = count ? next(g) % (unsigned)count : 0, how = next(g) % 4;
    static const char *const files[] = {"shard_00001.h5", "shard_00000.h5", "missing.h5", "a\nb.h5"};
    const char *other = l->path[obj_pick(l, next(g), 0)];
    for (size_t i = 0; i < count; i++) {
        char fname[256] = "", dname[256] = "";
        H5Pget_virtual_filename(dcpl, i, fname, sizeof fname);
        H5Pget_virtual_dsetname(dcpl, i, dname, sizeof dname);
        hid_t vs = H5Pget_virtual_vspace(dcpl, i), ss = H5Pget_virtual_srcspace(dcpl, i);
        if (i == which && how == 0) snprintf(fname, sizeof fname, "%s", files[next(g) % 4]);
        if (i == which && how == 1) snprintf(dname, sizeof dname, "%s", other);
        if (!(i == which && how == 2)) H5Pset_virtual(nd, vs, fname, dname, ss);
        if (i == which && how == 3) H5Pset_virtual(nd, vs, fname, dname, ss);   // twice
        H5Sclose(vs);
        H5Sclose(ss);
    }
    int done = H5Ldelete(file, l->path[k], H5P_DEFAULT) >= 0;
    if (done) {
        hid_t nds = H5Dcreate2(file, l->path[k], t, sp, H5P_DEFAULT, nd, H5P_DEFAULT);
        if (nds >= 0) H5Dclose(nds);
    }
    H5Pclose(nd);
    H5Pclose(dcpl);
    H5Tclose(t);
    H5Sclose(sp);
    return done;
}

int fz_h5_edit(const char *path, const uint8_t *bytes, size_t n) {
    hid_t file = H5Fopen(path, H5F_ACC_RDWR, H5P_DEFAULT);
    if (file < 0) return 0;
    prog g = {bytes, n, 0};
    listing *l = malloc(sizeof *l);
    int done = 0;
    for (int e = 0; e < 8 && g.at < g.n; e++) {
        list_file(file, l);   // again after each edit: the last one may have moved things
        unsigned op = next(&g) % 12;
        switch (op) {
        case 0: case 1: case 2: case 3: done += edit_attr(file, l, &g, (int)op); break;
        case 4: done += edit_config(file, &g); break;
        case 5: {   // delete a dataset or a group
            int k = obj_pick(l, next(&g), -1);
            done += k >= 0 && H5Ldelete(file, l->path[k], H5P_DEFAULT) >= 0;
            break;
        }
        case 6: case 8: done += reshape(file, l, &g, (int)op); break;
        case 7: done += overwrite(file, l, &g); break;
        case 9: {   // an extra dataset in some group
            int k = obj_pick(l, next(&g), 1);
            char p[200];
            unsigned b = next(&g);   // a name with a newline too: messages quote names
            snprintf(p, sizeof p, "%s/extra%s%u", k >= 0 ? l->path[k] : "", b & 4 ? "\n" : "", b % 4);
            hsize_t four = 4;
            const double v[1] = {1.0};
            create_like(file, p, H5T_IEEE_F32LE, 1, &four, 1, v, 1);
            done++;
            break;
        }
        case 10: {   // a dataset becomes a group, or a group a dataset
            int k = obj_pick(l, next(&g), -1);
            if (k < 0 || H5Ldelete(file, l->path[k], H5P_DEFAULT) < 0) break;
            if (l->is_group[k]) {
                hsize_t two = 2;
                const double v[1] = {0.0};
                create_like(file, l->path[k], H5T_STD_I64LE, 1, &two, 0, v, 1);
            } else {
                hid_t gr = H5Gcreate2(file, l->path[k], H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
                if (gr >= 0) H5Gclose(gr);
            }
            done++;
            break;
        }
        default: done += remap(file, l, &g);
        }
    }
    free(l);
    H5Fclose(file);
    return done;
}

int fz_h5_set_i64(const char *path, const char *dset, int p, long long value) {
    hid_t file = H5Fopen(path, H5F_ACC_RDWR, H5P_DEFAULT);
    if (file < 0) return -1;
    int rc = -1;
    if (H5Lexists(file, "/layout", H5P_DEFAULT) > 0 && H5Lexists(file, dset, H5P_DEFAULT) > 0) {
        hid_t d = H5Dopen2(file, dset, H5P_DEFAULT);
        hid_t sp = d >= 0 ? H5Dget_space(d) : -1;
        hsize_t at = (hsize_t)p, one = 1;
        if (sp >= 0 && H5Sget_simple_extent_npoints(sp) > p &&
            H5Sget_simple_extent_ndims(sp) == 1 &&
            H5Sselect_hyperslab(sp, H5S_SELECT_SET, &at, NULL, &one, NULL) >= 0) {
            hid_t ms = H5Screate_simple(1, &one, NULL);
            rc = H5Dwrite(d, H5T_NATIVE_LLONG, ms, sp, H5P_DEFAULT, &value) >= 0 ? 0 : -1;
            H5Sclose(ms);
        }
        if (sp >= 0) H5Sclose(sp);
        if (d >= 0) H5Dclose(d);
    }
    H5Fclose(file);
    return rc;
}

void fz_h5_check_closed(const char *what) {
    ssize_t n = H5Fget_obj_count(H5F_OBJ_ALL, H5F_OBJ_ALL);
    if (n > 0) {
        fprintf(stderr, "CONTRACT: %s left %zd HDF5 objects open\n", what, n);
        abort();
    }
}
