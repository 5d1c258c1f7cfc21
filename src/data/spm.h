// The SentencePiece library (C++) behind a C interface: src/data/sentencepiece.cc when
// libsentencepiece was found at configure time, src/data/sentencepiece_absent.c otherwise
// (every call then fails with a message that says so). Used by src/data/tokenizer.c only.
#pragma once
#include <stddef.h>
#include <stdint.h>

typedef struct mp_spm mp_spm;

// 1 when this build has libsentencepiece.
int mp_spm_available(void);
// Trains a model of `vocab` pieces ("bpe" or "unigram") on text (n bytes; one sentence per
// line) and returns its serialized model file in *model (malloc'ed, *model_len bytes).
// Returns -1 with err set.
int mp_spm_train(const char *text, size_t n, int vocab, const char *type, unsigned char **model,
                 size_t *model_len, char *err, size_t err_len);
// A processor from a serialized model file. NULL with err set.
mp_spm *mp_spm_load(const void *model, size_t len, char *err, size_t err_len);
void mp_spm_free(mp_spm *p);
int mp_spm_vocab(const mp_spm *p);
// text -> ids; *ids malloc'ed. Returns the count, or -1 with err set.
long mp_spm_encode(const mp_spm *p, const char *text, size_t n, int32_t **ids, char *err,
                   size_t err_len);
// ids -> text; *text malloc'ed and NUL-terminated. Returns its length, or -1 with err set.
long mp_spm_decode(const mp_spm *p, const int32_t *ids, size_t n, char **text, char *err,
                   size_t err_len);
// The bytes of text that id stands for inside a decoded stream: its piece with the
// word-boundary mark U+2581 as one space, a byte piece <0xAB> as one byte, control and
// unknown pieces as none (the unknown piece's text is lost in encoding).
size_t mp_spm_piece_bytes(const mp_spm *p, int id);
