#!/usr/bin/env bash
# Checkpoint bandwidth of configs/peer-1m.ini (1M experts, d = 256: 6 GiB of expert
# tables and AdamW moments) beside the raw sequential speed of the same file system,
# measured in the same run (docs/benchmarks.md, "Checkpoints"):
#   1. train one step and write the final checkpoint (the trainer logs bytes and seconds:
#      all ranks' shards, the index, fsync, rename, `latest`)
#   2. dd of the same number of bytes with conv=fsync (write), then read back cold; and
#      the same bytes written with 1 MiB pwrites + fsync by a process that holds the
#      trainer's resident memory (tools/bench/bench_pwrite.c): on the development VM a
#      writer holding ~10 GiB writes several times slower than dd, whatever it writes
#   3. resume from the checkpoint with a cold page cache (the trainer logs the read time;
#      wall time from launch to the resumed line is the time to resume), one more step,
#      another checkpoint (a second write measurement)
#   4. `millipede ckpt verify` cold: every byte read once with its checksum, one process
# usage: tools/bench/bench_ckpt.sh [DIR [P]]   (DIR default runs/bench-ckpt, P ranks, default 1)
# Needs root to drop the page cache between write and read (otherwise reads may be cached).
set -euo pipefail
cd "$(dirname "$0")/../.."
DIR=${1:-runs/bench-ckpt}
P=${2:-1}
MILLIPEDE=${MILLIPEDE:-build/millipede}
CFG=configs/peer-1m.ini
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
rm -rf "$DIR"
mkdir -p "$DIR"
drop() {
    sync
    echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || echo "(cannot drop the page cache: reads may be cached)"
}
launch=()
[ "$P" -gt 1 ] && launch=(mpirun -n "$P")
common=(--set "run.dir=$DIR/run" --set train.eval_every=0 --set train.eval_batches=1
        --set train.log_every=1 --set checkpoint.every=0 --set checkpoint.keep=2)
now() { date +%s.%N; }
mib_s() { awk -v b="$1" -v s="$2" 'BEGIN { printf "%.0f", b / 1048576 / s }'; }

echo "== 1. train 1 step, write the checkpoint ($P rank(s))"
/usr/bin/time -f "maxrss_kib %M" "${launch[@]}" "$MILLIPEDE" train "$CFG" "${common[@]}" \
    --set train.steps=1 > "$DIR/write.log" 2>&1
rss_mib=$(( $(sed -n 's/^maxrss_kib //p' "$DIR/write.log") / 1024 ))
grep -E "^checkpoint " "$DIR/write.log"
ck="$DIR/run/checkpoints/step_00000001"
bytes=$(du -sb "$ck" | cut -f1)
w_s=$(sed -n 's/^checkpoint .* \([0-9.]*\) s (.*/\1/p' "$DIR/write.log")

echo "== 2. dd: $bytes bytes, conv=fsync, then read back cold"
count=$(( (bytes + 16777215) / 16777216 ))
t0=$(now)
dd if=/dev/zero of="$DIR/dd.bin" bs=16M count="$count" conv=fsync status=none
t1=$(now)
drop
t2=$(now)
dd if="$DIR/dd.bin" of=/dev/null bs=16M status=none
t3=$(now)
dd_bytes=$((count * 16777216))
ddw_s=$(awk -v a="$t0" -v b="$t1" 'BEGIN { print b - a }')
ddr_s=$(awk -v a="$t2" -v b="$t3" 'BEGIN { print b - a }')
rm -f "$DIR/dd.bin"
cc -O2 -o "$DIR/bench_pwrite" tools/bench/bench_pwrite.c
drop
pw_s=$("$DIR/bench_pwrite" "$DIR/pw.bin" "$bytes" "$rss_mib")
rm -f "$DIR/pw.bin"

echo "== 3. resume cold, 1 more step, another checkpoint"
drop
t0=$(now)
"${launch[@]}" "$MILLIPEDE" train "$CFG" "${common[@]}" --set train.steps=2 > "$DIR/resume.log" 2>&1 &
pid=$!
until grep -q "^resumed from" "$DIR/resume.log" 2>/dev/null; do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.05
done
t1=$(now)
wait "$pid"
grep -E "^resumed|^checkpoint " "$DIR/resume.log"
r_s=$(sed -n 's/^resumed from .* read in \([0-9.]*\) s.*/\1/p' "$DIR/resume.log")
resume_wall=$(awk -v a="$t0" -v b="$t1" 'BEGIN { print b - a }')
w2_s=$(sed -n 's/^checkpoint .* \([0-9.]*\) s (.*/\1/p' "$DIR/resume.log")

echo "== 4. ckpt verify cold"
drop
t0=$(now)
"$MILLIPEDE" ckpt verify "$ck"
t1=$(now)
v_s=$(awk -v a="$t0" -v b="$t1" 'BEGIN { print b - a }')

ddw=$(mib_s "$dd_bytes" "$ddw_s") ddr=$(mib_s "$dd_bytes" "$ddr_s")
pw=$(mib_s "$bytes" "$pw_s") w=$(mib_s "$bytes" "$w_s") w2=$(mib_s "$bytes" "$w2_s") r=$(mib_s "$bytes" "$r_s") v=$(mib_s "$bytes" "$v_s")
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'; }
cat <<EOF

checkpoint: $bytes bytes ($(awk -v b="$bytes" 'BEGIN { printf "%.2f", b / 1073741824 }') GiB), $P rank(s), $(ls "$ck" | wc -l) files
trainer max RSS $rss_mib MiB
| what | seconds | MiB/s | / dd |
|---|---|---|---|
| dd write (conv=fsync), $dd_bytes bytes | $ddw_s | $ddw | 1 |
| 1 MiB pwrites + fsync holding $rss_mib MiB (bench_pwrite) | $pw_s | $pw | $(ratio "$pw" "$ddw") |
| checkpoint write (after step 1) | $w_s | $w | $(ratio "$w" "$ddw") ($(ratio "$w" "$pw") of bench_pwrite) |
| checkpoint write (after step 2) | $w2_s | $w2 | $(ratio "$w2" "$ddw") ($(ratio "$w2" "$pw") of bench_pwrite) |
| dd read (cold) | $ddr_s | $ddr | 1 |
| checkpoint read on resume (cold) | $r_s | $r | $(ratio "$r" "$ddr") |
| ckpt verify (cold, one process, all checksums) | $v_s | $v | $(ratio "$v" "$ddr") |
| time to resume: launch to "resumed" (model build + init + read) | $resume_wall | | |
EOF
