#include "dist/shard_plan.h"
#include <stdlib.h>
#include <string.h>
#include "core/log.h"

int mp_shard_owner(long e, long n, int P) {
    long a = e / n;
    // A_r <= a < A_{r+1}  <=>  r = the largest r with floor(r*n/P) <= a
    int r = (int)(((a + 1) * (long)P - 1) / n);
    while (r > 0 && mp_shard_first_subkey(n, P, r) > a) r--;
    while (r + 1 < P && mp_shard_first_subkey(n, P, r + 1) <= a) r++;
    return r;
}

void mp_shard_plan_init(mp_shard_plan *p, int P) {
    memset(p, 0, sizeof *p);
    p->P = P;
    p->tok_count = mp_calloc(P, sizeof(int64_t));
    p->tok_displ = mp_calloc(P, sizeof(int64_t));
    p->rec_count = mp_calloc(P, sizeof(int64_t));
    p->rec_displ = mp_calloc(P, sizeof(int64_t));
}

void mp_shard_plan_free(mp_shard_plan *p) {
    free(p->tok_count); free(p->tok_displ); free(p->rec_count); free(p->rec_displ);
    free(p->tok_list); free(p->rec_slot); free(p->rec_row); free(p->rec_sel);
    memset(p, 0, sizeof *p);
}

static void reserve(int32_t **bufs[], int n_bufs, int64_t *cap, int64_t need) {
    if (need <= *cap) return;
    for (int i = 0; i < n_bufs; i++) {
        free(*bufs[i]);
        *bufs[i] = mp_malloc((size_t)need * sizeof(int32_t));
    }
    *cap = need;
}

void mp_shard_plan_build(mp_shard_plan *p, const int32_t *sel, int N, int S, long n) {
    int P = p->P;
    int32_t *owner = mp_malloc((size_t)N * S * sizeof(int32_t));   // (N, S)
    int32_t *last = mp_malloc((size_t)P * sizeof(int32_t));        // last token counted per owner
    memset(p->tok_count, 0, P * sizeof(int64_t));
    memset(p->rec_count, 0, P * sizeof(int64_t));
    for (int r = 0; r < P; r++) last[r] = -1;
    for (int t = 0; t < N; t++) {
        for (int s = 0; s < S; s++) {
            int r = P == 1 ? 0 : mp_shard_owner(sel[(size_t)t * S + s], n, P);
            owner[(size_t)t * S + s] = r;
            p->rec_count[r]++;
            if (last[r] != t) { last[r] = t; p->tok_count[r]++; }
        }
    }
    p->n_tok = p->n_rec = 0;
    for (int r = 0; r < P; r++) {
        p->tok_displ[r] = p->n_tok;
        p->rec_displ[r] = p->n_rec;
        p->n_tok += p->tok_count[r];
        p->n_rec += p->rec_count[r];
    }
    int32_t **tok_bufs[] = {&p->tok_list}, **rec_bufs[] = {&p->rec_slot, &p->rec_row, &p->rec_sel};
    reserve(tok_bufs, 1, &p->cap_tok, p->n_tok);
    reserve(rec_bufs, 3, &p->cap_rec, p->n_rec);

    int64_t *tok_fill = mp_malloc((size_t)P * sizeof(int64_t));
    int64_t *rec_fill = mp_malloc((size_t)P * sizeof(int64_t));
    for (int r = 0; r < P; r++) {
        tok_fill[r] = p->tok_displ[r];
        rec_fill[r] = p->rec_displ[r];
        last[r] = -1;
    }
    for (int t = 0; t < N; t++) {
        for (int s = 0; s < S; s++) {
            size_t o = (size_t)t * S + s;
            int r = owner[o];
            if (last[r] != t) { last[r] = t; p->tok_list[tok_fill[r]++] = t; }
            int64_t i = rec_fill[r]++;
            p->rec_slot[i] = (int32_t)(tok_fill[r] - 1 - p->tok_displ[r]);
            p->rec_row[i] = (int32_t)(sel[o] - mp_shard_first_subkey(n, P, r) * n);
            p->rec_sel[i] = (int32_t)o;
        }
    }
    free(tok_fill);
    free(rec_fill);
    free(owner);
    free(last);
}
