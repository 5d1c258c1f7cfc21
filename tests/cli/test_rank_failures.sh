#!/usr/bin/env bash
# Failures that happen on some ranks and not on others end the whole job promptly with one
# error line and status 2: every rank reaches an agreement (src/core/agree.c) instead of
# exiting alone while the others wait in their next collective. Each case runs under
# `timeout`; status 124 is a hang.
# A node that sees the file system differently is simulated with mpirun's MPMD form: each
# rank gets its own working directory (--wdir), and relative paths name different files.
source "$(dirname "$0")/ckpt_lib.sh"

HANG=60   # seconds: each case ends in ~2 s; only a hang gets near this
A="$tmp/nodeA" B="$tmp/nodeB"
mkdir -p "$A/data" "$B"
cp "$tmp/data/train.bin" "$tmp/data/val.bin" "$A/data/"
# the small model with data paths relative to each rank's working directory
rel=()
for a in "${small[@]}"; do
    case $a in
        data.train=*) rel+=(data.train=data/train.bin) ;;
        data.val=*) rel+=(data.val=data/val.bin) ;;
        *) rel+=("$a") ;;
    esac
done

# mpmd NAME ARGS...: rank 0 in $A, rank 1 in $B, both `millipede ARGS...` (with
# $RANK0/$RANK1 as the programs when set); output in $tmp/NAME.out; returns the status.
mpmd() {
    local name=$1; shift
    timeout -k 5 "$HANG" mpirun -n 1 --wdir "$A" ${RANK0:-$MILLIPEDE} "$@" : \
        -n 1 --wdir "$B" ${RANK1:-$MILLIPEDE} "$@" > "$tmp/$name.out" 2>&1
}
# expect NAME RC PATTERN: status RC (not the hang's 124) and exactly one error line,
# matching PATTERN
expect() {
    local name=$1 rc=$2 want=$3 errs
    errs=$(grep -c "^millipede: error:" "$tmp/$name.out")
    if [ "$rc" -eq 2 ] && [ "$errs" -eq 1 ] && grep -q "^millipede: error: $want" "$tmp/$name.out"; then
        ok "$name: status 2, one line: $(grep "^millipede: error:" "$tmp/$name.out" | cut -c1-150)"
    else
        bad "$name: status $rc (124 = hang), $errs error lines, wanted '$want': $(tail -5 "$tmp/$name.out")"
    fi
}

# 1. run.dir cannot be made: rank 0 alone makes it
rc=0; timeout -k 5 "$HANG" mpirun -n 2 "$MILLIPEDE" train "$cfg" "${small[@]}" \
    --set run.dir=/etc/passwd/run > "$tmp/rundir.out" 2>&1 || rc=$?
expect rundir "$rc" "rank 0: run.dir: /etc/passwd/run: cannot create directory"

# 2. a data shard that one node does not see
rc=0; mpmd data train "$cfg" "${rel[@]}" --set "run.dir=$tmp/run_data" || rc=$?
expect data "$rc" "rank 1: data/train.bin: .*(from data.train)"

# 3. a config file that one node does not see
cp "$cfg" "$A/run.ini"
rc=0; mpmd config train run.ini "${small[@]}" --set "run.dir=$tmp/run_cfg" || rc=$?
expect config "$rc" "rank 1: run.ini: "

# 4. a GPU that one node lacks: rank 0 has the (emulated or real) CUDA backend, rank 1
# none (CUDA_VISIBLE_DEVICES= hides a real GPU, and this build may have none)
if [ -n "${MILLIPEDE_EMU:-}" ]; then
    rc=0; RANK0=$MILLIPEDE_EMU RANK1="env CUDA_VISIBLE_DEVICES= $MILLIPEDE" mpmd gpu train "$cfg" \
        "${small[@]}" --set "run.dir=$tmp/run_gpu" --set system.backend=cuda || rc=$?
    expect gpu "$rc" "rank 1: system.backend = cuda: "
else
    echo "note: case 4 (GPU on one node only) needs the CUDA emulator build; not run"
fi

# a checkpointed run in $A (1 rank): step_00000002 and step_00000004, latest -> 4
train 1 "$A/run" --set train.steps=4 --set checkpoint.every=2 ||
    bad "setup run: $(tail -3 "$A/run.out")"

# 5. --resume with a path that one node does not see (both see the data from here on)
mkdir -p "$B/data"
cp "$A/data/"*.bin "$B/data/"
rc=0; mpmd resume train "$cfg" "${rel[@]}" --set "run.dir=$tmp/run_resume" \
    --resume run/checkpoints/step_00000004 || rc=$?
expect resume "$rc" "rank 1: --resume: run/checkpoints/step_00000004"

# 6. two views of one checkpoints directory: node B has only step 2. Rank 0 alone chooses
# the order; step 4, which rank 1 cannot read, is skipped by both; both resume from 2.
# (When each rank listed the directory itself, rank 0 resumed from 4 and rank 1 from 2.)
mkdir -p "$B/run/checkpoints"
cp -r "$A/run/checkpoints/step_00000002" "$B/run/checkpoints/"
ln -s step_00000002 "$B/run/checkpoints/latest"
rc=0; mpmd listing train "$cfg" "${rel[@]}" --set run.dir=run --set train.steps=2 || rc=$?
check "listing: finished (status $rc, 124 = hang)" test "$rc" -eq 0
check "listing: both ranks resumed from step 2, which both can read" \
    grep -q "^resumed from run/checkpoints/step_00000002: 2 steps done" "$tmp/listing.out"
check "listing: step 4 reported unusable (rank 1 cannot read it)" \
    grep -q "^millipede: warning: checkpoint run/checkpoints/step_00000004 is unusable" "$tmp/listing.out"

# 7. a checkpoint that rank 1 cannot write (its view of run.dir lacks the .tmp directory
# that rank 0 made): the step's checkpoint fails on every rank, status 1, no hang
rm -rf "$B/run"
rc=0; mpmd ckpt_write train "$cfg" "${rel[@]}" --set run.dir=run2 --set train.steps=2 || rc=$?
check "checkpoint write failing on rank 1: status 1 on every rank (got $rc, 124 = hang)" test "$rc" -eq 1
check "checkpoint write failing on rank 1: the error names rank 1's shard" \
    grep -q "^millipede: error: checkpoint failed: run2/checkpoints/step_00000002.tmp/shard_00001.h5" "$tmp/ckpt_write.out"

finish
