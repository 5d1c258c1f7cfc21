#!/usr/bin/env bash
# Fresh Debian 12 machine -> a trained demo model: installs what is missing, builds,
# prepares the demo corpus (the Python 3.11 documentation sources from python3.11-doc),
# trains configs/tiny.ini (a 4-block transformer with a PEER layer in block 2), then
# prints the validation loss, expert usage and a text sample, and plots the run.
set -euo pipefail
cd "$(dirname "$0")/.."
tools/install-deps.sh
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build build
[ -s data/demo/train.bin ] || build/millipede data prepare --out data/demo /usr/share/doc/python3.11/html/_sources
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
build/millipede train configs/tiny.ini "$@"    # extra arguments: --set section.key=value
echo "== evaluation (validation split)"
build/millipede eval runs/tiny/config.ini --model runs/tiny/checkpoints/latest
echo "== sample"
build/millipede sample runs/tiny/config.ini --model runs/tiny/checkpoints/latest --prompt "The Python " --tokens 300 --temperature 0.8 --top-k 40
echo
python3 tools/plot.py runs/tiny    # prints "plot: runs/tiny/plot.png"
