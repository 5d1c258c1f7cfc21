// src/data/spm.h in a build without libsentencepiece: every call says so.
#include <stdio.h>
#include "data/spm.h"

#define ABSENT "this build has no SentencePiece (install libsentencepiece-dev and rebuild)"

int mp_spm_available(void) { return 0; }

int mp_spm_train(const char *text, size_t n, int vocab, const char *type, unsigned char **model,
                 size_t *model_len, char *err, size_t err_len) {
    (void)text, (void)n, (void)vocab, (void)type, (void)model, (void)model_len;
    if (err && err_len) snprintf(err, err_len, "%s", ABSENT);
    return -1;
}

mp_spm *mp_spm_load(const void *model, size_t len, char *err, size_t err_len) {
    (void)model, (void)len;
    if (err && err_len) snprintf(err, err_len, "%s", ABSENT);
    return NULL;
}

void mp_spm_free(mp_spm *p) { (void)p; }
int mp_spm_vocab(const mp_spm *p) { (void)p; return 0; }

long mp_spm_encode(const mp_spm *p, const char *text, size_t n, int32_t **ids, char *err,
                   size_t err_len) {
    (void)p, (void)text, (void)n, (void)ids;
    if (err && err_len) snprintf(err, err_len, "%s", ABSENT);
    return -1;
}

long mp_spm_decode(const mp_spm *p, const int32_t *ids, size_t n, char **text, char *err,
                   size_t err_len) {
    (void)p, (void)ids, (void)n, (void)text;
    if (err && err_len) snprintf(err, err_len, "%s", ABSENT);
    return -1;
}

size_t mp_spm_piece_bytes(const mp_spm *p, int id) { (void)p, (void)id; return 0; }
