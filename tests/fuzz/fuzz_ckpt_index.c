// The checkpoint index (index.h5) as every reader meets it: mp_ckpt_read_config,
// mp_ckpt_load (ck_open_index, ck_layout_read, the virtual datasets), ckpt inspect and
// ckpt verify. The input damages index.h5 only (fuzz_ckpt.c).
#include "fuzz_ckpt.h"

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    (void)argc;
    (void)argv;
    return fz_ckpt_init();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    return fz_ckpt_run(FZ_CK_INDEX, data, size);
}
