#!/usr/bin/env bash
# `millipede data prepare`: shards, headers, token counts, determinism, and bad input.
# Needs MILLIPEDE (the binary) in the environment; ctest sets it.
set -euo pipefail

: "${MILLIPEDE:?set MILLIPEDE to the millipede binary}"
tmp=$(mktemp -d "${TMPDIR:-/tmp}/mp_test_prepare.XXXXXX")
trap 'rm -rf "$tmp"' EXIT

passed=0
failed=0
ok() { passed=$((passed + 1)); echo "ok   $1"; }
bad() { failed=$((failed + 1)); echo "FAIL $1"; }

# A small corpus: nested directories, unique contents of varying length, one non-ASCII
# document with a stray Latin-1 byte (text), and what must be skipped: one empty file, two
# files that are not text (NUL bytes; random bytes without NULs, as compressed data) and
# two more paths to files already there (a symbolic and a hard link).
mkdir -p "$tmp/docs/a" "$tmp/docs/b/c" "$tmp/docs/z"
for i in $(seq 1 24); do
    case $((i % 3)) in 0) d=a ;; 1) d=b/c ;; 2) d=z ;; esac
    {
        echo "document $i"
        for k in $(seq 1 $((i * 3))); do echo "line $k of document $i: the quick brown fox"; done
    } > "$tmp/docs/$d/doc_$i.txt"
done
printf 'caf\xc3\xa9 \xe2\x82\xac 100\nOne Latin-1 word in UTF-8 text: na\xefve.\n' > "$tmp/docs/b/utf8.rst.txt"
: > "$tmp/docs/a/empty.txt"
printf 'IDX\x00\x01\x00\x00\x02 the rest is text\n' > "$tmp/docs/b/index.db"
python3 -c "import random, sys; r = random.Random(5); sys.stdout.buffer.write(bytes(r.randrange(1, 256) for _ in range(3000)))" > "$tmp/docs/z/blob.gz"
ln -s ../a/doc_3.txt "$tmp/docs/z/link_to_doc_3.txt"
ln "$tmp/docs/a/doc_6.txt" "$tmp/docs/b/hard_link_6.txt"
text_files() {   # the documents: text files, one path per file (the first in path order)
    python3 - "$1" <<'EOF'
import os, sys
seen, out = set(), []
for p in sorted(os.path.join(d, f) for d, _, fs in os.walk(sys.argv[1]) for f in fs):
    st = os.stat(p)
    if (st.st_dev, st.st_ino) in seen or p.endswith((".db", ".gz")) or st.st_size == 0:
        continue
    seen.add((st.st_dev, st.st_ino))
    out.append(p)
print("\n".join(out))
EOF
}
total_bytes=$(text_files "$tmp/docs" | tr '\n' '\0' | xargs -0 cat | wc -c)

# Reads a shard header and prints "n_tokens" after checking every fixed field.
header() {
    python3 - "$1" <<'EOF'
import struct, sys, os
p = sys.argv[1]
h = open(p, "rb").read(32)
magic, version, vocab, n, bpt, reserved = struct.unpack("<8sIIQII", h)
assert magic == b"MPTOKENS", magic
assert version == 1 and vocab == 256 and bpt == 2 and reserved == 0, (version, vocab, bpt, reserved)
assert os.path.getsize(p) == 32 + 2 * n, (os.path.getsize(p), n)
print(n)
EOF
}

# --- a normal run ---
rc=0
"$MILLIPEDE" data prepare --out "$tmp/out" "$tmp/docs" > "$tmp/stdout" 2> "$tmp/stderr" || rc=$?
if [[ $rc -eq 0 && -f $tmp/out/train.bin && -f $tmp/out/val.bin ]]; then
    ok "prepare exits 0 and writes train.bin and val.bin"
else
    bad "prepare: rc=$rc; $(cat "$tmp/stderr")"
fi
if [[ $(wc -l < "$tmp/stdout") -eq 1 ]] && grep -q "train .* tokens.*; 1 empty; 2 not text; 2 duplicate file(s) skipped;" "$tmp/stdout"; then
    ok "one summary line: $(cat "$tmp/stdout")"
else
    bad "summary line: $(cat "$tmp/stdout")"
fi
n_train=$(header "$tmp/out/train.bin" 2>&1) && n_val=$(header "$tmp/out/val.bin" 2>&1) &&
    ok "headers: magic, version 1, vocab 256, 2 bytes per token, size 32 + 2n" ||
    { bad "headers: $n_train ${n_val:-}"; n_train=0; n_val=0; }
if [[ $((n_train + n_val)) -eq $total_bytes && $n_train -gt 0 && $n_val -gt 0 ]]; then
    ok "token counts $n_train + $n_val = $total_bytes bytes of documents"
else
    bad "token counts $n_train + $n_val != $total_bytes bytes of documents"
fi

# Every document lands whole in exactly one split, and each split is its documents
# concatenated in path order; the summary's document counts agree.
if TEXT_FILES=$(text_files "$tmp/docs") python3 - "$tmp/docs" "$tmp/out" "$tmp/stdout" <<'EOF'
import os, re, sys
root, out, summary = sys.argv[1:]
paths = os.environ["TEXT_FILES"].split("\n")
docs = [(p, open(p, "rb").read()) for p in paths]
docs = [(p, b) for p, b in docs if b]
shard = {}
for s in ("train", "val"):
    raw = open(os.path.join(out, s + ".bin"), "rb").read()[32:]
    assert all(raw[i + 1] == 0 for i in range(0, len(raw), 2)), "token >= 256"
    shard[s] = raw[0::2]
where = {}
for p, b in docs:
    hits = [s for s in shard if b in shard[s]]
    assert len(hits) == 1, (p, hits)
    where[p] = hits[0]
for s in shard:
    expect = b"".join(b for p, b in docs if where[p] == s)
    assert shard[s] == expect, s + ": not the documents concatenated in path order"
line = open(summary).read()
for s in shard:
    n = sum(1 for p in where if where[p] == s)
    assert re.search(r"\b%s %d documents %d tokens" % (s, n, len(shard[s])), line), (s, n, line)
EOF
then ok "each document in exactly one split, concatenated in path order; counts match summary"
else bad "document placement"; fi

if grep -q "^millipede: warning: data prepare: skipped 2 file(s) that are not text (NUL bytes, or more than 5% invalid UTF-8): $tmp/docs/b/index.db, $tmp/docs/z/blob.gz; --include-binary keeps them$" "$tmp/stderr" &&
   grep -q "^millipede: warning: data prepare: skipped 2 path(s) to files already read (links): $tmp/docs/b/hard_link_6.txt, $tmp/docs/z/link_to_doc_3.txt$" "$tmp/stderr"; then
    ok "the skipped files are counted and named on stderr"
else
    bad "skipped files: $(cat "$tmp/stderr")"
fi
"$MILLIPEDE" data prepare --out "$tmp/outbin" --include-binary "$tmp/docs" > /dev/null 2> "$tmp/stderr_bin" || true
nbt=$(header "$tmp/outbin/train.bin") || nbt=-1
nbv=$(header "$tmp/outbin/val.bin") || nbv=-1
binbytes=$(cat "$tmp/docs/b/index.db" "$tmp/docs/z/blob.gz" | wc -c)
if [[ $((nbt + nbv)) -eq $((total_bytes + binbytes)) ]] && ! grep -q "not text" "$tmp/stderr_bin"; then
    ok "--include-binary keeps the files that are not text ($binbytes bytes more)"
else
    bad "--include-binary: $nbt + $nbv tokens, expected $total_bytes + $binbytes; $(cat "$tmp/stderr_bin")"
fi

# --- determinism: same input, same bytes; the split does not depend on where files live ---
"$MILLIPEDE" data prepare --out "$tmp/out2" "$tmp/docs/" > /dev/null 2>&1 || true
if cmp -s "$tmp/out/train.bin" "$tmp/out2/train.bin" && cmp -s "$tmp/out/val.bin" "$tmp/out2/val.bin"; then
    ok "second run gives identical files"
else
    bad "second run differs"
fi
mkdir -p "$tmp/elsewhere/deeper"
cp -a "$tmp/docs" "$tmp/elsewhere/deeper/corpus"
(cd "$tmp/elsewhere" && "$MILLIPEDE" data prepare --out "$tmp/out3" deeper/corpus > /dev/null 2>&1) || true
if cmp -s "$tmp/out/train.bin" "$tmp/out3/train.bin" && cmp -s "$tmp/out/val.bin" "$tmp/out3/val.bin"; then
    ok "a relocated copy (relative PATH) gives identical files"
else
    bad "relocated copy differs"
fi

# A larger validation fraction moves documents, keeping the total.
"$MILLIPEDE" data prepare --out "$tmp/out4" --val-fraction=0.5 "$tmp/docs" > /dev/null 2>&1 || true
n4t=$(header "$tmp/out4/train.bin") || n4t=-1
n4v=$(header "$tmp/out4/val.bin") || n4v=-1
if [[ $((n4t + n4v)) -eq $total_bytes && $n4v -gt $n_val ]]; then
    ok "--val-fraction=0.5: val grows ($n_val -> $n4v tokens), total kept"
else
    bad "--val-fraction=0.5: train $n4t val $n4v (val before: $n_val)"
fi

# Two single files given directly: both splits get one.
"$MILLIPEDE" data prepare --out "$tmp/out5" "$tmp/docs/a/doc_3.txt" "$tmp/docs/z/doc_2.txt" > /dev/null 2>&1 || true
n5t=$(header "$tmp/out5/train.bin") || n5t=-1
n5v=$(header "$tmp/out5/val.bin") || n5v=-1
b3=$(wc -c < "$tmp/docs/a/doc_3.txt"); b2=$(wc -c < "$tmp/docs/z/doc_2.txt")
if [[ $n5t -gt 0 && $n5v -gt 0 && $((n5t + n5v)) -eq $((b3 + b2)) ]]; then
    ok "two files: one document per split"
else
    bad "two files: train $n5t val $n5v"
fi

# --out inside the corpus: a rerun must not read the previous run's shards as text.
cp -a "$tmp/docs" "$tmp/docs_in"
"$MILLIPEDE" data prepare --out "$tmp/docs_in/shards" "$tmp/docs_in" > /dev/null 2>&1 || true
"$MILLIPEDE" data prepare --out "$tmp/docs_in/shards" "$tmp/docs_in" > /dev/null 2>&1 || true
if cmp -s "$tmp/out/train.bin" "$tmp/docs_in/shards/train.bin" && cmp -s "$tmp/out/val.bin" "$tmp/docs_in/shards/val.bin"; then
    ok "--out inside PATH is not read back on a rerun"
else
    bad "--out inside PATH changes the shards on a rerun"
fi

rc=0
"$MILLIPEDE" data prepare --help > "$tmp/help" 2>&1 || rc=$?
if [[ $rc -eq 0 ]] && grep -q -- "--val-fraction" "$tmp/help"; then ok "--help"; else bad "--help rc=$rc"; fi

# --- bad input: exit 2, one `millipede: error:` line naming the problem, no output ---
mkdir -p "$tmp/emptydir" "$tmp/onlyempty/sub"
: > "$tmp/onlyempty/sub/e.txt"
expect_error() {   # name, expected text, args...
    local name=$1 want=$2
    shift 2
    local rc=0
    rm -rf "$tmp/errout"
    "$MILLIPEDE" data "$@" > "$tmp/err_stdout" 2> "$tmp/err_stderr" || rc=$?
    if [[ $rc -eq 2 ]] && grep -q "^millipede: error: .*$want" "$tmp/err_stderr" && [[ ! -e $tmp/errout/train.bin ]]; then
        ok "$name: $(head -1 "$tmp/err_stderr")"
    else
        bad "$name: rc=$rc, stderr: $(cat "$tmp/err_stderr")"
    fi
}
expect_error "missing path" "$tmp/nope" prepare --out "$tmp/errout" "$tmp/nope"
expect_error "--val-fraction 0" "--val-fraction" prepare --out "$tmp/errout" --val-fraction 0 "$tmp/docs"
expect_error "--val-fraction 1" "--val-fraction" prepare --out "$tmp/errout" --val-fraction 1 "$tmp/docs"
expect_error "--val-fraction abc" "--val-fraction 'abc'" prepare --out "$tmp/errout" --val-fraction abc "$tmp/docs"
expect_error "--val-fraction without value" "--val-fraction needs a value" prepare --out "$tmp/errout" "$tmp/docs" --val-fraction
expect_error "empty directory" "no files found" prepare --out "$tmp/errout" "$tmp/emptydir"
expect_error "only empty files" "empty corpus" prepare --out "$tmp/errout" "$tmp/onlyempty"
expect_error "no PATH" "no PATH" prepare --out "$tmp/errout"
expect_error "only files that are not text" "no text left: the 1 file(s) found are not text.*index.db; --include-binary" \
    prepare --out "$tmp/errout" "$tmp/docs/b/index.db"
expect_error "no --out" "missing --out" prepare "$tmp/docs"
expect_error "unknown option" "--bogus" prepare --out "$tmp/errout" --bogus "$tmp/docs"
expect_error "bad --vocab" "--vocab '100'" prepare --out "$tmp/errout" --vocab 100 "$tmp/docs"
expect_error "unknown subcommand" "'frobnicate'" frobnicate
expect_error "no subcommand" "missing subcommand"

echo "$passed passed, $failed failed"
[[ $failed -eq 0 ]]
