// Staging between the expert exchange (src/model/retrieval.c, host buffers and MPI) and a
// backend whose memory is not host memory (CUDA). On a host-memory backend (CPU) every call
// here is a pass-through: the tensors themselves are used and nothing is copied.
#pragma once
#include <stddef.h>
#include "model/retrieval.h"

// the layer's host copies, one per use
enum { MP_STAGE_SEL, MP_STAGE_GATE, MP_STAGE_X, MP_STAGE_Y, MP_STAGE_DY, MP_STAGE_DGATE,
       MP_STAGE_DX, MP_STAGE_N };

// A host view of backend memory p (bytes): p itself when be->host_memory, else the layer's
// host buffer `which`, filled from p when `copy` (else left as it is: the caller fills it).
void *mp_stage_host(mp_retrieval_layer *l, const mp_backend *be, int which, const void *p,
                    size_t bytes, int copy);
// Writes a host view back into backend memory dst; nothing to do when be->host_memory.
void mp_stage_back(const mp_backend *be, void *dst, const void *host, size_t bytes);
// be->experts_forward / experts_backward on the exchange's received batch (l->ex): direct on
// a host-memory backend; otherwise the batch is copied into device mirrors (kept from forward
// to backward), the op runs there, and its outputs are copied back into l->ex.
void mp_stage_experts_forward(mp_retrieval_layer *l, const mp_backend *be);
void mp_stage_experts_backward(mp_retrieval_layer *l, const mp_backend *be);
// One process on a device backend: nothing to exchange, so the experts run on the route's
// device tensors (records in selection order, token t's S selections forming slot t) and
// nothing goes through the host. Forward: y written. Backward: the experts' dx added into
// dx and l->dgate written (the route backward comes after). l->ex keeps only M, R and the
// statistics. tools/bench/bench_peer_cuda.c times the layer through these.
int mp_stage_single(const mp_retrieval_layer *l, const mp_backend *be);
void mp_stage_forward_single(mp_retrieval_layer *l, const mp_backend *be, float *y,
                             const float *x, int N, int train);
void mp_stage_backward_single(mp_retrieval_layer *l, const mp_backend *be, float *dx,
                              const float *dy, const float *x, int N);
void mp_stage_free(mp_retrieval_layer *l);
