// What every harness shares: a private scratch directory, file helpers and the contract
// every reader must keep on any input (README.md): accept, or fail with a message that is
// one non-empty line. A breach calls abort(), which libFuzzer records as a finding; so do
// exit() (a reader that ends the process on bad input) and every ASan/UBSan report.
#pragma once
#include <stddef.h>
#include <stdint.h>

#define FZ_ERR 1024   // the error buffers the commands give the readers

// The scratch directory of this process (made on first use, under TMPDIR or /tmp).
const char *fz_dir(void);
// "fz_dir()/name" in a static buffer of a few slots (valid until reused).
const char *fz_path(const char *name);
// The committed seed file `name` (tests/fuzz/seeds/name).
const char *fz_seed(const char *name);
// Writes n bytes to path (replacing it); aborts on an I/O error (the harness's, not a finding
// about millipede, but a harness that cannot write its input tests nothing).
void fz_write(const char *path, const uint8_t *data, size_t n);
// Copies a seed file to path.
void fz_copy(const char *from, const char *to);
// Removes every file of the scratch directory (the readers' inputs of the last run).
void fz_clean(void);
// The contract: rc == 0 is acceptance; anything else needs err to be one non-empty line.
void fz_check(const char *what, int rc, const char *err);
// The contract for text made of problem lines (ckpt verify): n_problems lines, each
// non-empty, none empty, nothing after the last newline.
void fz_check_lines(const char *what, int n_problems, const char *text, size_t len);
// Quiet HDF5's automatic error printing for the whole run (the readers turn it off around
// their own probes; the mutators' failures are expected).
void fz_h5_quiet(void);
// Raw byte damage to a copy of a seed file, as a small program rather than the whole file
// (so that corpus entries stay a few bytes, not the seed's 100-300 KB): byte 0 truncates
// (0 keeps the size, k > 0 keeps k/256 of it), then patches of [3-byte little-endian offset
// (modulo the size), 1 byte length L (1..16), L bytes] overwrite the copy.
void fz_raw_patch(const char *seed, const char *out, const uint8_t *prog, size_t n);
