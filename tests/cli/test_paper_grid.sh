#!/usr/bin/env bash
# tools/paper/grid.py end to end at toy size (label paper; .ci/run runs it after the
# quickstart, which prepared data/demo): every Table 1 and Table 2 run trains and is
# evaluated, docs-style Markdown and both figures are written, and a second invocation
# finds every run finished and trains nothing.
set -euo pipefail
: "${MILLIPEDE:?}" "${MP_SOURCE_DIR:?}"
tmp=$(mktemp -d "${TMPDIR:-/tmp}/mp_test_grid.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
fails=0
ok() { echo "ok   $1"; }
bad() { echo "FAIL $1"; fails=$((fails + 1)); }
check() { local name=$1; shift; if "$@"; then ok "$name"; else bad "$name"; fi; }
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
grid() {
    python3 "$MP_SOURCE_DIR/tools/paper/grid.py" --millipede "$MILLIPEDE" --runs "$tmp/runs" \
        --out "$tmp/quality.md" --jobs 2 --steps1 4 --steps2 4 --seeds 1,2 \
        --experts 64,256 --corpora demo --eval-batches 8
}
grid > "$tmp/first.log" 2>&1 || { cat "$tmp/first.log"; bad "grid.py runs"; exit 1; }
ok "grid.py runs"
q=$tmp/quality.md
# Table 1: dense, PKM and PEER for 2 seeds on the demo corpus; Table 2: 2 N x 3 routers
if [ "$(grep -c '^grid: t[12]-.*: train' "$tmp/first.log")" -eq 12 ]; then
    ok "6 Table 1 runs and 6 Table 2 runs trained and evaluated"
else
    cat "$tmp/first.log"; bad "6 Table 1 runs and 6 Table 2 runs trained and evaluated"
fi
check "Table 1 row with mean ± sd of two seeds" grep -q '^| demo | [0-9.]* ± [0-9.]* |' "$q"
check "Table 2: one row per N and router" \
    test "$(grep -c '^| [0-9,]* ([0-9]*²) | \(yes\|no\) | \(yes\|no\) |' "$q")" -eq 6
check "figures" test -s "$tmp/quality/table1_curves.png" -a -s "$tmp/quality/fig3a_loss_vs_experts.png"
# resumable: nothing left to train, and the report is the same
cp "$q" "$tmp/first.md"
t0=$(date +%s)
grid > "$tmp/second.log" 2>&1 || { cat "$tmp/second.log"; bad "grid.py again"; }
check "second invocation: no new training steps" \
    test "$(cat "$tmp"/runs/*/metrics.jsonl | grep -c '"loss"')" -eq $((4 * 12))
check "second invocation: same tables" \
    diff <(grep '^|' "$tmp/first.md") <(grep '^|' "$q")
echo "second invocation: $(( $(date +%s) - t0 )) s"
[ "$fails" -eq 0 ]
