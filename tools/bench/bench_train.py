#!/usr/bin/env python3
"""Training throughput of millipede beside the JAX reference model (jit, CPU, float32) on
the same shapes, in one run, as a ratio (docs/benchmarks.md).

    python3 tools/bench/bench_train.py CONFIG.ini [--steps 20] [--millipede build/millipede]
        [--set section.key=value]...

millipede trains --steps + 2 steps on the config's data; its tokens/s is the median over the
steps after the first two. The JAX side is tools/bench/bench_jax_train.py with the same
--set overrides (random parameters and a fixed random batch of the same shape: the work per
step is the same, only the values differ). Also reports millipede's peak resident memory.
Prints one JSON line.
"""
import argparse
import json
import os
import pathlib
import resource
import statistics
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[2]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("config")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--millipede", default=str(ROOT / "build" / "millipede"))
    ap.add_argument("--set", action="append", default=[])
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [args.millipede, "train", args.config, "--set", f"run.dir={tmp}/run",
               "--set", f"train.steps={args.steps + 2}", "--set", "train.eval_every=0",
               "--set", "train.eval_batches=1", "--set", "checkpoint.every=0"]
        for s in args.set:
            cmd += ["--set", s]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        lines = [json.loads(x) for x in open(f"{tmp}/run/metrics.jsonl")]
        steps = [x for x in lines if "loss" in x][2:]
    ours = statistics.median(x["tokens_per_s"] for x in steps)
    ms = statistics.median(x["ms"] for x in steps)
    jax_cmd = [sys.executable, str(ROOT / "tools" / "bench" / "bench_jax_train.py"), args.config,
               "--steps", str(args.steps)]
    for s in args.set:
        jax_cmd += ["--set", s]
    out = subprocess.run(jax_cmd, check=True, capture_output=True, text=True,
                         env=dict(os.environ, JAX_PLATFORMS="cpu")).stdout
    ref = json.loads(out.strip().splitlines()[-1])
    print(json.dumps({"config": args.config, "overrides": args.set,
                      "millipede_tokens_per_s": round(ours, 1), "millipede_ms_per_step": round(ms, 1),
                      "millipede_peak_rss_gib": round(peak_kib / 1048576, 2),
                      "jax_tokens_per_s": round(ref["tokens_per_s"], 1),
                      "jax_ms_per_step": round(ref["ms_per_step"], 1),
                      "ratio_millipede_over_jax": round(ours / ref["tokens_per_s"], 2)}))


if __name__ == "__main__":
    main()
