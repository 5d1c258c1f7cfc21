// A product-key retrieval layer: PEER (experts u_e, v_e with an activation) or PKM
// (values v_e only). The math is in docs/model.md; the backend computes it.
#pragma once
#include <stdint.h>
#include "millipede/backend.h"
#include "millipede/comm.h"
#include "millipede/config.h"
#include "model/exchange.h"

struct mp_retrieval_layer {
    mp_ffn_kind kind;                 // MP_FFN_PEER or MP_FFN_PKM
    const mp_retrieval_config *rc;
    int C;                            // model width
    int maxN;                         // most token rows per forward
    long row_start, rows;             // expert rows held here: [row_start, row_start+rows)

    // parameters (backend memory, inside the model's group buffers) and their gradients
    float *wq, *dwq;                  // (H*dk, C)
    float *bn_w, *bn_b, *dbn_w, *dbn_b;  // (H*dk), NULL without query BN
    float *k1, *k2, *dk1, *dk2;       // (n, dk/2)
    float *u, *du;                    // (rows, C), PEER only
    float *v, *dv;                    // (rows, C)
    // system.precision = bf16: bfloat16 copies of u and v, what the expert kernels read
    // (fp32 accumulation; u, v stay the fp32 master weights). NULL in fp32 mode.
    const uint16_t *u_bf16, *v_bf16;  // (rows, C)
    const uint16_t *wq_bf16;          // (H*dk, C) W_q's bf16 copy, which its backward GEMM reads
    float *running_mean, *running_var;   // (H*dk), NULL without query BN
    // Sub-key balance biases (peer.balance_rate > 0, else NULL): k1 biases (H, n) then k2
    // biases (H, n), added to each head's sub-key scores for the selection only (the gates
    // use the plain scores), moved toward equal use after every training forward.
    float *key_bias;                  // (2, H, n) in the model's router state
    int32_t *key_counts;              // (2, H, n) backend memory: selections per sub-key
    int32_t *key_counts_i32;          // (2, H, n) host copy of key_counts
    double *key_counts_host;          // (2*H*n + 1) host: counts and the token count, summed
    float *key_bias_host;             // (2, H, n) host copy of key_bias

    // kept by forward for backward
    float *q;                         // (maxN, H*dk) query before BN
    float *qn;                        // (maxN, H*dk) query after BN (what scores use);
                                      // unused without query BN: the scores read q
    float *bn_mean, *bn_rstd;         // (H*dk) the statistics the forward used
    double bn_count;                  // tokens over all ranks behind the batch statistics
    // query BN statistics on their way through the all-reduce (src/model/route.c)
    double *bn_sums;                  // (3, H*dk) backend memory: this rank's column sums
                                      // (2, H*dk), then the global mean (H*dk) they centre on
    double *bn_sums_host;             // (2*H*dk + 1) host: the sums being reduced, then count
    float *bn_host;                   // (4, H*dk) host: running mean, running var, mean, rstd
    int32_t *sel;                     // (maxN, H, k) selected expert id e = a*n + b
    int32_t *sel_a, *sel_b;           // (maxN, H, k) its sub-key indices
    float *gate;                      // (maxN, H, k) softmax gates
    int last_N, last_train;

    // scratch for backward
    float *dgate;                     // (maxN, H, k) gate gradients, then score gradients
    float *dq;                        // (maxN, H*dk)

    double *usage;                    // (N) z_e accumulators when enabled, else NULL

    // dU, dV are not zeroed by mp_model_zero_grad: it sets grad_overwrite, and the step's
    // first expert backward writes the rows it touches and zeroes the other rows that
    // grad_dirty marks (the backend's experts_backward)
    uint8_t *grad_dirty;              // (rows) backend memory: 1 where dU, dV may be nonzero
    int grad_overwrite;               // 1: the next expert backward is the step's first
    double *row_ss;                   // (rows) backend memory or NULL: per row, dU^2 + dV^2
                                      // (mp_model_expert_row_ss)

    // train.expert_optimizer = lazy_adamw (docs/model.md, "Lazy AdamW"), else all NULL:
    // the rows of this shard that received a record in a backward since the last
    // mp_model_zero_grad, each listed once; the optimizer and the sparse gradient zeroing
    // read them
    uint8_t *touched_mark;            // (rows) host: 1 if the row is listed
    int32_t *touched_h;               // (rows) host: the touched rows, sorted once listed
    int64_t n_touched;
    int touched_ready;                // 1: touched_h sorted and uploaded to touched_dev
    int32_t *touched_dev;             // (rows) backend memory: the sorted list

    mp_comm *comm;                    // the transport; NULL: a single process
    mp_exchange ex;
    int32_t *sel_h;                   // (maxN, H, k) host copies of sel and gate for the
    float *gate_h;                    // usage counters (device backends)
    size_t cap_sel_h, cap_gate_h;
};

// The layer across ranks: route, then the exchange (src/model/retrieval.c).
void mp_retrieval_forward(mp_retrieval_layer *l, const mp_backend *be, float *y, const float *x,
                          int N, int train);
// x_bf16: x's bf16 twin (backend.h) for the query projection's dW_q GEMM, or NULL
void mp_retrieval_backward(mp_retrieval_layer *l, const mp_backend *be, float *dx, const float *dy,
                           const float *x, const uint16_t *x_bf16, int N);
void mp_retrieval_exchange_init(mp_retrieval_layer *l, const mp_backend *be, mp_comm *comm);
void mp_retrieval_exchange_free(mp_retrieval_layer *l);
