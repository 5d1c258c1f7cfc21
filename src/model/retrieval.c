// One PEER / PKM layer across ranks (docs/design.md, "Sharding" and "The exchange"):
// the route where the token lives (src/model/route.c), then the exchange with the owners
// of the selected experts (src/model/exchange.c). Backward mirrors it: the exchange
// returns the experts' dx parts and the gate gradients, then the route's backward runs.
#include <stdlib.h>
#include <string.h>
#include "core/log.h"
#include "model/retrieval.h"
#include "model/route.h"

// z_e += gate of every selection (paper Table 2), on the host
static void count_usage(mp_retrieval_layer *l, const mp_backend *be, int N) {
    size_t NS = (size_t)N * l->rc->heads * l->rc->topk;
    const int32_t *sel = l->sel;
    const float *gate = l->gate;
    if (!be->host_memory) {
        l->sel_h = mp_grow(l->sel_h, &l->cap_sel_h, NS * sizeof(int32_t));
        l->gate_h = mp_grow(l->gate_h, &l->cap_gate_h, NS * sizeof(float));
        be->to_host(l->sel_h, l->sel, NS * sizeof(int32_t));
        be->to_host(l->gate_h, l->gate, NS * sizeof(float));
        sel = l->sel_h;
        gate = l->gate_h;
    }
    for (size_t o = 0; o < NS; o++) l->usage[sel[o]] += gate[o];
}

void mp_retrieval_forward(mp_retrieval_layer *l, const mp_backend *be, float *y, const float *x,
                          int N, int train) {
    mp_route_forward(l, be, x, N, train);
    mp_exchange_forward(&l->ex, l, y, x, N);
    if (l->usage) count_usage(l, be, N);
    l->last_N = N;
    l->last_train = train;
}

void mp_retrieval_backward(mp_retrieval_layer *l, const mp_backend *be, float *dx, const float *dy,
                           const float *x, const uint16_t *x_bf16, int N) {
    if (N != l->last_N) mp_fatal("retrieval backward on %d rows after a forward on %d", N, l->last_N);
    mp_exchange_backward(&l->ex, l, dx, dy, x, N);
    mp_route_backward(l, be, dx, x, x_bf16, N);
}

void mp_retrieval_exchange_init(mp_retrieval_layer *l, const mp_backend *be, mp_comm *comm) {
    l->comm = comm;
    mp_exchange_init(&l->ex, comm, be);
}

void mp_retrieval_exchange_free(mp_retrieval_layer *l) {
    free(l->sel_h);
    free(l->gate_h);
    l->sel_h = NULL;
    l->gate_h = NULL;
    mp_exchange_free(&l->ex);
}
