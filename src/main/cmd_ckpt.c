// `millipede ckpt inspect DIR`, `ckpt verify DIR`, `ckpt export DIR OUT.h5`
// (docs/checkpoints.md). DIR is anything mp_ckpt_resolve takes: a step_%08d directory,
// checkpoints/latest, a checkpoints/ directory or a run directory.
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "cli.h"
#include "core/log.h"
#include "millipede/checkpoint.h"
#include "millipede/model_file.h"

static const char *ckpt_usage =
    "usage: millipede ckpt inspect DIR\n"
    "       millipede ckpt verify DIR\n"
    "       millipede ckpt export DIR OUT.h5\n"
    "\n"
    "DIR: a checkpoint (run.dir/checkpoints/step_00000100, run.dir/checkpoints/latest), a\n"
    "checkpoints/ directory or a run directory (both mean their latest checkpoint).\n"
    "\n"
    "  inspect   step, training state, files and sizes, ranks and their expert row ranges,\n"
    "            every dataset with its global shape, the stored configuration\n"
    "  verify    every file present with the size the index records, every dataset's shape\n"
    "            against the configuration and the layout, the virtual datasets' mappings,\n"
    "            and every checksum (reads all data). Prints one line per problem on stderr;\n"
    "            exit status 0 when the checkpoint is good, 1 when it is not\n"
    "  export    writes the parameters and BatchNorm statistics as one model file (the\n"
    "            single-file format of docs/outputs.md; no optimizer state)\n"
    "\n"
    "Exit status 2: bad command line, or DIR is not a checkpoint at all.\n";

static int ckpt_error(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static int ckpt_error(const char *fmt, ...) {
    if (mp_rank() == 0) {
        va_list ap;
        va_start(ap, fmt);
        fputs("millipede: error: ", stderr);
        vfprintf(stderr, fmt, ap);
        fputc('\n', stderr);
        va_end(ap);
    }
    return 2;
}

static int export_model(const char *dir, const char *out) {
    char err[2048];
    mp_config cfg;
    mp_ckpt_info info;
    if (mp_ckpt_read_config(dir, &cfg, &info, err, sizeof err) != 0) return ckpt_error("%s", err);
    mp_model *m = mp_model_create(&cfg, mp_backend_cpu(), 1);
    int status = 0;
    if (mp_ckpt_load(dir, m, NULL, "its own configuration", NULL, err, sizeof err) != 0)
        status = ckpt_error("%s", err);
    else if (mp_model_save(m, out, info.step, err, sizeof err) != 0)
        status = ckpt_error("%s", err);
    else
        printf("exported %s (step %ld) to %s\n", dir, info.step, out);
    mp_model_free(m);
    return status;
}

int mp_cmd_ckpt(int argc, char **argv) {
    if (argc >= 2 && (!strcmp(argv[1], "--help") || !strcmp(argv[1], "-h"))) {
        if (mp_rank() == 0) fputs(ckpt_usage, stdout);
        return 0;
    }
    if (argc < 3) return ckpt_error("ckpt: expected `inspect DIR`, `verify DIR` or `export DIR "
                                    "OUT.h5` (see millipede ckpt --help)");
    const char *sub = argv[1];
    int want = !strcmp(sub, "export") ? 4 : 3;
    if (strcmp(sub, "inspect") && strcmp(sub, "verify") && strcmp(sub, "export"))
        return ckpt_error("ckpt: unknown subcommand '%s' (expected inspect, verify or export)", sub);
    if (argc != want)
        return ckpt_error("ckpt %s: expected %s", sub, want == 4 ? "DIR OUT.h5" : "one DIR");
    mp_cli_single_rank("ckpt");
    char dir[2048], err[2048];
    if (mp_ckpt_resolve(argv[2], dir, sizeof dir, err, sizeof err) != 0)
        return ckpt_error("%s", err);
    if (!strcmp(sub, "inspect")) {
        if (mp_ckpt_inspect(dir, stdout, err, sizeof err) != 0) return ckpt_error("%s", err);
        return 0;
    }
    if (!strcmp(sub, "verify")) {
        int problems = mp_ckpt_verify(dir, stdout, stderr);
        fflush(stdout);
        return problems == 0 ? 0 : 1;
    }
    return export_model(dir, argv[3]);
}
