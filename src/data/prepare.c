// `millipede data prepare`: text files -> DIR/train.bin and DIR/val.bin (docs/data.md).
// Each file is one document. Documents are ordered by full path and assigned to a split
// by a hash of their path relative to the PATH they were found under, so the result is
// the same on every run and wherever the corpus lives.
#include "millipede/data.h"
#include <dirent.h>
#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include "core/log.h"
#include "core/rng.h"

// The split hash: mp_hash3(MP_SPLIT_SEED, MP_SPLIT_STREAM, fnv1a64(relative path)).
#define MP_SPLIT_SEED 0x6d696c6c69706564ULL   // "millipede"
#define MP_SPLIT_STREAM 0x73706c6974ULL       // "split"

static const char *data_usage =
    "usage: millipede data prepare --out DIR [--val-fraction F] [--vocab V] PATH...\n"
    "\n"
    "Tokenizes text files into DIR/train.bin and DIR/val.bin (byte tokenizer: token = byte).\n"
    "PATHs are files or directories (walked recursively; regular files only; empty files\n"
    "and DIR itself skipped). Each file is one document; documents are ordered by full\n"
    "path and go to validation when a hash of their path relative to PATH falls below F.\n"
    "\n"
    "  --out DIR            output directory (created if missing)\n"
    "  --val-fraction F     share of documents for validation, 0 < F < 1 (default 0.05)\n"
    "  --vocab V            vocab_size written to the shard headers, 256..65536 (default 256)\n";

typedef struct {
    char *full;      // path as opened
    char *rel;       // path relative to the PATH it was found under (hashed for the split)
    int val;         // 1: validation split
} doc;

typedef struct {
    doc *d;
    size_t n, cap;
} doc_list;

// What a directory walk collects, and the one directory it must not enter.
typedef struct {
    doc_list *docs;
    size_t n_empty;      // empty regular files, skipped
    int have_out;        // --out exists already: skip it, so old shards are not read as text
    dev_t out_dev;
    ino_t out_ino;
} walk_state;

typedef struct {
    unsigned char *p;
    size_t n, cap;
} byte_buf;

static int input_error(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static int input_error(const char *fmt, ...) {
    if (mp_rank() == 0) {
        char msg[2048];
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(msg, sizeof msg, fmt, ap);
        va_end(ap);
        fprintf(stderr, "millipede: error: %s\n", msg);
        fflush(stderr);
    }
    return 2;
}

static char *dup_str(const char *s) {
    size_t n = strlen(s) + 1;
    char *p = mp_malloc(n);
    memcpy(p, s, n);
    return p;
}

static char *join_path(const char *a, const char *b) {
    if (!a[0]) return dup_str(b);
    size_t na = strlen(a), nb = strlen(b);
    char *p = mp_malloc(na + nb + 2);
    memcpy(p, a, na);
    p[na] = '/';
    memcpy(p + na + 1, b, nb + 1);
    return p;
}

static void add_doc(doc_list *l, char *full, char *rel) {
    if (l->n == l->cap) {
        l->cap = l->cap ? 2 * l->cap : 64;
        doc *nd = realloc(l->d, l->cap * sizeof *nd);
        if (!nd) mp_fatal("out of memory listing files");
        l->d = nd;
    }
    l->d[l->n++] = (doc){full, rel, 0};
}

static uint64_t fnv1a64(const char *s) {
    uint64_t h = 0xcbf29ce484222325ULL;
    for (; *s; s++) h = (h ^ (unsigned char)*s) * 0x100000001b3ULL;
    return h;
}

// Walks dir recursively and appends its non-empty regular files. Symbolic links to files
// are followed; symbolic links to directories are not (no cycles). Returns 0 or 2.
static int walk(const char *dir, const char *rel, walk_state *w) {
    DIR *d = opendir(dir);
    if (!d) return input_error("cannot read directory %s: %s", dir, strerror(errno));
    int status = 0;
    struct dirent *e;
    while (status == 0 && (errno = 0, e = readdir(d)) != NULL) {
        if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, "..")) continue;
        char *full = join_path(dir, e->d_name);
        char *r = join_path(rel, e->d_name);
        struct stat st;
        int is_link = lstat(full, &st) == 0 && S_ISLNK(st.st_mode);
        if ((is_link ? stat(full, &st) : lstat(full, &st)) != 0) {
            if (is_link) {   // dangling link: nothing to read, not an error
                free(full);
                free(r);
                continue;
            }
            status = input_error("cannot stat %s: %s", full, strerror(errno));
        } else if (S_ISDIR(st.st_mode) && !is_link) {
            if (!(w->have_out && st.st_dev == w->out_dev && st.st_ino == w->out_ino))
                status = walk(full, r, w);
        } else if (S_ISREG(st.st_mode) && st.st_size > 0) {
            add_doc(w->docs, full, r);
            continue;   // the list owns the strings now
        } else if (S_ISREG(st.st_mode)) {
            w->n_empty++;
        }
        free(full);
        free(r);
    }
    if (status == 0 && errno != 0) status = input_error("cannot read directory %s: %s", dir, strerror(errno));
    closedir(d);
    return status;
}

static int cmp_doc(const void *a, const void *b) {
    return strcmp(((const doc *)a)->full, ((const doc *)b)->full);
}

// Appends the whole file to buf. Returns 0, or 2 with a message naming the file.
static int read_file_into(const char *path, byte_buf *buf) {
    FILE *f = fopen(path, "rb");
    if (!f) return input_error("cannot open %s: %s", path, strerror(errno));
    for (;;) {
        if (buf->cap - buf->n < (1 << 16)) {
            size_t cap = buf->cap ? 2 * buf->cap : (1 << 20);
            unsigned char *p = realloc(buf->p, cap);
            if (!p) mp_fatal("out of memory reading %s (%zu bytes so far)", path, buf->n);
            buf->p = p;
            buf->cap = cap;
        }
        size_t got = fread(buf->p + buf->n, 1, buf->cap - buf->n, f);
        buf->n += got;
        if (got == 0) break;
    }
    int bad = ferror(f);
    fclose(f);
    if (bad) return input_error("cannot read %s: I/O error", path);
    return 0;
}

// mkdir -p
static int make_dirs(const char *dir) {
    char *p = dup_str(dir);
    for (char *s = p + 1; ; s++) {
        if (*s == '/' || *s == '\0') {
            char c = *s;
            *s = '\0';
            if (mkdir(p, 0777) != 0 && errno != EEXIST) {
                int status = input_error("cannot create directory %s: %s", p, strerror(errno));
                free(p);
                return status;
            }
            *s = c;
            if (c == '\0') break;
        }
    }
    free(p);
    struct stat st;
    if (stat(dir, &st) != 0 || !S_ISDIR(st.st_mode))
        return input_error("--out %s exists and is not a directory", dir);
    return 0;
}

static int write_split(const char *dir, const char *name, const byte_buf *b, uint32_t vocab,
                       char *path, size_t path_len) {
    snprintf(path, path_len, "%s/%s", dir, name);
    uint16_t *tok = mp_malloc((b->n ? b->n : 1) * sizeof(uint16_t));   // (n,)
    mp_tokenize_bytes(b->p, b->n, tok);
    char err[1400];
    int rc = mp_shard_write(path, vocab, tok, b->n, err, sizeof err);
    free(tok);
    if (rc != 0) {
        fprintf(stderr, "millipede: error: %s\n", err);
        return 1;
    }
    return 0;
}

static int prepare(int argc, char **argv) {
    const char *out = NULL;
    double val_fraction = 0.05;
    long vocab = MP_BYTE_VOCAB;
    const char **paths = mp_calloc((size_t)argc, sizeof *paths);
    int n_paths = 0, opts_done = 0, status = 0;

    for (int i = 1; i < argc && status == 0; i++) {   // argv[0] == "prepare"
        const char *a = argv[i];
        if (opts_done || a[0] != '-' || !strcmp(a, "-")) {
            paths[n_paths++] = a;
            continue;
        }
        if (!strcmp(a, "--")) {
            opts_done = 1;
            continue;
        }
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            if (mp_rank() == 0) fputs(data_usage, stdout);
            free(paths);
            return 0;
        }
        // --key value or --key=value
        const char *eq = strchr(a, '=');
        size_t klen = eq ? (size_t)(eq - a) : strlen(a);
        const char *val = eq ? eq + 1 : (i + 1 < argc ? argv[i + 1] : NULL);
        int is_out = klen == 5 && !strncmp(a, "--out", 5);
        int is_vf = klen == 14 && !strncmp(a, "--val-fraction", 14);
        int is_vocab = klen == 7 && !strncmp(a, "--vocab", 7);
        if (!is_out && !is_vf && !is_vocab) {
            status = input_error("data prepare: unknown option '%s' (see millipede data prepare --help)", a);
            break;
        }
        if (!val) {
            status = input_error("data prepare: %.*s needs a value", (int)klen, a);
            break;
        }
        if (!eq) i++;
        char *end;
        if (is_out) {
            if (!val[0]) status = input_error("data prepare: --out needs a directory");
            out = val;
        } else if (is_vf) {
            errno = 0;
            val_fraction = strtod(val, &end);
            if (!val[0] || *end || errno || !(val_fraction > 0.0 && val_fraction < 1.0))
                status = input_error("data prepare: --val-fraction '%s' must be a number in (0, 1)", val);
        } else {
            errno = 0;
            vocab = strtol(val, &end, 10);
            if (!val[0] || *end || errno || vocab < MP_BYTE_VOCAB || vocab > 65536)
                status = input_error("data prepare: --vocab '%s' must be an integer in 256..65536 "
                                     "(the byte tokenizer needs 256)", val);
        }
    }
    if (status == 0 && !out) status = input_error("data prepare: missing --out DIR");
    if (status == 0 && n_paths == 0)
        status = input_error("data prepare: no PATH given (text files or directories to tokenize)");
    if (status != 0) {
        free(paths);
        return status;
    }

    double t0 = mp_now();
    doc_list docs = {0};
    walk_state w = {.docs = &docs};
    struct stat out_st;
    if (stat(out, &out_st) == 0 && S_ISDIR(out_st.st_mode))
        w.have_out = 1, w.out_dev = out_st.st_dev, w.out_ino = out_st.st_ino;
    for (int p = 0; p < n_paths && status == 0; p++) {
        // Strip trailing slashes so that joined paths stay canonical ("docs/" -> "docs").
        char *root = dup_str(paths[p]);
        for (size_t n = strlen(root); n > 1 && root[n - 1] == '/'; n--) root[n - 1] = '\0';
        struct stat st;
        if (stat(root, &st) != 0) {
            status = input_error("data prepare: %s: %s", paths[p], strerror(errno));
        } else if (S_ISDIR(st.st_mode)) {
            status = walk(root, "", &w);
        } else if (S_ISREG(st.st_mode)) {
            if (st.st_size == 0) {
                w.n_empty++;
            } else {
                const char *base = strrchr(root, '/');
                add_doc(&docs, dup_str(root), dup_str(base ? base + 1 : root));
            }
        } else {
            status = input_error("data prepare: %s is neither a regular file nor a directory", paths[p]);
        }
        free(root);
    }
    size_t n_empty = w.n_empty;
    if (status == 0 && docs.n == 0) {
        const char *more = n_paths > 1 ? " and the other PATHs" : "";
        status = n_empty ? input_error("data prepare: empty corpus: the %zu file(s) under %s%s are "
                                       "all empty", n_empty, paths[0], more)
                         : input_error("data prepare: no files found under %s%s", paths[0], more);
    }
    free(paths);
    if (status == 0) {
        qsort(docs.d, docs.n, sizeof *docs.d, cmp_doc);
        // A file named twice (as a PATH and inside a directory PATH) is one document.
        size_t m = 0;
        for (size_t i = 0; i < docs.n; i++) {
            if (m > 0 && !strcmp(docs.d[m - 1].full, docs.d[i].full)) {
                free(docs.d[i].full);
                free(docs.d[i].rel);
            } else {
                docs.d[m++] = docs.d[i];
            }
        }
        docs.n = m;

        size_t n_val = 0;
        for (size_t i = 0; i < docs.n; i++) {
            uint64_t h = mp_hash3(MP_SPLIT_SEED, MP_SPLIT_STREAM, fnv1a64(docs.d[i].rel));
            double u = (double)(h >> 11) * (1.0 / 9007199254740992.0);   // [0, 1), 53 bits
            docs.d[i].val = u < val_fraction;
            n_val += (size_t)docs.d[i].val;
        }
        // Both splits must be usable: move the last document into an empty one.
        if (docs.n >= 2 && n_val == 0) docs.d[docs.n - 1].val = 1, n_val = 1;
        if (docs.n >= 2 && n_val == docs.n) docs.d[docs.n - 1].val = 0, n_val--;

        byte_buf split[2] = {{0}};   // 0: train, 1: val
        for (size_t i = 0; i < docs.n && status == 0; i++)
            status = read_file_into(docs.d[i].full, &split[docs.d[i].val]);

        char train_path[1200], val_path[1200];
        if (status == 0 && strlen(out) + 16 > 1024)
            status = input_error("data prepare: --out path too long (%zu characters)", strlen(out));
        if (status == 0) status = make_dirs(out);
        if (status == 0) status = write_split(out, "train.bin", &split[0], (uint32_t)vocab, train_path, sizeof train_path);
        if (status == 0) status = write_split(out, "val.bin", &split[1], (uint32_t)vocab, val_path, sizeof val_path);
        if (status == 0) {
            if (docs.n == 1)
                fprintf(stderr, "millipede: warning: only one document; %s is empty\n",
                        n_val ? train_path : val_path);
            char skipped[64] = "";
            if (n_empty) snprintf(skipped, sizeof skipped, "; %zu empty file(s) skipped", n_empty);
            printf("data prepare: train %zu documents %zu tokens -> %s; val %zu documents %zu "
                   "tokens -> %s; vocab %ld%s; %.2f s\n", docs.n - n_val, split[0].n, train_path,
                   n_val, split[1].n, val_path, vocab, skipped, mp_now() - t0);
            fflush(stdout);
        }
        free(split[0].p);
        free(split[1].p);
    }
    for (size_t i = 0; i < docs.n; i++) {
        free(docs.d[i].full);
        free(docs.d[i].rel);
    }
    free(docs.d);
    return status;
}

int mp_cmd_data(int argc, char **argv) {
    if (argc >= 2 && (!strcmp(argv[1], "--help") || !strcmp(argv[1], "-h"))) {
        if (mp_rank() == 0) fputs(data_usage, stdout);
        return 0;
    }
    if (argc < 2)
        return input_error("data: missing subcommand (expected: millipede data prepare ...; see --help)");
    if (strcmp(argv[1], "prepare") != 0)
        return input_error("data: unknown subcommand '%s' (expected 'prepare')", argv[1]);
    // Writing the same files from several ranks would race; preparation is a serial job.
    if (mp_world() > 1)
        return input_error("data prepare runs on one rank, not %d: run it without mpirun/srun",
                           mp_world());
    return prepare(argc - 1, argv + 1);
}
