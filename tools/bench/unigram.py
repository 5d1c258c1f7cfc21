#!/usr/bin/env python3
"""Cross-entropy of a unigram model on a validation shard, in nats per token: the baseline a
trained language model's validation loss is compared with (docs/benchmarks.md).

    python3 tools/bench/unigram.py data/demo/train.bin data/demo/val.bin

Token frequencies come from the training shard with add-one smoothing over the vocabulary;
prints one JSON line. The shard format is docs/data.md.
"""
import json
import math
import sys

import numpy as np

HEADER = 32


def read_shard(path):
    raw = open(path, "rb").read()
    if raw[:8] != b"MPTOKENS":
        sys.exit(f"{path}: not a millipede token shard (bad magic)")
    vocab = int.from_bytes(raw[12:16], "little")
    n = int.from_bytes(raw[16:24], "little")
    version = int.from_bytes(raw[8:12], "little")
    if version not in (1, 2):
        sys.exit(f"{path}: shard version {version}, expected 1 or 2")
    # version 2 adds the tokenizer hash and a reserved word (docs/data.md)
    tokens = np.frombuffer(raw, dtype="<u2", count=n, offset=HEADER if version == 1 else 48)
    return vocab, tokens


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    vocab, train = read_shard(sys.argv[1])
    _, val = read_shard(sys.argv[2])
    counts = np.bincount(train, minlength=vocab).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    nats = float(-logp[val].mean())
    print(json.dumps({"unigram_val_loss": round(nats, 6), "bits_per_token": round(nats / math.log(2), 6),
                      "train_tokens": int(train.size), "val_tokens": int(val.size)}))


if __name__ == "__main__":
    main()
