// What every subcommand does the same way: parse "CONFIG.ini [--set section.key=value]...
// [own options]", load the config (with --set overrides), apply system.threads, pick the
// backend. Bad input exits with status 2 and one line (mp_input_error).
#pragma once
#include "millipede/backend.h"
#include "millipede/config.h"

// One option of a command. A command that takes --set lists it like the others; its values
// are collected into mp_cli_args.sets instead of going to on_option.
typedef struct {
    const char *name;      // "--model"
    int takes_value;       // 1: the next argument is its value
    // The message when its value is missing; NULL: "CMD: option NAME needs a value".
    const char *missing;
} mp_cli_option;

#define MP_CLI_N_OPTS(opts) ((int)(sizeof(opts) / sizeof *(opts)))

typedef struct {
    const char *cmd;             // "eval": the command, in messages
    const char *usage;           // printed on stdout for -h / --help
    const mp_cli_option *opts;   // n_opts of them
    int n_opts;
    // Called for each of opts but --set, in command-line order (value NULL for a flag);
    // exits through mp_input_error when the value is bad.
    void (*on_option)(void *ctx, const char *name, const char *value);
    void *ctx;
} mp_cli_spec;

typedef struct {
    const char *config_path;   // NULL when none was given
    char **sets;               // the --set values, n_sets of them (free() the array)
    int n_sets;
} mp_cli_args;

// Parses argv[1..argc-1] into args. Returns 1 when it printed the usage for --help (the
// command then returns 0; nothing to free), else 0. Exits with status 2 on an unknown
// option, an option without its value or a second positional argument.
int mp_cli_parse(const mp_cli_spec *spec, int argc, char **argv, mp_cli_args *args);
// Exits with status 2 ("CMD runs on one rank, not N") when started on more than one rank.
void mp_cli_single_rank(const char *cmd);

void mp_cli_load_config(mp_config *cfg, const char *path, char **sets, int n_sets);
// Applies system.threads to OpenMP and returns the configured backend.
const mp_backend *mp_cli_setup(const mp_config *cfg);
