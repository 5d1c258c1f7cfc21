#!/usr/bin/env bash
# The GPU check (issue 14): the one command to run first on a machine with a GPU, from the
# repository root (docs/cuda.md, "Running the GPU checks"):
#
#   bash tools/gpu_check.sh [OUTDIR]      # OUTDIR: default $OUT, else build-gpu/gpu-check
#
# Eight steps, ordered by what they tell, so that a run cut off early still answers the
# main questions. Each runs under its own time limit, none stops the ones after it, each
# writes one log OUTDIR/N-NAME.log (8 files in all) and prints one summary line here:
#   1 facts       GPU, driver, CUDA, cuBLAS, NCCL, SM count, clocks, container runtime  15 s
#   2 build       the GPU targets only, -lineinfo and ptxas -v (registers, spills)      80 s
#   3 unit        ctest unit.test_cuda_backend and unit.test_comm_nccl_gpu, then
#                 tests/cli/test_cuda_emu.sh with the real binary (training transports) 60 s
#   4 layer       one PEER layer, ours (with its value check) beside PyTorch eager, at
#                 d=1024 N=1024^2 and d=512 N=512^2, H=8 k=16 dk=128, 16384 tokens,
#                 bf16 and fp32 (tools/bench/run_gpu_bench.sh); then ours in bf16 with
#                 the router collapsed onto k experts (bench_peer_cuda --collapse)      75 s
#   5 step        one whole training step, GPT-2 small with a PEER layer in block 6:
#                 millipede fp32 and bf16 beside PyTorch eager, and PyTorch's all-dense
#                 model (tools/bench/bench_step.sh); then millipede bf16 once more with
#                 train.profile = true: the step's time by phase and by kernel         100 s
#   6 sanitizers  compute-sanitizer memcheck and racecheck over test_cuda_backend       70 s
#   7 ncu         per-kernel time and DRAM bytes of one bf16 iteration of the layer     40 s
#   8 compile     torch.compile: the layer, then the whole step, as far as time allows 25 s
# 465 s of limits in a 470 s budget (MP_GPU_BUDGET): a step may use what the steps before
# it left unused, never the time reserved for the steps after it, so the whole run stays
# under 8 minutes.
# Without a GPU, step 1 fails and the others skip at once. Where compute-sanitizer or ncu
# cannot attach (gVisor), their step says so in one line and is skipped, not failed.
# Exit status: the number of failed steps.
#
# Environment: MP_GPU_BUILD (build folder, default build-gpu), MP_GPU_CMAKE_ARGS (more
# cmake arguments), MP_GPU_BUDGET (seconds), MP_GPU_SANITIZERS (default "memcheck
# racecheck"), MP_GPU_FORCE=1 (run the steps after a failed step 1 anyway). Where a
# .device-deps/ folder is present (docs/cuda.md), step 2 unpacks it first.
# shellcheck disable=SC2317  # the step functions run through `bash -c step_NAME`
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build=${MP_GPU_BUILD:-$root/build-gpu}
outdir=${1:-${OUT:-$build/gpu-check}}
mkdir -p "$outdir" || exit 1
outdir=$(cd "$outdir" && pwd)
tmp=$(mktemp -d "${TMPDIR:-/tmp}/mp-gpu-check.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
export root build outdir tmp
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 PYTHONUNBUFFERED=1
budget=${MP_GPU_BUDGET:-470}
names=(facts build unit layer step sanitizers ncu compile)
caps=(15 80 60 75 100 70 40 25)
unit_tests="test_cuda_backend test_comm_nccl_gpu"   # ctest unit.NAME, built as target NAME
export unit_tests

# ---- the steps: each prints its log, ends with a "summary: ..." line, and exits 0 (ok),
# 77 (skipped, the reason on its last line) or anything else (failed)

step_facts() {
    local gpus rt kernel cuda_home f
    echo "date: $(date -u +%FT%TZ)  host: $(hostname)"
    kernel=$(uname -r)
    # gVisor reports kernel 4.4.0; the Firecracker VMs' kernels carry "-fc-" (KINDS.md)
    case $kernel in
        4.4.0) rt="gVisor (ncu and compute-sanitizer cannot attach there)" ;;
        *-fc-*) rt="Firecracker microVM" ;;
        *) if [ -f /.dockerenv ]; then rt="docker"; else rt="unknown"; fi ;;
    esac
    echo "container runtime: $rt; kernel $kernel"
    echo "cpus: $(nproc); $(grep -m1 'model name' /proc/cpuinfo | sed 's/.*: //'); memory: $(free -g | awk '/Mem:/ {print $2}') GiB"
    if ! command -v nvidia-smi >/dev/null; then
        echo "nvidia-smi: not found"
        echo "summary: no GPU: nvidia-smi not found; $rt"
        return 1
    fi
    nvidia-smi --query-gpu=index,name,driver_version,memory.total,compute_cap,clocks.sm,clocks.max.sm,clocks.mem,clocks.max.mem,power.limit,persistence_mode,pstate --format=csv 2>&1
    nvidia-smi 2>&1 | grep -m1 "CUDA Version" | sed 's/^[| ]*//'
    cuda_home=$(dirname "$(dirname "$(command -v nvcc 2>/dev/null || echo /usr/local/cuda/bin/nvcc)")")
    echo "nvcc: $("$cuda_home/bin/nvcc" --version 2>/dev/null | grep -m1 release)"
    grep -hE "#define CUBLAS_VER_(MAJOR|MINOR|PATCH) " "$cuda_home/include/cublas_api.h" 2>/dev/null |
        awk '{v = v (v ? "." : "") $3} END {print "cuBLAS (header): " (v ? v : "not found")}'
    grep -hE "#define NCCL_(MAJOR|MINOR|PATCH) " "$cuda_home/include/nccl.h" /usr/include/nccl.h 2>/dev/null |
        awk '{v = v (v ? "." : "") $3} END {print "NCCL (header): " (v ? v : "not found")}'
    for f in "$cuda_home"/lib*/libcublas.so.* "$cuda_home"/lib*/libnccl.so.*; do
        [ -e "$f" ] && echo "library: $f"
    done
    echo "mpirun: $(mpirun --version 2>/dev/null | head -1)"
    echo "compute-sanitizer: $(compute-sanitizer --version 2>/dev/null | tail -1)"
    echo "ncu: $(ncu --version 2>/dev/null | tail -1)"
    echo "cmake: $(cmake --version | head -1); ninja: $(ninja --version 2>/dev/null)"
    timeout 20 python3 -c '
import torch
p = torch.cuda.get_device_properties(0)
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}): {p.name}, {p.multi_processor_count} SMs, "
      f"L2 {p.L2_cache_size >> 20} MiB, {p.total_memory / 2**30:.1f} GiB, cc {p.major}.{p.minor}")
' 2>&1 | tail -1
    gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')
    if [ "${gpus:-0}" -eq 0 ]; then
        echo "summary: no GPU visible to nvidia-smi; $rt"
        return 1
    fi
    echo "summary: $(nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader | head -1), $gpus GPU(s), $(nvidia-smi | grep -m1 -o 'CUDA Version: [0-9.]*'); $rt"
}

step_build() {
    local t0=$SECONDS
    if [ -f "$root/.device-deps/setup.sh" ]; then
        bash "$root/.device-deps/setup.sh" || return 1
    fi
    # shellcheck disable=SC2086
    cmake -S "$root" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DMILLIPEDE_TESTS=ON \
        -DMILLIPEDE_CUDA_EMU=OFF -DMILLIPEDE_CUDA_LINEINFO=ON ${MP_GPU_CMAKE_ARGS:-} || return 1
    # shellcheck disable=SC2086
    cmake --build "$build" --target millipede millipede-testdump bench_peer_cuda $unit_tests 2>&1 |
        tee "$tmp/build.out"
    [ "${PIPESTATUS[0]}" -eq 0 ] || { echo "summary: the build failed"; return 1; }
    # ptxas -v: "Function properties for NAME" then "N bytes stack frame, S bytes spill
    # stores, L bytes spill loads" (ninja prints each command's output)
    python3 - "$tmp/build.out" "$((SECONDS - t0))" <<'EOF'
import re, subprocess, sys
lines = open(sys.argv[1], errors="replace").read().splitlines()
def demangle(name):   # c++filt where there is one, else the mangled name
    try:
        return subprocess.run(["c++filt", name], capture_output=True, text=True).stdout.strip() or name
    except OSError:
        return name
funcs, spills = 0, []
for i, l in enumerate(lines):
    m = re.search(r"Function properties for (\S+)", l)
    if m and i + 1 < len(lines):
        funcs += 1
        s = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", lines[i + 1])
        if s and (int(s.group(1)) or int(s.group(2))):
            spills.append(f"{demangle(m.group(1)).split('(')[0][:60]} "
                          f"({s.group(1)} B spill stores, {s.group(2)} B loads)")
print(f"summary: built in {sys.argv[2]} s; ptxas: {funcs} functions, {len(spills)} with spills"
      + (": " + ", ".join(spills[:4]) if spills else ""))
EOF
}

step_unit() {
    local regex rc=0 t
    regex="^unit\\.($(echo "$unit_tests" | tr ' ' '|'))\$"
    (cd "$build" && ctest -R "$regex" --output-on-failure --timeout 150) 2>&1 | tee "$tmp/ctest.out"
    [ "${PIPESTATUS[0]}" -eq 0 ] || rc=1
    # a GPU test that skips itself (77) means no usable GPU: here that is a failure
    ! grep -q "(Skipped)" "$tmp/ctest.out" || rc=1
    env MILLIPEDE="$build/millipede" MILLIPEDE_EMU="$build/millipede" \
        MP_TESTDUMP="$build/tests/millipede-testdump" MP_SOURCE_DIR="$root" MP_BUILD_DIR="$build" \
        MP_TEST_NCCL_RANKS=1 OMPI_MCA_rmaps_base_oversubscribe=1 \
        bash "$root/tests/cli/test_cuda_emu.sh" 2>&1 | tee "$tmp/transports.out"
    [ "${PIPESTATUS[0]}" -eq 0 ] || rc=1
    t=$(grep -E "^[0-9]+ passed, [0-9]+ failed" "$tmp/transports.out" | tail -1)
    echo "summary: ctest $(grep -oE '[0-9]+% tests passed(, [0-9]+ tests failed)? out of [0-9]+' "$tmp/ctest.out" | tail -1)$(grep -q '(Skipped)' "$tmp/ctest.out" && echo ' (some skipped: no usable GPU?)'); train transports (test_cuda_emu.sh): ${t:-did not finish}"
    return "$rc"
}

step_layer() {
    local ours=1 rc
    [ "$nobuild" = 1 ] && { ours=0; echo "the build failed (step 2): PyTorch's rows only"; }
    MP_BENCH_BUILD="$build" MP_BENCH_CUDA=$ours MP_BENCH_ITERS=10 MP_BENCH_TORCH_MODES=eager \
        MP_BENCH_JSONL="$tmp/layer.jsonl" bash "$root/tools/bench/run_gpu_bench.sh"
    rc=$?
    [ "$ours" = 1 ] || rc=1
    # the router collapsed onto k experts (131,072 records on each of 16 rows, 524,288 on
    # each of 4 sub-keys a half): the hot rows' and keys' segments, beside the uniform run
    if [ "$ours" = 1 ]; then
        echo "bench_peer_cuda --precision bf16 --iters 5 --warmup 1 --collapse"
        timeout -k 5 40 "$build/bench_peer_cuda" --precision bf16 --iters 5 --warmup 1 --collapse |
            tee -a "$tmp/layer.jsonl" || rc=1
    fi
    python3 - "$tmp/layer.jsonl" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
parts = []
for r in rows:
    if r["impl"] == "millipede-cuda" and "fwdbwd_ms" in r and not r.get("collapse"):
        t = next((t for t in rows if t["impl"] == "torch-eager" and t.get("d") == r["d"]
                  and t.get("precision") == r["precision"] and "fwdbwd_ms" in t), None)
        ratio = f", torch eager {t['fwdbwd_ms']:.1f} ms ({t['fwdbwd_ms'] / r['fwdbwd_ms']:.2f}x)" if t else ""
        parts.append(f"d={r['d']} {r['precision']}: ours {r['fwdbwd_ms']:.1f} ms f+b{ratio}")
u = next((r for r in rows if r["impl"] == "millipede-cuda" and r.get("d") == 1024
          and r.get("precision") == "bf16" and "fwdbwd_ms" in r and not r.get("collapse")), None)
c = next((r for r in rows if r.get("collapse") and "fwdbwd_ms" in r), None)
if c:
    vs = lambda key: f" ({c[key] / u[key]:.2f}x uniform's)" if u else ""
    # (the forward is not comparable: the collapsed run updates its balance biases)
    parts.append(f"collapsed router bf16: {c['fwdbwd_ms']:.1f} ms f+b, experts "
                 f"bwd {c['experts_bwd_ms']:.1f} ms{vs('experts_bwd_ms')}, route bwd "
                 f"{c['route_bwd_ms']:.1f} ms{vs('route_bwd_ms')}")
checks = [r["check"] for r in rows if "check" in r]
bad = [c for c in checks if c != "ok"]
why = [r.get("error", r.get("skipped")) for r in rows if "error" in r or "skipped" in r]
print("summary: " + ("; ".join(parts) or "no layer timed") + (f" ({why[0][:80]})" if why else "")
      + f"; value checks {len(checks) - len(bad)}/{len(checks)} ok" + (f" ({bad[0][:80]})" if bad else ""))
EOF
    return "$rc"
}

step_step() {
    [ "$nobuild" = 1 ] && echo "the build failed (step 2): no millipede binary"
    MP_STEP_BUILD="$build" MP_STEP_STEPS=5 MP_STEP_RUN_TIMEOUT=40 MP_STEP_TORCH_MODES=eager MP_STEP_PROFILE=1 \
        MP_STEP_TORCH_ARGS="--iters 4 --warmup 2" MP_STEP_JSONL="$tmp/step.jsonl" \
        bash "$root/tools/bench/bench_step.sh"
    local rc=$?
    python3 - "$tmp/step.jsonl" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
parts = [f"{r['impl'].replace('millipede-cuda', 'ours')} {r['model']} {r['precision']} "
         + (f"{r['step_ms']:.0f}" if "step_ms" in r else "error") for r in rows if "model" in r]
why = [f"{r['impl']}: {r.get('error', r.get('skipped'))}" for r in rows if "error" in r or "skipped" in r]
top = next((r["kernel_ms"][:3] for r in rows if r.get("kernel_ms")), [])
top = "; longest kernels: " + ", ".join(f"{k['phase']} {k['op'][:30]} {k['ms']:.1f}" for k in top) if top else ""
print("summary: ms/step: " + ("; ".join(parts) or "nothing ran") + top + (f" ({why[0][:100]})" if why else ""))
EOF
    return "$rc"
}

step_sanitizers() {
    local tool rc=0 parts=""
    if ! command -v compute-sanitizer >/dev/null; then
        echo "skip: compute-sanitizer not found"
        return 77
    fi
    for tool in ${MP_GPU_SANITIZERS:-memcheck racecheck}; do
        echo "--- compute-sanitizer --tool $tool tests/test_cuda_backend"
        compute-sanitizer --tool "$tool" --error-exitcode 1 "$build/tests/test_cuda_backend" \
            >"$tmp/san.out" 2>&1
        local r=$?
        cat "$tmp/san.out"
        # gVisor: the tool cannot attach ("Device not supported", "LibraryNotLoaded")
        if grep -qE "Device not supported|LibraryNotLoaded" "$tmp/san.out"; then
            echo "skip: compute-sanitizer cannot attach on this machine ($(grep -m1 -oE 'Device not supported|LibraryNotLoaded' "$tmp/san.out")): not run, not passed"
            return 77
        fi
        [ "$r" -eq 0 ] || rc=1
        parts+="$tool: $(grep -m1 -E '(ERROR|RACECHECK) SUMMARY' "$tmp/san.out" | sed 's/^=* *//') (exit $r); "
    done
    echo "summary: ${parts%; }"
    return "$rc"
}

step_ncu() {
    if ! command -v ncu >/dev/null; then
        echo "skip: ncu not found"
        return 77
    fi
    # one bf16 iteration (--warmup 0 --iters 1) and its set-up; the clocks left alone
    ncu --clock-control none --csv --page raw --print-units base \
        --metrics gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum \
        "$build/bench_peer_cuda" --iters 1 --warmup 0 --precision bf16 --no-check \
        >"$tmp/ncu.csv" 2>"$tmp/ncu.err"
    local r=$?
    cat "$tmp/ncu.err"
    if grep -qiE "LibraryNotLoaded|ERR_NVGPUCTRPERM|not supported|Failed to initialize" "$tmp/ncu.err" "$tmp/ncu.csv"; then
        echo "skip: ncu cannot read the counters on this machine ($(grep -m1 -ioE 'LibraryNotLoaded|ERR_NVGPUCTRPERM|not supported|Failed to initialize[^.]*' "$tmp/ncu.err" "$tmp/ncu.csv" | head -1 | sed 's/.*://')): not run, not passed"
        return 77
    fi
    grep -v '^"' "$tmp/ncu.csv"   # the benchmark's own line and ncu's ==PROF== lines
    python3 - "$tmp/ncu.csv" <<'EOF' || r=1
import csv, sys
lines = [l for l in open(sys.argv[1], errors="replace") if l.startswith('"')]
rows = list(csv.reader(lines))
if len(rows) < 3:
    print("summary: ncu profiled no kernel")
    sys.exit(1)
head, data = rows[0], rows[2:]   # rows[1]: the units
col = {name: head.index(name) for name in ("Kernel Name", "gpu__time_duration.sum",
                                           "dram__bytes_read.sum", "dram__bytes_write.sum")}
def num(s):
    return float(s.replace(",", "")) if s.strip() else 0.0
agg = {}
for r in data:
    a = agg.setdefault(r[col["Kernel Name"]], [0, 0.0, 0.0, 0.0])
    a[0] += 1
    a[1] += num(r[col["gpu__time_duration.sum"]]) * 1e-3      # ns -> us
    a[2] += num(r[col["dram__bytes_read.sum"]])
    a[3] += num(r[col["dram__bytes_write.sum"]])
print(f"\n{'kernel':<60}{'launches':>9}{'us':>11}{'GB read':>9}{'GB written':>11}{'TB/s':>7}")
total = 0.0
for name, (n, us, rd, wr) in sorted(agg.items(), key=lambda kv: -kv[1][1]):
    total += us
    tbps = (rd + wr) / (us * 1e-6) / 1e12 if us else 0.0
    short = name[5:] if name.startswith("void ") else name   # template arguments kept,
    short = short.split("(")[0][:59]                          # the parameter list not
    print(f"{short:<60}{n:>9}{us:>11.1f}{rd / 1e9:>9.3f}{wr / 1e9:>11.3f}{tbps:>7.2f}")
top = sorted(agg.items(), key=lambda kv: -kv[1][1])[:3]
print("summary: " + f"{len(data)} kernels, {total / 1e3:.1f} ms in all (the set-up's to_bf16 included); top: "
      + ", ".join(f"{k.replace('void ', '', 1).split('(')[0][:40]} {v[1] / 1e3:.2f} ms" for k, v in top))
EOF
    return "$r"
}

step_compile() {
    local rc=0 r why
    why=$(python3 -c 'import torch; print("" if torch.cuda.is_available() else "PyTorch sees no GPU")' 2>&1 | tail -1)
    if [ -n "$why" ]; then
        echo "skip: torch.compile not run: ${why:0:150}"
        return 77
    fi
    # the most telling first: the layer in bf16 at the paper's shape, then the whole step
    # in bf16, then the rest, each as far as the time allows
    run_layer() {   # run_layer SHAPE DTYPE
        MP_BENCH_CUDA=0 MP_BENCH_SHAPES=$1 MP_BENCH_TORCH_DTYPES=$2 MP_BENCH_TORCH_MODES=compile \
            MP_BENCH_ITERS=10 MP_BENCH_JSONL="$tmp/compile-layer.jsonl" \
            MP_BENCH_TABLE_INPUTS="$outdir/4-layer.log $tmp/compile-layers.jsonl" \
            bash "$root/tools/bench/run_gpu_bench.sh"
        r=$?
        cat "$tmp/compile-layer.jsonl" >>"$tmp/compile-layers.jsonl"
        return "$r"
    }
    run_step() {    # run_step MODEL PRECISION
        MP_STEP_MILLIPEDE="" MP_STEP_TORCH_MODES=compile \
            MP_STEP_TORCH_ARGS="--model $1 --precision $2 --iters 4 --warmup 2" \
            MP_STEP_JSONL="$tmp/compile-step.jsonl" \
            MP_STEP_TABLE_INPUTS="$outdir/5-step.log $tmp/compile-steps.jsonl" \
            bash "$root/tools/bench/bench_step.sh"
        r=$?
        cat "$tmp/compile-step.jsonl" >>"$tmp/compile-steps.jsonl"
        return "$r"
    }
    : >"$tmp/compile-layers.jsonl"
    : >"$tmp/compile-steps.jsonl"
    run_layer 1024:1024 bf16 || rc=1
    run_step peer bf16 || rc=1
    run_layer 1024:1024 fp32 || rc=1
    run_step dense bf16 || rc=1
    run_layer 512:512 bf16,fp32 || rc=1
    run_step peer fp32 || rc=1
    run_step dense fp32 || rc=1
    echo "summary: all variants done"
    return "$rc"
}

# ---- the driver

export -f step_facts step_build step_unit step_layer step_step step_sanitizers step_ncu step_compile
start=$SECONDS
fails=0 skips=0 nogpu=0 nobuild=0
export nobuild
for i in "${!names[@]}"; do
    name=${names[$i]}
    log="$outdir/$((i + 1))-$name.log"
    reserve=0
    for ((j = i + 1; j < ${#caps[@]}; j++)); do reserve=$((reserve + caps[j])); done
    limit=$((budget - (SECONDS - start) - reserve))
    reason=""
    if [ "$nogpu" = 1 ] && [ "${MP_GPU_FORCE:-0}" != 1 ]; then
        reason="no GPU visible (step 1; MP_GPU_FORCE=1 runs it anyway)"
    elif [ "$nobuild" = 1 ] && [[ $name =~ ^(unit|sanitizers|ncu)$ ]]; then
        reason="the build failed (step 2)"
    elif [ "$limit" -lt 5 ]; then
        reason="no time left of the ${budget} s budget"
    fi
    t0=$SECONDS
    if [ -n "$reason" ]; then
        echo "skip: $reason" >"$log"
        rc=77
    else
        timeout -k 5 "$limit" bash -c "step_$name" >"$log" 2>&1
        rc=$?
    fi
    took=$((SECONDS - t0))
    summary=$(grep -E "^summary: " "$log" | tail -1 | sed 's/^summary: //')
    case $rc in
        0) state="ok" ;;
        77) state="skipped"; skips=$((skips + 1))
            summary=$(grep -E "^skip: " "$log" | tail -1 | sed 's/^skip: //') ;;
        124|137) state="FAILED (timed out after $limit s)"; fails=$((fails + 1)) ;;
        *) state="FAILED (exit $rc)"; fails=$((fails + 1)) ;;
    esac
    if [ -z "$summary" ]; then summary=$(grep -v '^\s*$' "$log" | tail -1 | cut -c1-200); fi
    echo "gpu-check $((i + 1))/8 $name: $state, $took s (limit $limit s): $summary"
    [ "$name" = facts ] && [ "$rc" -ne 0 ] && nogpu=1
    [ "$name" = build ] && [ "$rc" -ne 0 ] && nobuild=1
done
echo "gpu-check: $fails step(s) failed, $skips skipped, $((SECONDS - start)) s; logs in $outdir"
exit "$fails"
