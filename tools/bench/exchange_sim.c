// exchange_sim: the expert exchange of one PEER layer at P ranks, simulated in one process
// (docs/benchmarks.md, "The exchange at 1 to 1024 ranks (simulated)").
//
//   exchange_sim sim --P P --n n [--H 8 --k 16 --C 1024 --B 4096] [--dist uniform |
//                    profile:FILE | replay:FILE] [--select pk|flat] [--ranks-max 64]
//                    [--alpha 2e-6 --beta 4.1667e-11] [--seed S] [--dump-sel FILE]
//       prints one JSON line: bytes per token (the accounting of src/model/exchange.c),
//       load imbalance over owners, and the alpha-beta time of the layer's all-to-alls.
//   exchange_sim dump CONFIG.ini (--model PATH | --init) --out FILE [--batches N] [--eval]
//                    [--set section.key=value]...
//       runs a stored model on validation batches (or, --init, the config's initial model
//       on the training batches of steps 0, 1, ...: what `millipede train` routes first)
//       and writes the first retrieval layer's selected expert ids (the file that profile:
//       and replay: read; replay: hands rank w the tokens [w B, (w+1) B), which are rank
//       w's sequences of the global batch when P divides train.batch_size).
//
// The routing plan is the project's own: every sampled virtual rank's selections go
// through mp_shard_plan_build (src/dist/shard_plan.c), and the counts it returns are what
// the real exchange would send. Ranks are data parallel on iid sequences, so every rank is
// statistically alike: only W = min(P, ranks-max) ranks are simulated, each with its full
// local batch of B tokens, and what the other ranks send an owner is estimated from them
// (scaled by (P-1)/W'). Memory is O(B*H*k + P), never P*B*H*k.
#include <errno.h>
#include <math.h>
#include <mpi.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "core/log.h"
#include "dist/shard_plan.h"
#include "millipede/checkpoint.h"
#include "millipede/config.h"
#include "millipede/data.h"
#include "millipede/model.h"
#include "model/model_private.h"

static const char MAGIC[8] = "MPXSEL1";   // selection dumps: magic, n, H, k, tokens, ids

static void usage_error(const char *fmt, const char *arg) {
    fprintf(stderr, "exchange_sim: error: ");
    fprintf(stderr, fmt, arg);
    fprintf(stderr, " (usage: exchange_sim sim --P P --n n [...] | exchange_sim dump CONFIG.ini --model PATH --out FILE)\n");
    exit(2);
}

static long parse_long(const char *flag, const char *v, long lo, long hi) {
    char *end;
    errno = 0;
    long x = strtol(v, &end, 10);
    if (errno || end == v || *end || x < lo || x > hi) {
        char buf[160];
        snprintf(buf, sizeof buf, "%s '%%s': expected an integer in [%ld, %ld]", flag, lo, hi);
        usage_error(buf, v);
    }
    return x;
}

static double parse_double(const char *flag, const char *v) {
    char *end;
    errno = 0;
    double x = strtod(v, &end);
    if (errno || end == v || *end || !(x >= 0) || isinf(x)) {
        char buf[120];
        snprintf(buf, sizeof buf, "%s '%%s': expected a non-negative number", flag);
        usage_error(buf, v);
    }
    return x;
}

// ---------------------------------------------------------------------------------------
// random numbers: splitmix64 (small, and each virtual rank gets its own stream from a seed)

typedef struct { uint64_t s; } rng_t;
static uint64_t rng_next(rng_t *r) {
    uint64_t z = (r->s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}
static double rng_unit(rng_t *r) { return ((rng_next(r) >> 11) + 0.5) * (1.0 / 9007199254740992.0); }
static long rng_below(rng_t *r, long n) { return (long)(rng_unit(r) * (double)n); }

// ---------------------------------------------------------------------------------------
// sub-key popularity: an alias table (O(1) per draw: selections are drawn by the billion)

typedef struct {
    long n;
    double *prob;
    long *alias;
} alias_t;

static void alias_build(alias_t *t, const double *w, long n) {
    double sum = 0;
    for (long i = 0; i < n; i++) sum += w[i];
    if (!(sum > 0)) mp_fatal("exchange_sim: a popularity profile with no mass");
    t->n = n;
    t->prob = mp_malloc((size_t)n * sizeof(double));
    t->alias = mp_malloc((size_t)n * sizeof(long));
    long *small = mp_malloc((size_t)n * sizeof(long)), *large = mp_malloc((size_t)n * sizeof(long));
    long ns = 0, nl = 0;
    for (long i = 0; i < n; i++) {
        t->prob[i] = w[i] * n / sum;
        t->alias[i] = i;
        if (t->prob[i] < 1.0) small[ns++] = i; else large[nl++] = i;
    }
    while (ns && nl) {
        long s = small[--ns], l = large[nl - 1];
        t->alias[s] = l;
        t->prob[l] -= 1.0 - t->prob[s];
        if (t->prob[l] < 1.0) { nl--; small[ns++] = l; }
    }
    for (long i = 0; i < nl; i++) t->prob[large[i]] = 1.0;   // rounding leftovers
    for (long i = 0; i < ns; i++) t->prob[small[i]] = 1.0;
    free(small);
    free(large);
}
static long alias_draw(const alias_t *t, rng_t *r) {
    long i = rng_below(r, t->n);
    return rng_unit(r) < t->prob[i] ? i : t->alias[i];
}
static void alias_free(alias_t *t) { free(t->prob); free(t->alias); }

// ---------------------------------------------------------------------------------------
// selection dumps

typedef struct {
    int32_t n, H, k;
    int64_t tokens;
    int32_t *ids;   // (tokens, H, k)
} seldump;

static void dump_read(seldump *d, const char *path) {
    FILE *f = fopen(path, "rb");
    if (!f) mp_input_error("exchange_sim: %s: %s", path, strerror(errno));
    char magic[8];
    if (fread(magic, 1, 8, f) != 8 || memcmp(magic, MAGIC, 8) ||
        fread(&d->n, 4, 1, f) != 1 || fread(&d->H, 4, 1, f) != 1 || fread(&d->k, 4, 1, f) != 1 ||
        fread(&d->tokens, 8, 1, f) != 1 || d->n < 1 || d->H < 1 || d->k < 1 || d->tokens < 1 ||
        d->tokens > (1ll << 32))
        mp_input_error("exchange_sim: %s: not a selection dump (exchange_sim dump writes them)", path);
    size_t m = (size_t)d->tokens * d->H * d->k;
    d->ids = mp_malloc(m * sizeof(int32_t));
    if (fread(d->ids, 4, m, f) != m) mp_input_error("exchange_sim: %s: truncated", path);
    fclose(f);
    for (size_t i = 0; i < m; i++)
        if (d->ids[i] < 0 || (int64_t)d->ids[i] >= (int64_t)d->n * d->n)
            mp_input_error("exchange_sim: %s: expert id %d outside n^2 = %lld", path, d->ids[i],
                           (long long)d->n * d->n);
}

static void write_or_die(const void *p, size_t size, size_t count, FILE *f, const char *path) {
    if (fwrite(p, size, count, f) != count) mp_fatal("exchange_sim: writing %s: %s", path, strerror(errno));
}

// ---------------------------------------------------------------------------------------
// popularity profiles scaled to n sub-keys

static int cmp_desc(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x < y) - (x > y);
}

// The measured counts c (m sub-keys) as a profile over n sub-keys: the sorted profile's
// Lorenz curve L(u) (share of the most popular fraction u of the sub-keys, piecewise linear
// between the m measured points) is sampled at n points, p[j] = L((j+1)/n) - L(j/n), and
// the result is randomly permuted over sub-keys, so popularity carries no order in the id.
static double *profile_scaled(const double *c, long m, long n, rng_t *r) {
    double *s = mp_malloc((size_t)m * sizeof(double)), *cum = mp_malloc(((size_t)m + 1) * sizeof(double));
    memcpy(s, c, (size_t)m * sizeof(double));
    qsort(s, (size_t)m, sizeof(double), cmp_desc);
    cum[0] = 0;
    for (long i = 0; i < m; i++) cum[i + 1] = cum[i] + s[i];
    double *p = mp_malloc((size_t)n * sizeof(double));
    double prev = 0;
    for (long j = 0; j < n; j++) {
        double u = (double)(j + 1) / n * m;   // position on the measured axis
        long i = (long)u;
        double L = i >= m ? cum[m] : cum[i] + (u - i) * s[i];
        p[j] = (L - prev) / cum[m];
        prev = L;
    }
    for (long j = n - 1; j > 0; j--) {   // Fisher-Yates
        long i = rng_below(r, j + 1);
        double t = p[i]; p[i] = p[j]; p[j] = t;
    }
    free(s);
    free(cum);
    return p;
}

// ---------------------------------------------------------------------------------------
// selections of one virtual rank

typedef struct {
    int H, k;
    long n;
    int pk;                  // 1: product top-k of k candidates per half; 0: k distinct experts
    alias_t a, b;            // first- and second-half sub-key popularity
    const seldump *replay;   // not NULL: the dumped selections, cycled
    int64_t replay_pos;
    uint8_t *pat;            // (N_PAT, k, 2) product top-k patterns: candidate ranks (i, j)
} selgen;

// The product top-k pattern (which candidate ranks of each half pair up) depends only on
// the candidates' scores, never on which sub-keys they are: a pool of patterns drawn once
// and picked at random per head has the same distribution and saves the logs per head.
#define N_PAT 65536

// k distinct sub-keys drawn by popularity (without replacement: redraw a repeat)
static void draw_distinct(const alias_t *t, rng_t *r, int k, long *out) {
    for (int i = 0; i < k; i++) {
        long tries = 0, x;
        int dup;
        do {
            x = alias_draw(t, r);
            dup = 0;
            for (int j = 0; j < i; j++) dup |= out[j] == x;
            if (++tries > 1000000) mp_fatal("exchange_sim: cannot draw %d distinct sub-keys from this profile", k);
        } while (dup);
        out[i] = x;
    }
}

// Scores of the k best candidates of one half: the top order statistics of many iid
// scores with an exponential-type tail, X_(i) = b + (-log G_i) / a with G_i a sum of i
// standard exponentials. Both halves share a and b, and the top-k of the sums depends only
// on their order, so -log G_i is all that is needed (and it does not depend on n).
static void top_scores(rng_t *r, int k, double *s) {
    double g = 0;
    for (int i = 0; i < k; i++) {
        g += -log(rng_unit(r));
        s[i] = -log(g);
    }
}

// The product top-k: the k largest sa[i] + sb[j] (both sorted decreasing) by a frontier
// walk from (0, 0); the frontier is small (<= k), so a linear scan beats a heap.
static void product_topk(const double *sa, const double *sb, int k, int *ia, int *ib) {
    int fi[128], fj[128], nf = 1;
    unsigned char seen[64 * 64];
    memset(seen, 0, (size_t)k * k);
    fi[0] = fj[0] = 0;
    seen[0] = 1;
    for (int t = 0; t < k; t++) {
        int best = 0;
        for (int f = 1; f < nf; f++)
            if (sa[fi[f]] + sb[fj[f]] > sa[fi[best]] + sb[fj[best]]) best = f;
        int i = fi[best], j = fj[best];
        ia[t] = i;
        ib[t] = j;
        fi[best] = fi[--nf];
        fj[best] = fj[nf];
        if (i + 1 < k && !seen[(i + 1) * k + j]) { seen[(i + 1) * k + j] = 1; fi[nf] = i + 1; fj[nf++] = j; }
        if (j + 1 < k && !seen[i * k + j + 1]) { seen[i * k + j + 1] = 1; fi[nf] = i; fj[nf++] = j + 1; }
    }
}

static void gen_rank(selgen *g, rng_t *r, int B, int32_t *sel) {
    int H = g->H, k = g->k;
    size_t S = (size_t)H * k;
    if (g->replay) {
        const seldump *d = g->replay;
        for (int t = 0; t < B; t++) {
            memcpy(sel + (size_t)t * S, d->ids + (size_t)g->replay_pos * S, S * sizeof(int32_t));
            g->replay_pos = (g->replay_pos + 1) % d->tokens;
        }
        return;
    }
    long ca[64], cb[64];
    for (int t = 0; t < B; t++)
        for (int h = 0; h < H; h++) {
            int32_t *o = sel + (size_t)t * S + (size_t)h * k;
            if (g->pk) {
                draw_distinct(&g->a, r, k, ca);
                draw_distinct(&g->b, r, k, cb);
                const uint8_t *pt = g->pat + (size_t)rng_below(r, N_PAT) * k * 2;
                for (int s = 0; s < k; s++) o[s] = (int32_t)(ca[pt[2 * s]] * g->n + cb[pt[2 * s + 1]]);
            } else {   // k distinct experts, each (a, b) drawn by the halves' popularity
                for (int s = 0; s < k; s++) {
                    int dup;
                    do {
                        o[s] = (int32_t)(alias_draw(&g->a, r) * g->n + alias_draw(&g->b, r));
                        dup = 0;
                        for (int j = 0; j < s; j++) dup |= o[j] == o[s];
                    } while (dup);
                }
            }
        }
}

// ---------------------------------------------------------------------------------------
// sim

typedef struct {
    int P, H, k, C, B, ranks_max, pk;
    long n;
    double alpha, beta;
    uint64_t seed;
    const char *dist, *dump_sel;
} sim_args;

static void json_str(const char *key, const char *v) { printf("\"%s\": \"%s\", ", key, v); }
static void json_num(const char *key, double v) { printf("\"%s\": %.10g, ", key, v); }

static int cmd_sim(int argc, char **argv) {
    sim_args a = {0, 8, 16, 1024, 4096, 64, 1, 0, 2e-6, 1.0 / 24e9, 1, "uniform", NULL};
    for (int i = 0; i < argc; i++) {
        const char *f = argv[i];
        if (i + 1 >= argc) usage_error("%s: missing its value", f);
        const char *v = argv[++i];
        if (!strcmp(f, "--P")) a.P = (int)parse_long(f, v, 1, 1 << 20);
        else if (!strcmp(f, "--n")) a.n = parse_long(f, v, 1, 46340);   // n^2 < 2^31: int32 ids
        else if (!strcmp(f, "--H")) a.H = (int)parse_long(f, v, 1, 64);
        else if (!strcmp(f, "--k")) a.k = (int)parse_long(f, v, 1, 64);
        else if (!strcmp(f, "--C")) a.C = (int)parse_long(f, v, 1, 1 << 20);
        else if (!strcmp(f, "--B")) a.B = (int)parse_long(f, v, 1, 1 << 20);
        else if (!strcmp(f, "--ranks-max")) a.ranks_max = (int)parse_long(f, v, 1, 1 << 20);
        else if (!strcmp(f, "--seed")) a.seed = (uint64_t)parse_long(f, v, 0, 1l << 62);
        else if (!strcmp(f, "--alpha")) a.alpha = parse_double(f, v);
        else if (!strcmp(f, "--beta")) a.beta = parse_double(f, v);
        else if (!strcmp(f, "--dist")) a.dist = v;
        else if (!strcmp(f, "--dump-sel")) a.dump_sel = v;
        else if (!strcmp(f, "--select")) {
            if (strcmp(v, "pk") && strcmp(v, "flat")) usage_error("--select '%s': expected pk or flat", v);
            a.pk = !strcmp(v, "pk");
        } else usage_error("unknown option '%s'", f);
    }
    if (!a.P || !a.n) usage_error("%s", "sim needs --P and --n");
    if (a.P > a.n) usage_error("%s", "--P: more ranks than first-half sub-keys (--n)");
    if (a.k > a.n) usage_error("%s", "--k larger than --n");
    if ((int64_t)a.B * a.H * a.k > (1ll << 31) - 1) usage_error("%s", "--B * --H * --k must fit int32");

    double t_start = mp_now();
    int P = a.P, H = a.H, k = a.k, B = a.B, S = H * k;
    long n = a.n;
    rng_t prof_rng = {a.seed * 0x2545F4914F6CDD1Dull + 17};
    selgen g = {H, k, n, a.pk, {0}, {0}, NULL, 0, NULL};
    if (a.pk) {
        g.pat = mp_malloc((size_t)N_PAT * k * 2);
        rng_t pr = {a.seed * 0xD1B54A32D192ED03ull + 5};
        double sa[64], sb[64];
        int ia[64], ib[64];
        for (long i = 0; i < N_PAT; i++) {
            top_scores(&pr, k, sa);
            top_scores(&pr, k, sb);
            product_topk(sa, sb, k, ia, ib);
            for (int s = 0; s < k; s++) {
                g.pat[((size_t)i * k + s) * 2] = (uint8_t)ia[s];
                g.pat[((size_t)i * k + s) * 2 + 1] = (uint8_t)ib[s];
            }
        }
    }
    seldump dump = {0};
    if (!strcmp(a.dist, "uniform")) {
        double *w = mp_malloc((size_t)n * sizeof(double));
        for (long i = 0; i < n; i++) w[i] = 1.0;
        alias_build(&g.a, w, n);
        alias_build(&g.b, w, n);
        free(w);
    } else if (!strncmp(a.dist, "profile:", 8) || !strncmp(a.dist, "replay:", 7)) {
        int replay = a.dist[0] == 'r';
        dump_read(&dump, a.dist + (replay ? 7 : 8));
        if (replay) {
            if (dump.n != n || dump.H * dump.k != S)
                mp_input_error("exchange_sim: %s holds n = %d, H*k = %d; the run asks n = %ld, H*k = %d",
                               a.dist + 7, dump.n, dump.H * dump.k, n, S);
            g.replay = &dump;
        } else {
            // pooled over heads: first- and second-half sub-key counts of the dump
            double *ca = mp_calloc((size_t)dump.n, sizeof(double)), *cb = mp_calloc((size_t)dump.n, sizeof(double));
            size_t m = (size_t)dump.tokens * dump.H * dump.k;
            for (size_t i = 0; i < m; i++) {
                ca[dump.ids[i] / dump.n] += 1;
                cb[dump.ids[i] % dump.n] += 1;
            }
            double *pa = profile_scaled(ca, dump.n, n, &prof_rng), *pb = profile_scaled(cb, dump.n, n, &prof_rng);
            long nza = 0, nzb = 0;   // k distinct draws per half need k sub-keys with mass
            for (long i = 0; i < n; i++) { nza += pa[i] > 0; nzb += pb[i] > 0; }
            if (nza < k || nzb < k)
                mp_input_error("exchange_sim: %s: fewer than k = %d sub-keys of a half with selections",
                               a.dist + 8, k);
            alias_build(&g.a, pa, n);
            alias_build(&g.b, pb, n);
            free(ca); free(cb); free(pa); free(pb); free(dump.ids);
            dump.ids = NULL;
        }
    } else usage_error("--dist '%s': expected uniform, profile:FILE or replay:FILE", a.dist);

    // W sampled ranks, spread over the rank ids (a rank's own owner share is never sent)
    int W = P < a.ranks_max ? P : a.ranks_max;
    int32_t *sel = mp_malloc((size_t)B * S * sizeof(int32_t));
    mp_shard_plan plan;
    mp_shard_plan_init(&plan, P);
    double *in_tok = mp_calloc(P, sizeof(double)), *in_rec = mp_calloc(P, sizeof(double));   // from other ranks
    double *all_tok = mp_calloc(P, sizeof(double)), *all_rec = mp_calloc(P, sizeof(double));  // self included
    int *n_src = mp_calloc(P, sizeof(int));
    double sum_out_tok = 0, sum_out_rec = 0, max_out_tok = 0, max_out_rec = 0, sum_pairs = 0;
    double sent_exact = 0, min_exact = 0;   // W = P only: the whole step's bytes, as exchange.c sums them
    FILE *df = NULL;
    if (a.dump_sel) {
        df = fopen(a.dump_sel, "wb");
        if (!df) mp_input_error("exchange_sim: %s: %s", a.dump_sel, strerror(errno));
        int32_t hdr[3] = {(int32_t)n, H, k};
        int64_t ntok = (int64_t)W * B;
        write_or_die(MAGIC, 1, 8, df, a.dump_sel);
        write_or_die(hdr, 4, 3, df, a.dump_sel);
        write_or_die(&ntok, 8, 1, df, a.dump_sel);
    }
    for (int w = 0; w < W; w++) {
        int me = (int)((int64_t)w * P / W);
        rng_t r = {a.seed * 0x9E3779B97F4A7C15ull ^ ((uint64_t)(w + 1) << 20) ^ (uint64_t)P};
        gen_rank(&g, &r, B, sel);
        if (df) write_or_die(sel, 4, (size_t)B * S, df, a.dump_sel);
        mp_shard_plan_build(&plan, sel, B, S, n);
        double out_tok = 0, out_rec = 0;
        for (int o = 0; o < P; o++) {
            all_tok[o] += (double)plan.tok_count[o];
            all_rec[o] += (double)plan.rec_count[o];
            sum_pairs += (double)plan.tok_count[o];
            if (o == me) continue;
            out_tok += (double)plan.tok_count[o];
            out_rec += (double)plan.rec_count[o];
            in_tok[o] += (double)plan.tok_count[o];
            in_rec[o] += (double)plan.rec_count[o];
            n_src[o]++;
        }
        sum_out_tok += out_tok;
        sum_out_rec += out_rec;
        if (out_tok > max_out_tok) max_out_tok = out_tok;
        if (out_rec > max_out_rec) max_out_rec = out_rec;
    }
    if (df && fclose(df)) mp_fatal("exchange_sim: closing %s: %s", a.dump_sel, strerror(errno));

    // Owners: what the other P-1 ranks send them, from the n_src sampled senders; and the
    // whole load they serve (self included), from all W.
    double max_in_tok = 0, max_in_rec = 0, sum_in_tok = 0, sum_in_rec = 0;
    double max_all_tok = 0, max_all_rec = 0, mean_all_tok = 0, mean_all_rec = 0;
    for (int o = 0; o < P; o++) {
        double s = n_src[o] ? (double)(P - 1) / n_src[o] : 0;
        double it = in_tok[o] * s, ir = in_rec[o] * s;
        sum_in_tok += it; sum_in_rec += ir;
        if (it > max_in_tok) max_in_tok = it;
        if (ir > max_in_rec) max_in_rec = ir;
        double at = all_tok[o] * P / W, ar = all_rec[o] * P / W;
        mean_all_tok += at / P; mean_all_rec += ar / P;
        if (at > max_all_tok) max_all_tok = at;
        if (ar > max_all_rec) max_all_rec = ar;
    }
    if (W == P) {   // exact: every rank simulated; per rank as exchange.c adds it, fwd + bwd
        // sum over ranks of off-rank tokens out = of tokens in; likewise records
        double T = sum_out_tok, R = sum_out_rec, C = a.C;
        sent_exact = 4.0 * (2 * C * T + 2 * C * T + 3 * R + R) + 16.0 * (P - 1) * P;
        min_exact = 4.0 * (4 * C * T + 3 * R);
        if (P == 1) sent_exact = min_exact = 0;
    }

    // Per rank and layer, forward + backward, means over ranks (src/model/exchange.c):
    //   forward  sent: 4 (C T_out + 3 R_out + C T_in) + 16 (P-1)   (x, records+gates, y)
    //   backward sent: 4 (C T_out + C T_in + R_in)                  (dy, dx, gate grads)
    //   min:           4 (4 C T_out + 3 R_out)
    double C = a.C, tok = (double)W * B;
    double t_out = sum_out_tok / W, r_out = sum_out_rec / W;   // per rank
    double t_in = sum_in_tok / P, r_in = sum_in_rec / P;
    double sent = P == 1 ? 0 : 4.0 * (2 * C * t_out + 2 * C * t_in + 3 * r_out + r_in) + 16.0 * (P - 1);
    double bmin = P == 1 ? 0 : 4.0 * (4 * C * t_out + 3 * r_out);

    // Alpha-beta time of the layer's 8 all-to-alls (forward: counts, x, records, gates, y;
    // backward: dy, dx, gate gradients). Each costs (P-1) alpha (a rank starts its P-1
    // messages one after another) plus beta times the bytes of the busiest rank's link in
    // the busier direction (the messages share that one link; links are full duplex and the
    // fabric is non-blocking, so no other contention). A rank's own part is a local copy.
    double tmax = max_out_tok > max_in_tok ? max_out_tok : max_in_tok;
    double rmax = max_out_rec > max_in_rec ? max_out_rec : max_in_rec;
    double busiest = P == 1 ? 0 : 16.0 * (P - 1) + 4 * 4 * C * tmax + (8 + 4 + 4) * rmax;
    double t_lat = P == 1 ? 0 : 8.0 * (P - 1) * a.alpha, t_bw = busiest * a.beta;

    printf("{");
    printf("\"P\": %d, \"n\": %ld, \"N\": %ld, \"H\": %d, \"k\": %d, \"C\": %d, \"B\": %d, ", P, n,
           n * n, H, k, a.C, B);
    json_str("dist", a.dist);
    json_str("select", g.replay ? "replay" : a.pk ? "pk" : "flat");
    printf("\"ranks_sampled\": %d, \"tokens_sampled\": %.0f, ", W, tok);
    json_num("owners_per_token", sum_pairs / tok);
    json_num("remote_owners_per_token", sum_out_tok / tok);
    json_num("remote_selections_per_token", sum_out_rec / tok);
    json_num("bytes_sent_per_token", sent / B);
    json_num("bytes_min_per_token", bmin / B);
    if (W == P) printf("\"bytes_sent_step\": %.0f, \"bytes_min_step\": %.0f, ", sent_exact, min_exact);
    json_num("rec_imbalance", mean_all_rec > 0 ? max_all_rec / mean_all_rec : 1);
    json_num("tok_imbalance", mean_all_tok > 0 ? max_all_tok / mean_all_tok : 1);
    json_num("busiest_rank_bytes", busiest);
    json_num("alpha", a.alpha);
    json_num("beta", a.beta);
    json_num("t_latency_s", t_lat);
    json_num("t_bandwidth_s", t_bw);
    json_num("t_exchange_s", t_lat + t_bw);
    printf("\"wall_s\": %.3f}\n", mp_now() - t_start);
    if (fflush(stdout) || ferror(stdout)) mp_fatal("exchange_sim: writing stdout: %s", strerror(errno));

    mp_shard_plan_free(&plan);
    free(sel); free(in_tok); free(in_rec); free(all_tok); free(all_rec); free(n_src);
    free(dump.ids);
    free(g.pat);
    if (!g.replay) { alias_free(&g.a); alias_free(&g.b); }
    return 0;
}

// ---------------------------------------------------------------------------------------
// dump: a trained model's selections

static int cmd_dump(int argc, char **argv) {
    const char *cfg_path = NULL, *model = NULL, *out = NULL;
    long batches = 8;
    int train = 1;   // BatchNorm on batch statistics: the routing the exchange sees in training
    int init = 0;    // 1: no --model; the config's initial model on the training batches of
                     // steps 0, 1, ... (what `millipede train` routes at its first step)
    char **sets = mp_malloc((size_t)(argc + 1) * sizeof(char *));
    int n_sets = 0;
    for (int i = 0; i < argc; i++) {
        const char *f = argv[i];
        if (!strcmp(f, "--eval")) { train = 0; continue; }
        if (!strcmp(f, "--init")) { init = 1; continue; }
        if (f[0] != '-') {
            if (cfg_path) usage_error("dump: a second CONFIG.ini '%s'", f);
            cfg_path = f;
            continue;
        }
        if (i + 1 >= argc) usage_error("%s: missing its value", f);
        const char *v = argv[++i];
        if (!strcmp(f, "--model")) model = v;
        else if (!strcmp(f, "--out")) out = v;
        else if (!strcmp(f, "--batches")) batches = parse_long(f, v, 1, 100000);
        else if (!strcmp(f, "--set")) sets[n_sets++] = (char *)v;
        else usage_error("unknown option '%s'", f);
    }
    if (!cfg_path || (!model && !init) || !out)
        usage_error("%s", "dump needs CONFIG.ini, --model PATH (or --init) and --out FILE");
    if (model && init) usage_error("%s", "dump: --model and --init exclude each other");
    MP_CHECK_MPI(MPI_Init(NULL, NULL));   // the HDF5 library may be the parallel one
    char err[2048];
    mp_config cfg, mcfg;
    if (mp_config_load(&cfg, cfg_path, sets, n_sets, err, sizeof err) < 0) mp_input_error("%s", err);
    const mp_backend *be = mp_backend_cpu();
    int B = cfg.batch_size, T = cfg.context;
    mp_model *m;
    if (init) {
        m = mp_model_create(&cfg, be, B);
        mp_model_init(m);
        mcfg = cfg;
    } else {
        m = mp_open_stored_model(model, &cfg, cfg_path, be, B, NULL, &mcfg, err, sizeof err);
        if (!m) mp_input_error("%s", err);
    }
    if (mp_model_n_retrieval(m) < 1) mp_input_error("exchange_sim: the model has no retrieval layer");
    mp_retrieval_layer *l = mp_model_retrieval_layer(m, mp_model_retrieval_block(m, 0));
    mp_shard val;   // validation batches (stream 1) of a trained model; training ones at init
    const char *data = init ? cfg.train_path : cfg.val_path;
    if (mp_shard_open(&val, data, (uint32_t)mcfg.vocab_size, err, sizeof err) < 0)
        mp_input_error("%s", err);
    int32_t *in = mp_malloc((size_t)B * T * sizeof(int32_t)), *tg = mp_malloc((size_t)B * T * sizeof(int32_t));
    FILE *f = fopen(out, "wb");
    if (!f) mp_input_error("exchange_sim: %s: %s", out, strerror(errno));
    int32_t hdr[3] = {(int32_t)l->rc->n_sub, l->rc->heads, l->rc->topk};
    int64_t ntok = (int64_t)batches * B * T;
    write_or_die(MAGIC, 1, 8, f, out);
    write_or_die(hdr, 4, 3, f, out);
    write_or_die(&ntok, 8, 1, f, out);
    size_t per = (size_t)B * T * hdr[1] * hdr[2];
    for (long i = 0; i < batches; i++) {
        mp_batch_fill(&val, cfg.seed, init ? 0 : 1, (uint64_t)i, 0, 0, B, T, in, tg);
        mp_model_forward(m, in, tg, B, T, train);
        write_or_die(l->sel, 4, per, f, out);   // CPU backend: sel is host memory
    }
    if (fclose(f)) mp_fatal("exchange_sim: closing %s: %s", out, strerror(errno));
    fprintf(stderr, "exchange_sim: %s: %lld tokens x %d heads x top-%d of n = %d\n", out,
            (long long)ntok, hdr[1], hdr[2], hdr[0]);
    free(in); free(tg); free(sets);
    mp_shard_close(&val);
    mp_model_free(m);
    MP_CHECK_MPI(MPI_Finalize());
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 2) usage_error("%s", "missing a command: sim or dump");
    if (!strcmp(argv[1], "sim")) return cmd_sim(argc - 2, argv + 2);
    if (!strcmp(argv[1], "dump")) return cmd_dump(argc - 2, argv + 2);
    usage_error("unknown command '%s'", argv[1]);
    return 2;
}
