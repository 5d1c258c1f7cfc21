"""train.expert_optimizer = lazy_adamw against the JAX reference (docs/model.md, "Lazy
AdamW"; tools/ref/millipede_ref.py, lazy_adamw_rows): STEPS training steps of millipede-
testdump on 1 and 3 ranks, with grad_accum 1 and 2, compared with the reference's losses,
gradient norms and final parameters; untouched rows must come out bit for bit as they went
in; two runs are bitwise equal. The checkpoint side (resume, resharding) is
tests/cli/test_lazy_adamw.sh."""
import dataclasses

import numpy as np
import pytest

import millipede_ref as R
from conftest import (as_f64, assert_close, assert_margin, make_ini, rel_err, topk_margin,
                      Dump, TOL)
from test_sharding import ShardedDump, mpirun

STEPS = 6
# 1024 experts (n = 32) and 3 x 8 tokens x 2 heads x top-3 = 144 selections per micro-batch
# and layer: at least 880 of each table's 1024 rows are untouched in a step (grad_accum 2:
# 736), so nearly every row's fate is the rule's. Two retrieval layers (PKM: V only; PEER:
# U and V). Expert weight decay and a high expert lr make an update of an untouched row (a
# decay step, or a momentum step of a row touched earlier) O(lr) = 1e-2 relative, 100 x TOL.
# eps 1e-6 as in test_model.py (float32 noise in exactly-zero gradients). Seed 4: its
# smallest top-k margin over all steps of both variants is 1.5e-4 of the rms score, 15x
# conftest.MARGIN_MIN (seeds 1-11 range from 8e-6 to that; checked again in each test).
LAZY = {"model": {"ffn": "pkm,peer", "context": 8},
        "peer": {"experts": 1024}, "pkm": {"experts": 1024, "query_bn": "false"},
        "train": {"steps": STEPS, "warmup": 2, "seed": 4, "batch_size": 3, "lr": 3e-3,
                  "min_lr_frac": 0.1, "key_lr": 1e-2, "expert_lr": 1e-2, "weight_decay": 0.1,
                  "key_weight_decay": 0.05, "expert_weight_decay": 0.05, "grad_clip": 0,
                  "beta1": 0.9, "beta2": 0.95, "eps": 1e-6,
                  "expert_optimizer": "lazy_adamw"}}
EXPERT_TABLES = ("h0.pkm.v", "h1.peer.u", "h1.peer.v")


def ini(grad_accum, **train):
    t = dict(LAZY["train"], grad_accum=grad_accum, **train)
    return make_ini(dict(LAZY, train=t))


def batches(dump, cfg):
    """The micro-batches testdump trained on: (A, B, T) each."""
    if cfg.grad_accum > 1:
        return (np.asarray(dump["/train/inputs"], np.int64),
                np.asarray(dump["/train/targets"], np.int64))
    return (np.asarray(dump["/batch/inputs"], np.int64)[None],
            np.asarray(dump["/batch/targets"], np.int64)[None])


def reference(dump, what):
    cfg = R.parse_config(dump.config_text)
    assert cfg.expert_optimizer == "lazy_adamw"
    params = as_f64(dump.group("params"))
    inputs, targets = batches(dump, cfg)
    margins = []
    losses, norms, final, _ = R.train(
        params, R.init_state(cfg, np.float64), inputs, targets, cfg, STEPS,
        before_step=lambda p, st: margins.extend(topk_margin(cfg, p, st, x) for x in inputs))
    assert_margin(min(margins), f"{what}: {STEPS} lazy steps")
    return cfg, params, losses, norms, final


def check(dump, what, final_c, losses_c, norms_c):
    cfg, params, losses, norms, final = reference(dump, what)
    # TOL: test_model.py's argument for 10 AdamW steps (C follows the reference to ~1e-6
    # per step, Adam passes it on at about its size): the lazy rule adds no arithmetic, only
    # the choice of rows, which is the top-k's integer decision (the margin check above).
    loss_err = np.abs(losses_c - losses) / np.abs(losses)
    norm_err = np.abs(norms_c - norms) / np.abs(norms)
    print(f"{what}: loss rel err {loss_err.max():.2g}, grad norm rel err {norm_err.max():.2g}")
    assert (loss_err <= TOL).all(), (what, losses_c, losses)
    assert (norm_err <= TOL).all(), (what, norms_c, norms)
    assert_close(final_c, final, f"{what}: parameters after {STEPS} lazy steps")
    # untouched rows were not written at all: bit for bit the initial float32 values
    for name in EXPERT_TABLES:
        p0, p1 = np.asarray(params[name], np.float32), np.asarray(final_c[name], np.float32)
        same = np.all(p0.view(np.uint32) == p1.view(np.uint32), axis=1)
        never = ~np.asarray(np.any(final[name] != params[name], axis=1))   # reference
        assert np.array_equal(same, never), f"{what}: {name}: other rows kept than the reference's"
        assert same.mean() > 0.5, f"{what}: {name}: only {same.mean():.0%} rows untouched"
    # teeth: the dense rule on the same batches ends O(expert_lr) away, far beyond TOL
    dense = R.train(params, R.init_state(cfg, np.float64), *batches(dump, cfg),
                    dataclasses.replace(cfg, expert_optimizer="adamw"), STEPS)[2]
    moved = min(rel_err(dense[n], final[n]) for n in EXPERT_TABLES)
    assert moved > 10 * TOL, f"{what}: lazy and dense AdamW differ by only {moved:.2g}"


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_lazy_adamw_one_rank(run_dump, tmp_path, grad_accum):
    a = run_dump(tmp_path / "a", "model", ini(grad_accum), "--steps", STEPS)
    check(a, f"P=1 grad_accum={grad_accum}", a.group("final"),
          np.asarray(a["/train/losses"], np.float64), np.asarray(a["/train/grad_norms"], np.float64))
    # bitwise determinism: a second run writes the same bits
    b = run_dump(tmp_path / "b", "model", ini(grad_accum), "--steps", STEPS)
    for k, v in a.group("final").items():
        assert np.array_equal(np.asarray(v).view(np.uint32),
                              np.asarray(b.group("final")[k]).view(np.uint32)), k
    assert np.array_equal(a["/train/losses"], b["/train/losses"])


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_lazy_adamw_three_ranks(testdump, tmp_path, grad_accum):
    (tmp_path / "config.ini").write_text(ini(grad_accum))
    out = tmp_path / "dump.h5"
    proc = mpirun(3, testdump, "model", tmp_path / "config.ini", out, "--steps", STEPS)
    assert proc.returncode == 0, proc.stderr[-3000:]
    d = ShardedDump(out, 3)
    r0 = d.ranks[0]
    check(_Stitched(d), f"P=3 grad_accum={grad_accum}", d.group("final"),
          np.asarray(r0["/train/losses"], np.float64), np.asarray(r0["/train/grad_norms"], np.float64))


class _Stitched:
    """A ShardedDump seen as one Dump: global params, the whole batch, the config."""

    def __init__(self, d):
        self.d = d
        self.config_text = d.config_text

    def group(self, name):
        return self.d.group(name)

    def __getitem__(self, key):
        return self.d.ranks[0][key]   # batches and losses: the same on every rank
