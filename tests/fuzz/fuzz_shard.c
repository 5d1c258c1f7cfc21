// The token shard reader (src/data/shard.c mp_shard_open) and, on an accepted shard, the
// batch sampler over it. Input: one byte that picks the vocabulary the caller expects, then
// the shard file's bytes.
// Contract: accepted, or one non-empty line; an accepted shard is its header (32 bytes in
// version 1, 48 in version 2, which carries a tokenizer hash) and n_tokens tokens, each
// below its vocab_size, and every sampled batch is made of them.
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fuzz_common.h"
#include "millipede/data.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size < 1) return 0;
    static const uint32_t expect[4] = {0, 256, 65536, 7};
    const char *path = fz_path("train.bin");
    fz_write(path, data + 1, size - 1);
    mp_shard s;
    char err[FZ_ERR] = "";
    int rc = mp_shard_open(&s, path, expect[data[0] % 4], err, sizeof err);
    fz_check("mp_shard_open", rc, err);
    if (rc != 0) return 0;
    uint64_t header = s.tokenizer_hash ? MP_SHARD_HEADER_BYTES_V2 : MP_SHARD_HEADER_BYTES;
    if (header + 2 * s.n_tokens != size - 1 || s.vocab_size == 0) {
        fprintf(stderr, "CONTRACT: accepted %llu tokens from %zu bytes\n",
                (unsigned long long)s.n_tokens, size - 1);
        abort();
    }
    for (uint64_t i = 0; i < s.n_tokens; i++)
        if (s.tokens[i] >= s.vocab_size) abort();
    enum { B = 2, T = 8 };
    if (s.n_tokens > T) {   // the sampler needs a sequence plus its next-token target
        int32_t in[B * T], tg[B * T];
        mp_batch_fill(&s, data[0], 0, 3, 0, 0, B, T, in, tg);
        for (int i = 0; i < B * T; i++)
            if (in[i] < 0 || (uint32_t)in[i] >= s.vocab_size || tg[i] < 0 ||
                (uint32_t)tg[i] >= s.vocab_size) {
                fprintf(stderr, "CONTRACT: a sampled token is outside the vocabulary\n");
                abort();
            }
    }
    mp_shard_close(&s);
    return 0;
}
