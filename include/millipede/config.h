// The run configuration: one INI file (inih) plus --set section.key=value overrides.
// Every key has a default; unknown sections/keys and bad values are one-line errors that
// name the file and key. See docs/config.md for the full key list.
#pragma once
#include <stddef.h>
#include <stdint.h>

#define MP_MAX_LAYERS 64
#define MP_PATH_MAX 1024

typedef enum { MP_FFN_DENSE = 0, MP_FFN_PEER = 1, MP_FFN_PKM = 2 } mp_ffn_kind;
typedef enum { MP_ACT_GELU = 0, MP_ACT_RELU = 1 } mp_activation;

// Product-key retrieval shared by PEER and PKM layers.
typedef struct {
    long n_experts;     // N = n*n                       [peer] experts
    int n_sub;          // n = sqrt(N), derived
    int heads;          // H                             [peer] heads
    int topk;           // k per head (and per half)     [peer] topk
    int key_dim;        // dk, even                      [peer] key_dim
    int query_bn;       // BatchNorm on the query        [peer] query_bn
    float bn_momentum;  // running-stat momentum (PyTorch convention) [peer] bn_momentum
    float bn_eps;       //                                [peer] bn_eps
    float balance_rate; // step of the sub-key balance biases, 0 = none [peer] balance_rate
    mp_activation activation; // PEER only: gelu|relu    [peer] activation
} mp_retrieval_config;

typedef struct {
    // [run]
    char run_dir[MP_PATH_MAX];     // run.dir
    // [model]
    int vocab_size;                // model.vocab_size (256: byte tokenizer)
    int context;                   // model.context: T, max sequence length
    int d_model;                   // model.d_model: C
    int n_layers;                  // model.n_layers: L
    int n_heads;                   // model.n_heads: attention heads, C % n_heads == 0
    int dense_hidden;              // model.dense_hidden: F of the dense MLP (default 4C)
    mp_ffn_kind ffn[MP_MAX_LAYERS];// model.ffn: "dense" for all, or a comma list of L kinds
    mp_retrieval_config peer;      // [peer]
    mp_retrieval_config pkm;       // [pkm]
    float init_std;                // model.init_std (0.02)
    // [train]
    long steps;                    // train.steps
    uint64_t seed;                 // train.seed
    int batch_size;                // train.batch_size: global sequences per micro-batch
    int grad_accum;                // train.grad_accum: micro-batches per step
    float lr;                      // train.lr: peak lr of the dense group
    float min_lr_frac;             // train.min_lr_frac: cosine floor as a fraction of peak
    long warmup;                   // train.warmup: linear warmup steps
    float weight_decay;            // train.weight_decay: dense matrices (not biases/norms)
    float beta1, beta2, eps;       // train.beta1, train.beta2, train.eps
    float grad_clip;               // train.grad_clip: global-norm clip, 0 = off
    float expert_lr;               // train.expert_lr: U, V (PEER) and V (PKM)
    float expert_weight_decay;     // train.expert_weight_decay
    char expert_optimizer[16];     // train.expert_optimizer: adamw | lazy_adamw (touched rows)
    float key_lr;                  // train.key_lr: K1, K2
    float key_weight_decay;        // train.key_weight_decay
    long log_every;                // train.log_every
    long eval_every;               // train.eval_every (0 = only at the end)
    int eval_batches;              // train.eval_batches: validation micro-batches per eval
    int profile;                   // train.profile: time the step's phases (slower steps)
    // [data]
    char train_path[MP_PATH_MAX];  // data.train: token shard (.bin)
    char val_path[MP_PATH_MAX];    // data.val
    // [checkpoint]
    long ckpt_every;               // checkpoint.every (0 = only at the end)
    int ckpt_keep;                 // checkpoint.keep
    // [system]
    int threads;                   // system.threads: OpenMP threads, 0 = OpenMP default
    char backend[16];              // system.backend: cpu | cuda
    char precision[8];             // system.precision: fp32 | bf16 (cuda only: tables, GEMMs)
    char transport[16];            // system.transport: auto | mpi | nccl | mpi_staged
    float nccl_timeout;            // system.nccl_timeout: seconds an NCCL call may take
    float hang_timeout;            // system.hang_timeout: seconds without progress (0 = off)
} mp_config;

// Fills cfg with the defaults.
void mp_config_defaults(mp_config *cfg);
// Reads path, then applies overrides ("section.key=value", n_over of them), then validates.
// On any error writes one line to err ("FILE: key 'x.y': expected ...") and returns -1.
int mp_config_load(mp_config *cfg, const char *path, char **overrides, int n_over,
                   char *err, size_t err_len);
// Applies one "section.key=value" (also used by the INI reader). Returns -1 with err set.
int mp_config_set(mp_config *cfg, const char *section, const char *key, const char *value,
                  char *err, size_t err_len);
// Checks shapes and ranges (N a square, k <= n, dk even, ...). Returns -1 with err set.
int mp_config_validate(const mp_config *cfg, char *err, size_t err_len);
// Writes the resolved configuration as INI text (every key). Returns bytes written
// (like snprintf: may exceed len, then call again with a bigger buffer).
size_t mp_config_to_ini(const mp_config *cfg, char *buf, size_t len);
// Parses INI text (as written by mp_config_to_ini) into cfg, starting from defaults.
int mp_config_from_ini_string(mp_config *cfg, const char *text, const char *origin,
                              char *err, size_t err_len);
// FNV-1a hash of the resolved INI text: ranks compare it at start.
uint64_t mp_config_hash(const mp_config *cfg);
// The retrieval config of layer l's feed-forward, or NULL for a dense layer.
const mp_retrieval_config *mp_config_retrieval(const mp_config *cfg, int layer);
