// Tokenizers (docs/data.md): bytes (token = byte value), a SentencePiece model trained by
// `millipede data prepare --tokenizer sentencepiece:VOCAB` or imported from a model file, or
// a token table (each id's bytes) written with shards tokenized elsewhere by
// tools/tokens_to_shards.py.
// One object serves data prepare (encode), sample (encode the prompt, decode the output)
// and eval (the bytes of text behind each token, for bits per byte).
#pragma once
#include <stddef.h>
#include <stdint.h>

typedef struct mp_tokenizer mp_tokenizer;

// The byte tokenizer with vocab_size vocab (>= 256: ids from 256 on are padding, no text).
mp_tokenizer *mp_tokenizer_bytes(int vocab);
// A SentencePiece model from the bytes of its model file (copied). NULL with a one-line
// err naming `name` (a path, or what holds the model) when it is not one, or when this
// build has no libsentencepiece.
mp_tokenizer *mp_tokenizer_sentencepiece(const void *model, size_t len, const char *name,
                                         char *err, size_t err_len);
// A token table or a SentencePiece model from its file's bytes (copied), told apart by the
// table's magic. NULL with a one-line err naming `name`.
mp_tokenizer *mp_tokenizer_parse(const void *data, size_t len, const char *name, char *err,
                                 size_t err_len);
// mp_tokenizer_parse of a file.
mp_tokenizer *mp_tokenizer_load(const char *path, char *err, size_t err_len);
// Trains a SentencePiece model of `vocab` pieces, type "bpe" or "unigram", on text (n
// bytes; lines are its sentences). NULL with err set.
mp_tokenizer *mp_tokenizer_train(const char *text, size_t n, int vocab, const char *type,
                                 char *err, size_t err_len);
void mp_tokenizer_free(mp_tokenizer *t);

int mp_tokenizer_vocab(const mp_tokenizer *t);
// 0 for bytes; otherwise the 64-bit FNV-1a hash of its file (never 0), which version-2
// shard headers, checkpoints and model files carry to catch a mismatch.
uint64_t mp_tokenizer_hash(const mp_tokenizer *t);
// "bytes", "sentencepiece" or "table".
const char *mp_tokenizer_kind(const mp_tokenizer *t);
// The SentencePiece model's or the token table's file bytes (NULL and 0 for bytes).
const unsigned char *mp_tokenizer_model(const mp_tokenizer *t, size_t *len);
// text -> tokens in *out (malloc'ed). Returns the count, or -1 with err set. A token table
// encodes with the fewest entries that spell the text (one that decodes to it, not
// necessarily its tokenizer's encoding), and fails only when none does.
long mp_tokenizer_encode(const mp_tokenizer *t, const char *text, size_t n, uint16_t **out,
                         char *err, size_t err_len);
// tokens -> text in *out (malloc'ed, NUL-terminated). Returns its length, or -1 with err.
long mp_tokenizer_decode(const mp_tokenizer *t, const int32_t *tokens, size_t n, char **out,
                         char *err, size_t err_len);
// (vocab,) the bytes of text each token stands for in a decoded stream (bytes: 1 below 256,
// 0 above; SentencePiece: its piece, U+2581 as one space, a byte piece one byte, control
// pieces none; a token table: its entry). Summed over tokens it gives the text's length,
// for bits per byte.
const uint32_t *mp_tokenizer_token_bytes(const mp_tokenizer *t);
