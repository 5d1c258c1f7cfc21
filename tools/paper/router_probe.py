#!/usr/bin/env python3
"""What the first PEER/PKM layer's router sees, for checkpoints of one run: the diagnosis
behind docs/quality.md's section on expert usage.

    python3 tools/paper/router_probe.py CKPT [CKPT...] [--batches 8] [--val PATH]

For each checkpoint (read through its global view, tools/ckpt_jax_eval.py) it runs the JAX
reference model (tools/ref/millipede_ref.py, float64) on the validation batches that
`millipede eval` uses and prints one JSON line:
- usage_train / usage_eval: expert usage with BatchNorm on the batch's own statistics
  (training mode) and on the running statistics (eval mode, what `millipede eval` reports);
- token_share / position_share: the fraction of the variance of the layer's input f (the
  block's LayerNorm output, over all evaluated tokens) explained by the current token alone
  (between-token-id variance) and by the position alone;
- q_top1_share: the fraction of the centred queries' variance in their first principal
  direction (1/(H dk) if the queries were isotropic);
- bn_var_ratio: mean over query columns of running_var / batch variance (1 when the
  running statistics have caught up).
"""
import argparse
import json
import pathlib
import sys

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent / "ref"))
import ckpt_jax_eval as ck  # noqa: E402
import millipede_ref as ref  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

jax.config.update("jax_enable_x64", True)


def probe(path, val_path, n_batches):
    text, params, state, step = ck.load_checkpoint(path)
    cfg = ref.parse_config(text)
    p = {k: jnp.asarray(v, jnp.float64) for k, v in params.items()}
    st = {k: jnp.asarray(v, jnp.float64) for k, v in state.items()}
    if not val_path:
        import configparser
        cp = configparser.ConfigParser(interpolation=None, inline_comment_prefixes=(";", "#"))
        cp.read_string(text)
        val_path = cp.get("data", "val").strip()
    tokens = ck.read_shard(val_path, cfg.vocab_size)
    inputs = np.concatenate([ck.batch(tokens, cfg.seed, 1, i, cfg.batch_size, cfg.context)[0]
                             for i in range(n_batches)])                       # (B, T)
    B, T = inputs.shape
    x = p["wte"][inputs] + p["wpe"][:T]                                       # (B, T, C)
    for layer in range(cfg.n_layers):
        h = f"h{layer}."
        x = x + ref.attention(ref.layer_norm(x, p[h + "ln1.w"], p[h + "ln1.b"]), p, h + "attn.",
                              cfg.n_heads)
        f = ref.layer_norm(x, p[h + "ln2.w"], p[h + "ln2.b"]).reshape(B * T, -1)  # (B*T, C)
        if cfg.ffn[layer] != "dense":
            break
        y, _, _ = ref.ffn(cfg, layer, f, p, st, False)
        x = x + y.reshape(B, T, -1)
    else:
        raise SystemExit(f"{path}: the model has no PEER or PKM layer")
    kind = cfg.ffn[layer]
    r = cfg.retrieval(layer)
    prefix = f"h{layer}.{kind}."
    out = {"checkpoint": str(path), "step": step, "block": layer}
    for mode in ("train", "eval"):
        _, experts, _ = ref.retrieve(f, p, prefix, r, st, mode == "train")
        out[f"usage_{mode}"] = round(len(np.unique(np.asarray(experts))) / r.experts, 4)
    fn = np.asarray(f)
    total = fn.var(0).sum()
    ids = inputs.reshape(-1)
    cnt = np.bincount(ids, minlength=cfg.vocab_size)
    means = np.zeros((cfg.vocab_size, fn.shape[1]))
    np.add.at(means, ids, fn)
    seen = cnt > 0
    means[seen] /= cnt[seen, None]
    out["token_share"] = round(float((cnt[:, None] * (means - fn.mean(0)) ** 2).sum() / len(ids) / total), 4)
    out["position_share"] = round(float(fn.reshape(B, T, -1).mean(0).var(0).sum() / total), 4)
    q = fn @ np.asarray(p[prefix + "wq"]).T                                    # (B*T, H*dk)
    qc = q - q.mean(0)
    sv = np.linalg.svd(qc, compute_uv=False)
    out["q_top1_share"] = round(float(sv[0] ** 2 / (sv ** 2).sum()), 4)
    if r.query_bn:
        rv = np.asarray(st[prefix + "bn.running_var"])
        out["bn_var_ratio"] = round(float(np.mean(rv / q.var(0))), 3)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoints", nargs="+", metavar="CKPT")
    ap.add_argument("--batches", type=int, default=8)
    ap.add_argument("--val", help="validation shard (default: the checkpoint's data.val)")
    a = ap.parse_args()
    for path in a.checkpoints:
        print(json.dumps(probe(path, a.val, a.batches)), flush=True)


if __name__ == "__main__":
    main()
