#!/usr/bin/env bash
# Makes the valid files the harnesses start from (tests/fuzz/seeds/), with the real binary:
# a token shard, a 2-rank checkpoint of a tiny model with a PEER and a PKM layer (index.h5 and
# two shard files), and the model file exported from it. The files are committed; run this
# only to remake them (e.g. after a format change), then re-seed the corpora (README.md).
# Usage: tests/fuzz/make_seeds.sh MILLIPEDE_BINARY
set -euo pipefail
bin=${1:?usage: make_seeds.sh MILLIPEDE_BINARY}
here=$(cd "$(dirname "$0")" && pwd)
seeds=$here/seeds
tmp=$(mktemp -d "${TMPDIR:-/tmp}/mp_fuzz_seeds.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_mpi_yield_when_idle=1
export OMPI_MCA_rmaps_base_oversubscribe=1 OMP_NUM_THREADS=1
unset SLURM_NTASKS SLURM_JOB_ID
export ASAN_OPTIONS=detect_leaks=0   # a sanitized binary: Open MPI's own leaks are not ours

mkdir -p "$tmp/docs" "$seeds/ckpt"
for i in 1 2 3; do
    echo "Seed document $i: the quick brown fox jumps over the lazy dog." > "$tmp/docs/$i.txt"
done
"$bin" data prepare --out "$tmp/data" --val-fraction 0.3 "$tmp/docs" > /dev/null
cp "$tmp/data/val.bin" "$seeds/train.bin"

# The smallest model with every kind of tensor: a PEER block (BN statistics, sharded U and V)
# and a PKM block, d_model 8, 16 experts each (n = 4 sub-keys per half: 2 ranks get 2 each).
cat > "$seeds/tiny.ini" <<INI
[model]
vocab_size = 256
context = 8
d_model = 8
n_layers = 2
n_heads = 2
ffn = peer,pkm
init_std = 0.1
[peer]
experts = 16
heads = 2
topk = 2
key_dim = 4
[pkm]
experts = 16
heads = 1
topk = 2
key_dim = 4
[train]
steps = 2
batch_size = 2
warmup = 1
log_every = 1
eval_every = 0
eval_batches = 1
[data]
train = $tmp/data/train.bin
val = $tmp/data/val.bin
[checkpoint]
every = 0
keep = 1
[system]
threads = 1
INI
mpirun -n 2 "$bin" train "$seeds/tiny.ini" --set "run.dir=$tmp/run" > "$tmp/train.out" 2>&1 ||
    { cat "$tmp/train.out"; exit 1; }
ck=$(readlink -f "$tmp/run/checkpoints/latest")
cp "$ck"/index.h5 "$ck"/shard_00000.h5 "$ck"/shard_00001.h5 "$seeds/ckpt/"
"$bin" ckpt export "$ck" "$seeds/model.h5" > /dev/null
# the data paths in the seed config are this run's scratch files: the harnesses read only
# its model sections
sed -i "s|$tmp/data/|data/|" "$seeds/tiny.ini"
ls -l "$seeds" "$seeds/ckpt"
