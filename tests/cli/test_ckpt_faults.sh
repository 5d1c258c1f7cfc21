#!/usr/bin/env bash
# Sharded checkpoints, faults: a rank killed (SIGKILL) halfway through writing its shard
# leaves `latest` at the previous checkpoint and the restart continues bitwise; flipped
# bytes in a shard's data, a truncated shard, a missing shard and a corrupt index are each
# reported by `ckpt verify` with the file (and dataset) named; automatic resume reports a
# bad latest checkpoint and falls back to the previous good one; eval of a bad one fails
# with one line.
source "$(dirname "$0")/ckpt_lib.sh"

# the reference: 20 uninterrupted steps on 2 ranks, checkpoints every 5 steps, keep 3
ref="$tmp/ref"
train 2 "$ref" --set checkpoint.every=5 || bad "reference run (status $?): $(tail -3 "$ref.out")"
check "reference: checkpoints 10, 15, 20" test "$(ls "$ref/checkpoints" | tr '\n' ' ')" = \
    "latest step_00000010 step_00000015 step_00000020 "

# --- a rank dies in the middle of writing the step-15 checkpoint ---
k="$tmp/kill"
rc=0
MILLIPEDE_FAULT_CKPT=1:15 train 2 "$k" --set checkpoint.every=5 || rc=$?
check "killed run fails (status $rc)" test "$rc" -ne 0
check "rank 1 died while writing its shard" grep -q "rank 1: MILLIPEDE_FAULT_CKPT: killing myself while writing .*step_00000015.tmp/shard_00001.h5" "$k.out"
check "latest still names step 10" test "$(latest_step "$k")" = 10
check "the interrupted checkpoint is only a .tmp directory" \
    test -d "$k/checkpoints/step_00000015.tmp" -a ! -e "$k/checkpoints/step_00000015"
"$MILLIPEDE" ckpt verify "$k" > "$tmp/v.out" 2>&1 && ok "latest verifies" || bad "latest verifies: $(cat "$tmp/v.out")"
train 2 "$k" --set checkpoint.every=5 || bad "restart after the kill (status $?): $(tail -3 "$k.out")"
check "restart resumes from step 10" grep -q "resumed from $k/checkpoints/step_00000010" "$k.out"
check "the leftover .tmp directory is gone" test ! -e "$k/checkpoints/step_00000015.tmp"
compare_losses "$ref" "$k" 11 20 && ok "restart: steps 11-20 bitwise as uninterrupted" || bad "restart: losses"
compare_ckpt "$ref/checkpoints/step_00000020" "$k/checkpoints/step_00000020" exact &&
    ok "restart: bitwise identical final state" || bad "restart: final state"

# --- corruption ---
c="$tmp/corrupt"
cp -r "$ref" "$c"
# flip: XOR 8 bytes in the middle of the first chunk of a dataset (located with h5py); 0x5a,
# not 0xff, as Fletcher32 works mod 65535 and cannot tell 0x0000 from 0xffff
flip() {   # file dataset
    python3 - "$1" "$2" <<'EOF'
import sys, h5py
path, name = sys.argv[1], sys.argv[2]
with h5py.File(path, "r") as f:
    info = f[name].id.get_chunk_info(0)
off = info.byte_offset + info.size // 2
with open(path, "r+b") as fh:
    fh.seek(off)
    b = bytearray(fh.read(8))
    fh.seek(off)
    fh.write(bytes(x ^ 0x5a for x in b))
EOF
}
truncate_half() { truncate -s $(( $(stat -c %s "$1") / 2 )) "$1"; }
s20="$c/checkpoints/step_00000020" s15="$c/checkpoints/step_00000015" s10="$c/checkpoints/step_00000010"
flip "$s20/shard_00000.h5" /params/h1.peer.u
truncate_half "$s20/shard_00001.h5"
truncate_half "$s15/shard_00000.h5"

rc=0
"$MILLIPEDE" ckpt verify "$s20" > "$tmp/v20.out" 2> "$tmp/v20.err" || rc=$?
check "verify of a bad checkpoint exits 1 (status $rc)" test "$rc" -eq 1
check "verify names the flipped shard and dataset" \
    grep -q "^millipede: error: $s20/shard_00000.h5: dataset '/params/h1.peer.u': checksum mismatch" "$tmp/v20.err"
check "verify names the truncated shard" \
    grep -q "^millipede: error: $s20/shard_00001.h5: truncated: [0-9]* bytes, the index records [0-9]*" "$tmp/v20.err"
check "verify: exactly these two problems" test "$(wc -l < "$tmp/v20.err")" -eq 2
check "verify: summary on stdout" grep -q "2 problems" "$tmp/v20.out"
"$MILLIPEDE" ckpt verify "$s10" > /dev/null 2>&1 && ok "the older checkpoint still verifies" || bad "older checkpoint verifies"

# eval of the bad one: one line naming file and dataset, status 2
rc=0
"$MILLIPEDE" eval "$cfg" "${small[@]}" --model "$s20" > /dev/null 2> "$tmp/eval.err" || rc=$?
check "eval of a truncated checkpoint: status 2, one line naming the shard" \
    test "$rc" -eq 2 -a "$(grep -c . "$tmp/eval.err")" -eq 1 -a -n "$(grep "shard_00001.h5: truncated" "$tmp/eval.err")"

# automatic resume: 20 (checksum) and 15 (truncated) are reported, 10 is used; continuing to
# step 20 gives the reference's final state bitwise
train 2 "$c" --set checkpoint.every=5 || bad "resume past bad checkpoints (status $?): $(tail -3 "$c.out")"
check "resume reports latest (step 20) with shard and dataset" \
    grep -q "^millipede: warning: checkpoint $s20 is unusable: $s20/shard_00000.h5: dataset '/params/h1.peer.u': read failed (checksum mismatch" "$c.out"
check "resume reports step 15's truncated shard" \
    grep -q "^millipede: warning: checkpoint $s15 is unusable: $s15/shard_00000.h5: truncated" "$c.out"
check "resume falls back to step 10" grep -q "resumed from $s10: 10 steps done" "$c.out"
compare_ckpt "$ref/checkpoints/step_00000020" "$s20" exact &&
    ok "after the fallback: bitwise identical final state" || bad "after the fallback: final state"
"$MILLIPEDE" ckpt verify "$c" > /dev/null 2>&1 && ok "the rewritten latest verifies" || bad "rewritten latest verifies"

# more damage, each named by verify: a missing shard, a corrupt index dataset
m="$tmp/missing"
cp -r "$ref/checkpoints/step_00000020" "$m"
rm "$m/shard_00001.h5"
flip "$m/index.h5" /params/wte
"$MILLIPEDE" ckpt verify "$m" > /dev/null 2> "$tmp/vm.err"
check "verify names the missing shard" grep -q "$m/shard_00001.h5: shard 1 of 2 is missing" "$tmp/vm.err"
check "verify names the corrupt index dataset" grep -q "$m/index.h5: dataset '/params/wte': checksum mismatch" "$tmp/vm.err"
# a resume that finds only bad checkpoints refuses to start over silently
mkdir -p "$tmp/onlybad/checkpoints"
mv "$m" "$tmp/onlybad/checkpoints/step_00000020"
ln -s step_00000020 "$tmp/onlybad/checkpoints/latest"
rc=0
train 2 "$tmp/onlybad" || rc=$?
check "no usable checkpoint: status 2 and a pointer to --no-resume" \
    test "$rc" -eq 2 -a -n "$(grep "no usable checkpoint among 1.*--no-resume" "$tmp/onlybad.out")"
# a file where a checkpoint directory should be
printf 'junk\n' > "$tmp/junk"
rc=0
"$MILLIPEDE" ckpt verify "$tmp/junk" > /dev/null 2> "$tmp/vj.err" || rc=$?
check "verify of a file: one line naming it" test "$rc" -ne 0 -a -n "$(grep "$tmp/junk" "$tmp/vj.err")"

finish
