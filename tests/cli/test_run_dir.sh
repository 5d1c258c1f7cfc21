#!/usr/bin/env bash
# What keeps a run directory whole across jobs:
#  - one writer: a second job in the same run.dir fails at once, naming the holder (host,
#    pid, Slurm job); the lock goes with the process, also after kill -9
#  - a requeued Slurm job (SLURM_RESTART_COUNT > 0) continues from `latest` whatever its
#    first start's --no-resume / --resume said, once the run has a checkpoint
#  - metrics.jsonl is cut back to the checkpoint on resume line by line, however long a
#    line is
source "$(dirname "$0")/ckpt_lib.sh"

long=(--set train.steps=100000 --set train.eval_every=0 --set train.log_every=100000
      --set checkpoint.every=0)

# --- the lock ---
L="$tmp/locked"
"$MILLIPEDE" train "$cfg" "${small[@]}" --set "run.dir=$L" "${long[@]}" > "$L.first.out" 2>&1 &
first=$!
if wait_for_steps "$L" "$first"; then
    for P in 1 2; do
        rc=0
        t0=$(date +%s)
        launch=()
        [ "$P" -gt 1 ] && launch=(mpirun -n "$P")
        timeout -k 5 60 "${launch[@]}" "$MILLIPEDE" train "$cfg" "${small[@]}" --set "run.dir=$L" \
            > "$L.out" 2>&1 || rc=$?
        dt=$(( $(date +%s) - t0 ))
        check "second job on $P rank(s): status 2 in ${dt} s (124 = hang)" test "$rc" -eq 2 -a "$dt" -lt 30
        check "second job on $P rank(s): one error line naming the holder (host, pid $first)" \
            test "$(grep -c '^millipede: error:' "$L.out")" -eq 1 -a \
            -n "$(grep "^millipede: error: \(rank 0: \)\?run.dir $L is in use by another job (host $(hostname), pid $first, Slurm job none, since 20[0-9-]*T[0-9:]*Z; $L/lock)" "$L.out")"
    done
    check "the first job runs on" kill -0 "$first"
    kill -TERM "$first"
    rc=0; wait "$first" || rc=$?
    check "the first job checkpoints and stops on SIGTERM (status $rc)" test "$rc" -eq 75
    train 1 "$L" --set train.steps=$(( $(latest_step "$L") + 1 )) &&
        ok "after it ended, the run directory is free" || bad "after the first job: $(tail -2 "$L.out")"
else
    bad "first job did not start: $(tail -3 "$L.first.out")"
    kill "$first" 2>/dev/null
fi
# kill -9 leaves no stale lock behind
"$MILLIPEDE" train "$cfg" "${small[@]}" --set "run.dir=$L" "${long[@]}" > "$L.first.out" 2>&1 &
first=$!
if wait_for_steps "$L" "$first"; then
    kill -9 "$first"
    wait "$first" 2>/dev/null
    train 1 "$L" --set train.steps=$(( $(latest_step "$L") + 1 )) &&
        ok "after kill -9 of the holder, the run directory is free" ||
        bad "after kill -9: $(tail -2 "$L.out")"
else
    bad "job to kill did not start: $(tail -3 "$L.first.out")"
    kill "$first" 2>/dev/null
fi

# --- requeue ---
R="$tmp/requeue"
train 1 "$R" --no-resume --set train.steps=4 --set checkpoint.every=2 ||
    bad "first start: $(tail -3 "$R.out")"
SLURM_RESTART_COUNT=1 SLURM_JOB_ID=42 train 1 "$R" --no-resume --set train.steps=6 --set checkpoint.every=2 ||
    bad "restart with --no-resume (status $?): $(tail -3 "$R.out")"
check "restart, --no-resume: warns that it is ignored" \
    grep -q "^millipede: warning: train: restart 1 of Slurm job 42: ignoring --no-resume and resuming from the newest checkpoint in $R " "$R.out"
check "restart, --no-resume: resumes from step 4" grep -q "^resumed from $R/checkpoints/step_00000004: 4 steps done" "$R.out"
check "restart, --no-resume: the checkpoints of the first start are kept" test -d "$R/checkpoints/step_00000004"
SLURM_RESTART_COUNT=2 SLURM_JOB_ID=42 train 1 "$R" --resume "$R/checkpoints/step_00000002" \
    --set train.steps=8 --set checkpoint.every=2 || bad "restart with --resume (status $?): $(tail -3 "$R.out")"
check "restart, --resume OLD: resumes from latest (step 6), not from step 2" \
    grep -q "^resumed from $R/checkpoints/step_00000006: 6 steps done" "$R.out"
python3 - "$R/metrics.jsonl" <<'EOF' && ok "restart: steps 1-8 logged once each" || bad "restart: metrics.jsonl"
import json, sys
steps = [json.loads(l)["step"] for l in open(sys.argv[1]) if "loss" in json.loads(l)]
assert steps == list(range(1, 9)), steps
EOF
F="$tmp/fresh"
SLURM_RESTART_COUNT=1 SLURM_JOB_ID=43 train 1 "$F" --no-resume --set train.steps=2 ||
    bad "restart without checkpoints: $(tail -3 "$F.out")"
check "restart before any checkpoint: --no-resume keeps its meaning, no warning" \
    test -z "$(grep -e "warning: train: restart" -e "^resumed from" "$F.out")"

# --- metrics.jsonl with a line longer than any fixed buffer ---
M="$tmp/metrics"
train 1 "$M" --set train.steps=4 --set checkpoint.every=2 || bad "metrics run: $(tail -3 "$M.out")"
python3 - "$M/metrics.jsonl" <<'EOF'
import json, sys
lines = [json.loads(l) for l in open(sys.argv[1])]
for x in lines:
    if x["step"] == 2 and "loss" in x:
        x["pad"] = "x" * 20000          # a 20 kB line, as thousands of ranks would write
lines.append({"step": 5, "loss": 1.0})  # logged after the last checkpoint by a crashed run
with open(sys.argv[1], "w") as f:
    f.writelines(json.dumps(x) + "\n" for x in lines)
EOF
rm -rf "$M/checkpoints/step_00000004"
ln -sfn step_00000002 "$M/checkpoints/latest"
train 1 "$M" --set train.steps=4 --set checkpoint.every=2 || bad "metrics resume: $(tail -3 "$M.out")"
python3 - "$M/metrics.jsonl" <<'EOF' && ok "metrics.jsonl: JSON lines, the 20 kB line kept whole, steps 3-4 logged once" || bad "metrics.jsonl after resume"
import json, sys
lines = [json.loads(l) for l in open(sys.argv[1])]   # every line must parse
steps = [x["step"] for x in lines if "loss" in x]
assert steps == [1, 2, 3, 4], steps
assert [len(x.get("pad", "")) for x in lines if x["step"] == 2 and "loss" in x] == [20000]
EOF

finish
