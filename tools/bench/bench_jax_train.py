#!/usr/bin/env python3
"""Training throughput of the JAX reference model (float32), the baseline that the C
trainer's throughput is compared with.

    python3 tools/bench/bench_jax_train.py CONFIG.ini [--steps 20] [--set section.key=value]...

Builds the model of CONFIG with random parameters, jit-compiles one whole training step
(forward, backward, global-norm clipping, AdamW over the three groups) on a fixed random
batch of train.batch_size x model.context tokens (x train.grad_accum micro-batches), runs
--warmup untimed steps, times --steps steps and prints one JSON line.
"""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "ref"))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import millipede_ref as R  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    ap.add_argument("config", help="INI file (missing keys take the reference's defaults)")
    ap.add_argument("--steps", type=int, default=20, help="timed steps (default 20)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps after compiling")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="override one config key (repeatable)")
    args = ap.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        ap.error("--steps must be >= 1 and --warmup >= 0")
    try:
        with open(args.config) as f:
            text = f.read()
        cfg = R.parse_config(text, args.set)
    except (OSError, ValueError) as e:
        print(f"bench_jax_train: error: {args.config}: {e}", file=sys.stderr)
        return 2

    key = jax.random.PRNGKey(cfg.seed)
    params = R.init_params(cfg, key, jnp.float32)
    state = R.init_state(cfg, jnp.float32)
    optimizer = R.make_optimizer(cfg, params)
    opt_state = optimizer.init(params)
    A, B, T = cfg.grad_accum, cfg.batch_size, cfg.context
    rng = np.random.default_rng(cfg.seed)
    inputs = jnp.asarray(rng.integers(0, cfg.vocab_size, (A, B, T), dtype=np.int32))
    targets = jnp.asarray(rng.integers(0, cfg.vocab_size, (A, B, T), dtype=np.int32))

    # Donating params, optimizer and BN state lets XLA update them in place: the expert
    # tables and their Adam moments are most of the memory (8 GiB at 1M x 256).
    step = jax.jit(R.make_train_step(cfg, optimizer), donate_argnums=(0, 1, 2))
    t0 = time.perf_counter()
    compiled = step.lower(params, opt_state, state, inputs, targets).compile()
    compile_s = time.perf_counter() - t0

    loss = None
    for _ in range(args.warmup):
        params, opt_state, state, loss, _ = compiled(params, opt_state, state, inputs, targets)
    jax.block_until_ready((params, loss))
    t0 = time.perf_counter()
    for _ in range(args.steps):
        params, opt_state, state, loss, _ = compiled(params, opt_state, state, inputs, targets)
    jax.block_until_ready((params, opt_state, loss))
    elapsed = time.perf_counter() - t0

    tokens = A * B * T * args.steps
    print(json.dumps({
        "impl": "jax", "config": args.config, "overrides": args.set,
        "tokens_per_s": round(tokens / elapsed, 2),
        "ms_per_step": round(1000 * elapsed / args.steps, 3),
        "compile_s": round(compile_s, 3),
        "steps": args.steps, "tokens_per_step": A * B * T,
        "params": int(sum(int(np.prod(p.shape)) for p in params.values())),
        "final_loss": round(float(loss), 5),
        "device": str(jax.devices()[0]).strip(),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
