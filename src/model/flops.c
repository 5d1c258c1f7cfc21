// Parameter and FLOP counts straight from the configuration (no model needed): used to
// report throughput and to build baselines of equal active compute (configs/dense.ini and
// configs/pkm.ini match configs/tiny.ini; tests/unit/test_config.c checks it).
#include "millipede/model.h"

// F of the dense MLP: 0 means 4*C (an unresolved config straight from mp_config_defaults).
static long dense_hidden(const mp_config *cfg) {
    return cfg->dense_hidden > 0 ? cfg->dense_hidden : 4L * cfg->d_model;
}

// Counts exactly the tensors of docs/model.md. The LM head is tied to wte, so it adds
// nothing; BatchNorm running statistics are state, not parameters.
long mp_model_param_count(const mp_config *cfg) {
    long C = cfg->d_model, V = cfg->vocab_size, T = cfg->context, F = dense_hidden(cfg);
    long total = V * C + T * C;   // wte (V, C), wpe (context, C)
    for (int l = 0; l < cfg->n_layers; l++) {
        total += 2 * C;                    // ln1.w, ln1.b
        total += 3 * C * C + 3 * C;        // attn.qkv.w (3C, C), attn.qkv.b (3C)
        total += C * C + C;                // attn.proj.w (C, C), attn.proj.b (C)
        total += 2 * C;                    // ln2.w, ln2.b
        const mp_retrieval_config *r = mp_config_retrieval(cfg, l);
        if (!r) {
            total += F * C + F + C * F + C;   // mlp.fc (F, C) + (F), mlp.proj (C, F) + (C)
            continue;
        }
        long HD = (long)r->heads * r->key_dim, n = r->n_sub, N = r->n_experts;
        total += HD * C;                          // wq (H*dk, C)
        if (r->query_bn) total += 2 * HD;         // bn.w, bn.b (H*dk)
        total += 2 * n * (r->key_dim / 2);        // k1, k2 (n, dk/2)
        total += (cfg->ffn[l] == MP_FFN_PEER ? 2 : 1) * N * C;   // PEER u, v; PKM v (N, C)
    }
    return total + 2 * C;   // lnf.w, lnf.b
}

// Forward FLOPs per token, a multiply-add counted as 2. With T = context, per block:
//   attention   qkv 2*C*3C + proj 2*C*C
//               + scores q.k and values att.v: 2*2*T*C, counted at the full context length T
//                 for every token (the causal average would be half; the convention of
//                 counting the full T keeps the number independent of the position)
//   dense MLP   2*C*F + 2*F*C
//   PEER        query 2*C*(H*dk) + sub-key scores 2*H*n*dk (both halves of dk/2 against n keys)
//               + experts H*k*(2C + 2C): u_e.x, then g*sigma*v_e added into y
//   PKM         query 2*C*(H*dk) + sub-key scores 2*H*n*dk + values H*k*2C
// plus the LM head 2*C*V once. Left out as small next to these: layer norms, BatchNorm,
// softmaxes, GELU, the k*k candidate sums and top-k selection, residual adds, embeddings.
double mp_model_flops_per_token(const mp_config *cfg) {
    double C = cfg->d_model, V = cfg->vocab_size, T = cfg->context, F = (double)dense_hidden(cfg);
    double flops = 2.0 * C * V;   // LM head
    for (int l = 0; l < cfg->n_layers; l++) {
        flops += 2.0 * C * 3.0 * C + 2.0 * C * C;   // qkv, proj
        flops += 2.0 * 2.0 * T * C;                 // scores and weighted values, all heads
        const mp_retrieval_config *r = mp_config_retrieval(cfg, l);
        if (!r) {
            flops += 2.0 * C * F + 2.0 * F * C;
            continue;
        }
        double H = r->heads, dk = r->key_dim, n = r->n_sub, k = r->topk;
        flops += 2.0 * C * H * dk;    // query projection
        flops += 2.0 * H * n * dk;    // s1 and s2: each n keys of dk/2 per head
        if (cfg->ffn[l] == MP_FFN_PEER) flops += H * k * (2.0 * C + 2.0 * C);
        else flops += H * k * 2.0 * C;
    }
    return flops;
}
