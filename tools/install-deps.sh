#!/usr/bin/env bash
# Installs what millipede needs on Debian 12 (as root, or with sudo).
#   tools/install-deps.sh          build + run: compilers, Open MPI, HDF5, OpenBLAS, inih,
#                                  SentencePiece, demo corpus, matplotlib (tools/plot.py)
#   tools/install-deps.sh --test   also cmocka and the Python test oracle (JAX, optax, h5py,
#                                  pytest, sentencepiece)
#   tools/install-deps.sh --paper  also perl-doc, the second corpus of tools/paper/grid.py
# Packages already present are not reinstalled, so a second run takes seconds.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
SUDO=; [ "$(id -u)" -eq 0 ] || SUDO="sudo -E"
pkgs="build-essential cmake ninja-build pkg-config libopenmpi-dev openmpi-bin libhdf5-openmpi-dev
      hdf5-tools libopenblas-dev libinih-dev libsentencepiece-dev python3.11-doc python3
      python3-matplotlib"
# clang and libomp-dev: the sanitized suite and the fuzz harnesses (tests/sanitize, tests/fuzz)
[ "${1:-}" = "--test" ] && pkgs="$pkgs libcmocka-dev python3-pip clang libomp-dev"
[ "${1:-}" = "--paper" ] && pkgs="$pkgs perl-doc"
missing=$(for p in $pkgs; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || echo "$p"; done)
if [ -n "$missing" ]; then
    $SUDO apt-get update -q
    $SUDO apt-get install -y -q --no-install-recommends $missing </dev/null
fi
py=$(command -v python3)
# a python3 other than Debian's (pyenv, a venv) does not see python3-matplotlib
if ! "$py" -c "import matplotlib" 2>/dev/null; then
    "$py" -m pip install -q matplotlib 2>/dev/null || "$py" -m pip install -q --break-system-packages matplotlib
fi
if [ "${1:-}" = "--test" ]; then
    # sentencepiece: the oracle of tests/python/test_tokenizer.py. 0.1.99, the release after
    # Debian 12's libsentencepiece 0.1.97 (which has no wheels for Python 3.11): it reads the
    # model files that the Debian library writes.
    # filelock: JAX's compilation cache takes it to lock its folder (tests/python/conftest.py).
    oracle="jax optax h5py numpy pytest sentencepiece==0.1.99 filelock"
    if ! "$py" -c "import jax, optax, h5py, numpy, pytest, sentencepiece, filelock" 2>/dev/null; then
        # Debian's python marks itself externally managed; a pyenv/venv python does not
        "$py" -m pip install -q $oracle 2>/dev/null ||
            "$py" -m pip install -q --break-system-packages $oracle
    fi
fi
