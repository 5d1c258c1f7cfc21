// `millipede eval CONFIG.ini --model PATH [--batches N] [--set section.key=value]...`
// Validation loss, bits per token/byte and expert usage of a model file, as one JSON line
// on stdout (fields in docs/outputs.md). Everything else goes to stderr.
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"
#include "commands.h"
#include "core/agree.h"
#include "core/log.h"
#include "millipede/comm.h"
#include "millipede/config.h"
#include "millipede/data.h"
#include "millipede/model.h"
#include "millipede/checkpoint.h"
#include "millipede/model_file.h"
#include "millipede/tokenizer.h"
#include "millipede/train.h"

static const char *eval_usage =
    "usage: millipede eval CONFIG.ini --model PATH [--batches N] [--set section.key=value]...\n"
    "\n"
    "Evaluates a model file on data.val and prints one JSON line on stdout:\n"
    "  {\"val_loss\": nats per token, \"bits_per_token\": ..., \"bits_per_byte\": ... (byte\n"
    "   tokenizer only), \"tokens\": ..., \"layers\": [{\"block\", \"kind\", \"experts\",\n"
    "   \"usage\", \"unevenness\"}, ...]}\n"
    "The model's shapes come from PATH and must match CONFIG; data paths, batch size and\n"
    "seed come from CONFIG. Batches are validation batches 0..N-1 (sampler stream 1).\n"
    "Under mpirun -n P the model is sharded as in training: each rank reads only its own\n"
    "expert rows and evaluates its slice of every batch; rank 0 prints.\n"
    "\n"
    "options:\n"
    "  --model PATH      a checkpoint of `millipede train` (<run.dir>/checkpoints/latest,\n"
    "                    a step_%08d directory, or the run directory) or a model file\n"
    "  --batches N       number of batches of train.batch_size sequences (default\n"
    "                    train.eval_batches)\n"
    "  --set s.k=v       override a configuration key (repeatable)\n";

// Prints a JSON number; NaN and infinities are not JSON, so they become null.
static void json_num(const char *key, double v) {
    if (isfinite(v))
        printf("\"%s\": %.9g", key, v);
    else
        printf("\"%s\": null", key);
}

static const mp_cli_option eval_opts[] = {
    {"--model", 1, NULL},
    {"--batches", 1, NULL},
    {"--set", 1, NULL},
};

typedef struct {
    const char *model_path;
    long batches;   // -1: train.eval_batches
} eval_args;

static void eval_option(void *ctx, const char *name, const char *v) {
    eval_args *e = ctx;
    if (!strcmp(name, "--model")) {
        e->model_path = v;
        return;
    }
    char *end;   // --batches
    errno = 0;
    e->batches = strtol(v, &end, 10);
    if (errno || end == v || *end || e->batches < 1 || e->batches > 1000000000)
        mp_input_error("eval: --batches '%s': expected a positive integer", v);
}

int mp_cmd_eval(int argc, char **argv) {
    eval_args e = {NULL, -1};
    mp_cli_spec spec = {"eval", eval_usage, eval_opts, MP_CLI_N_OPTS(eval_opts), eval_option, &e};
    mp_cli_args args;
    if (mp_cli_parse(&spec, argc, argv, &args)) return 0;   // --help
    if (!args.config_path)
        mp_input_error("eval: missing CONFIG.ini (usage: millipede eval CONFIG.ini --model PATH)");
    if (!e.model_path)
        mp_input_error("eval: missing --model PATH (usage: millipede eval CONFIG.ini --model PATH)");
    char err[2048];
    mp_config cfg, mcfg;
    mp_cli_load_config(&cfg, args.config_path, args.sets, args.n_sets);
    free(args.sets);
    const mp_backend *be = mp_cli_setup(&cfg);   // threads; exits 2 when the backend is missing
    long batches = e.batches < 0 ? cfg.eval_batches : e.batches;
    const char *model_path = e.model_path;
    int B = cfg.batch_size, T = cfg.context;
    // On P ranks, as in training: every rank evaluates its slice of each batch, and each
    // retrieval layer's expert rows are sharded over the ranks, which read only their own
    // rows and serve them through the exchange.
    mp_comm *comm = mp_comm_mpi(), *xfer = NULL;
    int rank = comm->rank, P = comm->size;
    int j0 = (int)((long)B * rank / P), Bl = (int)((long)B * (rank + 1) / P) - j0;
    if (P > 1) {
        mp_check_ranks(&cfg, comm, 1);
        char why[700];
        xfer = mp_transport_open(cfg.transport, comm, be, cfg.nccl_timeout, why, sizeof why);
        // stdout is the command's output (JSON, text): what it ran on goes to stderr
        if (rank == 0) fprintf(stderr, "millipede eval: %d ranks, transport %s\n", P, why);
    }
    mp_model *m = mp_open_stored_model(model_path, &cfg, args.config_path, be, Bl, xfer, &mcfg,
                                       err, sizeof err);
    mp_agree_or_exit(m ? 0 : 2, err);
    mp_shard val;
    int rc = mp_shard_open(&val, cfg.val_path, (uint32_t)mcfg.vocab_size, err, sizeof err) < 0;
    mp_agree_or_exit(rc, err);
    // the model's tokenizer (carried by the checkpoint or model file; none: bytes)
    mp_tokenizer *bytes_tk = NULL;
    const mp_tokenizer *tk = mp_model_tokenizer(m);
    if (!tk) tk = bytes_tk = mp_tokenizer_bytes(mcfg.vocab_size);
    if (mp_tokenizer_hash(tk) != val.tokenizer_hash)
        rc = mp_errf(err, sizeof err, "%s: made with a tokenizer of hash %016llx, but %s was "
                     "trained on tokens of %s (hash %016llx)", cfg.val_path,
                     (unsigned long long)val.tokenizer_hash, model_path, mp_tokenizer_kind(tk),
                     (unsigned long long)mp_tokenizer_hash(tk));
    else if (val.n_tokens < (uint64_t)T + 1)
        rc = mp_errf(err, sizeof err, "%s: data.val holds %llu tokens, need at least %d for "
                     "model.context %d", cfg.val_path, (unsigned long long)val.n_tokens, T + 1, T);
    mp_agree_or_exit(rc, err);

    if (rank == 0)
        fprintf(stderr, "millipede eval: %s on %s: %ld batches of %d x %d tokens\n", model_path,
                cfg.val_path, batches, B, T);
    mp_model_usage_enable(m, 1);
    // The trainer's validation loss (src/train/eval.c): batches 0..N-1 of sampler stream 1,
    // BatchNorm in eval mode, so eval of a saved model reproduces the run's last val_loss.
    double val_loss = mp_eval_loss_ranks(m, &val, (int)batches, j0, Bl, xfer);

    // bits per byte from the bytes of text the target tokens stand for (bytes: one each)
    double tokens = (double)batches * B * T;
    double bytes = mp_eval_target_bytes(&mcfg, &val, (int)batches, mp_tokenizer_token_bytes(tk));

    if (rank == 0) {
        printf("{");
        json_num("val_loss", val_loss);
        printf(", ");
        json_num("bits_per_token", val_loss / log(2.0));
        printf(", ");
        json_num("bits_per_byte", bytes > 0 ? val_loss * tokens / (bytes * log(2.0)) : NAN);
        printf(", \"tokens\": %.0f, \"bytes\": %.0f, \"tokenizer\": \"%s\", \"ranks\": %d, "
               "\"layers\": [", tokens, bytes, mp_tokenizer_kind(tk), P);
    }
    for (int i = 0; i < mp_model_n_retrieval(m); i++) {
        int block = mp_model_retrieval_block(m, i);
        const mp_retrieval_config *rc_l = mp_config_retrieval(&mcfg, block);
        double *z = mp_malloc((size_t)rc_l->n_experts * sizeof(double));   // (N) over ranks
        long n = mp_eval_usage_ranks(m, i, xfer, z);
        double usage, uneven;
        mp_expert_usage(z, n, &usage, &uneven);
        free(z);
        if (rank != 0) continue;
        double selections = (double)batches * B * T * rc_l->heads * rc_l->topk;
        printf("%s{\"block\": %d, \"kind\": \"%s\", \"experts\": %ld, ", i ? ", " : "", block,
               mcfg.ffn[block] == MP_FFN_PEER ? "peer" : "pkm", n);
        json_num("usage", usage);
        printf(", ");
        json_num("unevenness", uneven);
        printf(", ");
        json_num("usage_uniform", mp_uniform_usage(n, selections));
        printf("}");
    }
    if (rank == 0) printf("]}\n");
    fflush(stdout);

    mp_tokenizer_free(bytes_tk);
    mp_shard_close(&val);
    mp_model_free(m);
    if (xfer != comm) mp_comm_free(xfer);
    mp_comm_free(comm);
    return 0;
}
