// The small model that test_checkpoint and test_model_file save and load. Include after
// <cmocka.h> (validate fails the test through fail_msg).
#pragma once
#include "millipede/config.h"

// vocab 32, context 8, C 16, three blocks: dense, PEER, PKM; N = 64 (n = 8), H 2, k 3, dk 4.
static inline void small_config(mp_config *c) {
    mp_config_defaults(c);
    c->vocab_size = 32;
    c->context = 8;
    c->d_model = 16;
    c->n_layers = 3;
    c->n_heads = 2;
    c->dense_hidden = 24;
    c->batch_size = 2;
    c->ffn[0] = MP_FFN_DENSE;
    c->ffn[1] = MP_FFN_PEER;
    c->ffn[2] = MP_FFN_PKM;
    mp_retrieval_config *rcs[2] = {&c->peer, &c->pkm};
    for (int i = 0; i < 2; i++) {
        rcs[i]->n_experts = 64;
        rcs[i]->n_sub = 8;
        rcs[i]->heads = 2;
        rcs[i]->topk = 3;
        rcs[i]->key_dim = 4;
        rcs[i]->query_bn = 1;
    }
}

static inline void validate(const mp_config *c) {
    char err[512];
    if (mp_config_validate(c, err, sizeof err) != 0) fail_msg("config: %s", err);
}
