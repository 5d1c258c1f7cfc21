#!/usr/bin/env bash
# Preemption: SIGUSR1 or SIGTERM makes every rank stop at the same step boundary (an
# all-reduce of the flag), write a checkpoint and exit with status 75 ("checkpointed,
# please requeue"); the restart continues bitwise as if never interrupted.
#  - one rank only gets the signal (MILLIPEDE_FAULT_SIGNAL raises it in rank 1 after step 7)
#  - SIGUSR1 sent to mpirun, which forwards it to every rank, at a moment chosen by the clock
#  - SIGTERM sent to a single-process run
#  - a signal during start-up, before MPI_Init
source "$(dirname "$0")/ckpt_lib.sh"

# the reference: 20 uninterrupted steps on 2 ranks, only the final checkpoint
ref="$tmp/ref"
train 2 "$ref" --set checkpoint.every=0 || bad "reference run (status $?): $(tail -3 "$ref.out")"

# --- one rank sees the signal ---
s="$tmp/one"
rc=0
MILLIPEDE_FAULT_SIGNAL=1:7 train 2 "$s" --set checkpoint.every=0 || rc=$?
check "signal in rank 1: exit status 75 (got $rc)" test "$rc" -eq 75
check "both ranks stopped after step 7 with a checkpoint" \
    test "$(latest_step "$s")" = 7 -a "$(ls "$s/checkpoints/step_00000007" | grep -c '^shard_')" = 2
check "the log says why" grep -q "stopping after step 7 on a signal: checkpointed, exit status 75" "$s.out"
check "metrics.jsonl ends at step 7" test "$(tail -1 "$s/metrics.jsonl" | head -c 11)" = '{"step": 7,'
train 2 "$s" --set checkpoint.every=0 || bad "restart (status $?): $(tail -3 "$s.out")"
check "restart resumes from step 7" grep -q "resumed from $s/checkpoints/step_00000007: 7 steps done" "$s.out"
compare_losses "$ref" "$s" 1 20 && ok "restart: steps 1-20 bitwise as uninterrupted" || bad "restart: losses"
compare_ckpt "$ref/checkpoints/step_00000020" "$s/checkpoints/step_00000020" exact &&
    ok "restart: bitwise identical final state" || bad "restart: final state"

# --- a signal during start-up, before MPI_Init: every process raises SIGUSR1 on itself
# right after main() installed the handler (MILLIPEDE_FAULT_SIGNAL=-1:-1). Not lost, not
# fatal: the ranks stop after the first step with a checkpoint. (With the handler installed
# later, as it once was, SIGUSR1's default action killed the process.)
e="$tmp/early"
rc=0
MILLIPEDE_FAULT_SIGNAL=-1:-1 train 2 "$e" || rc=$?
check "signal before MPI_Init: exit status 75 (got $rc)" test "$rc" -eq 75
check "signal before MPI_Init: checkpoint after step 1" test "$(latest_step "$e")" = 1

# --- a real SIGUSR1 to mpirun (as a Slurm batch script's trap sends it) ---
# Long enough (4000 steps, a few seconds) to be signalled in the middle.
long=(--set train.steps=4000 --set train.eval_every=0 --set train.log_every=1000 --set checkpoint.every=0)
u="$tmp/usr1"
mpirun -n 2 "$MILLIPEDE" train "$cfg" "${small[@]}" --set "run.dir=$u" "${long[@]}" > "$u.out" 2>&1 &
pid=$!
if wait_for_steps "$u" "$pid"; then
    kill -USR1 "$pid"
    rc=0
    wait "$pid" || rc=$?
    check "SIGUSR1 to mpirun: exit status 75 (got $rc)" test "$rc" -eq 75
    step=$(latest_step "$u")
    check "a checkpoint at the step it stopped ($step)" test -n "$step" -a "${step:-0}" -gt 0 -a "${step:-0}" -lt 4000
    "$MILLIPEDE" ckpt verify "$u" > /dev/null 2>&1 && ok "it verifies" || bad "it verifies"
    # the restart only has to get going: bitwise continuation is the test above
    train 2 "$u" "${long[@]}" --set train.steps=$((step + 3)) ||
        bad "restart after SIGUSR1 (status $?): $(tail -3 "$u.out")"
    check "restart resumes from step $step" grep -q "resumed from $u/checkpoints/step_$(printf %08d "$step")" "$u.out"
else
    kill "$pid" 2>/dev/null
    wait "$pid"
    bad "SIGUSR1 run did not start: $(tail -3 "$u.out")"
fi

# --- SIGTERM to a single process ---
t="$tmp/term"
"$MILLIPEDE" train "$cfg" "${small[@]}" --set "run.dir=$t" "${long[@]}" > "$t.out" 2>&1 &
pid=$!
if wait_for_steps "$t" "$pid"; then
    kill -TERM "$pid"
    rc=0
    wait "$pid" || rc=$?
    check "SIGTERM: exit status 75 (got $rc)" test "$rc" -eq 75
    step=$(latest_step "$t")
    check "SIGTERM: checkpoint at step ${step:-none}" test -n "$step" -a -f "$t/checkpoints/step_$(printf %08d "${step:-0}")/index.h5"
else
    kill "$pid" 2>/dev/null
    wait "$pid"
    bad "SIGTERM run did not start: $(tail -3 "$t.out")"
fi

finish
