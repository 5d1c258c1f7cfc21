// The configuration: defaults, shipped configs, INI round trip, every kind of bad input,
// --set precedence, and the FLOP / parameter counts behind the equal-compute baselines.
#include <dirent.h>
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>

#include "millipede/config.h"
#include "millipede/model.h"

static char g_err[2048];

static const char *source_dir(void) {
    const char *s = getenv("MP_SOURCE_DIR");
    return s && *s ? s : ".";
}

static void config_path(char *out, size_t n, const char *name) {
    snprintf(out, n, "%s/configs/%s", source_dir(), name);
}

// Writes text to a fresh temporary file; returns its path (static buffer).
static const char *write_temp(const char *text) {
    static char path[64];
    snprintf(path, sizeof path, "/tmp/mp_test_config_XXXXXX");
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    FILE *f = fdopen(fd, "w");
    assert_non_null(f);
    assert_int_equal(fputs(text, f) >= 0, 1);
    assert_int_equal(fclose(f), 0);
    return path;
}

// mp_config_load of text written to a temporary file.
static int load_text(mp_config *cfg, const char *text, char **overrides, int n_over) {
    const char *path = write_temp(text);
    g_err[0] = '\0';
    int rc = mp_config_load(cfg, path, overrides, n_over, g_err, sizeof g_err);
    unlink(path);
    return rc;
}

static char *to_ini_alloc(const mp_config *cfg) {
    size_t n = mp_config_to_ini(cfg, NULL, 0);
    char *text = malloc(n + 1);
    assert_non_null(text);
    assert_int_equal(mp_config_to_ini(cfg, text, n + 1), n);
    assert_int_equal(strlen(text), n);
    return text;
}

// ----------------------------------------------------------------------------------------

static void test_defaults_validate(void **state) {
    (void)state;
    mp_config c;
    mp_config_defaults(&c);
    assert_int_equal(mp_config_validate(&c, g_err, sizeof g_err), 0);
    assert_int_equal(c.vocab_size, 256);
    assert_int_equal(c.peer.n_sub * c.peer.n_sub, c.peer.n_experts);
    assert_string_equal(c.backend, "cpu");
    assert_string_equal(c.precision, "fp32");
    assert_string_equal(c.expert_optimizer, "adamw");
    assert_string_equal(c.transport, "auto");
    assert_true(c.nccl_timeout == 600.0f);
    assert_true(c.hang_timeout == 1800.0f);
    // Loading no file gives the defaults, resolved: dense_hidden shows 4*d_model.
    mp_config r;
    assert_int_equal(mp_config_load(&r, NULL, NULL, 0, g_err, sizeof g_err), 0);
    assert_int_equal(r.dense_hidden, 4 * r.d_model);
    char *text = to_ini_alloc(&r);
    char want[64];
    snprintf(want, sizeof want, "dense_hidden = %d\n", 4 * r.d_model);
    assert_non_null(strstr(text, want));
    free(text);
}

// Every configs/*.ini loads, validates and round-trips; the four named ones must exist.
static void test_shipped_configs(void **state) {
    (void)state;
    char dir[1024];
    snprintf(dir, sizeof dir, "%s/configs", source_dir());
    DIR *d = opendir(dir);
    assert_non_null(d);
    int found = 0, named = 0;
    struct dirent *e;
    while ((e = readdir(d))) {
        size_t len = strlen(e->d_name);
        if (len < 5 || strcmp(e->d_name + len - 4, ".ini")) continue;
        char path[2048];
        snprintf(path, sizeof path, "%s/%s", dir, e->d_name);
        mp_config c;
        if (mp_config_load(&c, path, NULL, 0, g_err, sizeof g_err) != 0)
            fail_msg("%s: %s", path, g_err);
        assert_int_equal(mp_config_validate(&c, g_err, sizeof g_err), 0);
        found++;
        named += !strcmp(e->d_name, "tiny.ini") || !strcmp(e->d_name, "peer-1m.ini") ||
                 !strcmp(e->d_name, "dense.ini") || !strcmp(e->d_name, "pkm.ini");
    }
    closedir(d);
    assert_true(found >= 4);
    assert_int_equal(named, 4);

    char path[1024];
    mp_config c;
    config_path(path, sizeof path, "peer-1m.ini");
    assert_int_equal(mp_config_load(&c, path, NULL, 0, g_err, sizeof g_err), 0);
    assert_int_equal(c.peer.n_experts, 1024L * 1024L);
    assert_int_equal(c.peer.n_sub, 1024);
    assert_int_equal(c.peer.heads, 8);
    assert_int_equal(c.peer.topk, 16);
    assert_true(c.peer.query_bn);
    int n_peer = 0;
    for (int l = 0; l < c.n_layers; l++) n_peer += c.ffn[l] == MP_FFN_PEER;
    assert_int_equal(n_peer, 1);
}

static void check_round_trip(const mp_config *c) {
    char *a = to_ini_alloc(c);
    mp_config back;
    if (mp_config_from_ini_string(&back, a, "round-trip", g_err, sizeof g_err) != 0)
        fail_msg("%s", g_err);
    char *b = to_ini_alloc(&back);
    assert_string_equal(a, b);
    // Field by field for a readable failure, then every byte.
    assert_string_equal(c->run_dir, back.run_dir);
    assert_int_equal(c->dense_hidden, back.dense_hidden);
    assert_memory_equal(c->ffn, back.ffn, sizeof c->ffn);
    assert_memory_equal(&c->peer, &back.peer, sizeof c->peer);
    assert_memory_equal(&c->pkm, &back.pkm, sizeof c->pkm);
    assert_true(c->lr == back.lr && c->eps == back.eps && c->init_std == back.init_std);
    assert_true(c->seed == back.seed && c->steps == back.steps);
    assert_memory_equal(c, &back, sizeof *c);
    assert_true(mp_config_hash(c) == mp_config_hash(&back));
    free(a);
    free(b);
}

static void test_round_trip(void **state) {
    (void)state;
    const char *names[] = {"tiny.ini", "peer-1m.ini", "dense.ini", "pkm.ini"};
    for (int i = 0; i < 4; i++) {
        char path[1024];
        mp_config c;
        config_path(path, sizeof path, names[i]);
        assert_int_equal(mp_config_load(&c, path, NULL, 0, g_err, sizeof g_err), 0);
        check_round_trip(&c);
    }
    mp_config c;
    assert_int_equal(mp_config_load(&c, NULL, NULL, 0, g_err, sizeof g_err), 0);
    check_round_trip(&c);

    // Awkward values: floats that need all 9 digits, a 64-bit seed, a path longer than an
    // inih line, and an ffn list of 64 mixed kinds (also longer than an inih line).
    char longdir[700];
    memset(longdir, 'd', sizeof longdir);
    memcpy(longdir, "run.dir=/scratch/", 17);
    longdir[sizeof longdir - 1] = '\0';
    char ffn[600] = "model.ffn=";
    for (int l = 0; l < 64; l++) strcat(ffn, l % 3 == 0 ? "dense," : l % 3 == 1 ? "peer," : "pkm,");
    ffn[strlen(ffn) - 1] = '\0';
    char *ov[] = {longdir, ffn, "model.n_layers=64", "train.lr=3.33333e-4", "train.beta2=0.999",
                  "train.seed=18446744073709551615", "peer.experts=16", "peer.topk=2",
                  "pkm.experts=9", "pkm.topk=3", "pkm.query_bn=off", "peer.activation=relu",
                  "model.init_std=0.0123456789", "data.train=\"my data/train.bin\""};
    int n_ov = (int)(sizeof ov / sizeof ov[0]);
    if (mp_config_load(&c, NULL, ov, n_ov, g_err, sizeof g_err) != 0) fail_msg("%s", g_err);
    assert_int_equal(strlen(c.run_dir), strlen(longdir) - strlen("run.dir="));
    assert_int_equal(c.ffn[1], MP_FFN_PEER);
    assert_int_equal(c.ffn[63], MP_FFN_DENSE);
    assert_true(c.seed == UINT64_MAX);
    assert_string_equal(c.train_path, "my data/train.bin");
    assert_int_equal(c.peer.activation, MP_ACT_RELU);
    check_round_trip(&c);

    // The hash sees a change of any value.
    mp_config d = c;
    d.peer.bn_eps *= 2.0f;
    assert_true(mp_config_hash(&c) != mp_config_hash(&d));
    d = c;
    d.ckpt_keep++;
    assert_true(mp_config_hash(&c) != mp_config_hash(&d));
}

// ----------------------------------------------------------------------------------------
// bad input: -1 and a one-line message that names the key (and the file and line)

typedef struct {
    const char *text;       // file contents
    const char *override;   // one --set, or NULL
    const char *want[3];    // substrings the message must contain
} bad_case;

static const bad_case BAD[] = {
    {"[trian]\nsteps = 5\n", NULL, {"unknown section", "trian", ":2:"}},
    {"[train]\nstpes = 5\n", NULL, {"unknown key 'train.stpes'", ":2:", "train.steps"}},
    {"[peer]\ntopk = abc\n", NULL, {"key 'peer.topk'", "expected an integer", "'abc'"}},
    {"[train]\nsteps = 12x\n", NULL, {"key 'train.steps'", "'12x'", ":2:"}},
    {"[train]\nsteps = -5\n", NULL, {"key 'train.steps'", "-5"}},
    {"[model]\nffn = dense,dense,peer,dense\n[peer]\nexperts = 1000\n", NULL,
     {"key 'peer.experts'", "1000 is not a perfect square"}},
    {"[model]\nffn = peer\n[peer]\nexperts = 16\ntopk = 5\n", NULL, {"key 'peer.topk'"}},
    {"[model]\nffn = pkm\n[pkm]\nexperts = 100\ntopk = 11\n", NULL, {"key 'pkm.topk'"}},
    {"[model]\nffn = dense,pkm,dense,dense\n[pkm]\nkey_dim = 63\n", NULL, {"key 'pkm.key_dim'", "even"}},
    {"[model]\nffn = peer\n[peer]\nkey_dim = 0\n", NULL, {"key 'peer.key_dim'"}},
    {"[model]\nffn = peer\n[peer]\nheads = 0\n", NULL, {"key 'peer.heads'"}},
    {"[model]\nffn = peer\n[peer]\nbn_eps = 0\n", NULL, {"key 'peer.bn_eps'"}},
    // the largest N with 32-bit expert ids is 46340^2; the next square is refused
    {"[model]\nffn = peer\n[peer]\nexperts = 2147488281\n", NULL,
     {"key 'peer.experts'", "2147488281 is out of range", "46340^2"}},
    {"[model]\nffn = peer\n[peer]\nexperts = 4294967296\n", NULL, {"key 'peer.experts'", "out of range"}},
    {"[model]\nffn = peer\n[peer]\nbalance_rate = -0.01\n", NULL, {"key 'peer.balance_rate'", "[0, 1]", "-0.01"}},
    {"[model]\nffn = pkm\n[pkm]\nbalance_rate = 2\n", NULL, {"key 'pkm.balance_rate'", "[0, 1]"}},
    {"[model]\nffn = pkm\n[pkm]\nbalance_rate = nan\n", NULL, {"key 'pkm.balance_rate'"}},
    {"[model]\nd_model = 130\n", NULL, {"key 'model.d_model'", "model.n_heads"}},
    {"[model]\nffn = dense,peer\n", NULL, {"key 'model.ffn'", "lists 2", "n_layers = 4"}},
    {"[model]\nffn = dense,moe,dense,dense\n", NULL, {"key 'model.ffn'", "'moe'"}},
    {"[model]\nffn = dense,,peer,dense\n", NULL, {"key 'model.ffn'"}},
    {"[model]\nffn =\n", NULL, {"key 'model.ffn'"}},
    {"[model]\nn_layers = 0\n", NULL, {"key 'model.n_layers'"}},
    {"[model]\nn_layers = 65\n", NULL, {"key 'model.n_layers'"}},
    {"[model]\nvocab_size = 1\n", NULL, {"key 'model.vocab_size'"}},
    {"[model]\nvocab_size = 65537\n", NULL, {"key 'model.vocab_size'"}},
    {"[model]\ncontext = 0\n", NULL, {"key 'model.context'"}},
    {"[model]\ninit_std = -1\n", NULL, {"key 'model.init_std'"}},
    {"[model]\ndense_hidden = -3\n", NULL, {"key 'model.dense_hidden'"}},
    {"[peer]\nquery_bn = maybe\n", NULL, {"key 'peer.query_bn'", "'maybe'"}},
    {"[peer]\nactivation = tanh\n", NULL, {"key 'peer.activation'", "'tanh'"}},
    {"[pkm]\nactivation = gelu\n", NULL, {"unknown key 'pkm.activation'"}},
    {"[train]\nsteps = 5\nsteps = 6\n", NULL, {"key 'train.steps'", "twice", ":3:"}},
    {"[train]\nsteps 5\n", NULL, {":2:", "key = value"}},
    {"[train]\n= 5\n", NULL, {":2:", "key name"}},
    {"[model\nd_model = 64\n", NULL, {":1:", "']'"}},
    {"[model] junk\n", NULL, {":1:", "after ']'"}},
    {"steps = 5\n", NULL, {"'steps'", "outside any [section]", ":1:"}},
    {"[train]\nlr = 1e-3x\n", NULL, {"key 'train.lr'", "expected a number"}},
    {"[train]\nlr = nan\n", NULL, {"key 'train.lr'", "finite"}},
    {"[train]\nlr = 1e99\n", NULL, {"key 'train.lr'"}},
    {"[train]\nlr = 0\n", NULL, {"key 'train.lr'"}},
    {"[train]\nbeta1 = 1\n", NULL, {"key 'train.beta1'"}},
    {"[train]\nbeta2 = 0\n", NULL, {"key 'train.beta2'"}},
    {"[train]\neps = 0\n", NULL, {"key 'train.eps'"}},
    {"[train]\nmin_lr_frac = 1.5\n", NULL, {"key 'train.min_lr_frac'"}},
    {"[train]\nwarmup = -1\n", NULL, {"key 'train.warmup'"}},
    {"[train]\nweight_decay = -0.1\n", NULL, {"key 'train.weight_decay'"}},
    {"[train]\ngrad_clip = -1\n", NULL, {"key 'train.grad_clip'"}},
    {"[train]\nbatch_size = 0\n", NULL, {"key 'train.batch_size'"}},
    {"[train]\nbatch_size = 99999999999\n", NULL, {"key 'train.batch_size'", "out of range"}},
    {"[train]\ngrad_accum = 0\n", NULL, {"key 'train.grad_accum'"}},
    // the sampler's limits (data.h) and B * T in an int: once accepted and then fatal at step 0
    {"[train]\ngrad_accum = 4097\n", NULL, {"key 'train.grad_accum'", "[1, 4096]", "4097"}},
    {"[train]\nbatch_size = 1048577\n", NULL, {"key 'train.batch_size'", "[1, 1048576]"}},
    {"[train]\nsteps = 4294967296\n", NULL, {"key 'train.steps'", "4294967296"}},
    {"[model]\ncontext = 65536\n[train]\nbatch_size = 65536\n", NULL,
     {"'train.batch_size' x 'model.context'", "65536 x 65536"}},
    {"[train]\nseed = -1\n", NULL, {"key 'train.seed'"}},
    {"[train]\nlog_every = 0\n", NULL, {"key 'train.log_every'"}},
    {"[train]\neval_every = -1\n", NULL, {"key 'train.eval_every'"}},
    {"[train]\neval_batches = 0\n", NULL, {"key 'train.eval_batches'"}},
    {"[run]\ndir =\n", NULL, {"key 'run.dir'"}},
    {"[data]\ntrain = \"\"\n", NULL, {"key 'data.train'"}},
    {"[checkpoint]\nkeep = 0\n", NULL, {"key 'checkpoint.keep'"}},
    {"[checkpoint]\nevery = -2\n", NULL, {"key 'checkpoint.every'"}},
    {"[system]\nthreads = -1\n", NULL, {"key 'system.threads'"}},
    {"[system]\nbackend = tpu\n", NULL, {"key 'system.backend'", "'tpu'"}},
    {"[system]\nprecision = fp16\n", NULL, {"key 'system.precision'", "'fp16'"}},
    {"[train]\nexpert_optimizer = sparse_adam\n", NULL,
     {"key 'train.expert_optimizer'", "adamw or lazy_adamw", "'sparse_adam'"}},
    {"[system]\ntransport = gloo\n", NULL, {"key 'system.transport'", "'gloo'"}},
    {"[system]\nbackend = cuda\ntransport = mpi\n", NULL,
     {"key 'system.transport'", "mpi moves host buffers"}},
    {"[system]\nbackend = cpu\ntransport = nccl\n", NULL,
     {"key 'system.transport'", "nccl moves GPU buffers"}},
    {"[system]\nnccl_timeout = 0\n", NULL, {"key 'system.nccl_timeout'", "(0, 86400]"}},
    {"[system]\nnccl_timeout = -5\n", NULL, {"key 'system.nccl_timeout'", "got -5"}},
    {"[system]\nnccl_timeout = 1e6\n", NULL, {"key 'system.nccl_timeout'", "(0, 86400]"}},
    {"[system]\nnccl_timeout = nan\n", NULL, {"key 'system.nccl_timeout'", "finite"}},
    {"[system]\nhang_timeout = -1\n", NULL, {"key 'system.hang_timeout'", "[0, 604800]"}},
    {"[system]\nhang_timeout = 1e7\n", NULL, {"key 'system.hang_timeout'", "got 1e+07"}},
    {"[system]\ntransport = mpi_staged\n", NULL,
     {"key 'system.transport'", "mpi_staged moves GPU buffers"}},
    {"[system]\nbackend = cpu\nprecision = bf16\n", NULL,
     {"key 'system.precision'", "bf16 needs system.backend = cuda"}},
    // --set
    {"", "trainsteps=5", {"--set 'trainsteps=5'", "expected section.key=value"}},
    {"", "train.steps", {"--set 'train.steps'", "expected section.key=value"}},
    {"", "=5", {"--set '=5'"}},
    {"", ".steps=5", {"--set '.steps=5'"}},
    {"", "train.=5", {"--set 'train.=5'"}},
    {"", "train.steps=abc", {"--set", "key 'train.steps'", "'abc'"}},
    {"", "train.stpes=1", {"--set", "unknown key 'train.stpes'"}},
};

static void test_bad_input(void **state) {
    (void)state;
    for (size_t i = 0; i < sizeof BAD / sizeof BAD[0]; i++) {
        const bad_case *b = &BAD[i];
        char *ov[1] = {(char *)b->override};
        mp_config c;
        int rc = load_text(&c, b->text, ov, b->override ? 1 : 0);
        if (rc != -1) fail_msg("case %zu (%s%s): accepted", i, b->text, b->override ? b->override : "");
        for (int w = 0; w < 3 && b->want[w]; w++)
            if (!strstr(g_err, b->want[w]))
                fail_msg("case %zu: message \"%s\" lacks \"%s\"", i, g_err, b->want[w]);
        assert_null(strchr(g_err, '\n'));   // one line
        // The file is named unless the --set itself is malformed.
        if (!b->override) assert_non_null(strstr(g_err, "/tmp/mp_test_config_"));
    }
}

static void test_missing_file(void **state) {
    (void)state;
    mp_config c;
    const char *path = "/nonexistent/dir/missing.ini";
    assert_int_equal(mp_config_load(&c, path, NULL, 0, g_err, sizeof g_err), -1);
    assert_non_null(strstr(g_err, path));
    assert_null(strchr(g_err, '\n'));
    char dir[1024];
    snprintf(dir, sizeof dir, "%s/configs", source_dir());
    assert_int_equal(mp_config_load(&c, dir, NULL, 0, g_err, sizeof g_err), -1);   // a directory
    assert_non_null(strstr(g_err, dir));
}

// ----------------------------------------------------------------------------------------
// accepted input

static void test_good_input(void **state) {
    (void)state;
    mp_config c;
    // [peer] and [pkm] are only checked when a layer uses them.
    assert_int_equal(load_text(&c, "[peer]\nexperts = 1000\ntopk = 300\n[pkm]\nkey_dim = 3\n", NULL, 0), 0);
    char *ov[] = {"peer.topk=300"};
    assert_int_equal(load_text(&c, "", ov, 1), 0);
    // the sampler's limits themselves are allowed
    assert_int_equal(load_text(&c, "[train]\ngrad_accum = 4096\nbatch_size = 1048576\n"
                                   "steps = 4294967295\n", NULL, 0), 0);
    // the largest expert count with 32-bit ids: every id a*n + b < 2^31
    assert_int_equal(load_text(&c, "[model]\nffn = peer\n[peer]\nexperts = 2147395600\n", NULL, 0), 0);
    assert_int_equal(c.peer.n_sub, 46340);
    assert_true((long)c.peer.n_sub * c.peer.n_sub - 1 <= INT32_MAX);
    // Indented keys (inih alone would read them as continuation lines), comments, CRLF,
    // a byte-order mark, "key: value", quotes around strings, order independence of ffn.
    const char *text =
        "\xEF\xBB\xBF; comment\r\n"
        "# another comment\r\n"
        "[model]\r\n"
        "  ffn = dense, peer ; one peer layer\r\n"
        "  n_layers = 2\r\n"
        "\td_model: 64\r\n"
        "  n_heads = 2\r\n"
        "[peer]\n"
        "experts = 64\n"
        "topk = 8\n"
        "[run]\n"
        "dir = \"runs/with space\"   ; quoted\n";
    if (load_text(&c, text, NULL, 0) != 0) fail_msg("%s", g_err);
    assert_int_equal(c.n_layers, 2);
    assert_int_equal(c.d_model, 64);
    assert_int_equal(c.n_heads, 2);
    assert_int_equal(c.dense_hidden, 256);
    assert_int_equal(c.ffn[0], MP_FFN_DENSE);
    assert_int_equal(c.ffn[1], MP_FFN_PEER);
    assert_int_equal(c.peer.n_sub, 8);
    assert_string_equal(c.run_dir, "runs/with space");
    assert_null(mp_config_retrieval(&c, 0));
    assert_ptr_equal(mp_config_retrieval(&c, 1), &c.peer);
    assert_null(mp_config_retrieval(&c, 2));
    // One kind for every layer.
    assert_int_equal(load_text(&c, "[model]\nffn = pkm\nn_layers = 3\n[pkm]\nexperts=16\ntopk=2\n", NULL, 0), 0);
    for (int l = 0; l < 3; l++) assert_ptr_equal(mp_config_retrieval(&c, l), &c.pkm);
    // Every spelling of a boolean.
    const char *yes[] = {"true", "1", "yes", "on", "TRUE", "On"};
    const char *no[] = {"false", "0", "no", "off", "False", "OFF"};
    for (int i = 0; i < 6; i++) {
        char t[64];
        snprintf(t, sizeof t, "[peer]\nquery_bn = %s\n", yes[i]);
        assert_int_equal(load_text(&c, t, NULL, 0), 0);
        assert_int_equal(c.peer.query_bn, 1);
        snprintf(t, sizeof t, "[peer]\nquery_bn = %s\n", no[i]);
        assert_int_equal(load_text(&c, t, NULL, 0), 0);
        assert_int_equal(c.peer.query_bn, 0);
    }
}

static void test_set_overrides(void **state) {
    (void)state;
    mp_config c;
    const char *text = "[train]\nsteps = 5\nlr = 0.5\n";
    char *ov[] = {"train.steps=7", " model.d_model = 64 ", "train.lr=0.25", "train.lr=0.125"};
    if (load_text(&c, text, ov, 4) != 0) fail_msg("%s", g_err);
    assert_int_equal(c.steps, 7);        // --set beats the file
    assert_int_equal(c.d_model, 64);     // blanks around the parts are fine
    assert_true(c.lr == 0.125f);         // the last --set wins
    assert_int_equal(c.dense_hidden, 4 * 64);   // resolved after the overrides
    // Validation runs after the overrides: an invalid file fixed by --set is accepted.
    const char *bad = "[model]\nffn = peer\n[peer]\nexperts = 16\ntopk = 8\n";
    assert_int_equal(load_text(&c, bad, NULL, 0), -1);
    char *fix[] = {"peer.topk=3"};
    if (load_text(&c, bad, fix, 1) != 0) fail_msg("%s", g_err);
    assert_int_equal(c.peer.topk, 3);
    // mp_config_set directly.
    mp_config_defaults(&c);
    assert_int_equal(mp_config_set(&c, "peer", "experts", "4096", g_err, sizeof g_err), 0);
    assert_int_equal(c.peer.n_sub, 64);
    assert_int_equal(mp_config_set(&c, "peer", "experts", "x", g_err, sizeof g_err), -1);
    assert_non_null(strstr(g_err, "peer.experts"));
}

// ----------------------------------------------------------------------------------------
// FLOPs and parameters

static double load_flops(const char *name, mp_config *c) {
    char path[1024];
    config_path(path, sizeof path, name);
    if (mp_config_load(c, path, NULL, 0, g_err, sizeof g_err) != 0) fail_msg("%s", g_err);
    return mp_model_flops_per_token(c);
}

static int count_kind(const mp_config *c, mp_ffn_kind kind) {
    int n = 0;
    for (int l = 0; l < c->n_layers; l++) n += c->ffn[l] == kind;
    return n;
}

// The baselines are what they claim: same model, the PEER layer replaced, FLOPs within 2%.
static void test_baseline_flops_match(void **state) {
    (void)state;
    mp_config tiny, dense, pkm;
    double f_tiny = load_flops("tiny.ini", &tiny);
    double f_dense = load_flops("dense.ini", &dense);
    double f_pkm = load_flops("pkm.ini", &pkm);
    printf("flops/token: tiny %.0f  dense %.0f  pkm %.0f\n", f_tiny, f_dense, f_pkm);
    assert_int_equal(count_kind(&tiny, MP_FFN_PEER), 1);
    assert_int_equal(count_kind(&dense, MP_FFN_DENSE), dense.n_layers);
    assert_int_equal(count_kind(&pkm, MP_FFN_PKM), 1);
    for (int l = 0; l < tiny.n_layers; l++)   // the PKM layer sits where the PEER layer is
        assert_int_equal(tiny.ffn[l] == MP_FFN_PEER, pkm.ffn[l] == MP_FFN_PKM);
    const mp_config *base[] = {&dense, &pkm};
    for (int i = 0; i < 2; i++) {
        const mp_config *b = base[i];
        assert_int_equal(b->d_model, tiny.d_model);
        assert_int_equal(b->n_layers, tiny.n_layers);
        assert_int_equal(b->context, tiny.context);
        assert_int_equal(b->vocab_size, tiny.vocab_size);
        assert_int_equal(b->batch_size, tiny.batch_size);
        assert_int_equal(b->steps, tiny.steps);
    }
    // 2%: the design's requirement on the baselines (configs/*.ini), not rounding; the
    // counts are sums of products of small integers, exact in double
    assert_true(fabs(f_dense / f_tiny - 1.0) < 0.02);
    assert_true(fabs(f_pkm / f_tiny - 1.0) < 0.02);
    // The match is not an accident of the formula ignoring the layers: a different top-k
    // or MLP width moves the count (a PKM value costs 2*C per selection).
    int k = pkm.pkm.topk;
    pkm.pkm.topk = k / 2;
    double saved = (double)pkm.pkm.heads * (k - k / 2) * 2.0 * pkm.d_model;
    // integer-valued doubles far below 2^53, so exact: < 0.5 asks for equality
    assert_true(fabs(f_pkm - mp_model_flops_per_token(&pkm) - saved) < 0.5);
    dense.dense_hidden /= 2;
    assert_true(fabs(mp_model_flops_per_token(&dense) / f_tiny - 1.0) > 0.02);
}

// A small mixed config, counted here from the formula of docs/model.md's FLOP conventions
// (src/model/flops.c comment) and the shapes table, written out layer by layer.
static void small_config(mp_config *c) {
    char *ov[] = {"model.vocab_size=256", "model.context=16", "model.d_model=32",
                  "model.n_layers=3", "model.n_heads=2", "model.dense_hidden=48",
                  "model.ffn=dense,peer,pkm", "peer.experts=16", "peer.heads=2", "peer.topk=2",
                  "peer.key_dim=8", "peer.query_bn=true", "pkm.experts=9", "pkm.heads=3",
                  "pkm.topk=2", "pkm.key_dim=4", "pkm.query_bn=false"};
    if (mp_config_load(c, NULL, ov, (int)(sizeof ov / sizeof ov[0]), g_err, sizeof g_err) != 0)
        fail_msg("%s", g_err);
}

static void test_param_count(void **state) {
    (void)state;
    mp_config c;
    small_config(&c);
    const long V = 256, T = 16, C = 32, F = 48;
    const long Hp = 2, dkp = 8, np = 4, Np = 16;   // [peer]
    const long Hk = 3, dkk = 4, nk = 3, Nk = 9;    // [pkm], no query BN
    long shapes[][2] = {
        {V, C}, {T, C},                                             // wte, wpe
        // block 0, dense
        {1, C}, {1, C}, {3 * C, C}, {1, 3 * C}, {C, C}, {1, C}, {1, C}, {1, C},
        {F, C}, {1, F}, {C, F}, {1, C},
        // block 1, PEER: wq, bn.w, bn.b, k1, k2, u, v
        {1, C}, {1, C}, {3 * C, C}, {1, 3 * C}, {C, C}, {1, C}, {1, C}, {1, C},
        {Hp * dkp, C}, {1, Hp * dkp}, {1, Hp * dkp}, {np, dkp / 2}, {np, dkp / 2}, {Np, C}, {Np, C},
        // block 2, PKM: wq, k1, k2, v
        {1, C}, {1, C}, {3 * C, C}, {1, 3 * C}, {C, C}, {1, C}, {1, C}, {1, C},
        {Hk * dkk, C}, {nk, dkk / 2}, {nk, dkk / 2}, {Nk, C},
        {1, C}, {1, C},                                             // lnf.w, lnf.b
    };
    long want = 0;
    for (size_t i = 0; i < sizeof shapes / sizeof shapes[0]; i++) want += shapes[i][0] * shapes[i][1];
    assert_int_equal(mp_model_param_count(&c), want);
}

static void test_flops_small(void **state) {
    (void)state;
    mp_config c;
    small_config(&c);
    const double V = 256, T = 16, C = 32, F = 48;
    double attn = 2 * C * 3 * C + 2 * C * C + 2 * 2 * T * C;
    double dense = 2 * C * F * 2;
    double peer = 2 * C * (2 * 8) + 2 * 2 * 4 * 8 + 2 * 2 * (2 * C + 2 * C);   // H=2 dk=8 n=4 k=2
    double pkm = 2 * C * (3 * 4) + 2 * 3 * 3 * 4 + 3 * 2 * 2 * C;              // H=3 dk=4 n=3 k=2
    double want = 3 * attn + dense + peer + pkm + 2 * C * V;
    assert_true(fabs(mp_model_flops_per_token(&c) - want) < 0.5);   // integers: exact
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_defaults_validate),
        cmocka_unit_test(test_shipped_configs),
        cmocka_unit_test(test_round_trip),
        cmocka_unit_test(test_bad_input),
        cmocka_unit_test(test_missing_file),
        cmocka_unit_test(test_good_input),
        cmocka_unit_test(test_set_overrides),
        cmocka_unit_test(test_baseline_flops_match),
        cmocka_unit_test(test_param_count),
        cmocka_unit_test(test_flops_small),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
