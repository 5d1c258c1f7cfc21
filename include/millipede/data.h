// Token shards and the batch sampler. Format (docs/data.md), little-endian:
//   offset 0  char[8]  magic "MPTOKENS"
//          8  u32      version (1: bytes, 2: another tokenizer)
//         12  u32      vocab_size
//         16  u64      n_tokens
//         24  u32      bytes_per_token (2)
//         28  u32      reserved (0)
//   version 1:
//         32  u16[n_tokens] tokens, each < vocab_size
//   version 2:
//         32  u64      tokenizer hash (mp_tokenizer_hash, never 0)
//         40  u64      reserved (0)
//         48  u16[n_tokens] tokens, each < vocab_size
#pragma once
#include <stddef.h>
#include <stdint.h>

#define MP_SHARD_MAGIC "MPTOKENS"
#define MP_SHARD_HEADER_BYTES 32      // version 1
#define MP_SHARD_HEADER_BYTES_V2 48   // version 2

typedef struct {
    char path[1024];
    uint32_t vocab_size;
    uint64_t n_tokens;
    uint16_t *tokens;   // (n_tokens,) whole shard in memory
    uint64_t tokenizer_hash;   // 0: bytes (version 1)
} mp_shard;

// Opens and validates a shard (magic, version, size, every token < vocab_size, and
// vocab_size == expect_vocab when expect_vocab > 0). Returns -1 with a one-line
// message in err naming the file and what was expected.
int mp_shard_open(mp_shard *s, const char *path, uint32_t expect_vocab, char *err, size_t err_len);
void mp_shard_close(mp_shard *s);
// Writes a shard atomically (path.tmp then rename). Returns -1 with err set.
// tokenizer_hash 0 (bytes) writes version 1, anything else version 2.
int mp_shard_write(const char *path, uint32_t vocab_size, uint64_t tokenizer_hash,
                   const uint16_t *tokens, uint64_t n, char *err, size_t err_len);

// Byte-level tokenizer: vocabulary 256, token = byte value.
#define MP_BYTE_VOCAB 256
size_t mp_tokenize_bytes(const unsigned char *text, size_t len, uint16_t *out);
// Writes the text of one token into out (at most out_len bytes); returns its length.
size_t mp_detokenize(uint16_t token, char *out, size_t out_len);

// The global batch depends only on (seed, step, micro) and never on the rank count:
// sequence j of micro-batch `micro` at step `step` starts at
// mp_batch_offset(seed, stream, step, micro, j, n_tokens, T).
// stream separates train (0) from validation (1) sampling. (step, micro, j) are packed
// into one 64-bit counter, so each has a limit (train.steps, train.grad_accum and
// train.batch_size are validated against them):
#define MP_SAMPLER_STEP_BITS 32    // steps < 2^32
#define MP_SAMPLER_MICRO_BITS 12   // micro-batches per step (grad_accum) <= 4096
#define MP_SAMPLER_J_BITS 20       // sequences per micro-batch (batch_size) <= 2^20
uint64_t mp_batch_offset(uint64_t seed, uint32_t stream, uint64_t step, uint32_t micro,
                         uint32_t j, uint64_t n_tokens, int T);
// Fills inputs and targets (B, T) int32 for sequences [j0, j0+B) of that micro-batch.
void mp_batch_fill(const mp_shard *s, uint64_t seed, uint32_t stream, uint64_t step,
                   uint32_t micro, uint32_t j0, int B, int T, int32_t *inputs, int32_t *targets);

// `millipede data prepare --out DIR [--val-fraction F] PATH...`: reads text files (PATHs
// may be directories, walked recursively, files sorted by path), tokenizes them and
// writes DIR/train.bin and DIR/val.bin. Returns the process exit status.
int mp_cmd_data(int argc, char **argv);
