// The training loop, data parallel over the ranks of comm: every rank takes its slice of
// each micro-batch of the global batch (a function of seed and step only, never of the
// rank count), dense and key gradients are all-reduced, expert gradients stay with the
// rank that owns the rows. Step lines on stdout, JSON lines in metrics.jsonl.
#include <errno.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include "core/agree.h"
#include "core/fs.h"
#include "core/log.h"
#include "core/watchdog.h"
#include "millipede/checkpoint.h"
#include "millipede/tokenizer.h"
#include "millipede/train.h"
#include "millipede/model.h"
#include "train/run_lock.h"

// Every rank opens the shards itself: a node that cannot read one stops the whole job.
static void open_shard(mp_shard *s, const char *path, const mp_config *cfg, const char *key) {
    char err[1024], msg[1200];
    int rc = mp_shard_open(s, path, (uint32_t)cfg->vocab_size, err, sizeof err);
    if (rc != 0)
        snprintf(msg, sizeof msg, "%s (from %s)", err, key);
    else if (s->n_tokens < (uint64_t)cfg->context + 1)
        rc = mp_errf(msg, sizeof msg, "%s: %llu tokens, fewer than one window of model.context + "
                     "1 = %d (from %s)", path, (unsigned long long)s->n_tokens, cfg->context + 1, key);
    mp_agree_or_exit(rc, msg);
}

// The tokenizer the shards were made with: none for bytes (hash 0), else the
// tokenizer.model that `data prepare` wrote beside data.train, whose hash must be the
// shards'. Every rank reads it (agreed).
static mp_tokenizer *data_tokenizer(const mp_config *cfg, const mp_shard *train,
                                    const mp_shard *val) {
    char err[1400] = "", path[MP_PATH_MAX + 32];
    mp_tokenizer *t = NULL;
    int rc = 0;
    if (train->tokenizer_hash != val->tokenizer_hash) {
        rc = mp_errf(err, sizeof err, "data.train %s and data.val %s were made with different "
                     "tokenizers (hashes %016llx and %016llx): prepare them together", cfg->train_path,
                     cfg->val_path, (unsigned long long)train->tokenizer_hash,
                     (unsigned long long)val->tokenizer_hash);
    } else if (train->tokenizer_hash != 0) {
        const char *slash = strrchr(cfg->train_path, '/');
        int dlen = slash ? (int)(slash - cfg->train_path) : 1;
        snprintf(path, sizeof path, "%.*s/tokenizer.model", dlen, slash ? cfg->train_path : ".");
        t = mp_tokenizer_load(path, err, sizeof err);
        if (!t) {
            rc = -1;
        } else if (mp_tokenizer_hash(t) != train->tokenizer_hash) {
            rc = mp_errf(err, sizeof err, "%s: hash %016llx, but data.train %s was made with the "
                         "tokenizer of hash %016llx: prepare the data again",
                         path, (unsigned long long)mp_tokenizer_hash(t), cfg->train_path,
                         (unsigned long long)train->tokenizer_hash);
        }
    }
    mp_agree_or_exit(rc, err);
    return t;
}

// Rank 0 makes run.dir, takes its lock and writes config.ini there; all ranks learn whether
// that worked (a rank 0 that stopped alone would leave the others waiting).
static void prepare_run_dir(const mp_config *cfg, const char *ini) {
    char err[1200] = "", path[MP_PATH_MAX + 64];
    int rc = 0;
    if (mp_rank() == 0) {
        snprintf(path, sizeof path, "%s/config.ini", cfg->run_dir);
        char sub[1024];
        rc = mp_mkdirs(cfg->run_dir, sub, sizeof sub);
        if (rc != 0) snprintf(err, sizeof err, "run.dir: %s", sub);
        if (rc == 0) rc = mp_run_lock(cfg->run_dir, err, sizeof err);
        if (rc == 0) rc = mp_write_text_file(path, ini, err, sizeof err);
    }
    mp_agree_or_exit(rc, err);
}

// Seconds as h:mm:ss, for the step line's elapsed and remaining time.
static const char *hms(double seconds, char *buf, size_t len) {
    long s = seconds > 0 ? (long)(seconds + 0.5) : 0;
    snprintf(buf, len, "%ld:%02ld:%02ld", s / 3600, s / 60 % 60, s % 60);
    return buf;
}

// train.profile: this rank's time per phase of the step just done, in ms, as the metrics
// line's "phase_ms" object; "other" is the rest of the step (the batch, zeroing the
// gradients, the statistics' all-reduce)
static void write_phases(FILE *f, const mp_model *m, double step_ms) {
    const double *s = mp_model_phase_seconds(m);
    double sum = 0.0;
    fprintf(f, ", \"phase_ms\": {");
    for (int p = 0; p < MP_PHASE_N; p++) {
        fprintf(f, "%s\"%s\": %.3f", p ? ", " : "", mp_phase_name(p), s[p] * 1e3);
        sum += s[p] * 1e3;
    }
    fprintf(f, ", \"other\": %.3f}", step_ms - sum);
}

// the same on the log: the six longest phases
static void log_phases(const mp_model *m) {
    const double *s = mp_model_phase_seconds(m);
    int order[MP_PHASE_N];
    for (int p = 0; p < MP_PHASE_N; p++) order[p] = p;
    for (int i = 1; i < MP_PHASE_N; i++)   // insertion sort, longest first
        for (int j = i; j > 0 && s[order[j]] > s[order[j - 1]]; j--) {
            int t = order[j];
            order[j] = order[j - 1];
            order[j - 1] = t;
        }
    char line[512];
    int n = 0;
    for (int i = 0; i < 6 && i < MP_PHASE_N; i++)
        n += snprintf(line + n, sizeof line - (size_t)n, "%s%s %.1f", i ? ", " : "",
                      mp_phase_name(order[i]), s[order[i]] * 1e3);
    mp_log("  phases (ms, rank 0, synchronized): %s", line);
}

// train.profile with a backend that has a kernel timer (CUDA): the step's device time per
// (phase, launch site) as the metrics line's "kernel_ms" list, the longest KERNEL_ROWS
// first, and "kernel_total_ms", the sum over all of them; the log shows the first six.
#define KERNEL_ROWS 64
#define KERNEL_SITES 1024   // more (phase, site) pairs than a step has
static void write_kernels(FILE *f, const mp_kernel_time *k, int n) {
    double total = 0.0;
    for (int i = 0; i < n; i++) total += k[i].ms;
    fprintf(f, ", \"kernel_total_ms\": %.3f, \"kernel_ms\": [", total);
    for (int i = 0; i < n && i < KERNEL_ROWS; i++)
        fprintf(f, "%s{\"phase\": \"%s\", \"op\": \"%s\", \"site\": \"%s:%d\", \"calls\": %ld, "
                "\"ms\": %.3f}", i ? ", " : "", k[i].label, k[i].what, k[i].file, k[i].line,
                k[i].calls, k[i].ms);
    fprintf(f, "]");
}

static void log_kernels(const mp_kernel_time *k, int n) {
    char line[1024];
    int len = 0;
    for (int i = 0; i < n && i < 6; i++)
        len += snprintf(line + len, sizeof line - (size_t)len, "%s%s %s %.1f", i ? ", " : "",
                        k[i].label, k[i].what, k[i].ms);
    if (n) mp_log("  kernels (ms, rank 0): %s", line);
}

// Each rank's peak resident memory so far (getrusage), beside its analytic share: the
// expert rows it holds with their gradients and AdamW moments (16 bytes per float).
static void report_peak_memory(mp_model *m, mp_comm *comm) {
    int P = comm->size;
    double *peak = mp_calloc(2 * (size_t)P, sizeof(double));   // (P) MiB measured, (P) analytic
    struct rusage ru;
    if (getrusage(RUSAGE_SELF, &ru) != 0) mp_fatal("getrusage: %s", strerror(errno));
    peak[comm->rank] = (double)ru.ru_maxrss / 1024.0;   // Linux: KiB
    peak[P + comm->rank] = (double)mp_model_group_size(m, MP_GROUP_EXPERTS) * 16 / 1048576.0;
    comm->allreduce_f64(comm, peak, 2 * (size_t)P);
    for (int r = 0; r < P; r++)
        mp_log("peak memory rank %-4d %9.1f MiB resident (its expert rows with gradients and "
               "AdamW moments: %.1f MiB)", r, peak[r], peak[P + r]);
    free(peak);
}

static void report_memory(mp_model *m, mp_comm *comm) {
    static const char *names[MP_N_GROUPS] = {"dense", "keys", "experts"};
    int P = comm->size;
    double *rows = mp_calloc(P, sizeof(double)), *floats = mp_calloc(P, sizeof(double));
    floats[comm->rank] = (double)mp_model_group_size(m, MP_GROUP_EXPERTS);
    for (int i = 0; i < mp_model_n_tensors(m); i++) {
        const mp_tensor *t = mp_model_tensor(m, i);
        if (t->group == MP_GROUP_EXPERTS) rows[comm->rank] += (double)t->shape[0];
    }
    comm->allreduce_f64(comm, rows, P);
    comm->allreduce_f64(comm, floats, P);
    // fp32 parameters, gradients and two AdamW moments: 16 bytes per float
    for (int g = 0; g < MP_N_GROUPS - 1; g++) {
        double n = (double)mp_model_group_size(m, g);
        mp_log("memory %-7s (replicated) %12.0f floats: params %.1f MiB, +grads +adam %.1f MiB",
               names[g], n, n * 4 / 1048576.0, n * 16 / 1048576.0);
    }
    for (int r = 0; r < P; r++)
        mp_log("memory experts rank %-4d %10.0f rows %12.0f floats: params %.1f MiB, +grads "
               "+adam %.1f MiB", r, rows[r], floats[r], floats[r] * 4 / 1048576.0,
               floats[r] * 16 / 1048576.0);
    free(rows);
    free(floats);
}

// Sums the exchange statistics of every retrieval layer on this rank and resets them.
static mp_exchange_stats take_exchange_stats(mp_model *m) {
    mp_exchange_stats total = {0};
    for (int i = 0; i < mp_model_n_retrieval(m); i++) {
        mp_exchange_stats *s = mp_model_exchange_stats(m, i);
        total.bytes_sent += s->bytes_sent;
        total.bytes_recv += s->bytes_recv;
        total.bytes_min += s->bytes_min;
        total.selections += s->selections;
        total.seconds += s->seconds;
        memset(s, 0, sizeof *s);
    }
    return total;
}

// Test hooks: MILLIPEDE_FAULT_KILL="RANK:STEP" makes that rank die by SIGKILL when it
// starts that step, as a crashed node would; the launcher must end the whole job.
// MILLIPEDE_FAULT_STOP="RANK:STEP" freezes it there (SIGSTOP), as a node whose file system
// hangs would: alive, so the launcher waits, and its peers' hang watchdog must end the job.
static void maybe_die(int rank, long step) {
    const char *f = getenv("MILLIPEDE_FAULT_KILL"), *g = getenv("MILLIPEDE_FAULT_STOP");
    int r;
    long s;
    if (f && sscanf(f, "%d:%ld", &r, &s) == 2 && r == rank && s == step) {
        fprintf(stderr, "millipede: rank %d: MILLIPEDE_FAULT_KILL: killing myself at step %ld\n", rank, step);
        raise(SIGKILL);
    }
    if (g && sscanf(g, "%d:%ld", &r, &s) == 2 && r == rank && s == step) {
        fprintf(stderr, "millipede: rank %d: MILLIPEDE_FAULT_STOP: freezing at step %ld\n", rank, step);
        raise(SIGSTOP);
    }
}

// Validation on the global validation batches, each rank its slice: the mean loss and each
// retrieval layer's expert usage and unevenness (z summed over the ranks), so that a
// collapse of the router shows while it happens. Logged to the step line and metrics.
static void validate(mp_model *m, const mp_shard *val, mp_comm *comm, int j0, int Bl, long done,
                     FILE *metrics) {
    const mp_config *c = mp_model_config(m);
    mp_model_usage_enable(m, 1);
    double vl = mp_eval_loss_ranks(m, val, c->eval_batches, j0, Bl, comm);
    char line[1024];
    int len = snprintf(line, sizeof line, "step %6ld/%ld | val loss %.4f", done, c->steps, vl);
    if (metrics) fprintf(metrics, "{\"step\": %ld, \"val_loss\": %.9g", done, vl);
    for (int i = 0; i < mp_model_n_retrieval(m); i++) {
        int block = mp_model_retrieval_block(m, i);
        const mp_retrieval_config *rc = mp_config_retrieval(c, block);
        double *zg = mp_malloc((size_t)rc->n_experts * sizeof(double));   // (N)
        long n = mp_eval_usage_ranks(m, i, comm, zg);
        double usage, uneven;
        mp_expert_usage(zg, n, &usage, &uneven);
        free(zg);
        double uniform = mp_uniform_usage(n, (double)c->eval_batches * c->batch_size * c->context *
                                                 rc->heads * rc->topk);
        if (len < (int)sizeof line)
            len += snprintf(line + len, sizeof line - len, " | block %d usage %.1f%% (uniform %.1f%%) "
                            "unevenness %.3f", block, 100 * usage, 100 * uniform, uneven);
        if (metrics) {
            char ku[32] = "null";   // NaN (nothing routed) is not JSON
            if (isfinite(uneven)) snprintf(ku, sizeof ku, "%.6g", uneven);
            fprintf(metrics, "%s{\"block\": %d, \"usage\": %.6g, \"unevenness\": %s, "
                    "\"usage_uniform\": %.6g}", i ? ", " : ", \"layers\": [", block, usage, ku,
                    uniform);
        }
    }
    if (metrics) fprintf(metrics, "%s}\n", mp_model_n_retrieval(m) > 0 ? "]" : "");
    mp_log("%s", line);
    mp_model_usage_enable(m, 0);
}

// metrics.jsonl of a run that starts at step `start` (rank 0): a fresh file, or on resume
// the old one without the lines of steps after the checkpoint (a crashed run may have
// logged more steps than its last checkpoint holds), continued. Lines of any length (the
// per-rank selection counts grow with the rank count). NULL with err set on failure.
static FILE *open_metrics(const char *path, long start, char *err, size_t err_len) {
    if (start > 0) {
        FILE *in = fopen(path, "r");
        char tmp[MP_PATH_MAX + 80];
        snprintf(tmp, sizeof tmp, "%s.tmp", path);
        FILE *out = in ? fopen(tmp, "w") : NULL;
        if (in && !out) {
            mp_errf(err, err_len, "%s: cannot write: %s", tmp, strerror(errno));
            fclose(in);
            return NULL;
        }
        char *line = NULL;
        size_t cap = 0;
        long step;
        while (out && getline(&line, &cap, in) >= 0)
            if (sscanf(line, "{\"step\": %ld", &step) == 1 && step <= start) fputs(line, out);
        free(line);
        if (in) fclose(in);
        if (out && (fclose(out) != 0 || rename(tmp, path) != 0)) {
            mp_errf(err, err_len, "%s: cannot rewrite: %s", path, strerror(errno));
            return NULL;
        }
    }
    FILE *f = fopen(path, start > 0 ? "a" : "w");
    if (!f) mp_errf(err, err_len, "%s: cannot write: %s", path, strerror(errno));
    return f;
}

// Writes the checkpoint of `step` steps done (all ranks). Returns -1 after printing why.
static int save_checkpoint(mp_model *m, const mp_adamw *opt, const char *root, long step) {
    char err[1024], dir[MP_PATH_MAX + 64];
    mp_ckpt_stats st;
    if (mp_ckpt_save(root, m, opt, step, mp_model_config(m)->ckpt_keep, dir, sizeof dir, &st,
                     err, sizeof err) != 0) {
        if (mp_rank() == 0) fprintf(stderr, "millipede: error: checkpoint failed: %s\n", err);
        return -1;
    }
    mp_log("checkpoint %s: %.1f MiB in %d files, %.2f s (%.0f MiB/s)", dir, st.bytes / 1048576.0,
           st.n_files, st.seconds, st.bytes / 1048576.0 / (st.seconds > 0 ? st.seconds : 1e-9));
    // ranks wait for each other's writes, fsyncs and rank 0's index without a beat: a
    // checkpoint must fit well inside the watchdog's timeout
    float hang = mp_model_config(m)->hang_timeout;
    if (hang > 0 && st.seconds > hang / 4)
        mp_log("warning: the checkpoint took %.0f s, over a quarter of system.hang_timeout = "
               "%g s: a slower one would end the job as a hang; raise system.hang_timeout",
               st.seconds, (double)hang);
    mp_watchdog_beat("a checkpoint");
    return 0;
}

int mp_train_run(const mp_config *cfg, const mp_backend *be) {
    return mp_train_run_resume(cfg, be, MP_RESUME_AUTO, NULL);
}

int mp_train_run_resume(const mp_config *cfg, const mp_backend *be, mp_resume_mode mode,
                        const char *resume_path) {
    char err[1024], path[MP_PATH_MAX + 64];
    mp_preempt_install();   // early: a signal during start-up stops at the first step boundary
    mp_watchdog_start(cfg->hang_timeout);
    mp_comm *comm = mp_comm_mpi();
    int rank = comm->rank, P = comm->size;
    mp_check_ranks(cfg, comm, 1);
    size_t ini_len = mp_config_to_ini(cfg, NULL, 0) + 1;
    char *ini = mp_malloc(ini_len);
    mp_config_to_ini(cfg, ini, ini_len);
    prepare_run_dir(cfg, ini);
    mp_log("# resolved configuration\n%s", ini);
    free(ini);

    mp_shard train, val;
    open_shard(&train, cfg->train_path, cfg, "data.train");
    open_shard(&val, cfg->val_path, cfg, "data.val");
    mp_tokenizer *data_tk = data_tokenizer(cfg, &train, &val);   // NULL: bytes
    const char *data_kind = data_tk ? mp_tokenizer_kind(data_tk) : "bytes";
    mp_log("data: train %s (%llu tokens), val %s (%llu tokens), tokenizer %s%s", cfg->train_path,
           (unsigned long long)train.n_tokens, cfg->val_path, (unsigned long long)val.n_tokens,
           data_kind, data_tk ? " (tokenizer.model beside data.train)" : "");

    // this rank's slice of every micro-batch: sequences [j0, j0 + Bl) of batch_size
    int B = cfg->batch_size, T = cfg->context, A = cfg->grad_accum;
    int j0 = (int)((long)B * rank / P), Bl = (int)((long)B * (rank + 1) / P) - j0;
    char why[700];
    mp_comm *xfer = mp_transport_open(cfg->transport, comm, be, cfg->nccl_timeout, why, sizeof why);
    mp_log("transport: %s", why);
    mp_watchdog_beat("starting the transport");
    mp_model *m = mp_model_create_sharded(cfg, be, Bl, xfer);
    mp_model_set_tokenizer(m, data_tk);   // the model owns it now
    mp_model_profile_enable(m, cfg->profile);
    mp_adamw opt;
    mp_adamw_init(&opt, m);
    mp_log("model: %ld parameters, %.3g forward FLOPs per token, backend %s, %d rank%s",
           mp_model_param_count(cfg), mp_model_flops_per_token(cfg), be->name, P, P > 1 ? "s" : "");
    report_memory(m, comm);

    // resume: parameters, AdamW moments and step count, router state; the data stream and
    // every random number follow from (seed, step), so this is the whole training state
    char ckpt_root[MP_PATH_MAX + 64], used[MP_PATH_MAX + 64] = "";
    snprintf(ckpt_root, sizeof ckpt_root, "%s/checkpoints", cfg->run_dir);
    long start = 0;
    mp_ckpt_info ck;
    double t_resume = mp_now();
    if (mp_ckpt_resume(cfg, mode, resume_path, m, &opt, &ck, used, sizeof used)) {
        start = ck.step;
        mp_log("resumed from %s: %ld steps done, written by %d rank%s, read in %.2f s", used,
               start, ck.n_ranks, ck.n_ranks > 1 ? "s" : "", mp_now() - t_resume);
    } else {
        mp_model_init(m);
    }
    // a checkpoint carries its tokenizer: it must be the one the data was made with
    const mp_tokenizer *tk = mp_model_tokenizer(m);
    uint64_t have = tk ? mp_tokenizer_hash(tk) : 0;
    if (have != train.tokenizer_hash)
        mp_input_error("%s was trained on tokens of %s (hash %016llx), data.train %s is %s (hash "
                       "%016llx): use the data it was trained on, or another run.dir", used,
                       tk ? mp_tokenizer_kind(tk) : "bytes", (unsigned long long)have,
                       cfg->train_path, data_kind,
                       (unsigned long long)train.tokenizer_hash);

    FILE *metrics = NULL;
    if (rank == 0) {
        snprintf(path, sizeof path, "%s/metrics.jsonl", cfg->run_dir);
        metrics = open_metrics(path, start, err, sizeof err);
    }
    mp_agree_or_exit(rank == 0 && !metrics ? -1 : 0, err);

    int32_t *inputs = mp_malloc((size_t)Bl * T * sizeof(int32_t));    // (Bl, T)
    int32_t *targets = mp_malloc((size_t)Bl * T * sizeof(int32_t));   // (Bl, T)
    long eval_every = cfg->eval_every > 0 ? cfg->eval_every : cfg->steps;
    double tokens_step = (double)A * B * T;
    // each rank's mean loss, weighted by its share of the global batch
    float share = (float)Bl / (float)B;
    int status = 0;
    if (start >= cfg->steps) mp_log("nothing to do: %ld of train.steps = %ld done", start, cfg->steps);
    // time left = this start's mean time per step (validation and checkpoints included)
    // times the steps to go
    double t_loop = mp_now();
    mp_kernel_time *kernels = cfg->profile ? mp_malloc(KERNEL_SITES * sizeof *kernels) : NULL;
    for (long step = start; step < cfg->steps; step++) {
        mp_watchdog_beat("the start of a step");
        maybe_die(rank, step);
        double t0 = mp_now();
        mp_model_phase_reset(m);
        mp_model_zero_grad(m);
        double loss = 0.0;
        for (int micro = 0; micro < A; micro++) {
            mp_batch_fill(&train, cfg->seed, 0, (uint64_t)step, (uint32_t)micro, (uint32_t)j0, Bl, T,
                          inputs, targets);
            loss += mp_model_forward(m, inputs, targets, Bl, T, 1) * share / A;
            mp_model_backward(m, share / A);
        }
        mp_model_phase(m, MP_PHASE_ALLREDUCE);
        mp_model_allreduce_grads(m);
        mp_model_phase(m, MP_PHASE_OPTIMIZER);
        float norm = mp_adamw_step(&opt, m, step);
        mp_model_phase(m, MP_PHASE_NONE);
        int n_kernels = cfg->profile && rank == 0 ? mp_model_kernel_times(m, kernels, KERNEL_SITES) : 0;
        // the step's global numbers: loss, exchange traffic and balance over ranks
        mp_exchange_stats ex = take_exchange_stats(m);
        double *g = mp_calloc(2 * (size_t)P + 4, sizeof(double));   // (P) selections, (P) seconds, 4 totals
        g[rank] = ex.selections;
        g[P + rank] = ex.seconds;
        g[2 * P] = loss;
        g[2 * P + 1] = ex.bytes_sent;
        g[2 * P + 2] = ex.bytes_recv;
        g[2 * P + 3] = ex.bytes_min;
        comm->allreduce_f64(comm, g, 2 * (size_t)P + 4);
        double sel_max = 0, sel_sum = 0, ex_max = 0;
        for (int r = 0; r < P; r++) {
            sel_max = g[r] > sel_max ? g[r] : sel_max;
            sel_sum += g[r];
            ex_max = g[P + r] > ex_max ? g[P + r] : ex_max;
        }
        loss = g[2 * P];
        double ms = (mp_now() - t0) * 1e3;
        double tok_s = tokens_step / (ms / 1e3);
        double elapsed = mp_now() - t_loop;
        double left = elapsed / (double)(step + 1 - start) * (double)(cfg->steps - step - 1);
        double tokens = tokens_step * (double)(step + 1);
        float lr = mp_lr_at(cfg, MP_GROUP_DENSE, step);
        if (rank == 0) {
            fprintf(metrics, "{\"step\": %ld, \"loss\": %.9g, \"lr\": %.6g, \"grad_norm\": %.6g, "
                    "\"ms\": %.2f, \"tokens_per_s\": %.1f, \"tokens\": %.0f, \"elapsed_s\": %.3f, "
                    "\"eta_s\": %.1f, \"ranks\": %d", step + 1, loss, lr, norm, ms, tok_s, tokens,
                    elapsed, left, P);
            if (mp_model_n_retrieval(m) > 0)
                fprintf(metrics, ", \"exchange_bytes_sent\": %.0f, \"exchange_bytes_recv\": %.0f, "
                        "\"exchange_bytes_min\": %.0f, \"exchange_ms\": %.2f, "
                        "\"selections_per_rank\": [", g[2 * P + 1], g[2 * P + 2], g[2 * P + 3],
                        ex_max * 1e3);
            for (int r = 0; r < P && mp_model_n_retrieval(m) > 0; r++)
                fprintf(metrics, "%s%.0f", r ? ", " : "", g[r]);
            if (mp_model_n_retrieval(m) > 0)
                fprintf(metrics, "], \"load_imbalance\": %.4f", sel_sum > 0 ? sel_max / (sel_sum / P) : 1.0);
            if (cfg->profile) write_phases(metrics, m, ms);
            if (n_kernels) write_kernels(metrics, kernels, n_kernels);
            fprintf(metrics, "}\n");
        }
        free(g);
        if ((step + 1) % cfg->log_every == 0 || step == 0 || step + 1 == cfg->steps) {
            char el[32], lf[32];
            mp_log("step %6ld/%ld | loss %.4f | lr %.3e | grad norm %.4f | %.1f ms | %.0f tok/s | "
                   "%.3g M tokens | %s elapsed, %s left", step + 1, cfg->steps, loss, lr, norm, ms,
                   tok_s, tokens / 1e6, hms(elapsed, el, sizeof el), hms(left, lf, sizeof lf));
            if (cfg->profile && rank == 0) log_phases(m);
            if (n_kernels) log_kernels(kernels, n_kernels);
        }
        if ((step + 1) % eval_every == 0 || step + 1 == cfg->steps) {
            validate(m, &val, comm, j0, Bl, step + 1, metrics);
            take_exchange_stats(m);   // validation traffic is not the training step's
        }
        if (rank == 0) fflush(metrics);

        // checkpoint every checkpoint.every steps, at the end, and when a rank got
        // SIGUSR1/SIGTERM (all ranks agree at this step boundary), then exit to be requeued
        long done = step + 1;
        mp_preempt_fault_hook(rank, done);
        int stop = mp_preempt_agreed(comm) && done < cfg->steps;
        if (stop || done == cfg->steps || (cfg->ckpt_every > 0 && done % cfg->ckpt_every == 0))
            if (save_checkpoint(m, &opt, ckpt_root, done) != 0) {
                status = 1;
                break;
            }
        if (stop) {
            mp_log("stopping after step %ld on a signal: checkpointed, exit status %d (requeue)",
                   done, MP_EXIT_REQUEUE);
            status = MP_EXIT_REQUEUE;
            break;
        }
    }
    if (rank == 0) fclose(metrics);
    report_peak_memory(m, comm);
    free(inputs);
    free(targets);
    free(kernels);
    mp_adamw_free(&opt, m);
    mp_model_free(m);
    if (xfer != comm) mp_comm_free(xfer);
    mp_comm_free(comm);
    mp_shard_close(&train);
    mp_shard_close(&val);
    mp_watchdog_stop();
    return status;
}
