// Internals shared by the model's own files and white-box tests.
#pragma once
#include "millipede/model.h"
#include "model/retrieval.h"

// The retrieval layer of block `block`, or NULL for a dense block.
mp_retrieval_layer *mp_model_retrieval_layer(mp_model *m, int block);
// The feed-forward branch of block l (dense MLP, PEER or PKM): y (N, C) = FFN(x (N, C)),
// and its backward (dx written, parameter gradients += ...). The model calls these; the
// layer tests call them directly. x_bf16, dy_bf16: the bf16 twins of x and dy (backend.h),
// or NULL (then the dense MLP's GEMMs round them in bf16 mode).
void mp_model_ffn_forward(mp_model *m, int l, float *y, const float *x, const uint16_t *x_bf16,
                          int N, int train);
void mp_model_ffn_backward(mp_model *m, int l, float *dx, const float *dy, const uint16_t *dy_bf16,
                           const float *x, const uint16_t *x_bf16, int N);
// For the tests: frees the model's bf16 twins (backend.h) and gives it the fp32 tensors that
// bf16 mode keeps only as twins (dlogits, dfch, dqkv, the LayerNorm and GELU outputs
// before GEMMs), so that bf16 mode's GEMMs round their activation operands themselves (the dense
// weights' bf16 copies stay). The twins hold exactly those roundings: a model with them and
// one without must train bit for bit alike.
void mp_model_without_bf16_twins(mp_model *m);

