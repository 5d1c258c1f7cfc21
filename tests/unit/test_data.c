// Token shards, the byte tokenizer and the batch sampler (src/data).
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>
#include "core/rng.h"
#include "millipede/data.h"

static char tmpdir[256];

static void path_in_tmp(char *out, size_t len, const char *name) {
    snprintf(out, len, "%s/%s", tmpdir, name);
}

// Writes raw bytes, for shards corrupted on purpose.
static void write_raw(const char *path, const unsigned char *p, size_t n) {
    FILE *f = fopen(path, "wb");
    assert_non_null(f);
    assert_int_equal(fwrite(p, 1, n, f), n);
    assert_int_equal(fclose(f), 0);
}

static unsigned char *read_raw(const char *path, size_t *n) {
    FILE *f = fopen(path, "rb");
    assert_non_null(f);
    fseek(f, 0, SEEK_END);
    *n = (size_t)ftell(f);
    fseek(f, 0, SEEK_SET);
    unsigned char *p = malloc(*n + 1);
    assert_non_null(p);
    assert_int_equal(fread(p, 1, *n, f), *n);
    fclose(f);
    return p;
}

// A valid shard of n tokens (pseudo-random, < vocab), written by mp_shard_write.
static uint16_t *make_tokens(uint64_t n, uint32_t vocab, uint64_t seed) {
    uint16_t *t = malloc(n * sizeof *t + 2);
    for (uint64_t i = 0; i < n; i++) t[i] = (uint16_t)(mp_hash3(seed, 7, i) % vocab);
    return t;
}

static void test_round_trip(void **state) {
    (void)state;
    char path[512], err[2048];
    path_in_tmp(path, sizeof path, "rt.bin");
    const uint64_t n = 10007;
    uint16_t *tok = make_tokens(n, 1000, 1);
    tok[5] = 999;   // largest valid token, high byte set
    assert_int_equal(mp_shard_write(path, 1000, 0, tok, n, err, sizeof err), 0);
    // The temporary file was renamed away.
    char tmp[600];
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    assert_int_not_equal(access(tmp, F_OK), 0);

    // Header bytes, decoded by hand rather than by the reader under test.
    size_t nb;
    unsigned char *raw = read_raw(path, &nb);
    assert_int_equal(nb, 32 + 2 * n);
    assert_memory_equal(raw, "MPTOKENS", 8);
    assert_int_equal(raw[8], 1);
    assert_int_equal(raw[12] | raw[13] << 8, 1000);
    uint64_t hn = 0;
    for (int i = 0; i < 8; i++) hn |= (uint64_t)raw[16 + i] << (8 * i);
    assert_int_equal(hn, n);
    assert_int_equal(raw[24], 2);
    assert_int_equal(raw[32 + 10] | raw[32 + 11] << 8, 999);   // token 5, little-endian
    free(raw);

    mp_shard s;
    assert_int_equal(mp_shard_open(&s, path, 1000, err, sizeof err), 0);
    assert_int_equal(s.vocab_size, 1000);
    assert_int_equal(s.n_tokens, n);
    assert_memory_equal(s.tokens, tok, n * sizeof *tok);
    assert_string_equal(s.path, path);
    mp_shard_close(&s);
    // expect_vocab 0 accepts any vocabulary.
    assert_int_equal(mp_shard_open(&s, path, 0, err, sizeof err), 0);
    mp_shard_close(&s);

    // An empty shard is structurally valid.
    assert_int_equal(mp_shard_write(path, 256, 0, tok, 0, err, sizeof err), 0);
    assert_int_equal(mp_shard_open(&s, path, 256, err, sizeof err), 0);
    assert_int_equal(s.n_tokens, 0);
    mp_shard_close(&s);
    free(tok);
}

// Opens path and expects a failure whose message names the file and contains `what`.
static void expect_open_fails(const char *path, uint32_t expect_vocab, const char *what) {
    char err[2048] = "";
    mp_shard s;
    int rc = mp_shard_open(&s, path, expect_vocab, err, sizeof err);
    if (rc == 0 || !strstr(err, path) || !strstr(err, what))
        fail_msg("open %s: rc %d, message '%s', expected to contain '%s'", path, rc, err, what);
    assert_null(s.tokens);
}

static void test_corruptions(void **state) {
    (void)state;
    char good[512], bad[512], err[2048];
    path_in_tmp(good, sizeof good, "good.bin");
    path_in_tmp(bad, sizeof bad, "bad.bin");
    const uint64_t n = 1000;
    uint16_t *tok = make_tokens(n, 256, 2);
    assert_int_equal(mp_shard_write(good, 256, 0, tok, n, err, sizeof err), 0);
    size_t nb;
    unsigned char *raw = read_raw(good, &nb);
    unsigned char *c = malloc(nb + 16);

    memcpy(c, raw, nb);
    c[0] = 'X';
    write_raw(bad, c, nb);
    expect_open_fails(bad, 256, "magic");

    memcpy(c, raw, nb);
    c[8] = 3;
    write_raw(bad, c, nb);
    expect_open_fails(bad, 256, "unsupported shard version 3");

    // Version 2 (another tokenizer): its hash, kept whole; hash 0 is bytes, which is version 1
    char v2[512];
    path_in_tmp(v2, sizeof v2, "v2.bin");
    assert_int_equal(mp_shard_write(v2, 256, 0x8000000000000001ULL, tok, n, err, sizeof err), 0);
    size_t n2;
    unsigned char *raw2 = read_raw(v2, &n2);
    assert_int_equal(n2, 48 + 2 * n);
    assert_int_equal(raw2[8], 2);
    mp_shard s2;
    assert_int_equal(mp_shard_open(&s2, v2, 256, err, sizeof err), 0);
    assert_true(s2.tokenizer_hash == 0x8000000000000001ULL);
    assert_memory_equal(s2.tokens, tok, n * sizeof *tok);
    mp_shard_close(&s2);
    memset(raw2 + 32, 0, 8);
    write_raw(bad, raw2, n2);
    expect_open_fails(bad, 256, "version 2 with tokenizer hash 0");
    write_raw(bad, raw2, 40);
    expect_open_fails(bad, 256, "too short for a version-2 token shard");
    free(raw2);

    memcpy(c, raw, nb);
    c[24] = 4;
    write_raw(bad, c, nb);
    expect_open_fails(bad, 256, "bytes_per_token");

    memcpy(c, raw, nb);
    c[12] = c[13] = 0;   // vocab_size 0
    write_raw(bad, c, nb);
    expect_open_fails(bad, 0, "vocab_size 0");

    memcpy(c, raw, nb);
    c[14] = 2;           // vocab_size 256 + 2*65536
    write_raw(bad, c, nb);
    expect_open_fails(bad, 0, "out of range");

    // Truncated: the message states what the header promised and what the file has.
    write_raw(bad, raw, nb - 3);
    char want[256];
    snprintf(want, sizeof want, "truncated: header says 1000 tokens (2032 bytes), file has %zu bytes",
             nb - 3);
    expect_open_fails(bad, 256, want);
    write_raw(bad, raw, 20);
    expect_open_fails(bad, 256, "too short");

    // n_tokens so large that 32 + 2n overflows must still read as truncated.
    memcpy(c, raw, nb);
    memset(c + 16, 0xff, 8);
    write_raw(bad, c, nb);
    expect_open_fails(bad, 256, "truncated");

    memcpy(c, raw, nb);
    c[nb] = 0;
    write_raw(bad, c, nb + 1);
    expect_open_fails(bad, 256, "trailing bytes");

    // Token 437 = 256 == vocab_size (the boundary); the first bad token's index is reported.
    memcpy(c, raw, nb);
    c[32 + 2 * 437] = 0;
    c[32 + 2 * 437 + 1] = 1;
    c[32 + 2 * 900 + 1] = 1;
    write_raw(bad, c, nb);
    expect_open_fails(bad, 256, "at index 437");

    expect_open_fails(good, 320, "does not match");

    char missing[512];
    path_in_tmp(missing, sizeof missing, "no_such_shard.bin");
    expect_open_fails(missing, 256, "cannot open");

    // The good shard is still good (the checks are not order dependent on state).
    mp_shard s;
    assert_int_equal(mp_shard_open(&s, good, 256, err, sizeof err), 0);
    mp_shard_close(&s);

    // The writer refuses tokens that the reader would reject.
    tok[3] = 256;
    assert_int_equal(mp_shard_write(bad, 256, 0, tok, n, err, sizeof err), -1);
    assert_non_null(strstr(err, "index 3"));
    free(c);
    free(raw);
    free(tok);
}

static void test_tokenizer(void **state) {
    (void)state;
    unsigned char text[512];
    for (int i = 0; i < 512; i++) text[i] = (unsigned char)((i * 37 + 11) & 0xff);
    uint16_t tok[512];
    assert_int_equal(mp_tokenize_bytes(text, 512, tok), 512);
    unsigned char back[512];
    size_t m = 0;
    for (int i = 0; i < 512; i++) {
        assert_true(tok[i] < MP_BYTE_VOCAB);
        char piece[8];
        size_t k = mp_detokenize(tok[i], piece, sizeof piece);
        assert_int_equal(k, 1);
        memcpy(back + m, piece, k);
        m += k;
    }
    assert_int_equal(m, 512);
    assert_memory_equal(back, text, 512);
    const char *s = "héllo\n";
    assert_int_equal(mp_tokenize_bytes((const unsigned char *)s, strlen(s), tok), strlen(s));
    assert_int_equal(tok[1], 0xc3);   // UTF-8 bytes pass through unchanged
    char piece[4];
    assert_int_equal(mp_detokenize(300, piece, sizeof piece), 0);   // padding id: no text
    assert_int_equal(mp_detokenize('a', piece, 0), 0);
}

static void test_offsets(void **state) {
    (void)state;
    const uint64_t big = 1000000007ULL;
    const int T = 64;
    uint64_t base = mp_batch_offset(42, 0, 100, 3, 5, big, T);
    assert_int_equal(mp_batch_offset(42, 0, 100, 3, 5, big, T), base);   // pure function
    // Each coordinate matters (a coincidence has probability ~1e-9 per pair).
    assert_int_not_equal(mp_batch_offset(43, 0, 100, 3, 5, big, T), base);
    assert_int_not_equal(mp_batch_offset(42, 1, 100, 3, 5, big, T), base);
    assert_int_not_equal(mp_batch_offset(42, 0, 101, 3, 5, big, T), base);
    assert_int_not_equal(mp_batch_offset(42, 0, 100, 4, 5, big, T), base);
    assert_int_not_equal(mp_batch_offset(42, 0, 100, 3, 6, big, T), base);
    // Swapping coordinates gives a different sequence (no symmetric packing).
    assert_int_not_equal(mp_batch_offset(42, 0, 5, 3, 100, big, T),
                         mp_batch_offset(42, 0, 100, 3, 5, big, T));

    // Range: offsets in [0, n - T - 1], and with a tiny corpus every start is reached.
    const uint64_t n = 80;
    int seen[80] = {0};
    for (uint64_t step = 0; step < 200; step++)
        for (uint32_t j = 0; j < 8; j++) {
            uint64_t off = mp_batch_offset(7, 0, step, 0, j, n, T);
            assert_true(off + T + 1 <= n);
            seen[off]++;
        }
    for (uint64_t o = 0; o + T < n; o++) assert_true(seen[o] > 0);
    // The smallest corpus holds exactly one window.
    for (uint64_t step = 0; step < 10; step++)
        assert_int_equal(mp_batch_offset(9, 1, step, 2, 3, T + 1, T), 0);
    // Large indices near the packing limits are accepted.
    assert_true(mp_batch_offset(1, 0, 0xffffffffULL, 4095, (1u << 20) - 1, big, T) < big - T);
}

static void test_fill(void **state) {
    (void)state;
    const uint64_t n = 5000;
    const int B = 6, T = 17;
    mp_shard s = {0};
    snprintf(s.path, sizeof s.path, "memory");
    s.vocab_size = 65535;
    s.n_tokens = n;
    // Distinct tokens make "targets are inputs shifted by one" checkable against the source.
    s.tokens = malloc(n * sizeof *s.tokens);
    for (uint64_t i = 0; i < n; i++) s.tokens[i] = (uint16_t)i;
    int32_t in[6 * 17], tg[6 * 17];
    mp_batch_fill(&s, 11, 0, 12, 1, 0, B, T, in, tg);
    for (int i = 0; i < B; i++) {
        uint64_t off = mp_batch_offset(11, 0, 12, 1, (uint32_t)i, n, T);
        for (int t = 0; t < T; t++) {
            assert_int_equal(in[i * T + t], (int32_t)(off + t));
            assert_int_equal(tg[i * T + t], (int32_t)(off + t + 1));
            if (t + 1 < T) assert_int_equal(tg[i * T + t], in[i * T + t + 1]);
        }
    }
    // Rank independence: rows [2, 5) filled alone equal rows 2..4 of the whole micro-batch.
    int32_t in2[3 * 17], tg2[3 * 17];
    mp_batch_fill(&s, 11, 0, 12, 1, 2, 3, T, in2, tg2);
    assert_memory_equal(in2, in + 2 * T, sizeof in2);
    assert_memory_equal(tg2, tg + 2 * T, sizeof tg2);
    // Another step gives another batch.
    int32_t in3[6 * 17], tg3[6 * 17];
    mp_batch_fill(&s, 11, 0, 13, 1, 0, B, T, in3, tg3);
    assert_memory_not_equal(in3, in, sizeof in);
    free(s.tokens);
}

// The sampler's guards end the process; run them in a child.
static int exit_status_of_fill(uint64_t n_tokens, int T) {
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        (void)!freopen("/dev/null", "w", stderr);
        uint16_t tok[16] = {0};
        mp_shard s = {.vocab_size = 256, .n_tokens = n_tokens, .tokens = tok};
        int32_t in[16], tg[16];
        mp_batch_fill(&s, 1, 0, 0, 0, 0, 1, T, in, tg);
        _exit(0);
    }
    int st = 0;
    waitpid(pid, &st, 0);
    return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

static void test_fill_guards(void **state) {
    (void)state;
    assert_int_equal(exit_status_of_fill(9, 8), 0);     // exactly one window
    assert_int_not_equal(exit_status_of_fill(8, 8), 0); // too short
    assert_int_not_equal(exit_status_of_fill(9, 0), 0); // no context
}

static int setup(void **state) {
    (void)state;
    const char *base = getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp";
    snprintf(tmpdir, sizeof tmpdir, "%s/mp_test_data_XXXXXX", base);
    return mkdtemp(tmpdir) ? 0 : -1;
}

static int teardown(void **state) {
    (void)state;
    const char *names[] = {"rt.bin", "good.bin", "bad.bin", "v2.bin", "rt.bin.tmp", "bad.bin.tmp"};
    char p[512];
    for (size_t i = 0; i < sizeof names / sizeof *names; i++) {
        path_in_tmp(p, sizeof p, names[i]);
        remove(p);
    }
    return rmdir(tmpdir);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_round_trip),
        cmocka_unit_test(test_corruptions),
        cmocka_unit_test(test_tokenizer),
        cmocka_unit_test(test_offsets),
        cmocka_unit_test(test_fill),
        cmocka_unit_test(test_fill_guards),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
