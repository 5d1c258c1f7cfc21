// The training loop: micro-batches of the global batch (a function of seed and step
// only), AdamW, periodic validation, step lines on stdout and JSON lines in metrics.jsonl.
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "core/fs.h"
#include "core/log.h"
#include "millipede/model_file.h"
#include "millipede/train.h"

static void open_shard(mp_shard *s, const char *path, const mp_config *cfg, const char *key) {
    char err[1024];
    if (mp_shard_open(s, path, (uint32_t)cfg->vocab_size, err, sizeof err) != 0)
        mp_input_error("%s (from %s)", err, key);
    if (s->n_tokens < (uint64_t)cfg->context + 1)
        mp_input_error("%s: %llu tokens, fewer than one window of model.context + 1 = %d (from %s)",
                       path, (unsigned long long)s->n_tokens, cfg->context + 1, key);
}

static void report_memory(mp_model *m) {
    static const char *names[MP_N_GROUPS] = {"dense", "keys", "experts"};
    double total = 0.0;
    for (int g = 0; g < MP_N_GROUPS; g++) {
        double n = (double)mp_model_group_size(m, g);
        total += n;
        // parameters + gradients + two AdamW moments, fp32
        mp_log("params %-7s %12.0f floats  %8.1f MiB (params+grads+adam %8.1f MiB)", names[g], n,
               n * 4 / 1048576.0, n * 16 / 1048576.0);
    }
    mp_log("params total   %12.0f floats  %8.1f MiB (params+grads+adam %8.1f MiB)", total,
           total * 4 / 1048576.0, total * 16 / 1048576.0);
}

int mp_train_run(const mp_config *cfg, const mp_backend *be) {
    char err[1024], path[MP_PATH_MAX + 64];
    if (mp_mkdirs(cfg->run_dir, err, sizeof err) != 0) mp_input_error("run.dir: %s", err);
    size_t ini_len = mp_config_to_ini(cfg, NULL, 0) + 1;
    char *ini = mp_malloc(ini_len);
    mp_config_to_ini(cfg, ini, ini_len);
    mp_log("# resolved configuration\n%s", ini);
    snprintf(path, sizeof path, "%s/config.ini", cfg->run_dir);
    if (mp_write_text_file(path, ini, err, sizeof err) != 0) mp_fatal("%s", err);
    free(ini);

    mp_shard train, val;
    open_shard(&train, cfg->train_path, cfg, "data.train");
    open_shard(&val, cfg->val_path, cfg, "data.val");
    mp_log("data: train %s (%llu tokens), val %s (%llu tokens)", cfg->train_path,
           (unsigned long long)train.n_tokens, cfg->val_path, (unsigned long long)val.n_tokens);

    int B = cfg->batch_size, T = cfg->context, A = cfg->grad_accum;
    mp_model *m = mp_model_create(cfg, be, B);
    mp_adamw opt;
    mp_adamw_init(&opt, m);
    report_memory(m);
    mp_log("model: %ld parameters, %.3g forward FLOPs per token, backend %s",
           mp_model_param_count(cfg), mp_model_flops_per_token(cfg), be->name);

    snprintf(path, sizeof path, "%s/metrics.jsonl", cfg->run_dir);
    FILE *metrics = fopen(path, "w");
    if (!metrics) mp_input_error("%s: cannot write: %s", path, strerror(errno));

    int32_t *inputs = mp_malloc((size_t)B * T * sizeof(int32_t));    // (B, T)
    int32_t *targets = mp_malloc((size_t)B * T * sizeof(int32_t));   // (B, T)
    long eval_every = cfg->eval_every > 0 ? cfg->eval_every : cfg->steps;
    for (long step = 0; step < cfg->steps; step++) {
        double t0 = mp_now();
        mp_model_zero_grad(m);
        double loss = 0.0;
        for (int micro = 0; micro < A; micro++) {
            mp_batch_fill(&train, cfg->seed, 0, (uint64_t)step, (uint32_t)micro, 0, B, T, inputs, targets);
            loss += mp_model_forward(m, inputs, targets, B, T, 1) / A;
            mp_model_backward(m, 1.0f / A);
        }
        float norm = mp_adamw_step(&opt, m, step);
        double ms = (mp_now() - t0) * 1e3;
        double tok_s = (double)A * B * T / (ms / 1e3);
        float lr = mp_lr_at(cfg, MP_GROUP_DENSE, step);
        fprintf(metrics, "{\"step\": %ld, \"loss\": %.6f, \"lr\": %.6g, \"grad_norm\": %.6g, "
                "\"ms\": %.2f, \"tokens_per_s\": %.1f}\n", step + 1, loss, lr, norm, ms, tok_s);
        if ((step + 1) % cfg->log_every == 0 || step == 0 || step + 1 == cfg->steps)
            mp_log("step %6ld/%ld | loss %.4f | lr %.3e | grad norm %.4f | %.1f ms | %.0f tok/s",
                   step + 1, cfg->steps, loss, lr, norm, ms, tok_s);
        if ((step + 1) % eval_every == 0 || step + 1 == cfg->steps) {
            double vl = mp_eval_loss(m, &val, cfg->eval_batches);
            fprintf(metrics, "{\"step\": %ld, \"val_loss\": %.6f}\n", step + 1, vl);
            mp_log("step %6ld/%ld | val loss %.4f", step + 1, cfg->steps, vl);
        }
        fflush(metrics);
    }
    fclose(metrics);

    snprintf(path, sizeof path, "%s/model.h5", cfg->run_dir);
    if (mp_model_save(m, path, cfg->steps, err, sizeof err) != 0) mp_fatal("%s", err);
    mp_log("saved %s", path);
    free(inputs);
    free(targets);
    mp_adamw_free(&opt, m);
    mp_model_free(m);
    mp_shard_close(&train);
    mp_shard_close(&val);
    return 0;
}
