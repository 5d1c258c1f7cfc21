#!/usr/bin/env python3
"""Plots training runs from their metrics.jsonl: loss (training and validation), learning
rate, gradient norm, tokens/s, and each PEER/PKM layer's expert usage and unevenness when
the run logged them (at every validation).

    python3 tools/plot.py RUN_DIR [RUN_DIR...] [-o OUT.png] [--title TEXT]

Several runs go into the same panels, one colour each, labelled by their directory name.
The PNG goes to OUT.png (default: RUN_DIR/plot.png for one run, runs.png for several).
"""
import argparse
import json
import math
import os
import sys


def fail(msg):
    print(f"plot.py: error: {msg}", file=sys.stderr)
    sys.exit(2)


def read_run(run_dir):
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        fail(f"{path}: no such file (is {run_dir} a run directory of `millipede train`?)")
    train, val = [], []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                d = json.loads(line)
            except json.JSONDecodeError as e:
                fail(f"{path}:{n}: not a JSON line ({e.msg})")
            if "loss" in d:
                train.append(d)
            elif "val_loss" in d:
                val.append(d)
    if not train and not val:
        fail(f"{path}: no training or validation lines")
    return train, val


def series(rows, key):
    pts = [(d["step"], d[key]) for d in rows if d.get(key) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def smooth(y, width):
    """Trailing mean over `width` points: a step's loss is one noisy batch."""
    out, acc = [], 0.0
    for i, v in enumerate(y):
        acc += v
        if i >= width:
            acc -= y[i - width]
        out.append(acc / min(i + 1, width))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", metavar="RUN_DIR")
    ap.add_argument("-o", "--out")
    ap.add_argument("--title")
    a = ap.parse_args()
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        fail("matplotlib is missing (apt-get install python3-matplotlib, or pip install matplotlib)")

    runs = [(os.path.basename(os.path.normpath(r)), *read_run(r)) for r in a.runs]
    has_usage = any(d.get("layers") for _, _, val in runs for d in val)
    panels = ["loss", "lr", "grad_norm", "tokens_per_s"] + (["usage", "unevenness"] if has_usage else [])
    cols = 3 if len(panels) > 4 else 2
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.6 * rows), squeeze=False)
    ax = dict(zip(panels, axes.flat))
    for extra in list(axes.flat)[len(panels):]:
        extra.set_visible(False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (name, train, val) in enumerate(runs):
        c = colours[i % len(colours)]
        x, y = series(train, "loss")
        if y:
            w = max(1, len(y) // 100)
            ax["loss"].plot(x, smooth(y, w), color=c, lw=1, alpha=0.8,
                            label=f"{name} train" + (f" (mean of {w})" if w > 1 else ""))
        x, y = series(val, "val_loss")
        if y:
            ax["loss"].plot(x, y, color=c, lw=1.8, marker="o", ms=3, ls="--", label=f"{name} val")
        for key in ("lr", "grad_norm", "tokens_per_s"):
            x, y = series(train, key)
            ax[key].plot(x, y, color=c, lw=1, label=name)
        if has_usage:
            blocks = sorted({L["block"] for d in val for L in d.get("layers", [])})
            for b in blocks:
                pts = [(d["step"], L) for d in val for L in d.get("layers", []) if L["block"] == b]
                lab = f"{name} block {b}"
                ax["usage"].plot([s for s, _ in pts], [100 * L["usage"] for _, L in pts], color=c,
                                 marker="o", ms=3, label=lab)
                ax["usage"].plot([s for s, _ in pts], [100 * L["usage_uniform"] for _, L in pts],
                                 color=c, ls=":", lw=1, label=f"{lab}, uniform router")
                ux = [(s, L["unevenness"]) for s, L in pts if L["unevenness"] is not None]
                ax["unevenness"].plot([s for s, _ in ux], [u for _, u in ux], color=c, marker="o",
                                      ms=3, label=lab)
    titles = {"loss": "loss (nats/token)", "lr": "learning rate (dense group)",
              "grad_norm": "gradient norm (before clipping)", "tokens_per_s": "tokens/s",
              "usage": "expert usage (%) at validation", "unevenness": "unevenness (nats, KL to uniform)"}
    for k, axis in ax.items():
        axis.set_title(titles[k], fontsize=10)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    if a.title:
        fig.suptitle(a.title)
    fig.tight_layout()
    out = a.out or (os.path.join(a.runs[0], "plot.png") if len(a.runs) == 1 else "runs.png")
    fig.savefig(out, dpi=110)
    print(f"plot: {out}")


if __name__ == "__main__":
    main()
