// The model file reader (src/ckpt/model_file.c) as `millipede eval` and `sample` use it:
// mp_model_file_config, then mp_model_open_file against the configuration the seed was
// made with (seeds/tiny.ini), which builds the model and loads every tensor.
// Input: one mode byte, then
//   mode even: raw byte damage to seeds/model.h5 (fz_raw_patch: truncation, patched bytes);
//   mode odd:  a program of structural edits (fuzz_h5.h) applied to seeds/model.h5.
// Contract: accepted, or one non-empty line; no HDF5 object left open either way.
#include <stdio.h>
#include <stdlib.h>

#include "fuzz_common.h"
#include "fuzz_h5.h"
#include "millipede/backend.h"
#include "millipede/model_file.h"

static mp_config run_cfg;

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    (void)argc;
    (void)argv;
    fz_h5_quiet();
    char err[FZ_ERR];
    if (mp_config_load(&run_cfg, fz_seed("tiny.ini"), NULL, 0, err, sizeof err) != 0) {
        fprintf(stderr, "fuzz: %s\n", err);
        abort();
    }
    // The intact seed must be accepted, or only the rejecting paths would be fuzzed.
    mp_config mcfg;
    mp_model *m = mp_model_open_file(fz_seed("model.h5"), &run_cfg, "tiny.ini", mp_backend_cpu(),
                                     1, NULL, &mcfg, err, sizeof err);
    if (!m) {
        fprintf(stderr, "fuzz: the seed model file is rejected (remake it: make_seeds.sh): %s\n",
                err);
        abort();
    }
    mp_model_free(m);
    fz_h5_check_closed("mp_model_open_file (the intact seed)");
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size < 1) return 0;
    const char *path = fz_path("model.h5");
    if (data[0] % 2 == 0) {
        fz_raw_patch(fz_seed("model.h5"), path, data + 1, size - 1);
    } else {
        fz_copy(fz_seed("model.h5"), path);
        fz_h5_edit(path, data + 1, size - 1);
    }
    fz_h5_check_closed("the structural edit");

    char err[FZ_ERR] = "";
    mp_config fcfg, mcfg;
    mp_config_defaults(&fcfg);
    int rc = mp_model_file_config(path, &fcfg, err, sizeof err);
    fz_check("mp_model_file_config", rc, err);
    fz_h5_check_closed("mp_model_file_config");

    err[0] = '\0';
    mp_model *m = mp_model_open_file(path, &run_cfg, "tiny.ini", mp_backend_cpu(), 1, NULL, &mcfg, err,
                                     sizeof err);
    fz_check("mp_model_open_file", m ? 0 : -1, err);
    fz_h5_check_closed("mp_model_open_file");
    if (m) mp_model_free(m);
    return 0;
}
