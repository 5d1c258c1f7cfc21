// Internals shared by the checkpoint files: checkpoint_common.c (dataset list, layout,
// agreement between ranks), checkpoint_dir.c (directories, `latest`, pruning),
// checkpoint_write.c, checkpoint_read.c, checkpoint_verify.c.
#pragma once
#include <hdf5.h>
#include <stddef.h>
#include "ckpt/h5util.h"
#include "millipede/checkpoint.h"

#define CK_SHARD_NAME "shard_%05d.h5"
#define CK_STEP_NAME "step_%08ld"
#define CK_PATH 1200   // room for MP_PATH_MAX plus the names below it

// The groups a dataset lives in, in file order. Expert tables appear in params, adam_m and
// adam_v of the shard files (local rows) and as virtual datasets in the index.
enum { CK_PARAMS = 0, CK_ADAM_M = 1, CK_ADAM_V = 2, CK_STATE = 3, CK_N_GROUPS = 4 };
extern const char *const ck_group_names[CK_N_GROUPS];   // "params", "adam_m", ...

// One dataset of a checkpoint as the model in memory sees it.
typedef struct {
    int group;            // CK_PARAMS .. CK_STATE
    char name[64];        // tensor name ("h1.peer.u") or BN statistic ("h1.peer.bn.running_var")
    char path[96];        // "/params/h1.peer.u"
    float *buf;           // backend memory holding rows [row_start, row_start + rows)
    int ndim;
    hsize_t dims[2];      // global shape
    hsize_t row_start;    // first global row held in buf
    hsize_t rows;         // rows held in buf
    int sharded;          // an expert table: its rows live in the shard files
} ck_ds;

static inline hsize_t ck_cols(const ck_ds *d) { return d->ndim == 2 ? d->dims[1] : 1; }

// Every dataset of m (and opt's moments unless NULL) in file order: parameters in table
// order, then adam_m, adam_v, then the router state. *out is malloc'd.
int ck_datasets(mp_model *m, const mp_adamw *opt, ck_ds **out);

// The index's record of how the expert rows were split over the shard files.
typedef struct {
    int P;
    char (*files)[32];       // (P) shard file names, relative to the checkpoint directory
    long long *bytes;        // (P) their sizes when written
    int n_tables;            // expert tensors
    char (*names)[64];       // (n_tables) their names
    long long *rows;         // (n_tables, P, 2): rows [start, end) of table t in shard p
} ck_layout;

// Reads /layout of an open index. Returns -1 with err naming path when it is missing or
// inconsistent. Call inside quiet.
int ck_layout_read(hid_t index, const char *path, ck_layout *lay, char *err, size_t err_len);
void ck_layout_free(ck_layout *lay);
int ck_layout_table(const ck_layout *lay, const char *name);   // index or -1
// Checks shard p against the layout: present with the recorded size, a shard file of
// this checkpoint (format, rank, step). Returns -1 with a one-line message.
int ck_check_shard(const char *dir, const ck_layout *lay, int p, long step, char *err,
                   size_t err_len);

// Opens dir/index.h5 read-only and checks format and version; reads the root attributes
// into info and (when not NULL) the stored configuration text (malloc'd). Returns the
// file, or -1 with err set. Call inside quiet.
hid_t ck_open_index(const char *dir, mp_ckpt_info *info, char **config_text, char *err,
                    size_t err_len);

// "dir/name" into out.
void ck_join(char *out, size_t len, const char *dir, const char *name);
// File access property list for every file we create: HDF5 1.8+ object headers, whose
// metadata carries checksums too.
hid_t ck_fapl(void);


// Directory handling (checkpoint_dir.c).
// Steps of the complete checkpoints under root (step_%08d, no .tmp), newest first; *out
// malloc'd. Returns the count.
int ck_list_steps(const char *root, long **out);
// The step `latest` names, or -1 when it is missing or not a step_%08d link.
long ck_latest_step(const char *root);
// Points root/latest at step_%08d atomically (symlink to a temporary name, rename).
int ck_set_latest(const char *root, long step, char *err, size_t err_len);
// Removes a checkpoint directory (flat: files only) or any leftover *.tmp directory.
int ck_remove_dir(const char *path);
// Removes root/*.tmp leftovers of interrupted writes.
void ck_remove_tmp_dirs(const char *root);
// Keeps the newest `keep` checkpoints with step <= current, never the one `latest`
// names; removes the others and every checkpoint newer than `current`.
void ck_prune(const char *root, long current, int keep);
// Before committing step `step`: removes the checkpoints of steps >= step, moving `latest`
// back first if it names one of them. Returns -1 with err set.
int ck_drop_from(const char *root, long step, char *err, size_t err_len);
