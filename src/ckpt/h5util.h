// HDF5 and file-system helpers shared by the single-file model format (model_file.c) and
// the sharded checkpoints (checkpoint_*.c). Serial HDF5 API only, so both work with
// serial and parallel HDF5 builds.
#pragma once
#include <hdf5.h>
#include <stddef.h>
#include "millipede/config.h"
#include "millipede/model.h"

// ~1 MiB per chunk: one Fletcher32 checksum per MiB of data.
#define MP_H5_CHUNK_BYTES (1 << 20)

// Quiet HDF5: while probing a file that may be bad, failures are expected and reported as
// one line by us, so HDF5's automatic error-stack printing is turned off in between.
typedef struct {
    H5E_auto2_t fn;
    void *data;
} mp_h5_quiet;
mp_h5_quiet mp_h5_quiet_begin(void);
void mp_h5_quiet_end(mp_h5_quiet q);
// The innermost (most specific) message of the current HDF5 error stack, e.g.
// "truncated file: eof = 4096, sblock->base_addr = 0, stored_eof = 9072".
const char *mp_h5_last_error(char buf[256]);

// Opens an existing file read-only for reading, call inside quiet. On failure returns -1 and
// writes "PATH: not an HDF5 file (NOT_HDF5)" when H5Fis_hdf5 says it is not one (that
// check is skipped when not_hdf5 is NULL), else "PATH: cannot open as HDF5 (CORRUPT): why".
hid_t mp_h5_open_read(const char *path, const char *not_hdf5, const char *corrupt, char *err,
                      size_t err_len);

// Attributes. Writers go through MP_CHECK_H5 (they fail only on a bug or a full disk).
void mp_h5_write_str_attr(hid_t obj, const char *name, const char *s);
void mp_h5_write_scalar_attr(hid_t obj, const char *name, hid_t file_type, hid_t mem_type,
                             const void *value);
void mp_h5_write_i64_attr(hid_t obj, const char *name, long long v);
// Readers return NULL / -1 when the attribute is missing or of the wrong kind; call inside
// quiet_begin/quiet_end. The string is malloc'd.
char *mp_h5_read_str_attr(hid_t obj, const char *name);
// Replaces control characters (a newline, say) of a string read from a file by '?', so that
// a message quoting it stays one line. Returns s.
char *mp_h5_printable(char *s);
int mp_h5_read_int_attr(hid_t obj, const char *name, long long *value);

// "(4096, 64)" / "(8)"
void mp_h5_shape_str(char *buf, size_t len, int ndim, const hsize_t *dims);
// Chunk shape for a float32 dataset of that shape: whole rows, about MP_H5_CHUNK_BYTES.
void mp_h5_chunk_dims(int ndim, const hsize_t *dims, hsize_t *chunk);
// Creates a chunked float32 dataset with the Fletcher32 filter; returns the open dataset.
hid_t mp_h5_create_f32(hid_t loc, const char *path, int ndim, const hsize_t *dims);
// Creates an (empty) group.
void mp_h5_create_group(hid_t loc, const char *path);
// Does link `path` (absolute, e.g. "/params/wte") exist? Checks each parent group first,
// since H5Lexists fails when an intermediate group is missing. Call inside quiet.
int mp_h5_exists(hid_t file, const char *path);

// fsync a file (flags O_RDONLY) or directory (O_RDONLY | O_DIRECTORY) by path; -1 with
// errno set on failure.
int mp_fsync_path(const char *path, int flags);

// Checks that file_cfg (stored in a model file or checkpoint, called `what` in messages:
// "the model file", "the checkpoint") and cfg (the run's, from cfg_path) agree on every
// key that fixes a parameter shape, and on the activation. On the first difference writes
// "FILE: key 'model.d_model' is 32 in WHAT but 64 in CFG_PATH" and returns -1.
int mp_check_shape_config(const mp_config *file_cfg, const mp_config *cfg, const char *file,
                          const char *what, const char *cfg_path, char *err, size_t err_len);
// Checks that file_cfg and cfg agree on which router state exists beyond the shapes: the
// sub-key balance biases (balance_rate > 0 or not). For loading into a model built from
// cfg (resume); eval and sample take [peer] and [pkm] from the file and need no check.
int mp_check_state_config(const mp_config *file_cfg, const mp_config *cfg, const char *file,
                          const char *what, const char *cfg_path, char *err, size_t err_len);
// One part of the router state as the model file and the checkpoints store it.
typedef struct {
    char name[48];   // "h1.peer.bn.running_var", "h1.peer.k1_bias"
    size_t offset;   // into mp_model_router_state(m)
    int ndim;        // 1: (rows) BN statistics; 2: (rows, cols) balance biases (H, n)
    hsize_t rows, cols;
} mp_state_dataset;
#define MP_MAX_STATE_DATASETS (4 * MP_MAX_LAYERS)
// The router state of m (layout in model.h): per retrieval layer in block order,
// running_mean and running_var with query BN, k1_bias and k2_bias with balance_rate > 0.
// Fills out (room for MP_MAX_STATE_DATASETS), returns the count.
int mp_router_datasets(mp_model *m, mp_state_dataset *out);

// The configuration of a stored model for eval and sample: cfg with the [model], [peer]
// and [pkm] sections (and init_std) taken from file_cfg.
void mp_merge_model_config(mp_config *out, const mp_config *cfg, const mp_config *file_cfg);

// The tokenizer of a model (src/ckpt/tokenizer_h5.c): dataset /tokenizer in file, written
// only for a tokenizer other than bytes; read back as *out (NULL: bytes). The reader
// returns -1 with a one-line err naming path when it is there but bad.
struct mp_tokenizer;
void mp_h5_write_tokenizer(hid_t file, const struct mp_tokenizer *t);
int mp_h5_read_tokenizer(hid_t file, const char *path, struct mp_tokenizer **out, char *err,
                         size_t err_len);
