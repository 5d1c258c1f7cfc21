#!/usr/bin/env python3
"""Strong and weak scaling of sharded training over MPI ranks, and the bytes the expert
exchange moves per token per PEER layer beside the analytic minimum for the same
selections (docs/benchmarks.md).

    python3 tools/bench/bench_scaling.py [--millipede build/millipede] [--ranks 1,2,4]
        [--steps 12] [--threads 1] [--data data/demo]

Strong scaling: a fixed model (one PEER layer, N = 256^2 experts) and global batch on
P ranks. Weak scaling: the batch (tokens per rank) fixed per rank and N growing with P
(n = round(128 sqrt(P)), so N ~ 16384 P). Every rank runs `--threads` OpenMP threads.
Step times are the median over the steps after the first two. Prints one JSON line per
run and a Markdown table.
"""
import argparse
import json
import math
import os
import pathlib
import statistics
import subprocess
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[2]


def run(args, P, sets, workdir):
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), OMPI_ALLOW_RUN_AS_ROOT="1",
               OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", OMPI_MCA_mpi_yield_when_idle="1")
    run_dir = pathlib.Path(workdir) / f"run{len(os.listdir(workdir))}"
    cmd = ["mpirun", "--oversubscribe", "-np", str(P), args.millipede, "train",
           str(ROOT / "configs" / "tiny.ini")]
    base = {"run.dir": run_dir, "data.train": f"{args.data}/train.bin",
            "data.val": f"{args.data}/val.bin", "train.steps": args.steps,
            "train.eval_every": 0, "train.eval_batches": 1, "train.log_every": 1000,
            "checkpoint.every": 0, "system.threads": args.threads}
    base.update(sets)
    for k, v in base.items():
        cmd += ["--set", f"{k}={v}"]
    subprocess.run(cmd, check=True, capture_output=True, env=env)
    lines = [json.loads(x) for x in open(run_dir / "metrics.jsonl")]
    steps = [x for x in lines if "loss" in x][2:]
    ms = statistics.median(x["ms"] for x in steps)
    tokens = int(sets["train.batch_size"]) * 128
    layers = str(sets.get("model.ffn", "dense,dense,peer,dense")).split(",").count("peer")
    sent = statistics.median(x["exchange_bytes_sent"] for x in steps)
    minimum = statistics.median(x["exchange_bytes_min"] for x in steps)
    imbalance = statistics.median(x["load_imbalance"] for x in steps)
    return {"ranks": P, "experts": int(sets["peer.experts"]), "global_batch_tokens": tokens,
            "ms_per_step": round(ms, 2), "tokens_per_s": round(tokens / ms * 1e3, 1),
            "exchange_ms": round(statistics.median(x["exchange_ms"] for x in steps), 2),
            "bytes_per_token_per_layer": round(sent / tokens / layers, 1),
            "min_bytes_per_token_per_layer": round(minimum / tokens / layers, 1),
            "load_imbalance": imbalance}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--millipede", default=str(ROOT / "build" / "millipede"))
    ap.add_argument("--data", default=str(ROOT / "data" / "demo"))
    ap.add_argument("--ranks", default="1,2,4")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    ranks = [int(r) for r in args.ranks.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for P in ranks:   # strong: fixed model and global batch
            r = run(args, P, {"peer.experts": 65536, "train.batch_size": 16}, tmp)
            r["kind"] = "strong"
            rows.append(r)
            print(json.dumps(r), flush=True)
        for P in ranks:   # weak: 8 sequences per rank, N ~ 16384 P
            n = round(128 * math.sqrt(P))
            r = run(args, P, {"peer.experts": n * n, "train.batch_size": 8 * P}, tmp)
            r["kind"] = "weak"
            rows.append(r)
            print(json.dumps(r), flush=True)
    base = {k: next(r for r in rows if r["kind"] == k and r["ranks"] == ranks[0]) for k in ("strong", "weak")}
    print("\n| scaling | ranks | experts N | global tokens/step | ms/step | tokens/s | efficiency "
          "| exchange ms | bytes/token/layer | minimum | ratio | load imbalance |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        b = base[r["kind"]]
        if r["kind"] == "strong":   # speed-up over P=1, divided by P
            eff = r["tokens_per_s"] / b["tokens_per_s"] / (r["ranks"] / b["ranks"])
        else:                       # the same work per rank: time at P=1 over time at P
            eff = b["ms_per_step"] / r["ms_per_step"]
        ratio = (r["bytes_per_token_per_layer"] / r["min_bytes_per_token_per_layer"]
                 if r["min_bytes_per_token_per_layer"] else float("nan"))
        print(f"| {r['kind']} | {r['ranks']} | {r['experts']} | {r['global_batch_tokens']} | "
              f"{r['ms_per_step']} | {r['tokens_per_s']} | {eff:.2f} | {r['exchange_ms']} | "
              f"{r['bytes_per_token_per_layer']} | {r['min_bytes_per_token_per_layer']} | "
              f"{ratio:.3f} | {r['load_imbalance']:.3f} |")


if __name__ == "__main__":
    main()
