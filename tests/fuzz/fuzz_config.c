// The configuration reader (src/core/config.c): a config file and --set overrides, as
// `millipede train CONFIG --set ...` reads them, and the INI text stored in model files and
// checkpoints (mp_config_from_ini_string, then mp_config_validate).
// Input: the file's text, then up to 4 overrides, separated by NUL bytes.
// Contract: each reader accepts or fails with one non-empty line; an accepted config
// survives the round trip to INI text and back (same resolved text, same hash).
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fuzz_common.h"
#include "millipede/config.h"

static void round_trip(const mp_config *cfg) {
    size_t n = mp_config_to_ini(cfg, NULL, 0) + 1;
    char *a = malloc(n), *b = NULL, err[FZ_ERR] = "";
    mp_config_to_ini(cfg, a, n);
    mp_config again;
    int rc = mp_config_from_ini_string(&again, a, "(round trip)", err, sizeof err);
    if (rc == 0) rc = mp_config_validate(&again, err, sizeof err);
    if (rc != 0) {
        fprintf(stderr, "CONTRACT: an accepted config does not read back: %s\n%s", err, a);
        abort();
    }
    size_t m = mp_config_to_ini(&again, NULL, 0) + 1;
    b = malloc(m);
    mp_config_to_ini(&again, b, m);
    if (strcmp(a, b) || mp_config_hash(cfg) != mp_config_hash(&again)) {
        fprintf(stderr, "CONTRACT: the round trip changed the config:\n%s\n--- read back:\n%s", a, b);
        abort();
    }
    free(a);
    free(b);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    char *text = malloc(size + 1), err[FZ_ERR] = "";
    memcpy(text, data, size);
    text[size] = '\0';
    // overrides: the NUL-separated pieces after the file's text
    char *over[4];
    int n_over = 0;
    size_t file_len = strlen(text);
    for (size_t at = file_len + 1; at < size && n_over < 4; at += strlen(text + at) + 1)
        over[n_over++] = text + at;

    mp_config cfg;
    int rc = mp_config_from_ini_string(&cfg, text, "fuzz.ini", err, sizeof err);
    fz_check("mp_config_from_ini_string", rc, err);
    if (rc == 0) {
        err[0] = '\0';
        rc = mp_config_validate(&cfg, err, sizeof err);
        fz_check("mp_config_validate", rc, err);
    }

    // the file as `millipede train` reads it; its bytes, NUL included, as given
    const char *path = fz_path("fuzz.ini");
    fz_write(path, data, file_len < size ? file_len : size);
    err[0] = '\0';
    rc = mp_config_load(&cfg, path, over, n_over, err, sizeof err);
    fz_check("mp_config_load", rc, err);
    if (rc == 0) round_trip(&cfg);
    free(text);
    return 0;
}
