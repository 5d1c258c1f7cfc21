# Shared by tests/cli/test_ckpt_*.sh and test_eval_sample.sh (sourced; not a test itself):
# a scratch directory, a tiny corpus, a tiny PEER model and helpers to train it on P ranks
# and compare runs.
set -uo pipefail
: "${MILLIPEDE:?path of the millipede binary}" "${MP_SOURCE_DIR:?repository root}"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_mpi_yield_when_idle=1
export OMPI_MCA_rmaps_base_oversubscribe=1 OMP_NUM_THREADS=1
unset SLURM_NTASKS SLURM_JOB_ID   # the tests pick their own rank counts
tmp=$(mktemp -d "${TMPDIR:-/tmp}/mp_test_ckpt.XXXXXX")
# MP_TEST_KEEP=1 keeps the scratch folder for a look after a failure
trap "${MP_TEST_KEEP:+:} rm -rf \"$tmp\"" EXIT
passed=0 failed=0
ok() { passed=$((passed + 1)); echo "ok   $1"; }
bad() { failed=$((failed + 1)); echo "FAIL $1"; }
check() { local name=$1; shift; if "$@"; then ok "$name"; else bad "$name"; fi; }
finish() { echo "$passed passed, $failed failed"; [ "$failed" -eq 0 ]; }

# ~24 KB of varied text -> train.bin / val.bin
mkdir -p "$tmp/docs"
for i in $(seq 1 40); do
    {
        echo "Document $i."
        for k in $(seq 1 12); do
            echo "Line $k of document $i: the $((i * k)) quick brown foxes jump over $k lazy dogs."
        done
    } > "$tmp/docs/doc_$i.txt"
done
"$MILLIPEDE" data prepare --out "$tmp/data" "$tmp/docs" > "$tmp/prepare.out" 2>&1 ||
    { echo "data prepare failed: $(cat "$tmp/prepare.out")"; exit 1; }

cfg="$MP_SOURCE_DIR/configs/tiny.ini"
# 20 steps of a 2-block model with a PEER layer of 256 experts (n = 16: up to 16 ranks);
# batch 6 splits over 1, 2 and 3 ranks.
small=(--set "data.train=$tmp/data/train.bin" --set "data.val=$tmp/data/val.bin"
       --set model.context=32 --set model.d_model=32 --set model.n_heads=2 --set model.n_layers=2
       --set model.ffn=dense,peer --set peer.experts=256 --set peer.heads=2 --set peer.topk=4
       --set peer.key_dim=16 --set train.batch_size=6 --set train.steps=20 --set train.warmup=2
       --set train.eval_every=10 --set train.eval_batches=2 --set train.log_every=5
       --set checkpoint.every=10 --set checkpoint.keep=3)

# train P RUN_DIR [args...]: P ranks (1 runs without mpirun); output in RUN_DIR.out;
# returns the exit status.
train() {
    local P=$1 dir=$2; shift 2
    local launch=()
    [ "$P" -gt 1 ] && launch=(mpirun -n "$P")
    "${launch[@]}" "$MILLIPEDE" train "$cfg" "${small[@]}" --set "run.dir=$dir" "$@" > "$dir.out" 2>&1
}

# The step `latest` points at ("" when none).
latest_step() { local t; t=$(readlink "$1/checkpoints/latest" 2>/dev/null) && echo "${t#step_}" | sed 's/^0*//'; }

# wait_for_steps RUN_DIR PID: until metrics.jsonl has 3 lines (the run is past its start,
# its handlers in place); 1 when the process ended first or 30 s passed.
wait_for_steps() {
    for _ in $(seq 1 300); do
        [ -f "$1/metrics.jsonl" ] && [ "$(wc -l < "$1/metrics.jsonl")" -ge 3 ] && return 0
        kill -0 "$2" 2>/dev/null || return 1
        sleep 0.1
    done
    return 1
}


# Tolerances of runs that differ in rank count or backend (used by test_ckpt_resume,
# test_cuda_emu; tests/python/test_sharding.py repeats the argument for its own runs).
# Both sides are fp32 and do the same arithmetic in another order (the all-reduce over other
# ranks, each rank's GEMM shapes, CUDA kernels against OpenBLAS, OpenBLAS's kernel family,
# which it picks by CPU: Haswell, Sandybridge, Prescott and SkylakeX/Cooperlake all differ).
# (a) What rounding can do. Continuously: each step's sums of K <= ~200 terms differ by
# ~sqrt(K) u ~ 1e-6 relative (u = 2^-24), worst case K u ~ 1e-5; this grows little over 20
# steps (measured: losses ~1e-7, state ~1e-6; compare_ckpt leaves out the attention key
# bias, which rounding alone decides). Discontinuously: the PEER top-k flips on any near-tie
# that this rounding crosses; the smallest decision margins here are ~1e-5 of the score
# scale, so flips happen. One flip swaps one of the H k = 8 experts of one token: swapping
# the k-th and (k+1)-th expert of one (token, head) in the reference moves the mean loss of
# 192 tokens by 5e-6 (median) to 7.5e-5 (largest of 40 draws); the state feels it through
# one token's gradient, routing parameters (W_q, BN, K1, K2) and Adam's first moment most.
# Seen (with model.init_std = 0.02): 1 and 2 ranks from the same start flip ~5 times in
# steps 11-20, at most once a step, on the CPU (default kernels) and in the emulated CUDA
# backend with the Haswell kernels: losses up to 2e-5; at step 20 parameters 2.5e-3
# (peer.bn.b), Adam m 2.7e-2 (peer.wq), Adam v 4.4e-3, BN statistics 1.8e-4. Allowing 3
# flips of the largest size in one step and ~10 in a run: losses 2.5e-4, parameters and BN
# statistics 5e-3, moments 5e-2.
# (b) What the comparisons exist to catch, measured by injecting each bug into a P = 2 -> 3
# resume (and a P = 2 run without the gradient all-reduce), largest over steps 11-20, with
# configs/tiny.ini's model.init_std = 0.1 (with 0.02 the losses move 0.3-3x as much):
#   bug                                losses   params  Adam m/v  BN stats
#   expert rows shifted by one row     1.6e-3   1.2     1.2       1.2e-2
#   last row of each shard not loaded  1.2e-4   1.2e-1  1.9e-1    5.8e-4
#   Adam moments lost                  1.0e-2   2.8e-1  1.1       6e-2
#   data one step ahead                2.5e-2   4.7e-2  3.7e-1    1.7e-2
#   BN running statistics lost         3.4e-4   -       -         1.3
#   no gradient all-reduce (P = 2)     1.4e-2   6.3e-1  2.5       4.9e-2
#   Adam step count one too high       4.0e-4   3.3e-3  4.6e-2    3.8e-4
# So: losses 5e-4, parameters and BN statistics 2e-2, Adam moments 2e-1, 2-4x above (a).
# Every bug of the table fails one of the two checks by 2x or more, but the step count,
# whose effect is flip-sized: the bitwise resume on the same rank count pins that one (and
# every other bug of the table) exactly.
XRUN_LOSS_TOL=5e-4
XRUN_STATE_TOL=2e-2,2e-1

# compare_ckpt A B [mode] with checkpoint dirs A, B:
#   mode exact:     every dataset of the index (global views of the expert tables included)
#                   bitwise equal: the same binary on the same rank count does the same
#                   operations in the same order, so nothing may differ by even one bit
#   mode tol=X[,M]: ||a - b|| / ||a|| <= X per dataset of params and state, <= M (default X)
#                   per dataset of adam_m and adam_v (another rank count or backend: see
#                   above); prints the largest differences
compare_ckpt() {
    python3 - "$@" <<'EOF'
import sys, h5py, numpy as np
a, b = sys.argv[1], sys.argv[2]
mode = sys.argv[3] if len(sys.argv) > 3 else "exact"
if mode != "exact":
    assert mode.startswith("tol="), mode
    tols = [float(t) for t in mode[4:].split(",")]
    rtol = {"params": tols[0], "state": tols[0], "adam_m": tols[-1], "adam_v": tols[-1]}
def load(d):
    out = {}
    with h5py.File(d + "/index.h5", "r") as f:
        for g in ("params", "adam_m", "adam_v", "state"):
            for k in f[g]:
                out[g + "/" + k] = f[g][k][()]
    return out
A, B = load(a), load(b)
assert sorted(A) == sorted(B), (sorted(set(A) ^ set(B)))
assert len(A) > 20
bad = []
worst = {}   # group: (relative difference, dataset)
for k in A:
    x, y = A[k], B[k]
    assert x.shape == y.shape and x.dtype == np.float32, k
    assert np.all(np.isfinite(x)), k
    if mode == "exact":
        if not np.array_equal(x.view(np.uint32), y.view(np.uint32)):
            bad.append(k)
    elif k.endswith("_bias"):
        # Sub-key balance biases move in steps of +-balance_rate by a sign of integer counts:
        # a top-k flip (see (a) above) changes the counts of at most 4 sub-keys of one head
        # by one, which moves a bias by a whole step only where its count sat at the mean,
        # and later steps can repeat it: so a flip makes a few entries differ by 0.01-0.02,
        # not a relative amount. What the check is for (biases not restored on resume, or
        # counts not summed over ranks) changes nearly every entry. Allowed: a quarter.
        diff = float(np.mean(np.abs(x.astype(np.float64) - y) > 1e-6))
        worst["bias"] = max(worst.get("bias", (0.0, k)), (diff, k))
        rtol["bias"] = 0.25
        if diff > 0.25:
            bad.append(f"{k} {diff:.0%} of entries")
    else:
        if k.endswith("attn.qkv.b"):
            # the key bias, qkv.b[C:2C], cannot change any output (a constant q . b_k per
            # query row, which the softmax removes), so its gradient is rounding noise,
            # which Adam (eps 1e-8) turns into steps of up to lr of either sign: after N
            # steps it is undetermined up to ~N lr, ~10% of qkv.b. Compared: q and v parts.
            C = x.shape[0] // 3
            x, y = np.concatenate([x[:C], x[2 * C:]]), np.concatenate([y[:C], y[2 * C:]])
        # relative to the dataset's own norm: moments are ~1e-4 (m) and ~1e-8 (v) of the
        # parameters, so no absolute floor can serve every dataset
        g = k.split("/")[0]
        nx = float(np.linalg.norm(x.astype(np.float64)))
        d = float(np.linalg.norm(x.astype(np.float64) - y))
        rel = d / nx if nx > 0 else (0.0 if d == 0 else np.inf)
        worst[g] = max(worst.get(g, (0.0, k)), (rel, k))
        if rel > rtol[g]:
            bad.append(f"{k} {rel:.2g}")
if bad:
    print(f"{len(bad)} datasets differ, e.g. {bad[:3]}" +
          (f" (allowed {mode[4:]})" if mode != "exact" else ""))
    sys.exit(1)
if mode != "exact":
    print("   checkpoints: largest relative differences " +
          ", ".join(f"{g} {w[0]:.2g} ({w[1].split('/')[1]}, allowed {rtol[g]:g})" for g, w in worst.items()))
EOF
}

# compare_losses A B FIRST LAST [rtol]: the training (and validation) losses of metrics.jsonl
# in run dirs A and B for steps FIRST..LAST; rtol 0 (default) = the same printed values
# (bitwise runs: see compare_ckpt exact), else |a - b| / |a| <= rtol for every value.
compare_losses() {
    python3 - "$@" <<'EOF'
import json, sys
a, b, first, last = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
rtol = float(sys.argv[5]) if len(sys.argv) > 5 else 0.0
def read(d):
    out = {}
    for line in open(d + "/metrics.jsonl"):
        x = json.loads(line)
        for key in ("loss", "val_loss"):
            if key in x and first <= x["step"] <= last:
                assert (key, x["step"]) not in out, f"{d}: step {x['step']} twice"
                out[(key, x["step"])] = x[key]
    return out
A, B = read(a), read(b)
need = {("loss", s) for s in range(first, last + 1)}
assert need <= set(A) and need <= set(B), ("missing steps", sorted(need - set(A)), sorted(need - set(B)))
assert set(A) == set(B), sorted(set(A) ^ set(B))
worst = max(abs(A[k] - B[k]) / abs(A[k]) for k in A)
k = max(A, key=lambda k: abs(A[k] - B[k]) / abs(A[k]))
if (rtol == 0 and any(A[k] != B[k] for k in A)) or worst > rtol:
    print(f"losses differ: {k}: {A[k]!r} vs {B[k]!r} (worst relative {worst:.3g}, allowed {rtol})")
    sys.exit(1)
if rtol > 0:   # the measured difference, for the record
    print(f"   losses of steps {first}-{last}: worst relative difference {worst:.2g} at {k} (allowed {rtol:g})")
EOF
}
