#!/usr/bin/env python3
"""One whole training step in PyTorch, timed: the baseline for millipede's step
(tools/bench/bench_step.sh runs both).

The model is millipede's (docs/model.md) written the usual PyTorch way: GPT-2 blocks
(pre-norm, learned positions, causal attention through scaled_dot_product_attention, exact
GELU, tied LM head), the feed-forward of block --peer-block a PEER layer, the layer of
tools/bench/bench_peer_torch.py (imported, not copied), or with --model dense every block
dense (GPT-2 itself). One step: zero_grad, forward, cross-entropy, backward, global-norm
clipping to 1.0, AdamW (decay on the dense matrices only, as millipede's groups), and
loss.item(), the host synchronisation millipede's step also makes. Random tokens.

Prints one JSON line per (model, precision, mode): median ms per step over --iters after
--warmup (CUDA events), tokens/s, peak memory (torch.cuda.max_memory_allocated over the
timed steps: parameters, gradients, AdamW state, activations). Precisions: fp32 (no TF32
unless --tf32) and bf16 (torch.autocast to bfloat16 around forward and loss: fp32 master
weights, bf16 matrix products). Modes: eager, compile (torch.compile of the model).

  bench_step_torch.py [--model peer,dense] [--precision fp32,bf16] [--mode eager,compile]
                      [--vocab 50304] [--context 1024] [--d 768] [--layers 12]
                      [--attn-heads 12] [--batch 16] [--peer-block 6] [--n 1024]
                      [--heads 8] [--topk 16] [--dk 128] [--no-bn] [--iters 5]
                      [--warmup 2] [--tf32] [--device cuda|cpu]

--device cpu runs it on the host at a small shape (to try the script without a GPU): host
clock, no memory figures. Exits 77 when PyTorch or (for cuda) a GPU is missing.
"""
import argparse
import json
import os
import sys
import time
import types

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def build_model(torch, args, kind):
    """The GPT-2 model; kind 'peer' puts bench_peer_torch's PEER layer in block
    args.peer_block, 'dense' keeps an MLP in every block."""
    import bench_peer_torch
    nn = torch.nn
    F = torch.nn.functional
    C, NH, T = args.d, args.attn_heads, args.context

    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(C, 4 * C)
            self.proj = nn.Linear(4 * C, C)

        def forward(self, x):
            return self.proj(F.gelu(self.fc(x)))

    class Block(nn.Module):
        def __init__(self, ffn):
            super().__init__()
            self.ln1 = nn.LayerNorm(C)
            self.qkv = nn.Linear(C, 3 * C)
            self.proj = nn.Linear(C, C)
            self.ln2 = nn.LayerNorm(C)
            self.ffn = ffn

        def forward(self, x):                                   # x (B, T, C)
            B, T_, _ = x.shape
            q, k, v = self.qkv(self.ln1(x)).split(C, dim=2)
            q, k, v = (t.view(B, T_, NH, C // NH).transpose(1, 2) for t in (q, k, v))
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)   # (B, NH, T, hs)
            x = x + self.proj(o.transpose(1, 2).reshape(B, T_, C))
            f = self.ln2(x)
            return x + self.ffn(f.reshape(B * T_, C)).view(B, T_, C)

    class GPT(nn.Module):
        def __init__(self):
            super().__init__()
            self.wte = nn.Embedding(args.vocab, C)
            self.wpe = nn.Embedding(T, C)
            layer_args = types.SimpleNamespace(d=C, n=args.n, heads=args.heads, topk=args.topk,
                                               dk=args.dk, pkm=False, no_bn=args.no_bn,
                                               device=args.device)
            self.blocks = nn.ModuleList(
                Block(bench_peer_torch.build_layer(torch, layer_args, torch.float32)
                      if kind == "peer" and i == args.peer_block else MLP())
                for i in range(args.layers))
            self.lnf = nn.LayerNorm(C)
            for name, p in self.named_parameters():   # GPT-2's initialisation
                if p.dim() == 2 and ".ffn.u." not in name and ".ffn.v." not in name \
                        and not name.endswith((".k1", ".k2")):
                    std = 0.02 / (2 * args.layers) ** 0.5 if name.endswith("proj.weight") else 0.02
                    nn.init.normal_(p, std=std)
                elif name.endswith(".bias"):
                    nn.init.zeros_(p)

        def forward(self, tokens, targets):                     # (B, T) each
            x = self.wte(tokens) + self.wpe.weight[: tokens.shape[1]]
            for b in self.blocks:
                x = b(x)
            logits = self.lnf(x) @ self.wte.weight.t()           # tied LM head, (B, T, V)
            return F.cross_entropy(logits.view(-1, logits.shape[-1]).float(), targets.view(-1))

    with torch.device(args.device):   # made where it runs: no host copy of 1.6 G expert values
        return GPT()


def optimizer(torch, model):
    """AdamW with millipede's groups: weight decay 0.1 on the dense matrices (wte, wpe, the
    linear weights, W_q), none on biases, norms, the keys and the expert tables."""
    decay, rest = [], []
    for name, p in model.named_parameters():
        expert_or_key = ".ffn.u." in name or ".ffn.v." in name or name.endswith((".k1", ".k2"))
        (decay if p.dim() == 2 and not expert_or_key else rest).append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                              {"params": rest, "weight_decay": 0.0}],
                             lr=6e-4, betas=(0.9, 0.95), eps=1e-8)


def median(xs):
    xs = sorted(xs)
    m = len(xs) // 2
    return xs[m] if len(xs) % 2 else 0.5 * (xs[m - 1] + xs[m])


def run_one(torch, args, kind, precision, mode):
    cuda = args.device == "cuda"
    GiB = float(1 << 30)
    rec = {"impl": "torch-" + mode, "model": kind, "precision": precision,
           "device": torch.cuda.get_device_name() if cuda else
           f"cpu ({torch.get_num_threads()} threads)", "torch": torch.__version__,
           "tf32": bool(args.tf32), "vocab": args.vocab, "context": args.context, "d": args.d,
           "layers": args.layers, "batch": args.batch, "tokens_per_step": args.batch * args.context}
    if kind == "peer":
        rec.update({"peer_block": args.peer_block, "n_experts": args.n * args.n,
                    "heads": args.heads, "topk": args.topk, "dk": args.dk})
    if cuda:
        torch.cuda.empty_cache()
    torch.manual_seed(0)
    model = opt = fn = None
    try:
        model = build_model(torch, args, kind)
        opt = optimizer(torch, model)
        fn = torch.compile(model) if mode == "compile" else model
        rec["params"] = sum(p.numel() for p in model.parameters())
        batches = [(torch.randint(0, args.vocab, (args.batch, args.context), device=args.device),
                    torch.randint(0, args.vocab, (args.batch, args.context), device=args.device))
                   for _ in range(2)]
        dev_type = "cuda" if cuda else "cpu"

        def step(i):
            tokens, targets = batches[i % len(batches)]
            opt.zero_grad(set_to_none=True)
            with torch.autocast(dev_type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                loss = fn(tokens, targets)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            return loss.item()   # millipede's step returns its loss to the host too

        t0 = time.perf_counter()
        for i in range(args.warmup):                # compiles here under torch.compile
            step(i)
        rec["warmup_s"] = round(time.perf_counter() - t0, 2)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        times, losses = [], []
        for i in range(args.iters):
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                losses.append(step(i))
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t = time.perf_counter()
                losses.append(step(i))
                times.append(1e3 * (time.perf_counter() - t))
        ms = median(times)
        rec.update({"step_ms": round(ms, 3), "tokens_per_s": round(rec["tokens_per_step"] / (ms * 1e-3), 1),
                    "loss_last": round(losses[-1], 4), "iters": args.iters})
        if cuda:
            rec["peak_gib"] = round(torch.cuda.max_memory_allocated() / GiB, 3)
    except torch.cuda.OutOfMemoryError as e:
        rec["error"] = "out of memory: " + str(e).splitlines()[0]
    except Exception as e:   # a compile failure must not stop the other variants
        rec["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
    del model, opt, fn
    if cuda:
        torch.cuda.empty_cache()
    return rec


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="peer,dense")
    ap.add_argument("--precision", default="fp32,bf16")
    ap.add_argument("--mode", default="eager")
    ap.add_argument("--vocab", type=int, default=50304)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--d", type=int, default=768)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--attn-heads", type=int, default=12)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--peer-block", type=int, default=6, help="0-based block of the PEER layer")
    ap.add_argument("--n", type=int, default=1024, help="sub-keys per half (N = n*n)")
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--topk", type=int, default=16)
    ap.add_argument("--dk", type=int, default=128)
    ap.add_argument("--no-bn", action="store_true")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--tf32", action="store_true", help="allow TF32 in fp32 matrix products")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    args = ap.parse_args()
    if not 0 <= args.peer_block < args.layers or args.d % args.attn_heads:
        ap.error("need 0 <= --peer-block < --layers and --d divisible by --attn-heads")
    import bench_peer_torch
    torch = bench_peer_torch.import_torch(args.device)
    if torch is None:
        return 77
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    torch.backends.cudnn.allow_tf32 = args.tf32
    failed = 0
    for mode in args.mode.split(","):
        for kind in args.model.split(","):
            for prec in args.precision.split(","):
                rec = run_one(torch, args, kind, prec, mode)
                failed += "error" in rec
                print(json.dumps(rec), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
