// The run configuration: defaults, INI parsing (inih), --set overrides, validation, and the
// resolved INI text that is printed, saved in the run directory and hashed across ranks.
//
// Division of labour: mp_config_set only checks that a value has the right type (an integer,
// a number, a boolean, one of a few words); every range and every rule that involves two keys
// lives in mp_config_validate, which runs once after the file and the overrides are applied,
// so the order of keys in the file never matters.
#include "core/log.h"
#include "millipede/config.h"
#include "millipede/data.h"

#include <ctype.h>
#include <errno.h>
#include <inttypes.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include <ini.h>

// Hard limits beyond which a value is surely a mistake (and index types would overflow).
// Expert ids e = a*n + b are int32 in the route, the routing plan, the records exchanged
// between ranks and the CUDA kernels: the largest square below 2^31 (46340^2). Past it the
// ids would wrap negative and the plan would write out of bounds.
#define MAX_EXPERTS_SUB 46340L
#define MAX_EXPERTS (MAX_EXPERTS_SUB * MAX_EXPERTS_SUB)
#define MAX_CONTEXT (1 << 20)
#define MAX_FILE_BYTES (1 << 20)

// model.ffn as written by mp_config_set: a single kind fills all MP_MAX_LAYERS entries, a list
// of m kinds fills m entries followed by FFN_END, so validation can tell "one kind for every
// layer" from "a list of the wrong length" whatever order n_layers and ffn were given in.
// Resolution (after validation) replaces everything past n_layers by dense.
#define FFN_END ((mp_ffn_kind)255)

// ----------------------------------------------------------------------------------------
// the key table: one row per key, in the order mp_config_to_ini writes them

typedef enum { K_INT, K_LONG, K_U64, K_FLOAT, K_BOOL, K_STR, K_FFN, K_ACT } key_type;

typedef struct {
    const char *section;
    const char *name;
    key_type type;
    size_t offset;   // of the field in mp_config
    size_t size;     // K_STR: capacity of the char array
} key_spec;

#define OFF(field) offsetof(mp_config, field)
#define KEY(sec, name, type, field) {sec, name, type, OFF(field), 0}
#define STR(sec, name, field) {sec, name, K_STR, OFF(field), sizeof(((mp_config *)0)->field)}
#define RETRIEVAL_KEYS(sec, r)                                \
    KEY(sec, "experts", K_LONG, r.n_experts),                 \
    KEY(sec, "heads", K_INT, r.heads),                        \
    KEY(sec, "topk", K_INT, r.topk),                          \
    KEY(sec, "key_dim", K_INT, r.key_dim),                    \
    KEY(sec, "query_bn", K_BOOL, r.query_bn),                 \
    KEY(sec, "bn_momentum", K_FLOAT, r.bn_momentum),          \
    KEY(sec, "bn_eps", K_FLOAT, r.bn_eps),                    \
    KEY(sec, "balance_rate", K_FLOAT, r.balance_rate)

static const key_spec KEYS[] = {
    STR("run", "dir", run_dir),
    KEY("model", "vocab_size", K_INT, vocab_size),
    KEY("model", "context", K_INT, context),
    KEY("model", "d_model", K_INT, d_model),
    KEY("model", "n_layers", K_INT, n_layers),
    KEY("model", "n_heads", K_INT, n_heads),
    KEY("model", "dense_hidden", K_INT, dense_hidden),
    KEY("model", "ffn", K_FFN, ffn),
    KEY("model", "init_std", K_FLOAT, init_std),
    RETRIEVAL_KEYS("peer", peer),
    KEY("peer", "activation", K_ACT, peer.activation),   // PKM has no expert activation
    RETRIEVAL_KEYS("pkm", pkm),
    KEY("train", "steps", K_LONG, steps),
    KEY("train", "seed", K_U64, seed),
    KEY("train", "batch_size", K_INT, batch_size),
    KEY("train", "grad_accum", K_INT, grad_accum),
    KEY("train", "lr", K_FLOAT, lr),
    KEY("train", "min_lr_frac", K_FLOAT, min_lr_frac),
    KEY("train", "warmup", K_LONG, warmup),
    KEY("train", "weight_decay", K_FLOAT, weight_decay),
    KEY("train", "beta1", K_FLOAT, beta1),
    KEY("train", "beta2", K_FLOAT, beta2),
    KEY("train", "eps", K_FLOAT, eps),
    KEY("train", "grad_clip", K_FLOAT, grad_clip),
    KEY("train", "expert_lr", K_FLOAT, expert_lr),
    KEY("train", "expert_weight_decay", K_FLOAT, expert_weight_decay),
    STR("train", "expert_optimizer", expert_optimizer),
    KEY("train", "key_lr", K_FLOAT, key_lr),
    KEY("train", "key_weight_decay", K_FLOAT, key_weight_decay),
    KEY("train", "log_every", K_LONG, log_every),
    KEY("train", "eval_every", K_LONG, eval_every),
    KEY("train", "eval_batches", K_INT, eval_batches),
    KEY("train", "profile", K_BOOL, profile),
    STR("data", "train", train_path),
    STR("data", "val", val_path),
    KEY("checkpoint", "every", K_LONG, ckpt_every),
    KEY("checkpoint", "keep", K_INT, ckpt_keep),
    KEY("system", "threads", K_INT, threads),
    STR("system", "backend", backend),
    STR("system", "precision", precision),
    STR("system", "transport", transport),
    KEY("system", "nccl_timeout", K_FLOAT, nccl_timeout),
    KEY("system", "hang_timeout", K_FLOAT, hang_timeout),
};
#define N_KEYS ((int)(sizeof KEYS / sizeof KEYS[0]))

static const char *FFN_NAMES[] = {"dense", "peer", "pkm"};
static const char *ACT_NAMES[] = {"gelu", "relu"};

// ----------------------------------------------------------------------------------------
// small helpers


// Copies src into a fixed char array, zero-filling the rest so that equal configurations are
// equal byte for byte (the round-trip test compares them with memcmp).
static void set_string(char *dst, size_t cap, const char *src) {
    memset(dst, 0, cap);
    memcpy(dst, src, strnlen(src, cap - 1));
}

static long isqrt_long(long n) {
    if (n <= 0) return 0;
    long r = (long)sqrt((double)n);
    while (r > 0 && r * r > n) r--;
    while ((r + 1) * (r + 1) <= n) r++;
    return r;
}

// Levenshtein distance, for "did you mean" hints on misspelt keys (names are short).
static int edit_distance(const char *a, const char *b) {
    int la = (int)strlen(a), lb = (int)strlen(b);
    if (la > 63 || lb > 63) return 99;
    int row[64];
    for (int j = 0; j <= lb; j++) row[j] = j;
    for (int i = 1; i <= la; i++) {
        int diag = row[0];
        row[0] = i;
        for (int j = 1; j <= lb; j++) {
            int up = row[j];
            int best = diag + (a[i - 1] != b[j - 1]);
            if (up + 1 < best) best = up + 1;
            if (row[j - 1] + 1 < best) best = row[j - 1] + 1;
            row[j] = best;
            diag = up;
        }
    }
    return row[lb];
}

static const key_spec *find_key(const char *section, const char *name) {
    for (int i = 0; i < N_KEYS; i++)
        if (!strcmp(KEYS[i].section, section) && !strcmp(KEYS[i].name, name)) return &KEYS[i];
    return NULL;
}

static int known_section(const char *section) {
    for (int i = 0; i < N_KEYS; i++)
        if (!strcmp(KEYS[i].section, section)) return 1;
    return 0;
}

// "unknown key 'train.stpes' (did you mean 'train.steps'?)"
static int unknown_key(const char *section, const char *name, char *err, size_t err_len) {
    if (!*section)
        return mp_errf(err, err_len, "key '%s' is outside any [section]", name);
    char full[160], best[160] = "";
    snprintf(full, sizeof full, "%s.%s", section, name);
    int best_d = 3;   // suggest only close misspellings
    for (int i = 0; i < N_KEYS; i++) {
        char cand[160];
        snprintf(cand, sizeof cand, "%s.%s", KEYS[i].section, KEYS[i].name);
        int d = edit_distance(full, cand);
        if (d < best_d) best_d = d, snprintf(best, sizeof best, "%s", cand);
    }
    for (int i = 0; i < N_KEYS; i++)   // e.g. pkm.activation: only [peer] has that key
        if (!strcmp(KEYS[i].name, name) && known_section(section))
            return mp_errf(err, err_len, "unknown key '%s' (only [%s] has '%s')", full, KEYS[i].section,
                        name);
    if (known_section(section))
        return *best ? mp_errf(err, err_len, "unknown key '%s' (did you mean '%s'?)", full, best)
                     : mp_errf(err, err_len, "unknown key '%s'", full);
    return *best ? mp_errf(err, err_len, "unknown section '[%s]' in key '%s' (did you mean '%s'?)",
                        section, full, best)
                 : mp_errf(err, err_len, "unknown section '[%s]' (key '%s')", section, full);
}

// ----------------------------------------------------------------------------------------
// typed value parsing: the whole text must be the value

static int parse_long(const char *s, long *out) {
    if (!*s || isspace((unsigned char)*s)) return 0;
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (*end || end == s) return 0;
    if (errno == ERANGE) return -1;
    *out = v;
    return 1;
}

static int parse_bool(const char *s, int *out) {
    static const char *yes[] = {"true", "1", "yes", "on"}, *no[] = {"false", "0", "no", "off"};
    for (int i = 0; i < 4; i++) {
        if (!strcasecmp(s, yes[i])) return *out = 1, 1;
        if (!strcasecmp(s, no[i])) return *out = 0, 1;
    }
    return 0;
}

static int parse_ffn(const char *s, mp_ffn_kind *ffn, const char *full, char *err, size_t err_len) {
    mp_ffn_kind kinds[MP_MAX_LAYERS];
    int m = 0;
    const char *p = s;
    for (;;) {
        const char *comma = strchr(p, ',');
        size_t len = comma ? (size_t)(comma - p) : strlen(p);
        while (len && isspace((unsigned char)*p)) p++, len--;
        while (len && isspace((unsigned char)p[len - 1])) len--;
        int kind = -1;
        for (int k = 0; k < 3; k++)
            if (len == strlen(FFN_NAMES[k]) && !strncasecmp(p, FFN_NAMES[k], len)) kind = k;
        if (kind < 0)
            return mp_errf(err, err_len,
                        "key '%s': expected dense, peer or pkm (one kind for every layer, or a "
                        "comma-separated list of model.n_layers kinds), got '%.*s'",
                        full, (int)(len > 40 ? 40 : len), p);
        if (m == MP_MAX_LAYERS)
            return mp_errf(err, err_len, "key '%s': more than %d layers listed", full, MP_MAX_LAYERS);
        kinds[m++] = (mp_ffn_kind)kind;
        if (!comma) break;
        p = comma + 1;
    }
    for (int l = 0; l < MP_MAX_LAYERS; l++)
        ffn[l] = m == 1 ? kinds[0] : l < m ? kinds[l] : FFN_END;
    return 0;
}

// Applies one typed value; messages name the key as "section.key".
static int set_value(mp_config *cfg, const key_spec *k, const char *value, char *err,
                     size_t err_len) {
    char full[160];
    snprintf(full, sizeof full, "%s.%s", k->section, k->name);
    char *field = (char *)cfg + k->offset;
    // Error messages quote the value; cap it so a pasted blob stays one readable line.
    int vq = (int)strnlen(value, 80);
    switch (k->type) {
    case K_INT:
    case K_LONG: {
        long v;
        int r = parse_long(value, &v);
        if (r == 0) return mp_errf(err, err_len, "key '%s': expected an integer, got '%.*s'", full, vq, value);
        if (r < 0 || (k->type == K_INT && (v < INT_MIN || v > INT_MAX)))
            return mp_errf(err, err_len, "key '%s': %.*s is out of range", full, vq, value);
        if (k->type == K_INT) *(int *)field = (int)v;
        else *(long *)field = v;
        if (k->offset == OFF(peer.n_experts) || k->offset == OFF(pkm.n_experts)) {
            // n_sub is derived; out-of-range N is reported by validation.
            mp_retrieval_config *rc =
                (mp_retrieval_config *)(field - offsetof(mp_retrieval_config, n_experts));
            rc->n_sub = v >= 1 && v <= MAX_EXPERTS ? (int)isqrt_long(v) : 0;
        }
        return 0;
    }
    case K_U64: {
        char *end;
        errno = 0;
        unsigned long long v = 0;
        if (isdigit((unsigned char)value[0])) v = strtoull(value, &end, 10);
        if (!isdigit((unsigned char)value[0]) || *end)
            return mp_errf(err, err_len, "key '%s': expected a non-negative integer, got '%.*s'",
                        full, vq, value);
        if (errno == ERANGE) return mp_errf(err, err_len, "key '%s': %.*s is out of range", full, vq, value);
        *(uint64_t *)field = (uint64_t)v;
        return 0;
    }
    case K_FLOAT: {
        // strtof directly (not strtod then a cast): the text written by mp_config_to_ini
        // must read back as the identical float.
        char *end = (char *)value;
        float v = 0.0f;
        if (*value && !isspace((unsigned char)*value)) v = strtof(value, &end);
        if (end == value || *end)
            return mp_errf(err, err_len, "key '%s': expected a number, got '%.*s'", full, vq, value);
        if (!isfinite(v))
            return mp_errf(err, err_len, "key '%s': expected a finite number, got '%.*s'", full, vq, value);
        *(float *)field = v;
        return 0;
    }
    case K_BOOL: {
        int v;
        if (!parse_bool(value, &v))
            return mp_errf(err, err_len,
                        "key '%s': expected true or false (or 1/0, yes/no, on/off), got '%.*s'",
                        full, vq, value);
        *(int *)field = v;
        return 0;
    }
    case K_STR: {
        // A value in double quotes is taken without them (as Python's configparser users expect).
        size_t len = strlen(value);
        if (len >= 2 && value[0] == '"' && value[len - 1] == '"') value++, len -= 2;
        if (len >= k->size)
            return mp_errf(err, err_len, "key '%s': longer than %zu characters", full, k->size - 1);
        for (size_t i = 0; i < len; i++)
            if (iscntrl((unsigned char)value[i]))
                return mp_errf(err, err_len, "key '%s': contains a control character", full);
        memset(field, 0, k->size);
        memcpy(field, value, len);
        return 0;
    }
    case K_FFN:
        return parse_ffn(value, (mp_ffn_kind *)field, full, err, err_len);
    case K_ACT:
        for (int a = 0; a < 2; a++)
            if (!strcasecmp(value, ACT_NAMES[a])) return *(mp_activation *)field = (mp_activation)a, 0;
        return mp_errf(err, err_len, "key '%s': expected gelu or relu, got '%.*s'", full, vq, value);
    }
    return mp_errf(err, err_len, "key '%s': internal error (unknown type)", full);
}

// ----------------------------------------------------------------------------------------
// public: defaults and set

void mp_config_defaults(mp_config *cfg) {
    memset(cfg, 0, sizeof *cfg);   // also zeroes padding and string tails (memcmp-comparable)
    set_string(cfg->run_dir, sizeof cfg->run_dir, "runs/default");
    cfg->vocab_size = 256;
    cfg->context = 128;
    cfg->d_model = 128;
    cfg->n_layers = 4;
    cfg->n_heads = 4;
    cfg->dense_hidden = 0;   // 0 = 4 * d_model, resolved after loading
    for (int l = 0; l < MP_MAX_LAYERS; l++) cfg->ffn[l] = MP_FFN_DENSE;
    mp_retrieval_config r = {0};
    r.n_experts = 65536;
    r.n_sub = 256;
    r.heads = 4;
    r.topk = 8;
    r.key_dim = 64;
    r.query_bn = 1;
    r.bn_momentum = 0.1f;
    r.bn_eps = 1e-5f;
    r.activation = MP_ACT_GELU;
    cfg->peer = r;
    cfg->pkm = r;   // pkm.activation is unused (and not a key)
    cfg->init_std = 0.02f;
    cfg->steps = 1000;
    cfg->seed = 1337;
    cfg->batch_size = 8;
    cfg->grad_accum = 1;
    cfg->lr = 1e-3f;
    cfg->min_lr_frac = 0.1f;
    cfg->warmup = 100;
    cfg->weight_decay = 0.1f;
    cfg->beta1 = 0.9f;
    cfg->beta2 = 0.95f;
    cfg->eps = 1e-8f;
    cfg->grad_clip = 1.0f;
    cfg->expert_lr = 1e-3f;
    cfg->expert_weight_decay = 0.0f;
    set_string(cfg->expert_optimizer, sizeof cfg->expert_optimizer, "adamw");
    cfg->key_lr = 1e-3f;
    cfg->key_weight_decay = 0.0f;
    cfg->log_every = 10;
    cfg->eval_every = 200;
    cfg->eval_batches = 8;
    set_string(cfg->train_path, sizeof cfg->train_path, "data/demo/train.bin");
    set_string(cfg->val_path, sizeof cfg->val_path, "data/demo/val.bin");
    cfg->ckpt_every = 0;
    cfg->ckpt_keep = 3;
    cfg->threads = 0;
    set_string(cfg->backend, sizeof cfg->backend, "cpu");
    set_string(cfg->precision, sizeof cfg->precision, "fp32");
    set_string(cfg->transport, sizeof cfg->transport, "auto");
    cfg->nccl_timeout = 600.0f;
    cfg->hang_timeout = 1800.0f;
}

int mp_config_set(mp_config *cfg, const char *section, const char *key, const char *value,
                  char *err, size_t err_len) {
    const key_spec *k = find_key(section, key);
    if (!k) return unknown_key(section, key, err, err_len);
    return set_value(cfg, k, value, err, err_len);
}

// ----------------------------------------------------------------------------------------
// validation

#define CHECK(cond, ...)                                     \
    do {                                                     \
        if (!(cond)) return mp_errf(err, err_len, __VA_ARGS__); \
    } while (0)

static int validate_retrieval(const mp_retrieval_config *r, const char *s, char *err, size_t err_len) {
    CHECK(r->n_experts >= 1 && r->n_experts <= MAX_EXPERTS,
          "key '%s.experts': %ld is out of range [1, %ld = %ld^2] (expert ids are 32-bit)", s,
          r->n_experts, MAX_EXPERTS, MAX_EXPERTS_SUB);
    long n = isqrt_long(r->n_experts);
    CHECK(n * n == r->n_experts, "key '%s.experts': %ld is not a perfect square (N = n*n)", s,
          r->n_experts);
    CHECK(r->n_sub == n, "key '%s.experts': n_sub = %d does not match sqrt(%ld) (set experts with "
          "mp_config_set)", s, r->n_sub, r->n_experts);
    CHECK(r->heads >= 1, "key '%s.heads': must be >= 1, got %d", s, r->heads);
    CHECK(r->topk >= 1, "key '%s.topk': must be >= 1, got %d", s, r->topk);
    CHECK(r->topk <= n, "key '%s.topk': %d exceeds the %ld sub-keys per half (n = sqrt(%s.experts))",
          s, r->topk, n, s);
    CHECK(r->key_dim >= 2 && r->key_dim % 2 == 0,
          "key '%s.key_dim': must be even and > 0 (two halves of dk/2), got %d", s, r->key_dim);
    CHECK((long)r->heads * r->key_dim <= INT_MAX / 2,
          "key '%s.heads': heads * key_dim = %ld is too large", s, (long)r->heads * r->key_dim);
    CHECK(r->bn_momentum >= 0 && r->bn_momentum <= 1,
          "key '%s.bn_momentum': must be in [0, 1], got %g", s, (double)r->bn_momentum);
    CHECK(r->bn_eps > 0, "key '%s.bn_eps': must be > 0, got %g", s, (double)r->bn_eps);
    // a bias moves by the rate each step; at 1 it would outweigh any score within a step
    CHECK(r->balance_rate >= 0 && r->balance_rate <= 1,
          "key '%s.balance_rate': must be in [0, 1], got %g", s, (double)r->balance_rate);
    CHECK(r->activation == MP_ACT_GELU || r->activation == MP_ACT_RELU,
          "key '%s.activation': invalid value", s);
    return 0;
}

int mp_config_validate(const mp_config *c, char *err, size_t err_len) {
    CHECK(c->run_dir[0], "key 'run.dir': must not be empty");
    // [model]
    CHECK(c->vocab_size >= 2 && c->vocab_size <= 65536,
          "key 'model.vocab_size': must be in [2, 65536] (tokens are stored as uint16), got %d",
          c->vocab_size);
    CHECK(c->context >= 1 && c->context <= MAX_CONTEXT,
          "key 'model.context': must be in [1, %d], got %d", MAX_CONTEXT, c->context);
    CHECK(c->d_model >= 1, "key 'model.d_model': must be >= 1, got %d", c->d_model);
    CHECK(c->n_heads >= 1, "key 'model.n_heads': must be >= 1, got %d", c->n_heads);
    CHECK(c->d_model % c->n_heads == 0,
          "key 'model.d_model': %d is not divisible by model.n_heads = %d", c->d_model, c->n_heads);
    CHECK(c->n_layers >= 1 && c->n_layers <= MP_MAX_LAYERS,
          "key 'model.n_layers': must be in [1, %d], got %d", MP_MAX_LAYERS, c->n_layers);
    CHECK(c->dense_hidden >= 0, "key 'model.dense_hidden': must be >= 0 (0 = 4*d_model), got %d",
          c->dense_hidden);
    CHECK(c->dense_hidden > 0 || c->d_model <= INT_MAX / 4, "key 'model.d_model': too large");
    int listed = -1;   // length of an explicit list, -1 for "one kind for every layer"
    for (int l = 0; l < MP_MAX_LAYERS && listed < 0; l++)
        if (c->ffn[l] == FFN_END) listed = l;
    CHECK(listed < 0 || listed == c->n_layers,
          "key 'model.ffn': lists %d kinds but model.n_layers = %d (give one kind for every "
          "layer, or exactly n_layers)", listed, c->n_layers);
    int any_peer = 0, any_pkm = 0;
    for (int l = 0; l < c->n_layers; l++) {
        CHECK(c->ffn[l] == MP_FFN_DENSE || c->ffn[l] == MP_FFN_PEER || c->ffn[l] == MP_FFN_PKM,
              "key 'model.ffn': layer %d has an invalid kind", l);
        any_peer |= c->ffn[l] == MP_FFN_PEER;
        any_pkm |= c->ffn[l] == MP_FFN_PKM;
    }
    CHECK(c->init_std > 0, "key 'model.init_std': must be > 0, got %g", (double)c->init_std);
    // [peer], [pkm]: only when some layer uses them, so a dense config need not care.
    if (any_peer && validate_retrieval(&c->peer, "peer", err, err_len) < 0) return -1;
    if (any_pkm && validate_retrieval(&c->pkm, "pkm", err, err_len) < 0) return -1;
    // [train]
    // the sampler's limits (data.h) and the int token count of a micro-batch (B * T)
    CHECK(c->steps >= 0 && c->steps < (1L << MP_SAMPLER_STEP_BITS),
          "key 'train.steps': must be in [0, %ld), got %ld", 1L << MP_SAMPLER_STEP_BITS, c->steps);
    CHECK(c->batch_size >= 1 && c->batch_size <= 1 << MP_SAMPLER_J_BITS,
          "key 'train.batch_size': must be in [1, %d], got %d", 1 << MP_SAMPLER_J_BITS,
          c->batch_size);
    CHECK(c->grad_accum >= 1 && c->grad_accum <= 1 << MP_SAMPLER_MICRO_BITS,
          "key 'train.grad_accum': must be in [1, %d], got %d", 1 << MP_SAMPLER_MICRO_BITS,
          c->grad_accum);
    CHECK((long long)c->batch_size * c->context <= INT_MAX,
          "keys 'train.batch_size' x 'model.context': %d x %d tokens per micro-batch, more than "
          "%d", c->batch_size, c->context, INT_MAX);
    CHECK(c->lr > 0, "key 'train.lr': must be > 0, got %g", (double)c->lr);
    CHECK(c->min_lr_frac >= 0 && c->min_lr_frac <= 1,
          "key 'train.min_lr_frac': must be in [0, 1], got %g", (double)c->min_lr_frac);
    CHECK(c->warmup >= 0, "key 'train.warmup': must be >= 0, got %ld", c->warmup);
    CHECK(c->weight_decay >= 0, "key 'train.weight_decay': must be >= 0, got %g",
          (double)c->weight_decay);
    CHECK(c->beta1 > 0 && c->beta1 < 1, "key 'train.beta1': must be in (0, 1), got %g", (double)c->beta1);
    CHECK(c->beta2 > 0 && c->beta2 < 1, "key 'train.beta2': must be in (0, 1), got %g", (double)c->beta2);
    CHECK(c->eps > 0, "key 'train.eps': must be > 0, got %g", (double)c->eps);
    CHECK(c->grad_clip >= 0, "key 'train.grad_clip': must be >= 0 (0 = off), got %g",
          (double)c->grad_clip);
    CHECK(c->expert_lr >= 0, "key 'train.expert_lr': must be >= 0, got %g", (double)c->expert_lr);
    CHECK(c->expert_weight_decay >= 0, "key 'train.expert_weight_decay': must be >= 0, got %g",
          (double)c->expert_weight_decay);
    CHECK(c->key_lr >= 0, "key 'train.key_lr': must be >= 0, got %g", (double)c->key_lr);
    CHECK(c->key_weight_decay >= 0, "key 'train.key_weight_decay': must be >= 0, got %g",
          (double)c->key_weight_decay);
    CHECK(c->log_every >= 1, "key 'train.log_every': must be >= 1, got %ld", c->log_every);
    CHECK(c->eval_every >= 0, "key 'train.eval_every': must be >= 0 (0 = only at the end), got %ld",
          c->eval_every);
    CHECK(c->eval_batches >= 1, "key 'train.eval_batches': must be >= 1, got %d", c->eval_batches);
    // [data]
    CHECK(c->train_path[0], "key 'data.train': must not be empty");
    CHECK(c->val_path[0], "key 'data.val': must not be empty");
    // [checkpoint]
    CHECK(c->ckpt_every >= 0, "key 'checkpoint.every': must be >= 0 (0 = only at the end), got %ld",
          c->ckpt_every);
    CHECK(c->ckpt_keep >= 1, "key 'checkpoint.keep': must be >= 1, got %d", c->ckpt_keep);
    // [system]
    CHECK(c->threads >= 0, "key 'system.threads': must be >= 0 (0 = OpenMP default), got %d",
          c->threads);
    CHECK(!strcmp(c->backend, "cpu") || !strcmp(c->backend, "cuda"),
          "key 'system.backend': expected cpu or cuda, got '%s'", c->backend);
    CHECK(!strcmp(c->transport, "auto") || !strcmp(c->transport, "mpi") ||
          !strcmp(c->transport, "nccl") || !strcmp(c->transport, "mpi_staged"),
          "key 'system.transport': expected auto, mpi, nccl or mpi_staged, got '%s'", c->transport);
    CHECK(strcmp(c->transport, "mpi") || !strcmp(c->backend, "cpu"),
          "key 'system.transport': mpi moves host buffers and needs system.backend = cpu; the "
          "cuda backend's buffers are on the GPU (use auto, nccl or mpi_staged)");
    CHECK((strcmp(c->transport, "nccl") && strcmp(c->transport, "mpi_staged")) ||
              !strcmp(c->backend, "cuda"),
          "key 'system.transport': %s moves GPU buffers and needs system.backend = cuda, got "
          "backend '%s'", c->transport, c->backend);
    // a day at most: a wait longer than any step of a healthy job is a hang to end, not a
    // setting to disable
    CHECK(c->nccl_timeout > 0.0f && c->nccl_timeout <= 86400.0f,
          "key 'system.nccl_timeout': expected seconds in (0, 86400], got %g",
          (double)c->nccl_timeout);
    CHECK(c->hang_timeout >= 0.0f && c->hang_timeout <= 604800.0f,
          "key 'system.hang_timeout': expected seconds in [0, 604800] (0 = no watchdog), got %g",
          (double)c->hang_timeout);
    CHECK(!strcmp(c->expert_optimizer, "adamw") || !strcmp(c->expert_optimizer, "lazy_adamw"),
          "key 'train.expert_optimizer': expected adamw or lazy_adamw, got '%s'",
          c->expert_optimizer);
    CHECK(!strcmp(c->precision, "fp32") || !strcmp(c->precision, "bf16"),
          "key 'system.precision': expected fp32 or bf16, got '%s'", c->precision);
    CHECK(strcmp(c->precision, "bf16") || !strcmp(c->backend, "cuda"),
          "key 'system.precision': bf16 needs system.backend = cuda (the CPU backend computes "
          "in fp32), got backend '%s'", c->backend);
    return 0;
}

// Fills in what defaults leave open so the resolved config (printed, saved, hashed) shows
// real numbers: dense_hidden 0 -> 4*d_model, and a canonical ffn array. Call after validation.
static void resolve(mp_config *c) {
    if (c->dense_hidden == 0) c->dense_hidden = 4 * c->d_model;
    for (int l = c->n_layers; l < MP_MAX_LAYERS; l++) c->ffn[l] = MP_FFN_DENSE;
}

const mp_retrieval_config *mp_config_retrieval(const mp_config *cfg, int layer) {
    if (layer < 0 || layer >= cfg->n_layers || layer >= MP_MAX_LAYERS) return NULL;
    if (cfg->ffn[layer] == MP_FFN_PEER) return &cfg->peer;
    if (cfg->ffn[layer] == MP_FFN_PKM) return &cfg->pkm;
    return NULL;
}

// ----------------------------------------------------------------------------------------
// INI text -> config
//
// inih reads each line into a fixed buffer of INI_MAX_LINE (200) bytes and splits longer
// lines silently, and it reads an indented line as the continuation of the previous value.
// Paths and ffn lists of many layers can be longer than that, and indented keys are natural
// in hand-written files, so inih gets a prepared copy of the text, line for line (the line
// numbers it reports stay right):
//   - leading whitespace is dropped, comment lines are emptied;
//   - a "key = value" line too long for inih becomes "key = \x1f<i>", i referring to the
//     value kept aside (inline " ;" comment and surrounding blanks removed, as inih does);
//   - lines inih would reject or skip silently (no '=', no ']', text after ']') are errors
//     here, so that the only errors inih sees are the handler's and its line is exact.

#define LONG_MARK '\x1f'
#define LINE_LIMIT (INI_MAX_LINE - 3)   // room for "\r\n\0"

typedef struct {
    mp_config *cfg;
    char **long_values;
    int n_long;
    unsigned char seen[N_KEYS];   // the file may not give a key twice
    int failed;
    char msg[1200];               // the first handler error, without origin and line
} parse_ctx;

static int on_pair(void *user, const char *section, const char *name, const char *value) {
    parse_ctx *ctx = user;
    if (ctx->failed) return 1;   // keep the first error: inih reports the first failing line
    if (value[0] == LONG_MARK) {
        int i = atoi(value + 1);
        value = i >= 0 && i < ctx->n_long ? ctx->long_values[i] : "";
    }
    const key_spec *k = find_key(section, name);
    int rc;
    if (!k) {
        rc = unknown_key(section, name, ctx->msg, sizeof ctx->msg);
    } else if (ctx->seen[k - KEYS]) {
        rc = mp_errf(ctx->msg, sizeof ctx->msg, "key '%s.%s' is given twice", section, name);
    } else {
        ctx->seen[k - KEYS] = 1;
        rc = set_value(ctx->cfg, k, value, ctx->msg, sizeof ctx->msg);
    }
    if (rc < 0) ctx->failed = 1;
    return rc == 0;
}

static int is_blank(int ch) { return ch == ' ' || ch == '\t' || ch == '\r' || ch == '\f' || ch == '\v'; }

// Writes the prepared copy of text into out (at least strlen(text) + 2 bytes). Returns 0, or
// -1 with the 1-based line in *bad_line and the reason in err.
static int prepare_text(const char *text, char *out, parse_ctx *ctx, int *bad_line, char *err,
                        size_t err_len) {
    if (!strncmp(text, "\xEF\xBB\xBF", 3)) text += 3;   // UTF-8 byte-order mark
    char *o = out;
    int lineno = 0;
    for (const char *p = text; *p;) {
        lineno++;
        const char *eol = strchr(p, '\n');
        const char *next = eol ? eol + 1 : p + strlen(p);
        const char *s = p, *e = eol ? eol : next;
        while (s < e && is_blank(*s)) s++;
        while (e > s && is_blank(e[-1])) e--;
        size_t len = (size_t)(e - s);
        *bad_line = lineno;
        if (len == 0 || *s == ';' || *s == '#') {
            // blank or comment: nothing for inih
        } else if (*s == '[') {
            const char *close = memchr(s, ']', len);
            if (!close) return mp_errf(err, err_len, "expected ']' to close the section name");
            const char *rest = close + 1;
            while (rest < e && is_blank(*rest)) rest++;
            if (rest < e && *rest != ';' && *rest != '#')
                return mp_errf(err, err_len, "unexpected text after ']'");
            if ((size_t)(close + 1 - s) > LINE_LIMIT) return mp_errf(err, err_len, "section name too long");
            memcpy(o, s, (size_t)(close + 1 - s));
            o += close + 1 - s;
        } else {
            const char *eq = s;
            while (eq < e && *eq != '=' && *eq != ':') eq++;
            if (eq == e) return mp_errf(err, err_len, "expected 'key = value' or '[section]', got '%.*s'",
                                     (int)(len > 40 ? 40 : len), s);
            const char *kend = eq;
            while (kend > s && is_blank(kend[-1])) kend--;
            if (kend == s) return mp_errf(err, err_len, "missing key name before '%c'", *eq);
            if (len <= LINE_LIMIT) {
                memcpy(o, s, len);
                o += len;
            } else {
                if ((size_t)(kend - s) > 64) return mp_errf(err, err_len, "key name too long");
                const char *v = eq + 1, *vend = e;
                while (v < vend && is_blank(*v)) v++;
                for (const char *q = v + 1; q < vend; q++)   // inline comment: " ;"
                    if (*q == ';' && is_blank(q[-1])) { vend = q; break; }
                while (vend > v && is_blank(vend[-1])) vend--;
                char **grown = realloc(ctx->long_values, (size_t)(ctx->n_long + 1) * sizeof(char *));
                char *copy = malloc((size_t)(vend - v) + 1);
                if (!grown || !copy) {
                    if (grown) ctx->long_values = grown;
                    free(copy);
                    return mp_errf(err, err_len, "out of memory");
                }
                ctx->long_values = grown;
                memcpy(copy, v, (size_t)(vend - v));
                copy[vend - v] = '\0';
                ctx->long_values[ctx->n_long] = copy;
                o += sprintf(o, "%.*s=%c%d", (int)(kend - s), s, LONG_MARK, ctx->n_long);
                ctx->n_long++;
            }
        }
        *o++ = '\n';
        p = next;
    }
    *o = '\0';
    return 0;
}

// Parses INI text into cfg (which already holds defaults). Messages: "ORIGIN:LINE: ...".
static int parse_text(mp_config *cfg, const char *text, const char *origin, char *err,
                      size_t err_len) {
    parse_ctx *ctx = calloc(1, sizeof *ctx);
    char *prepared = malloc(strlen(text) + 2 + 16);
    if (!ctx || !prepared) {
        free(ctx);
        free(prepared);
        return mp_errf(err, err_len, "%s: out of memory", origin);
    }
    ctx->cfg = cfg;
    int rc = 0, bad_line = 0;
    char why[600];
    if (prepare_text(text, prepared, ctx, &bad_line, why, sizeof why) < 0) {
        rc = mp_errf(err, err_len, "%s:%d: %s", origin, bad_line, why);
    } else {
        int line = ini_parse_string(prepared, on_pair, ctx);
        if (line != 0 && ctx->failed)
            rc = mp_errf(err, err_len, "%s:%d: %s", origin, line, ctx->msg);
        else if (line != 0)   // inih found something the preparation let through
            rc = mp_errf(err, err_len, "%s:%d: cannot parse this line", origin, line);
    }
    for (int i = 0; i < ctx->n_long; i++) free(ctx->long_values[i]);
    free(ctx->long_values);
    free(ctx);
    free(prepared);
    return rc;
}

// Reads a whole (small) text file; NULL with err set on failure.
static char *read_text_file(const char *path, char *err, size_t err_len) {
    FILE *f = fopen(path, "rb");
    if (!f) {
        mp_errf(err, err_len, "%s: cannot open the config file: %s", path, strerror(errno));
        return NULL;
    }
    char *buf = malloc(MAX_FILE_BYTES + 1);
    size_t n = buf ? fread(buf, 1, MAX_FILE_BYTES + 1, f) : 0;
    int read_error = ferror(f), saved = errno;
    fclose(f);
    if (!buf) {
        mp_errf(err, err_len, "%s: out of memory", path);
    } else if (read_error) {
        mp_errf(err, err_len, "%s: cannot read the config file: %s", path, strerror(saved));
    } else if (n > MAX_FILE_BYTES) {
        mp_errf(err, err_len, "%s: larger than %d bytes, not a config file", path, MAX_FILE_BYTES);
    } else if (memchr(buf, '\0', n)) {
        mp_errf(err, err_len, "%s: contains a NUL byte, not a text config file", path);
    } else {
        buf[n] = '\0';
        return buf;
    }
    free(buf);
    return NULL;
}

// An override comes from the command line and may hold any byte, a newline too; the message
// that quotes it must stay one line, so control characters become '?'. Returns -1.
static int one_line(char *err, size_t err_len) {
    for (size_t i = 0; err && i < err_len && err[i]; i++)
        if ((unsigned char)err[i] < 0x20 || err[i] == 0x7f) err[i] = '?';
    return -1;
}

// "section.key=value" -> applied; blanks around the parts are ignored.
static int apply_override(mp_config *cfg, const char *ov, char *err, size_t err_len) {
    char sec[64], key[64];
    const char *eq = strchr(ov, '=');
    const char *dot = eq ? memchr(ov, '.', (size_t)(eq - ov)) : NULL;
    const char *s = ov, *se = dot, *k = dot ? dot + 1 : NULL, *ke = eq;
    if (dot) {
        while (s < se && isspace((unsigned char)*s)) s++;
        while (se > s && isspace((unsigned char)se[-1])) se--;
        while (k < ke && isspace((unsigned char)*k)) k++;
        while (ke > k && isspace((unsigned char)ke[-1])) ke--;
    }
    if (!eq || !dot || se == s || ke == k || se - s >= (long)sizeof sec || ke - k >= (long)sizeof key)
        return mp_errf(err, err_len, "--set '%.200s': expected section.key=value", ov);
    memcpy(sec, s, (size_t)(se - s));
    sec[se - s] = '\0';
    memcpy(key, k, (size_t)(ke - k));
    key[ke - k] = '\0';
    const char *v = eq + 1, *ve = v + strlen(v);
    while (v < ve && isspace((unsigned char)*v)) v++;
    while (ve > v && isspace((unsigned char)ve[-1])) ve--;
    char *value = malloc((size_t)(ve - v) + 1);
    if (!value) return mp_errf(err, err_len, "--set: out of memory");
    memcpy(value, v, (size_t)(ve - v));
    value[ve - v] = '\0';
    char msg[1200];
    int rc = mp_config_set(cfg, sec, key, value, msg, sizeof msg);
    free(value);
    if (rc < 0) return mp_errf(err, err_len, "--set: %s", msg);
    return 0;
}

int mp_config_load(mp_config *cfg, const char *path, char **overrides, int n_over, char *err,
                   size_t err_len) {
    mp_config_defaults(cfg);
    const char *origin = path ? path : n_over ? "--set" : "(defaults)";
    if (path) {
        char *text = read_text_file(path, err, err_len);
        if (!text) return -1;
        int rc = parse_text(cfg, text, path, err, err_len);
        free(text);
        if (rc < 0) return -1;
    }
    for (int i = 0; i < n_over; i++)
        if (apply_override(cfg, overrides[i], err, err_len) < 0) return one_line(err, err_len);
    char msg[1200];
    if (mp_config_validate(cfg, msg, sizeof msg) < 0)
        return mp_errf(err, err_len, "%s%s: %s", origin, path && n_over ? " (with --set)" : "", msg);
    resolve(cfg);
    return 0;
}

int mp_config_from_ini_string(mp_config *cfg, const char *text, const char *origin, char *err,
                              size_t err_len) {
    mp_config_defaults(cfg);
    if (!origin) origin = "(config text)";
    if (parse_text(cfg, text, origin, err, err_len) < 0) return -1;
    // Resolution needs a valid layer count and ffn list; a text that fails validation is
    // returned as parsed and the caller's mp_config_validate reports it.
    if (mp_config_validate(cfg, NULL, 0) == 0) resolve(cfg);
    return 0;
}

// ----------------------------------------------------------------------------------------
// config -> INI text

typedef struct {
    char *buf;
    size_t len, pos;
} writer;

static void emit(writer *w, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void emit(writer *w, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    char *dst = w->pos < w->len ? w->buf + w->pos : NULL;
    int n = vsnprintf(dst, dst ? w->len - w->pos : 0, fmt, ap);
    va_end(ap);
    if (n > 0) w->pos += (size_t)n;
}

// The shortest %g text that reads back (strtof) as exactly x: "0.1", not "0.100000001".
static void format_float(char *out, size_t n, float x) {
    for (int prec = 1; prec <= 9; prec++) {
        snprintf(out, n, "%.*g", prec, (double)x);
        if (strtof(out, NULL) == x) return;
    }
}

size_t mp_config_to_ini(const mp_config *cfg, char *buf, size_t len) {
    writer w = {buf, len, 0};
    if (buf && len) buf[0] = '\0';
    const char *section = "";
    for (int i = 0; i < N_KEYS; i++) {
        const key_spec *k = &KEYS[i];
        const char *field = (const char *)cfg + k->offset;
        if (strcmp(section, k->section)) {
            emit(&w, "%s[%s]\n", i ? "\n" : "", k->section);
            section = k->section;
        }
        emit(&w, "%s = ", k->name);
        switch (k->type) {
        case K_INT: {
            int v = *(const int *)field;
            if (k->offset == OFF(dense_hidden) && v == 0) v = 4 * cfg->d_model;   // resolved
            emit(&w, "%d\n", v);
            break;
        }
        case K_LONG: emit(&w, "%ld\n", *(const long *)field); break;
        case K_U64: emit(&w, "%" PRIu64 "\n", *(const uint64_t *)field); break;
        case K_FLOAT: {
            char num[32];
            format_float(num, sizeof num, *(const float *)field);
            emit(&w, "%s\n", num);
            break;
        }
        case K_BOOL: emit(&w, "%s\n", *(const int *)field ? "true" : "false"); break;
        case K_STR: emit(&w, "%s\n", field); break;
        case K_ACT: {
            mp_activation a = *(const mp_activation *)field;
            emit(&w, "%s\n", a == MP_ACT_RELU ? "relu" : "gelu");
            break;
        }
        case K_FFN: {
            // One kind when every layer has it, else the list of n_layers kinds.
            int L = cfg->n_layers < 1 ? 1 : cfg->n_layers > MP_MAX_LAYERS ? MP_MAX_LAYERS : cfg->n_layers;
            int uniform = 1;
            for (int l = 1; l < L; l++) uniform &= cfg->ffn[l] == cfg->ffn[0];
            for (int l = 0; l < (uniform ? 1 : L); l++) {
                unsigned kind = (unsigned)cfg->ffn[l];
                emit(&w, "%s%s", l ? "," : "", kind < 3 ? FFN_NAMES[kind] : "?");
            }
            emit(&w, "\n");
            break;
        }
        }
    }
    return w.pos;
}

uint64_t mp_config_hash(const mp_config *cfg) {
    size_t n = mp_config_to_ini(cfg, NULL, 0);
    char *text = malloc(n + 1);
    uint64_t h = 0xcbf29ce484222325ULL;   // FNV-1a 64 offset basis
    if (!text) {
        // Cannot happen for a few KiB; hash the raw struct rather than crash.
        const unsigned char *p = (const unsigned char *)cfg;
        for (size_t i = 0; i < sizeof *cfg; i++) h = (h ^ p[i]) * 0x100000001b3ULL;
        return h;
    }
    mp_config_to_ini(cfg, text, n + 1);
    for (size_t i = 0; i < n; i++) h = (h ^ (unsigned char)text[i]) * 0x100000001b3ULL;
    free(text);
    return h;
}
