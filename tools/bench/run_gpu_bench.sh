#!/usr/bin/env bash
# One PEER layer on the GPU: millipede's CUDA backend (bench_peer_cuda) beside the PyTorch
# layer (bench_peer_torch.py, eager and torch.compile), in one run on one GPU, at the shapes
# of issue #5: d=1024, N=1024^2 and d=512, N=512^2, H=8, k=16, dk=128, 16384 tokens.
# Builds bench_peer_cuda (unless it is built already), runs it with its value check (a few
# tokens' y and touched rows of dU, dV against double on the host: "check" in its second
# JSON line), writes every JSON line to bench_peer.jsonl (in $OUT when set, else the build
# folder) and prints a table of times, memory and ratios. The exit status is the number of
# runs that failed (a failed value check among them). tools/gpu_check.sh runs it twice:
# eager beside ours first, torch.compile last.
#
# On the GPU machine (docs/cuda.md), from the repository root, carrying .device-deps:
#   bash .device-deps/setup.sh && bash tools/bench/run_gpu_bench.sh
# Environment: MP_BENCH_BUILD (build folder), MP_BENCH_SHAPES ("d:n ..."),
# MP_BENCH_TOKENS, MP_BENCH_ITERS, MP_BENCH_PRECISIONS (ours, default "bf16 fp32"),
# MP_BENCH_TORCH_DTYPES (default bf16,fp32), MP_BENCH_TORCH_MODES (default eager,compile;
# none: no PyTorch), MP_BENCH_CUDA (0: PyTorch only, nothing built), MP_BENCH_JSONL (the
# output file), MP_BENCH_TABLE_INPUTS (more files whose JSON lines join the table).
set -uo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
build=${MP_BENCH_BUILD:-$root/build-bench}
ours=${MP_BENCH_CUDA:-1}
fails=0
if [ "$ours" = 1 ] && [ ! -x "$build/bench_peer_cuda" ]; then
    { cmake -S "$root" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release >/dev/null &&
      cmake --build "$build" --target bench_peer_cuda >/dev/null; } || fails=$((fails + 1))
fi
out=${MP_BENCH_JSONL:-${OUT:-$build}/bench_peer.jsonl}
mkdir -p "$(dirname "$out")"
: >"$out"
iters=${MP_BENCH_ITERS:-20}
modes=${MP_BENCH_TORCH_MODES:-eager,compile}
for shape in ${MP_BENCH_SHAPES:-1024:1024 512:512}; do
    d=${shape%%:*} n=${shape##*:}
    args=(--d "$d" --n "$n" --heads 8 --topk 16 --dk 128 --tokens "${MP_BENCH_TOKENS:-16384}"
          --iters "$iters")
    if [ "$ours" = 1 ]; then
        for prec in ${MP_BENCH_PRECISIONS:-bf16 fp32}; do
            "$build/bench_peer_cuda" "${args[@]}" --precision "$prec" | tee -a "$out"
            [ "${PIPESTATUS[0]}" -eq 0 ] || fails=$((fails + 1))
        done
    fi
    if [ "$modes" != none ]; then
        python3 "$root/tools/bench/bench_peer_torch.py" "${args[@]}" \
            --dtype "${MP_BENCH_TORCH_DTYPES:-bf16,fp32}" --mode "$modes" | tee -a "$out"
        rc=${PIPESTATUS[0]}
        [ "$rc" -eq 0 ] || [ "$rc" -eq 77 ] || fails=$((fails + 1))
    fi
done

# shellcheck disable=SC2086
python3 - "$out" ${MP_BENCH_TABLE_INPUTS:-} <<'EOF'
import json, sys
rows = []
for path in sys.argv[1:]:
    try:
        for line in open(path, errors="replace"):
            line = line.strip()
            # layer rows only (the check's lines and other logs' JSON are left out)
            if line.startswith("{") and '"impl"' in line and '"check"' not in line \
                    and '"model"' not in line:
                try:
                    rows.append(json.loads(line))
                except ValueError:
                    pass
    except OSError:
        pass
checks = [l for p in sys.argv[1:] for l in open(p, errors="replace") if '"check"' in l] \
    if sys.argv[1:] else []
print()
print(f"{'impl':<16}{'prec':<6}{'d':>6}{'N':>9}{'fwd ms':>9}{'f+b ms':>9}"
      f"{'extra GiB':>11}{'TB/s f+b':>10}{'of copy':>9}{'f+b vs ours':>13}")
for d in sorted({r.get('d') for r in rows if 'd' in r}, reverse=True):
    group = [r for r in rows if r.get('d') == d]
    for r in group:
        ours = next((o for o in group if o['impl'] == 'millipede-cuda' and 'fwdbwd_ms' in o
                     and o['precision'] == r.get('precision')), None)
        if 'fwdbwd_ms' not in r:
            print(f"{r['impl']:<16}{r.get('precision', ''):<6}{d:>6}  {r.get('error', r.get('skipped', ''))}")
            continue
        ratio = f"{r['fwdbwd_ms'] / ours['fwdbwd_ms']:.2f}x" if ours else "-"
        tb = frac = "-"
        if ours:   # the same layer and batch: the same bytes to move, over this row's time
            tbps = ours['fwdbwd_touched_bytes'] / (r['fwdbwd_ms'] * 1e-3) / 1e12
            tb, frac = f"{tbps:.2f}", f"{tbps / ours['copy_tbps']:.2f}"
        extra = f"{r['extra_gib']:.3f}" if 'extra_gib' in r else "-"
        print(f"{r['impl']:<16}{r['precision']:<6}{d:>6}{r['n_experts']:>9}{r['fwd_ms']:>9.3f}"
              f"{r['fwdbwd_ms']:>9.3f}{extra:>11}{tb:>10}{frac:>9}{ratio:>13}")
print("\n'f+b vs ours': that row's forward+backward time over millipede-cuda's at the same precision")
print("(>1: ours is faster). millipede bf16 = bf16 expert tables, fp32 sums and gradients.")
print("extra GiB: memory beyond parameters, their gradients and inputs (see docs/cuda.md).")
print("TB/s f+b: bytes counted from the expert rows the batch touched (millipede's count for the")
print("same layer and batch, on every row), over that row's f+b time;")
print("of copy: that over the device's copy bandwidth measured in the same run.")
for line in checks:   # bench_peer_cuda's value check, one line per run
    try:
        c = json.loads(line[line.index("{"):])
    except ValueError:
        continue
    print(f"value check, millipede-cuda {c['precision']} d={c['d']} N={c['n_experts']}: "
          f"{c['check']} (y, dU, dV of {c['check_tokens']} tokens and {c['check_rows']} rows; "
          f"worst error over its bound {max(c['y_err_over_bound'], c['du_err_over_bound'], c['dv_err_over_bound']):.3g})")
EOF
exit "$fails"
