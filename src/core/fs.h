// Small filesystem helpers.
#pragma once
#include <stddef.h>

// mkdir -p. Returns -1 with err set ("PATH: <strerror>").
int mp_mkdirs(const char *path, char *err, size_t err_len);
// Writes text to path (via path.tmp, fsync, rename). Returns -1 with err set.
int mp_write_text_file(const char *path, const char *text, char *err, size_t err_len);
// The same for len bytes of data.
int mp_write_file(const char *path, const void *data, size_t len, char *err, size_t err_len);
