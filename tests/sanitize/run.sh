#!/usr/bin/env bash
# The test suite built with AddressSanitizer and UndefinedBehaviorSanitizer
# (-DMILLIPEDE_SANITIZE=ON) in build-asan/, run with leak detection on; .ci/run runs it.
# It fails when a test fails or when any sanitized process anywhere in the suite wrote a
# report (tests/CMakeLists.txt sends the reports to build-asan/sanitizer-reports/), which
# also catches a report in a run that a test expected to fail. docs/reliability.md,
# "Sanitizers", says what is covered, what is left out and what it costs.
#   bash tests/sanitize/run.sh [more ctest arguments, e.g. -R unit]
set -euo pipefail
cd "$(dirname "$0")/../.."
build=build-asan
# clang for C and C++ (C++ comes in with SentencePiece, and then links): GCC's UBSan
# runtime, linked beside its ASan one, ignores log_path and writes its reports to stderr
# only, where a test that expects a failure would not see them.
command -v clang++ >/dev/null || { echo "tests/sanitize/run.sh: needs clang (and libomp-dev)" >&2; exit 1; }
CC=clang CXX=clang++ cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DMILLIPEDE_TESTS=ON \
    -DMILLIPEDE_SANITIZE=ON >/dev/null
cmake --build "$build"
reports=$build/sanitizer-reports
rm -rf "$reports"
mkdir -p "$reports"

# Left out, each for the reason beside it (anything else in the default suite runs):
exclude=(
    # The CUDA emulator is not built with the sanitizers (CMakeLists.txt): its fibers switch
    # stacks with _longjmp, which ASan does not follow, and it catches SIGSEGV on purpose.
    # Without it this test only says "skipped", so it is left out rather than shown so.
    'cli\.test_cuda_emu'
    # Needs a GPU, and the sanitized build has no CUDA backend (nvcc takes no -fsanitize):
    # it would only exit 77 (skipped).
    'unit\.test_cuda_backend'
    # The JAX reference's self-tests: they start no millipede process, so nothing of ours
    # would run sanitized (about a minute of one core).
    'py\.test_reference'
)
# Labels left out: slurm, crash and paper are the slow tests of the ordinary build that .ci/run
# runs after the default suite (fake Slurm, kill -9 timing); they exercise the launcher and
# the file system rather than more of millipede's code, and would not fit the 8-minute budget.
labels='slurm|crash|paper'

status=0
ctest --test-dir "$build" --output-on-failure -j 2 -LE "$labels" \
    -E "$(IFS='|'; echo "${exclude[*]}")" "$@" || status=1
shopt -s nullglob
# A file that holds nothing but the runtime's warnings about its symbolizer (llvm-symbolizer
# killed or slow on a loaded machine: the stack of a report would lack names, nothing more)
# is not a report; any other line is.
symbolizer='^==[0-9]+==WARNING: (Can.t read from symbolizer|Failed to use and restart external symbolizer|external symbolizer)'
found=()
for f in "$reports"/*; do
    if grep -qvE "$symbolizer|^\s*$" "$f"; then
        found+=("$f")
    else
        echo "sanitizers: $f holds only symbolizer warnings: $(head -1 "$f")"
    fi
done
if [ "${#found[@]}" -gt 0 ]; then
    echo "sanitizers: ${#found[@]} report(s) in $reports:"
    for f in "${found[@]}"; do
        echo "== $f"
        head -c 20000 "$f"
    done
    status=1
else
    echo "sanitizers: no ASan, UBSan or LSan report"
fi
exit $status
