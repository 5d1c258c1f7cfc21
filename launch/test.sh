#!/usr/bin/env bash
# Fresh Debian 12 machine -> the whole test suite: installs what is missing (with the test
# oracle: cmocka, JAX, optax, h5py, pytest), builds from a clean folder, runs ctest.
set -euo pipefail
cd "$(dirname "$0")/.."
tools/install-deps.sh --test
rm -rf build-test
cmake -S . -B build-test -G Ninja -DCMAKE_BUILD_TYPE=Release -DMILLIPEDE_TESTS=ON >/dev/null
cmake --build build-test
# the default suite; the slow ones (ctest labels emu_large, crash, slurm, paper) run in
# .ci/run after it
ctest --test-dir build-test --output-on-failure -j 2 -LE 'slurm|crash|paper|emu_large'
