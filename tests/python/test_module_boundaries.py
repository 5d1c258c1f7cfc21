"""Module boundaries of src/ (docs/design.md, "Where the code is").

Each folder of src/ is a module (src/backend/cpu and src/backend/cuda are two). A module may
include the public headers (include/millipede/), its own headers, and the interface headers
that another module declares below; every other header of a module is private to it. The
public headers include only public headers. Tests and tools are white-box and may reach
inside (they are not under src/).
"""
import os
import re
import pathlib

SRC = pathlib.Path(os.environ.get("MP_SOURCE_DIR", pathlib.Path(__file__).parents[2]))

# the headers a module offers to the others; everything else it has is private
INTERFACES = {
    "core": {"log.h", "agree.h", "fs.h", "rng.h", "watchdog.h"},   # the base every module stands on
    "dist": {"shard_plan.h"},                          # ownership and the plan, for the exchange
}
# which modules may use which (beyond core, which everyone may)
USES = {
    "core": set(),
    "dist": set(),
    "model": {"dist"},
    "backend/cpu": set(),
    "backend/cuda": set(),
    "data": set(),
    "ckpt": set(),
    "train": set(),
    "main": set(),
}

INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"', re.M)


def module_of(root, path):
    parts = path.resolve().relative_to((root / "src").resolve()).as_posix().split("/")
    if parts[0] == "backend" and len(parts) > 2:
        return "backend/" + parts[1]
    return parts[0]


def resolve(root, path, inc):
    """The module and file name an include names: 'core/log.h' from anywhere, or a name
    next to the including file."""
    local = (path.parent / inc).resolve()   # "../../model/x.h" is model's, not ours
    if local.exists():
        try:
            return module_of(root, local), local.name
        except ValueError:   # outside src/ (include/millipede by a relative path)
            return None, inc
    for mod in sorted(USES, key=len, reverse=True):
        if inc.startswith(mod + "/"):
            return mod, inc[len(mod) + 1:]
    return None, inc


def sources(root):
    for ext in ("*.c", "*.h", "*.cu", "*.cc"):
        yield from (root / "src").rglob(ext)


def violations(root):
    bad = []
    for path in sources(root):
        mine = module_of(root, path)
        for inc in INCLUDE.findall(path.read_text()):
            if inc.startswith("millipede/"):
                continue
            mod, name = resolve(root, path, inc)
            where = path.relative_to(root)
            if mod is None:
                bad.append(f"{where}: includes {inc}, which is no module's")
            elif mod == mine:
                continue
            elif mod != "core" and mod not in USES.get(mine, set()):
                bad.append(f"{where}: module {mine} may not use module {mod} ({inc})")
            elif name not in INTERFACES.get(mod, set()):
                bad.append(f"{where}: {inc} is private to module {mod}")
    for path in (root / "include" / "millipede").glob("*.h"):
        for inc in INCLUDE.findall(path.read_text()):
            if not inc.startswith("millipede/"):
                bad.append(f"{path.relative_to(root)}: public header includes the private {inc}")
    return bad


def test_every_module_is_known():
    # src/backend/cuda_absent.c stands for the CUDA module in builds without it
    mods = {module_of(SRC, p) for p in sources(SRC)}
    assert mods <= set(USES) | {"backend"}, mods - set(USES)


def test_modules_include_only_interfaces():
    bad = violations(SRC)
    assert not bad, "\n".join(bad)


def test_the_check_finds_a_private_include(tmp_path):
    def write(rel, text):
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    write("include/millipede/backend.h", '#include "millipede/comm.h"\n')
    write("src/model/retrieval.h", "")
    write("src/core/log.h", "")
    write("src/backend/cpu/ops.c", '#include "core/log.h"\n')
    assert violations(tmp_path) == []
    # what the backends did before the seam: a backend op reading the model's layer struct
    write("src/backend/cpu/retrieval_cpu.c", '#include "model/retrieval.h"\n')
    write("include/millipede/model.h", '#include "model/retrieval.h"\n')
    write("src/backend/cpu/sneaky.c", '#include "../../model/retrieval.h"\n')
    bad = violations(tmp_path)
    assert len(bad) == 3, bad
    assert any("sneaky.c: module backend/cpu may not use module model" in b for b in bad), bad
    text = "\n".join(bad)
    assert "retrieval_cpu.c: module backend/cpu may not use module model" in text, bad
    assert "public header includes the private model/retrieval.h" in text, bad
