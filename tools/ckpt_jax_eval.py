#!/usr/bin/env python3
"""Validation loss of a millipede checkpoint, computed by the JAX reference model.

Reads a sharded checkpoint with h5py through its global view (index.h5: the expert tables
are virtual datasets over the shard files, so no rank layout is needed), rebuilds the
validation batches that `millipede eval` uses (the counter-based sampler of
src/data/sampler.c, stream 1), and runs tools/ref/millipede_ref.py's forward in eval mode
(BatchNorm running statistics). Prints one JSON line, {"val_loss": ..., "tokens": ...},
which matches `millipede eval CONFIG --model CKPT` to float32 rounding.

    python3 tools/ckpt_jax_eval.py runs/tiny/checkpoints/latest [--val data/demo/val.bin]
        [--batches N] [--batch-size B] [--float32]

Defaults (data.val, train.eval_batches, train.batch_size, train.seed) come from the
checkpoint's stored configuration.
"""
import argparse
import json
import os
import pathlib
import sys

import h5py
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent / "ref"))

M64 = (1 << 64) - 1


def mix64(z):
    """splitmix64 finaliser (src/core/rng.h)."""
    z = (z + 0x9E3779B97F4A7C15) & M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def hash3(seed, stream, index):
    return mix64(mix64(mix64(seed) ^ stream) ^ index)


def batch(tokens, seed, stream, step, B, T, micro=0):
    """inputs, targets (B, T) of micro-batch `micro` at `step` (src/data/sampler.c)."""
    n = len(tokens)
    inputs = np.empty((B, T), np.int32)
    targets = np.empty((B, T), np.int32)
    for j in range(B):
        index = (step << 32) | (micro << 20) | j
        off = hash3(seed, stream, index) % (n - T)
        window = tokens[off:off + T + 1]
        inputs[j], targets[j] = window[:-1], window[1:]
    return inputs, targets


def read_shard(path, vocab):
    """Token shard (docs/data.md): 32-byte header, then u16 tokens."""
    raw = pathlib.Path(path).read_bytes()
    if raw[:8] != b"MPTOKENS":
        raise SystemExit(f"{path}: not a millipede token shard")
    v = int.from_bytes(raw[12:16], "little")
    n = int.from_bytes(raw[16:24], "little")
    if v != vocab:
        raise SystemExit(f"{path}: vocabulary {v}, the checkpoint's model has {vocab}")
    version = int.from_bytes(raw[8:12], "little")
    if version not in (1, 2):
        raise SystemExit(f"{path}: shard version {version}, expected 1 or 2")
    # version 2 adds the tokenizer hash and a reserved word: a 48-byte header (docs/data.md)
    return np.frombuffer(raw, dtype="<u2", count=n, offset=32 if version == 1 else 48)


def load_checkpoint(path):
    """(config text, params, router state, step) from a checkpoint directory (or its index.h5)."""
    path = pathlib.Path(path)
    index = path / "index.h5" if path.is_dir() else path
    with h5py.File(index, "r") as f:
        text = f.attrs["config"]
        text = text.decode() if isinstance(text, bytes) else str(text)
        params = {k: f["params"][k][()] for k in f["params"]}   # virtual: the global N x C
        state = {k: f["state"][k][()] for k in f["state"]} if "state" in f else {}
        step = int(f.attrs["step"])
    for name, a in params.items():
        if not np.all(np.isfinite(a)):   # a missing shard reads as the fill value, NaN
            raise SystemExit(f"{index}: /params/{name} is not finite (missing shard file?)")
    return text, params, state, step


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    ap.add_argument("checkpoint", help="checkpoint directory (e.g. runs/tiny/checkpoints/latest)")
    ap.add_argument("--val", help="validation token shard (default: the stored data.val)")
    ap.add_argument("--batches", type=int, help="validation batches (default train.eval_batches)")
    ap.add_argument("--batch-size", type=int, help="sequences per batch (default train.batch_size)")
    ap.add_argument("--float32", action="store_true", help="run the reference in float32 "
                    "(default float64 on the stored float32 values)")
    args = ap.parse_args(argv)

    import jax
    jax.config.update("jax_enable_x64", not args.float32)
    import jax.numpy as jnp
    import millipede_ref as ref

    text, params, state, step = load_checkpoint(args.checkpoint)
    cfg = ref.parse_config(text)
    import configparser
    cp = configparser.ConfigParser(interpolation=None, inline_comment_prefixes=(";", "#"))
    cp.read_string(text)
    val = args.val or cp.get("data", "val").strip()
    n_batches = args.batches or cp.getint("train", "eval_batches")
    B = args.batch_size or cfg.batch_size
    T = cfg.context
    tokens = read_shard(val, cfg.vocab_size)

    dtype = jnp.float32 if args.float32 else jnp.float64
    p = {k: jnp.asarray(v, dtype) for k, v in params.items()}
    s = {k: jnp.asarray(v, dtype) for k, v in state.items()}
    fwd = jax.jit(lambda p, s, x, y: ref.forward(p, s, x, y, cfg, train=False)[0])
    losses = []
    for i in range(n_batches):   # validation batches 0..N-1, stream 1 (src/train/eval.c)
        x, y = batch(tokens, cfg.seed, 1, i, B, T)
        losses.append(float(fwd(p, s, jnp.asarray(x), jnp.asarray(y))))
    print(json.dumps({"val_loss": float(np.mean(losses)), "tokens": n_batches * B * T,
                      "step": step, "checkpoint": os.fspath(args.checkpoint)}))


if __name__ == "__main__":
    main()
