// A product-key retrieval layer: PEER (experts u_e, v_e with an activation) or PKM
// (values v_e only). The math is in docs/model.md; the backend computes it.
#pragma once
#include <stdint.h>
#include "millipede/config.h"

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
    float *running_mean, *running_var;   // (H*dk), NULL without query BN

    // kept by forward for backward
    float *q;                         // (maxN, H*dk) query before BN
    float *qn;                        // (maxN, H*dk) query after BN (what scores use)
    float *bn_mean, *bn_rstd;         // (H*dk) the statistics the forward used
    int32_t *sel;                     // (maxN, H, k) selected expert id e = a*n + b
    int32_t *sel_a, *sel_b;           // (maxN, H, k) its sub-key indices
    float *gate;                      // (maxN, H, k) softmax gates
    float *pre;                       // (maxN, H, k) u_e . x (PEER)
    int last_N, last_train;

    // scratch for backward
    float *dgate;                     // (maxN, H, k)
    float *dpre;                      // (maxN, H, k)
    float *dq;                        // (maxN, H*dk)

    double *usage;                    // (N) z_e accumulators when enabled, else NULL
};

// Top-k of s (n) by score, ties to the lower index: vals (k) descending, idxs (k).
void mp_topk(const float *s, int n, int k, float *vals, long *idxs);
// Product-key top-k of one query: the k best of s1[a] + s2[b] over all n*n pairs, from the
// top-k of each half. vals (k) descending, experts (k) = a*n + b, sub_a/sub_b (k).
void mp_product_topk(const float *s1, const float *s2, int n, int k, float *vals, long *experts,
                     int32_t *sub_a, int32_t *sub_b);
