#!/usr/bin/env bash
# Builds the libFuzzer harnesses (build-fuzz/, clang, ASan+UBSan) and runs each one for
# SECONDS over its committed corpus: every committed input is replayed first (the
# regression test), then new inputs are tried until SECONDS have passed. New inputs go to a
# scratch directory, not into tests/fuzz/corpus (README.md says how to merge them in).
# Any finding (a contract breach, a crash, exit(), a sanitizer report, a leak, an input
# over 30 s) fails the script, with the input saved under build-fuzz/fuzz-artifacts/.
# Usage: tests/fuzz/run.sh SECONDS [HARNESS...]     (default: every harness)
set -euo pipefail
seconds=${1:?usage: tests/fuzz/run.sh SECONDS [HARNESS...]}
shift
cd "$(dirname "$0")/../.."
harnesses=("$@")
[ ${#harnesses[@]} -eq 0 ] &&
    harnesses=(fuzz_config fuzz_shard fuzz_model_file fuzz_ckpt_index fuzz_ckpt_shard fuzz_token_table)

build=${MP_FUZZ_BUILD:-build-fuzz}   # another build directory, e.g. to time a clean build
command -v clang > /dev/null || { echo "tests/fuzz/run.sh: needs clang (libFuzzer)" >&2; exit 1; }
gen=()
command -v ninja > /dev/null && gen=(-G Ninja)
if [ ! -f "$build/CMakeCache.txt" ]; then
    CC=clang CXX=clang++ cmake -S . -B "$build" "${gen[@]}" -DMILLIPEDE_FUZZ=ON -DCMAKE_BUILD_TYPE=Release \
        > /dev/null
fi
cmake --build "$build" -j 2 --target "${harnesses[@]}" > "$build/fuzz-build.log" 2>&1 ||
    { tail -30 "$build/fuzz-build.log"; exit 1; }

art=$(cd "$build" && pwd)/fuzz-artifacts
scratch=$(mktemp -d "${TMPDIR:-/tmp}/mp_fuzz_run.XXXXXX")
trap 'rm -rf "$scratch"' EXIT
mkdir -p "$art"
# Full (not frame-pointer) stacks of 8 frames for allocations: the libhdf5 leak suppressions
# name libhdf5 functions, which have no frame pointers. A request no allocator can satisfy
# (libhdf5 asks for sizes read from a damaged file) returns NULL as glibc's malloc does in
# production, instead of ASan's abort; anything over 2 GB that could be allocated is still a
# finding (-rss_limit_mb, which also limits single allocations).
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:fast_unwind_on_malloc=0:malloc_context_size=8:allocator_may_return_null=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1}
# leaks inside libhdf5 on malformed files (each one argued in the file)
export LSAN_OPTIONS=${LSAN_OPTIONS:-suppressions=$PWD/tests/fuzz/lsan.supp:print_suppressions=0}
export OMP_NUM_THREADS=1
failed=0
for h in "${harnesses[@]}"; do
    corpus=tests/fuzz/corpus/$h
    mkdir -p "$scratch/$h" "$art/$h"
    n=$(find "$corpus" -type f | wc -l)
    start=$(date +%s)
    if "$build/tests/fuzz/$h" -max_total_time="$seconds" -timeout=30 -rss_limit_mb=2048 \
        -max_len=4096 -artifact_prefix="$art/$h/" -print_final_stats=1 \
        "$scratch/$h" "$corpus" > "$scratch/$h.log" 2>&1; then
        runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$scratch/$h.log" | grep -o '[0-9]*$')
        cov=$(grep -o 'cov: [0-9]*' "$scratch/$h.log" | tail -1)
        echo "ok   $h: $n corpus inputs replayed, $runs runs in $(( $(date +%s) - start )) s, $cov"
    else
        failed=1
        echo "FAIL $h (log: $art/$h.log)"
        cp "$scratch/$h.log" "$art/$h.log"
        grep -E "CONTRACT|ERROR|SUMMARY|Test unit written|millipede: " "$scratch/$h.log" | head -20
        echo "     reproduce: $build/tests/fuzz/$h $art/$h/<the file above>"
    fi
done
exit $failed
