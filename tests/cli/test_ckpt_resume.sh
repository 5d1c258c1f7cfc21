#!/usr/bin/env bash
# Sharded checkpoints, resume: 20 steps with checkpoints at 10 and 20; resuming from step 10
# on the same rank count (P = 1 and 2) gives bitwise the same losses for steps 11-20 and
# the same final parameters, AdamW moments and router state (BN statistics, balance biases); resuming the P = 2
# checkpoint on P = 3 and P = 1 follows the uninterrupted run to rounding (ckpt_lib.sh argues
# the tolerances: XRUN_LOSS_TOL, XRUN_STATE_TOL).
# Also: automatic resume from `latest` (metrics.jsonl continues), a finished run has nothing
# to do, --no-resume, keep-K pruning, the layout seen through h5py, and bad input.
source "$(dirname "$0")/ckpt_lib.sh"

for P in 1 2; do
    a="$tmp/a$P"
    train "$P" "$a" || bad "P=$P: uninterrupted run (status $?): $(tail -3 "$a.out")"
    check "P=$P: checkpoints at steps 10 and 20, latest -> 20" \
        test -f "$a/checkpoints/step_00000010/index.h5" -a -f "$a/checkpoints/step_00000020/index.h5" \
        -a "$(latest_step "$a")" = 20 -a ! -e "$a/model.h5"
    check "P=$P: $P shard files" test "$(ls "$a/checkpoints/step_00000020" | grep -c '^shard_')" = "$P"
    "$MILLIPEDE" ckpt verify "$a/checkpoints/step_00000010" > "$tmp/verify.out" 2>&1 &&
        grep -q "^ok: .*all checksums good" "$tmp/verify.out" && ok "P=$P: ckpt verify" ||
        bad "P=$P: ckpt verify: $(cat "$tmp/verify.out")"

    # resume from step 10 into another run directory, same rank count: bitwise (the same
    # binary and rank count run the same operations in the same order from the same bits)
    b="$tmp/b$P"
    train "$P" "$b" --resume "$a/checkpoints/step_00000010" ||
        bad "P=$P: resume (status $?): $(tail -3 "$b.out")"
    check "P=$P: resume says where from" grep -q "resumed from $a/checkpoints/step_00000010: 10 steps done" "$b.out"
    check "P=$P: resumed run starts at step 11" test "$(head -c 12 "$b/metrics.jsonl")" = '{"step": 11,'
    compare_losses "$a" "$b" 11 20 && ok "P=$P: steps 11-20 bitwise identical losses" ||
        bad "P=$P: steps 11-20 bitwise identical losses"
    compare_ckpt "$a/checkpoints/step_00000020" "$b/checkpoints/step_00000020" exact &&
        ok "P=$P: bitwise identical final parameters, moments and router state" ||
        bad "P=$P: bitwise identical final state"
done

# the MPI transport's chunked all-to-all-v (src/dist/comm_mpi.c: rounds of point-to-point
# pieces, for exchanges beyond MPI's int counts), forced on small data by a bound of 100
# elements: the same bytes land in the same places, so the run is bitwise the one above
MP_MPI_MAX_COUNT=100 train 2 "$tmp/chunked" || bad "chunked exchange run: $(tail -3 "$tmp/chunked.out")"
compare_ckpt "$tmp/a2/checkpoints/step_00000020" "$tmp/chunked/checkpoints/step_00000020" exact &&
    ok "P=2 with all-to-all-v in pieces of 100 elements: bitwise the same run" ||
    bad "P=2 with all-to-all-v in pieces of 100 elements: bitwise the same run"

# automatic resume from `latest` in the run directory itself: a copy of run a2 as it was
# after step 10, with a metrics.jsonl that went further than the checkpoint
c="$tmp/c2"
cp -r "$tmp/a2" "$c"
rm -rf "$c/checkpoints/step_00000020"
ln -sfn step_00000010 "$c/checkpoints/latest"
train 2 "$c" || bad "automatic resume (status $?): $(tail -3 "$c.out")"
check "automatic resume from latest" grep -q "resumed from $c/checkpoints/step_00000010" "$c.out"
compare_losses "$tmp/a2" "$c" 1 20 && ok "metrics.jsonl continues: steps 1-20 once each, as uninterrupted" ||
    bad "metrics.jsonl continues"
compare_ckpt "$tmp/a2/checkpoints/step_00000020" "$c/checkpoints/step_00000020" exact &&
    ok "automatic resume: bitwise identical final state" || bad "automatic resume: final state"

# a finished run: nothing to do, nothing written
train 2 "$tmp/a2" && grep -q "nothing to do: 20 of train.steps = 20 done" "$tmp/a2.out" &&
    ok "finished run: nothing to do" || bad "finished run: nothing to do: $(tail -3 "$tmp/a2.out")"

# another rank count: the P = 2 checkpoint read through the global view by P = 3 and P = 1
for P in 3 1; do
    r="$tmp/r$P"
    train "$P" "$r" --resume "$tmp/a2/checkpoints/step_00000010" ||
        bad "reshard 2 -> $P (status $?): $(tail -3 "$r.out")"
    check "reshard 2 -> $P: resumed" grep -q "written by 2 ranks" "$r.out"
    # another rank count sums in another order: rounding, and top-k flips on near-ties
    # (ckpt_lib.sh: what that can do, and what a wrong reshard does instead)
    compare_losses "$tmp/a2" "$r" 11 20 $XRUN_LOSS_TOL &&
        ok "reshard 2 -> $P: losses of steps 11-20 within $XRUN_LOSS_TOL" ||
        bad "reshard 2 -> $P: losses within $XRUN_LOSS_TOL"
    compare_ckpt "$tmp/a2/checkpoints/step_00000020" "$r/checkpoints/step_00000020" tol=$XRUN_STATE_TOL &&
        ok "reshard 2 -> $P: final state within $XRUN_STATE_TOL" || bad "reshard 2 -> $P: final state"
    check "reshard 2 -> $P: writes $P shards" test "$(ls "$r/checkpoints/step_00000020" | grep -c '^shard_')" = "$P"
done

# The layout through h5py: root attributes, global views equal the shard rows, relative
# source paths (the directory can move), Fletcher32 on every real dataset.
mv "$tmp/a2/checkpoints/step_00000020" "$tmp/moved"
python3 - "$tmp/moved" <<'EOF' && ok "layout: attributes, global views over shards, checksums, movable" || bad "layout"
import sys, h5py, numpy as np, configparser
d = sys.argv[1]
f = h5py.File(d + "/index.h5", "r")
a = f.attrs
assert a["format"] == b"millipede-checkpoint" or a["format"] == "millipede-checkpoint", a["format"]
assert a["version"] == 1 and a["step"] == 20 and a["n_ranks"] == 2 and a["adam_t"] == 20
assert a["data_next_step"] == 20 and a["seed"] == 1337
cp = configparser.ConfigParser(inline_comment_prefixes=(";",))
cp.read_string(a["config"] if isinstance(a["config"], str) else a["config"].decode())
assert cp["peer"]["experts"].strip() == "256"
files = [x.decode() for x in f["layout/shard_files"][()]]
assert files == ["shard_00000.h5", "shard_00001.h5"], files
rows = f["layout/rows/h1.peer.u"][()]
assert rows.tolist() == [[0, 128], [128, 256]], rows   # n = 16 sub-keys: 8 each, 16 rows each
for g in ("params", "adam_m", "adam_v"):
    for t in ("h1.peer.u", "h1.peer.v"):
        glob = f[g][t]
        assert glob.is_virtual and glob.shape == (256, 32), (g, t)
        full = glob[()]
        assert np.all(np.isfinite(full))
        for p, name in enumerate(files):
            with h5py.File(d + "/" + name, "r") as s:
                part = s[g][t]
                assert part.fletcher32 and part.chunks
                assert part.attrs["row_start"] == rows[p][0]
                assert np.array_equal(part[()], full[rows[p][0]:rows[p][1]])
        assert not np.array_equal(full[:128], full[128:])
def real(name, obj):
    if isinstance(obj, h5py.Dataset) and not obj.is_virtual:
        assert obj.fletcher32 and obj.chunks, name
f.visititems(real)
assert set(f["state"]) == {"h1.peer.bn.running_mean", "h1.peer.bn.running_var",
                           "h1.peer.k1_bias", "h1.peer.k2_bias"}
# balance biases (tiny.ini's balance_rate 0.01): (H, n), moved by +-0.01 per step for 20 steps
H = int(cp["peer"]["heads"].strip())
for name in ("h1.peer.k1_bias", "h1.peer.k2_bias"):
    b = f["state"][name][()]
    assert b.shape == (H, 16), (name, b.shape)
    assert np.abs(b).max() <= 20 * 0.01 * (1 + 1e-5) and np.abs(b).max() > 0, (name, b)
assert set(f["params"]) == set(f["adam_m"]) == set(f["adam_v"])
EOF
mv "$tmp/moved" "$tmp/a2/checkpoints/step_00000020"

# keep-K: every 2 steps with keep 3 leaves the newest three
train 2 "$tmp/k" --set train.steps=10 --set checkpoint.every=2 --set checkpoint.keep=3
check "checkpoint.keep = 3 keeps steps 6, 8, 10" test "$(ls "$tmp/k/checkpoints" | tr '\n' ' ')" = \
    "latest step_00000006 step_00000008 step_00000010 "

# --no-resume starts over (and its first checkpoint replaces the abandoned newer ones)
train 2 "$tmp/k" --set train.steps=4 --set checkpoint.every=2 --set checkpoint.keep=3 --no-resume
check "--no-resume: trains from step 1" grep -q "step      1/4" "$tmp/k.out"
check "--no-resume: abandoned newer checkpoints removed" test "$(ls "$tmp/k/checkpoints" | tr '\n' ' ')" = \
    "latest step_00000002 step_00000004 "

# bad input: status 2, one error line naming the file and what is wrong
expect_error() {   # name, pattern, P, run dir, args...
    local name=$1 pat=$2 P=$3 dir=$4; shift 4
    local rc=0
    train "$P" "$dir" "$@" || rc=$?
    local lines
    lines=$(grep -c "^millipede: error:" "$dir.out")
    if [ $rc -eq 2 ] && [ "$lines" -eq 1 ] && grep -q "^millipede: error: .*$pat" "$dir.out"; then
        ok "$name"
    else
        bad "$name (status $rc, $lines error lines): $(grep -m3 error "$dir.out")"
    fi
}
expect_error "resume with another d_model: names index.h5 and the key" \
    "step_00000010/index.h5: key 'model.d_model' is 32 in the checkpoint but 64" \
    2 "$tmp/e1" --resume "$tmp/a2/checkpoints/step_00000010" --set model.d_model=64
expect_error "automatic resume with another expert count" "key 'peer.experts' is 256 in the checkpoint but 1024" \
    1 "$tmp/a1" --set peer.experts=1024
expect_error "automatic resume without the balance biases the checkpoint has" \
    "key 'peer.balance_rate' is 0.01 in the checkpoint but 0 in" 1 "$tmp/a1" --set peer.balance_rate=0
rc=0
"$MILLIPEDE" eval "$cfg" "${small[@]}" --model "$tmp/a1" --set peer.balance_rate=0 \
    > "$tmp/eval_nobal.out" 2>&1 || rc=$?
check "eval takes the balance biases from the checkpoint, whatever the config's rate" \
    test "$rc" -eq 0 -a -n "$(grep '"val_loss"' "$tmp/eval_nobal.out")"
expect_error "--resume of a missing checkpoint" "nope: no such checkpoint" 1 "$tmp/e2" --resume "$tmp/nope"
expect_error "--resume of a directory that is no checkpoint" "no checkpoints/latest" 1 "$tmp/e3" --resume "$tmp/docs"
expect_error "--resume and --no-resume" "exclude each other" 1 "$tmp/e4" --resume "$tmp/a1" --no-resume

# inspect names step, ranks, files, layout, shapes and the config
"$MILLIPEDE" ckpt inspect "$tmp/a2" > "$tmp/inspect.out" 2>&1
check "ckpt inspect" grep -q "^step         20 (AdamW updates 20" "$tmp/inspect.out"
check "ckpt inspect: layout and shapes" grep -q "h1.peer.u            0:\[0, 128) 1:\[128, 256)" "$tmp/inspect.out"
check "ckpt inspect: virtual dataset" grep -q "params  h1.peer.u .*(256, 32) .*virtual over 2 shards" "$tmp/inspect.out"
check "ckpt inspect: config" grep -q "^  experts = 256" "$tmp/inspect.out"

# export: the single-file model format, read back by eval with the same result
"$MILLIPEDE" ckpt export "$tmp/a2" "$tmp/model.h5" > /dev/null 2>&1
"$MILLIPEDE" eval "$cfg" "${small[@]}" --model "$tmp/a2" > "$tmp/e_ckpt.json" 2>/dev/null
"$MILLIPEDE" eval "$cfg" "${small[@]}" --model "$tmp/model.h5" > "$tmp/e_file.json" 2>/dev/null
check "ckpt export: eval of the model file equals eval of the checkpoint" \
    test -s "$tmp/e_ckpt.json" -a "$(cat "$tmp/e_ckpt.json")" = "$(cat "$tmp/e_file.json")"

finish
