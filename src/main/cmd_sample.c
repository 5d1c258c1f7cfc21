// `millipede sample CONFIG.ini --model PATH --prompt TEXT --tokens N [--temperature T]
//  [--top-k K] [--seed S] [--set section.key=value]...`
// Generates N byte tokens after the prompt and writes the prompt and the generated text to
// stdout as they are produced. Sampling is reproducible: the uniform number behind token i
// is mp_uniform(seed, SAMPLE_STREAM, i).
#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cli.h"
#include "commands.h"
#include "core/log.h"
#include "core/rng.h"
#include "millipede/config.h"
#include "millipede/data.h"
#include "millipede/model.h"
#include "millipede/checkpoint.h"
#include "millipede/model_file.h"

// Streams 0 and 1 are the train and validation samplers; sampling uses its own.
#define SAMPLE_STREAM 2

static const char *sample_usage =
    "usage: millipede sample CONFIG.ini --model PATH --prompt TEXT --tokens N\n"
    "                        [--temperature T] [--top-k K] [--seed S] [--set section.key=value]...\n"
    "\n"
    "Continues TEXT with N tokens of the byte tokenizer (model.vocab_size 256) and prints the\n"
    "prompt followed by the generated text on stdout (a final newline only on a terminal).\n"
    "Each token is drawn from the logits at the last position of a forward pass over the\n"
    "last model.context tokens.\n"
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

static void sample_error(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void sample_error(const char *fmt, ...) {
    if (mp_rank() != 0) return;
    va_list ap;
    va_start(ap, fmt);
    fputs("millipede: error: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
}

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

int mp_cmd_sample(int argc, char **argv) {
    const char *cfg_path = NULL, *model_path = NULL, *prompt = NULL;
    long n_tokens = -1, top_k = 0, seed_arg = -1;
    int have_tokens = 0, have_seed = 0;
    double temperature = 1.0;
    char **overrides = mp_calloc((size_t)argc, sizeof *overrides);
    int n_over = 0, status = 2;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            if (mp_rank() == 0) fputs(sample_usage, stdout);
            free(overrides);
            return 0;
        }
        static const char *with_value[] = {"--model", "--prompt", "--tokens", "--temperature",
                                           "--top-k", "--seed", "--set"};
        int known = 0;
        for (size_t k = 0; k < sizeof with_value / sizeof *with_value; k++)
            known |= !strcmp(a, with_value[k]);
        if (known) {
            if (i + 1 >= argc) {
                sample_error("sample: option %s needs a value", a);
                goto out;
            }
            const char *v = argv[++i];
            if (!strcmp(a, "--model")) {
                model_path = v;
            } else if (!strcmp(a, "--prompt")) {
                prompt = v;
            } else if (!strcmp(a, "--set")) {
                overrides[n_over++] = argv[i];
            } else if (!strcmp(a, "--tokens")) {
                if (parse_long(v, &n_tokens) < 0 || n_tokens < 0) {
                    sample_error("sample: --tokens '%s': expected an integer >= 0", v);
                    goto out;
                }
                have_tokens = 1;
            } else if (!strcmp(a, "--temperature")) {
                if (parse_double(v, &temperature) < 0 || temperature < 0) {
                    sample_error("sample: --temperature '%s': expected a number >= 0", v);
                    goto out;
                }
            } else if (!strcmp(a, "--top-k")) {
                if (parse_long(v, &top_k) < 0 || top_k < 0) {
                    sample_error("sample: --top-k '%s': expected an integer >= 0", v);
                    goto out;
                }
            } else {   // --seed
                if (parse_long(v, &seed_arg) < 0 || seed_arg < 0) {
                    sample_error("sample: --seed '%s': expected an integer >= 0", v);
                    goto out;
                }
                have_seed = 1;
            }
        } else if (a[0] == '-') {
            sample_error("sample: unknown option '%s' (see millipede sample --help)", a);
            goto out;
        } else if (!cfg_path) {
            cfg_path = a;
        } else {
            sample_error("sample: unexpected argument '%s' (one CONFIG.ini expected)", a);
            goto out;
        }
    }
    if (!cfg_path) {
        sample_error("sample: missing CONFIG.ini (see millipede sample --help)");
        goto out;
    }
    if (!model_path) {
        sample_error("sample: missing --model PATH (see millipede sample --help)");
        goto out;
    }
    if (!prompt) {
        sample_error("sample: missing --prompt TEXT");
        goto out;
    }
    if (!prompt[0]) {
        sample_error("sample: --prompt is empty (the model needs at least one token)");
        goto out;
    }
    if (!have_tokens) {
        sample_error("sample: missing --tokens N");
        goto out;
    }
    if (mp_world() > 1) {
        sample_error("sample runs on one rank, not %d", mp_world());
        goto out;
    }

    char err[2048];
    mp_config cfg, mcfg;
    if (mp_config_load(&cfg, cfg_path, overrides, n_over, err, sizeof err) < 0) {
        sample_error("%s", err);
        goto out;
    }
    const mp_backend *be = mp_cli_setup(&cfg);   // threads; exits 2 when the backend is missing
    mp_model *m = mp_open_stored_model(model_path, &cfg, cfg_path, be, 1, &mcfg, err, sizeof err);
    if (!m) {
        sample_error("%s", err);
        goto out;
    }
    if (mcfg.vocab_size != MP_BYTE_VOCAB) {
        sample_error("%s: sample uses the byte tokenizer (model.vocab_size %d), the model has "
                     "model.vocab_size %d",
                     model_path, MP_BYTE_VOCAB, mcfg.vocab_size);
        mp_model_free(m);
        goto out;
    }
    uint64_t seed = have_seed ? (uint64_t)seed_arg : cfg.seed;
    int V = mcfg.vocab_size, T = mcfg.context;

    size_t plen = strlen(prompt);
    size_t total = plen + (size_t)n_tokens;
    uint16_t *tok16 = mp_malloc(plen * sizeof *tok16);
    int32_t *seq = mp_malloc(total * sizeof *seq);   // prompt then generated tokens
    size_t len = mp_tokenize_bytes((const unsigned char *)prompt, plen, tok16);
    for (size_t i = 0; i < len; i++) seq[i] = tok16[i];
    free(tok16);
    float *logits = mp_malloc((size_t)V * sizeof *logits);   // (V) last position
    int *order = mp_malloc((size_t)V * sizeof *order);
    double *prob = mp_malloc((size_t)V * sizeof *prob);

    fwrite(prompt, 1, plen, stdout);
    fflush(stdout);
    for (long i = 0; i < n_tokens; i++) {
        // Condition on the last min(len, context) tokens.
        size_t n = len < (size_t)T ? len : (size_t)T;
        mp_model_forward(m, seq + (len - n), NULL, 1, (int)n, 0);
        be->to_host(logits, mp_model_logits(m) + (n - 1) * (size_t)V, (size_t)V * sizeof *logits);
        for (int v = 0; v < V; v++)
            if (!isfinite(logits[v])) mp_fatal("sample: non-finite logit for token %d", v);
        int next = pick_token(logits, V, temperature, (int)top_k,
                              mp_uniform(seed, SAMPLE_STREAM, (uint64_t)i), order, prob);
        seq[len++] = next;
        char text[16];
        size_t tl = mp_detokenize((uint16_t)next, text, sizeof text);
        fwrite(text, 1, tl, stdout);
        fflush(stdout);
    }
    if (isatty(STDOUT_FILENO)) fputc('\n', stdout);   // piped output stays exactly the text
    fflush(stdout);
    status = 0;

    free(logits);
    free(order);
    free(prob);
    free(seq);
    mp_model_free(m);
out:
    free(overrides);
    return status;
}
