// A product-key retrieval layer: PEER (experts u_e, v_e with an activation) or PKM
// (values v_e only). The math is in docs/model.md; the backend computes it.
#pragma once
#include <stdint.h>
#include "dist/shard_plan.h"
#include "millipede/backend.h"
#include "millipede/comm.h"
#include "millipede/config.h"

typedef struct {   // what the expert exchange measured since the last reset
    double bytes_sent, bytes_recv;   // to and from other ranks, all payloads
    double bytes_min;                // the least any scheme moves for the same selections:
                                     // x, y, dy, dx once per (token, remote owner) and a row
                                     // index, gate and gate gradient per remote selection
    double selections;               // records this rank's experts served
    double seconds;                  // wall time in the transport calls (waiting included)
} mp_exchange_stats;

// The expert exchange of one layer: the plan, and the owner side's received batch.
// Buffers are host memory that grows as needed (grow() in retrieval.c).
typedef struct {
    mp_route_plan plan;
    int64_t *i64;                    // (4P) counts scratch
    int64_t *recv_tok, *recv_rec;    // (P) tokens and records received from each rank
    int64_t M, R;                    // received tokens and records
    float *x_send, *y_back, *x_recv, *y_recv, *dx_recv, *gate, *pre, *dgate, *dgate_back;
    int32_t *rec_send, *rec_recv, *slot, *row;
    int64_t *slot_start;
    size_t cap_x_send, cap_y_back, cap_x_recv, cap_y_recv, cap_dx_recv, cap_gate, cap_pre,
        cap_dgate, cap_dgate_back, cap_rec_send, cap_rec_recv, cap_slot, cap_row, cap_slot_start;
    mp_exchange_stats stats;
} mp_exchange;

// Scratch of the CPU retrieval ops, kept across steps (host memory, grown as needed).
typedef struct {
    float *s1, *s2;                  // (rows, n) sub-key scores of a chunk of queries
    float *bs1, *bs2;                // (rows, n) the same plus the balance biases
    int64_t *count, *begin, *items;  // bucketing of records by expert row
    int32_t *touched;
    float *dpre;                     // (R) d(pre-activation) per record
    size_t cap_s1, cap_s2, cap_bs1, cap_bs2, cap_count, cap_begin, cap_items, cap_touched, cap_dpre;
} mp_retrieval_scratch;

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
    float *qn;                        // (maxN, H*dk) query after BN (what scores use)
    float *bn_mean, *bn_rstd;         // (H*dk) the statistics the forward used
    double bn_count;                  // tokens over all ranks behind the batch statistics
    int32_t *sel;                     // (maxN, H, k) selected expert id e = a*n + b
    int32_t *sel_a, *sel_b;           // (maxN, H, k) its sub-key indices
    float *gate;                      // (maxN, H, k) softmax gates
    int last_N, last_train;

    // scratch for backward
    float *dgate;                     // (maxN, H, k) gate gradients, then score gradients
    float *dq;                        // (maxN, H*dk)

    double *usage;                    // (N) z_e accumulators when enabled, else NULL

    mp_comm *comm;                    // NULL: a single process
    mp_exchange ex;
    mp_retrieval_scratch scratch;
    struct mp_retrieval_stage *stage; // host copies and device mirrors for a backend whose
                                      // memory is not host memory (retrieval_stage.c)
};

// The layer across ranks: route, exchange, experts, exchange back (src/model/retrieval.c).
void mp_retrieval_forward(mp_retrieval_layer *l, const mp_backend *be, float *y, const float *x,
                          int N, int train);
void mp_retrieval_backward(mp_retrieval_layer *l, const mp_backend *be, float *dx, const float *dy,
                           const float *x, int N);
void mp_retrieval_exchange_init(mp_retrieval_layer *l, mp_comm *comm);
void mp_retrieval_exchange_free(mp_retrieval_layer *l);

// Top-k of s (n) by score, ties to the lower index: vals (k) descending, idxs (k).
void mp_topk(const float *s, int n, int k, float *vals, long *idxs);
// Product-key top-k of one query: the k best of s1[a] + s2[b] over all n*n pairs, from the
// top-k of each half. vals (k) descending, experts (k) = a*n + b, sub_a/sub_b (k).
void mp_product_topk(const float *s1, const float *s2, int n, int k, float *vals, long *experts,
                     int32_t *sub_a, int32_t *sub_b);
