// Tokenizers. Bytes: token = byte value, so every input is representable, nothing is
// unknown, and bits per token equal bits per byte. SentencePiece: through src/data/spm.h.
// Token table: each id's bytes, from a tokenizer that lives elsewhere (docs/data.md).
#include "millipede/tokenizer.h"
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "core/log.h"
#include "core/rng.h"
#include "data/spm.h"
#include "millipede/data.h"

struct mp_tokenizer {
    int vocab;
    uint64_t hash;            // 0: bytes
    unsigned char *model;     // (model_len,) SentencePiece model or token table file; NULL for bytes
    size_t model_len;
    mp_spm *spm;
    uint32_t *token_bytes;    // (vocab,)
    // token table only
    const unsigned char **piece;   // (vocab,) each id's bytes, inside model
    int32_t *by_first;        // (vocab,) ids of non-empty pieces by first byte, longest first
    int32_t first_start[257]; // by_first[first_start[c] .. first_start[c+1]) start with byte c
};

#define TABLE_MAGIC "MPTOKTAB"
#define TABLE_HEADER 16   // magic, u32 version, u32 vocab

// The hash shards and checkpoints carry for a tokenizer file: FNV-1a, never 0 (0 means bytes).
static uint64_t file_hash(const unsigned char *data, size_t len) {
    uint64_t h = mp_fnv1a64(data, len);
    return h ? h : 1;
}

static uint32_t le32(const unsigned char *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static const mp_tokenizer *g_sort_table;   // for cmp_piece (qsort has no context)
static int cmp_piece(const void *a, const void *b) {
    int32_t x = *(const int32_t *)a, y = *(const int32_t *)b;
    const mp_tokenizer *t = g_sort_table;
    unsigned cx = t->piece[x][0], cy = t->piece[y][0];
    if (cx != cy) return cx < cy ? -1 : 1;
    if (t->token_bytes[x] != t->token_bytes[y]) return t->token_bytes[x] > t->token_bytes[y] ? -1 : 1;
    return x < y ? -1 : x > y;
}

// A token table (docs/data.md): "MPTOKTAB", u32 version 1, u32 vocab, then per id a u32
// length and that many bytes; nothing after.
static mp_tokenizer *tokenizer_table(const unsigned char *data, size_t len, const char *name,
                                     char *err, size_t err_len) {
    const char *why = NULL;
    uint32_t version = len >= TABLE_HEADER ? le32(data + 8) : 0, vocab = 0;
    if (len < TABLE_HEADER) why = "shorter than its 16-byte header";
    else if (version != 1) why = "version is not 1";
    else if ((vocab = le32(data + 12)) < 1 || vocab > 65536) why = "vocabulary not in 1..65536";
    size_t at = TABLE_HEADER;
    for (uint32_t i = 0; !why && i < vocab; i++) {
        if (len - at < 4) why = "truncated";
        else if (len - at - 4 < le32(data + at)) why = "truncated";
        else at += (size_t)4 + le32(data + at);
    }
    if (!why && at != len) why = "bytes after the last token";
    if (why) {
        mp_errf(err, err_len, "%s: not a millipede token table: %s", name, why);
        return NULL;
    }
    mp_tokenizer *t = mp_calloc(1, sizeof *t);
    t->vocab = (int)vocab;
    t->model = mp_malloc(len);
    memcpy(t->model, data, len);
    t->model_len = len;
    t->hash = file_hash(t->model, len);
    t->token_bytes = mp_calloc(vocab, sizeof *t->token_bytes);
    t->piece = mp_calloc(vocab, sizeof *t->piece);
    t->by_first = mp_calloc(vocab, sizeof *t->by_first);
    size_t n_nonempty = 0;
    at = TABLE_HEADER;
    for (uint32_t i = 0; i < vocab; i++) {
        t->token_bytes[i] = le32(t->model + at);
        t->piece[i] = t->model + at + 4;
        at += (size_t)4 + t->token_bytes[i];
        if (t->token_bytes[i]) t->by_first[n_nonempty++] = (int32_t)i;
    }
    g_sort_table = t;
    qsort(t->by_first, n_nonempty, sizeof *t->by_first, cmp_piece);
    size_t j = 0;
    for (int c = 0; c <= 256; c++) {
        while (c < 256 && j < n_nonempty && t->piece[t->by_first[j]][0] < c) j++;
        t->first_start[c] = (int32_t)(c < 256 ? j : n_nonempty);
    }
    return t;
}

// The fewest entries that spell the text (dynamic programming over byte positions; among
// equally short encodings the first found, longer pieces first): not necessarily the
// encoding the table's tokenizer would give, but one that decodes to the text (what sample
// needs for a prompt; shards come from the tokenizer itself). Fails only when no sequence
// of entries spells the text.
static long table_encode(const mp_tokenizer *t, const unsigned char *text, size_t n, uint16_t *out,
                         char *err, size_t err_len) {
    int32_t *cost = mp_malloc((n + 1) * sizeof *cost);   // (n+1) fewest tokens up to byte i
    int32_t *last = mp_malloc((n + 1) * sizeof *last);   // (n+1) the token that ends there
    cost[0] = 0;
    for (size_t i = 1; i <= n; i++) cost[i] = INT32_MAX;
    size_t reach = 0;   // the furthest position an encoding reaches
    for (size_t i = 0; i < n; i++) {
        if (cost[i] == INT32_MAX) continue;
        reach = i;
        for (int32_t j = t->first_start[text[i]]; j < t->first_start[text[i] + 1]; j++) {
            int32_t id = t->by_first[j];
            size_t L = t->token_bytes[id];
            if (L <= n - i && cost[i] + 1 < cost[i + L] && !memcmp(t->piece[id], text + i, L)) {
                cost[i + L] = cost[i] + 1;
                last[i + L] = id;
            }
        }
    }
    long m = n == 0 ? 0 : cost[n];
    if (n > 0 && cost[n] == INT32_MAX) {
        free(cost);
        free(last);
        return mp_errf(err, err_len, "no sequence of token table entries spells the text "
                       "(byte 0x%02x at offset %zu starts none that fits)", text[reach], reach);
    }
    for (size_t i = n; i > 0; i -= t->token_bytes[last[i]]) out[cost[i] - 1] = (uint16_t)last[i];
    free(cost);
    free(last);
    return m;
}

// out must hold len tokens.
size_t mp_tokenize_bytes(const unsigned char *text, size_t len, uint16_t *out) {
    for (size_t i = 0; i < len; i++) out[i] = text[i];
    return len;
}

// A model may declare vocab_size > 256 (padding); those extra ids have no text, so they
// decode to the empty string rather than to an arbitrary byte.
size_t mp_detokenize(uint16_t token, char *out, size_t out_len) {
    if (token >= MP_BYTE_VOCAB || out_len == 0) return 0;
    out[0] = (char)(unsigned char)token;
    return 1;
}

mp_tokenizer *mp_tokenizer_bytes(int vocab) {
    mp_tokenizer *t = mp_calloc(1, sizeof *t);
    t->vocab = vocab;
    t->token_bytes = mp_calloc((size_t)vocab, sizeof *t->token_bytes);
    for (int i = 0; i < vocab && i < MP_BYTE_VOCAB; i++) t->token_bytes[i] = 1;
    return t;
}

mp_tokenizer *mp_tokenizer_sentencepiece(const void *model, size_t len, const char *name,
                                         char *err, size_t err_len) {
    char why[512];
    mp_spm *spm = mp_spm_load(model, len, why, sizeof why);
    if (!spm) {
        mp_errf(err, err_len, "%s: %s", name, why);
        return NULL;
    }
    int vocab = mp_spm_vocab(spm);
    if (vocab < 1 || vocab > 65536) {
        mp_spm_free(spm);
        mp_errf(err, err_len, "%s: %d pieces; token shards hold at most 65536", name, vocab);
        return NULL;
    }
    mp_tokenizer *t = mp_calloc(1, sizeof *t);
    t->vocab = vocab;
    t->spm = spm;
    t->model = mp_malloc(len ? len : 1);
    memcpy(t->model, model, len);
    t->model_len = len;
    t->hash = file_hash(t->model, len);
    t->token_bytes = mp_calloc((size_t)vocab, sizeof *t->token_bytes);
    for (int i = 0; i < vocab; i++) t->token_bytes[i] = (uint32_t)mp_spm_piece_bytes(spm, i);
    return t;
}

mp_tokenizer *mp_tokenizer_parse(const void *data, size_t len, const char *name, char *err,
                                 size_t err_len) {
    if (len >= 8 && !memcmp(data, TABLE_MAGIC, 8)) return tokenizer_table(data, len, name, err, err_len);
    return mp_tokenizer_sentencepiece(data, len, name, err, err_len);
}

mp_tokenizer *mp_tokenizer_load(const char *path, char *err, size_t err_len) {
    FILE *f = fopen(path, "rb");
    if (!f) {
        mp_errf(err, err_len, "%s: cannot open the tokenizer: %s", path, strerror(errno));
        return NULL;
    }
    size_t cap = 1 << 16, n = 0, got;
    unsigned char *buf = mp_malloc(cap);
    while ((got = fread(buf + n, 1, cap - n, f)) > 0) {
        n += got;
        if (n == cap) {
            unsigned char *p = realloc(buf, cap *= 2);
            if (!p) mp_fatal("out of memory reading %s", path);
            buf = p;
        }
    }
    int bad = ferror(f);
    fclose(f);
    mp_tokenizer *t = bad ? NULL : mp_tokenizer_parse(buf, n, path, err, err_len);
    if (bad) mp_errf(err, err_len, "%s: cannot read the tokenizer: I/O error", path);
    free(buf);
    return t;
}

mp_tokenizer *mp_tokenizer_train(const char *text, size_t n, int vocab, const char *type,
                                 char *err, size_t err_len) {
    unsigned char *model;
    size_t len;
    if (mp_spm_train(text, n, vocab, type, &model, &len, err, err_len) != 0) return NULL;
    mp_tokenizer *t = mp_tokenizer_sentencepiece(model, len, "the trained tokenizer", err, err_len);
    free(model);
    return t;
}

void mp_tokenizer_free(mp_tokenizer *t) {
    if (!t) return;
    mp_spm_free(t->spm);
    free(t->model);
    free(t->token_bytes);
    free(t->piece);
    free(t->by_first);
    free(t);
}

int mp_tokenizer_vocab(const mp_tokenizer *t) { return t->vocab; }
uint64_t mp_tokenizer_hash(const mp_tokenizer *t) { return t->hash; }
const char *mp_tokenizer_kind(const mp_tokenizer *t) {
    return t->spm ? "sentencepiece" : t->piece ? "table" : "bytes";
}
const uint32_t *mp_tokenizer_token_bytes(const mp_tokenizer *t) { return t->token_bytes; }

const unsigned char *mp_tokenizer_model(const mp_tokenizer *t, size_t *len) {
    *len = t->model_len;
    return t->model;
}

long mp_tokenizer_encode(const mp_tokenizer *t, const char *text, size_t n, uint16_t **out,
                         char *err, size_t err_len) {
    if (t->piece) {
        *out = mp_malloc((n ? n : 1) * sizeof **out);   // at most one token per byte
        long m = table_encode(t, (const unsigned char *)text, n, *out, err, err_len);
        if (m < 0) {
            free(*out);
            *out = NULL;
        }
        return m;
    }
    if (!t->spm) {
        *out = mp_malloc((n ? n : 1) * sizeof **out);
        return (long)mp_tokenize_bytes((const unsigned char *)text, n, *out);
    }
    int32_t *ids;
    long m = mp_spm_encode(t->spm, text, n, &ids, err, err_len);
    if (m < 0) return -1;
    *out = mp_malloc((size_t)(m ? m : 1) * sizeof **out);
    for (long i = 0; i < m; i++) (*out)[i] = (uint16_t)ids[i];   // < vocab <= 65536
    free(ids);
    return m;
}

long mp_tokenizer_decode(const mp_tokenizer *t, const int32_t *tokens, size_t n, char **out,
                         char *err, size_t err_len) {
    for (size_t i = 0; i < n; i++)
        if (tokens[i] < 0 || tokens[i] >= t->vocab)
            return mp_errf(err, err_len, "token %d at %zu is outside the vocabulary of %d",
                           tokens[i], i, t->vocab);
    if (t->spm) return mp_spm_decode(t->spm, tokens, n, out, err, err_len);
    if (t->piece) {
        size_t len = 0;
        for (size_t i = 0; i < n; i++) len += t->token_bytes[tokens[i]];
        *out = mp_malloc(len + 1);
        len = 0;
        for (size_t i = 0; i < n; i++) {
            memcpy(*out + len, t->piece[tokens[i]], t->token_bytes[tokens[i]]);
            len += t->token_bytes[tokens[i]];
        }
        (*out)[len] = '\0';
        return (long)len;
    }
    *out = mp_malloc(n + 1);
    size_t len = 0;
    for (size_t i = 0; i < n; i++) len += mp_detokenize((uint16_t)tokens[i], *out + len, 1);
    (*out)[len] = '\0';
    return (long)len;
}
