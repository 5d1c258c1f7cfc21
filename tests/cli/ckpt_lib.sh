# Shared by tests/cli/test_ckpt_*.sh and test_eval_sample.sh (sourced; not a test itself):
# a scratch directory, a tiny corpus, a tiny PEER model and helpers to train it on P ranks
# and compare runs.
set -uo pipefail
: "${MILLIPEDE:?path of the millipede binary}" "${MP_SOURCE_DIR:?repository root}"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_mpi_yield_when_idle=1
export OMPI_MCA_rmaps_base_oversubscribe=1 OMP_NUM_THREADS=1
unset SLURM_NTASKS SLURM_JOB_ID   # the tests pick their own rank counts
tmp=$(mktemp -d "${TMPDIR:-/tmp}/mp_test_ckpt.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
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

# compare A B [mode] with checkpoint dirs A, B:
#   mode exact: every dataset of the index (global views of the expert tables included)
#               bitwise equal
#   mode tol:   max relative difference per dataset <= 1e-4 (another rank count)
#   mode tol=X: the same with X
compare_ckpt() {
    python3 - "$@" <<'EOF'
import sys, h5py, numpy as np
a, b = sys.argv[1], sys.argv[2]
mode = sys.argv[3] if len(sys.argv) > 3 else "exact"
rtol = float(mode[4:]) if mode.startswith("tol=") else 1e-4
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
for k in A:
    x, y = A[k], B[k]
    assert x.shape == y.shape and x.dtype == np.float32, k
    assert np.all(np.isfinite(x)), k
    if mode == "exact":
        if not np.array_equal(x.view(np.uint32), y.view(np.uint32)):
            bad.append(k)
    else:
        den = max(float(np.linalg.norm(x)), 1e-30)
        if float(np.linalg.norm(x - y)) / den > rtol and float(np.max(np.abs(x - y))) > 1e-7:
            bad.append(k)
if bad:
    print(f"{len(bad)} datasets differ, e.g. {bad[:3]}")
    sys.exit(1)
EOF
}

# compare_losses A B FIRST LAST [rtol]: the training (and validation) losses of metrics.jsonl
# in run dirs A and B for steps FIRST..LAST; rtol 0 (default) = the same printed values.
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
if (rtol == 0 and any(A[k] != B[k] for k in A)) or worst > rtol:
    k = max(A, key=lambda k: abs(A[k] - B[k]) / abs(A[k]))
    print(f"losses differ: {k}: {A[k]!r} vs {B[k]!r} (worst relative {worst:.3g}, allowed {rtol})")
    sys.exit(1)
EOF
}
