// The checkpoint readers over a damaged copy of seeds/ckpt (a 2-rank checkpoint: index.h5,
// shard_00000.h5, shard_00001.h5): shared by fuzz_ckpt_index.c and fuzz_ckpt_shard.c,
// which differ in the file the input damages.
#pragma once
#include <stddef.h>
#include <stdint.h>

enum { FZ_CK_INDEX = 0, FZ_CK_SHARDS = 1 };
// Sets up the damaged checkpoint from the input (README.md gives the input layout) and
// runs every reader on it, checking the contract.
int fz_ckpt_run(int target, const uint8_t *data, size_t size);
int fz_ckpt_init(void);
