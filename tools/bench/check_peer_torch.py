#!/usr/bin/env python3
"""Checks that the PyTorch layer of bench_peer_torch.py is millipede's PEER / PKM layer.

The benchmark compares our CUDA layer with that PyTorch layer, so it must compute the same
function. This builds it with bench_peer_torch.build_layer on the CPU at a small shape,
copies its parameters into the independent JAX reference (tools/ref/millipede_ref.py,
written from docs/model.md) and compares, per case (PEER / PKM, query BN in training mode,
in eval mode and off) and dtype (fp64, fp32):

  - the parameters against the reference's table: shapes, and the initial distributions
    (N(0, std^2) by sample std, U(+-b) by range, ones / zeros exactly) with the config
    defaults of docs/config.md;
  - BatchNorm's eps and momentum against the defaults;
  - the selected experts (via the inputs of the v embedding), on inputs x redrawn until
    the k-th and (k+1)-th scores are well apart (no near-tie decides a selection);
  - y, and the gradients of x, W_q, BN w / b, K1, K2, U, V for a random dy;
  - the BN running statistics after the step (training mode).

Needs PyTorch and JAX (not CI dependencies); run it by hand:

    python3 tools/bench/check_peer_torch.py [--tokens 64] [--seed 0]

Prints one line per check and exits 1 if any fails.
"""
import argparse
import os
import sys
import types

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "ref"))
sys.path.insert(0, HERE)

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)   # fp64 cases; fp32 arrays stay fp32

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
try:
    import torch
except ImportError:
    print("check_peer_torch: PyTorch is not installed (pip install torch)")
    sys.exit(77)

import bench_peer_torch as B  # noqa: E402
import millipede_ref as R  # noqa: E402

D, N_SUB, HEADS, TOPK, DK = 32, 8, 2, 4, 8
TOL = {"fp64": 1e-10, "fp32": 1e-5}
# k-th minus (k+1)-th score over the largest |score|: far above the rounding of the scores
# (a few units of the last place), so the selections cannot depend on it
MIN_GAP = {"fp64": 1e-12, "fp32": 1e-5}
DTYPES = {"fp64": (torch.float64, np.float64), "fp32": (torch.float32, np.float32)}

# name: (layer kind, query BN, BN in training mode)
CASES = {
    "peer_bn_train": ("peer", True, True),
    "peer_bn_eval": ("peer", True, False),
    "peer_nobn": ("peer", False, True),
    "pkm_bn_train": ("pkm", True, True),
    "pkm_nobn": ("pkm", False, True),
}

FAILED = []


def report(ok, what):
    print(("ok    " if ok else "FAIL  ") + what, flush=True)
    if not ok:
        FAILED.append(what)


def rel_err(a, b):
    """max |a - b| / max |b| (b the reference)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def config(kind, bn):
    """The reference's Config for one layer of this shape; everything else its defaults."""
    text = (f"[model]\nd_model = {D}\nn_layers = 1\nn_heads = 1\nffn = {kind}\n"
            f"[{kind}]\nexperts = {N_SUB * N_SUB}\nheads = {HEADS}\ntopk = {TOPK}\n"
            f"key_dim = {DK}\nquery_bn = {'true' if bn else 'false'}\nactivation = gelu\n")
    return R.parse_config(text)


def torch_params(layer, prefix):
    """The PyTorch layer's parameters under the reference's names (docs/model.md)."""
    out = {prefix + "wq": layer.wq.weight, prefix + "k1": layer.k1, prefix + "k2": layer.k2,
           prefix + "v": layer.v.weight}
    if layer.bn is not None:
        out[prefix + "bn.w"], out[prefix + "bn.b"] = layer.bn.weight, layer.bn.bias
    if layer.u is not None:
        out[prefix + "u"] = layer.u.weight
    return out


def check_init(name, cfg, tp):
    """Shapes and initial distributions against the reference's parameter table."""
    table = R.ffn_table(cfg, 0)
    report(sorted(t.name for t in table) == sorted(tp),
           f"{name}: parameters {sorted(tp)}")
    for t in table:
        w = tp[t.name].detach().double().numpy()
        if w.shape != t.shape:
            report(False, f"{name}: {t.name} shape {w.shape}, expected {t.shape}")
            continue
        kind, _, arg = t.init.partition(":")
        if kind == "normal":
            # sample std of >= 512 draws: within ~3 sigma of 1/sqrt(2 * 512) relative
            ok = abs(w.std() / float(arg) - 1) < 0.15 and abs(w.mean()) < 0.2 * float(arg)
            report(ok, f"{name}: {t.name} init {t.init}: sample std {w.std():.4g}")
        elif kind == "uniform":
            b = float(arg)
            ok = np.abs(w).max() <= b and np.abs(w).max() > 0.9 * b and \
                abs(np.abs(w).mean() / (b / 2) - 1) < 0.15
            report(ok, f"{name}: {t.name} init {t.init}: |w| max {np.abs(w).max():.4g} "
                       f"mean {np.abs(w).mean():.4g}")
        else:
            report(np.all(w == (1.0 if kind == "ones" else 0.0)), f"{name}: {t.name} init {kind}")


def min_gap(x, p, state, prefix, r, train):
    """Smallest gap, over tokens and heads, between the k-th and (k+1)-th score among the
    n per-half scores and among all n^2 keys, relative to the largest |score|, in fp64:
    the selections are unambiguous when it is well above the rounding error."""
    p = {k: v.astype(np.float64) for k, v in p.items()}
    q = x.astype(np.float64) @ p[prefix + "wq"].T                     # (T, H*dk)
    if r.query_bn:
        mean, var = ((q.mean(0), q.var(0)) if train else
                     (state[prefix + "bn.running_mean"], state[prefix + "bn.running_var"]))
        q = p[prefix + "bn.w"] * (q - mean) / np.sqrt(var + r.bn_eps) + p[prefix + "bn.b"]
    q = q.reshape(q.shape[0], r.heads, r.key_dim)
    half = r.key_dim // 2
    s1 = q[..., :half] @ p[prefix + "k1"].T                           # (T, H, n)
    s2 = q[..., half:] @ p[prefix + "k2"].T
    full = (s1[..., :, None] + s2[..., None, :]).reshape(q.shape[0], r.heads, -1)
    gaps = []
    for s in (s1, s2, full):
        top = -np.sort(-s, axis=-1)
        gaps.append(float(np.min(top[..., r.topk - 1] - top[..., r.topk])))
    return min(gaps) / float(np.max(np.abs(full)))


def reference(p, state, x, dy, cfg, train):
    """y, new BN state, expert ids, gradients of sum(y * dy) (params, x) from the reference."""
    kind = cfg.ffn[0]
    layer = R.peer_layer if kind == "peer" else R.pkm_layer

    def objective(p, x):
        y, st, aux = layer(x, p, f"h0.{kind}.", cfg.retrieval(0), state, train)
        return jnp.sum(y * dy), (y, st, aux)
    (_, (y, st, aux)), (grads, dx) = jax.value_and_grad(objective, argnums=(0, 1),
                                                        has_aux=True)(p, x)
    return y, st, aux[0], grads, dx


def run_case(name, dtype_name, tokens, seed):
    kind, bn, train = CASES[name]
    tdt, ndt = DTYPES[dtype_name]
    tag = f"{name} {dtype_name}"
    cfg = config(kind, bn)
    r = cfg.retrieval(0)
    prefix = f"h0.{kind}."
    args = types.SimpleNamespace(d=D, n=N_SUB, heads=HEADS, topk=TOPK, dk=DK, pkm=kind == "pkm",
                                 no_bn=not bn, device="cpu")
    torch.manual_seed(seed)
    layer = B.build_layer(torch, args, tdt)
    layer.train(train)
    tp = torch_params(layer, prefix)
    if dtype_name == "fp64":
        check_init(name, cfg, tp)
    if bn:
        report(layer.bn.eps == r.bn_eps and layer.bn.momentum == r.bn_momentum,
               f"{tag}: BN eps {layer.bn.eps} momentum {layer.bn.momentum} "
               f"(reference defaults {r.bn_eps}, {r.bn_momentum})")
    rng = np.random.default_rng(seed)
    state = {}
    if bn:
        if train:
            state = {k: np.asarray(v, ndt) for k, v in R.init_state(cfg, jnp.float64).items()}
        else:   # eval: running statistics away from (0, 1), so that they matter
            hd = r.heads * r.key_dim
            state = {prefix + "bn.running_mean": rng.normal(0, 0.05, hd).astype(ndt),
                     prefix + "bn.running_var": rng.uniform(0.5, 2.0, hd).astype(ndt)}
            with torch.no_grad():
                layer.bn.running_mean.copy_(torch.from_numpy(state[prefix + "bn.running_mean"]))
                layer.bn.running_var.copy_(torch.from_numpy(state[prefix + "bn.running_var"]))
        st0 = {k: torch.from_numpy(v.copy()) for k, v in state.items()}
        report(torch.equal(layer.bn.running_mean, st0[prefix + "bn.running_mean"]) and
               torch.equal(layer.bn.running_var, st0[prefix + "bn.running_var"]),
               f"{tag}: BN running statistics start as the reference's")
    p = {k: v.detach().numpy().copy() for k, v in tp.items()}
    # x with the spread of LayerNorm outputs, redrawn until no near-tie decides a selection
    for draw in range(1, 101):
        x_np = rng.normal(0, 1, (tokens, D)).astype(ndt)
        gap = min_gap(x_np, p, state, prefix, r, train)
        if gap > MIN_GAP[dtype_name]:
            break
    report(gap > MIN_GAP[dtype_name], f"{tag}: smallest relative top-k gap {gap:.3g} "
                                      f"(> {MIN_GAP[dtype_name]:g}; draw {draw} of x)")
    dy_np = rng.normal(0, 1, (tokens, D)).astype(ndt)

    seen = []
    hook = layer.v.register_forward_hook(lambda m, inp, out: seen.append(inp[0].clone()))
    x = torch.from_numpy(x_np.copy()).requires_grad_(True)
    y = layer(x)
    y.backward(torch.from_numpy(dy_np.copy()))
    hook.remove()

    ry, rst, rids, rgrads, rdx = reference({k: jnp.asarray(v) for k, v in p.items()},
                                           {k: jnp.asarray(v) for k, v in state.items()},
                                           jnp.asarray(x_np), jnp.asarray(dy_np), cfg, train)
    report(np.array_equal(seen[0].numpy(), np.asarray(rids)),
           f"{tag}: selected experts (T, H, k) equal, in the same order")
    tol = TOL[dtype_name]
    e = rel_err(y.detach().numpy(), ry)
    report(e < tol, f"{tag}: y rel err {e:.2e}")
    e = rel_err(x.grad.numpy(), rdx)
    report(e < tol, f"{tag}: dx rel err {e:.2e}")
    for k in sorted(tp):
        e = rel_err(tp[k].grad.numpy(), rgrads[k])
        report(e < tol, f"{tag}: d{k[len(prefix):]} rel err {e:.2e}")
    if bn and train:
        for stat in ("running_mean", "running_var"):
            e = rel_err(getattr(layer.bn, stat).numpy(), rst[prefix + "bn." + stat])
            report(e < tol, f"{tag}: BN {stat} after the step rel err {e:.2e}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    print(f"torch {torch.__version__}, jax {jax.__version__}; d={D} n={N_SUB} H={HEADS} "
          f"k={TOPK} dk={DK} tokens={args.tokens} seed={args.seed}")
    for dt in ("fp64", "fp32"):
        for name in CASES:
            run_case(name, dt, args.tokens, args.seed)
    print(f"{len(FAILED)} failed" if FAILED else "all checks passed")
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main())
