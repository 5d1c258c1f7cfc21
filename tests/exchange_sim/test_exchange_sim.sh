#!/usr/bin/env bash
# tools/bench/exchange_sim.c against an independent count (docs/benchmarks.md, "The exchange
# at 1 to 1024 ranks (simulated)"): at small shapes with every rank simulated, the bytes it
# reports for the step equal what src/model/exchange.c would add up for the same selections,
# counted here in Python from the selections it dumps (owners from the bounds
# floor(r n / P), not from mp_shard_owner); a uniform router at a large sample is balanced
# (max/mean <= 1.02); a skewed profile is not; a bad command line exits 2 with one line.
set -u
X=${EXCHANGE_SIM:?set EXCHANGE_SIM to the exchange_sim binary}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
fail=0
ok() { echo "ok: $*"; }
bad() { echo "FAIL: $*"; fail=1; }

# 1. byte counts: P = 3 and 5 (5 does not divide n = 16: shards of 3 and 4 sub-keys)
for shape in "3 pk 50" "5 flat 40" "2 pk 7"; do
    set -- $shape
    if "$X" sim --P "$1" --n 16 --H 2 --k 4 --C 8 --B "$3" --select "$2" --seed 3 \
        --dump-sel "$tmp/sel.bin" > "$tmp/out.json" 2> "$tmp/err" &&
        python3 - "$tmp/sel.bin" "$tmp/out.json" "$1" "$3" <<'PY'
import json, struct, sys
sel_path, out_path, P, B = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
j = json.load(open(out_path))
raw = open(sel_path, "rb").read()
assert raw[:8] == b"MPXSEL1\0", "magic"
n, H, k = struct.unpack("<3i", raw[8:20])
(ntok,) = struct.unpack("<q", raw[20:28])
ids = struct.unpack(f"<{ntok * H * k}i", raw[28:])
S, C = H * k, j["C"]
assert ntok == P * B, (ntok, P, B)
bounds = [r * n // P for r in range(P + 1)]
def owner(e):
    a = e // n
    return [r for r in range(P) if bounds[r] <= a < bounds[r + 1]][0]
# tok[s][o], rec[s][o]: tokens (once per owner) and records rank s sends owner o
tok = [[0] * P for _ in range(P)]
rec = [[0] * P for _ in range(P)]
for s in range(P):
    for t in range(B):
        owners = [owner(e) for e in ids[(s * B + t) * S:(s * B + t + 1) * S]]
        for o in owners:
            rec[s][o] += 1
        for o in set(owners):
            tok[s][o] += 1
sent = smin = 0
for me in range(P):
    t_out = sum(tok[me][o] for o in range(P) if o != me)
    r_out = sum(rec[me][o] for o in range(P) if o != me)
    t_in = sum(tok[s][me] for s in range(P) if s != me)
    r_in = sum(rec[s][me] for s in range(P) if s != me)
    # mp_exchange_forward, then mp_exchange_backward
    sent += 4 * (C * t_out + 3 * r_out + C * t_in) + 16 * (P - 1)
    sent += 4 * (C * t_out + C * t_in + r_in)
    smin += 4 * (4 * C * t_out + 3 * r_out)
pairs = sum(map(sum, tok))
assert j["bytes_sent_step"] == sent, ("bytes_sent_step", j["bytes_sent_step"], sent)
assert j["bytes_min_step"] == smin, ("bytes_min_step", j["bytes_min_step"], smin)
assert abs(j["bytes_sent_per_token"] * P * B - sent) <= 1e-6 * sent, ("per token", j["bytes_sent_per_token"], sent / P / B)
assert abs(j["owners_per_token"] - pairs / (P * B)) < 1e-9, ("owners", j["owners_per_token"], pairs / (P * B))
served = [sum(rec[s][o] for s in range(P)) for o in range(P)]
imb = max(served) / (sum(served) / P)
assert abs(j["rec_imbalance"] - imb) < 1e-9, ("rec_imbalance", j["rec_imbalance"], imb)
print(f"P={P}: {sent} bytes, min {smin}, imbalance {imb:.4f}")
PY
    then ok "P=$1 ($2): bytes sent and minimum equal the independent count"
    else bad "P=$1 ($2): $(cat "$tmp/err")"; fi
done

# 2. a uniform router at a large sample: every owner serves the same load within 2 %
out=$("$X" sim --P 8 --n 64 --H 8 --k 16 --C 64 --B 4096 2>&1)
if python3 -c "import json,sys; j=json.loads(sys.argv[1]); assert 1 <= j['rec_imbalance'] <= 1.02 and 1 <= j['tok_imbalance'] <= 1.02, j" "$out"; then
    ok "uniform, 8 x 4096 tokens: imbalance <= 1.02"
else bad "uniform imbalance: $out"; fi

# 3. a skewed profile (a dump whose sub-key 0 holds a third of the selections) is seen
python3 - "$tmp/skew.bin" <<'PY'
import random, struct, sys
n, H, k, T = 16, 1, 4, 2000
random.seed(1)
ids = []
for t in range(T):
    a_s = random.sample(range(1, n), k - 1) + [0]   # sub-key 0 in every head: 1/4 of the load
    ids += [a * n + random.randrange(n) for a in a_s]
open(sys.argv[1], "wb").write(b"MPXSEL1\0" + struct.pack("<3iq", n, H, k, T) + struct.pack(f"<{len(ids)}i", *ids))
PY
out=$("$X" sim --P 4 --n 64 --H 2 --k 4 --C 8 --B 4096 --dist "profile:$tmp/skew.bin" 2>&1)
if python3 -c "import json,sys; j=json.loads(sys.argv[1]); assert j['rec_imbalance'] > 1.2, j" "$out"; then
    ok "skewed profile: imbalance > 1.2"
else bad "skewed profile: $out"; fi

# 4. bad command lines: exit 2, one line
for args in "sim --P 0 --n 16" "sim --P 32 --n 16" "sim --n 16" "sim --P 2 --n 16 --select x" "bogus"; do
    "$X" $args > "$tmp/o" 2> "$tmp/e"; rc=$?
    if [ $rc -eq 2 ] && [ "$(wc -l < "$tmp/e")" -eq 1 ] && grep -q "^exchange_sim: error: " "$tmp/e"; then
        ok "'$args': exit 2, one line"
    else bad "'$args': status $rc, $(cat "$tmp/e")"; fi
done
# 5. a real run: `mpirun -n 3 millipede train` reports for its first step exactly the bytes
# the simulator counts on the same selections (the initial model's routing of that step's
# global batch, dumped in one process: BatchNorm statistics over the global batch, as the
# sharded run all-reduces them; batch 6 = 2 sequences per rank, in rank order)
if [ -n "${MILLIPEDE:-}" ] && command -v mpirun > /dev/null; then
    real=$(
        source "$MP_SOURCE_DIR/tests/cli/ckpt_lib.sh" > /dev/null   # corpus, $cfg, ${small[@]}
        one=(--set train.steps=1 --set train.log_every=1 --set train.eval_every=0 --set checkpoint.every=0)
        mpirun -n 3 "$MILLIPEDE" train "$cfg" "${small[@]}" "${one[@]}" --set "run.dir=$tmp/r3" \
            > "$tmp/r3.out" 2>&1 || { echo "train failed: $(tail -3 "$tmp/r3.out")"; exit 1; }
        "$X" dump "$cfg" "${small[@]}" "${one[@]}" --init --batches 1 --out "$tmp/sel.bin" 2> /dev/null ||
            { echo "dump failed"; exit 1; }
        head -1 "$tmp/r3/metrics.jsonl"
        "$X" sim --P 3 --n 16 --H 2 --k 4 --C 32 --B 64 --dist "replay:$tmp/sel.bin"
    )
    if python3 - "$real" <<'PY'
import json, sys
lines = sys.argv[1].strip().splitlines()
assert len(lines) == 2, lines
m, s = json.loads(lines[0]), json.loads(lines[1])
assert m["step"] == 1 and m["ranks"] == 3, m
assert m["exchange_bytes_sent"] == s["bytes_sent_step"], (m["exchange_bytes_sent"], s["bytes_sent_step"])
assert m["exchange_bytes_min"] == s["bytes_min_step"], (m["exchange_bytes_min"], s["bytes_min_step"])
assert abs(m["load_imbalance"] - s["rec_imbalance"]) < 1e-4, (m["load_imbalance"], s["rec_imbalance"])
print(f"real run: {m['exchange_bytes_sent']} bytes sent, imbalance {m['load_imbalance']}: simulator agrees")
PY
    then ok "mpirun -n 3 millipede train: exchange_bytes_sent, _min and load_imbalance of step 1 equal the simulator's"
    else bad "real run vs simulator: $real"; fi
else
    echo "skip: the real-run comparison needs MILLIPEDE and mpirun"
fi
exit $fail
