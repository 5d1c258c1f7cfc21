"""Shared helpers of the JAX reference comparisons.

The C side is the dump program (MP_TESTDUMP, built as millipede-testdump); the reference
is tools/ref/millipede_ref.py run in float64 on the float32 values the C program dumped.
"""
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

SOURCE_DIR = pathlib.Path(os.environ.get("MP_SOURCE_DIR",
                                         pathlib.Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(SOURCE_DIR / "tools" / "ref"))

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)

import millipede_ref  # noqa: E402,F401

TOL = 1e-4  # ||c - ref|| / ||ref|| per tensor
GRAD_FLOOR = 1e-3  # see assert_close

# The small model every comparison starts from; tests override single keys.
BASE_CONFIG = {
    "model": {"vocab_size": 64, "context": 16, "d_model": 32, "n_layers": 2, "n_heads": 2,
              "dense_hidden": 64, "ffn": "dense,peer", "init_std": 0.02},
    "peer": {"experts": 64, "heads": 2, "topk": 3, "key_dim": 8, "query_bn": "true",
             "bn_momentum": 0.1, "bn_eps": 1e-5, "activation": "gelu"},
    "pkm": {"experts": 64, "heads": 2, "topk": 3, "key_dim": 8, "query_bn": "true",
            "bn_momentum": 0.1, "bn_eps": 1e-5},
    "train": {"steps": 10, "seed": 1234, "batch_size": 4, "grad_accum": 1, "warmup": 3},
}


def make_ini(overrides=None):
    """INI text of BASE_CONFIG with {section: {key: value}} overrides."""
    sections = {s: dict(kv) for s, kv in BASE_CONFIG.items()}
    for s, kv in (overrides or {}).items():
        sections.setdefault(s, {}).update(kv)
    lines = []
    for s, kv in sections.items():
        lines.append(f"[{s}]")
        lines += [f"{k} = {v}" for k, v in kv.items()]
        lines.append("")
    return "\n".join(lines)


def _attr_value(v):
    if isinstance(v, bytes):
        return v.decode()
    if isinstance(v, np.ndarray) and v.size == 1:
        return _attr_value(v.reshape(()).item())
    return v


def _read_h5(path):
    """All datasets as {"/group/name": array}; attributes as {"name"} (root) or
    {"/group/name"} (anywhere else)."""
    import h5py
    data, attrs = {}, {}
    with h5py.File(path, "r") as f:
        attrs.update({k: _attr_value(v) for k, v in f.attrs.items()})

        def visit(name, obj):
            if isinstance(obj, h5py.Dataset):
                data["/" + name] = obj[()]
            attrs.update({f"/{name}/{k}": _attr_value(v) for k, v in obj.attrs.items()})
        f.visititems(visit)
    return data, attrs


class Dump:
    """One dump file: datasets by path ("/grads/h1.peer.u") and root attributes."""

    def __init__(self, path):
        self.path = path
        self.data, self.attrs = _read_h5(path)

    def group(self, name):
        """{tensor name: array} of the datasets under /name."""
        prefix = f"/{name}/"
        return {k[len(prefix):]: v for k, v in self.data.items() if k.startswith(prefix)}

    def __getitem__(self, key):
        return self.data[key]

    def __contains__(self, key):
        return key in self.data

    @property
    def config_text(self):
        return self.attrs["config"]


@pytest.fixture(scope="session")
def testdump():
    path = os.environ.get("MP_TESTDUMP")
    if not path:
        pytest.skip("MP_TESTDUMP is not set (run through ctest, or set it to millipede-testdump)")
    if not os.access(path, os.X_OK):
        pytest.fail(f"MP_TESTDUMP={path} is not an executable")
    return path


@pytest.fixture(scope="session")
def run_dump(testdump):
    """run_dump(dir, mode, ini_text, *args) -> Dump; fails the test on a non-zero exit."""
    def run(directory, mode, ini_text, *args):
        directory = pathlib.Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        ini, out = directory / "config.ini", directory / "dump.h5"
        ini.write_text(ini_text)
        cmd = [testdump, mode, str(ini), str(out), *map(str, args)]
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
        if proc.returncode != 0:
            pytest.fail(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr[-4000:]}")
        return Dump(out)
    return run


def rel_err(c, ref):
    c, ref = np.asarray(c, np.float64), np.asarray(ref, np.float64)
    if c.shape != ref.shape:
        return float("inf")
    den = np.linalg.norm(ref)
    num = np.linalg.norm(c - ref)
    if den == 0.0:
        return 0.0 if num == 0.0 else float("inf")
    return float(num / den)


def assert_close(actual, expected, what, tol=TOL, floor=0.0):
    """actual, expected: {name: array}. Every name of expected must be in actual with the
    same shape and ||a - e|| / max(||e||, floor * ||all of expected||) <= tol; the message
    names the worst tensor. floor > 0 is for gradients that are zero in exact arithmetic
    (e.g. a LayerNorm bias feeding only a BatchNorm'd query): float32 leaves noise there
    that no relative test of that tensor alone can accept."""
    missing = sorted(set(expected) - set(actual))
    extra = sorted(set(actual) - set(expected))
    assert not missing, f"{what}: missing in the C dump: {missing}"
    assert not extra, f"{what}: not in the reference: {extra}"
    expected = {k: np.asarray(v, np.float64) for k, v in expected.items()}
    total = np.sqrt(sum(float(np.sum(np.square(e))) for e in expected.values()))
    errs = {}
    for name, e in expected.items():
        a = np.asarray(actual[name], np.float64)
        assert a.shape == e.shape, f"{what}: {name} has shape {a.shape}, reference {e.shape}"
        den = max(float(np.linalg.norm(e)), floor * total)
        num = float(np.linalg.norm(a - e))
        errs[name] = (0.0 if num == 0.0 else float("inf")) if den == 0.0 else num / den
    worst = max(errs, key=errs.get)
    bad = {k: f"{v:.3g}" for k, v in sorted(errs.items(), key=lambda kv: -kv[1]) if v > tol}
    assert errs[worst] <= tol, (f"{what}: worst tensor {worst} relative error {errs[worst]:.3g} "
                                f"> {tol:g}; all above tolerance: {bad}")
    return errs


def as_f64(d):
    return {k: np.asarray(v, np.float64) for k, v in d.items()}
