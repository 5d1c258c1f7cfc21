// The single-file model format: one HDF5 file holding a trained model's parameters, its
// router state (BatchNorm running statistics, sub-key balance biases) and the
// configuration that fixes their shapes.
// Written by `millipede ckpt export` (one file from a checkpoint), read by `eval` and `sample`.
// Layout (docs/outputs.md):
//   /                 attributes: format = "millipede-model", version = 1,
//                     config = resolved INI text, step = int64
//   /params/<name>    float32, the tensor's global shape (names as in docs/model.md)
//   /state/h{l}.{peer,pkm}.bn.running_mean, .bn.running_var    float32 (H*dk)
//   /state/h{l}.{peer,pkm}.k1_bias, .k2_bias                   float32 (H, n)
// Every dataset is chunked with a Fletcher32 checksum, so corrupt data fails to read.
#pragma once
#include <stddef.h>
#include "millipede/config.h"
#include "millipede/model.h"

#define MP_MODEL_FORMAT "millipede-model"
#define MP_MODEL_VERSION 1

// Writes m to path atomically (path.tmp, fsync, rename). Single rank only for now: the
// sharded form is the checkpoint's job. Returns -1 with a one-line message in err.
int mp_model_save(mp_model *m, const char *path, long step, char *err, size_t err_len);
// Reads the configuration stored in a model file (starting from defaults).
int mp_model_file_config(const char *path, mp_config *cfg, char *err, size_t err_len);
// Loads a model file into an already-created model of the same shapes: every tensor of m
// must be in the file with its global shape. Rows [row_start, row_start+rows) of the expert
// tables are read, so a sharded model reads its own part.
int mp_model_load(mp_model *m, const char *path, char *err, size_t err_len);

// Checks that file_cfg (a model file's configuration) and cfg (the run's) agree on every
// key that fixes a parameter shape, and on the activation. On the first difference writes
// "FILE: key 'model.d_model' is 32 in the model file but 64 in CFG_PATH" and returns -1.
int mp_model_file_check_config(const mp_config *file_cfg, const mp_config *cfg,
                               const char *file, const char *cfg_path, char *err,
                               size_t err_len);
// For eval and sample: reads the configuration of model file `file`, checks it against cfg
// (loaded from cfg_path), builds a model for B sequences on backend be and loads the file:
// with comm (not NULL), rank comm->rank's part of the model sharded over comm, which reads
// only its own expert rows (mp_model_create_sharded). The model's configuration, written
// to *model_cfg (which must outlive the model), is cfg with the [model], [peer] and [pkm]
// sections taken from the file. Returns NULL with a one-line message in err on bad input.
mp_model *mp_model_open_file(const char *file, const mp_config *cfg, const char *cfg_path,
                             const mp_backend *be, int B, mp_comm *comm, mp_config *model_cfg,
                             char *err, size_t err_len);
