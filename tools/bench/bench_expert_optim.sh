#!/usr/bin/env bash
# train.expert_optimizer = adamw against lazy_adamw, side by side (docs/benchmarks.md,
# "Lazy AdamW of the expert tables"):
#   1. configs/peer-1m.ini, STEPS steps each: the median step time after WARM warm-up steps
#      (metrics.jsonl "ms") and the peak RSS (/usr/bin/time -v), and their ratio;
#   2. configs/tiny.ini, TINY_STEPS steps each with system.threads = 1 (both runs at once,
#      one core each): the validation loss at the end (0 skips this part).
# usage: tools/bench/bench_expert_optim.sh [BUILD_DIR] [STEPS] [TINY_STEPS]
# Run from the repository root; data/demo must exist (README: millipede data prepare).
set -euo pipefail
BUILD=${1:-build-lazy}
STEPS=${2:-30}
TINY_STEPS=${3:-1000}
WARM=5
BIN=$BUILD/millipede
[[ -x $BIN ]] || { echo "bench_expert_optim: no $BIN (build first)" >&2; exit 1; }
[[ -f data/demo/train.bin ]] || { echo "bench_expert_optim: no data/demo (millipede data prepare)" >&2; exit 1; }
WORK=$(mktemp -d "${TMPDIR:-/tmp}/bench_expert_optim.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

# median of the "ms" of steps > WARM in a metrics.jsonl
median_ms() {
    python3 - "$1" "$WARM" <<'EOF'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
ms = [r["ms"] for r in rows if "ms" in r and r["step"] > int(sys.argv[2])]
print(f"{statistics.median(ms):.1f}")
EOF
}

final_val() {
    python3 -c 'import json,sys; print([json.loads(l) for l in open(sys.argv[1]) if "val_loss" in l][-1]["val_loss"])' "$1"
}

echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(free -g | awk '/Mem:/{print $2}') GiB; $(. /etc/os-release && echo "$PRETTY_NAME")"
echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo none) (+ working tree)"
declare -A MED RSS
for opt in adamw lazy_adamw; do
    dir=$WORK/peer1m-$opt
    # checkpoint.every = 0 still writes one at the end (after the timed steps); it is deleted
    /usr/bin/time -v "$BIN" train configs/peer-1m.ini --no-resume --set "run.dir=$dir" \
        --set "train.steps=$STEPS" --set train.eval_every=0 --set train.eval_batches=1 \
        --set checkpoint.every=0 --set checkpoint.keep=1 \
        --set "train.expert_optimizer=$opt" > "$WORK/$opt.log" 2> "$WORK/$opt.time"
    MED[$opt]=$(median_ms "$dir/metrics.jsonl")
    RSS[$opt]=$(awk -F: '/Maximum resident set size/{printf "%.2f", $2 / 1048576}' "$WORK/$opt.time")
    rm -rf "$dir/checkpoints"
    echo "peer-1m $opt: median step ${MED[$opt]} ms (steps $((WARM + 1))..$STEPS), peak RSS ${RSS[$opt]} GiB"
done
python3 -c "import sys; a, l = map(float, sys.argv[1:]); print(f'peer-1m step time adamw / lazy_adamw = {a / l:.2f}x')" \
    "${MED[adamw]}" "${MED[lazy_adamw]}"

if (( TINY_STEPS > 0 )); then
    for opt in adamw lazy_adamw; do
        "$BIN" train configs/tiny.ini --no-resume --set "run.dir=$WORK/tiny-$opt" \
            --set "train.steps=$TINY_STEPS" --set system.threads=1 \
            --set "train.eval_every=$TINY_STEPS" --set checkpoint.every=0 \
            --set "train.expert_optimizer=$opt" > "$WORK/tiny-$opt.log" 2>&1 &
    done
    wait
    for opt in adamw lazy_adamw; do
        echo "tiny $opt: val loss after $TINY_STEPS steps $(final_val "$WORK/tiny-$opt/metrics.jsonl")"
    done
fi
