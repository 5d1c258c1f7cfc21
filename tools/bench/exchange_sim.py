#!/usr/bin/env python3
"""The expert exchange at 1 to 1024 ranks, simulated (docs/benchmarks.md, "The exchange at
1 to 1024 ranks (simulated)"): runs tools/bench/exchange_sim.c over P = 1..1024 (powers of
2) and n = 1024..8192 (N = 2^20..2^26) for each selection distribution, writes one JSON line
per run and a plot.

    python3 tools/bench/exchange_sim.py [--exe build-sim/exchange_sim] [--jobs 2]
        [--out docs/exchange_sim.jsonl] [--png docs/exchange_sim.png] [--plot-only]

The trained distributions come from selection dumps of stored checkpoints (made here with
`exchange_sim dump` when missing; the checkpoints are the ones the paper grid left in
runs/paper). A dump's pooled first- and second-half sub-key counts are scaled to the
larger n by exchange_sim (quantile interpolation of the sorted profile, randomly permuted).
"""
import argparse
import concurrent.futures as cf
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# name -> (run directory with config.ini and checkpoints/latest, what it is)
TRAINED = {
    "trained-bal": ("runs/paper/t1-demo-peer-s1337",
                    "tiny demo, 600 steps, balance_rate 0.01 (usage 99.8 %)"),
    "trained-nobal": ("runs/paper/t2-n16384-bn1-bal0",
                      "tiny demo, 200 steps, balance_rate 0 (usage 52.0 %)"),
    "trained-bal200": ("runs/paper/t2-n16384-bn1-bal1",
                       "tiny demo, 200 steps, balance_rate 0.01 (usage 90.4 %)"),
}
PS = [2 ** i for i in range(11)]
NS = [1024, 2048, 4096, 8192]


def die(msg):
    print(f"exchange_sim.py: error: {msg}", file=sys.stderr)
    sys.exit(2)


def run(cmd):
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        die(f"{' '.join(cmd)} exited {p.returncode}: {p.stderr.strip()[-400:]}")
    return p.stdout


def dump_path(name):
    return os.path.join(ROOT, "runs", "exchange_sim", name + ".sel")


def ensure_dumps(exe, names, batches):
    for name in names:
        out = dump_path(name)
        if os.path.exists(out):
            continue
        rundir = os.path.join(ROOT, TRAINED[name][0])
        if not os.path.exists(os.path.join(rundir, "checkpoints", "latest")):
            die(f"{name}: no checkpoint in {rundir} (train it, or leave {name} out with --dists)")
        os.makedirs(os.path.dirname(out), exist_ok=True)
        env = dict(os.environ, OMP_NUM_THREADS="1")
        p = subprocess.run([exe, "dump", os.path.join(rundir, "config.ini"), "--model",
                            os.path.join(rundir, "checkpoints", "latest"), "--out", out,
                            "--batches", str(batches)], capture_output=True, text=True, env=env)
        if p.returncode != 0:
            die(f"dump of {name} failed: {p.stderr.strip()[-400:]}")


def jobs(args):
    out = []
    for series in args.dists:
        if series == "uniform":
            dist, select = "uniform", "pk"
        elif series == "uniform-flat":
            dist, select = "uniform", "flat"
        else:
            dist, select = "profile:" + dump_path(series), "pk"
        for n in NS:
            for P in PS:
                cmd = [args.exe, "sim", "--P", str(P), "--n", str(n), "--H", str(args.H),
                       "--k", str(args.k), "--C", str(args.C), "--B", str(args.B),
                       "--dist", dist, "--select", select, "--ranks-max", str(args.ranks_max),
                       "--alpha", str(args.alpha), "--beta", str(args.beta), "--seed", "1"]
                out.append((series, cmd))
    return out


def sim_all(args):
    todo = jobs(args)
    rows = []
    with cf.ThreadPoolExecutor(args.jobs) as ex:
        futs = {ex.submit(run, cmd): series for series, cmd in todo}
        for i, f in enumerate(cf.as_completed(futs)):
            j = json.loads(f.result())
            j["series"] = futs[f]
            j["dist"] = os.path.basename(j["dist"])   # no machine paths in docs/
            rows.append(j)
            print(f"[{i + 1}/{len(todo)}] {j['series']} P={j['P']} n={j['n']}: "
                  f"{j['bytes_sent_per_token'] / 1e3:.1f} kB/token, "
                  f"{j['t_exchange_s'] * 1e3:.2f} ms, imbalance {j['rec_imbalance']:.3f}",
                  file=sys.stderr)
    rows.sort(key=lambda j: (args.dists.index(j["series"]), j["n"], j["P"]))
    return rows


def plot(rows, png, dists):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    shown = [d for d in dists if d != "uniform-flat"]
    fig, axes = plt.subplots(3, len(shown), figsize=(4.2 * len(shown), 10), squeeze=False,
                             sharex=True)
    colors = dict(zip(NS, ["C0", "C1", "C2", "C3"]))
    for c, series in enumerate(shown):
        for n in NS:
            for s, style in ((series, "-"), ("uniform-flat", ":")):
                if s == "uniform-flat" and series != "uniform":
                    continue
                pts = [j for j in rows if j["series"] == s and j["n"] == n]
                if not pts:
                    continue
                P = [j["P"] for j in pts]
                lab = f"N = 2^{2 * n.bit_length() - 2}" + (" (flat)" if s == "uniform-flat" else "")
                axes[0][c].plot(P, [j["bytes_sent_per_token"] / 1e3 for j in pts], style,
                                color=colors[n], marker=".", label=lab)
                axes[1][c].plot(P, [j["t_exchange_s"] * 1e3 for j in pts], style,
                                color=colors[n], marker=".", label=lab)
                axes[2][c].plot(P, [j["rec_imbalance"] for j in pts], style, color=colors[n],
                                marker=".", label=lab)
        axes[0][c].set_title(series)
        axes[0][c].set_ylabel("kB per token per layer (fwd+bwd, sent)")
        axes[1][c].set_ylabel("predicted exchange ms per layer step")
        axes[2][c].set_ylabel("records served: max / mean")
        axes[1][c].set_yscale("log")
        axes[2][c].set_xlabel("ranks P")
        for r in range(3):
            axes[r][c].set_xscale("log", base=2)
            axes[r][c].grid(True, alpha=0.3)
        axes[0][c].legend(fontsize=7)
    fig.suptitle("PEER expert exchange, simulated (exchange_sim; H=8, k=16, C=1024, "
                 "4096 tokens/rank, HDR IB: 24 GB/s, 2 us/message)", fontsize=10)
    fig.tight_layout()
    fig.savefig(png, dpi=90)


def table(rows, dists):
    # markdown excerpt: P x N for each distribution
    for series in dists:
        print(f"\n{series}: kB/token sent (fwd+bwd) | remote owners/token | predicted ms | "
              f"imbalance (records, tokens)\n")
        print("| P | " + " | ".join(f"N = 2^{2 * n.bit_length() - 2}" for n in NS) + " |")
        print("|---" * (len(NS) + 1) + "|")
        for P in PS:
            cells = []
            for n in NS:
                j = next((j for j in rows if j["series"] == series and j["n"] == n and j["P"] == P), None)
                if not j:
                    cells.append("")
                    continue
                cells.append(f"{j['bytes_sent_per_token'] / 1e3:.0f} kB, {j['remote_owners_per_token']:.1f}, "
                             f"{j['t_exchange_s'] * 1e3:.1f} ms, {j['rec_imbalance']:.2f} / {j['tok_imbalance']:.2f}")
            print(f"| {P} | " + " | ".join(cells) + " |")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--exe", default=os.path.join(ROOT, "build-sim", "exchange_sim"))
    ap.add_argument("--out", default=os.path.join(ROOT, "docs", "exchange_sim.jsonl"))
    ap.add_argument("--png", default=os.path.join(ROOT, "docs", "exchange_sim.png"))
    ap.add_argument("--dists", default="uniform,uniform-flat,trained-bal,trained-nobal,trained-bal200")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--H", type=int, default=8)
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--C", type=int, default=1024)
    ap.add_argument("--B", type=int, default=4096)
    ap.add_argument("--ranks-max", type=int, default=64)
    ap.add_argument("--alpha", type=float, default=2e-6)
    ap.add_argument("--beta", type=float, default=1 / 24e9)
    ap.add_argument("--batches", type=int, default=16, help="validation batches per dump")
    ap.add_argument("--plot-only", action="store_true", help="re-plot --out, run nothing")
    ap.add_argument("--table", action="store_true", help="print markdown tables of --out")
    args = ap.parse_args()
    args.dists = args.dists.split(",")
    for d in args.dists:
        if d not in ("uniform", "uniform-flat") and d not in TRAINED:
            die(f"--dists: unknown '{d}' (uniform, uniform-flat, {', '.join(TRAINED)})")
    if args.plot_only or args.table:
        if not os.path.exists(args.out):
            die(f"{args.out}: not found (run without --plot-only first)")
        with open(args.out) as f:
            rows = [json.loads(l) for l in f if l.strip()]
    else:
        if not os.access(args.exe, os.X_OK):
            die(f"{args.exe}: not an executable (build the exchange_sim target)")
        ensure_dumps(args.exe, [d for d in args.dists if d in TRAINED], args.batches)
        rows = sim_all(args)
        with open(args.out, "w") as f:
            for j in rows:
                f.write(json.dumps(j) + "\n")
    if args.table:
        table(rows, args.dists)
        return
    plot(rows, args.png, args.dists)
    print(f"wrote {args.out} ({len(rows)} runs) and {args.png}", file=sys.stderr)


if __name__ == "__main__":
    main()
