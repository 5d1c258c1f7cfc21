// Sub-key ownership and the routing plan of one retrieval layer (docs/design.md, "Sharding").
// Rank r of P owns the first-half sub-keys a in [A_r, A_{r+1}), A_r = floor(r*n/P), i.e.
// the expert rows [A_r*n, A_{r+1}*n). The plan groups a rank's selections by owner: each
// owner receives every token with at least one selection there once, plus one record
// (token slot, local row, gate) per selection.
#pragma once
#include <stdint.h>

// A_r: the first sub-key of rank r (r may be P, giving n).
static inline long mp_shard_first_subkey(long n, int P, int r) { return (long)r * n / P; }
// The rank that owns expert e (e / n is its first-half sub-key).
int mp_shard_owner(long e, long n, int P);

typedef struct {
    int P;
    int64_t *tok_count, *tok_displ;   // (P) tokens sent to each owner, and where they start
    int64_t *rec_count, *rec_displ;   // (P) selection records sent to each owner
    int32_t *tok_list;                // (sum tok_count) local token of each sent row
    int32_t *rec_slot;                // (sum rec_count) its token's index within the owner's block
    int32_t *rec_row;                 // (sum rec_count) expert row local to the owner
    int32_t *rec_sel;                 // (sum rec_count) its selection index t*S + s here
    int64_t n_tok, n_rec;             // totals
    int64_t cap_tok, cap_rec;         // allocated lengths
} mp_shard_plan;

void mp_shard_plan_init(mp_shard_plan *p, int P);
void mp_shard_plan_free(mp_shard_plan *p);
// Builds the plan for sel (N, S) expert ids of the local tokens; n sub-keys per half.
// Within an owner's block tokens are in increasing order and records follow their tokens
// in selection order, so every reduction over the plan has a fixed order.
void mp_shard_plan_build(mp_shard_plan *p, const int32_t *sel, int N, int S, long n);
