#!/usr/bin/env bash
# One whole training step: millipede (`millipede train`, system.backend = cuda) beside the
# same model in PyTorch (tools/bench/bench_step_torch.py) and the all-dense model in PyTorch,
# at the GPT-2-small shape with a PEER layer in block 6 (configs/gpt2-small-peer.ini:
# d=768, 12 blocks, 12 heads, T=1024, 16 sequences, vocabulary 50,304; N=1024^2, H=8, k=16,
# dk=128). Random tokens: the script writes its own shards. millipede trains for
# MP_STEP_STEPS steps (read from metrics.jsonl, "ms" per step: forward, backward, all-reduce,
# AdamW, the loss back on the host) and is then stopped with SIGKILL, so that no 24 GiB
# checkpoint is written; its time is the median of the steps after the first two.
# Prints one JSON line per variant (also appended to MP_STEP_JSONL) and a table of ms per
# step with each row's ratio to millipede at the same precision. tools/gpu_check.sh runs it.
#
#   bash tools/bench/bench_step.sh            # on a GPU machine, after building millipede
# Environment:
#   MP_STEP_BUILD        build folder holding millipede (default build-gpu)
#   MP_STEP_MILLIPEDE    path of the binary (default $MP_STEP_BUILD/millipede); "" skips it
#   MP_STEP_PRECISIONS   millipede's system.precision values (default "fp32 bf16")
#   MP_STEP_STEPS        steps per millipede run (default 6), MP_STEP_RUN_TIMEOUT (s, 90)
#   MP_STEP_SET          extra --set arguments for millipede (e.g. a small shape)
#   MP_STEP_PROFILE      1: one more millipede run, at the last precision, with train.profile
#                        = true (its row "millipede-profile": synchronized, so slower; the
#                        median time of each phase of the step, and of each kernel, GEMM,
#                        copy, ... per phase and launch site, are printed after the table)
#   MP_STEP_TORCH_MODES  eager, compile, eager,compile or none (default eager)
#   MP_STEP_TORCH_ARGS   extra arguments for bench_step_torch.py (the same shape, if changed)
#   MP_STEP_JSONL        where this run's JSON lines go, emptied first (default
#                        $MP_STEP_BUILD/bench_step.jsonl)
#   MP_STEP_TABLE_INPUTS more files whose JSON lines join the table (an earlier run's)
set -uo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
build=${MP_STEP_BUILD:-$root/build-gpu}
bin=${MP_STEP_MILLIPEDE-$build/millipede}
out=${MP_STEP_JSONL:-$build/bench_step.jsonl}
steps=${MP_STEP_STEPS:-6}
work=$(mktemp -d "${TMPDIR:-/tmp}/mp-bench-step.XXXXXX")
trap 'rm -rf "$work"' EXIT
mkdir -p "$(dirname "$out")"
: >"$out"
fails=0
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1

# the vocabulary the runs use (a --set model.vocab_size in MP_STEP_SET wins)
# shellcheck disable=SC2086
vocab=$(printf '%s\n' ${MP_STEP_SET:-} | sed -n 's/^model\.vocab_size=//p' | tail -1)
vocab=${vocab:-50304}

# random token shards (docs/data.md, version 1): uniform ids below the vocabulary
python3 - "$work" "$vocab" <<'EOF' || { echo '{"impl": "millipede-cuda", "error": "could not write the token shards"}'; exit 1; }
import os, struct, sys
import numpy as np
work, vocab = sys.argv[1], int(sys.argv[2])
rng = np.random.default_rng(0)
for name, n in (("train.bin", 1 << 21), ("val.bin", 1 << 16)):
    tok = rng.integers(0, vocab, n, dtype=np.uint16)
    with open(os.path.join(work, name), "wb") as f:
        f.write(b"MPTOKENS" + struct.pack("<IIQII", 1, vocab, n, 2, 0) + tok.astype("<u2").tobytes())
EOF

# millipede_run PRECISION [profile]: train until $steps step lines, then SIGKILL; one JSON line
millipede_run() {
    local prec=$1 prof=${2:-} run=$work/run-$1${2:-} log=$work/train-$1${2:-}.log pid t0=$SECONDS peak=0
    local m done_steps kv extra=()   # an array: printf over an empty MP_STEP_SET would still print "--set"
    # shellcheck disable=SC2086
    for kv in ${MP_STEP_SET:-}; do extra+=(--set "$kv"); done
    [ -n "$prof" ] && extra+=(--set train.profile=true)
    "$bin" train "$root/configs/gpt2-small-peer.ini" --no-resume \
        --set run.dir="$run" --set data.train="$work/train.bin" --set data.val="$work/val.bin" \
        --set system.precision="$prec" ${extra[@]+"${extra[@]}"} >"$log" 2>&1 &
    pid=$!
    while kill -0 "$pid" 2>/dev/null; do
        done_steps=$(grep -c '"ms"' "$run/metrics.jsonl" 2>/dev/null)
        if [ "${done_steps:-0}" -ge "$steps" ] ||
           [ $((SECONDS - t0)) -ge "${MP_STEP_RUN_TIMEOUT:-90}" ]; then
            kill -9 "$pid" 2>/dev/null
            break
        fi
        # the process's device memory (MiB) while it trains, where nvidia-smi can see it
        m=$(nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader,nounits 2>/dev/null |
            awk -F', *' -v p="$pid" '$1 == p {print $2}')
        [ -n "$m" ] && [ "$m" -gt "$peak" ] && peak=$m
        sleep 0.5
    done
    wait "$pid" 2>/dev/null
    echo "--- millipede train, precision $prec: the log's first and last lines" >&2
    grep -E "memory|error|backend|transport" "$log" | head -8 >&2
    tail -3 "$log" >&2
    python3 - "$run/metrics.jsonl" "$prec" "$peak" "$steps" "$log" "$prof" <<'EOF'
import json, sys
path, prec, peak_mib, want, log = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
profiled = sys.argv[6] == "profile"
try:
    lines = [json.loads(l) for l in open(path) if '"ms"' in l]
except OSError:
    lines = []
ms = [l["ms"] for l in lines]
rec = {"impl": "millipede-profile" if profiled else "millipede-cuda", "model": "peer", "precision": prec}
if len(ms) < 3:
    last = [l.strip() for l in open(log, errors="replace") if l.strip()][-1:] or ["(no output)"]
    rec["error"] = f"{len(ms)} step(s) done, need 3: {last[0][:300]}"
else:
    timed = sorted(ms[2:])   # the first two steps warm up (cuBLAS handles, first allocations)
    mid = len(timed) // 2
    med = timed[mid] if len(timed) % 2 else 0.5 * (timed[mid - 1] + timed[mid])
    rec.update({"step_ms": round(med, 3), "first_step_ms": ms[0], "steps": len(ms),
                "tokens_per_s": round(lines[0]["tokens_per_s"] * lines[0]["ms"] / med, 1)})
    if len(ms) < want:
        rec["note"] = f"stopped at the run timeout after {len(ms)} steps"
    if profiled:   # each phase's median over the timed steps
        phases = [l["phase_ms"] for l in lines[2:] if "phase_ms" in l]
        if phases:
            rec["phase_ms"] = {k: round(sorted(p[k] for p in phases)[len(phases) // 2], 3)
                               for k in phases[0]}
        else:
            rec["error"] = "train.profile = true, but the metrics lines have no phase_ms"
        # each (phase, op, site)'s median over the timed steps (0 in a step whose 64 rows
        # leave it out: a row near the 64th may read low)
        kern = [{(k["phase"], k["op"], k["site"]): k for k in l.get("kernel_ms", [])} for l in lines[2:]]
        keys = {key for step in kern for key in step}
        if keys:
            def median(key, field):
                v = sorted(step[key][field] if key in step else 0 for step in kern)
                return v[len(v) // 2]
            rows = [{"phase": p, "op": o, "site": s, "calls": median((p, o, s), "calls"),
                     "ms": round(median((p, o, s), "ms"), 3)} for p, o, s in keys]
            rec["kernel_ms"] = sorted(rows, key=lambda r: -r["ms"])[:40]
            rec["kernel_total_ms"] = round(sorted(l["kernel_total_ms"] for l in lines[2:]
                                                  if "kernel_total_ms" in l)[len(kern) // 2], 3)
        else:
            rec["error"] = "train.profile = true, but the metrics lines have no kernel_ms"
for line in open(log, errors="replace"):   # "model: 124439808 parameters, ..."
    if line.startswith("model: ") and " parameters" in line:
        rec["params"] = int(line.split()[1])
if peak_mib:
    rec["peak_gib"] = round(peak_mib / 1024, 3)   # nvidia-smi: the process, CUDA context included
print(json.dumps(rec))
sys.exit(1 if "error" in rec else 0)
EOF
}

if [ -n "$bin" ]; then
    if [ ! -x "$bin" ]; then
        echo "{\"impl\": \"millipede-cuda\", \"error\": \"no binary at $bin\"}" | tee -a "$out"
        fails=$((fails + 1))
    else
        for prec in ${MP_STEP_PRECISIONS:-fp32 bf16}; do
            millipede_run "$prec" | tee -a "$out"
            [ "${PIPESTATUS[0]}" -eq 0 ] || fails=$((fails + 1))
        done
        if [ "${MP_STEP_PROFILE:-0}" = 1 ]; then
            millipede_run "$prec" profile | tee -a "$out"
            [ "${PIPESTATUS[0]}" -eq 0 ] || fails=$((fails + 1))
        fi
    fi
fi
modes=${MP_STEP_TORCH_MODES:-eager}
if [ "$modes" != none ]; then
    # shellcheck disable=SC2086
    python3 "$root/tools/bench/bench_step_torch.py" --model peer,dense --precision fp32,bf16 \
        --mode "$modes" ${MP_STEP_TORCH_ARGS:-} | tee -a "$out"
    rc=${PIPESTATUS[0]}
    [ "$rc" -eq 0 ] || [ "$rc" -eq 77 ] || fails=$((fails + 1))
fi

# shellcheck disable=SC2086
python3 - "$out" ${MP_STEP_TABLE_INPUTS:-} <<'EOF'
import json, sys
rows = []
for path in sys.argv[1:]:
    try:
        for line in open(path, errors="replace"):
            line = line.strip()
            if line.startswith("{") and '"model"' in line:
                try:
                    rows.append(json.loads(line))
                except ValueError:
                    pass
    except OSError:
        pass
if not rows:
    sys.exit(0)
ours = {r["precision"]: r for r in rows if r["impl"] == "millipede-cuda" and "step_ms" in r}
print(f"\n{'impl':<18}{'model':<7}{'precision':<10}{'ms/step':>10}{'tokens/s':>11}{'peak GiB':>10}"
      f"{'vs ours':>9}")
for r in sorted(rows, key=lambda r: (r.get("model", ""), r["impl"] != "millipede-cuda",
                                     r["impl"], r.get("precision", ""))):
    head = f"{r['impl']:<18}{r.get('model', ''):<7}{r.get('precision', ''):<10}"
    if "step_ms" not in r:
        print(head + "  " + str(r.get("error", r.get("skipped", "")))[:100])
        continue
    o = ours.get(r["precision"])
    ratio = f"{r['step_ms'] / o['step_ms']:.2f}x" if o else "-"
    peak = f"{r['peak_gib']:.2f}" if "peak_gib" in r else "-"
    print(f"{head}{r['step_ms']:>10.1f}{r['tokens_per_s']:>11.0f}{peak:>10}{ratio:>9}")
print("\n'vs ours': that row's ms per step over millipede's at the same precision (>1: ours is")
print("faster); on a dense row, what the PEER model costs against GPT-2 small's dense MLP is")
print("1 over it. millipede bf16 = system.precision bf16 (bf16 expert tables, dense GEMMs and")
print("attention on tensor cores, fp32 masters and routing); torch bf16 = autocast (bf16 matrix")
print("products, fp32 weights). millipede's peak: nvidia-smi's use of the process (CUDA context")
print("included); torch's: max_memory_allocated. millipede-profile: train.profile = true, the")
print("device synchronized at each phase boundary (so slower than the plain run).")
for r in rows:
    if "phase_ms" in r:
        ph = sorted(r["phase_ms"].items(), key=lambda kv: -kv[1])
        total = sum(v for _, v in ph)
        print(f"\nmillipede {r['precision']} step by phase (median ms of the timed steps, "
              f"synchronized; {total:.1f} ms in all):")
        for k, v in ph:
            print(f"  {k:<18}{v:>9.2f}{100 * v / total if total else 0:>7.1f} %")
    if "kernel_ms" in r:
        total = r["kernel_total_ms"]
        print(f"\nmillipede {r['precision']} step by kernel (the kernel timer: each kernel, GEMM, "
              f"copy, ... by device events,\nthe GPU's wait for the host before it included; "
              f"{total:.1f} ms in all; median of the timed steps; the longest 40):")
        print(f"  {'phase':<17}{'op':<36}{'site':<28}{'calls':>6}{'ms':>9}{'%':>7}")
        for k in r["kernel_ms"]:
            print(f"  {k['phase']:<17}{k['op'][:35]:<36}{k['site'][:27]:<28}{k['calls']:>6}"
                  f"{k['ms']:>9.2f}{100 * k['ms'] / total if total else 0:>7.1f}")
EOF
exit "$fails"
