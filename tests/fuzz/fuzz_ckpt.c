// Both checkpoint harnesses (fuzz_ckpt.h). Input:
//   byte 0: bit 0: 0 = raw byte damage (fz_raw_patch), 1 = structural edits (fuzz_h5.h)
//           bit 1: (shards) rewrite the index's /layout/shard_bytes entry to the damaged
//                  shard's new size, so the damage gets past the size check to the reads
//           bit 2: also load into a model holding only shard 1's rows
//           bits 3-5: (shards) then 4 = remove shard p, 5 = truncate it to half,
//                  6 = swap the two shards, 7 = copy shard p over the other; else nothing
//   byte 1: (shards) p, the shard file damaged (0 or 1)
//   the rest: the raw damage or the edit program for the target file.
// Readers run: mp_ckpt_read_config, mp_ckpt_load (a model holding every row, and with
// bit 2 one holding shard 1's rows), mp_ckpt_inspect, mp_ckpt_verify.
// Contract: each accepts or fails with one non-empty line (verify: one line per problem);
// load returns 0, MP_CKPT_EBAD or MP_CKPT_EMISMATCH; no HDF5 object left open.
#include "fuzz_ckpt.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "fuzz_common.h"
#include "fuzz_h5.h"
#include "millipede/backend.h"
#include "millipede/checkpoint.h"
#include "millipede/train.h"

static mp_config run_cfg;
static mp_model *full, *part;
static mp_adamw opt;
static FILE *devnull;
static const char *const files[3] = {"index.h5", "shard_00000.h5", "shard_00001.h5"};

static const char *ck_file(const char *dir, const char *name) {
    static char slots[2][900];
    static int next;
    char *p = slots[next++ % 2];
    snprintf(p, sizeof slots[0], "%s/%s", dir, name);
    return p;
}

int fz_ckpt_init(void) {
    fz_h5_quiet();
    char err[FZ_ERR];
    if (mp_config_load(&run_cfg, fz_seed("tiny.ini"), NULL, 0, err, sizeof err) != 0) {
        fprintf(stderr, "fuzz: %s\n", err);
        abort();
    }
    full = mp_model_create(&run_cfg, mp_backend_cpu(), 1);
    part = mp_model_create_part(&run_cfg, mp_backend_cpu(), 1, 1, 2);
    mp_adamw_init(&opt, full);
    devnull = fopen("/dev/null", "w");
    if (!devnull) abort();
    // The intact seed must pass every reader, or the harness would only ever fuzz the paths
    // that reject (a stale seed after a format change, say).
    const char *dir = fz_path("ck");
    mkdir(dir, 0700);
    char seed[900];
    for (int i = 0; i < 3; i++) {
        snprintf(seed, sizeof seed, "ckpt/%s", files[i]);
        fz_copy(fz_seed(seed), ck_file(dir, files[i]));
    }
    mp_config fcfg;
    mp_ckpt_info info;
    int rc = mp_ckpt_read_config(dir, &fcfg, &info, err, sizeof err);
    if (rc == 0) rc = mp_ckpt_load(dir, full, &opt, "tiny.ini", &info, err, sizeof err);
    if (rc == 0) rc = mp_ckpt_load(dir, part, NULL, "tiny.ini", &info, err, sizeof err);
    if (rc == 0) rc = mp_ckpt_inspect(dir, devnull, err, sizeof err);
    if (rc == 0 && mp_ckpt_verify(dir, devnull, stderr) != 0) rc = -1, snprintf(err, sizeof err, "verify");
    if (rc != 0) {
        fprintf(stderr, "fuzz: the seed checkpoint is rejected (remake it: make_seeds.sh): %s\n", err);
        abort();
    }
    fz_h5_check_closed("the readers (the intact seed)");
    return 0;
}

static void file_op(const char *dir, int op, int p) {
    const char *a = ck_file(dir, files[1 + p]), *b = ck_file(dir, files[2 - p]);
    struct stat st;
    if (op == 4) unlink(a);
    if (op == 5 && stat(a, &st) == 0 && truncate(a, st.st_size / 2) != 0) abort();
    if (op == 6) {
        char tmp[900];
        snprintf(tmp, sizeof tmp, "%s.swap", a);
        if (rename(a, tmp) || rename(b, a) || rename(tmp, b)) abort();
    }
    if (op == 7) fz_copy(a, b);
}

static void load(const char *dir, mp_model *m, mp_adamw *o, const char *what) {
    char err[FZ_ERR] = "";
    mp_ckpt_info info;
    int rc = mp_ckpt_load(dir, m, o, "tiny.ini", &info, err, sizeof err);
    if (rc != 0 && rc != MP_CKPT_EBAD && rc != MP_CKPT_EMISMATCH) {
        fprintf(stderr, "CONTRACT: %s returned %d\n", what, rc);
        abort();
    }
    fz_check(what, rc, err);
    fz_h5_check_closed(what);
}

int fz_ckpt_run(int target, const uint8_t *data, size_t size) {
    size_t head = target == FZ_CK_SHARDS ? 2 : 1;
    if (size < head) return 0;
    unsigned mode = data[0];
    int p = target == FZ_CK_SHARDS ? data[1] % 2 : 0;
    const char *dir = fz_path("ck");
    fz_clean();
    mkdir(dir, 0700);
    char seed[900];
    for (int i = 0; i < 3; i++) {
        snprintf(seed, sizeof seed, "ckpt/%s", files[i]);
        fz_copy(fz_seed(seed), ck_file(dir, files[i]));
    }
    const char *victim_name = files[target == FZ_CK_SHARDS ? 1 + p : 0];
    char victim[900], seed_dir[900];
    snprintf(victim, sizeof victim, "%s", ck_file(dir, victim_name));
    snprintf(seed_dir, sizeof seed_dir, "%s", fz_seed("ckpt"));
    if (mode & 1)
        fz_h5_edit(victim, data + head, size - head);
    else
        fz_raw_patch(ck_file(seed_dir, victim_name), victim, data + head, size - head);
    if (target == FZ_CK_SHARDS) {
        struct stat st;
        if ((mode & 2) && stat(victim, &st) == 0)
            fz_h5_set_i64(ck_file(dir, files[0]), "/layout/shard_bytes", p, (long long)st.st_size);
        file_op(dir, (int)(mode >> 3) & 7, p);
    }
    fz_h5_check_closed("the damage");

    char err[FZ_ERR] = "";
    mp_config fcfg;
    mp_ckpt_info info;
    int rc = mp_ckpt_read_config(dir, &fcfg, &info, err, sizeof err);
    fz_check("mp_ckpt_read_config", rc, err);
    fz_h5_check_closed("mp_ckpt_read_config");

    load(dir, full, &opt, "mp_ckpt_load");
    if (mode & 4) load(dir, part, NULL, "mp_ckpt_load (shard 1's rows)");

    err[0] = '\0';
    rc = mp_ckpt_inspect(dir, devnull, err, sizeof err);
    fz_check("mp_ckpt_inspect", rc, err);
    fz_h5_check_closed("mp_ckpt_inspect");

    char *text = NULL;
    size_t len = 0;
    FILE *errs = open_memstream(&text, &len);
    int problems = mp_ckpt_verify(dir, devnull, errs);
    fclose(errs);
    fz_check_lines("mp_ckpt_verify", problems, text, len);
    free(text);
    fz_h5_check_closed("mp_ckpt_verify");
    return 0;
}
