// millipede-testdump: runs the C model (or one FFN layer) on random inputs and writes
// parameters, inputs, outputs and gradients to HDF5, for the JAX comparisons in
// tests/python. Layout: tests/python/conftest.py and the comments below.
//   model CONFIG.ini OUT.h5 [--steps S] [--set k=v]...
//   layer CONFIG.ini OUT.h5 --block L [--tokens N] [--eval] [--set k=v]...
// Under mpirun with P > 1 ranks (model mode only), the model is sharded as in training:
// rank r writes OUT.rank<r> with its slice of the batch (attributes j0, rows), its own
// expert rows (attribute row_start on those datasets) and the all-reduced dense gradients.
#include <hdf5.h>
#include <math.h>
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "core/log.h"
#include "ckpt/h5util.h"
#include "core/rng.h"
#include "millipede/model.h"
#include "millipede/train.h"
#include "model/model_private.h"

static void write_array(hid_t file, const char *path, hid_t type, const void *data, int ndim,
                        const long *shape) {
    hsize_t dims[3];
    for (int i = 0; i < ndim; i++) dims[i] = (hsize_t)shape[i];
    hid_t lcpl = MP_CHECK_H5(H5Pcreate(H5P_LINK_CREATE));
    MP_CHECK_H5(H5Pset_create_intermediate_group(lcpl, 1));
    hid_t space = MP_CHECK_H5(ndim ? H5Screate_simple(ndim, dims, NULL) : H5Screate(H5S_SCALAR));
    hid_t ds = MP_CHECK_H5(H5Dcreate2(file, path, type, space, lcpl, H5P_DEFAULT, H5P_DEFAULT));
    MP_CHECK_H5(H5Dwrite(ds, type, H5S_ALL, H5S_ALL, H5P_DEFAULT, data));
    MP_CHECK_H5(H5Dclose(ds));
    MP_CHECK_H5(H5Sclose(space));
    MP_CHECK_H5(H5Pclose(lcpl));
}

static void write_floats(hid_t f, const char *path, const float *x, int ndim, const long *shape) {
    write_array(f, path, H5T_NATIVE_FLOAT, x, ndim, shape);
}

static void write_attr_long(hid_t obj, const char *name, long v) {
    hid_t space = MP_CHECK_H5(H5Screate(H5S_SCALAR));
    hid_t a = MP_CHECK_H5(H5Acreate2(obj, name, H5T_NATIVE_LONG, space, H5P_DEFAULT, H5P_DEFAULT));
    MP_CHECK_H5(H5Awrite(a, H5T_NATIVE_LONG, &v));
    MP_CHECK_H5(H5Aclose(a));
    MP_CHECK_H5(H5Sclose(space));
}

static void write_attr_string(hid_t obj, const char *name, const char *text) {
    hid_t type = MP_CHECK_H5(H5Tcopy(H5T_C_S1));
    MP_CHECK_H5(H5Tset_size(type, strlen(text) + 1));
    hid_t space = MP_CHECK_H5(H5Screate(H5S_SCALAR));
    hid_t a = MP_CHECK_H5(H5Acreate2(obj, name, type, space, H5P_DEFAULT, H5P_DEFAULT));
    MP_CHECK_H5(H5Awrite(a, type, text));
    MP_CHECK_H5(H5Aclose(a));
    MP_CHECK_H5(H5Sclose(space));
    MP_CHECK_H5(H5Tclose(type));
}

static void write_attr_int(hid_t obj, const char *name, int v) {
    hid_t space = MP_CHECK_H5(H5Screate(H5S_SCALAR));
    hid_t a = MP_CHECK_H5(H5Acreate2(obj, name, H5T_NATIVE_INT, space, H5P_DEFAULT, H5P_DEFAULT));
    MP_CHECK_H5(H5Awrite(a, H5T_NATIVE_INT, &v));
    MP_CHECK_H5(H5Aclose(a));
    MP_CHECK_H5(H5Sclose(space));
}

// Writes every tensor whose name starts with prefix ("" = all) from a group buffer set.
static void write_tensors(hid_t f, mp_model *m, const char *dir, int grads, const char *prefix) {
    char path[128];
    for (int i = 0; i < mp_model_n_tensors(m); i++) {
        const mp_tensor *t = mp_model_tensor(m, i);
        if (strncmp(t->name, prefix, strlen(prefix)) != 0) continue;
        float *base = grads ? mp_model_grads(m, t->group) : mp_model_params(m, t->group);
        snprintf(path, sizeof path, "/%s/%s", dir, t->name);
        write_floats(f, path, base + t->offset, t->ndim, t->shape);
        if (t->shape[0] != t->global_rows) {   // a shard: say where its rows go
            hid_t ds = MP_CHECK_H5(H5Dopen2(f, path, H5P_DEFAULT));
            write_attr_long(ds, "row_start", t->row_start);
            write_attr_long(ds, "global_rows", t->global_rows);
            MP_CHECK_H5(H5Dclose(ds));
        }
    }
}

// The router state (BN running statistics, balance biases) as /<dir>/<its dataset name>,
// "h1.peer.bn.running_var", "h1.peer.k1_bias", as the checkpoints name it.
static void write_router_state(hid_t f, mp_model *m, const char *dir) {
    mp_state_dataset st[MP_MAX_STATE_DATASETS];
    int n = mp_router_datasets(m, st);
    for (int i = 0; i < n; i++) {
        char p[96];
        long shape[2] = {(long)st[i].rows, (long)st[i].cols};
        snprintf(p, sizeof p, "/%s/%.*s", dir, (int)sizeof st[i].name, st[i].name);
        write_floats(f, p, mp_model_router_state(m) + st[i].offset, st[i].ndim, shape);
    }
}

static void fill_normal(float *x, size_t n, uint64_t seed, uint64_t stream) {
    for (size_t i = 0; i < n; i++) x[i] = mp_normal(seed, stream, i);
}

// The whole model on a random batch; with comm, this rank's slice [j0, j0 + Bl) of it.
static int dump_model(mp_model *m, hid_t f, int steps, mp_comm *comm, int j0, int Bl) {
    const mp_config *c = mp_model_config(m);
    int B = c->batch_size, T = c->context, N = B * T, V = c->vocab_size;
    int32_t *inputs = malloc((size_t)N * sizeof(int32_t)), *targets = malloc((size_t)N * sizeof(int32_t));
    for (int i = 0; i < N; i++) {
        inputs[i] = (int32_t)(mp_hash3(c->seed, 101, i) % (uint64_t)V);
        targets[i] = (int32_t)(mp_hash3(c->seed, 102, i) % (uint64_t)V);
    }
    long bt[2] = {B, T}, btv[3] = {Bl, T, V};
    write_array(f, "/batch/inputs", H5T_NATIVE_INT32, inputs, 2, bt);
    write_array(f, "/batch/targets", H5T_NATIVE_INT32, targets, 2, bt);
    write_attr_long(f, "j0", j0);
    write_attr_long(f, "rows", Bl);
    const int32_t *in = inputs + (size_t)j0 * T, *tg = targets + (size_t)j0 * T;
    float share = (float)Bl / (float)B;   // this rank's part of the global mean loss
    write_tensors(f, m, "params", 0, "");
    // the training steps below start from the initial running statistics
    size_t nst = mp_model_router_state_size(m);
    float *state0 = malloc((nst + 1) * sizeof(float));
    memcpy(state0, mp_model_router_state(m), nst * sizeof(float));
    mp_model_zero_grad(m);
    double loss = mp_model_forward(m, in, tg, Bl, T, 1) * share;
    mp_model_backward(m, share);
    mp_model_allreduce_grads(m);
    if (comm) comm->allreduce_f64(comm, &loss, 1);
    float loss32 = (float)loss;
    write_floats(f, "/out/logits", mp_model_logits(m), 3, btv);
    write_floats(f, "/out/loss", &loss32, 0, NULL);
    write_tensors(f, m, "grads", 1, "");
    memcpy(mp_model_router_state(m), state0, nst * sizeof(float));
    free(state0);
    if (steps > 0) {
        // train.grad_accum = A micro-batches per step, as the training loop runs them:
        // micro-batch 0 is the batch above, micro-batch a > 0 draws streams 101 + 2a, 102 + 2a
        // (written as /train/inputs, /train/targets (A, B, T) when A > 1)
        int A = c->grad_accum;
        int32_t *ain = mp_malloc((size_t)A * N * sizeof(int32_t));   // (A, B, T)
        int32_t *atg = mp_malloc((size_t)A * N * sizeof(int32_t));   // (A, B, T)
        for (int a = 0; a < A; a++)
            for (int i = 0; i < N; i++) {
                ain[(size_t)a * N + i] = a ? (int32_t)(mp_hash3(c->seed, 101 + 2 * a, i) % (uint64_t)V) : inputs[i];
                atg[(size_t)a * N + i] = a ? (int32_t)(mp_hash3(c->seed, 102 + 2 * a, i) % (uint64_t)V) : targets[i];
            }
        if (A > 1) {
            long abt[3] = {A, B, T};
            write_array(f, "/train/inputs", H5T_NATIVE_INT32, ain, 3, abt);
            write_array(f, "/train/targets", H5T_NATIVE_INT32, atg, 3, abt);
        }
        mp_adamw opt;
        mp_adamw_init(&opt, m);
        float *losses = malloc(steps * sizeof(float)), *norms = malloc(steps * sizeof(float));
        for (int s = 0; s < steps; s++) {
            mp_model_zero_grad(m);
            double l = 0.0;
            for (int a = 0; a < A; a++) {
                size_t o = (size_t)a * N + (size_t)j0 * T;
                l += mp_model_forward(m, ain + o, atg + o, Bl, T, 1) * share / A;
                mp_model_backward(m, share / A);
            }
            mp_model_allreduce_grads(m);
            if (comm) comm->allreduce_f64(comm, &l, 1);
            losses[s] = (float)l;
            norms[s] = mp_adamw_step(&opt, m, s);
        }
        free(ain);
        free(atg);
        long sh[1] = {steps};
        write_floats(f, "/train/losses", losses, 1, sh);
        write_floats(f, "/train/grad_norms", norms, 1, sh);
        write_tensors(f, m, "final", 0, "");
        write_router_state(f, m, "final_state");
        mp_adamw_free(&opt, m);
        free(losses);
        free(norms);
    }
    free(inputs);
    free(targets);
    return 0;
}

// One FFN layer (dense or retrieval) on random x, backward of sum(y * dy).
static int dump_layer(mp_model *m, hid_t f, int block, int N, int eval) {
    const mp_config *c = mp_model_config(m);
    int C = c->d_model;
    char prefix[32];
    snprintf(prefix, sizeof prefix, "h%d.%s", block,
             c->ffn[block] == MP_FFN_PEER ? "peer" : c->ffn[block] == MP_FFN_PKM ? "pkm" : "mlp");
    float *x = malloc((size_t)N * C * sizeof(float)), *dy = malloc((size_t)N * C * sizeof(float));
    float *y = calloc((size_t)N * C, sizeof(float)), *dx = malloc((size_t)N * C * sizeof(float));
    for (size_t i = 0; i < (size_t)N * C; i++) dx[i] = NAN;   // the layer writes dx
    fill_normal(x, (size_t)N * C, c->seed, 201);
    fill_normal(dy, (size_t)N * C, c->seed, 202);
    long nc[2] = {N, C};
    write_floats(f, "/layer/x", x, 2, nc);
    write_floats(f, "/layer/dy", dy, 2, nc);
    write_tensors(f, m, "params", 0, prefix);
    mp_model_zero_grad(m);
    mp_retrieval_layer *r = mp_model_retrieval_layer(m, block);
    if (r && eval && r->rc->query_bn) {   // non-trivial running statistics
        int HD = r->rc->heads * r->rc->key_dim;
        for (int j = 0; j < HD; j++) {
            r->running_mean[j] = 0.3f * mp_normal(c->seed, 203, j);
            r->running_var[j] = 0.5f + mp_uniform(c->seed, 204, j);
        }
        char p[96];
        long hd[1] = {HD};
        snprintf(p, sizeof p, "/state/%s.bn.running_mean", prefix);
        write_floats(f, p, r->running_mean, 1, hd);
        snprintf(p, sizeof p, "/state/%s.bn.running_var", prefix);
        write_floats(f, p, r->running_var, 1, hd);
    }
    mp_model_ffn_forward(m, block, y, x, NULL, N, !eval);
    mp_model_ffn_backward(m, block, dx, dy, NULL, x, NULL, N);
    if (r && !eval && r->rc->query_bn) {   // the running statistics after one update
        char p[96];
        long hd[1] = {r->rc->heads * r->rc->key_dim};
        snprintf(p, sizeof p, "/new_state/%s.bn.running_mean", prefix);
        write_floats(f, p, r->running_mean, 1, hd);
        snprintf(p, sizeof p, "/new_state/%s.bn.running_var", prefix);
        write_floats(f, p, r->running_var, 1, hd);
    }
    if (r) {
        long nhk[3] = {N, r->rc->heads, r->rc->topk};
        write_array(f, "/layer/selections", H5T_NATIVE_INT32, r->sel, 3, nhk);
        write_floats(f, "/layer/gates", r->gate, 3, nhk);
    }
    write_floats(f, "/layer/y", y, 2, nc);
    write_floats(f, "/layer/dx", dx, 2, nc);
    write_tensors(f, m, "grads", 1, prefix);
    write_attr_int(f, "train", !eval);
    free(x); free(dy); free(y); free(dx);
    return 0;
}

int main(int argc, char **argv) {
    MP_CHECK_MPI(MPI_Init(&argc, &argv));
    if (argc < 4 || (strcmp(argv[1], "model") && strcmp(argv[1], "layer"))) {
        fprintf(stderr, "usage: millipede-testdump model|layer CONFIG.ini OUT.h5 [--steps S] "
                        "[--block L] [--tokens N] [--eval] [--set k=v]...\n");
        return 2;
    }
    int steps = 0, block = -1, tokens = 0, eval = 0, n_sets = 0;
    char *sets[64];
    for (int i = 4; i < argc; i++) {
        if (!strcmp(argv[i], "--steps") && i + 1 < argc) steps = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--block") && i + 1 < argc) block = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--tokens") && i + 1 < argc) tokens = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--eval")) eval = 1;
        else if (!strcmp(argv[i], "--set") && i + 1 < argc && n_sets < 64) sets[n_sets++] = argv[++i];
        else { fprintf(stderr, "millipede-testdump: bad argument '%s'\n", argv[i]); return 2; }
    }
    mp_config cfg;
    char err[1024];
    if (mp_config_load(&cfg, argv[2], sets, n_sets, err, sizeof err) != 0) {
        fprintf(stderr, "millipede-testdump: %s\n", err);
        return 2;
    }
    int layer_mode = !strcmp(argv[1], "layer");
    if (layer_mode && (block < 0 || block >= cfg.n_layers)) {
        fprintf(stderr, "millipede-testdump: layer mode needs --block in [0, %d)\n", cfg.n_layers);
        return 2;
    }
    if (!tokens) tokens = cfg.batch_size * cfg.context;
    mp_comm *comm = NULL;
    int j0 = 0, Bl = cfg.batch_size;
    char out[4096];
    snprintf(out, sizeof out, "%s", argv[3]);
    mp_model *m;
    if (mp_world() > 1) {
        if (layer_mode) {
            fprintf(stderr, "millipede-testdump: layer mode runs on one rank\n");
            return 2;
        }
        comm = mp_comm_mpi();
        j0 = (int)((long)cfg.batch_size * comm->rank / comm->size);
        Bl = (int)((long)cfg.batch_size * (comm->rank + 1) / comm->size) - j0;
        snprintf(out, sizeof out, "%s.rank%d", argv[3], comm->rank);
        m = mp_model_create_sharded(&cfg, mp_backend_cpu(), Bl, comm);
        mp_model_init(m);
    } else {
        // layer mode: N token rows = (B = tokens, T = 1) in the model's buffers
        int B = layer_mode ? (tokens + cfg.context - 1) / cfg.context : cfg.batch_size;
        m = mp_model_create(&cfg, mp_backend_cpu(), B);
        mp_model_init(m);
    }
    hid_t f = MP_CHECK_H5(H5Fcreate(out, H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT));
    size_t len = mp_config_to_ini(&cfg, NULL, 0) + 1;
    char *ini = malloc(len);
    mp_config_to_ini(&cfg, ini, len);
    write_attr_string(f, "config", ini);
    free(ini);
    int rc = layer_mode ? dump_layer(m, f, block, tokens, eval) : dump_model(m, f, steps, comm, j0, Bl);
    MP_CHECK_H5(H5Fclose(f));
    mp_model_free(m);
    mp_comm_free(comm);
    MPI_Finalize();
    return rc;
}
