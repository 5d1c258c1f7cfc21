// Token shards: a little-endian header (32 bytes in version 1, 48 in version 2, which adds
// the tokenizer's hash) followed by u16 tokens (docs/data.md).
// A shard is read whole into memory and validated before anyone trusts it, so a bad
// file is reported once, by name, instead of producing garbage batches later.
#include "core/log.h"
#include "millipede/data.h"
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <libgen.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define MP_SHARD_MAX_VOCAB 65536u   // tokens are u16


// The format is little-endian on disk whatever the host is.
static uint32_t get_u32(const unsigned char *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}
static uint64_t get_u64(const unsigned char *p) {
    return (uint64_t)get_u32(p) | (uint64_t)get_u32(p + 4) << 32;
}
static void put_u32(unsigned char *p, uint32_t v) {
    for (int i = 0; i < 4; i++) p[i] = (unsigned char)(v >> (8 * i));
}
static void put_u64(unsigned char *p, uint64_t v) {
    put_u32(p, (uint32_t)v);
    put_u32(p + 4, (uint32_t)(v >> 32));
}
static int host_is_little_endian(void) {
    const uint16_t one = 1;
    return *(const unsigned char *)&one == 1;
}

void mp_shard_close(mp_shard *s) {
    if (!s) return;
    free(s->tokens);
    s->tokens = NULL;
    s->n_tokens = 0;
    s->vocab_size = 0;
}

int mp_shard_open(mp_shard *s, const char *path, uint32_t expect_vocab, char *err, size_t err_len) {
    memset(s, 0, sizeof *s);
    snprintf(s->path, sizeof s->path, "%s", path);

    FILE *f = fopen(path, "rb");
    if (!f) return mp_errf(err, err_len, "%s: cannot open token shard: %s", path, strerror(errno));
    struct stat st;
    if (fstat(fileno(f), &st) != 0) {
        int e = errno;
        fclose(f);
        return mp_errf(err, err_len, "%s: cannot stat token shard: %s", path, strerror(e));
    }
    if (!S_ISREG(st.st_mode)) {
        fclose(f);
        return mp_errf(err, err_len, "%s: not a regular file (expected a token shard)", path);
    }
    uint64_t file_bytes = (uint64_t)st.st_size;
    if (file_bytes < MP_SHARD_HEADER_BYTES) {
        fclose(f);
        return mp_errf(err, err_len, "%s: too short for a token shard: %" PRIu64
                    " bytes, the header alone is %d bytes", path, file_bytes, MP_SHARD_HEADER_BYTES);
    }

    unsigned char h[MP_SHARD_HEADER_BYTES_V2] = {0};
    if (fread(h, 1, MP_SHARD_HEADER_BYTES, f) != MP_SHARD_HEADER_BYTES) {
        fclose(f);
        return mp_errf(err, err_len, "%s: cannot read the shard header", path);
    }
    uint32_t version = get_u32(h + 8), vocab = get_u32(h + 12), bpt = get_u32(h + 24);
    uint64_t n = get_u64(h + 16), header_bytes = version == 2 ? MP_SHARD_HEADER_BYTES_V2
                                                             : MP_SHARD_HEADER_BYTES;
    const char *bad = NULL;
    char why[256];
    if (memcmp(h, MP_SHARD_MAGIC, 8) != 0) {
        bad = "bad magic (expected \"" MP_SHARD_MAGIC "\"; not a millipede token shard)";
    } else if (version != 1 && version != 2) {
        snprintf(why, sizeof why, "unsupported shard version %" PRIu32 " (expected 1 or 2)", version);
        bad = why;
    } else if (file_bytes < header_bytes ||
               (version == 2 && fread(h + MP_SHARD_HEADER_BYTES, 1, header_bytes - MP_SHARD_HEADER_BYTES,
                                      f) != header_bytes - MP_SHARD_HEADER_BYTES)) {
        snprintf(why, sizeof why, "too short for a version-2 token shard: %" PRIu64 " bytes, the "
                 "header alone is %d bytes", file_bytes, MP_SHARD_HEADER_BYTES_V2);
        bad = why;
    } else if (version == 2 && get_u64(h + 32) == 0) {
        bad = "version 2 with tokenizer hash 0 (version 2 is for tokenizers other than bytes)";
    } else if (bpt != 2) {
        snprintf(why, sizeof why, "bytes_per_token is %" PRIu32 " (expected 2)", bpt);
        bad = why;
    } else if (vocab == 0 || vocab > MP_SHARD_MAX_VOCAB) {
        snprintf(why, sizeof why, "vocab_size %" PRIu32 " out of range (expected 1..%u)", vocab,
                 MP_SHARD_MAX_VOCAB);
        bad = why;
    } else if (expect_vocab > 0 && vocab != expect_vocab) {
        snprintf(why, sizeof why, "vocab_size %" PRIu32 " does not match the expected vocab_size %"
                 PRIu32, vocab, expect_vocab);
        bad = why;
    }
    if (bad) {
        fclose(f);
        return mp_errf(err, err_len, "%s: %s", path, bad);
    }

    // Compare sizes without overflow: a corrupt n_tokens can be anything up to 2^64-1.
    uint64_t payload = file_bytes - header_bytes;
    if (n > payload / 2 || payload != 2 * n) {
        int truncated = n > payload / 2;
        fclose(f);
        if (n > (UINT64_MAX - header_bytes) / 2)
            return mp_errf(err, err_len, "%s: truncated: header says %" PRIu64
                        " tokens (more than any file can hold), file has %" PRIu64 " bytes",
                        path, n, file_bytes);
        return mp_errf(err, err_len, "%s: %s: header says %" PRIu64 " tokens (%" PRIu64
                    " bytes), file has %" PRIu64 " bytes", path,
                    truncated ? "truncated" : "trailing bytes", n,
                    header_bytes + 2 * n, file_bytes);
    }
    if (n > SIZE_MAX / sizeof(uint16_t)) {
        fclose(f);
        return mp_errf(err, err_len, "%s: %" PRIu64 " tokens do not fit in memory", path, n);
    }

    uint16_t *tok = malloc(n ? (size_t)n * sizeof(uint16_t) : 1);
    if (!tok) {
        fclose(f);
        return mp_errf(err, err_len, "%s: out of memory reading %" PRIu64 " tokens", path, n);
    }
    size_t got = fread(tok, sizeof(uint16_t), (size_t)n, f);
    int read_err = ferror(f);
    fclose(f);
    if (got != n) {
        free(tok);
        return mp_errf(err, err_len, "%s: read failed after %zu of %" PRIu64 " tokens%s", path, got,
                    n, read_err ? " (I/O error)" : " (file changed while reading?)");
    }
    if (!host_is_little_endian())
        for (uint64_t i = 0; i < n; i++) tok[i] = (uint16_t)(tok[i] >> 8 | tok[i] << 8);
    for (uint64_t i = 0; i < n; i++) {
        if (tok[i] >= vocab) {
            uint16_t t = tok[i];
            free(tok);
            return mp_errf(err, err_len, "%s: token %u at index %" PRIu64 " is >= vocab_size %" PRIu32,
                        path, (unsigned)t, i, vocab);
        }
    }
    s->vocab_size = vocab;
    s->n_tokens = n;
    s->tokens = tok;
    s->tokenizer_hash = version == 2 ? get_u64(h + 32) : 0;
    return 0;
}

// fsync of the directory makes the rename itself durable; some file systems refuse
// fsync on directories, which is not worth failing the write for.
static void sync_parent_dir(const char *path) {
    char buf[4096];
    snprintf(buf, sizeof buf, "%s", path);
    int fd = open(dirname(buf), O_RDONLY);
    if (fd < 0) return;
    (void)fsync(fd);
    close(fd);
}

int mp_shard_write(const char *path, uint32_t vocab_size, uint64_t tokenizer_hash,
                   const uint16_t *tokens, uint64_t n, char *err, size_t err_len) {
    if (vocab_size == 0 || vocab_size > MP_SHARD_MAX_VOCAB)
        return mp_errf(err, err_len, "%s: cannot write a shard with vocab_size %" PRIu32
                    " (expected 1..%u)", path, vocab_size, MP_SHARD_MAX_VOCAB);
    // Refuse to write what mp_shard_open would reject.
    for (uint64_t i = 0; i < n; i++)
        if (tokens[i] >= vocab_size)
            return mp_errf(err, err_len, "%s: token %u at index %" PRIu64 " is >= vocab_size %" PRIu32,
                        path, (unsigned)tokens[i], i, vocab_size);

    char tmp[1100];
    if ((size_t)snprintf(tmp, sizeof tmp, "%s.tmp", path) >= sizeof tmp)
        return mp_errf(err, err_len, "%s: path too long", path);
    FILE *f = fopen(tmp, "wb");
    if (!f) return mp_errf(err, err_len, "%s: cannot create: %s", tmp, strerror(errno));

    // bytes keep version 1, which every reader takes; other tokenizers need version 2
    unsigned char h[MP_SHARD_HEADER_BYTES_V2] = {0};
    size_t header_bytes = tokenizer_hash ? MP_SHARD_HEADER_BYTES_V2 : MP_SHARD_HEADER_BYTES;
    memcpy(h, MP_SHARD_MAGIC, 8);
    put_u32(h + 8, tokenizer_hash ? 2 : 1);
    put_u32(h + 12, vocab_size);
    put_u64(h + 16, n);
    put_u32(h + 24, 2);
    put_u32(h + 28, 0);
    put_u64(h + 32, tokenizer_hash);   // (version 2 only)
    int ok = fwrite(h, 1, header_bytes, f) == header_bytes;

    // Encode through a small buffer so the on-disk order is little-endian on any host.
    unsigned char buf[1 << 16];
    for (uint64_t i = 0; ok && i < n;) {
        size_t m = 0;
        for (; i < n && m + 2 <= sizeof buf; i++, m += 2) {
            buf[m] = (unsigned char)(tokens[i] & 0xff);
            buf[m + 1] = (unsigned char)(tokens[i] >> 8);
        }
        ok = fwrite(buf, 1, m, f) == m;
    }
    int e = errno;
    if (ok && fflush(f) != 0) ok = 0, e = errno;
    if (ok && fsync(fileno(f)) != 0) ok = 0, e = errno;
    if (fclose(f) != 0 && ok) ok = 0, e = errno;
    if (!ok) {
        remove(tmp);
        return mp_errf(err, err_len, "%s: write failed: %s", tmp, strerror(e));
    }
    if (rename(tmp, path) != 0) {
        e = errno;
        remove(tmp);
        return mp_errf(err, err_len, "%s: cannot rename %s into place: %s", path, tmp, strerror(e));
    }
    sync_parent_dir(path);
    return 0;
}
