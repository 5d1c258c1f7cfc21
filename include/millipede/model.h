// The transformer language model: parameter table, forward, backward.
// The math is specified in docs/model.md; tools/ref/millipede_ref.py is the independent
// JAX implementation of the same model that the tests compare against.
#pragma once
#include <stddef.h>
#include <stdint.h>
#include "millipede/backend.h"
#include "millipede/comm.h"
#include "millipede/config.h"

// Parameters live in one contiguous buffer per group, the weight-decayed tensors first, so
// the gradient all-reduce is one call per group and AdamW one per group and decay class
// (checkpoints store each tensor by name):
//   DENSE   replicated: embeddings, attention, norms, dense MLPs, W_q, query BN affine
//   KEYS    replicated: the product-key sub-key tables K1, K2 (their own lr / weight decay)
//   EXPERTS sharded by sub-key ownership: PEER U, V and PKM V (their own lr / weight decay)
typedef enum { MP_GROUP_DENSE = 0, MP_GROUP_KEYS = 1, MP_GROUP_EXPERTS = 2, MP_N_GROUPS = 3 } mp_group;

#define MP_MAX_TENSORS (16 + 16 * MP_MAX_LAYERS)

typedef struct {
    char name[48];        // e.g. "h2.peer.u" (docs/model.md lists them all)
    int ndim;             // 1 or 2
    long shape[2];        // local shape: experts hold rows [row_start, row_start+shape[0])
    long global_rows;     // shape[0] over all ranks (== shape[0] unless sharded)
    long row_start;       // first global row held here
    mp_group group;
    size_t offset;        // in floats, within its group's buffer (decayed tensors first)
    size_t numel;         // local element count
    int decay;            // 1: weight decay applies
} mp_tensor;

typedef struct mp_model mp_model;

// Builds the model for at most B sequences of at most T = cfg->context tokens. Its
// parameters are zero: mp_model_init draws the initial values, or a checkpoint is loaded
// (so a resume or an eval does not pay for drawing values it overwrites).
// The single-rank model holds every expert row (mp_model_create does that).
mp_model *mp_model_create(const mp_config *cfg, const mp_backend *be, int B);
// The model of rank `part` of `n_parts`: it holds the expert rows of the first-half
// sub-keys a in [floor(part*n/n_parts), floor((part+1)*n/n_parts)) (docs/design.md, Sharding).
mp_model *mp_model_create_part(const mp_config *cfg, const mp_backend *be, int B, int part,
                               int n_parts);
// The model of rank comm->rank of comm->size for data-parallel training: its retrieval
// layers exchange activations with the owners of the experts through comm, which also
// sums the gradients; comm's payload memory must be be's (host for the CPU backend, device
// for CUDA: mp_transport_open picks such a transport).
mp_model *mp_model_create_sharded(const mp_config *cfg, const mp_backend *be, int B, mp_comm *comm);
mp_comm *mp_model_comm(const mp_model *m);   // NULL for a single-process model
// The tokenizer the model was trained with, which checkpoints and model files carry:
// NULL for bytes. set takes ownership (and frees the previous one).
struct mp_tokenizer;
const struct mp_tokenizer *mp_model_tokenizer(const mp_model *m);
void mp_model_set_tokenizer(mp_model *m, struct mp_tokenizer *t);
void mp_model_free(mp_model *m);
// Deterministic init from cfg->seed: each value is a function of (seed, tensor name,
// global element index) only.
void mp_model_init(mp_model *m);

// Parameter table and buffers.
int mp_model_n_tensors(const mp_model *m);
const mp_tensor *mp_model_tensor(const mp_model *m, int i);
const mp_tensor *mp_model_find(const mp_model *m, const char *name);
float *mp_model_params(mp_model *m, mp_group g);   // group buffer (backend memory)
float *mp_model_grads(mp_model *m, mp_group g);
size_t mp_model_group_size(const mp_model *m, mp_group g);  // floats
// system.precision = bf16: the bf16 copy of tensor t that the GEMMs (dense group) or the
// expert kernels (experts group) read (backend memory, t->numel values in t's layout: the
// copy is one buffer per group at the masters' offsets, so the copy of a range of tensors
// starts at its first tensor's); NULL in fp32, on the CPU backend and for a tensor of the
// keys group. Taking mp_model_params(m, g) makes group g's copy stale, and the next forward
// then rewrites it whole; the optimizer, which writes the copy of every master it changes
// in the same pass (adamw's p_bf16), marks it fresh instead.
uint16_t *mp_model_bf16(mp_model *m, const mp_tensor *t);
// 1: group g's bf16 copy holds its masters rounded (0 when there is no copy).
int mp_model_bf16_fresh(const mp_model *m, mp_group g);
// The caller has rewritten group g's copy of every master it changed since the copy was
// last fresh; the next forward reads it as it is (nothing when there is no copy).
void mp_model_bf16_set_fresh(mp_model *m, mp_group g);
// The router state, one buffer (backend memory): for each retrieval layer in block order,
// with query BN its running_mean (H*dk) then running_var (H*dk), then with
// balance_rate > 0 its sub-key balance biases k1_bias (H, n) then k2_bias (H, n).
float *mp_model_router_state(mp_model *m);
size_t mp_model_router_state_size(const mp_model *m);
const mp_config *mp_model_config(const mp_model *m);
const mp_backend *mp_model_backend(const mp_model *m);

// Forward over inputs (B,T) int32. With targets, returns the mean cross-entropy (nats per
// token) and keeps what backward needs; without, returns 0. train = 1 uses BatchNorm batch
// statistics (and updates the running ones), 0 the running statistics.
float mp_model_forward(mp_model *m, const int32_t *inputs, const int32_t *targets, int B, int T,
                       int train);
// Logits (B,T,V) of the last forward (backend memory).
const float *mp_model_logits(const mp_model *m);
// Zeroes every gradient. The expert gradients (dU, dV) read zero from the next backward
// on: that backward writes the rows it touches and zeroes the others that hold values,
// so no pass over the whole tables is made. Write expert gradients only through the
// backward (a row written from outside may not be zeroed).
void mp_model_zero_grad(mp_model *m);
// The per-row squares of the expert gradients of the retrieval layer in block (NULL and
// *rows = 0 when block has none): (*rows) double, backend memory, row r = dU[r]^2 + dV[r]^2
// summed, filled by every backward, valid after a step's last micro-batch (see
// experts_backward in backend.h); a fatal error between mp_model_zero_grad and the next
// backward, when it still holds the step before's.
const double *mp_model_expert_row_ss(const mp_model *m, int block, int64_t *rows);
// train.expert_optimizer = lazy_adamw: the local rows of expert tensor t (sorted, distinct,
// backend memory, in *rows) that received at least one record (selection) in a backward
// since the last mp_model_zero_grad; returns their count. -1 (rows NULL) for any other
// optimizer or a tensor outside the experts group.
int64_t mp_model_touched_rows(mp_model *m, const mp_tensor *t, const int32_t **rows);
// Backward of loss_scale * mean loss of the last forward; gradients accumulate.
void mp_model_backward(mp_model *m, float loss_scale);
// Sums the replicated groups' gradients (dense, keys) over the ranks of a sharded model;
// nothing for a single process. Expert gradients never cross ranks.
void mp_model_allreduce_grads(mp_model *m);

// Phase timing (train.profile): when enabled, the model synchronizes the backend at each
// boundary between phases of a step and adds the wall time since the previous boundary to
// the phase that ran; the device's queue is drained at every boundary, so the steps run
// slower, and each phase's time is its own. Forward and backward phases are kinds
// (MP_PHASE_EMBED .. MP_PHASE_LOSS) offset by MP_PHASE_KINDS in backward; the training loop
// marks the all-reduce and the optimizer.
typedef enum {
    MP_PHASE_EMBED,        // token and position embeddings
    MP_PHASE_NORM,         // LayerNorms and residual adds
    MP_PHASE_ATTN_MATMUL,  // the attention's qkv and output projections
    MP_PHASE_ATTENTION,    // the attention itself
    MP_PHASE_MLP,          // dense MLPs (both matmuls and the activation)
    MP_PHASE_PEER,         // PEER / PKM layers (route, exchange, experts)
    MP_PHASE_LM_HEAD,      // the output projection to the vocabulary
    MP_PHASE_LOSS,         // cross-entropy (forward: and the loss to the host)
    MP_PHASE_KINDS,
    MP_PHASE_ALLREDUCE = 2 * MP_PHASE_KINDS,
    MP_PHASE_OPTIMIZER,    // gradient norm, clipping, AdamW (and the bf16 copy)
    MP_PHASE_N
} mp_phase;
#define MP_PHASE_NONE (-1)
void mp_model_profile_enable(mp_model *m, int on);
// Ends the phase running (if any) and starts `phase` (MP_PHASE_NONE: none); nothing unless
// profiling is enabled.
void mp_model_phase(mp_model *m, int phase);
// Seconds per phase (MP_PHASE_N) since the last reset; the reset also ends any phase.
const double *mp_model_phase_seconds(const mp_model *m);
// With a backend that has a kernel timer (CUDA): the device time of each kernel, GEMM,
// copy, ... since the last reset, per (phase, launch site), longest first, at most max rows
// (backend.h kernel_times); 0 rows without profiling or without a timer. Reading resets.
int mp_model_kernel_times(const mp_model *m, mp_kernel_time *out, int max);
void mp_model_phase_reset(mp_model *m);
const char *mp_phase_name(int phase);   // "fwd.attention", "bwd.peer", "optimizer", ...

// Expert usage (paper Table 2): when enabled, every forward adds each selected expert's
// gate to z_e of its layer. usage = fraction with z_e > 0; unevenness = KL(z/|z| || uniform).
void mp_model_usage_enable(mp_model *m, int on);
int mp_model_n_retrieval(const mp_model *m);
// Layer index (block) of the i-th retrieval layer, its z (global N floats, host), and N.
int mp_model_retrieval_block(const mp_model *m, int i);
const double *mp_model_usage(const mp_model *m, int i, long *n_experts);

// What the expert exchange of a retrieval layer measured since the last reset (the
// training loop reports it per step in metrics.jsonl).
typedef struct {
    double bytes_sent, bytes_recv;   // to and from other ranks, all payloads and counts
    double bytes_min;                // the least any scheme moves for the same selections:
                                     // x, y, dy, dx once per (token, remote owner) and a row
                                     // index, gate and gate gradient per remote selection
    double selections;               // records this rank's experts served
    double seconds;                  // wall time in the transport calls (waiting included)
} mp_exchange_stats;
// The i-th retrieval layer's statistics; the caller reads and resets them.
mp_exchange_stats *mp_model_exchange_stats(mp_model *m, int i);

// Active floating-point operations per token of the forward pass (matmuls, attention,
// retrieval, experts); used to match baselines and to report throughput.
double mp_model_flops_per_token(const mp_config *cfg);
// Total parameter count (global, over all ranks).
long mp_model_param_count(const mp_config *cfg);
