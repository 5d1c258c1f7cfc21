#!/usr/bin/env bash
# `millipede eval` and `millipede sample` on a model trained here for a few steps, read from
# its final checkpoint (<run.dir>/checkpoints/latest): eval prints one JSON line whose
# val_loss equals the trainer's last validation loss (so the checkpoint round trip is exact), usage and unevenness are in range; sample continues the
# prompt by exactly N bytes, reproducibly; bad input exits 2 with one "millipede: error:" line.
source "$(dirname "$0")/ckpt_lib.sh"   # scratch $tmp, ok/bad, the corpus in $tmp/data, $cfg

# A smaller run than the checkpoint tests': 5 steps of batch 2.
small=(--set "data.train=$tmp/data/train.bin" --set "data.val=$tmp/data/val.bin"
       --set model.context=32 --set model.d_model=32 --set model.n_heads=2 --set model.n_layers=2
       --set model.ffn=dense,peer --set peer.experts=256 --set peer.heads=2 --set peer.topk=4
       --set peer.key_dim=16 --set train.batch_size=2 --set train.steps=5 --set train.warmup=1
       --set train.eval_every=0 --set train.eval_batches=2 --set train.log_every=1)
model="$tmp/run/checkpoints/latest"
if "$MILLIPEDE" train "$cfg" "${small[@]}" --set "run.dir=$tmp/run" > "$tmp/train.out" 2>&1 &&
    [ -s "$model/index.h5" ]; then
    ok "train writes $model"
else
    bad "train writes checkpoints/latest: $(tail -5 "$tmp/train.out")"
fi

# --- eval ---
rc=0
"$MILLIPEDE" eval "$cfg" --model "$model" "${small[@]}" > "$tmp/eval.json" 2> "$tmp/eval.err" || rc=$?
if [ $rc -eq 0 ] && [ "$(wc -l < "$tmp/eval.json")" -eq 1 ]; then
    ok "eval exits 0 with one line on stdout"
else
    bad "eval (status $rc): $(head -c 600 "$tmp/eval.json") $(tail -3 "$tmp/eval.err")"
fi
python3 - "$tmp/eval.json" "$tmp/run/metrics.jsonl" <<'EOF' && ok "eval JSON: fields, ranges, equals the trainer's last val_loss" || bad "eval JSON checks"
import json, math, sys
d = json.loads(open(sys.argv[1]).read())
vl = d["val_loss"]
assert isinstance(vl, float) and math.isfinite(vl) and vl > 0, vl
# the C double divided by ln 2 and printed with 9 digits, against the printed val_loss:
# <= 2 x 5e-9 apart; a wrong unit (nats, log10) or token count is off by >= 30%
assert abs(d["bits_per_token"] - vl / math.log(2)) < 1e-6 * vl, d
assert abs(d["bits_per_byte"] - vl / math.log(2)) < 1e-6 * vl, d   # vocab 256: bytes
assert d["tokens"] == 2 * 2 * 32, d["tokens"]                      # eval_batches x B x T
layers = d["layers"]
assert len(layers) == 1, layers
L = layers[0]
assert L["block"] == 1 and L["kind"] == "peer" and L["experts"] == 256, L
assert 0 < L["usage"] <= 1, L
# usage is a fraction of 256 experts; at most B*T*H*k = 512 selections were made. m / 256
# has at most 8 significant digits, so the 9 printed are exact and so is * 256: 1e-9 asks
# for an integer. KL(p || uniform) <= log 256 exactly; the computed value exceeds it by at
# most ~1e-15 and 9-digit printing of log 256 = 5.545177444 rounds down.
assert abs(L["usage"] * 256 - round(L["usage"] * 256)) < 1e-9, L
assert 0 <= L["unevenness"] <= math.log(256) + 1e-9, L
# a uniform router's usage after 2 batches x 2 x 32 tokens x 2 heads x top-4 = 1024 draws
# (eval prints 9 significant digits: relative rounding <= 5e-9)
assert abs(L["usage_uniform"] - (1 - (1 - 1 / 256) ** 1024)) <= 5e-9 * L["usage_uniform"], L
# The trainer's last validation logged the same layer statistics: the same model, batches
# and single rank, so the same selections and the same sums in the same order; metrics.jsonl
# prints 6 significant digits (relative rounding <= 5e-6), eval 9.
tl = [json.loads(x) for x in open(sys.argv[2]) if '"val_loss"' in x][-1]["layers"][0]
assert tl["block"] == 1, tl
assert abs(tl["usage"] - L["usage"]) <= 5e-6 * L["usage"], (tl, L)
assert abs(tl["unevenness"] - L["unevenness"]) <= 5e-6 * L["unevenness"], (tl, L)
assert abs(tl["usage_uniform"] - L["usage_uniform"]) <= 5e-6 * L["usage_uniform"], (tl, L)
# The trainer validated the final parameters on the same batches before saving: the same
# binary on one rank, the same bits (float32 in the checkpoint, exactly), the same forward
# in the same order, and its mean over ranks (x * 2) / 2 is exact; so the same double, and
# both print it with 9 significant digits. Any difference is a round trip that lost something.
last = [json.loads(x)["val_loss"] for x in open(sys.argv[2]) if '"val_loss"' in x][-1]
assert last == vl, (last, vl)
EOF

# --batches changes the token count; a fixed batch set gives the same answer twice.
"$MILLIPEDE" eval "$cfg" --model "$model" "${small[@]}" --batches 3 > "$tmp/e3a.json" 2>/dev/null
"$MILLIPEDE" eval "$cfg" --model "$model" "${small[@]}" --batches 3 > "$tmp/e3b.json" 2>/dev/null
python3 -c '
import json, sys
a = json.loads(open(sys.argv[1]).read()); b = json.loads(open(sys.argv[2]).read())
assert a["tokens"] == 3 * 2 * 32 and a == b, (a, b)' "$tmp/e3a.json" "$tmp/e3b.json" &&
    ok "eval --batches 3: 192 tokens, deterministic" || bad "eval --batches 3"

# The trainer's usage on 2 ranks counts the selections of both ranks' tokens (z summed over
# ranks): it equals the 1-rank run's. The two runs differ only in summation order (~1e-7
# relative in the scores), so a selection differs only where two candidate scores tie to
# within that, which continuous random values make unlikely: allow 2 of the 256 experts.
# Counting one rank's selections alone would give the usage of 512 instead of 1024 draws.
train 2 "$tmp/run2"
python3 - "$tmp/run/metrics.jsonl" "$tmp/run2/metrics.jsonl" <<'EOF' &&
import json, sys
u = [[json.loads(x) for x in open(p) if '"val_loss"' in x][-1]["layers"][0]["usage"] for p in sys.argv[1:]]
assert abs(u[0] - u[1]) <= 2 / 256, u
EOF
    ok "trainer's usage on 2 ranks equals 1 rank's" || bad "trainer's usage on 2 ranks: $(tail -3 "$tmp/run2.out")"

# eval on P ranks: the model sharded as in training, each rank reading only its own rows.
# Of the 2-rank run's checkpoint on 2 ranks: the trainer's own last validation, the same
# slices through the same exchange in the same order, so the same double.
mpirun -n 2 "$MILLIPEDE" eval "$cfg" --model "$tmp/run2/checkpoints/latest" "${small[@]}" \
    > "$tmp/eval2.json" 2> "$tmp/eval2.err"
python3 - "$tmp/eval2.json" "$tmp/run2/metrics.jsonl" <<'EOF' && ok "eval on 2 ranks equals the 2-rank trainer's last val_loss" || bad "eval on 2 ranks: $(tail -3 "$tmp/eval2.err")"
import json, sys
d = json.loads(open(sys.argv[1]).read())
last = [json.loads(x)["val_loss"] for x in open(sys.argv[2]) if '"val_loss"' in x][-1]
assert d["ranks"] == 2 and d["val_loss"] == last, (d, last)
EOF
# The 1-rank model evaluated on 1, 2 and 3 ranks (6 sequences a batch, so each rank has
# some): the ranks sum each token's expert parts in another grouping (per owner, then over
# owners) and run their GEMMs on other row counts, ~1e-7 relative, and a top-k selection
# can flip on a near-tie: the cross-P tolerance of ckpt_lib.sh (XRUN_LOSS_TOL); a rank that
# read the wrong rows, or a loss averaged over one rank's slice only, is off by > 1e-2.
for P in 1 2 3; do
    mpirun -n $P "$MILLIPEDE" eval "$cfg" --model "$model" "${small[@]}" --set train.batch_size=6 \
        > "$tmp/evalP$P.json" 2> "$tmp/evalP$P.err" || bad "eval on $P ranks: $(tail -3 "$tmp/evalP$P.err")"
done
python3 - "$tmp"/evalP{1,2,3}.json $XRUN_LOSS_TOL <<'EOF' && ok "eval on 1, 2, 3 ranks agrees ($XRUN_LOSS_TOL relative)" || bad "eval on 1, 2, 3 ranks agrees"
import json, sys
d = [json.loads(open(p).read()) for p in sys.argv[1:4]]
tol = float(sys.argv[4])
print("   eval val_loss on 1, 2, 3 ranks:", [x["val_loss"] for x in d])
assert [x["ranks"] for x in d] == [1, 2, 3], d
for x in d[1:]:
    assert abs(x["val_loss"] - d[0]["val_loss"]) <= tol * d[0]["val_loss"], (x, d[0])
    # usage counts every rank's selections (z summed over ranks): the same 256 experts up
    # to the flips allowed above (2 of 256, as for the trainer)
    assert abs(x["layers"][0]["usage"] - d[0]["layers"][0]["usage"]) <= 2 / 256, (x, d[0])
EOF

"$MILLIPEDE" eval --help > "$tmp/help.out" 2>&1 && grep -q "usage: millipede eval" "$tmp/help.out" &&
    ok "eval --help" || bad "eval --help"

# --- sample ---
prompt="Line 3 of document"
rc=0
"$MILLIPEDE" sample "$cfg" --model "$model" "${small[@]}" --prompt "$prompt" --tokens 40 \
    --seed 5 > "$tmp/s1.out" 2> "$tmp/s1.err" || rc=$?
len=$(wc -c < "$tmp/s1.out")
if [ $rc -eq 0 ] && [ "$len" -eq $(( ${#prompt} + 40 )) ] && [ "$(head -c ${#prompt} "$tmp/s1.out")" = "$prompt" ]; then
    ok "sample prints the prompt then 40 bytes"
else
    bad "sample (status $rc, $len bytes): $(head -c 200 "$tmp/s1.out") $(tail -2 "$tmp/s1.err")"
fi
"$MILLIPEDE" sample "$cfg" --model "$model" "${small[@]}" --prompt "$prompt" --tokens 40 \
    --seed 5 > "$tmp/s2.out" 2>/dev/null
cmp -s "$tmp/s1.out" "$tmp/s2.out" && ok "sample: same seed, same text" || bad "sample: same seed, same text"
"$MILLIPEDE" sample "$cfg" --model "$model" "${small[@]}" --prompt "$prompt" --tokens 40 \
    --seed 6 > "$tmp/s3.out" 2>/dev/null
cmp -s "$tmp/s1.out" "$tmp/s3.out" && bad "sample: another seed, other text" || ok "sample: another seed, other text"
# Greedy decoding ignores the seed; context overflow (prompt + 60 > 32) slides the window.
"$MILLIPEDE" sample "$cfg" --model "$model" "${small[@]}" --prompt "$prompt" --tokens 60 \
    --temperature 0 --seed 1 > "$tmp/g1.out" 2>/dev/null
"$MILLIPEDE" sample "$cfg" --model "$model" "${small[@]}" --prompt "$prompt" --tokens 60 \
    --temperature 0 --seed 2 > "$tmp/g2.out" 2>/dev/null
[ "$(wc -c < "$tmp/g1.out")" -eq $(( ${#prompt} + 60 )) ] && cmp -s "$tmp/g1.out" "$tmp/g2.out" &&
    ok "greedy sampling past the context: same text for any seed" || bad "greedy sampling"
# top-k 1 is greedy too.
"$MILLIPEDE" sample "$cfg" --model "$model" "${small[@]}" --prompt "$prompt" --tokens 60 \
    --top-k 1 --seed 9 > "$tmp/k1.out" 2>/dev/null
cmp -s "$tmp/g1.out" "$tmp/k1.out" && ok "--top-k 1 equals greedy" || bad "--top-k 1 equals greedy"
# sample on 2 and 3 ranks: rank 0 draws from logits that differ from 1 rank's by rounding
# (~1e-7), so a draw could differ only where the uniform number lands within that of a
# boundary of the cumulative distribution (a chance of ~1e-6 per token), or after a top-k
# flip, which moves that token's logits by ~1e-2 and changes the draw only if it lands that
# close to a boundary. Rank 0 alone prints.
for P in 2 3; do
    mpirun -n $P "$MILLIPEDE" sample "$cfg" --model "$model" "${small[@]}" --prompt "$prompt" \
        --tokens 40 --seed 5 > "$tmp/sP$P.out" 2> "$tmp/sP$P.err"
    cmp -s "$tmp/s1.out" "$tmp/sP$P.out" && ok "sample on $P ranks: the 1-rank text" ||
        bad "sample on $P ranks: the 1-rank text ($(head -c 120 "$tmp/sP$P.out") / $(tail -2 "$tmp/sP$P.err"))"
done
"$MILLIPEDE" sample "$cfg" --model "$model" "${small[@]}" --prompt "$prompt" --tokens 0 > "$tmp/t0.out" 2>/dev/null &&
    [ "$(cat "$tmp/t0.out")" = "$prompt" ] && ok "--tokens 0 prints the prompt" || bad "--tokens 0"

# --- bad input: status 2, exactly one line, starting "millipede: error:" and naming the problem ---
expect_error() {   # name, pattern, command...
    local name=$1 pat=$2; shift 2
    local rc=0
    "$@" > "$tmp/err.out" 2> "$tmp/err.txt" || rc=$?
    if [ $rc -eq 2 ] && [ "$(wc -l < "$tmp/err.txt")" -eq 1 ] &&
        grep -q "^millipede: error: .*$pat" "$tmp/err.txt"; then
        ok "$name"
    else
        bad "$name (status $rc): $(head -3 "$tmp/err.txt")"
    fi
}
# A second model whose width disagrees with the config used to evaluate it.
"$MILLIPEDE" train "$cfg" "${small[@]}" --set train.steps=1 --set "run.dir=$tmp/run64" \
    --set model.d_model=64 > /dev/null 2>&1 || bad "train the d_model 64 model"
printf 'not an HDF5 file\n' > "$tmp/junk.h5"

expect_error "eval: missing --model" "--model" "$MILLIPEDE" eval "$cfg" "${small[@]}"
expect_error "eval: nonexistent model file" "nope.h5" "$MILLIPEDE" eval "$cfg" --model "$tmp/nope.h5" "${small[@]}"
expect_error "eval: not an HDF5 file" "junk.h5: not an HDF5 file" "$MILLIPEDE" eval "$cfg" --model "$tmp/junk.h5" "${small[@]}"
expect_error "eval: d_model 32 model with a d_model 64 config" "key 'model.d_model' is 32 in the checkpoint but 64" \
    "$MILLIPEDE" eval "$cfg" --model "$model" "${small[@]}" --set model.d_model=64
expect_error "eval: d_model 64 model with a d_model 32 config" "key 'model.d_model' is 64 in the checkpoint but 32" \
    "$MILLIPEDE" eval "$cfg" --model "$tmp/run64" "${small[@]}"
expect_error "eval: other expert count" "peer.experts" \
    "$MILLIPEDE" eval "$cfg" --model "$model" "${small[@]}" --set peer.experts=1024
expect_error "eval: bad --batches" "--batches" "$MILLIPEDE" eval "$cfg" --model "$model" --batches 0
expect_error "eval: unknown option" "--frob" "$MILLIPEDE" eval "$cfg" --model "$model" --frob
expect_error "eval: missing config" "nope.ini" "$MILLIPEDE" eval "$tmp/nope.ini" --model "$model"
expect_error "eval: missing data.val" "none.bin" \
    "$MILLIPEDE" eval "$cfg" --model "$model" "${small[@]}" --set "data.val=$tmp/none.bin"
s=("$MILLIPEDE" sample "$cfg" --model "$model" "${small[@]}")
expect_error "sample: negative --tokens" "--tokens" "${s[@]}" --prompt hi --tokens -3
expect_error "sample: --tokens not a number" "--tokens" "${s[@]}" --prompt hi --tokens 12x
expect_error "sample: empty prompt" "--prompt" "${s[@]}" --prompt "" --tokens 3
expect_error "sample: negative temperature" "--temperature" "${s[@]}" --prompt hi --tokens 3 --temperature -1
expect_error "sample: negative top-k" "--top-k" "${s[@]}" --prompt hi --tokens 3 --top-k -2
expect_error "sample: missing --tokens" "--tokens" "${s[@]}" --prompt hi
expect_error "sample: missing --model" "--model" "$MILLIPEDE" sample "$cfg" --prompt hi --tokens 3
expect_error "sample: nonexistent model file" "nope.h5" "$MILLIPEDE" sample "$cfg" --model "$tmp/nope.h5" --prompt hi --tokens 3
expect_error "sample: shape mismatch" "model.d_model" "${s[@]}" --set model.d_model=64 --prompt hi --tokens 3

finish
