#!/usr/bin/env bash
# End to end on the CPU: data prepare -> train -> metrics; the same command twice gives
# bitwise identical losses; a different seed does not; bad command lines and configs give
# one "millipede: error:" line naming the key and exit status 2.
set -uo pipefail
: "${MILLIPEDE:?path of the millipede binary}" "${MP_SOURCE_DIR:?repository root}"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
pass=0 fail=0
ok() { pass=$((pass + 1)); echo "ok   $1"; }
bad() { fail=$((fail + 1)); echo "FAIL $1"; }

mkdir -p "$tmp/docs"
# a small real-text corpus: this repository's own docs and sources
cp "$MP_SOURCE_DIR"/docs/*.md "$MP_SOURCE_DIR"/src/model/*.c "$MP_SOURCE_DIR"/src/train/*.c "$tmp/docs/"
"$MILLIPEDE" data prepare --out "$tmp/data" "$tmp/docs" >/dev/null || bad "data prepare"

small=(--set "data.train=$tmp/data/train.bin" --set "data.val=$tmp/data/val.bin"
       --set model.context=32 --set model.d_model=32 --set model.n_heads=2 --set model.n_layers=2
       --set model.ffn=dense,peer --set peer.experts=256 --set peer.heads=2 --set peer.topk=4
       --set peer.key_dim=16 --set train.batch_size=4 --set train.steps=12 --set train.warmup=2
       --set train.eval_every=6 --set train.eval_batches=2 --set train.log_every=4)

run() { "$MILLIPEDE" train "$MP_SOURCE_DIR/configs/tiny.ini" "${small[@]}" "$@"; }

if run --set "run.dir=$tmp/a" >"$tmp/a.out" 2>&1; then ok "train runs"; else bad "train runs"; cat "$tmp/a.out"; fi
run --set "run.dir=$tmp/b" >/dev/null 2>&1
run --set "run.dir=$tmp/c" --set train.seed=7 >/dev/null 2>&1
run --set "run.dir=$tmp/p" --set train.profile=true >"$tmp/p.out" 2>&1

losses() { python3 -c '
import json, sys
for line in open(sys.argv[1]):
    d = json.loads(line)
    if "loss" in d: print(d["step"], repr(d["loss"]))
    if "val_loss" in d: print("val", d["step"], repr(d["val_loss"]))' "$1"; }

[ -s "$tmp/a/metrics.jsonl" ] && [ "$(losses "$tmp/a/metrics.jsonl" | grep -vc val)" = 12 ] &&
    ok "metrics.jsonl has 12 training lines" || bad "metrics.jsonl has 12 training lines"
[ "$(losses "$tmp/a/metrics.jsonl" | grep -c val)" = 2 ] && ok "two validation lines" || bad "two validation lines"
# bitwise: the same binary, machine and thread count do the same operations in the same
# order (the CPU backend's sums do not depend on the thread split, tests/unit/test_cpu_ops)
cmp -s <(losses "$tmp/a/metrics.jsonl") <(losses "$tmp/b/metrics.jsonl") &&
    ok "same seed: bitwise identical losses" || bad "same seed: bitwise identical losses"
cmp -s <(losses "$tmp/a/metrics.jsonl") <(losses "$tmp/c/metrics.jsonl") &&
    bad "another seed gives other losses" || ok "another seed gives other losses"
[ -s "$tmp/a/checkpoints/latest/index.h5" ] && ok "final checkpoint written" || bad "final checkpoint written"
# train.profile: the same numbers, plus each step's time by phase, which covers the step
cmp -s <(losses "$tmp/a/metrics.jsonl") <(losses "$tmp/p/metrics.jsonl") &&
    ok "train.profile: bitwise the same losses" || bad "train.profile: bitwise the same losses"
python3 - "$tmp/p/metrics.jsonl" <<'EOF' && ok "train.profile: phase_ms in every step line" || bad "train.profile: phase_ms"
import json, sys
kinds = ["embed", "norm", "attn_matmul", "attention", "mlp", "peer", "lm_head", "loss"]
names = ["fwd." + k for k in kinds] + ["bwd." + k for k in kinds] + ["allreduce", "optimizer", "other"]
L = [json.loads(x) for x in open(sys.argv[1]) if '"loss"' in x]
assert len(L) == 12
for d in L:
    p = d["phase_ms"]
    assert list(p) == names, list(p)
    # the phases lie inside the step: none is negative ("other", the step's time outside
    # them, down to printing), the forward, the backward and the optimizer took time, and
    # all of them add up to the step's "ms"; each figure is printed to 5e-4 ms (19 of them)
    # and "ms" to 5e-3
    assert all(v >= 0 for k, v in p.items() if k != "other") and p["other"] >= -5e-4, p
    assert sum(p["fwd." + k] for k in kinds) > 0 and sum(p["bwd." + k] for k in kinds) > 0, p
    assert p["optimizer"] > 0, p
    assert abs(sum(p.values()) - d["ms"]) <= 19 * 5e-4 + 5e-3, (sum(p.values()), d["ms"])
EOF
grep -q "phases (ms, rank 0, synchronized): " "$tmp/p.out" && ok "train.profile: the log names the longest phases" ||
    bad "train.profile: the log names the longest phases"
grep -q "^context = 32" "$tmp/a/config.ini" && grep -q "^ffn = dense,peer" "$tmp/a/config.ini" &&
    ok "resolved config.ini saved" || bad "resolved config.ini saved"
grep -q "resolved configuration" "$tmp/a.out" && ok "config printed at start" || bad "config printed at start"
python3 - "$tmp/a/metrics.jsonl" <<'EOF' && ok "loss decreases" || bad "loss decreases"
import json, sys
l = [json.loads(x)["loss"] for x in open(sys.argv[1]) if '"loss"' in x]
sys.exit(0 if l[-1] < l[0] - 0.3 else 1)
EOF
python3 - "$tmp/a/metrics.jsonl" <<'EOF' && ok "progress: tokens seen, elapsed time, time left" || bad "progress fields"
import json, sys
L = [json.loads(x) for x in open(sys.argv[1]) if '"loss"' in x]
steps = 12
for d in L:
    # tokens after step s: s * grad_accum (1) * batch_size (4) * context (32)
    assert d["tokens"] == d["step"] * 1 * 4 * 32, d
    # time left = elapsed / steps done * steps to go; elapsed is printed to 1e-3 s (so the
    # recomputed estimate is off by at most 11 * 5e-4 s) and eta_s to 0.1 s (0.05 s)
    assert abs(d["eta_s"] - d["elapsed_s"] / d["step"] * (steps - d["step"])) <= 0.06, d
assert all(b["elapsed_s"] >= a["elapsed_s"] for a, b in zip(L, L[1:]))
assert L[-1]["eta_s"] == 0
EOF
grep -qE '^step +12/12 \| .* \| 0.00154 M tokens \| [0-9]+:[0-9]{2}:[0-9]{2} elapsed, 0:00:00 left$' "$tmp/a.out" &&
    ok "step line shows tokens, elapsed and time left" || bad "step line progress: $(grep '^step  *12/12' "$tmp/a.out")"

# bad input: status 2 and one error line that names the problem
expect_error() {   # name, pattern, command...
    local name=$1 pat=$2; shift 2
    "$@" >"$tmp/err.out" 2>"$tmp/err.txt"
    local rc=$?
    if [ $rc -eq 2 ] && grep -q "^millipede: error: .*$pat" "$tmp/err.txt" && [ "$(wc -l <"$tmp/err.txt")" -le 2 ]; then
        ok "$name"
    else
        bad "$name (status $rc): $(head -3 "$tmp/err.txt")"
    fi
}
cfg="$MP_SOURCE_DIR/configs/tiny.ini"
expect_error "missing config file" "nope.ini" "$MILLIPEDE" train "$tmp/nope.ini"
expect_error "unknown key" "train.stpes" "$MILLIPEDE" train "$cfg" --set train.stpes=3
expect_error "N not a square" "peer.experts" "$MILLIPEDE" train "$cfg" --set peer.experts=1000
expect_error "k > n" "peer.topk" "$MILLIPEDE" train "$cfg" --set peer.experts=16 --set peer.topk=5
expect_error "odd dk" "peer.key_dim" "$MILLIPEDE" train "$cfg" --set peer.key_dim=7
expect_error "bad integer" "train.steps" "$MILLIPEDE" train "$cfg" --set train.steps=12x
expect_error "malformed --set" "--set" "$MILLIPEDE" train "$cfg" --set trainsteps
expect_error "unknown option" "--frobnicate" "$MILLIPEDE" train "$cfg" --frobnicate
expect_error "missing data file" "data.train" "$MILLIPEDE" train "$cfg" --set "run.dir=$tmp/d" --set "data.train=$tmp/none.bin"
printf 'not a shard at all, definitely not' >"$tmp/junk.bin"
expect_error "corrupt data file" "junk.bin" "$MILLIPEDE" train "$cfg" --set "run.dir=$tmp/d" --set "data.train=$tmp/junk.bin"
printf '[model]\nd_model = 64\n[bogus]\nx = 1\n' >"$tmp/bad.ini"
expect_error "unknown section" "bogus" "$MILLIPEDE" train "$tmp/bad.ini"
expect_error "unknown command" "frob" "$MILLIPEDE" frob

"$MILLIPEDE" train --help | grep -q "usage: millipede train" && ok "train --help" || bad "train --help"
"$MILLIPEDE" --help | grep -q "commands:" && ok "--help" || bad "--help"

echo "$pass passed, $fail failed"
[ "$fail" -eq 0 ]
