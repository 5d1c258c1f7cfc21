// `millipede sample CONFIG.ini --model PATH --prompt TEXT --tokens N [--temperature T]
//  [--top-k K] [--seed S] [--set section.key=value]...`
// Generates N byte tokens after the prompt and writes the prompt and the generated text to
// stdout as they are produced. Sampling is reproducible: the uniform number behind token i
// is mp_uniform(seed, SAMPLE_STREAM, i).
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cli.h"
#include "commands.h"
#include "core/agree.h"
#include "core/log.h"
#include "core/rng.h"
#include "millipede/comm.h"
#include "millipede/config.h"
#include "millipede/data.h"
#include "millipede/model.h"
#include "millipede/tokenizer.h"
#include "millipede/checkpoint.h"
#include "millipede/model_file.h"

// Streams 0 and 1 are the train and validation samplers; sampling uses its own.
#define SAMPLE_STREAM 2

static const char *sample_usage =
    "usage: millipede sample CONFIG.ini --model PATH --prompt TEXT --tokens N\n"
    "                        [--temperature T] [--top-k K] [--seed S] [--set section.key=value]...\n"
    "\n"
    "Continues TEXT with N tokens of the model's tokenizer (bytes, SentencePiece or a token\n"
    "table; the prompt is encoded with it) and prints the prompt followed by the decoded\n"
    "continuation on stdout (a final newline only on a terminal, never under mpirun).\n"
    "Each token is drawn from the logits at the last position of a forward pass over the\n"
    "last model.context tokens.\n"
    "Under mpirun -n P the model is sharded as in training (each rank reads only its own\n"
    "expert rows); every rank runs the sequence, rank 0 draws each token and prints.\n"
    "\n"
    "options:\n"
    "  --model PATH       a checkpoint of `millipede train` (<run.dir>/checkpoints/latest,\n"
    "                     a step_%08d directory, or the run directory) or a model file\n"
    "  --prompt TEXT      the text to continue (not empty)\n"
    "  --tokens N         how many tokens to generate (N >= 0)\n"
    "  --temperature T    softmax temperature, T >= 0; 0 = greedy (argmax) (default 1.0)\n"
    "  --top-k K          sample among the K most likely tokens only; 0 = all (default 0)\n"
    "  --seed S           random seed (default train.seed)\n"
    "  --set s.k=v        override a configuration key (repeatable)\n";

static int parse_long(const char *s, long *out) {
    char *end;
    errno = 0;
    *out = strtol(s, &end, 10);
    return errno || end == s || *end ? -1 : 0;
}

static int parse_double(const char *s, double *out) {
    char *end;
    errno = 0;
    *out = strtod(s, &end);
    return errno || end == s || *end || !isfinite(*out) ? -1 : 0;
}

// Picks the next token from logits (V): greedy when temperature is 0, else a draw with
// uniform u from softmax(logits / temperature) restricted to the top_k largest logits
// (top_k 0 = all). Ties are broken towards the lower token id, so the choice is a pure
// function of (logits, temperature, top_k, u).
static int pick_token(const float *logits, int V, double temperature, int top_k, float u,
                      int *order, double *prob) {
    // order: token ids sorted by logit, descending, ties by id (insertion sort: V is small
    // for the byte tokenizer and this runs once per generated token).
    for (int i = 0; i < V; i++) {
        int j = i;
        while (j > 0 && logits[order[j - 1]] < logits[i]) {
            order[j] = order[j - 1];
            j--;
        }
        order[j] = i;
    }
    if (temperature == 0) return order[0];
    int K = top_k > 0 && top_k < V ? top_k : V;
    double max = logits[order[0]], total = 0;
    for (int r = 0; r < K; r++) {
        prob[r] = exp((logits[order[r]] - max) / temperature);
        total += prob[r];
    }
    double target = u * total, acc = 0;
    for (int r = 0; r < K; r++) {
        acc += prob[r];
        if (target < acc) return order[r];
    }
    return order[K - 1];   // u * total rounded up to total
}

static const mp_cli_option sample_opts[] = {
    {"--model", 1, NULL}, {"--prompt", 1, NULL}, {"--tokens", 1, NULL},
    {"--temperature", 1, NULL}, {"--top-k", 1, NULL}, {"--seed", 1, NULL}, {"--set", 1, NULL},
};

typedef struct {
    const char *model_path, *prompt;
    long n_tokens, top_k, seed;
    int have_tokens, have_seed;
    double temperature;
} sample_args;

static void sample_option(void *ctx, const char *name, const char *v) {
    sample_args *s = ctx;
    if (!strcmp(name, "--model")) {
        s->model_path = v;
    } else if (!strcmp(name, "--prompt")) {
        s->prompt = v;
    } else if (!strcmp(name, "--tokens")) {
        if (parse_long(v, &s->n_tokens) < 0 || s->n_tokens < 0)
            mp_input_error("sample: --tokens '%s': expected an integer >= 0", v);
        s->have_tokens = 1;
    } else if (!strcmp(name, "--temperature")) {
        if (parse_double(v, &s->temperature) < 0 || s->temperature < 0)
            mp_input_error("sample: --temperature '%s': expected a number >= 0", v);
    } else if (!strcmp(name, "--top-k")) {
        if (parse_long(v, &s->top_k) < 0 || s->top_k < 0)
            mp_input_error("sample: --top-k '%s': expected an integer >= 0", v);
    } else {   // --seed
        if (parse_long(v, &s->seed) < 0 || s->seed < 0)
            mp_input_error("sample: --seed '%s': expected an integer >= 0", v);
        s->have_seed = 1;
    }
}

int mp_cmd_sample(int argc, char **argv) {
    sample_args sa = {.n_tokens = -1, .temperature = 1.0};
    mp_cli_spec spec = {"sample", sample_usage, sample_opts, MP_CLI_N_OPTS(sample_opts),
                        sample_option, &sa};
    mp_cli_args args;
    if (mp_cli_parse(&spec, argc, argv, &args)) return 0;   // --help
    if (!args.config_path)
        mp_input_error("sample: missing CONFIG.ini (see millipede sample --help)");
    if (!sa.model_path)
        mp_input_error("sample: missing --model PATH (see millipede sample --help)");
    if (!sa.prompt) mp_input_error("sample: missing --prompt TEXT");
    if (!sa.prompt[0])
        mp_input_error("sample: --prompt is empty (the model needs at least one token)");
    if (!sa.have_tokens) mp_input_error("sample: missing --tokens N");

    char err[2048];
    mp_config cfg, mcfg;
    mp_cli_load_config(&cfg, args.config_path, args.sets, args.n_sets);
    free(args.sets);
    const mp_backend *be = mp_cli_setup(&cfg);   // threads; exits 2 when the backend is missing
    const char *model_path = sa.model_path, *prompt = sa.prompt;
    // On P ranks the expert rows are sharded as in training. One sequence cannot be split
    // over the ranks, so every rank runs all of it (the owners serve each rank's copy of a
    // token), and rank 0 alone draws each next token and sends it to the others: ranks on
    // machines whose BLAS rounds differently would otherwise draw apart.
    mp_comm *comm = mp_comm_mpi(), *xfer = NULL;
    int rank = comm->rank, P = comm->size;
    if (P > 1) {
        mp_check_ranks(&cfg, comm, 0);
        char why[700];
        xfer = mp_transport_open(cfg.transport, comm, be, cfg.nccl_timeout, why, sizeof why);
        // stdout is the command's output (JSON, text): what it ran on goes to stderr
        if (rank == 0) fprintf(stderr, "millipede sample: %d ranks, transport %s\n", P, why);
    }
    mp_model *m = mp_open_stored_model(model_path, &cfg, args.config_path, be, 1, xfer, &mcfg,
                                       err, sizeof err);
    mp_agree_or_exit(m ? 0 : 2, err);
    // the model's tokenizer (carried by the checkpoint or model file; none: bytes)
    mp_tokenizer *bytes_tk = NULL;
    const mp_tokenizer *tk = mp_model_tokenizer(m);
    if (!tk) tk = bytes_tk = mp_tokenizer_bytes(mcfg.vocab_size);
    if (mp_tokenizer_vocab(tk) != mcfg.vocab_size)
        mp_input_error("%s: its tokenizer has %d tokens, its model.vocab_size is %d", model_path,
                       mp_tokenizer_vocab(tk), mcfg.vocab_size);
    uint64_t seed = sa.have_seed ? (uint64_t)sa.seed : cfg.seed;
    long n_tokens = sa.n_tokens;
    int V = mcfg.vocab_size, T = mcfg.context;

    size_t plen = strlen(prompt);
    uint16_t *tok16;
    long n_prompt = mp_tokenizer_encode(tk, prompt, plen, &tok16, err, sizeof err);
    if (n_prompt < 0) mp_input_error("sample: --prompt: %s", err);
    if (n_prompt == 0) mp_input_error("sample: --prompt encodes to no tokens");
    size_t len = (size_t)n_prompt, total = len + (size_t)n_tokens;
    int32_t *seq = mp_malloc(total * sizeof *seq);   // prompt then generated tokens
    for (size_t i = 0; i < len; i++) seq[i] = tok16[i];
    free(tok16);
    float *logits = mp_malloc((size_t)V * sizeof *logits);   // (V) last position
    int *order = mp_malloc((size_t)V * sizeof *order);
    double *prob = mp_malloc((size_t)V * sizeof *prob);

    if (rank == 0) fwrite(prompt, 1, plen, stdout);
    fflush(stdout);
    // The output is the decoded continuation, printed as it grows: a subword tokenizer
    // decodes a sequence, not token by token (a character may span byte tokens), so each
    // step decodes all generated tokens and prints what is new.
    size_t printed = 0, first = len;
    for (long i = 0; i < n_tokens; i++) {
        // Condition on the last min(len, context) tokens.
        size_t n = len < (size_t)T ? len : (size_t)T;
        mp_model_forward(m, seq + (len - n), NULL, 1, (int)n, 0);
        be->to_host(logits, mp_model_logits(m) + (n - 1) * (size_t)V, (size_t)V * sizeof *logits);
        for (int v = 0; v < V; v++)
            if (!isfinite(logits[v])) mp_fatal("sample: non-finite logit for token %d", v);
        int32_t next = pick_token(logits, V, sa.temperature, (int)sa.top_k,
                                  mp_uniform(seed, SAMPLE_STREAM, (uint64_t)i), order, prob);
        comm->broadcast(comm, &next, sizeof next, 0);
        seq[len++] = next;
        if (rank != 0) continue;
        char *text;
        long tl = mp_tokenizer_decode(tk, seq + first, len - first, &text, err, sizeof err);
        if (tl < 0) mp_fatal("sample: %s", err);
        // (a byte piece that starts a character decodes to U+FFFD until the character is whole)
        if ((size_t)tl > printed && !(tl >= 3 && !memcmp(text + tl - 3, "\xef\xbf\xbd", 3))) {
            fwrite(text + printed, 1, (size_t)tl - printed, stdout);
            printed = (size_t)tl;
        }
        free(text);
        fflush(stdout);
    }
    if (rank == 0) {
        char *text;   // what a character left unfinished at the end held back
        long tl = mp_tokenizer_decode(tk, seq + first, len - first, &text, err, sizeof err);
        if (tl < 0) mp_fatal("sample: %s", err);
        if ((size_t)tl > printed) fwrite(text + printed, 1, (size_t)tl - printed, stdout);
        free(text);
        // piped output stays exactly the text; Open MPI hands its ranks a pseudo-terminal
        // for stdout whatever mpirun's own stdout is, so under it the text stays bare too
        if (P == 1 && isatty(STDOUT_FILENO)) fputc('\n', stdout);
    }
    fflush(stdout);

    free(logits);
    free(order);
    free(prob);
    free(seq);
    mp_tokenizer_free(bytes_tk);
    mp_model_free(m);
    if (xfer != comm) mp_comm_free(xfer);
    mp_comm_free(comm);
    return 0;
}
