// millipede train CONFIG.ini [--set section.key=value]...
#include <stdio.h>
#include <string.h>
#include "cli.h"
#include "commands.h"
#include "core/log.h"
#include "millipede/train.h"

static const char *help =
    "usage: millipede train CONFIG.ini [--set section.key=value]...\n"
    "\n"
    "Trains the model that CONFIG.ini describes (docs/config.md lists every key).\n"
    "Writes into run.dir: config.ini (the resolved configuration), metrics.jsonl (one JSON\n"
    "object per line: training lines with \"step\" and \"loss\", validation lines with\n"
    "\"val_loss\") and model.h5 (the trained model, read by eval and sample).\n";

int mp_cmd_train(int argc, char **argv) {
    const char *config_path = NULL;
    char *sets[256];
    int n_sets = 0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) {
            if (mp_rank() == 0) fputs(help, stdout);
            return 0;
        } else if (!strcmp(argv[i], "--set")) {
            if (i + 1 >= argc) mp_input_error("train: --set needs section.key=value");
            if (n_sets == 256) mp_input_error("train: more than 256 --set options");
            sets[n_sets++] = argv[++i];
        } else if (argv[i][0] == '-') {
            mp_input_error("train: unknown option '%s' (see millipede train --help)", argv[i]);
        } else if (!config_path) {
            config_path = argv[i];
        } else {
            mp_input_error("train: unexpected argument '%s' (one CONFIG.ini expected)", argv[i]);
        }
    }
    if (!config_path) mp_input_error("train: missing CONFIG.ini (see millipede train --help)");
    mp_config cfg;
    mp_cli_load_config(&cfg, config_path, sets, n_sets);
    const mp_backend *be = mp_cli_setup(&cfg);
    return mp_train_run(&cfg, be);
}
