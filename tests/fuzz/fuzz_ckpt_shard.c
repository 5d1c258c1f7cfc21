// The checkpoint shard files (shard_%05d.h5) as the readers meet them: ck_check_shard, the
// rows read through the index's virtual datasets (mp_ckpt_load, into a model holding all
// rows and into one holding shard 1's), the direct reads of `ckpt verify`. The input damages
// one shard file, or removes, truncates or swaps shard files (fuzz_ckpt.c).
#include "fuzz_ckpt.h"

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    (void)argc;
    (void)argv;
    return fz_ckpt_init();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    return fz_ckpt_run(FZ_CK_SHARDS, data, size);
}
