#!/usr/bin/env python3
"""A small-scale reproduction of the PEER paper's Table 1, Table 2 and Figure 3a
(He 2024, "Mixture of A Million Experts"), with one command:

    python3 tools/paper/grid.py [--millipede build/millipede] [--runs runs/paper]
        [--out docs/quality.md] [--jobs 2] [--threads 1] [--steps1 1000] [--steps2 300]
        [--seeds 1337,1338] [--experts 16384,65536,262144,1048576] [--corpora demo,perl]
        [--eval-batches 64]

Runs (each `millipede train` into RUNS/NAME, then `millipede eval` of its final checkpoint
into RUNS/NAME/eval.json):
- Table 1: dense, PKM and PEER (configs/dense.ini, pkm.ini, tiny.ini: equal forward FLOPs
  per token, the same data, schedule and optimizer) for each seed and corpus, --steps1 steps.
- Table 2 and Figure 3a: the PEER layer of configs/tiny.ini with N = each of --experts,
  with query BatchNorm and sub-key balance biases (tiny.ini's recipe), with BatchNorm and
  no biases (the paper's router), and with neither, --steps2 steps, on the demo corpus; the usage is evaluated on
  enough validation tokens for at least 8 selections per expert on average, beside the
  usage a uniform random router would show on the same selections.

It resumes: millipede continues a run from its latest checkpoint, a finished run is not
trained again and a run with an eval.json is not evaluated again, so an interrupted grid
goes on where it stopped. Then it writes OUT (tables) and its figures beside it
(OUT's folder/quality/*.png). Corpora: `demo` is data/demo (the quickstart's, from
python3.11-doc), `perl` is data/perl, prepared here from Debian's perl-doc (the Perl
documentation in POD, installed by tools/install-deps.sh --paper) when missing.
"""
import argparse
import concurrent.futures
import glob
import json
import math
import os
import pathlib
import platform
import subprocess
import sys
import threading
import time

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))
import plot  # noqa: E402  (tools/plot.py: metrics.jsonl reader and smoothing)

CORPORA = {
    "demo": ("python3.11-doc", "/usr/share/doc/python3.11/html/_sources"),
    "perl": ("perl-doc", "/usr/share/perl/*/pod"),
}
MODELS = [("dense", "configs/dense.ini"), ("pkm", "configs/pkm.ini"), ("peer", "configs/tiny.ini")]


def fail(msg):
    print(f"grid.py: error: {msg}", file=sys.stderr)
    sys.exit(2)


def corpus_data(name, millipede):
    """data/NAME/{train,val}.bin, prepared from the corpus' Debian package when missing."""
    out = ROOT / "data" / name
    if (out / "train.bin").exists() and (out / "val.bin").exists():
        return out
    package, pattern = CORPORA[name]
    src = sorted(glob.glob(pattern))
    if not src:
        subprocess.run(["bash", str(ROOT / "tools" / "install-deps.sh"), "--paper"], check=True)
        src = sorted(glob.glob(pattern))
    if not src:
        fail(f"corpus '{name}': {pattern} not found (apt-get install {package})")
    subprocess.run([millipede, "data", "prepare", "--out", str(out), src[-1]], check=True,
                   stdout=subprocess.DEVNULL)
    return out


class Run:
    def __init__(self, name, config, sets, eval_batches, group, **tags):
        self.name, self.config, self.sets = name, config, sets
        self.eval_batches, self.group, self.tags = eval_batches, group, tags

    def dir(self, runs):
        return runs / self.name


def plan(a, data):
    """The grid: every run with its configuration overrides."""
    runs = []
    B, T = 16, 128                      # train.batch_size, model.context of the three configs
    for corpus in a.corpora:
        for seed in a.seeds:
            for model, config in MODELS:
                sets = [f"data.train={data[corpus] / 'train.bin'}", f"data.val={data[corpus] / 'val.bin'}",
                        f"train.seed={seed}", f"train.steps={a.steps1}",
                        f"train.eval_every={max(1, a.steps1 // 10)}", f"train.log_every={max(1, a.steps1 // 10)}",
                        f"checkpoint.every={max(1, a.steps1 // 4)}"]
                # 64 validation batches (131,072 bytes) by default: the windows are drawn
                # with train.seed, so fewer would make the spread over seeds mostly eval noise
                runs.append(Run(f"t1-{corpus}-{model}-s{seed}", config, sets, a.eval_batches,
                                "table1", corpus=corpus, model=model, seed=seed))
    H, k = 4, 8                          # tiny.ini's PEER heads and top-k
    for n_exp in a.experts:
        # >= 8 selections per expert on average: 8 N / (H k) tokens, in batches of B x T
        batches = max(8, math.ceil(8 * n_exp / (H * k) / (B * T)))
        for bn, bal in T2_ROUTERS:
            sets = [f"data.train={data['demo'] / 'train.bin'}", f"data.val={data['demo'] / 'val.bin'}",
                    f"train.seed={a.seeds[0]}", f"train.steps={a.steps2}", f"peer.experts={n_exp}",
                    f"peer.query_bn={'true' if bn else 'false'}",
                    f"train.eval_every={max(1, a.steps2 // 5)}", f"train.log_every={max(1, a.steps2 // 5)}",
                    f"checkpoint.every={max(1, a.steps2 // 3)}"]
            if not bal:
                sets.append("peer.balance_rate=0")
            runs.append(Run(t2_name(n_exp, bn, bal), "configs/tiny.ini", sets, batches, "table2",
                            experts=n_exp, bn=bn, bal=bal))
    return runs


T1_EVAL_BATCHES = 64

# (query BN, balance biases) of the Table 2 runs: tiny.ini's recipe, the paper's router
# with and without BN (BN off with biases is left out to keep the grid within its time)
T2_ROUTERS = ((True, True), (True, False), (False, False))


def t2_name(n_exp, bn, bal):
    return f"t2-n{n_exp}-bn{int(bn)}-bal{int(bal)}"


PRINT_LOCK = threading.Lock()


def run_one(r, a):
    d = r.dir(a.runs)
    d.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    t0 = time.time()
    cmd = [a.millipede, "train", str(ROOT / r.config), "--set", f"run.dir={d}",
           "--set", f"system.threads={a.threads}"]
    for s in r.sets:
        cmd += ["--set", s]
    with open(d / "train.log", "a") as log:
        if subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env).returncode != 0:
            fail(f"{r.name}: millipede train failed (see {d / 'train.log'})")
    t1 = time.time()
    ev = d / "eval.json"
    if not ev.exists():
        cmd = [a.millipede, "eval", str(d / "config.ini"), "--model", str(d / "checkpoints" / "latest"),
               "--set", f"system.threads={a.threads}"]
        if r.eval_batches:
            cmd += ["--batches", str(r.eval_batches)]
        out = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, text=True)
        if out.returncode != 0:
            fail(f"{r.name}: millipede eval failed")
        ev.write_text(out.stdout)
    t2 = time.time()
    # print() writes the text and its newline separately, so two runs finishing together
    # could share a line without the lock
    with PRINT_LOCK:
        print(f"grid: {r.name}: train {t1 - t0:.0f} s, eval {t2 - t1:.0f} s", flush=True)
    return r.name, t2 - t0


def load(r, runs):
    d = r.dir(runs)
    train, val = plot.read_run(str(d))
    ev = json.loads((d / "eval.json").read_text())
    return train, val, ev


def mean_sd(xs):
    m = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else float("nan")
    return m, sd


def fmt_pm(xs, digits=4):
    m, sd = mean_sd(xs)
    return f"{m:.{digits}f}" + (f" ± {sd:.{digits}f}" if len(xs) > 1 else "")


def save_figure(fig, path):
    import matplotlib.pyplot as plt
    for ax in fig.axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(a, runs):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figdir = a.out.parent / "quality"
    figdir.mkdir(parents=True, exist_ok=True)
    done = [r for r in runs if (r.dir(a.runs) / "eval.json").exists()]
    res = {r.name: load(r, a.runs) for r in done}
    train_s = sum(d["ms"] for train, _, _ in res.values() for d in train) / 1e3
    L = []
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")),
               platform.processor())
    L += ["# Model quality: a small-scale reproduction of the PEER paper", "",
          f"Written by `python3 tools/paper/grid.py --steps1 {a.steps1} --steps2 {a.steps2} "
          f"--seeds {','.join(map(str, a.seeds))} --experts {','.join(map(str, a.experts))} "
          f"--corpora {','.join(a.corpora)}"
          + (f" --eval-batches {a.eval_batches}" if a.eval_batches != T1_EVAL_BATCHES else "")
          + "` on "
          f"{time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores ({cpu}), {a.jobs} runs at a time with "
          f"{a.threads} thread(s) each; the training steps of the finished runs add up to {train_s / 60:.0f} "
          "minutes (validation, checkpoints and evaluation not counted). Every number below comes "
          "from `millipede eval` "
          "of a run's final checkpoint (validation split; BatchNorm in eval mode with its running "
          "statistics) or from the run's metrics.jsonl.", ""]

    def complete(group, title):
        """The group's runs when all are done, else None and a line saying what is missing."""
        rs = [r for r in runs if r.group == group]
        missing = [r for r in rs if r.name not in res]
        if rs and missing:
            L.extend([f"## {title}", "", f"Not run to the end yet: {len(rs) - len(missing)} of "
                      f"{len(rs)} runs done (the same command continues the grid).", ""])
            return None
        return rs

    # Table 1
    t1 = complete("table1", "Table 1 analog: dense vs PKM vs PEER at equal compute")
    if t1:
        L += ["## Table 1 analog: dense vs PKM vs PEER at equal compute", "",
              f"Validation loss in nats per byte after {a.steps1} steps of 16 x 128 bytes, on "
              f"{a.eval_batches} validation batches of 16 x 128 bytes, mean ± "
              f"sample standard deviation over seeds {', '.join(map(str, a.seeds))}. The seed "
              "also draws the validation windows, so the ± includes which text was evaluated; "
              "within a seed the three models are evaluated on the same windows, and the last "
              "two columns give PEER's difference to dense and to PKM for each seed. The three "
              "configs have the same forward FLOPs per token (1,785,856: tests/unit/test_config.c "
              "checks it), data, schedule and optimizer. The paper's Table 1 compares perplexity at "
              "equal FLOPs on C4 at 10^18 to 10^19 FLOPs; this is about 10^14.", "",
              "| corpus | dense | PKM | PEER | PEER usage | PKM usage | PEER - dense, per seed | "
              "PEER - PKM, per seed |", "|---|---|---|---|---|---|---|---|"]
        for corpus in a.corpora:
            row = [corpus]
            use = {}
            for model, _ in MODELS:
                rs = [r for r in t1 if r.tags["corpus"] == corpus and r.tags["model"] == model]
                row.append(fmt_pm([res[r.name][2]["val_loss"] for r in rs]))
                use[model] = [res[r.name][2]["layers"][0]["usage"] for r in rs if res[r.name][2]["layers"]]
            row += [fmt_pm([100 * u for u in use["peer"]], 1) + " %", fmt_pm([100 * u for u in use["pkm"]], 1) + " %"]
            loss = {(r.tags["model"], r.tags["seed"]): res[r.name][2]["val_loss"] for r in t1
                    if r.tags["corpus"] == corpus}
            for other in ("dense", "pkm"):
                row.append(" / ".join(f"{loss[('peer', s)] - loss[(other, s)]:+.4f}" for s in a.seeds))
            L.append("| " + " | ".join(row) + " |")
        L.append("")
        fig, axes = plt.subplots(1, len(a.corpora), figsize=(6.2 * len(a.corpora), 4.2), squeeze=False)
        colours = {"dense": "tab:gray", "pkm": "tab:blue", "peer": "tab:red"}
        for ax, corpus in zip(axes[0], a.corpora):
            for r in [r for r in t1 if r.tags["corpus"] == corpus]:
                train, val, _ = res[r.name]
                x, y = plot.series(train, "loss")
                w = max(1, len(y) // 50)
                c = colours[r.tags["model"]]
                first = r.tags["seed"] == a.seeds[0]
                ax.plot(x, plot.smooth(y, w), color=c, lw=0.8, alpha=0.6,
                        label=f"{r.tags['model']} train (mean of {w})" if first else None)
                x, y = plot.series(val, "val_loss")
                ax.plot(x, y, color=c, lw=1.6, ls="--", marker="o", ms=3,
                        label=f"{r.tags['model']} val" if first else None)
            ax.set_title(f"Table 1 runs, {corpus} corpus ({len(a.seeds)} seeds)", fontsize=10)
            ax.set_xlabel("step")
            ax.set_ylabel("loss (nats/byte)")
            # the first validations (loss ~5.5 at step 0) would flatten the rest of the curves
            later = [v["val_loss"] for r in t1 if r.tags["corpus"] == corpus
                     for v in res[r.name][1][1:]]
            lo, hi = ax.get_ylim()
            if later and lo < 1.1 * max(later) < hi:
                ax.set_ylim(lo, 1.1 * max(later))
        save_figure(fig, figdir / "table1_curves.png")
        L += ["Training (smoothed) and validation loss of every Table 1 run:", "",
              "![Table 1 loss curves](quality/table1_curves.png)", ""]

    # Table 2 and Figure 3a
    def last_val(name):
        """The run's last validation loss: the same train.eval_batches batches for every N
        (the usage evaluation takes more batches at larger N, so its loss is not comparable)."""
        return res[name][1][-1]["val_loss"]

    t2 = complete("table2", "Table 2 and Figure 3a analogs")
    if t2:
        L += ["## Table 2 analog: expert usage and unevenness, with and without query BatchNorm", "",
              f"PEER layer of configs/tiny.ini (H = 4 heads x top-8) with N experts, {a.steps2} steps, "
              "demo corpus: query BatchNorm with sub-key balance biases (`balance_rate` = 0.01, "
              "tiny.ini's recipe), and the paper's router (`balance_rate` = 0) with and without "
              "BatchNorm. Usage is the "
              "fraction of experts selected at least once over the "
              "evaluated tokens, and unevenness the KL divergence (nats) of the gate mass per expert "
              "from uniform (paper, Table 2). `uniform` is the usage a uniform random router would "
              "show on the same number of selections, 1 - (1 - 1/N)^selections. The validation loss is "
              "the run's last, on the same 8 batches of 16 x 128 bytes for every N.", "",
              "| N | query BN | balance | tokens evaluated | selections per expert | usage | uniform | "
              "unevenness | val loss |",
              "|---|---|---|---|---|---|---|---|---|"]
        for n_exp in a.experts:
            for bn, bal in T2_ROUTERS:
                name = t2_name(n_exp, bn, bal)
                ev = res[name][2]
                lay = ev["layers"][0]
                sel = ev["tokens"] * 4 * 8
                L.append(f"| {n_exp:,} ({int(math.isqrt(n_exp))}²) | {'yes' if bn else 'no'} | "
                         f"{'yes' if bal else 'no'} | {ev['tokens']:,} | {sel / n_exp:.1f} | "
                         f"{100 * lay['usage']:.1f} % | {100 * lay['usage_uniform']:.1f} % | "
                         f"{lay['unevenness']:.2f} | {last_val(name):.4f} |")
        L += ["", "The paper's Table 2 (1M-token eval set, C4, after full training): usage 100 % with "
              "and without BN up to 262K experts and 99.8 % / 100 % at 1M; unevenness 0.30 / 0.45 "
              "(16K), 0.44 / 0.63 (65K), 0.66 / 0.97 (262K), 1.06 / 1.52 (1M), BN / no BN.", ""]
        fig, ax = plt.subplots(figsize=(5.6, 4.0))
        for bn, bal, c, ls in ((1, 1, "tab:red", "-"), (1, 0, "tab:red", "--"),
                               (0, 0, "tab:orange", "--")):
            xs = a.experts
            ys = [last_val(t2_name(n, bn, bal)) for n in xs]
            ax.plot(xs, ys, marker="o", color=c, ls=ls,
                    label=f"{'query BN' if bn else 'no query BN'}, {'balance' if bal else 'no balance'}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("experts N (H x k = 32 active)")
        ax.set_ylabel("validation loss (nats/byte)")
        ax.set_title(f"Figure 3a analog: loss vs N, {a.steps2} steps", fontsize=10)
        save_figure(fig, figdir / "fig3a_loss_vs_experts.png")
        L += ["## Figure 3a analog: validation loss against the number of experts", "",
              f"The same runs: a fixed number of active experts (4 heads x top-8) and N from "
              f"{a.experts[0]:,} to {a.experts[-1]:,}.", "",
              "![Figure 3a analog](quality/fig3a_loss_vs_experts.png)", ""]
    L += ["What these numbers do and do not show, why the paper's router alone uses few of "
          "the demo's experts, and what the balance biases change: [expert_usage.md](expert_usage.md).", ""]
    return L


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--millipede", default=str(ROOT / "build" / "millipede"))
    ap.add_argument("--runs", default=str(ROOT / "runs" / "paper"))
    ap.add_argument("--out", default=str(ROOT / "docs" / "quality.md"))
    ap.add_argument("--jobs", type=int, default=2, help="runs at a time (default 2)")
    ap.add_argument("--threads", type=int, default=1, help="OpenMP threads per run (default 1)")
    ap.add_argument("--steps1", type=int, default=1000, help="steps of the Table 1 runs")
    ap.add_argument("--steps2", type=int, default=300, help="steps of the Table 2 / Figure 3a runs")
    ap.add_argument("--seeds", default="1337,1338")
    ap.add_argument("--experts", default="16384,65536,262144,1048576")
    ap.add_argument("--corpora", default="demo,perl")
    ap.add_argument("--eval-batches", type=int, default=T1_EVAL_BATCHES,
                    help=f"validation batches of each Table 1 evaluation (default {T1_EVAL_BATCHES})")
    ap.add_argument("--report-only", action="store_true", help="write OUT from the runs that exist")
    a = ap.parse_args()
    a.runs, a.out = pathlib.Path(a.runs).resolve(), pathlib.Path(a.out).resolve()
    a.seeds = [int(s) for s in a.seeds.split(",")]
    a.experts = [int(s) for s in a.experts.split(",")]
    a.corpora = a.corpora.split(",")
    if a.eval_batches < 1:
        fail(f"--eval-batches: {a.eval_batches}, expected at least 1")
    for c in a.corpora:
        if c not in CORPORA:
            fail(f"--corpora: unknown corpus '{c}' (known: {', '.join(CORPORA)})")
    for n in a.experts:
        if math.isqrt(n) ** 2 != n:
            fail(f"--experts: {n} is not a square n^2")
    if not os.access(a.millipede, os.X_OK):
        fail(f"{a.millipede}: not an executable (build it first: bash launch/quickstart.sh, or cmake)")
    data = {c: corpus_data(c, a.millipede) for c in set(a.corpora) | {"demo"}}
    runs = plan(a, data)
    if not a.report_only:
        # the largest runs first, so that the last ones to finish are short
        order = sorted(runs, key=lambda r: -r.tags.get("experts", 0))
        with concurrent.futures.ThreadPoolExecutor(max_workers=a.jobs) as pool:
            for f in concurrent.futures.as_completed([pool.submit(run_one, r, a) for r in order]):
                f.result()
    lines = report(a, runs)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text("\n".join(lines) + "\n")
    print(f"grid: wrote {a.out}")


if __name__ == "__main__":
    main()
