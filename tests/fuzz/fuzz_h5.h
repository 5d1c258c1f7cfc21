// Structural mutation of a valid HDF5 file. Raw byte mutation mostly meets libhdf5's own
// checksums (superblock, object headers, Fletcher32 chunks) and never gets past them; the
// edits here go through the HDF5 API, so the file stays well-formed and what meets the
// damage is millipede's own checking: attributes deleted, retyped or given odd values,
// the stored configuration edited line by line, datasets deleted, reshaped, retyped,
// overwritten with NaN/inf/huge values, turned into groups (and groups into datasets),
// extra datasets added, virtual-dataset mappings pointed elsewhere.
#pragma once
#include <stddef.h>
#include <stdint.h>

// Applies the program prog (n bytes, each edit a few bytes: README.md) to the file at path.
// Returns the number of edits that took effect (0 when the file does not open).
int fz_h5_edit(const char *path, const uint8_t *prog, size_t n);
// Sets element p of the int64 dataset `dset` of file path to value (the checkpoint harness
// uses it to keep /layout/shard_bytes equal to an edited shard's new size). -1 on failure.
int fz_h5_set_i64(const char *path, const char *dset, int p, long long value);
// Aborts when an HDF5 file, dataset, group, attribute, type or space is still open: a reader
// that leaks handles on a bad file runs out of them in a long job.
void fz_h5_check_closed(const char *what);
