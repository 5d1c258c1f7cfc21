// Where the token lives, and where the rows live: the retrieval layer's backend ops and
// the collectives between them (src/model/route.c). The exchange (src/model/exchange.c)
// calls these; the backend ops themselves never talk to other ranks.
#pragma once
#include <stdint.h>
#include "model/retrieval.h"

// Route: queries, query BatchNorm (training: statistics over the global batch), sub-key
// scores, product-key top-k and gates into l->sel, l->sel_a, l->sel_b, l->gate (N, H, k);
// in training with balance biases, the biases' update from the global sub-key counts.
void mp_route_forward(mp_retrieval_layer *l, const mp_backend *be, const float *x, int N,
                      int train);
// ...and its backward from the gate gradients in l->dgate (N, H, k): dx (N, C) += the
// query path's part; dW_q, the BN affine, dK1, dK2 += this batch's part. x_bf16: x's bf16
// twin (backend.h), or NULL.
void mp_route_backward(mp_retrieval_layer *l, const mp_backend *be, float *dx, const float *x,
                       const uint16_t *x_bf16, int N);
// The layer's experts on a batch of M tokens x (M, C) and R records (slot, local row, gate)
// grouped by slot (backend memory): y (M, C) written, pre (R) kept for backward.
void mp_experts_forward(mp_retrieval_layer *l, const mp_backend *be, float *y, const float *x,
                        int64_t M, const int64_t *slot_start, const int32_t *slot,
                        const int32_t *row, const float *gate, float *pre, int64_t R);
// dx (M, C) and dgate (R) written; the layer's dU, dV += this batch's part.
void mp_experts_backward(mp_retrieval_layer *l, const mp_backend *be, float *dx, float *dgate,
                         const float *dy, const float *x, int64_t M, const int64_t *slot_start,
                         const int32_t *slot, const int32_t *row, const float *gate,
                         const float *pre, int64_t R);
