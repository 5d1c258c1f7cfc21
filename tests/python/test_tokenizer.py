"""SentencePiece tokens end to end, against the Python sentencepiece package as the oracle:
`data prepare --tokenizer sentencepiece:V` writes tokenizer.model and version-2 shards whose
hash is the model file's and whose tokens are the oracle's encoding of each document; the
text round-trips; a model trained on them carries the tokenizer in its checkpoints and model
file; eval's bits per byte counts the real bytes of the evaluated text; sample encodes and
decodes with it; a tokenizer that does not match is refused with one line. Tokens made
elsewhere: tools/tokens_to_shards.py with the Python package as the tokenizer writes the same
ids over the same documents, with a token table that trains, evaluates and samples."""
import json
import math
import os
import struct
import subprocess

import numpy as np
import pytest

from conftest import SOURCE_DIR

spm = pytest.importorskip("sentencepiece", reason="the test oracle needs the sentencepiece "
                          "package (tools/install-deps.sh --test installs it)")

CFG = SOURCE_DIR / "configs" / "tiny.ini"
T, B = 16, 2


def env():
    e = dict(os.environ, OMP_NUM_THREADS="1", OMPI_ALLOW_RUN_AS_ROOT="1",
             OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    e.pop("SLURM_NTASKS", None)
    return e


def fnv1a64(b):
    h = 0xcbf29ce484222325
    for x in b:
        h = ((h ^ x) * 0x100000001b3) & 0xFFFFFFFFFFFFFFFF
    return h or 1


def read_shard(path):
    raw = path.read_bytes()
    magic, version, vocab, n, bpt, _ = struct.unpack("<8sIIQII", raw[:32])
    assert magic == b"MPTOKENS" and bpt == 2
    if version == 1:
        return 1, vocab, 0, np.frombuffer(raw, "<u2", offset=32)
    h, reserved = struct.unpack("<QQ", raw[32:48])
    assert version == 2 and reserved == 0 and len(raw) == 48 + 2 * n
    return 2, vocab, h, np.frombuffer(raw, "<u2", offset=48)


def write_shard(path, vocab, h, tokens):
    head = struct.pack("<8sIIQII", b"MPTOKENS", 2, vocab, len(tokens), 2, 0) + struct.pack("<QQ", h, 0)
    path.write_bytes(head + np.asarray(tokens, "<u2").tobytes())


def run(*args, ok=True, **kw):
    exe = os.environ.get("MILLIPEDE")
    if not exe:
        pytest.skip("MILLIPEDE is not set (run through ctest)")
    p = subprocess.run([exe, *map(str, args)], capture_output=True, text=True, env=env(),
                       timeout=300, **kw)
    if ok:
        assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    return p


def docs_text(i):
    # ASCII, digits, a few non-ASCII characters (2- and 3-byte UTF-8), blank lines
    return "".join(f"Line {k} of document {i}: {i * k} caf\u00e9s cost {k}\u20ac; the quick "
                   f"brown fox jumps over the lazy dog.\n" + ("\n" if k % 5 == 0 else "")
                   for k in range(10))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("tokenizer")
    (d / "docs").mkdir()
    for i in range(30):
        (d / "docs" / f"doc_{i:02d}.txt").write_text(docs_text(i), encoding="utf-8")
    p = run("data", "prepare", "--out", d / "data", "--tokenizer", "sentencepiece:400",
            "--tokenizer-type", "bpe", d / "docs")
    assert "tokenizer sentencepiece bpe" in p.stdout
    sp = spm.SentencePieceProcessor(model_file=str(d / "data" / "tokenizer.model"))
    return d, sp


def split_docs(d, decoded):
    """The documents whose text lies in the decoded split, in path order."""
    names = sorted((d / "docs").iterdir())
    return [n for n in names if n.read_text(encoding="utf-8") in decoded]


def test_shards_carry_the_tokenizer(corpus):
    d, sp = corpus
    h = fnv1a64((d / "data" / "tokenizer.model").read_bytes())
    for split in ("train", "val"):
        version, vocab, hh, _ = read_shard(d / "data" / f"{split}.bin")
        assert (version, vocab, hh) == (2, sp.get_piece_size(), h)


def test_tokens_are_the_oracles_and_round_trip(corpus):
    d, sp = corpus
    seen = []
    for split in ("train", "val"):
        _, _, _, tokens = read_shard(d / "data" / f"{split}.bin")
        decoded = sp.decode(tokens.tolist())
        members = split_docs(d, decoded)
        seen += members
        texts = [m.read_text(encoding="utf-8") for m in members]
        assert decoded == "".join(texts), f"{split}: text does not round-trip"
        expect = [t for x in texts for t in sp.encode(x)]
        assert tokens.tolist() == expect, f"{split}: not the oracle's encoding per document"
    assert sorted(seen) == sorted((d / "docs").iterdir())


def test_import_an_existing_model(corpus):
    d, _ = corpus
    run("data", "prepare", "--out", d / "imported", "--tokenizer",
        f"model:{d / 'data' / 'tokenizer.model'}", d / "docs")
    for name in ("train.bin", "val.bin", "tokenizer.model"):
        assert (d / "imported" / name).read_bytes() == (d / "data" / name).read_bytes(), name


@pytest.fixture(scope="module")
def trained(corpus):
    d, sp = corpus
    V = sp.get_piece_size()
    sets = {"data.train": d / "data" / "train.bin", "data.val": d / "data" / "val.bin",
            "run.dir": d / "run", "model.vocab_size": V, "model.context": T, "model.d_model": 32,
            "model.n_heads": 2, "model.n_layers": 2, "model.ffn": "dense,peer",
            "peer.experts": 64, "peer.heads": 2, "peer.topk": 3, "peer.key_dim": 8,
            "train.batch_size": B, "train.steps": 6, "train.warmup": 2, "train.eval_every": 0,
            "train.eval_batches": 2}
    args = [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    p = run("train", CFG, *args)
    assert "tokenizer sentencepiece" in p.stdout
    return d, sp, args


def test_checkpoint_and_model_file_carry_the_tokenizer(trained):
    import h5py
    d, _, args = trained
    model = (d / "data" / "tokenizer.model").read_bytes()
    with h5py.File(d / "run" / "checkpoints" / "latest" / "index.h5", "r") as f:
        assert f["tokenizer"][()].tobytes() == model
        assert int(f["tokenizer"].attrs["hash"]) == fnv1a64(model)
    run("ckpt", "export", d / "run", d / "model.h5")
    with h5py.File(d / "model.h5", "r") as f:
        assert f["tokenizer"][()].tobytes() == model
    ev = json.loads(run("eval", CFG, *args, "--model", d / "model.h5").stdout)
    assert ev["tokenizer"] == "sentencepiece"
    # a damaged tokenizer is named by verify, and refused by eval, in one line
    import shutil
    bad = d / "bad_ckpt"
    shutil.copytree(d / "run" / "checkpoints" / "latest", bad)
    with h5py.File(bad / "index.h5", "r+") as f:
        b = f["tokenizer"][()]
        b[len(b) // 2] ^= 0x55
        f["tokenizer"][...] = b
    p = run("ckpt", "verify", bad, ok=False)
    assert p.returncode == 1 and "dataset '/tokenizer'" in p.stderr, p.stderr
    p = run("eval", CFG, *args, "--model", bad, ok=False)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "'/tokenizer'" in p.stderr, p.stderr


def test_eval_bits_per_byte_counts_real_bytes(trained):
    # A validation shard of exactly T + 1 tokens: every window is the whole shard, so the
    # target tokens are tokens[1:T+1] in each of the B x batches sequences, and their text
    # is what the oracle decodes them to (ASCII and whole characters: the byte count is
    # exact, not an estimate).
    d, sp, args = trained
    _, vocab, h, tokens = read_shard(d / "data" / "val.bin")
    k = next(i for i in range(len(tokens) - T) if sp.id_to_piece(int(tokens[i + 1])) != "<0x0A>"
             and all(not sp.is_byte(int(t)) or sp.id_to_piece(int(t)) == "<0x0A>"
                     for t in tokens[i:i + T + 1]))
    window = tokens[k:k + T + 1]
    write_shard(d / "window.bin", vocab, h, window)
    ev = json.loads(run("eval", CFG, *args, "--set", f"data.val={d / 'window.bin'}",
                        "--model", d / "run").stdout)
    text_bytes = len(sp.decode(window[1:].tolist()).encode("utf-8"))
    assert ev["tokens"] == 2 * B * T
    assert ev["bytes"] == 2 * B * text_bytes
    # printed with 9 significant digits
    expect = ev["val_loss"] * ev["tokens"] / (ev["bytes"] * math.log(2))
    assert abs(ev["bits_per_byte"] - expect) <= 1e-7 * expect
    assert ev["bits_per_byte"] < ev["bits_per_token"]   # a token is more than one byte here


def test_sample_encodes_and_decodes(trained):
    d, sp, args = trained
    prompt = "Line 3 of document 7: caf\u00e9"
    out = run("sample", CFG, *args, "--model", d / "run", "--prompt", prompt, "--tokens", 40,
              "--seed", 3).stdout
    assert out.startswith(prompt) and len(out) > len(prompt)
    # the continuation is text the tokenizer can produce: encoding and decoding keep it
    assert sp.decode(sp.encode(out)) == out


def test_a_mismatched_tokenizer_is_refused(trained):
    d, _, args = trained
    # the same vocabulary size, trained on a corpus with one more document: another model
    (d / "more").mkdir()
    (d / "more" / "extra.txt").write_text("Zebras quizzically vex jumpy wizards. " * 40)
    run("data", "prepare", "--out", d / "other", "--tokenizer", "sentencepiece:400",
        "--tokenizer-type", "bpe", d / "docs", d / "more")
    p = run("eval", CFG, *args, "--set", f"data.val={d / 'other' / 'val.bin'}", "--model",
            d / "run", ok=False)
    assert p.returncode == 2 and p.stderr.count("\n") == 1, p.stderr
    assert "tokenizer" in p.stderr and "other/val.bin" in p.stderr
    # bytes shards against the sentencepiece model
    run("data", "prepare", "--out", d / "bytes", "--vocab", 400, d / "docs")
    p = run("train", CFG, *args, "--set", f"data.train={d / 'bytes' / 'train.bin'}", "--set",
            f"data.val={d / 'bytes' / 'val.bin'}", "--set", "model.vocab_size=400", ok=False)
    assert p.returncode == 2 and "trained on tokens of sentencepiece" in p.stderr, p.stderr
    # shards whose tokenizer.model was replaced
    (d / "swapped").mkdir()
    for name in ("train.bin", "val.bin"):
        (d / "swapped" / name).write_bytes((d / "data" / name).read_bytes())
    (d / "swapped" / "tokenizer.model").write_bytes((d / "other" / "tokenizer.model").read_bytes())
    p = run("train", CFG, *args, "--set", f"data.train={d / 'swapped' / 'train.bin'}", "--set",
            f"data.val={d / 'swapped' / 'val.bin'}", "--set", f"run.dir={d / 'run2'}", ok=False)
    assert p.returncode == 2 and "prepare the data again" in p.stderr, p.stderr
    assert p.stderr.count("millipede: error:") == 1


def table_decode(table, ids):
    """Decodes ids with a token table file (docs/data.md), written out here independently."""
    magic, version, vocab = struct.unpack("<8sII", table[:16])
    assert magic == b"MPTOKTAB" and version == 1
    pieces, at = [], 16
    for _ in range(vocab):
        (n,) = struct.unpack("<I", table[at:at + 4])
        pieces.append(table[at + 4:at + 4 + n])
        at += 4 + n
    assert at == len(table)
    return b"".join(pieces[i] for i in ids)


@pytest.fixture(scope="module")
def elsewhere(corpus):
    """The corpus's documents tokenized by tools/tokens_to_shards.py with the Python
    sentencepiece package and the model data prepare trained, beside the bytes shards of
    the same split."""
    import sys
    d, sp = corpus
    run("data", "prepare", "--out", d / "bytes_ref", d / "docs")
    p = subprocess.run([sys.executable, str(SOURCE_DIR / "tools" / "tokens_to_shards.py"),
                        "--documents", str(d / "bytes_ref" / "documents.tsv"), "--tokenizer",
                        f"sentencepiece:{d / 'data' / 'tokenizer.model'}", "--out",
                        str(d / "table")], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    return d, sp


def test_tokens_made_elsewhere_are_the_same_documents(elsewhere):
    d, sp = elsewhere
    table = (d / "table" / "tokenizer.model").read_bytes()
    for split in ("train", "val"):
        version, vocab, h, ids = read_shard(d / "table" / f"{split}.bin")
        assert (version, vocab, h) == (2, sp.get_piece_size(), fnv1a64(table))
        # the same documents in the same order as data prepare's split, to the byte
        _, _, _, raw = read_shard(d / "bytes_ref" / f"{split}.bin")
        assert table_decode(table, ids.tolist()) == raw.astype(np.uint8).tobytes(), split
        # and the same ids as data prepare's own SentencePiece encoding
        _, _, _, spm_ids = read_shard(d / "data" / f"{split}.bin")
        assert ids.tolist() == spm_ids.tolist(), split


def test_a_model_on_a_token_table(elsewhere):
    d, sp = elsewhere
    table = (d / "table" / "tokenizer.model").read_bytes()
    V = sp.get_piece_size()
    sets = {"data.train": d / "table" / "train.bin", "data.val": d / "table" / "val.bin",
            "run.dir": d / "run_table", "model.vocab_size": V, "model.context": T,
            "model.d_model": 32, "model.n_heads": 2, "model.n_layers": 2, "model.ffn": "dense,peer",
            "peer.experts": 64, "peer.heads": 2, "peer.topk": 3, "peer.key_dim": 8,
            "train.batch_size": B, "train.steps": 4, "train.warmup": 2, "train.eval_every": 0,
            "train.eval_batches": 2}
    args = [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    assert "tokenizer table" in run("train", CFG, *args).stdout
    import h5py
    with h5py.File(d / "run_table" / "checkpoints" / "latest" / "index.h5", "r") as f:
        assert f["tokenizer"][()].tobytes() == table
    # bits per byte from the table's bytes: a shard of exactly T + 1 tokens (see
    # test_eval_bits_per_byte_counts_real_bytes)
    _, vocab, h, tokens = read_shard(d / "table" / "val.bin")
    window = tokens[:T + 1]
    write_shard(d / "table_window.bin", vocab, h, window)
    ev = json.loads(run("eval", CFG, *args, "--set", f"data.val={d / 'table_window.bin'}",
                        "--model", d / "run_table").stdout)
    assert ev["tokenizer"] == "table"
    assert ev["bytes"] == 2 * B * len(table_decode(table, window[1:].tolist()))
    # sample: the prompt is encoded with the fewest table entries that spell it, and comes back;
    # the continuation is whatever bytes the sampled tokens stand for (a model this short
    # samples byte pieces too, so not necessarily UTF-8)
    prompt = "Line 3 of document 7: caf\u00e9"
    p = subprocess.run([os.environ["MILLIPEDE"], "sample", str(CFG), *map(str, args), "--model",
                        str(d / "run_table"), "--prompt", prompt, "--tokens", "30", "--seed", "5"],
                       capture_output=True, env=env(), timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.startswith(prompt.encode()) and len(p.stdout) > len(prompt.encode())
    # a damaged table is named in one line, and data prepare will not encode text with one
    (d / "bad_table").mkdir()
    for name in ("train.bin", "val.bin"):
        (d / "bad_table" / name).write_bytes((d / "table" / name).read_bytes())
    (d / "bad_table" / "tokenizer.model").write_bytes(table[:-3])
    p = run("train", CFG, *args, "--set", f"data.train={d / 'bad_table' / 'train.bin'}", "--set",
            f"data.val={d / 'bad_table' / 'val.bin'}", "--set", f"run.dir={d / 'run_bad'}", ok=False)
    assert p.returncode == 2 and p.stderr.count("millipede: error:") == 1, p.stderr
    assert "not a millipede token table: truncated" in p.stderr, p.stderr
    p = run("data", "prepare", "--out", d / "no", "--tokenizer",
            f"model:{d / 'table' / 'tokenizer.model'}", d / "docs", ok=False)
    assert p.returncode == 2 and "a token table" in p.stderr, p.stderr


def test_tokens_to_shards_reads_any_path_and_refuses_what_it_cannot_keep(corpus):
    import sys
    d, _ = corpus
    tool = [sys.executable, str(SOURCE_DIR / "tools" / "tokens_to_shards.py")]
    docs = d / "odd_names"
    docs.mkdir()
    names = ["tab\there.txt", "back\\slash.txt", "new\nline.txt", "form\ffeed.txt", "plain.txt"]
    for i, name in enumerate(names):
        (docs / name).write_text(docs_text(100 + i), encoding="utf-8")
    run("data", "prepare", "--out", d / "odd_bytes", "--val-fraction", "0.3", docs)
    tsv = d / "odd_bytes" / "documents.tsv"
    model = f"sentencepiece:{d / 'data' / 'tokenizer.model'}"
    p = subprocess.run([*tool, "--documents", str(tsv), "--tokenizer", model, "--out",
                        str(d / "odd_table")], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    table = (d / "odd_table" / "tokenizer.model").read_bytes()
    for split in ("train", "val"):
        _, _, _, ids = read_shard(d / "odd_table" / f"{split}.bin")
        _, _, _, raw = read_shard(d / "odd_bytes" / f"{split}.bin")
        assert table_decode(table, ids.tolist()) == raw.astype(np.uint8).tobytes(), split
    # a document changed since data prepare listed it
    with open(docs / "plain.txt", "a") as f:
        f.write("one more line\n")
    p = subprocess.run([*tool, "--documents", str(tsv), "--tokenizer", model, "--out",
                        str(d / "odd_table2")], capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "changed since" in p.stderr, p.stderr
    # a tokenizer that does not give the text back (SentencePiece's default normalization
    # and dummy prefix): its bytes would not be the documents', so it is refused
    run("data", "prepare", "--out", d / "norm_bytes", d / "docs")
    spm.SentencePieceTrainer.train(input=str(d / "docs" / "doc_00.txt"), model_prefix=str(d / "norm"),
                                   vocab_size=60, minloglevel=2)
    p = subprocess.run([*tool, "--documents", str(d / "norm_bytes" / "documents.tsv"),
                        "--tokenizer", f"sentencepiece:{d / 'norm.model'}", "--out",
                        str(d / "norm_table")], capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and p.stderr.count("\n") == 1, p.stderr
    assert "does not give the text back" in p.stderr, p.stderr
