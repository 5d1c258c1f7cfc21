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
# Compiling the reference's functions for each shape is most of these tests' time
# (test_model on 2 cores: 48 s cold, 13 s with every program cached), so the compiled
# programs are kept between runs, in the user's cache folder (MP_JAX_CACHE: another folder,
# or "off"). JAX keys an entry by the program, its compile options, the backend and the
# jax/jaxlib versions, so a hit runs the executable a compile would give. A size limit
# turns on the cache's eviction and with it the lock (filelock) around every read and
# write, for the two pytest processes that ctest -j 2 runs at once: without filelock
# (tools/install-deps.sh --test installs it) there is no cache, rather than an unlocked one.
_cache = os.environ.get("MP_JAX_CACHE") or os.path.join(
    os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "millipede", "jax")
try:
    import filelock  # noqa: E402,F401
except ImportError:
    _cache = "off"
if _cache != "off":
    jax.config.update("jax_compilation_cache_dir", _cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    jax.config.update("jax_compilation_cache_max_size", 1 << 30)

import millipede_ref  # noqa: E402,F401

# ||c - ref|| / ||ref|| per tensor, C in float32 against the reference in float64. C rounds
# every operation (u = 2^-24 ~ 6e-8); its sums of K <= 256 terms (widths, tokens, vocabulary)
# err by <= K u ~ 1.5e-5 of the sum of |terms| in the worst case, ~sqrt(K) u ~ 1e-6
# typically, whichever order OpenBLAS's kernel family sums in. Measured: 1e-7..1e-6 for one
# forward/backward, up to ~1e-5 for the parameters after 10 AdamW steps (test_model). A wrong
# formula, index, scale or a missed accumulation is O(1e-2..1). This holds while C and the
# reference pick the same experts: see MARGIN_MIN.
TOL = 1e-4
# See assert_close. A tensor whose exact gradient is zero holds float32 noise: ~u times the
# terms that cancel in it, measured 1e-10..1e-9 of the norm of all gradients for the small
# tensors (LN, BN); against 1e-3 of that norm it reads 1e-7..1e-6, well inside TOL, while a
# wrong nonzero gradient there above 1e-7 of the total still fails.
GRAD_FLOOR = 1e-3
# The PEER/PKM top-k is discontinuous: where the k-th and (k+1)-th best scores of a (token,
# head) are closer than C's rounding of them, C may legitimately pick another expert than the
# reference and every comparison above fails by far more than TOL. C's scores carry the
# float32 error of the forward before them, ~1e-6 of their root mean square (measured in
# the emulated and CPU backends: 1.2e-6 between OpenBLAS kernel families) plus what the
# parameters drifted from the reference (~1e-6, test_model). The tests compare only cases
# whose smallest margin (topk_margin, in the reference) is at least 10x that: 1e-5 of the
# rms score. A case below it is fragile by construction on some machine, not wrong: take
# another seed.
MARGIN_MIN = 1e-5

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
    print(f"{what}: worst tensor {worst} relative error {errs[worst]:.2g} (tolerance {tol:g})")
    bad = {k: f"{v:.3g}" for k, v in sorted(errs.items(), key=lambda kv: -kv[1]) if v > tol}
    assert errs[worst] <= tol, (f"{what}: worst tensor {worst} relative error {errs[worst]:.3g} "
                                f"> {tol:g}; all above tolerance: {bad}")
    return errs


def as_f64(d):
    return {k: np.asarray(v, np.float64) for k, v in d.items()}


def layer_margin(cfg, block, f, params, state, train):
    """The smallest top-k decision margin of block's retrieval layer on rows f (N_tok, C):
    over tokens and heads, the gap between the k-th and (k+1)-th best of all n*n ranked
    scores s1[a] + s2[b] (plus the balance biases b1[a] + b2[b] when the layer has them; the
    product-key top-k picks exactly the best k), over the root mean square of all scores; with ReLU PEER experts also the smallest |u_e . f_t| of a
    selected expert over their rms (the kink: the gradient jumps there). inf for a dense
    block."""
    r = cfg.retrieval(block)
    if r is None:
        return float("inf")
    kind = cfg.ffn[block]
    pre = f"h{block}.{kind}."
    p = params
    f = np.asarray(f, np.float64)
    q = f @ np.asarray(p[pre + "wq"]).T
    if r.query_bn:
        q, _, _ = millipede_ref.query_bn(q, p[pre + "bn.w"], p[pre + "bn.b"],
                                         state[pre + "bn.running_mean"],
                                         state[pre + "bn.running_var"], r, train)
    q = np.asarray(q).reshape(f.shape[0], r.heads, r.key_dim)
    half = r.key_dim // 2
    s1 = q[..., :half] @ np.asarray(p[pre + "k1"]).T                  # (N_tok, H, n)
    s2 = q[..., half:] @ np.asarray(p[pre + "k2"]).T
    if r.balance_rate > 0:
        s1 = s1 + np.asarray(state[pre + "k1_bias"])                   # (H, n) per head
        s2 = s2 + np.asarray(state[pre + "k2_bias"])
    full = (s1[..., :, None] + s2[..., None, :]).reshape(f.shape[0], r.heads, -1)
    top = -np.sort(-full, axis=-1)[..., :r.topk + 1]
    margin = float((top[..., r.topk - 1] - top[..., r.topk]).min() / np.sqrt(np.mean(full ** 2)))
    if kind == "peer" and r.activation == "relu":
        _, experts, _ = millipede_ref.retrieve(f, p, pre, r, state, train)
        z = np.einsum("thkc,tc->thk", np.asarray(p[pre + "u"])[np.asarray(experts)], f)
        margin = min(margin, float(np.abs(z).min() / np.sqrt(np.mean(z ** 2))))
    return margin


def topk_margin(cfg, params, state, inputs, train=True):
    """layer_margin of every retrieval layer of the reference forward on inputs (B, T), the
    smallest."""
    R = millipede_ref
    p = params
    B, T = inputs.shape
    x = p["wte"][inputs] + p["wpe"][:T]
    worst = float("inf")
    for l in range(cfg.n_layers):
        h = f"h{l}."
        x = x + R.attention(R.layer_norm(x, p[h + "ln1.w"], p[h + "ln1.b"]), p, h + "attn.",
                            cfg.n_heads)
        f = R.layer_norm(x, p[h + "ln2.w"], p[h + "ln2.b"]).reshape(B * T, -1)
        worst = min(worst, layer_margin(cfg, l, f, p, state, train))
        y, _, _ = R.ffn(cfg, l, f, p, state, train)
        x = x + y.reshape(B, T, -1)
    return worst


def assert_margin(margin, what):
    print(f"{what}: smallest top-k margin {margin:.2g} of the rms score (needed {MARGIN_MIN:g})")
    assert margin >= MARGIN_MIN, (
        f"{what}: a top-k near-tie ({margin:.2g} of the rms score, below MARGIN_MIN = "
        f"{MARGIN_MIN:g}): float32 rounding may pick other experts than the reference on some "
        f"machines; this case cannot be compared at TOL, choose another seed")
