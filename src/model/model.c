// The transformer: parameter table, activations, forward and backward side by side.
// docs/model.md is the specification; every op runs through the backend table.
#include "millipede/model.h"
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "core/log.h"
#include "core/rng.h"
#include "core/watchdog.h"
#include "millipede/tokenizer.h"
#include "model/model_private.h"

typedef enum { INIT_NORMAL, INIT_UNIFORM, INIT_ONES, INIT_ZEROS } init_kind;

typedef struct {   // parameter (or gradient) pointers of one block
    float *ln1w, *ln1b, *qkvw, *qkvb, *projw, *projb, *ln2w, *ln2b;
    float *fcw, *fcb, *fcprojw, *fcprojb;   // dense FFN only
} block_params;

typedef struct {   // what one block keeps for backward
    float *res_in;                // (N, C) residual stream entering the block
    float *ln1, *ln1_mean, *ln1_rstd;   // (N, C), (N), (N)
    float *qkv;                   // (N, 3C)
    float *atty;                  // (N, C) attention output before the projection
    float *att;                   // the backend's attention state (backend.h)
    float *res_mid;               // (N, C) residual after attention
    float *ln2, *ln2_mean, *ln2_rstd;   // (N, C), (N), (N)
    float *fch, *fch_gelu;        // (N, F) dense FFN only
    // bf16 twins of the GEMM inputs (backend.h), NULL in fp32 (and fch_gelu_bf16 in a PEER
    // / PKM block). bf16 mode keeps ln1, fch_gelu and a dense block's ln2 only as twins
    // (those fp32 tensors are NULL): GEMMs are all that read them. atty stays (the attention
    // backward's D reads it), and so does a PEER block's ln2 (its route and experts).
    uint16_t *ln1_bf16, *atty_bf16, *ln2_bf16;   // (N, C)
    uint16_t *fch_gelu_bf16;      // (N, F)
} block_acts;

struct mp_model {
    mp_tokenizer *tokenizer;   // NULL: bytes (owned)
    mp_config cfg;
    const mp_backend *be;
    int B, T;                     // most sequences and tokens per forward
    int n_tensors;
    mp_tensor tensors[MP_MAX_TENSORS];
    init_kind init[MP_MAX_TENSORS];
    float init_scale[MP_MAX_TENSORS];
    size_t group_size[MP_N_GROUPS];
    float *params[MP_N_GROUPS], *grads[MP_N_GROUPS];
    float *router_state;
    size_t state_size;

    float *wte, *wpe, *lnfw, *lnfb;
    float *dwte, *dwpe, *dlnfw, *dlnfb;
    block_params p[MP_MAX_LAYERS], g[MP_MAX_LAYERS];
    mp_retrieval_layer *ret[MP_MAX_LAYERS];   // NULL for dense blocks
    int n_ret;
    int ret_block[MP_MAX_LAYERS];

    // activations
    int32_t *inputs, *targets;    // (B, T)
    block_acts a[MP_MAX_LAYERS];
    float *res_out;               // (N, C) residual after the last block
    float *lnf, *lnf_mean, *lnf_rstd;   // (N, C), (N), (N)
    float *logits;                // (N, V)
    float *ce_stats;              // (N, 2) each row's softmax (max, 1 / sum)
    float *losses;                // (N)
    float *ffn_out;               // (N, C) scratch
    int last_B, last_T, has_targets;

    // gradient scratch
    float *dlogits;               // (N, V)
    float *dres;                  // (N, C) gradient of the residual stream
    float *dln;                   // (N, C) gradient of a LayerNorm output
    float *datty;                 // (N, C)
    float *dqkv;                  // (N, 3C)
    float *dfch, *dfch_gelu;      // (N, F)
    // bf16 mode: the twins the backward's GEMMs read (backend.h); dlogits is then NULL, as
    // the LM head's GEMMs need only the twin, and so are lnf (the final LayerNorm's output),
    // dfch and dqkv (their bias gradients come from the ops that write them)
    uint16_t *lnf_bf16;           // (N, C)
    uint16_t *dlogits_bf16;       // (N, V)
    uint16_t *dres_bf16;          // (N, C)
    uint16_t *dqkv_bf16;          // (N, 3C)
    uint16_t *dfch_bf16;          // (N, F)
    int usage_on;
    int lazy_experts;             // train.expert_optimizer = lazy_adamw: track touched rows
    mp_comm *comm;                // NULL: a single process
    // system.precision = bf16: the dense and experts groups rounded to bf16, what the GEMMs
    // and the expert kernels read (the keys group has none: only fp32 GEMMs read it). A
    // copy is refreshed by the next forward whenever its fp32 masters may have changed
    // (anyone who took the params pointer) unless the optimizer wrote it along with them
    // (mp_model_bf16_set_fresh).
    uint16_t *bf16[MP_N_GROUPS];  // (group_size[g]) or NULL
    int bf16_stale[MP_N_GROUPS];
    // phase timing (mp_model_phase): on, in backward, the running phase and its start
    int profile, in_backward, phase;
    double phase_t0, phase_s[MP_PHASE_N];
};

static uint64_t name_stream(const char *s) {   // FNV-1a of the tensor name
    uint64_t h = 1469598103934665603ULL;
    for (; *s; s++) h = (h ^ (unsigned char)*s) * 1099511628211ULL;
    return h;
}

static int add_tensor(mp_model *m, const char *name, long rows, long cols, mp_group group,
                      int decay, init_kind init, float scale, long global_rows, long row_start) {
    if (m->n_tensors == MP_MAX_TENSORS) mp_fatal("too many tensors");
    int i = m->n_tensors++;
    mp_tensor *t = &m->tensors[i];
    snprintf(t->name, sizeof t->name, "%s", name);
    t->ndim = cols > 0 ? 2 : 1;
    t->shape[0] = rows;
    t->shape[1] = cols > 0 ? cols : 1;
    t->global_rows = global_rows;
    t->row_start = row_start;
    t->group = group;
    t->numel = (size_t)rows * (size_t)t->shape[1];
    t->decay = decay;   // t->offset: lay_out_groups, once the table is complete
    m->init[i] = init;
    m->init_scale[i] = scale;
    return i;
}

static int add(mp_model *m, const char *name, long rows, long cols, int decay, init_kind init,
               float scale) {
    return add_tensor(m, name, rows, cols, MP_GROUP_DENSE, decay, init, scale, rows, 0);
}

// The table of tensors in docs/model.md order. Retrieval layers hold expert rows
// [row_start, row_start + rows) of each table; *idx receives tensor indices for wiring.
static void build_table(mp_model *m, long part, long n_parts, int idx[MP_MAX_LAYERS][16],
                        int *top_idx) {
    const mp_config *c = &m->cfg;
    long C = c->d_model, F = c->dense_hidden, L = c->n_layers;
    float std = c->init_std, proj_std = c->init_std / sqrtf(2.0f * L);
    char nm[48];
    top_idx[0] = add(m, "wte", c->vocab_size, C, 1, INIT_NORMAL, std);
    top_idx[1] = add(m, "wpe", c->context, C, 1, INIT_NORMAL, std);
    for (int l = 0; l < L; l++) {
        int *ix = idx[l];
#define ADD(slot, suffix, rows, cols, decay, init, scale)                  \
    snprintf(nm, sizeof nm, "h%d.%s", l, suffix);                          \
    ix[slot] = add(m, nm, rows, cols, decay, init, scale)
        ADD(0, "ln1.w", C, 0, 0, INIT_ONES, 0);
        ADD(1, "ln1.b", C, 0, 0, INIT_ZEROS, 0);
        ADD(2, "attn.qkv.w", 3 * C, C, 1, INIT_NORMAL, std);
        ADD(3, "attn.qkv.b", 3 * C, 0, 0, INIT_ZEROS, 0);
        ADD(4, "attn.proj.w", C, C, 1, INIT_NORMAL, proj_std);
        ADD(5, "attn.proj.b", C, 0, 0, INIT_ZEROS, 0);
        ADD(6, "ln2.w", C, 0, 0, INIT_ONES, 0);
        ADD(7, "ln2.b", C, 0, 0, INIT_ZEROS, 0);
        const mp_retrieval_config *rc = mp_config_retrieval(c, l);
        if (!rc) {
            ADD(8, "mlp.fc.w", F, C, 1, INIT_NORMAL, std);
            ADD(9, "mlp.fc.b", F, 0, 0, INIT_ZEROS, 0);
            ADD(10, "mlp.proj.w", C, F, 1, INIT_NORMAL, proj_std);
            ADD(11, "mlp.proj.b", C, 0, 0, INIT_ZEROS, 0);
            continue;
        }
        const char *kind = c->ffn[l] == MP_FFN_PEER ? "peer" : "pkm";
        long HD = (long)rc->heads * rc->key_dim, n = rc->n_sub, half = rc->key_dim / 2;
        long a0 = part * n / n_parts, a1 = (part + 1) * n / n_parts;   // owned first-half sub-keys
        long row_start = a0 * n, rows = (a1 - a0) * n;
        char sfx[32];
#define ADDR(slot, what, rows_, cols, decay, init, scale)                  \
    snprintf(sfx, sizeof sfx, "%s.%s", kind, what);                        \
    ADD(slot, sfx, rows_, cols, decay, init, scale)
        ADDR(8, "wq", HD, C, 1, INIT_NORMAL, std);
        ix[9] = ix[10] = -1;
        if (rc->query_bn) {
            ADDR(9, "bn.w", HD, 0, 0, INIT_ONES, 0);
            ADDR(10, "bn.b", HD, 0, 0, INIT_ZEROS, 0);
        }
        float kb = 1.0f / sqrtf((float)half);
        snprintf(nm, sizeof nm, "h%d.%s.k1", l, kind);
        ix[11] = add_tensor(m, nm, n, half, MP_GROUP_KEYS, 1, INIT_UNIFORM, kb, n, 0);
        snprintf(nm, sizeof nm, "h%d.%s.k2", l, kind);
        ix[12] = add_tensor(m, nm, n, half, MP_GROUP_KEYS, 1, INIT_UNIFORM, kb, n, 0);
        float es = 1.0f / sqrtf((float)C);
        long N = rc->n_experts;
        ix[13] = -1;
        if (c->ffn[l] == MP_FFN_PEER) {
            snprintf(nm, sizeof nm, "h%d.peer.u", l);
            ix[13] = add_tensor(m, nm, rows, C, MP_GROUP_EXPERTS, 1, INIT_NORMAL, es, N, row_start);
        }
        snprintf(nm, sizeof nm, "h%d.%s.v", l, kind);
        ix[14] = add_tensor(m, nm, rows, C, MP_GROUP_EXPERTS, 1, INIT_NORMAL, es, N, row_start);
#undef ADDR
#undef ADD
    }
    top_idx[2] = add(m, "lnf.w", C, 0, 0, INIT_ONES, 0);
    top_idx[3] = add(m, "lnf.b", C, 0, 0, INIT_ZEROS, 0);
}

// Each group's buffer holds its weight-decayed tensors first, then the others, each part in
// table order: one AdamW pass then covers a whole part (mp_adamw_step), not one tensor.
static void lay_out_groups(mp_model *m) {
    for (int decay = 1; decay >= 0; decay--)
        for (int i = 0; i < m->n_tensors; i++) {
            mp_tensor *t = &m->tensors[i];
            if (t->decay != decay) continue;
            t->offset = m->group_size[t->group];
            m->group_size[t->group] += t->numel;
        }
}

static float *pptr(mp_model *m, int i) {
    return i < 0 ? NULL : m->params[m->tensors[i].group] + m->tensors[i].offset;
}
static float *gptr(mp_model *m, int i) {
    return i < 0 ? NULL : m->grads[m->tensors[i].group] + m->tensors[i].offset;
}

static void *act_alloc(mp_model *m, size_t n, size_t size) { return m->be->alloc(n * size); }

// bf16 mode runs its dense GEMMs on bf16 operands, which the ops producing them write as
// twins in the same pass (backend.h); a model built on a backend without bf16 (a stored
// bf16 config read on the CPU) has none
static int uses_bf16(const mp_config *cfg, const mp_backend *be) {
    return !strcmp(cfg->precision, "bf16") && be->to_bf16;
}
static uint16_t *twin_alloc(mp_model *m, size_t n) {
    return uses_bf16(&m->cfg, m->be) ? act_alloc(m, n, sizeof(uint16_t)) : NULL;
}
// an fp32 activation that only bf16 GEMMs read (a LayerNorm's output before a GEMM, GELU's
// output): NULL in bf16 mode, where its twin is all they read and what the op writes
static float *gemm_input_alloc(mp_model *m, size_t n) {
    return uses_bf16(&m->cfg, m->be) ? NULL : act_alloc(m, n, sizeof(float));
}

// dense weight w's bf16 copy (bf16 mode; NULL otherwise): what the GEMMs read instead of
// rounding w for each call
static const uint16_t *weight_bf16(const mp_model *m, const float *w) {
    const float *base = m->params[MP_GROUP_DENSE];
    if (!m->bf16[MP_GROUP_DENSE]) return NULL;
    if (w < base || w >= base + m->group_size[MP_GROUP_DENSE])
        mp_fatal("internal: a bf16 weight copy asked for a tensor outside the dense group");
    return m->bf16[MP_GROUP_DENSE] + (w - base);
}

// group g's bf16 copy rewritten from its masters, in one pass, if they may have changed
static void bf16_refresh(mp_model *m, mp_group g) {
    if (!m->bf16[g] || !m->bf16_stale[g]) return;
    m->be->to_bf16(m->bf16[g], m->params[g], m->group_size[g]);
    m->bf16_stale[g] = 0;
}

static mp_model *model_build(const mp_config *cfg, const mp_backend *be, int B, int part,
                             int n_parts, mp_comm *comm) {
    mp_model *m = mp_calloc(1, sizeof *m);
    m->cfg = *cfg;
    m->be = be;
    m->B = B;
    m->T = cfg->context;
    int idx[MP_MAX_LAYERS][16], top[4];
    build_table(m, part, n_parts, idx, top);
    lay_out_groups(m);
    for (int g = 0; g < MP_N_GROUPS; g++) {
        m->params[g] = be->alloc(m->group_size[g] * sizeof(float));
        m->grads[g] = be->alloc(m->group_size[g] * sizeof(float));
    }
    m->wte = pptr(m, top[0]); m->dwte = gptr(m, top[0]);
    m->wpe = pptr(m, top[1]); m->dwpe = gptr(m, top[1]);
    m->lnfw = pptr(m, top[2]); m->dlnfw = gptr(m, top[2]);
    m->lnfb = pptr(m, top[3]); m->dlnfb = gptr(m, top[3]);

    size_t N = (size_t)B * m->T, C = cfg->d_model, F = cfg->dense_hidden, V = cfg->vocab_size;
    for (int l = 0; l < cfg->n_layers; l++) {
        int *ix = idx[l];
        block_params *p = &m->p[l], *g = &m->g[l];
        float **pp[] = {&p->ln1w, &p->ln1b, &p->qkvw, &p->qkvb, &p->projw, &p->projb, &p->ln2w, &p->ln2b};
        float **gg[] = {&g->ln1w, &g->ln1b, &g->qkvw, &g->qkvb, &g->projw, &g->projb, &g->ln2w, &g->ln2b};
        for (int s = 0; s < 8; s++) { *pp[s] = pptr(m, ix[s]); *gg[s] = gptr(m, ix[s]); }
        block_acts *a = &m->a[l];
        const mp_retrieval_config *rc = mp_config_retrieval(cfg, l);
        a->res_in = act_alloc(m, N * C, sizeof(float));
        a->ln1 = gemm_input_alloc(m, N * C);
        a->ln1_mean = act_alloc(m, N, sizeof(float));
        a->ln1_rstd = act_alloc(m, N, sizeof(float));
        a->qkv = act_alloc(m, N * 3 * C, sizeof(float));
        a->atty = act_alloc(m, N * C, sizeof(float));
        a->att = act_alloc(m, be->attention_state_floats(B, m->T, (int)C, cfg->n_heads),
                           sizeof(float));
        a->res_mid = act_alloc(m, N * C, sizeof(float));
        // a PEER layer reads its input in fp32 (the query GEMM, the experts)
        a->ln2 = rc ? act_alloc(m, N * C, sizeof(float)) : gemm_input_alloc(m, N * C);
        a->ln2_mean = act_alloc(m, N, sizeof(float));
        a->ln2_rstd = act_alloc(m, N, sizeof(float));
        a->ln1_bf16 = twin_alloc(m, N * C);
        a->atty_bf16 = twin_alloc(m, N * C);
        a->ln2_bf16 = twin_alloc(m, N * C);   // the MLP's, or the PEER route's dW_q GEMM
        if (!rc) {
            p->fcw = pptr(m, ix[8]); g->fcw = gptr(m, ix[8]);
            p->fcb = pptr(m, ix[9]); g->fcb = gptr(m, ix[9]);
            p->fcprojw = pptr(m, ix[10]); g->fcprojw = gptr(m, ix[10]);
            p->fcprojb = pptr(m, ix[11]); g->fcprojb = gptr(m, ix[11]);
            a->fch = act_alloc(m, N * F, sizeof(float));
            a->fch_gelu = gemm_input_alloc(m, N * F);
            a->fch_gelu_bf16 = twin_alloc(m, N * F);
            continue;
        }
        mp_retrieval_layer *r = mp_calloc(1, sizeof *r);
        size_t HD = (size_t)rc->heads * rc->key_dim, S = (size_t)rc->heads * rc->topk;
        r->kind = cfg->ffn[l];
        r->rc = mp_config_retrieval(&m->cfg, l);
        r->C = (int)C;
        r->maxN = (int)N;
        r->row_start = m->tensors[ix[14]].row_start;
        r->rows = m->tensors[ix[14]].shape[0];
        r->wq = pptr(m, ix[8]); r->dwq = gptr(m, ix[8]);
        r->bn_w = pptr(m, ix[9]); r->dbn_w = gptr(m, ix[9]);
        r->bn_b = pptr(m, ix[10]); r->dbn_b = gptr(m, ix[10]);
        r->k1 = pptr(m, ix[11]); r->dk1 = gptr(m, ix[11]);
        r->k2 = pptr(m, ix[12]); r->dk2 = gptr(m, ix[12]);
        r->u = pptr(m, ix[13]); r->du = gptr(m, ix[13]);
        r->v = pptr(m, ix[14]); r->dv = gptr(m, ix[14]);
        if (rc->query_bn) m->state_size += 2 * HD;
        if (rc->balance_rate > 0) {
            size_t G = 2 * (size_t)rc->heads * rc->n_sub;
            m->state_size += G;
            r->key_counts = act_alloc(m, G, sizeof(int32_t));
            r->key_counts_i32 = mp_calloc(G, sizeof(int32_t));
            r->key_counts_host = mp_calloc(G + 1, sizeof(double));
            r->key_bias_host = mp_calloc(G, sizeof(float));
        }
        r->q = act_alloc(m, N * HD, sizeof(float));
        r->qn = act_alloc(m, N * HD, sizeof(float));
        r->dq = act_alloc(m, N * HD, sizeof(float));
        r->bn_mean = act_alloc(m, HD, sizeof(float));
        r->bn_rstd = act_alloc(m, HD, sizeof(float));
        r->bn_sums = act_alloc(m, 3 * HD, sizeof(double));
        r->bn_sums_host = mp_calloc(2 * HD + 1, sizeof(double));
        r->bn_host = mp_calloc(4 * HD, sizeof(float));
        r->sel = act_alloc(m, N * S, sizeof(int32_t));
        r->sel_a = act_alloc(m, N * S, sizeof(int32_t));
        r->sel_b = act_alloc(m, N * S, sizeof(int32_t));
        r->gate = act_alloc(m, N * S, sizeof(float));
        r->dgate = act_alloc(m, N * S, sizeof(float));
        r->grad_dirty = act_alloc(m, r->rows > 0 ? (size_t)r->rows : 1, 1);   // zero: clean
        r->row_ss = act_alloc(m, r->rows > 0 ? (size_t)r->rows : 1, sizeof(double));
        if (!strcmp(cfg->expert_optimizer, "lazy_adamw")) {
            size_t rows = r->rows > 0 ? (size_t)r->rows : 1;
            r->touched_mark = mp_calloc(rows, 1);
            r->touched_h = mp_malloc(rows * sizeof(int32_t));
            r->touched_dev = act_alloc(m, rows, sizeof(int32_t));
            m->lazy_experts = 1;
        }
        mp_retrieval_exchange_init(r, be, comm);
        m->ret[l] = r;
        m->ret_block[m->n_ret++] = l;
    }
    // Config validation refuses bf16 on a backend without it; a model built here from a
    // stored config on the CPU (ckpt verify) reads the fp32 masters.
    if (uses_bf16(cfg, be)) {
        const mp_group mirrored[2] = {MP_GROUP_DENSE, MP_GROUP_EXPERTS};
        for (int i = 0; i < 2; i++) {
            size_t n = m->group_size[mirrored[i]];
            m->bf16[mirrored[i]] = be->alloc((n ? n : 1) * sizeof(uint16_t));
            m->bf16_stale[mirrored[i]] = 1;
        }
        float *base = m->params[MP_GROUP_EXPERTS];
        for (int l = 0; l < cfg->n_layers; l++) {
            mp_retrieval_layer *r = m->ret[l];
            if (!r) continue;
            uint16_t *eb = m->bf16[MP_GROUP_EXPERTS];
            if (r->u) r->u_bf16 = eb + (r->u - base);
            r->v_bf16 = eb + (r->v - base);
            r->wq_bf16 = weight_bf16(m, r->wq);
        }
    }
    // router state: one buffer; per retrieval layer (mean, var) with query BN, then the
    // sub-key balance biases with peer.balance_rate > 0 (layout in model.h)
    m->router_state = be->alloc((m->state_size ? m->state_size : 1) * sizeof(float));
    size_t off = 0;
    for (int l = 0; l < cfg->n_layers; l++) {
        mp_retrieval_layer *r = m->ret[l];
        if (!r) continue;
        if (r->rc->query_bn) {
            size_t HD = (size_t)r->rc->heads * r->rc->key_dim;
            r->running_mean = m->router_state + off;
            r->running_var = m->router_state + off + HD;
            off += 2 * HD;
        }
        if (r->rc->balance_rate > 0) {
            r->key_bias = m->router_state + off;
            off += 2 * (size_t)r->rc->heads * r->rc->n_sub;
        }
    }
    m->inputs = act_alloc(m, N, sizeof(int32_t));
    m->targets = act_alloc(m, N, sizeof(int32_t));
    m->res_out = act_alloc(m, N * C, sizeof(float));
    m->lnf = gemm_input_alloc(m, N * C);
    m->lnf_mean = act_alloc(m, N, sizeof(float));
    m->lnf_rstd = act_alloc(m, N, sizeof(float));
    m->logits = act_alloc(m, N * V, sizeof(float));
    m->ce_stats = act_alloc(m, 2 * N, sizeof(float));
    m->losses = act_alloc(m, N, sizeof(float));
    m->ffn_out = act_alloc(m, N * C, sizeof(float));
    m->lnf_bf16 = twin_alloc(m, N * C);
    m->dlogits_bf16 = twin_alloc(m, N * V);
    m->dlogits = m->dlogits_bf16 ? NULL : act_alloc(m, N * V, sizeof(float));
    m->dres_bf16 = twin_alloc(m, N * C);
    m->dqkv_bf16 = twin_alloc(m, N * 3 * C);
    m->dfch_bf16 = F ? twin_alloc(m, N * F) : NULL;   // bf16 mode: dfch exists only as this
    m->dres = act_alloc(m, N * C, sizeof(float));
    m->dln = act_alloc(m, N * C, sizeof(float));
    m->datty = act_alloc(m, N * C, sizeof(float));
    m->dqkv = m->dqkv_bf16 ? NULL : act_alloc(m, N * 3 * C, sizeof(float));   // as dfch
    m->dfch = m->dfch_bf16 ? NULL : act_alloc(m, N * (F ? F : 1), sizeof(float));
    m->dfch_gelu = act_alloc(m, N * (F ? F : 1), sizeof(float));
    return m;
}

mp_model *mp_model_create(const mp_config *cfg, const mp_backend *be, int B) {
    return model_build(cfg, be, B, 0, 1, NULL);
}

mp_model *mp_model_create_part(const mp_config *cfg, const mp_backend *be, int B, int part,
                               int n_parts) {
    return model_build(cfg, be, B, part, n_parts, NULL);
}

mp_model *mp_model_create_sharded(const mp_config *cfg, const mp_backend *be, int B, mp_comm *comm) {
    if (comm->size > 1 && comm->device_buffers == be->host_memory)
        mp_fatal("the %s transport moves %s buffers, but the %s backend's memory is %s memory",
                 comm->name, comm->device_buffers ? "device" : "host", be->name,
                 be->host_memory ? "host" : "device");
    mp_model *m = model_build(cfg, be, B, comm->rank, comm->size, comm);
    m->comm = comm;
    return m;
}

// frees every bf16 twin of the model (NULL after)
static void twins_free(mp_model *m) {
    uint16_t **tw[4 * MP_MAX_LAYERS + 5] = {&m->lnf_bf16, &m->dlogits_bf16, &m->dres_bf16,
                                            &m->dqkv_bf16, &m->dfch_bf16};
    int n = 5;
    for (int l = 0; l < m->cfg.n_layers; l++) {
        block_acts *a = &m->a[l];
        tw[n++] = &a->ln1_bf16;
        tw[n++] = &a->atty_bf16;
        tw[n++] = &a->ln2_bf16;
        tw[n++] = &a->fch_gelu_bf16;
    }
    for (int i = 0; i < n; i++) {
        if (*tw[i]) m->be->free(*tw[i]);
        *tw[i] = NULL;
    }
}

void mp_model_without_bf16_twins(mp_model *m) {
    twins_free(m);
    // the fp32 tensors that bf16 mode kept only as twins
    size_t N = (size_t)m->B * m->T, C = m->cfg.d_model, F = m->cfg.dense_hidden;
    float **need[3 * MP_MAX_LAYERS + 4] = {&m->dlogits, &m->dfch, &m->lnf, &m->dqkv};
    size_t size[3 * MP_MAX_LAYERS + 4] = {N * m->cfg.vocab_size, N * (F ? F : 1), N * C,
                                          N * 3 * C};
    int n = 4;
    for (int l = 0; l < m->cfg.n_layers; l++) {
        block_acts *a = &m->a[l];
        need[n] = &a->ln1, size[n++] = N * C;
        need[n] = &a->ln2, size[n++] = N * C;
        if (!m->ret[l]) need[n] = &a->fch_gelu, size[n++] = N * F;
    }
    for (int i = 0; i < n; i++)
        if (!*need[i]) *need[i] = act_alloc(m, size[i], sizeof(float));
}

void mp_model_free(mp_model *m) {
    if (!m) return;
    mp_tokenizer_free(m->tokenizer);
    const mp_backend *be = m->be;
    if (m->profile && be->kernel_timer) be->kernel_timer(NULL);
    for (int g = 0; g < MP_N_GROUPS; g++) { be->free(m->params[g]); be->free(m->grads[g]); }
    for (int g = 0; g < MP_N_GROUPS; g++) be->free(m->bf16[g]);
    be->free(m->router_state);
    for (int l = 0; l < m->cfg.n_layers; l++) {
        block_acts *a = &m->a[l];
        float *bufs[] = {a->res_in, a->ln1, a->ln1_mean, a->ln1_rstd, a->qkv, a->atty, a->att,
                         a->res_mid, a->ln2, a->ln2_mean, a->ln2_rstd, a->fch, a->fch_gelu};
        for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++) if (bufs[i]) be->free(bufs[i]);
        mp_retrieval_layer *r = m->ret[l];
        if (!r) continue;
        void *rb[] = {r->q, r->qn, r->dq, r->bn_mean, r->bn_rstd, r->sel, r->sel_a, r->sel_b,
                      r->gate, r->dgate, r->key_counts, r->bn_sums, r->touched_dev,
                      r->grad_dirty, r->row_ss};
        for (size_t i = 0; i < sizeof rb / sizeof rb[0]; i++) if (rb[i]) be->free(rb[i]);
        free(r->key_counts_i32);
        free(r->key_counts_host);
        free(r->bn_sums_host);
        free(r->bn_host);
        free(r->key_bias_host);
        free(r->touched_mark);
        free(r->touched_h);
        mp_retrieval_exchange_free(r);
        free(r->usage);
        free(r);
    }
    void *bufs[] = {m->inputs, m->targets, m->res_out, m->lnf, m->lnf_mean, m->lnf_rstd,
                    m->logits, m->ce_stats, m->losses, m->ffn_out, m->dlogits, m->dres, m->dln,
                    m->datty, m->dqkv, m->dfch, m->dfch_gelu};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++) if (bufs[i]) be->free(bufs[i]);
    twins_free(m);
    free(m);
}

void mp_model_init(mp_model *m) {
    uint64_t seed = m->cfg.seed;
    for (int i = 0; i < m->n_tensors; i++) {
        mp_watchdog_beat("initialising the parameters");
        const mp_tensor *t = &m->tensors[i];
        size_t n = t->numel;
        float *host = mp_malloc(n * sizeof(float));
        uint64_t stream = name_stream(t->name);
        size_t base = (size_t)t->row_start * t->shape[1];   // global index of the first value
        float s = m->init_scale[i];
        init_kind kind = m->init[i];
#pragma omp parallel for schedule(static)
        for (size_t j = 0; j < n; j++) {
            float v = 0.0f;
            if (kind == INIT_NORMAL) v = s * mp_normal(seed, stream, base + j);
            else if (kind == INIT_UNIFORM) v = s * (2.0f * mp_uniform(seed, stream, base + j) - 1.0f);
            else if (kind == INIT_ONES) v = 1.0f;
            host[j] = v;
        }
        m->be->from_host(m->params[t->group] + t->offset, host, n * sizeof(float));
        free(host);
    }
    for (int g = 0; g < MP_N_GROUPS; g++) m->bf16_stale[g] = 1;
    // running statistics: mean 0, var 1
    float *host = mp_calloc(m->state_size ? m->state_size : 1, sizeof(float));
    for (int l = 0; l < m->cfg.n_layers; l++) {
        mp_retrieval_layer *r = m->ret[l];
        if (!r || !r->rc->query_bn) continue;   // the biases start at 0
        size_t HD = (size_t)r->rc->heads * r->rc->key_dim, off = r->running_var - m->router_state;
        for (size_t j = 0; j < HD; j++) host[off + j] = 1.0f;
    }
    m->be->from_host(m->router_state, host, (m->state_size ? m->state_size : 1) * sizeof(float));
    free(host);
}

int mp_model_n_tensors(const mp_model *m) { return m->n_tensors; }
const mp_tensor *mp_model_tensor(const mp_model *m, int i) { return &m->tensors[i]; }
const mp_tensor *mp_model_find(const mp_model *m, const char *name) {
    for (int i = 0; i < m->n_tensors; i++)
        if (!strcmp(m->tensors[i].name, name)) return &m->tensors[i];
    return NULL;
}
float *mp_model_params(mp_model *m, mp_group g) {
    m->bf16_stale[g] = 1;   // the caller may write the masters
    return m->params[g];
}
uint16_t *mp_model_bf16(mp_model *m, const mp_tensor *t) {
    return m->bf16[t->group] ? m->bf16[t->group] + t->offset : NULL;
}
int mp_model_bf16_fresh(const mp_model *m, mp_group g) { return m->bf16[g] && !m->bf16_stale[g]; }
void mp_model_bf16_set_fresh(mp_model *m, mp_group g) { m->bf16_stale[g] = 0; }
float *mp_model_grads(mp_model *m, mp_group g) { return m->grads[g]; }
size_t mp_model_group_size(const mp_model *m, mp_group g) { return m->group_size[g]; }
float *mp_model_router_state(mp_model *m) { return m->router_state; }
size_t mp_model_router_state_size(const mp_model *m) { return m->state_size; }
const mp_config *mp_model_config(const mp_model *m) { return &m->cfg; }
const mp_backend *mp_model_backend(const mp_model *m) { return m->be; }
mp_comm *mp_model_comm(const mp_model *m) { return m->comm; }
const mp_tokenizer *mp_model_tokenizer(const mp_model *m) { return m->tokenizer; }
void mp_model_set_tokenizer(mp_model *m, mp_tokenizer *t) {
    if (t != m->tokenizer) mp_tokenizer_free(m->tokenizer);
    m->tokenizer = t;
}
const float *mp_model_logits(const mp_model *m) { return m->logits; }
mp_retrieval_layer *mp_model_retrieval_layer(mp_model *m, int block) { return m->ret[block]; }

static int cmp_i32(const void *a, const void *b) {
    int32_t x = *(const int32_t *)a, y = *(const int32_t *)b;
    return (x > y) - (x < y);
}

// The touched list of r sorted (the optimizer then walks the tables in address order, and
// the gradient-norm sum has an order that does not depend on the records' arrival order)
// and in backend memory; once per step.
static void touched_ready(mp_model *m, mp_retrieval_layer *r) {
    if (r->touched_ready) return;
    qsort(r->touched_h, (size_t)r->n_touched, sizeof(int32_t), cmp_i32);
    if (r->n_touched)
        m->be->from_host(r->touched_dev, r->touched_h, (size_t)r->n_touched * sizeof(int32_t));
    r->touched_ready = 1;
}

int64_t mp_model_touched_rows(mp_model *m, const mp_tensor *t, const int32_t **rows) {
    *rows = NULL;
    if (!m->lazy_experts || t->group != MP_GROUP_EXPERTS) return -1;
    const float *p = m->params[MP_GROUP_EXPERTS] + t->offset;
    for (int l = 0; l < m->cfg.n_layers; l++) {
        mp_retrieval_layer *r = m->ret[l];
        if (!r || (p != r->u && p != r->v)) continue;
        touched_ready(m, r);
        *rows = r->touched_dev;
        return r->n_touched;
    }
    mp_fatal("expert tensor %s belongs to no retrieval layer", t->name);
}

// The expert gradients are not zeroed here: the step's first expert backward overwrites
// the rows it touches and zeroes the other rows written before (retrieval.h, grad_dirty),
// which costs the rows touched rather than a pass over the whole tables. Lazy AdamW's
// touched list starts over.
static void start_expert_grads(mp_model *m) {
    for (int l = 0; l < m->cfg.n_layers; l++) {
        mp_retrieval_layer *r = m->ret[l];
        if (!r) continue;
        r->grad_overwrite = 1;
        if (!r->touched_mark) continue;
        for (int64_t i = 0; i < r->n_touched; i++) r->touched_mark[r->touched_h[i]] = 0;
        r->n_touched = 0;
        r->touched_ready = 0;
    }
}

void mp_model_zero_grad(mp_model *m) {
    for (int g = 0; g < MP_N_GROUPS; g++) {
        if (g == MP_GROUP_EXPERTS) start_expert_grads(m);
        else m->be->zero(m->grads[g], m->group_size[g] * sizeof(float));
    }
}

const double *mp_model_expert_row_ss(const mp_model *m, int block, int64_t *rows) {
    mp_retrieval_layer *r = block >= 0 && block < m->cfg.n_layers ? m->ret[block] : NULL;
    // after mp_model_zero_grad the rows and row_ss still hold the last step's values until
    // the next backward overwrites them: reading them then would apply that step twice
    if (r && r->grad_overwrite)
        mp_fatal("internal: the expert gradients of block %d were read after "
                 "mp_model_zero_grad and before a backward", block);
    *rows = r ? r->rows : 0;
    return r ? r->row_ss : NULL;
}

// ---------------------------------------------------------------------------------------
// phase timing

void mp_model_profile_enable(mp_model *m, int on) {
    if (!on && m->profile && m->be->kernel_timer) m->be->kernel_timer(NULL);
    m->profile = on;
    mp_model_phase_reset(m);
}

void mp_model_phase(mp_model *m, int phase) {
    mp_watchdog_beat(phase >= 0 ? mp_phase_name(phase) : "the end of a step");
    if (!m->profile) return;
    if (m->be->synchronize) m->be->synchronize();
    double now = mp_now();
    if (m->phase >= 0) m->phase_s[m->phase] += now - m->phase_t0;
    m->phase = phase;
    m->phase_t0 = now;
    // the backend's kernel timer counts what is queued from now on under this phase
    if (m->be->kernel_timer) m->be->kernel_timer(phase >= 0 ? mp_phase_name(phase) : "other");
}

const double *mp_model_phase_seconds(const mp_model *m) { return m->phase_s; }

int mp_model_kernel_times(const mp_model *m, mp_kernel_time *out, int max) {
    return m->profile && m->be->kernel_times ? m->be->kernel_times(out, max) : 0;
}

void mp_model_phase_reset(mp_model *m) {
    memset(m->phase_s, 0, sizeof m->phase_s);
    m->phase = MP_PHASE_NONE;
    if (m->profile && m->be->kernel_times) m->be->kernel_times(NULL, 0);
}

const char *mp_phase_name(int phase) {
    static const char *name[MP_PHASE_N] = {
        "fwd.embed", "fwd.norm", "fwd.attn_matmul", "fwd.attention", "fwd.mlp", "fwd.peer",
        "fwd.lm_head", "fwd.loss", "bwd.embed", "bwd.norm", "bwd.attn_matmul", "bwd.attention",
        "bwd.mlp", "bwd.peer", "bwd.lm_head", "bwd.loss", "allreduce", "optimizer"};
    return phase >= 0 && phase < MP_PHASE_N ? name[phase] : "?";
}

// the kind of work that starts now, in the direction the model is running
static void enter_phase(mp_model *m, mp_phase kind) {
    mp_model_phase(m, (int)kind + (m->in_backward ? MP_PHASE_KINDS : 0));
}

// system.precision reaches the backend's GEMMs here, at each entry that runs ops: the
// backend holds one setting for the process, and models of either precision may take turns.
static void use_precision(const mp_model *m) {
    if (m->be->set_precision)
        m->be->set_precision(strcmp(m->cfg.precision, "bf16") ? MP_PRECISION_FP32
                                                               : MP_PRECISION_BF16);
}

void mp_model_ffn_forward(mp_model *m, int l, float *y, const float *x, const uint16_t *x_bf16,
                          int N, int train) {
    const mp_backend *be = m->be;
    use_precision(m);
    enter_phase(m, m->ret[l] ? MP_PHASE_PEER : MP_PHASE_MLP);
    bf16_refresh(m, MP_GROUP_DENSE);   // the MLP's weights, or the route's W_q
    if (m->ret[l]) {
        bf16_refresh(m, MP_GROUP_EXPERTS);
        mp_retrieval_forward(m->ret[l], be, y, x, N, train);
        return;
    }
    block_params *p = &m->p[l];
    block_acts *a = &m->a[l];
    int C = m->cfg.d_model, F = m->cfg.dense_hidden;
    be->matmul_forward(a->fch, x, x_bf16, p->fcw, weight_bf16(m, p->fcw), p->fcb, N, C, F);
    be->gelu_forward(a->fch_gelu, a->fch_gelu_bf16, a->fch, (long)N * F);
    be->matmul_forward(y, a->fch_gelu, a->fch_gelu_bf16, p->fcprojw, weight_bf16(m, p->fcprojw),
                       p->fcprojb, N, F, C);
}

void mp_model_ffn_backward(mp_model *m, int l, float *dx, const float *dy, const uint16_t *dy_bf16,
                           const float *x, const uint16_t *x_bf16, int N) {
    const mp_backend *be = m->be;
    use_precision(m);
    enter_phase(m, m->ret[l] ? MP_PHASE_PEER : MP_PHASE_MLP);
    int C = m->cfg.d_model, F = m->cfg.dense_hidden;
    if (m->ret[l]) {   // the layer adds the experts' and the query's parts into dx
        be->zero(dx, (size_t)N * C * sizeof(float));
        mp_retrieval_backward(m->ret[l], be, dx, dy, x, x_bf16, N);
        return;
    }
    block_params *p = &m->p[l], *g = &m->g[l];
    block_acts *a = &m->a[l];
    // each activation gradient is written by its one producer: nothing to zero
    be->matmul_backward(m->dfch_gelu, g->fcprojw, g->fcprojb, dy, dy_bf16, a->fch_gelu,
                        a->fch_gelu_bf16, p->fcprojw, weight_bf16(m, p->fcprojw), N, F, C, 0);
    // fc's bias gradient in the pass that writes dfch (backend.h), not by reading it again;
    // in bf16 mode dfch is only its twin (m->dfch NULL), all the fc GEMMs read
    be->gelu_backward(m->dfch, m->dfch_bf16, g->fcb, a->fch, m->dfch_gelu, N, F);
    be->matmul_backward(dx, g->fcw, NULL, m->dfch, m->dfch_bf16, x, x_bf16, p->fcw,
                        weight_bf16(m, p->fcw), N, C, F, 0);
}

float mp_model_forward(mp_model *m, const int32_t *inputs, const int32_t *targets, int B, int T,
                       int train) {
    const mp_config *c = &m->cfg;
    const mp_backend *be = m->be;
    use_precision(m);
    if (B > m->B || T > m->T || B < 1 || T < 1)
        mp_fatal("forward on (%d, %d) tokens; the model was built for at most (%d, %d)", B, T, m->B, m->T);
    int N = B * T, C = c->d_model, NH = c->n_heads, V = c->vocab_size;
    m->last_B = B;
    m->last_T = T;
    m->has_targets = targets != NULL;
    m->in_backward = 0;
    enter_phase(m, MP_PHASE_EMBED);
    bf16_refresh(m, MP_GROUP_DENSE);
    be->from_host(m->inputs, inputs, (size_t)N * sizeof(int32_t));
    if (targets) be->from_host(m->targets, targets, (size_t)N * sizeof(int32_t));

    be->encoder_forward(m->a[0].res_in, m->inputs, m->wte, m->wpe, B, T, C);
    enter_phase(m, MP_PHASE_NORM);
    block_acts *a0 = &m->a[0];
    be->layernorm_forward(a0->ln1, a0->ln1_bf16, a0->ln1_mean, a0->ln1_rstd, a0->res_in,
                          m->p[0].ln1w, m->p[0].ln1b, N, C);
    // Every residual add is fused with the LayerNorm that reads its sum: ln2 of the block,
    // then ln1 of the next block (lnf after the last)
    for (int l = 0; l < c->n_layers; l++) {
        block_params *p = &m->p[l];
        block_acts *a = &m->a[l];
        enter_phase(m, MP_PHASE_ATTN_MATMUL);
        be->matmul_forward(a->qkv, a->ln1, a->ln1_bf16, p->qkvw, weight_bf16(m, p->qkvw), p->qkvb,
                           N, C, 3 * C);
        enter_phase(m, MP_PHASE_ATTENTION);
        be->attention_forward(a->atty, a->atty_bf16, a->att, a->qkv, B, T, C, NH);
        enter_phase(m, MP_PHASE_ATTN_MATMUL);
        be->matmul_forward(m->ffn_out, a->atty, a->atty_bf16, p->projw, weight_bf16(m, p->projw),
                           p->projb, N, C, C);
        enter_phase(m, MP_PHASE_NORM);
        be->residual_layernorm_forward(a->res_mid, a->ln2, a->ln2_bf16, a->ln2_mean, a->ln2_rstd,
                                       a->res_in, m->ffn_out, p->ln2w, p->ln2b, N, C);
        mp_model_ffn_forward(m, l, m->ffn_out, a->ln2, a->ln2_bf16, N, train);
        enter_phase(m, MP_PHASE_NORM);
        if (l + 1 < c->n_layers) {
            block_acts *an = &m->a[l + 1];
            be->residual_layernorm_forward(an->res_in, an->ln1, an->ln1_bf16, an->ln1_mean,
                                           an->ln1_rstd, a->res_mid, m->ffn_out, m->p[l + 1].ln1w,
                                           m->p[l + 1].ln1b, N, C);
        } else {
            be->residual_layernorm_forward(m->res_out, m->lnf, m->lnf_bf16, m->lnf_mean,
                                           m->lnf_rstd, a->res_mid, m->ffn_out, m->lnfw, m->lnfb,
                                           N, C);
        }
    }
    enter_phase(m, MP_PHASE_LM_HEAD);
    be->matmul_forward(m->logits, m->lnf, m->lnf_bf16, m->wte, weight_bf16(m, m->wte), NULL, N, C,
                       V);
    if (!targets) {
        mp_model_phase(m, MP_PHASE_NONE);
        return 0.0f;
    }
    enter_phase(m, MP_PHASE_LOSS);
    be->crossentropy_forward(m->losses, m->ce_stats, m->logits, m->targets, N, V);
    float *losses = mp_malloc((size_t)N * sizeof(float));
    be->to_host(losses, m->losses, (size_t)N * sizeof(float));
    double sum = 0.0;
    for (int i = 0; i < N; i++) sum += losses[i];
    free(losses);
    mp_model_phase(m, MP_PHASE_NONE);
    return (float)(sum / N);
}

void mp_model_backward(mp_model *m, float loss_scale) {
    const mp_config *c = &m->cfg;
    const mp_backend *be = m->be;
    use_precision(m);
    if (!m->has_targets) mp_fatal("backward without a forward on targets");
    int B = m->last_B, T = m->last_T, N = B * T;
    int C = c->d_model, NH = c->n_heads, V = c->vocab_size;
    size_t NC = (size_t)N * C * sizeof(float);

    m->in_backward = 1;
    enter_phase(m, MP_PHASE_LOSS);
    // bf16 mode: dlogits exists only as its twin (the LM head has no bias to sum it for)
    be->crossentropy_backward(m->dlogits, m->dlogits_bf16, m->logits, m->ce_stats, m->targets,
                              loss_scale / N, N, V);
    // Activation gradients with one producer are written by it (backend.h); dres, the
    // residual stream's, collects both branches of every block through the LayerNorms,
    // and its twin is the rounding of the sum after each of them.
    enter_phase(m, MP_PHASE_LM_HEAD);
    be->matmul_backward(m->dln, m->dwte, NULL, m->dlogits, m->dlogits_bf16, m->lnf, m->lnf_bf16,
                        m->wte, weight_bf16(m, m->wte), N, C, V, 0);
    enter_phase(m, MP_PHASE_NORM);
    be->zero(m->dres, NC);
    // dres's twin feeds the last block's MLP (a PEER / PKM block reads dy in fp32)
    be->layernorm_backward(m->dres, m->ret[c->n_layers - 1] ? NULL : m->dres_bf16, m->dlnfw,
                           m->dlnfb, m->dln, m->res_out, m->lnfw, m->lnf_mean, m->lnf_rstd, N, C);
    for (int l = c->n_layers - 1; l >= 0; l--) {
        block_params *p = &m->p[l], *g = &m->g[l];
        block_acts *a = &m->a[l];
        // dres holds d(block output): the FFN branch, then LN2 adds into dres
        mp_model_ffn_backward(m, l, m->dln, m->dres, m->dres_bf16, a->ln2, a->ln2_bf16, N);
        enter_phase(m, MP_PHASE_NORM);
        be->layernorm_backward(m->dres, m->dres_bf16, g->ln2w, g->ln2b, m->dln, a->res_mid,
                               p->ln2w, a->ln2_mean, a->ln2_rstd, N, C);
        // dres now holds d(res_mid): the attention branch, then LN1 adds into dres
        enter_phase(m, MP_PHASE_ATTN_MATMUL);
        be->matmul_backward(m->datty, g->projw, g->projb, m->dres, m->dres_bf16, a->atty,
                            a->atty_bf16, p->projw, weight_bf16(m, p->projw), N, C, C, 0);
        enter_phase(m, MP_PHASE_ATTENTION);
        // qkv's bias gradient in the pass that writes dqkv (backend.h), not by reading it again
        be->attention_backward(m->dqkv, m->dqkv_bf16, g->qkvb, m->datty, a->qkv, a->atty, a->att,
                               B, T, C, NH);
        enter_phase(m, MP_PHASE_ATTN_MATMUL);
        be->matmul_backward(m->dln, g->qkvw, NULL, m->dqkv, m->dqkv_bf16, a->ln1, a->ln1_bf16,
                            p->qkvw, weight_bf16(m, p->qkvw), N, C, 3 * C, 0);
        enter_phase(m, MP_PHASE_NORM);
        // dres's twin feeds block l-1's MLP; block 0's LN1 feeds only the embeddings' fp32
        // sums, and a PEER / PKM block reads dy in fp32
        int twin = l > 0 && !m->ret[l - 1];
        be->layernorm_backward(m->dres, twin ? m->dres_bf16 : NULL, g->ln1w, g->ln1b, m->dln,
                               a->res_in, p->ln1w, a->ln1_mean, a->ln1_rstd, N, C);
    }
    enter_phase(m, MP_PHASE_EMBED);
    be->encoder_backward(m->dwte, m->dwpe, m->dres, m->inputs, B, T, C, c->vocab_size);
    mp_model_phase(m, MP_PHASE_NONE);
}

void mp_model_usage_enable(mp_model *m, int on) {
    m->usage_on = on;
    for (int l = 0; l < m->cfg.n_layers; l++) {
        mp_retrieval_layer *r = m->ret[l];
        if (!r) continue;
        if (on && !r->usage) r->usage = mp_calloc((size_t)r->rc->n_experts, sizeof(double));
        if (!on) { free(r->usage); r->usage = NULL; }
    }
}

int mp_model_n_retrieval(const mp_model *m) { return m->n_ret; }
int mp_model_retrieval_block(const mp_model *m, int i) { return m->ret_block[i]; }
const double *mp_model_usage(const mp_model *m, int i, long *n_experts) {
    mp_retrieval_layer *r = m->ret[m->ret_block[i]];
    if (n_experts) *n_experts = r->rc->n_experts;
    return r->usage;
}

mp_exchange_stats *mp_model_exchange_stats(mp_model *m, int i) {
    return &m->ret[m->ret_block[i]]->ex.stats;
}

void mp_model_allreduce_grads(mp_model *m) {
    if (!m->comm || m->comm->size == 1) return;
    // replicated groups only: expert gradients already sit with the rank owning the rows.
    // The transport takes the backend's memory (mp_exchange_init checked), so the
    // gradients go as they are: NCCL on the GPU, MPI on the host, or staged through it.
    const int groups[2] = {MP_GROUP_DENSE, MP_GROUP_KEYS};
    for (int i = 0; i < 2; i++)
        m->comm->allreduce_f32(m->comm, m->grads[groups[i]], m->group_size[groups[i]]);
}
