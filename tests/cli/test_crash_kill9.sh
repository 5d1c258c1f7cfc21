#!/usr/bin/env bash
# Crash test (ctest label "crash": not in the default suite; .ci/run runs it after it).
# MP_CRASH_TRIALS (default 20) times: a run on 2 or 3 ranks that checkpoints every 1 or 2
# steps gets `kill -9` on one random rank at a random moment; a third of the trials aim at
# the middle of a checkpoint write (they wait for a step_*.tmp directory and kill then),
# the others at a random moment after a random step (0: while starting).
# After each kill:
#  - the job ends by itself (mpirun exits once it sees a rank die; 60 s catch a hang);
#  - `millipede ckpt verify` passes on what checkpoints/latest names;
#  - every step_%08d directory verifies too: a directory gets that name only by the rename
#    that commits it, after all its files are fsynced, and loses it by a rename before its
#    files go; the restart says "resumed from" the newest of them (which `latest` may lag
#    by one commit): no committed work is lost;
#    with no checkpoint yet, the restart starts from scratch;
#  - the restarted run finishes, with the losses of every step and the final checkpoint
#    bitwise those of an uninterrupted run on the same rank count.
# Random choices come from MP_CRASH_SEED (printed; default: the clock). Replaying a seed
# repeats the choices (ranks, rank counts, delays, the step after which to aim at a write);
# where a delay lands depends on the machine's speed.
source "$(dirname "$0")/ckpt_lib.sh"

seed=${MP_CRASH_SEED:-$(date +%s)}
trials=${MP_CRASH_TRIALS:-20}
echo "crash test: $trials trials, MP_CRASH_SEED=$seed (set it to replay the choices)"
RANDOM=$seed
steps=20
run_args=(--set train.steps=$steps --set checkpoint.keep=2)

# A sleep without a fork (read with a timeout on a FIFO nobody writes to): the poll for a
# step_*.tmp directory runs every millisecond, and a checkpoint write of this model takes
# ~50 ms (mostly fsync), so the poll sees most writes.
mkfifo "$tmp/never"
exec {never}<> "$tmp/never"
nap() { read -r -t "$1" -u "$never" || true; }

now() { date +%s.%N; }
secs() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", b - a }'; }
t_start=$(now)

# The uninterrupted references, one per rank count and checkpoint interval, and their
# duration from launch to exit, which sets the scale of the random delays.
declare -A ref_s
for P in 2 3; do
    for every in 1 2; do
        r="$tmp/ref${P}_$every"
        t0=$(now)
        train $P "$r" "${run_args[@]}" --set checkpoint.every=$every ||
            { bad "reference run on $P ranks (status $?): $(tail -3 "$r.out")"; finish; exit 1; }
        ref_s[$P,$every]=$(secs "$t0" "$(now)")
        echo "reference on $P ranks, checkpoint.every=$every: $steps steps in ${ref_s[$P,$every]} s"
    done
done

# What a kill between a commit's rename and the move of `latest` leaves, made on purpose
# (the trials land there rarely): `latest` one behind the newest checkpoint. The restart
# must take the newest (here the final one: nothing left to do).
lag="$tmp/lag"
cp -r "$tmp/ref2_1" "$lag"
ln -sfn "$(printf step_%08d $((steps - 1)))" "$lag/checkpoints/latest"
train 2 "$lag" "${run_args[@]}" --set checkpoint.every=1 || bad "restart with latest behind (status $?)"
check "latest one behind the newest checkpoint: the restart resumes from the newest" \
    grep -q "resumed from $lag/checkpoints/$(printf step_%08d $steps): " "$lag.out"

# children PID: the processes whose parent is PID, from /proc (no procps needed)
children() {
    local parent=$1 f line
    for f in /proc/[0-9]*/stat; do
        read -r line 2>/dev/null < "$f" || continue
        set -- ${line##*) }   # the fields after "pid (comm) ": state ppid ...
        [ "$2" = "$parent" ] && { f=${f#/proc/}; echo "${f%/stat}"; }
    done
    return 0
}
# pid of rank R of the job whose mpirun is MPID ("" until it has started)
rank_pid() {
    local c r
    for c in $(children "$1"); do
        r=$(tr '\0' '\n' < "/proc/$c/environ" 2>/dev/null | sed -n 's/^OMPI_COMM_WORLD_RANK=//p')
        [ "$r" = "$2" ] && { echo "$c"; return 0; }
    done
    return 1
}
# training steps in RUN_DIR/metrics.jsonl (validation lines have no "loss")
steps_done() { local n; n=$(grep -sc '"loss"' "$1/metrics.jsonl"); echo "${n:-0}"; }
# writing=(the checkpoints being written in RUN_DIR), without a fork, so that it can be
# looked at right after a kill (not step_%08d.gone.tmp: a checkpoint being removed)
shopt -s nullglob
in_write_now() { writing=("$1"/checkpoints/step_[0-9][0-9][0-9][0-9][0-9][0-9][0-9][0-9].tmp); }
# the newest step_%08d directory, or "" (names with a suffix are not checkpoints)
newest_complete() {
    compgen -G "$1/checkpoints/step_[0-9][0-9][0-9][0-9][0-9][0-9][0-9][0-9]" | sort | tail -1
}

in_write=0 in_commit=0 landed=0 worst_end=0
declare -A spent   # seconds per phase, over all trials
add() { spent[$1]=$(awk -v a="${spent[$1]:-0}" -v b="$2" -v c="$3" 'BEGIN { print a + c - b }'); }
for trial in $(seq 1 "$trials"); do
    P=$((2 + RANDOM % 2)) every=$((1 + RANDOM % 2)) rank=$((RANDOM % P))
    if [ $((trial % 3)) -eq 0 ]; then
        aim=write after=$((1 + RANDOM % (steps - 4)))   # aim at the write after step >= after
    else
        # a random moment of step after + 1 or so: the reference's time per step (startup
        # included) is the scale; relative to the run's progress, so the machine's speed
        # on the day cannot push the kill past the end of the run
        aim=time after=$((RANDOM % steps))
        delay=$(awk -v r=$RANDOM -v T="${ref_s[$P,$every]}" -v n=$steps 'BEGIN { printf "%.3f", r / 32768 * 1.5 * T / n }')
    fi
    d="$tmp/t$trial"
    name="trial $trial (P=$P every=$every kill rank $rank, $aim $([ $aim = write ] && echo "after step $after" || echo "${delay} s after step $after"))"
    mpirun -n "$P" "$MILLIPEDE" train "$cfg" "${small[@]}" --set "run.dir=$d" "${run_args[@]}" \
        --set checkpoint.every=$every > "$d.out" 2>&1 &
    mpid=$!
    t0=$(now)
    victim=""
    for _ in $(seq 1 3000); do   # up to ~30 s for the ranks to start
        victim=$(rank_pid "$mpid" "$rank") && break
        kill -0 "$mpid" 2>/dev/null || break
        nap 0.01
    done
    if [ -z "$victim" ]; then
        kill -9 "$mpid" 2>/dev/null; wait "$mpid"
        bad "$name: rank $rank never started: $(tail -3 "$d.out")"
        continue
    fi
    if [ $aim = write ]; then
        while kill -0 "$victim" 2>/dev/null; do
            in_write_now "$d"
            [ ${#writing[@]} -gt 0 ] && [ "$(steps_done "$d")" -ge "$after" ] && break
            nap 0.001
        done
    else
        while kill -0 "$victim" 2>/dev/null && [ "$(steps_done "$d")" -lt "$after" ]; do nap 0.005; done
        nap "$delay"
    fi
    kill -9 "$victim" 2>/dev/null && killed=1 || killed=0
    in_write_now "$d"
    at_kill=${writing[*]##*/}
    t_kill=$(now)
    # the job must end by itself
    for _ in $(seq 1 6000); do kill -0 "$mpid" 2>/dev/null || break; nap 0.01; done
    if kill -0 "$mpid" 2>/dev/null; then
        bad "$name: the job still runs 60 s after the kill (a hang): $(tail -3 "$d.out")"
        for c in $(children "$mpid"); do kill -9 "$c"; done
        kill -9 "$mpid"; wait "$mpid"
        continue
    fi
    rc=0
    wait "$mpid" || rc=$?
    end_s=$(secs "$t_kill" "$(now)")
    worst_end=$(awk -v a="$worst_end" -v b="$end_s" 'BEGIN { print (b > a ? b : a) }')
    if [ $killed = 0 ]; then   # the run had finished: no kill landed (rare; not counted)
        echo "     $name: the run ended before the kill (status $rc)"
        continue
    fi
    landed=$((landed + 1))
    [ -n "$at_kill" ] && in_write=$((in_write + 1))
    latest=$(readlink "$d/checkpoints/latest" 2>/dev/null)
    newest=$(newest_complete "$d")
    # killed between the commit's rename and the move of `latest` (rank 0 only)
    [[ -n "$newest" && "$(basename "$newest")" > "$latest" ]] && in_commit=$((in_commit + 1))
    echo "     $name: killed after $(steps_done "$d") steps," \
         "in a write: ${at_kill:-no}; job ended in $end_s s (status $rc); latest -> ${latest:-none}," \
         "newest complete: $(basename "${newest:-none}")"

    t1=$(now)
    add "until the kill" "$t0" "$t_kill"
    add "job end" "$t_kill" "$t1"
    fail=""
    if [ -n "$latest" ]; then
        "$MILLIPEDE" ckpt verify "$d/checkpoints/latest" > "$d.verify" 2>&1 ||
            fail+="; ckpt verify of latest -> $latest fails: $(grep -m1 error "$d.verify")"
    fi
    # every step_%08d directory: the newest is the one to resume from, the older ones are
    # where resuming falls back to (a pruning cut short must not leave half of one)
    for c in $(compgen -G "$d/checkpoints/step_[0-9][0-9][0-9][0-9][0-9][0-9][0-9][0-9]"); do
        [ "$(basename "$c")" = "$latest" ] && continue
        "$MILLIPEDE" ckpt verify "$c" > "$d.verify2" 2>&1 ||
            fail+="; ckpt verify of $(basename "$c") fails: $(grep -m1 error "$d.verify2")"
    done
    t2=$(now)
    add verify "$t1" "$t2"
    rc=0
    train "$P" "$d" "${run_args[@]}" --set checkpoint.every=$every || rc=$?
    t3=$(now)
    add restart "$t2" "$t3"
    [ $rc -eq 0 ] || fail+="; restart: status $rc: $(tail -2 "$d.out" | tr '\n' ' ')"
    if [ -n "$newest" ]; then
        grep -q "resumed from $newest: " "$d.out" ||
            fail+="; restart did not resume from $(basename "$newest"): $(grep -m1 -o 'resumed from [^:]*' "$d.out" || echo 'no resume')"
    else
        grep -q "resumed from" "$d.out" && fail+="; no checkpoint existed, yet: $(grep -m1 -o 'resumed from [^:]*' "$d.out")"
    fi
    if [ $rc -eq 0 ]; then
        out=$(compare_losses "$tmp/ref${P}_$every" "$d" 1 $steps 2>&1) || fail+="; losses: $out"
        final=$(printf step_%08d $steps)
        out=$(compare_ckpt "$tmp/ref${P}_$every/checkpoints/$final" "$d/checkpoints/$final" exact 2>&1) ||
            fail+="; final state: $out"
    fi
    add comparisons "$t3" "$(now)"
    if [ -z "$fail" ]; then
        ok "$name: verified, resumed from $(basename "${newest:-scratch}"), finished bitwise as uninterrupted"
    else
        bad "$name${fail}"
    fi
done
echo "kills: $landed landed, $in_write inside a checkpoint write (a step_*.tmp existed right" \
     "after the kill), $in_commit between a commit's rename and the move of latest;" \
     "slowest job end after a kill: $worst_end s; $(secs "$t_start" "$(now)") s in all, of which" \
     "$(for k in "until the kill" "job end" verify restart; do printf '%s %.1f s, ' "$k" "${spent[$k]:-0}"; done)comparisons ${spent[comparisons]:-0} s"
# the test did what it says: kills landed (not after the run), a good share inside writes
check "kills landed in at least 3/4 of the trials ($landed of $trials)" test $((4 * landed)) -ge $((3 * trials))
check "at least a quarter of the kills landed inside a write ($in_write of $landed)" \
    test $((4 * in_write)) -ge "$landed"
finish
