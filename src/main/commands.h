// The subcommands of the millipede binary. Each returns the process exit status:
// 0 success, 1 runtime failure, 2 bad input (command line, config, data, model file).
#pragma once

int mp_cmd_train(int argc, char **argv);    // src/main/cmd_train.c
int mp_cmd_eval(int argc, char **argv);     // src/main/cmd_eval.c
int mp_cmd_sample(int argc, char **argv);   // src/main/cmd_sample.c
// mp_cmd_data is declared in millipede/data.h (src/data/prepare.c)
