#!/usr/bin/env python3
"""Token shards from a tokenizer that millipede does not run itself (docs/data.md, "Tokens
made elsewhere").

    millipede data prepare --out data/demo CORPUS...       # the splits, and documents.tsv
    python3 tools/tokens_to_shards.py --documents data/demo/documents.tsv \\
        --tokenizer sentencepiece:MODEL_FILE | tiktoken:ENCODING --out DIR

Every document listed in documents.tsv (written by `data prepare`: its split, size and
path, in corpus order) is read, checked against the size listed there, and encoded on its
own; the ids of each split are concatenated into DIR/train.bin and DIR/val.bin (version-2
shards) beside DIR/tokenizer.model, a token table: each id's bytes, which millipede uses to
decode samples, to count the bytes behind tokens for bits per byte, and (with the fewest
entries that spell them) to encode sample prompts. The shards carry the table's hash, as they would a
SentencePiece model's.

Tokenizers: `sentencepiece:PATH` (the Python sentencepiece package), `tiktoken:NAME` (the
tiktoken package, e.g. gpt2, where its encoding files are already cached: nothing is
downloaded by millipede's tests). Any other tokenizer: import this file and call
write_dataset(out, documents, encode, token_bytes) with your own encode(text) -> ids.
"""
import argparse
import os
import pathlib
import struct
import sys

import numpy as np

MAX_VOCAB = 65536   # shards store u16 ids


class Error(Exception):
    pass


def fnv1a64(data):
    """64-bit FNV-1a; 0 is kept for the byte tokenizer, so a 0 hash becomes 1."""
    h = 0xcbf29ce484222325
    for b in data:
        h = ((h ^ b) * 0x100000001b3) & 0xFFFFFFFFFFFFFFFF
    return h or 1


def token_table(token_bytes):
    """The token table file: "MPTOKTAB", u32 version 1, u32 vocab, then per id a u32 length
    and its bytes (docs/data.md)."""
    parts = [b"MPTOKTAB", struct.pack("<II", 1, len(token_bytes))]
    for b in token_bytes:
        parts += [struct.pack("<I", len(b)), bytes(b)]
    return b"".join(parts)


def write_atomic(path, data):
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def shard_bytes(vocab, table_hash, tokens):
    """A version-2 shard (docs/data.md, "The shard format")."""
    tokens = np.asarray(tokens, dtype=np.int64)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab):
        raise Error(f"token ids must lie in [0, {vocab}), got {tokens.min()}..{tokens.max()}")
    head = struct.pack("<8sIIQII", b"MPTOKENS", 2, vocab, tokens.size, 2, 0)
    head += struct.pack("<QQ", table_hash, 0)
    return head + tokens.astype("<u2").tobytes()


def read_documents(tsv):
    """[(split, size, path)] from data prepare's documents.tsv: bytes split on newlines only
    (a path may hold any other byte), \\t, \\n and \\\\ undone, paths decoded as the OS does."""
    docs = []
    raw = pathlib.Path(tsv).read_bytes()
    for i, line in enumerate(raw.split(b"\n")[:-1] if raw.endswith(b"\n") else raw.split(b"\n"), 1):
        fields = line.split(b"\t")
        if len(fields) != 3 or fields[0] not in (b"train", b"val") or not fields[1].isdigit():
            raise Error(f"{tsv}:{i}: expected 'train|val<TAB>bytes<TAB>path'")
        path, it = bytearray(), iter(fields[2])
        for c in it:
            if c == 0x5C:   # backslash
                e = next(it, None)
                if e not in (0x74, 0x6E, 0x5C):
                    raise Error(f"{tsv}:{i}: a backslash not followed by t, n or backslash")
                c = {0x74: 0x09, 0x6E: 0x0A, 0x5C: 0x5C}[e]
            path.append(c)
        docs.append((fields[0].decode(), int(fields[1]), os.fsdecode(bytes(path))))
    if not docs:
        raise Error(f"{tsv}: no documents")
    return docs


def write_dataset(out, documents, encode, token_bytes):
    """Writes out/train.bin, out/val.bin and out/tokenizer.model. documents: [(split, path)]
    in corpus order; encode(text: str) -> list of ids; token_bytes: the bytes of every id.
    Returns {split: (documents, tokens)}."""
    vocab = len(token_bytes)
    if not 1 <= vocab <= MAX_VOCAB:
        raise Error(f"a vocabulary of {vocab} ids; shards hold 1..{MAX_VOCAB}")
    table = token_table(token_bytes)
    h = fnv1a64(table)
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    counts = {}
    for split in ("train", "val"):
        ids, n_docs = [], 0
        for s, path in documents:
            if s != split:
                continue
            raw = pathlib.Path(path).read_bytes()
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise Error(f"{path}: not UTF-8 at byte {e.start}; these tokenizers take text")
            doc_ids = list(encode(text))
            # eval's bits per byte counts the table's bytes: they must be the document's
            spelled = b"".join(token_bytes[i] if 0 <= i < vocab else b"?" for i in doc_ids)
            if spelled != raw:
                at = next((k for k, (x, y) in enumerate(zip(spelled, raw)) if x != y),
                          min(len(spelled), len(raw)))
                raise Error(f"{path}: the tokenizer does not give the text back (from byte {at}: "
                            "it normalizes, or maps text to an unknown token), so bits per byte "
                            "would count other bytes than the document's")
            ids.extend(doc_ids)
            n_docs += 1
        write_atomic(out / f"{split}.bin", shard_bytes(vocab, h, ids))
        counts[split] = (n_docs, len(ids))
    write_atomic(out / "tokenizer.model", table)
    return counts


def sentencepiece_tokenizer(model):
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=str(model))

    def piece_bytes(i):
        if sp.is_byte(i):                      # <0xAB>
            return bytes([int(sp.id_to_piece(i)[3:5], 16)])
        if sp.is_control(i) or sp.is_unknown(i):
            return b""
        return sp.id_to_piece(i).replace("\u2581", " ").encode("utf-8")
    return sp.encode, [piece_bytes(i) for i in range(sp.get_piece_size())]


def tiktoken_tokenizer(name):
    try:
        import tiktoken
        enc = tiktoken.get_encoding(name)
    except Exception as e:   # not installed, unknown name, or its files not available offline
        raise Error(f"tiktoken:{name}: {type(e).__name__}: {e}".splitlines()[0])
    if enc.n_vocab > MAX_VOCAB:
        raise Error(f"tiktoken:{name}: {enc.n_vocab} ids; shards hold at most {MAX_VOCAB}")

    def piece_bytes(i):
        try:
            return enc.decode_single_token_bytes(i)
        except KeyError:   # an id the encoding leaves unused
            return b""
    return enc.encode_ordinary, [piece_bytes(i) for i in range(enc.n_vocab)]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--documents", required=True, help="documents.tsv written by data prepare")
    ap.add_argument("--tokenizer", required=True, help="sentencepiece:MODEL_FILE or tiktoken:NAME")
    ap.add_argument("--out", required=True, help="directory for train.bin, val.bin, tokenizer.model")
    a = ap.parse_args()
    try:
        kind, _, arg = a.tokenizer.partition(":")
        if kind == "sentencepiece" and arg:
            encode, token_bytes = sentencepiece_tokenizer(arg)
        elif kind == "tiktoken" and arg:
            encode, token_bytes = tiktoken_tokenizer(arg)
        else:
            raise Error(f"--tokenizer {a.tokenizer}: expected sentencepiece:MODEL_FILE or tiktoken:NAME")
        docs = read_documents(a.documents)
        for _, size, path in docs:
            if not os.path.isfile(path) or os.path.getsize(path) != size:
                raise Error(f"{path}: missing or changed since data prepare listed it ({size} bytes)")
        counts = write_dataset(a.out, [(s, p) for s, _, p in docs], encode, token_bytes)
    except (Error, OSError, UnicodeError) as e:
        print(f"tokens_to_shards: error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"tokens_to_shards: train {counts['train'][0]} documents {counts['train'][1]} tokens, "
          f"val {counts['val'][0]} documents {counts['val'][1]} tokens; vocab {len(token_bytes)}; "
          f"-> {a.out}")


if __name__ == "__main__":
    main()
