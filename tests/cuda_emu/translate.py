#!/usr/bin/env python3
"""Rewrites a CUDA source for the CPU emulator (tests/cuda_emu/README.md):

  kernel<<<grid, block[, shmem[, stream]]>>>(args)
      -> mp_emu::launch("kernel", __FILE__, __LINE__, mp_emu::Launch(grid, block...), kernel, args)
  extern __shared__ T name[];
      -> T *name = (T *)mp_emu::dynamic_shared();

Nothing else changes, and every line keeps its number (a #line directive names the original
file), so compiler messages and __FILE__:__LINE__ in error reports point at the .cu source.

usage: translate.py IN.cu OUT.cpp [NAME]   (NAME: the path to report, default IN.cu)
"""
import os
import re
import sys

OPEN, CLOSE = "([{", ")]}"


def balanced_end(s, i, stop):
    """Index of `stop` at nesting depth 0 from s[i], skipping strings."""
    depth = 0
    while i < len(s):
        c = s[i]
        if depth == 0 and s.startswith(stop, i):
            return i
        if c in OPEN:
            depth += 1
        elif c in CLOSE:
            depth -= 1
        elif c == '"':
            i = s.index('"', i + 1)
        i += 1
    raise SyntaxError(f"unbalanced brackets looking for {stop!r}")


def kernel_start(s, j):
    """Start of the kernel expression that ends just before s[j] (name or name<targs>)."""
    k = j
    while s[k - 1].isspace():
        k -= 1
    if s[k - 1] == ">":   # template arguments
        depth = 0
        while True:
            k -= 1
            if s[k] == ">":
                depth += 1
            elif s[k] == "<":
                depth -= 1
                if depth == 0:
                    break
    while re.match(r"[\w:]", s[k - 1]):
        k -= 1
    return k


def translate(src):
    src = re.sub(r"extern\s+__shared__\s+(?:__align__\(\d+\)\s+)?([\w:]+)\s+(\w+)\s*\[\s*\]\s*;",
                 r"\1 *\2 = (\1 *)mp_emu::dynamic_shared();", src)
    out, i = [], 0
    while True:
        j = src.find("<<<", i)
        if j < 0:
            out.append(src[i:])
            return "".join(out)
        line_start = src.rfind("\n", 0, j) + 1
        if "//" in src[line_start:j] or src.rfind("/*", 0, j) > src.rfind("*/", 0, j):
            out.append(src[i:j + 3])   # in a comment: not a launch
            i = j + 3
            continue
        k = kernel_start(src, j)
        kernel = src[k:j].strip()
        e = balanced_end(src, j + 3, ">>>")
        cfg = src[j + 3:e]
        p = e + 3
        while src[p].isspace():
            p += 1
        if src[p] != "(":
            raise SyntaxError(f"launch of {kernel}: expected '(' after '>>>'")
        q = balanced_end(src, p + 1, ")")
        args = src[p + 1:q]
        text = (f'mp_emu::launch("{kernel}", __FILE__, __LINE__, mp_emu::Launch({cfg}), {kernel}'
                + (f", {args}" if args.strip() else "") + ")")
        lost = src[k:q + 1].count("\n") - text.count("\n")
        out.append(src[i:k] + text + "\n" * lost)
        i = q + 1


def main():
    inp, outp = sys.argv[1], sys.argv[2]
    name = sys.argv[3] if len(sys.argv) > 3 else inp
    with open(inp) as f:
        src = f.read()
    # Ninja creates an output's folder and Unix Makefiles do not: make it here for both
    os.makedirs(os.path.dirname(os.path.abspath(outp)), exist_ok=True)
    with open(outp, "w") as f:
        f.write(f'#include "cuda_emu.h"\n#line 1 "{name}"\n' + translate(src))


if __name__ == "__main__":
    main()
