// The token table reader (src/data/tokenizer.c, via mp_tokenizer_parse: tokenizer.model
// beside the shards, and the /tokenizer dataset of checkpoints and model files) and, on an
// accepted table, its encoder and decoder. Input: the table file's bytes after the magic
// (the harness writes "MPTOKTAB" first, so every input reaches the table parser; without
// it the bytes would go to SentencePiece, which the fuzz build leaves out).
// Contract: accepted, or one non-empty line; an accepted table decodes every id to its
// entry's length, and encoding text decoded from ids (so some sequence of entries spells
// it) succeeds with ids that decode to the same text.
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fuzz_common.h"
#include "millipede/tokenizer.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    uint8_t *file = malloc(size + 8);
    memcpy(file, "MPTOKTAB", 8);
    memcpy(file + 8, data, size);
    char err[FZ_ERR] = "";
    mp_tokenizer *t = mp_tokenizer_parse(file, size + 8, "tokenizer.model", err, sizeof err);
    fz_check("mp_tokenizer_parse", t ? 0 : -1, err);
    free(file);
    if (!t) return 0;
    int V = mp_tokenizer_vocab(t);
    const uint32_t *tb = mp_tokenizer_token_bytes(t);
    int32_t ids[16];
    size_t total = 0;
    for (int i = 0; i < 16; i++) {   // ids drawn from the input itself
        ids[i] = (int32_t)((data[i % size] * 257u + (unsigned)i * 31u) % (unsigned)V);
        total += tb[ids[i]];
    }
    char *text = NULL;
    long n = mp_tokenizer_decode(t, ids, 16, &text, err, sizeof err);
    if (n < 0 || (size_t)n != total) {
        fprintf(stderr, "CONTRACT: decode gave %ld bytes, the entries hold %zu\n", n, total);
        abort();
    }
    uint16_t *enc = NULL;
    long m = mp_tokenizer_encode(t, text, (size_t)n, &enc, err, sizeof err);
    if (m < 0) {
        fprintf(stderr, "CONTRACT: text decoded from ids could not be encoded: %s\n", err);
        abort();
    }
    {
        int32_t *back = malloc(((size_t)m + 1) * sizeof *back);
        for (long i = 0; i < m; i++) back[i] = enc[i];
        char *again = NULL;
        long k = mp_tokenizer_decode(t, back, (size_t)m, &again, err, sizeof err);
        if (k != n || memcmp(again, text, (size_t)n) != 0) {
            fprintf(stderr, "CONTRACT: the encoding does not decode to the same text\n");
            abort();
        }
        free(again);
        free(back);
    }
    free(enc);
    free(text);
    mp_tokenizer_free(t);
    return 0;
}
