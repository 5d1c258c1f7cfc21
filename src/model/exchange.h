// The expert exchange of one retrieval layer: a pipeline of named stages over a transport
// (include/millipede/comm.h), written once for every backend and transport. The table in
// docs/design.md, "The exchange", lists each stage: what moves, in which buffer, by which
// call.
//   forward:  plan, counts, pack, send, experts, return, sum
//   backward: pack (dy), send, experts, return (dx parts, gate gradients), sum
// Payload (x, y, dy, dx, gates, gate gradients, pre-activations) stays in backend memory,
// which is what the transport's payload calls take (device buffers for nccl and
// mpi_staged). Only routing indices visit the host: the selected expert ids, from which the
// plan is built, and the received records, from which the owner's slots are built.
// With one rank the plan is the identity, nothing moves, and the experts run on the route's
// own tensors (records in selection order, token t's selections forming slot t).
#pragma once
#include <stddef.h>
#include <stdint.h>
#include "dist/shard_plan.h"
#include "millipede/backend.h"
#include "millipede/comm.h"
#include "millipede/model.h"

typedef struct mp_retrieval_layer mp_retrieval_layer;

typedef struct {   // a grow-only buffer in backend memory
    void *p;
    size_t cap;
} mp_xbuf;

typedef struct {
    mp_comm *comm;                    // the transport; NULL: a single process
    const mp_backend *be;
    int P, me;
    mp_shard_plan plan;               // host: this rank's selections grouped by owner
    int64_t *counts;                  // (4P) host: (tokens, records) sent to, received from each peer
    int64_t *recv_tok, *recv_rec;     // (P) host: tokens and records received from each peer
    int64_t M, R;                     // the owner's batch: tokens and records received
    int64_t identity_N;               // one rank: the N that slot_start and slot were built for

    // host: routing indices only
    int32_t *sel_h;                   // (N, S) the selected expert ids (device backends)
    int32_t *rec_h;                   // (n_rec, 2) (slot, row) sent; then (R, 2) received
    int32_t *slot_h, *row_h;          // (R) the owner's records
    int64_t *slot_start_h;            // (M + 1)
    size_t cap_sel_h, cap_rec_h, cap_slot_h, cap_row_h, cap_slot_start_h;

    // backend memory
    mp_xbuf tok_list, rec_sel;        // (n_tok), (n_rec) the plan's indices
    mp_xbuf rec_send, rec_recv;       // (n_rec, 2), (R, 2) records (slot, row)
    mp_xbuf x_send;                   // (n_tok, C) x rows packed by owner; dy in backward
    mp_xbuf gate_send;                // (n_rec) gates packed by owner
    mp_xbuf x_recv, gate_recv;        // (M, C), (R) the owner's batch
    mp_xbuf slot_start, slot, row;    // (M + 1), (R), (R)
    mp_xbuf pre;                      // (R) pre-activations, kept for backward
    mp_xbuf y_recv;                   // (M, C) partial outputs; dy in backward
    mp_xbuf y_back;                   // (n_tok, C) partial outputs returned; dx parts in backward
    mp_xbuf dx_recv, dgate_recv;      // (M, C), (R) the owner's backward results
    mp_xbuf dgate_back;               // (n_rec) gate gradients returned
    mp_exchange_stats stats;
} mp_exchange;

// comm: the transport (NULL or one rank: the identity). Its payload memory must be be's.
void mp_exchange_init(mp_exchange *e, mp_comm *comm, const mp_backend *be);
void mp_exchange_free(mp_exchange *e);
// y (N, C) = the layer's experts applied to x (N, C) for the selections in l->sel and
// l->gate (N, H, k), wherever their rows live.
void mp_exchange_forward(mp_exchange *e, mp_retrieval_layer *l, float *y, const float *x, int N);
// dx (N, C) += the experts' part; l->dgate (N, H, k) written; the owners' dU, dV accumulate.
void mp_exchange_backward(mp_exchange *e, mp_retrieval_layer *l, float *dx, const float *dy,
                          const float *x, int N);
// The pre-activations of the last forward (R of them, backend memory, in the owner's record
// order); for tests.
const float *mp_exchange_pre(const mp_exchange *e, int64_t *R);
