#include "cli.h"
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "core/agree.h"
#include "core/log.h"

static const mp_cli_option *find_option(const mp_cli_spec *spec, const char *name) {
    for (int k = 0; k < spec->n_opts; k++)
        if (!strcmp(name, spec->opts[k].name)) return &spec->opts[k];
    return NULL;
}

int mp_cli_parse(const mp_cli_spec *spec, int argc, char **argv, mp_cli_args *args) {
    const char *cmd = spec->cmd;
    args->config_path = NULL;
    args->sets = mp_calloc((size_t)argc, sizeof *args->sets);   // at most argc - 1 values
    args->n_sets = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            if (mp_rank() == 0) fputs(spec->usage, stdout);
            free(args->sets);
            args->sets = NULL;
            return 1;
        }
        const mp_cli_option *o = find_option(spec, a);
        if (o && !o->takes_value) {
            spec->on_option(spec->ctx, a, NULL);
        } else if (o) {
            if (i + 1 >= argc) {
                if (o->missing) mp_input_error("%s", o->missing);
                mp_input_error("%s: option %s needs a value", cmd, a);
            }
            if (!strcmp(a, "--set"))
                args->sets[args->n_sets++] = argv[++i];
            else
                spec->on_option(spec->ctx, a, argv[++i]);
        } else if (a[0] == '-') {
            mp_input_error("%s: unknown option '%s' (see millipede %s --help)", cmd, a, cmd);
        } else if (!args->config_path) {
            args->config_path = a;
        } else {
            mp_input_error("%s: unexpected argument '%s' (one CONFIG.ini expected)", cmd, a);
        }
    }
    return 0;
}

void mp_cli_single_rank(const char *cmd) {
    if (mp_world() > 1) mp_input_error("%s runs on one rank, not %d", cmd, mp_world());
}

void mp_cli_load_config(mp_config *cfg, const char *path, char **sets, int n_sets) {
    // each rank reads the file: a node that cannot see it must stop the others too
    char err[2048];
    mp_agree_or_exit(mp_config_load(cfg, path, sets, n_sets, err, sizeof err), err);
}

const mp_backend *mp_cli_setup(const mp_config *cfg) {
    // OpenMP threads only: the CPU backend runs OpenBLAS single-threaded inside its own
    // OpenMP regions (src/backend/cpu/ops_dense.c, mp_cpu_sgemm)
    if (cfg->threads > 0) omp_set_num_threads(cfg->threads);
    if (!strcmp(cfg->backend, "cuda")) {
        // a node without a usable GPU must stop the whole job, not only its own rank
        char err[512], msg[600];
        const mp_backend *be = mp_backend_cuda(err, sizeof err);
        snprintf(msg, sizeof msg, "system.backend = cuda: %s", err);
        mp_agree_or_exit(be ? 0 : -1, msg);
        return be;
    }
    return mp_backend_cpu();
}
