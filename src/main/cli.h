// What every subcommand does the same way: load the config (with --set overrides),
// apply system.threads, pick the backend. Each exits with status 2 and one line on bad input.
#pragma once
#include "millipede/backend.h"
#include "millipede/config.h"

void mp_cli_load_config(mp_config *cfg, const char *path, char **sets, int n_sets);
// Applies system.threads to OpenMP and OpenBLAS and returns the configured backend.
const mp_backend *mp_cli_setup(const mp_config *cfg);
