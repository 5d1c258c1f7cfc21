#!/usr/bin/env python3
"""One PEER (or PKM) layer in PyTorch, timed: the baseline for tools/bench/bench_peer_cuda.c.

The layer is millipede's (docs/model.md): query W_q x, BatchNorm over the batch, product
keys K1, K2 shared by the heads, top-k of each half then of the k*k sums, softmax gates,
experts sigma(u_e . x) v_e; written the way the public PyTorch PEER code writes it: the
selected expert rows are gathered with nn.Embedding into (tokens, H, k, d) tensors and
combined with einsums. Timed eager and under torch.compile, in bf16 and/or fp32, with CUDA
events (median of --iters after --warmup); prints one JSON line per (mode, dtype) with the
same keys as bench_peer_cuda (fwd_ms, fwdbwd_ms, memory in GiB).

--device cpu runs it on the host (for tools/bench/check_peer_torch.py and for trying the
script without a GPU): host clock instead of CUDA events, and no memory figures beyond
the parameters (PyTorch keeps no allocator statistics for the CPU).

  bench_peer_torch.py [--d 1024] [--n 1024] [--heads 8] [--topk 16] [--dk 128]
                      [--tokens 16384] [--dtype bf16,fp32] [--mode eager,compile]
                      [--iters 20] [--warmup 5] [--pkm] [--no-bn] [--device cuda|cpu]
"""
import argparse
import json
import math
import sys
import time


def build_layer(torch, args, dtype):
    nn = torch.nn
    F = torch.nn.functional
    d, n, H, k, dk = args.d, args.n, args.heads, args.topk, args.dk
    half = dk // 2

    class PEER(nn.Module):
        def __init__(self):
            super().__init__()
            self.wq = nn.Linear(d, H * dk, bias=False)
            nn.init.normal_(self.wq.weight, std=0.02)
            self.bn = nn.BatchNorm1d(H * dk) if not args.no_bn else None
            bound = 1.0 / math.sqrt(half)
            self.k1 = nn.Parameter(torch.empty(n, half).uniform_(-bound, bound))
            self.k2 = nn.Parameter(torch.empty(n, half).uniform_(-bound, bound))
            self.u = None if args.pkm else nn.Embedding(n * n, d)
            self.v = nn.Embedding(n * n, d)
            for emb in (self.u, self.v):
                if emb is not None:
                    nn.init.normal_(emb.weight, std=1.0 / math.sqrt(d))

        def forward(self, x):                                   # x (T, d)
            T = x.shape[0]
            q = self.wq(x)                                      # (T, H*dk)
            if self.bn is not None:
                q = self.bn(q)
            q = q.view(T, H, 2, half)
            s1 = torch.einsum("thc,nc->thn", q[:, :, 0], self.k1)   # (T, H, n)
            s2 = torch.einsum("thc,nc->thn", q[:, :, 1], self.k2)
            v1, i1 = s1.topk(k, dim=-1)
            v2, i2 = s2.topk(k, dim=-1)
            cand = (v1[..., :, None] + v2[..., None, :]).flatten(-2)        # (T, H, k*k)
            cand_id = (i1[..., :, None] * n + i2[..., None, :]).flatten(-2)
            score, pos = cand.topk(k, dim=-1)                               # (T, H, k)
            idx = cand_id.gather(-1, pos)
            gate = score.softmax(dim=-1)
            v = self.v(idx)                                                 # (T, H, k, d)
            if self.u is None:
                return torch.einsum("thk,thkd->td", gate, v)
            u = self.u(idx)                                                 # (T, H, k, d)
            h = torch.einsum("td,thkd->thk", x, u)
            return torch.einsum("thk,thkd->td", F.gelu(h) * gate, v)

    return PEER().to(device=args.device, dtype=dtype)


class HostEvent:
    """torch.cuda.Event's record / elapsed_time (ms) on the host clock, for --device cpu,
    where each op has finished when it returns."""

    def record(self):
        self.t = time.perf_counter()

    def elapsed_time(self, end):
        return 1e3 * (end.t - self.t)


def median(xs):
    xs = sorted(xs)
    m = len(xs) // 2
    return xs[m] if len(xs) % 2 else 0.5 * (xs[m - 1] + xs[m])


def run_one(torch, args, mode, dtype_name):
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    GiB = float(1 << 30)
    cuda = args.device == "cuda"
    device_name = (torch.cuda.get_device_name() if cuda
                   else f"cpu ({torch.get_num_threads()} threads)")
    rec = {"impl": "torch-" + mode, "layer": "pkm" if args.pkm else "peer",
           "precision": dtype_name, "device": device_name,
           "torch": torch.__version__, "d": args.d, "n_experts": args.n * args.n,
           "heads": args.heads, "topk": args.topk, "dk": args.dk, "tokens": args.tokens,
           "query_bn": 0 if args.no_bn else 1, "iters": args.iters}
    if cuda:
        torch.cuda.empty_cache()
    torch.manual_seed(0)
    with torch.device(args.device):   # the tables made on the device, not on the host first
        layer = build_layer(torch, args, dtype)
    fn = torch.compile(layer) if mode == "compile" else layer
    x = torch.randn(args.tokens, args.d, device=args.device, dtype=dtype, requires_grad=True)
    dy = torch.randn(args.tokens, args.d, device=args.device, dtype=dtype)
    event = (lambda: torch.cuda.Event(enable_timing=True)) if cuda else HostEvent
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    params = sum(p.numel() * p.element_size() for p in layer.parameters())
    base = torch.cuda.memory_allocated() if cuda else 0
    try:
        def step(backward):
            for p in layer.parameters():
                p.grad = None                     # optimizer.zero_grad(set_to_none=True)
            x.grad = None
            start, mid, end = (event() for _ in range(3))
            start.record()
            y = fn(x)
            mid.record()
            if backward:
                y.backward(dy)
            end.record()
            return start, mid, end

        for _ in range(args.warmup):              # compiles here under torch.compile
            step(True)
        sync()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        fwd, full = [], []
        for _ in range(args.iters):
            s, m, e = step(True)
            sync()
            fwd.append(s.elapsed_time(m))
            full.append(s.elapsed_time(e))
        peak = torch.cuda.max_memory_allocated() if cuda else None
        # forward alone, under autograd as in training (its saved tensors are freed after)
        fwd_only = []
        for _ in range(args.iters):
            s, m, _e = step(False)
            sync()
            fwd_only.append(s.elapsed_time(m))
        rec.update({
            "fwd_ms": round(median(fwd_only), 4),
            "fwd_in_step_ms": round(median(fwd), 4),
            "fwdbwd_ms": round(median(full), 4),
            "params_gib": round(params / GiB, 3),
        })
        if peak is not None:
            rec.update({
                "peak_gib": round(peak / GiB, 3),
                # beyond the parameters, the inputs and one gradient per parameter: activations,
                # the gathered (tokens, H, k, d) rows, autograd's saved tensors and temporaries
                "extra_gib": round((peak - base - params) / GiB, 3),
            })
    except torch.cuda.OutOfMemoryError as e:
        rec["error"] = "out of memory: " + str(e).splitlines()[0]
    del layer, fn, x, dy
    if cuda:
        torch.cuda.empty_cache()
    return rec


def import_torch(device):
    """torch, or None after printing the JSON line that says why it cannot run (exit 77):
    not installed, or no CUDA device for device 'cuda'."""
    try:
        import torch
    except ImportError:
        print(json.dumps({"impl": "torch", "skipped": "PyTorch is not installed"}))
        return None
    if device == "cuda" and not torch.cuda.is_available():
        print(json.dumps({"impl": "torch", "skipped": "no CUDA device visible to PyTorch"}))
        return None
    return torch


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d", type=int, default=1024)
    ap.add_argument("--n", type=int, default=1024, help="sub-keys per half (N = n*n)")
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--topk", type=int, default=16)
    ap.add_argument("--dk", type=int, default=128)
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--dtype", default="bf16,fp32")
    ap.add_argument("--mode", default="eager,compile")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--pkm", action="store_true")
    ap.add_argument("--no-bn", action="store_true")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                    help="cpu: host timing, no memory statistics (checks, not the benchmark)")
    args = ap.parse_args()
    torch = import_torch(args.device)
    if torch is None:
        return 77
    for mode in args.mode.split(","):
        for dt in args.dtype.split(","):
            print(json.dumps(run_one(torch, args, mode, dt)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
