// The byte tokenizer: token = byte value, so every input is representable, nothing is
// unknown, and bits per token equal bits per byte (docs/data.md).
#include "millipede/data.h"

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
