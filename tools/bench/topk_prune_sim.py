#!/usr/bin/env python3
"""How many entries survive the CUDA top-k's pruning bound (src/backend/cuda/retrieval_route.cu),
simulated on scores without structure (uniform random floats), to size its fast path:

    python3 tools/bench/topk_prune_sim.py [--n 1024] [--k 8,16,24,32] [--trials 2000]

The kernel works on a warp of 32 lanes. Each lane takes the best of the entries it holds,
the 32 lane bests are sorted, and the k-th of them is a bound B: only the m entries ranked
at or before B can be in the top k. When m <= 32 one sort finishes the job, else k rounds of
a warp arg-max do. Printed per layout: the mean of m, its largest value and the share of
trials with m > 32 (which take the rounds):
- "half": one half's n scores, lane l holding the scores l, l + 32, ... (row_topk);
- "pairs, rows": the k x k candidate sums of the two halves' top k, kept row by row
  (c = i k + j), lane l holding c = l, l + 32, ...;
- "pairs, diagonals": the same kept in the order of the anti-diagonals i + j, then i
  (diagonal_pos, what the kernel does).
Needs numpy.
"""
import argparse

import numpy as np


def diagonal_pos(i, j, k):
    d = i + j
    before = d * (d + 1) // 2 if d < k else k * k - (2 * k - 1 - d) * (2 * k - d) // 2
    return before + i - max(0, d - k + 1)


def survivors(entries, k):
    """m for one warp: entries (m_total,) held by lanes l = position % 32."""
    lanes = min(32, len(entries))
    lane_best = np.array([entries[lane::32].max() for lane in range(lanes)])
    bound = np.sort(lane_best)[::-1][k - 1]
    return int((entries >= bound).sum())


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=1024, help="sub-keys per half (<= 1024)")
    ap.add_argument("--k", default="8,16,24,32")
    ap.add_argument("--trials", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args()
    rng = np.random.default_rng(a.seed)
    print(f"{'k':>3}  {'layout':<17}{'mean m':>8}{'max m':>7}{'m > 32':>9}")
    for k in (int(s) for s in a.k.split(",")):
        pos = np.array([diagonal_pos(i, j, k) for i in range(k) for j in range(k)])
        assert sorted(pos) == list(range(k * k))
        m = {"half": [], "pairs, rows": [], "pairs, diagonals": []}
        for _ in range(a.trials):
            halves = [rng.random(a.n, dtype=np.float32) for _ in range(2)]
            m["half"].append(survivors(halves[0], k))
            top = [np.sort(h)[::-1][:k] for h in halves]
            rows = (top[0][:, None] + top[1][None, :]).reshape(-1)   # float32 sums
            diag = np.empty_like(rows)
            diag[pos] = rows
            m["pairs, rows"].append(survivors(rows, k))
            m["pairs, diagonals"].append(survivors(diag, k))
        for name, v in m.items():
            v = np.array(v)
            print(f"{k:>3}  {name:<17}{v.mean():>8.1f}{v.max():>7}{(v > 32).mean():>8.1%}")


if __name__ == "__main__":
    main()
