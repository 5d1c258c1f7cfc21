// Shared by the harnesses (fuzz_common.h).
#include "fuzz_common.h"

#include <dirent.h>
#include <hdf5.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static char dir[512];

static void cleanup_dir(void) {
    fz_clean();
    rmdir(dir);
}

const char *fz_dir(void) {
    if (dir[0]) return dir;
    const char *t = getenv("TMPDIR");
    snprintf(dir, sizeof dir, "%s/mp_fuzz.XXXXXX", t && t[0] ? t : "/tmp");
    if (!mkdtemp(dir)) {
        perror("fuzz: mkdtemp");
        abort();
    }
    atexit(cleanup_dir);
    return dir;
}

const char *fz_path(const char *name) {
    static char slots[4][768];
    static int next;
    char *p = slots[next++ % 4];
    snprintf(p, sizeof slots[0], "%s/%s", fz_dir(), name);
    return p;
}

const char *fz_seed(const char *name) {
    static char slots[4][768];
    static int next;
    char *p = slots[next++ % 4];
    snprintf(p, sizeof slots[0], "%s/%s", MP_FUZZ_SEEDS, name);
    return p;
}

void fz_write(const char *path, const uint8_t *data, size_t n) {
    FILE *f = fopen(path, "wb");
    if (!f || (n && fwrite(data, 1, n, f) != n) || fclose(f) != 0) {
        perror(path);
        abort();
    }
}


static uint8_t *read_file(const char *path, size_t *n) {
    FILE *f = fopen(path, "rb");
    if (!f) {
        fprintf(stderr, "fuzz: cannot read seed %s (run tests/fuzz/make_seeds.sh?)\n", path);
        abort();
    }
    fseek(f, 0, SEEK_END);
    long len = ftell(f);
    fseek(f, 0, SEEK_SET);
    uint8_t *buf = malloc(len > 0 ? (size_t)len : 1);
    if (!buf || len < 0 || fread(buf, 1, (size_t)len, f) != (size_t)len) abort();
    fclose(f);
    *n = (size_t)len;
    return buf;
}

void fz_copy(const char *from, const char *to) {
    size_t n;
    uint8_t *buf = read_file(from, &n);
    fz_write(to, buf, n);
    free(buf);
}

void fz_raw_patch(const char *seed, const char *out, const uint8_t *prog, size_t n) {
    size_t size;
    uint8_t *buf = read_file(seed, &size);
    size_t at = 0;
    if (n > 0 && prog[0]) size = size * prog[0] / 256;
    at = 1;
    while (size && at + 4 <= n) {
        size_t off = ((size_t)prog[at] | (size_t)prog[at + 1] << 8 | (size_t)prog[at + 2] << 16) % size;
        size_t len = prog[at + 3] % 16 + 1;
        at += 4;
        for (size_t i = 0; i < len && at < n && off + i < size; i++) buf[off + i] = prog[at++];
    }
    fz_write(out, buf, size);
    free(buf);
}

void fz_clean(void) {
    if (!dir[0]) return;
    DIR *d = opendir(dir);
    if (!d) return;
    struct dirent *e;
    while ((e = readdir(d)))
        if (strcmp(e->d_name, ".") && strcmp(e->d_name, "..")) unlink(fz_path(e->d_name));
    closedir(d);
}

void fz_check(const char *what, int rc, const char *err) {
    if (rc == 0) return;
    if (!err[0]) {
        fprintf(stderr, "CONTRACT: %s returned %d with an empty message\n", what, rc);
        abort();
    }
    if (strchr(err, '\n')) {
        fprintf(stderr, "CONTRACT: %s returned %d with a message of more than one line:\n%s\n",
                what, rc, err);
        abort();
    }
}

void fz_check_lines(const char *what, int n_problems, const char *text, size_t len) {
    int lines = 0;
    for (size_t i = 0; i < len; i++) {
        if (text[i] != '\n') continue;
        // each line is "millipede: error: " and a message
        static const char prefix[] = "millipede: error: ";
        size_t start = i;
        while (start > 0 && text[start - 1] != '\n') start--;
        if (i - start <= strlen(prefix) || strncmp(text + start, prefix, strlen(prefix))) {
            fprintf(stderr, "CONTRACT: %s printed a line without a message:\n%.*s\n", what,
                    (int)len, text);
            abort();
        }
        lines++;
    }
    if (lines != n_problems || (len && text[len - 1] != '\n')) {
        fprintf(stderr, "CONTRACT: %s reported %d problems in %d lines:\n%.*s\n", what,
                n_problems, lines, (int)len, text);
        abort();
    }
}

void fz_h5_quiet(void) { H5Eset_auto2(H5E_DEFAULT, NULL, NULL); }
