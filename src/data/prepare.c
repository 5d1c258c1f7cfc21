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
#include <unistd.h>
#include "core/fs.h"
#include "core/log.h"
#include "core/rng.h"
#include "millipede/tokenizer.h"

// The split hash: mp_hash3(MP_SPLIT_SEED, MP_SPLIT_STREAM, mp_fnv1a64(relative path)).
#define MP_SPLIT_SEED 0x6d696c6c69706564ULL   // "millipede"
#define MP_SPLIT_STREAM 0x73706c6974ULL       // "split"

static const char *data_usage =
    "usage: millipede data prepare --out DIR [--tokenizer T] [--tokenizer-type bpe|unigram]\n"
    "                              [--val-fraction F] [--vocab V] [--include-binary] PATH...\n"
    "\n"
    "Tokenizes text files into DIR/train.bin and DIR/val.bin (docs/data.md).\n"
    "PATHs are files or directories (walked recursively; regular files only; empty files\n"
    "and DIR itself skipped). Each file is one document; documents are ordered by full\n"
    "path and go to validation when a hash of their path relative to PATH falls below F.\n"
    "\n"
    "  --out DIR            output directory (created if missing)\n"
    "  --val-fraction F     share of documents for validation, 0 < F < 1 (default 0.05)\n"
    "  --tokenizer T        bytes (default: token = byte value, vocabulary 256);\n"
    "                       sentencepiece:V (a SentencePiece model of V pieces, 257..65536,\n"
    "                       trained on the training split); model:PATH (an existing\n"
    "                       SentencePiece model file). A SentencePiece tokenizer is saved as\n"
    "                       DIR/tokenizer.model; the shards carry its hash.\n"
    "  --tokenizer-type X   bpe or unigram (default), for sentencepiece:V\n"
    "  --vocab V            bytes only: vocab_size in the shard headers, 256..65536 (default 256)\n"
    "  --include-binary     keep files that are not text (by default skipped, with a count\n"
    "                       and the first few names: a NUL byte, or more than 5% of the\n"
    "                       bytes in invalid UTF-8)\n"
    "Two paths to one file (links) are one document: the first path is kept.\n";

typedef struct {
    char *full;      // path as opened
    char *rel;       // path relative to the PATH it was found under (hashed for the split)
    dev_t dev;       // the file itself: two paths (links) to one file are one document
    ino_t ino;
    int val;         // 1: validation split
    unsigned char *text;   // (len,) the file's bytes, once read
    size_t len;
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

static void add_doc(doc_list *l, char *full, char *rel, const struct stat *st) {
    if (l->n == l->cap) {
        l->cap = l->cap ? 2 * l->cap : 64;
        doc *nd = realloc(l->d, l->cap * sizeof *nd);
        if (!nd) mp_fatal("out of memory listing files");
        l->d = nd;
    }
    l->d[l->n++] = (doc){full, rel, st->st_dev, st->st_ino, 0, NULL, 0};
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
            add_doc(w->docs, full, r, &st);
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

// Reads the whole file into buf (from its start). Returns 0, or 2 with a message naming it.
static int read_file_into(const char *path, byte_buf *buf) {
    buf->n = 0;
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

// Text or not. A NUL byte never occurs in text; beyond that, text is UTF-8 up to stray
// bytes (a word in Latin-1 here and there). Random or compressed bytes break UTF-8 at
// roughly every other position, a text in an 8-bit legacy encoding at its accented letters
// only (a few per cent at most): a share of 5 % tells them apart. (Overlong forms and
// surrogates count as valid: they do not occur by accident.)
#define MP_TEXT_MAX_INVALID 0.05
static int looks_like_text(const unsigned char *p, size_t n) {
    size_t invalid = 0;
    for (size_t i = 0; i < n;) {
        unsigned char c = p[i];
        if (c == 0) return 0;
        size_t len = c < 0x80 ? 1 : (c >> 5) == 0x6 ? 2 : (c >> 4) == 0xE ? 3 : (c >> 3) == 0x1E ? 4 : 0;
        int valid = len > 0 && i + len <= n;
        for (size_t k = 1; valid && k < len; k++) valid = (p[i + k] & 0xC0) == 0x80;
        if (valid) {
            i += len;
        } else {
            invalid++;
            i++;
        }
    }
    return (double)invalid <= MP_TEXT_MAX_INVALID * (double)n;
}

// The documents of one split (val = 0 or 1), each tokenized on its own and concatenated,
// written to dir/name. *n_tokens and *n_bytes get the counts.
static int write_split(const char *dir, const char *name, const doc_list *docs, int val,
                       const mp_tokenizer *tk, uint32_t vocab, char *path, size_t path_len,
                       size_t *n_tokens, size_t *n_bytes) {
    snprintf(path, path_len, "%s/%s", dir, name);
    size_t n = 0, cap = 1 << 16, bytes = 0;
    uint16_t *tok = mp_malloc(cap * sizeof(uint16_t));   // (n,)
    char err[1400];
    for (size_t i = 0; i < docs->n; i++) {
        if (docs->d[i].val != val) continue;
        uint16_t *t;
        long m = mp_tokenizer_encode(tk, (const char *)docs->d[i].text, docs->d[i].len, &t, err,
                                     sizeof err);
        if (m < 0) {
            free(tok);
            return input_error("data prepare: %s: %s", docs->d[i].full, err);
        }
        if (n + (size_t)m > cap) {
            while (n + (size_t)m > cap) cap *= 2;
            uint16_t *p = realloc(tok, cap * sizeof(uint16_t));
            if (!p) mp_fatal("out of memory tokenizing %s", docs->d[i].full);
            tok = p;
        }
        memcpy(tok + n, t, (size_t)m * sizeof *t);
        free(t);
        n += (size_t)m;
        bytes += docs->d[i].len;
    }
    int rc = mp_shard_write(path, vocab, mp_tokenizer_hash(tk), tok, n, err, sizeof err);
    free(tok);
    *n_tokens = n;
    *n_bytes = bytes;
    if (rc != 0) {
        fprintf(stderr, "millipede: error: %s\n", err);
        return 1;
    }
    return 0;
}

// DIR/documents.tsv: one line per document in corpus order, "train" or "val", its size in
// bytes and its absolute path (tab, newline and backslash written as \t, \n, \\), so that
// tools (tools/tokens_to_shards.py) can tokenize the same documents of the same splits.
static int write_manifest(const char *dir, const doc_list *docs) {
    char path[1200], err[1400];
    snprintf(path, sizeof path, "%s/documents.tsv", dir);
    byte_buf b = {0};
    for (size_t i = 0; i < docs->n; i++) {
        char *abs = realpath(docs->d[i].full, NULL);
        if (!abs) {
            free(b.p);
            return input_error("data prepare: %s: %s", docs->d[i].full, strerror(errno));
        }
        char head[64];
        int hl = snprintf(head, sizeof head, "%s\t%zu\t", docs->d[i].val ? "val" : "train", docs->d[i].len);
        size_t need = b.n + (size_t)hl + 2 * strlen(abs) + 2;
        if (need > b.cap) {
            b.cap = need * 2;
            b.p = realloc(b.p, b.cap);
            if (!b.p) mp_fatal("out of memory writing %s", path);
        }
        memcpy(b.p + b.n, head, (size_t)hl);
        b.n += (size_t)hl;
        for (const char *c = abs; *c; c++) {
            char esc = *c == '\t' ? 't' : *c == '\n' ? 'n' : *c == '\\' ? '\\' : 0;
            if (esc) b.p[b.n++] = '\\';
            b.p[b.n++] = esc ? esc : *c;
        }
        b.p[b.n++] = '\n';
        free(abs);
    }
    int rc = mp_write_file(path, b.p, b.n, err, sizeof err);
    free(b.p);
    return rc != 0 ? input_error("data prepare: %s", err) : 0;
}

// Files left out of the corpus, for the warning that names the first few.
typedef struct {
    size_t n;
    char names[512];
} skip_list;

static void skip_add(skip_list *l, const char *name) {
    size_t used = strlen(l->names);
    if (l->n < 3 && used + strlen(name) + 3 < sizeof l->names)
        snprintf(l->names + used, sizeof l->names - used, "%s%s", l->n ? ", " : "", name);
    l->n++;
}

static int cmp_inode(const void *a, const void *b) {
    const doc *x = *(const doc *const *)a, *y = *(const doc *const *)b;
    if (x->dev != y->dev) return x->dev < y->dev ? -1 : 1;
    if (x->ino != y->ino) return x->ino < y->ino ? -1 : 1;
    return x < y ? -1 : x > y;   // the earlier path first
}

// Removes docs[i] where drop[i], keeping the order; frees their strings.
static void drop_docs(doc_list *docs, const char *drop) {
    size_t m = 0;
    for (size_t i = 0; i < docs->n; i++) {
        if (drop[i]) {
            free(docs->d[i].full);
            free(docs->d[i].rel);
            free(docs->d[i].text);
        } else {
            docs->d[m++] = docs->d[i];
        }
    }
    docs->n = m;
}

// Two paths to one file (a link beside its target, a directory given twice under two
// names) are one document: the first path in order is kept.
static void drop_duplicate_files(doc_list *docs, skip_list *dups) {
    doc **by_inode = mp_malloc((docs->n ? docs->n : 1) * sizeof *by_inode);
    for (size_t i = 0; i < docs->n; i++) by_inode[i] = &docs->d[i];
    qsort(by_inode, docs->n, sizeof *by_inode, cmp_inode);
    char *drop = mp_calloc(docs->n ? docs->n : 1, 1);
    for (size_t i = 1; i < docs->n; i++)
        if (by_inode[i]->dev == by_inode[i - 1]->dev && by_inode[i]->ino == by_inode[i - 1]->ino)
            drop[by_inode[i] - docs->d] = 1;
    for (size_t i = 0; i < docs->n; i++)
        if (drop[i]) skip_add(dups, docs->d[i].full);
    drop_docs(docs, drop);
    free(drop);
    free(by_inode);
}

// Reads every document; unless include_binary, drops those that are not text.
static int read_docs(doc_list *docs, int include_binary, skip_list *binary) {
    char *drop = mp_calloc(docs->n ? docs->n : 1, 1);
    int status = 0;
    for (size_t i = 0; i < docs->n && status == 0; i++) {
        byte_buf b = {0};
        status = read_file_into(docs->d[i].full, &b);
        if (status == 0 && !include_binary && !looks_like_text(b.p, b.n)) {
            drop[i] = 1;
            skip_add(binary, docs->d[i].full);
            free(b.p);
            continue;
        }
        unsigned char *fit = b.n ? realloc(b.p, b.n) : NULL;   // give back the growth slack
        docs->d[i].text = fit ? fit : b.p;
        docs->d[i].len = b.n;
        if (!b.n) free(b.p), docs->d[i].text = NULL;
    }
    drop_docs(docs, drop);
    free(drop);
    return status;
}

// The tokenizer: bytes (a SentencePiece model left in dir by an earlier run is removed,
// so that the directory never pairs shards with a tokenizer they were not made with), a
// SentencePiece model trained on the training split's text, or one read from model_path.
// A SentencePiece model is written to tk_path. *note gets a summary for the log line.
static int make_tokenizer(const doc_list *docs, long spm_vocab, const char *type,
                          const char *model_path, int bytes_vocab, const char *tk_path,
                          mp_tokenizer **tk, char *note, size_t note_len) {
    char err[1400];
    if (!spm_vocab && !model_path) {
        if (unlink(tk_path) != 0 && errno != ENOENT)
            return input_error("data prepare: cannot remove %s (left by an earlier run): %s",
                               tk_path, strerror(errno));
        *tk = mp_tokenizer_bytes(bytes_vocab);
        return 0;
    }
    double t0 = mp_now();
    if (model_path) {
        *tk = mp_tokenizer_load(model_path, err, sizeof err);
        if (!*tk) return input_error("data prepare: --tokenizer model:%s", err);
        if (!strcmp(mp_tokenizer_kind(*tk), "table")) {
            mp_tokenizer_free(*tk);
            *tk = NULL;
            return input_error("data prepare: --tokenizer model:%s: a token table, which cannot "
                               "encode text as its tokenizer does; tools/tokens_to_shards.py "
                               "writes shards with the tokenizer itself", model_path);
        }
    } else {
        size_t n = 0;
        for (size_t i = 0; i < docs->n; i++)
            if (!docs->d[i].val) n += docs->d[i].len + 1;
        char *text = mp_malloc(n ? n : 1), *at = text;
        for (size_t i = 0; i < docs->n; i++) {
            if (docs->d[i].val) continue;
            memcpy(at, docs->d[i].text, docs->d[i].len);
            at += docs->d[i].len;
            *at++ = '\n';   // a document ends a sentence
        }
        *tk = mp_tokenizer_train(text, n, (int)spm_vocab, type, err, sizeof err);
        free(text);
        if (!*tk) return input_error("data prepare: --tokenizer sentencepiece:%ld: %s", spm_vocab, err);
    }
    size_t len;
    const unsigned char *model = mp_tokenizer_model(*tk, &len);
    if (mp_write_file(tk_path, model, len, err, sizeof err) != 0) {
        mp_tokenizer_free(*tk);
        *tk = NULL;
        return input_error("data prepare: %s", err);
    }
    snprintf(note, note_len, "; tokenizer sentencepiece %s (%s in %.1f s) -> %s",
             model_path ? "model" : type, model_path ? model_path : "trained", mp_now() - t0,
             tk_path);
    return 0;
}

static int prepare(int argc, char **argv) {
    const char *out = NULL;
    double val_fraction = 0.05;
    long vocab = MP_BYTE_VOCAB, spm_vocab = 0;   // spm_vocab > 0: train SentencePiece
    const char *spm_model = NULL, *spm_type = NULL;   // model:PATH; --tokenizer-type
    int vocab_given = 0;
    const char **paths = mp_calloc((size_t)argc, sizeof *paths);
    int n_paths = 0, opts_done = 0, status = 0, include_binary = 0;

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
        if (!strcmp(a, "--include-binary")) {
            include_binary = 1;
            continue;
        }
        // --key value or --key=value
        const char *eq = strchr(a, '=');
        size_t klen = eq ? (size_t)(eq - a) : strlen(a);
        const char *val = eq ? eq + 1 : (i + 1 < argc ? argv[i + 1] : NULL);
        int is_out = klen == 5 && !strncmp(a, "--out", 5);
        int is_vf = klen == 14 && !strncmp(a, "--val-fraction", 14);
        int is_vocab = klen == 7 && !strncmp(a, "--vocab", 7);
        int is_tk = klen == 11 && !strncmp(a, "--tokenizer", 11);
        int is_tt = klen == 16 && !strncmp(a, "--tokenizer-type", 16);
        if (!is_out && !is_vf && !is_vocab && !is_tk && !is_tt) {
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
        } else if (is_tk) {
            if (!strcmp(val, "bytes")) {
                spm_vocab = 0, spm_model = NULL;
            } else if (!strncmp(val, "sentencepiece:", 14)) {
                errno = 0;
                spm_vocab = strtol(val + 14, &end, 10);
                // more pieces than the 256 byte pieces, or nothing is learned
                if (!val[14] || *end || errno || spm_vocab <= MP_BYTE_VOCAB || spm_vocab > 65536)
                    status = input_error("data prepare: --tokenizer '%s': sentencepiece:V needs V "
                                         "in 257..65536", val);
            } else if (!strncmp(val, "model:", 6) && val[6]) {
                spm_model = val + 6, spm_vocab = 0;
            } else {
                status = input_error("data prepare: --tokenizer '%s': expected bytes, "
                                     "sentencepiece:VOCAB or model:PATH", val);
            }
        } else if (is_tt) {
            if (strcmp(val, "bpe") && strcmp(val, "unigram"))
                status = input_error("data prepare: --tokenizer-type '%s': expected bpe or unigram", val);
            spm_type = val;
        } else {
            errno = 0;
            vocab = strtol(val, &end, 10);
            vocab_given = 1;
            if (!val[0] || *end || errno || vocab < MP_BYTE_VOCAB || vocab > 65536)
                status = input_error("data prepare: --vocab '%s' must be an integer in 256..65536 "
                                     "(the byte tokenizer needs 256)", val);
        }
    }
    if (status == 0 && vocab_given && (spm_vocab || spm_model))
        status = input_error("data prepare: --vocab is for the byte tokenizer (a SentencePiece "
                             "model has its own vocabulary)");
    if (status == 0 && spm_type && !spm_vocab)
        status = input_error("data prepare: --tokenizer-type is for --tokenizer sentencepiece:V");
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
                add_doc(&docs, dup_str(root), dup_str(base ? base + 1 : root), &st);
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
    skip_list dups = {0}, binary = {0};
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
        drop_duplicate_files(&docs, &dups);
        status = read_docs(&docs, include_binary, &binary);
    }
    if (status == 0 && docs.n == 0)
        status = input_error("data prepare: no text left: the %zu file(s) found are not text (NUL "
                             "bytes, or more than 5%% invalid UTF-8), e.g. %s; --include-binary "
                             "keeps them", binary.n, binary.names);
    if (status == 0) {
        size_t n_val = 0;
        for (size_t i = 0; i < docs.n; i++) {
            uint64_t h = mp_hash3(MP_SPLIT_SEED, MP_SPLIT_STREAM, mp_fnv1a64(docs.d[i].rel, strlen(docs.d[i].rel)));
            double u = (double)(h >> 11) * (1.0 / 9007199254740992.0);   // [0, 1), 53 bits
            docs.d[i].val = u < val_fraction;
            n_val += (size_t)docs.d[i].val;
        }
        // Both splits must be usable: move the last document into an empty one.
        if (docs.n >= 2 && n_val == 0) docs.d[docs.n - 1].val = 1, n_val = 1;
        if (docs.n >= 2 && n_val == docs.n) docs.d[docs.n - 1].val = 0, n_val--;

        char train_path[1200], val_path[1200], tk_path[1200], tk_note[1400] = "";
        size_t n_train_tok = 0, n_val_tok = 0, n_train_bytes = 0, n_val_bytes = 0;
        if (status == 0 && strlen(out) + 16 > 1024)
            status = input_error("data prepare: --out path too long (%zu characters)", strlen(out));
        if (status == 0) status = make_dirs(out);
        snprintf(tk_path, sizeof tk_path, "%s/tokenizer.model", out);
        mp_tokenizer *tk = NULL;
        if (status == 0) status = make_tokenizer(&docs, spm_vocab, spm_type ? spm_type : "unigram",
                                                 spm_model, (int)vocab, tk_path, &tk, tk_note,
                                                 sizeof tk_note);
        if (status == 0) vocab = mp_tokenizer_vocab(tk);
        if (status == 0)
            status = write_split(out, "train.bin", &docs, 0, tk, (uint32_t)vocab, train_path,
                                 sizeof train_path, &n_train_tok, &n_train_bytes);
        if (status == 0)
            status = write_split(out, "val.bin", &docs, 1, tk, (uint32_t)vocab, val_path,
                                 sizeof val_path, &n_val_tok, &n_val_bytes);
        mp_tokenizer_free(tk);
        if (status == 0) status = write_manifest(out, &docs);
        if (status == 0) {
            if (docs.n == 1)
                fprintf(stderr, "millipede: warning: only one document; %s is empty\n",
                        n_val ? train_path : val_path);
            if (binary.n)
                fprintf(stderr, "millipede: warning: data prepare: skipped %zu file(s) that are "
                        "not text (NUL bytes, or more than 5%% invalid UTF-8): %s%s; "
                        "--include-binary keeps them\n", binary.n, binary.names,
                        binary.n > 3 ? ", ..." : "");
            if (dups.n)
                fprintf(stderr, "millipede: warning: data prepare: skipped %zu path(s) to files "
                        "already read (links): %s%s\n", dups.n, dups.names, dups.n > 3 ? ", ..." : "");
            char skipped[160] = "";
            size_t len = 0;
            if (n_empty) len += (size_t)snprintf(skipped + len, sizeof skipped - len, "; %zu empty", n_empty);
            if (binary.n) len += (size_t)snprintf(skipped + len, sizeof skipped - len, "; %zu not text", binary.n);
            if (dups.n) len += (size_t)snprintf(skipped + len, sizeof skipped - len, "; %zu duplicate", dups.n);
            if (len) snprintf(skipped + len, sizeof skipped - len, " file(s) skipped");
            printf("data prepare: train %zu documents %zu tokens -> %s; val %zu documents %zu "
                   "tokens -> %s; vocab %ld%s%s; %.2f s\n", docs.n - n_val, n_train_tok, train_path,
                   n_val, n_val_tok, val_path, vocab, tk_note, skipped, mp_now() - t0);
            fflush(stdout);
        }
    }
    for (size_t i = 0; i < docs.n; i++) {
        free(docs.d[i].full);
        free(docs.d[i].rel);
        free(docs.d[i].text);
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
