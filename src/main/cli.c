#include "cli.h"
#include <cblas.h>
#include <omp.h>
#include <string.h>
#include "core/log.h"

void mp_cli_load_config(mp_config *cfg, const char *path, char **sets, int n_sets) {
    char err[1024];
    if (mp_config_load(cfg, path, sets, n_sets, err, sizeof err) != 0) mp_input_error("%s", err);
}

const mp_backend *mp_cli_setup(const mp_config *cfg) {
    if (cfg->threads > 0) {
        omp_set_num_threads(cfg->threads);
        openblas_set_num_threads(cfg->threads);
    }
    if (!strcmp(cfg->backend, "cuda")) {
        char err[512];
        const mp_backend *be = mp_backend_cuda(err, sizeof err);
        if (!be) mp_input_error("system.backend = cuda: %s", err);
        return be;
    }
    return mp_backend_cpu();
}
