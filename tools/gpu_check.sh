#!/usr/bin/env bash
# The GPU check: one call on a machine with a GPU (docs/cuda.md, "Running the GPU checks"),
# from the repository root. It builds in a fresh folder with the tests, then runs
#   1. every CUDA test of the suite (ctest -R cuda: the op-by-op and layer comparisons
#      with the CPU backend, the determinism checks);
#   2. one PEER layer timed (bench_peer_cuda, bf16 and fp32);
#   3. cli.test_cuda_emu with the real CUDA binary in place of the emulator's: training on
#      the GPU against the CPU backend with the nccl transport on 1 rank and mpi_staged on
#      2 and 3 ranks sharing the GPU, resume, bf16, eval and sample. NCCL at P >= 2 needs
#      one GPU per rank, which a one-GPU machine does not have (MP_TEST_NCCL_RANKS=1);
#   4. compute-sanitizer memcheck, racecheck and initcheck over the backend test, where the
#      tool works on this machine (it does not under gVisor: then it says so and goes on).
# Every step runs even when an earlier one failed; the exit status is the number of failed
# steps. Logs go to $OUT (when set) or the build folder.
# Environment: MP_GPU_CMAKE_ARGS (default -DMILLIPEDE_CUDA_EMU=OFF: the emulator is for
# machines without a GPU), MP_GPU_SANITIZERS (default "memcheck racecheck initcheck"),
# MP_GPU_SANITIZER_TIMEOUT (seconds per tool, default 900).
#   bash tools/gpu_check.sh            # or: bash .device-deps/setup.sh && bash tools/gpu_check.sh
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build=${MP_GPU_BUILD:-$root/build-gpu}
logs=${OUT:-$build}/gpu-check
mkdir -p "$logs"
fails=0
step() {   # step NAME COMMAND...: runs it, logs to $logs/NAME.log, reports one line
    local name=$1; shift
    local t0=$SECONDS
    if "$@" >"$logs/$name.log" 2>&1; then
        echo "gpu-check: $name: ok ($((SECONDS - t0)) s)"
    else
        echo "gpu-check: $name: FAILED ($((SECONDS - t0)) s); last lines:"
        tail -15 "$logs/$name.log" | sed 's/^/    /'
        fails=$((fails + 1))
    fi
}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
step build bash -c "cmake -S '$root' -B '$build' -G Ninja -DMILLIPEDE_TESTS=ON ${MP_GPU_CMAKE_ARGS--DMILLIPEDE_CUDA_EMU=OFF} && cmake --build '$build'"
step ctest-cuda bash -c "cd '$build' && ctest -R 'cuda|nccl' -E 'emu\\.|cli.test_cuda_emu' --output-on-failure"
# the PEER layer alone at the paper's shape (d = 1024, N = 1024^2, 16384 tokens), without
# the PyTorch comparison of tools/bench/run_gpu_bench.sh: a first look at its speed
step bench-layer bash -c "for p in bf16 fp32; do '$build/bench_peer_cuda' --iters 10 --warmup 3 --precision \$p; done"
step train-transports env MILLIPEDE="$build/millipede" MILLIPEDE_EMU="$build/millipede" \
    MP_TESTDUMP="$build/tests/millipede-testdump" MP_SOURCE_DIR="$root" MP_BUILD_DIR="$build" \
    MP_TEST_NCCL_RANKS=1 OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 \
    OMPI_MCA_rmaps_base_oversubscribe=1 bash "$root/tests/cli/test_cuda_emu.sh"
for tool in ${MP_GPU_SANITIZERS-memcheck racecheck initcheck}; do
    if ! command -v compute-sanitizer >/dev/null; then
        echo "gpu-check: compute-sanitizer not found: skipped, not passed"; break
    fi
    step "sanitizer-$tool" timeout "${MP_GPU_SANITIZER_TIMEOUT:-900}" compute-sanitizer --tool "$tool" \
        --error-exitcode 1 "$build/tests/test_cuda_backend"
    # gVisor machines: the tool cannot attach ("Device not supported", "LibraryNotLoaded")
    if grep -qE "Device not supported|LibraryNotLoaded" "$logs/sanitizer-$tool.log"; then
        echo "gpu-check: compute-sanitizer cannot attach on this machine: skipped, not passed"
        fails=$((fails - 1)); break
    fi
done
echo "gpu-check: $fails step(s) failed; logs in $logs"
exit "$fails"
