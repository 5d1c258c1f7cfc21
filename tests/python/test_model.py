"""The whole C model against the JAX reference: logits, loss and every parameter gradient
of one train-mode forward/backward, then 10 AdamW steps on the same batch (losses, gradient
norms before clipping, final parameters), once without and once with gradient clipping."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import millipede_ref as R
from conftest import (as_f64, assert_close, assert_margin, make_ini, rel_err, topk_margin,
                      GRAD_FLOOR, TOL)

STEPS = 10
# Nonzero decay in every group; warmup 3 of 10 steps so warmup and cosine both run.
# eps 1e-6 rather than 1e-8: some gradient entries are zero in exact arithmetic (the key
# part of the attention qkv bias: softmax is shift invariant), and Adam divides the float32
# noise there by sqrt(v) + eps, which with a tiny eps turns it into a full-size update.
TRAIN = {"steps": STEPS, "warmup": 3, "lr": 3e-3, "min_lr_frac": 0.1, "key_lr": 1e-2,
         "expert_lr": 1e-2, "weight_decay": 0.1, "key_weight_decay": 0.05,
         "expert_weight_decay": 0.05, "grad_clip": 0, "beta1": 0.9, "beta2": 0.95,
         "eps": 1e-6}
# The PKM block has no query BN here: with it, its ln2.b gradient is zero in exact
# arithmetic (BN removes the per-column constant), so the C value of ln2.b after training
# would be pure amplified noise. PKM with BN is covered by test_layers.py.
# "balanced": sub-key balance biases in both retrieval layers, at a rate large enough that
# they reorder the top-k within the 10 steps (the scores' rms is ~0.6 at initialisation:
# query BN gives unit variance, the keys are uniform with bound 1/sqrt(dk/2)), so a bias
# that ranked wrongly, or a gate that used the biased score, shows in the losses.
VARIANTS = {
    "dense,peer": {"model": {"ffn": "dense,peer"}},
    "pkm,peer": {"model": {"ffn": "pkm,peer"}, "pkm": {"query_bn": "false"}},
    "pkm,peer balanced": {"model": {"ffn": "pkm,peer"}, "pkm": {"query_bn": "false",
                                                                "balance_rate": 0.05},
                          "peer": {"balance_rate": 0.05}},
}


@functools.partial(jax.jit, static_argnames=("cfg",))
def reference_step(params, state, inputs, targets, cfg):
    return R.loss_and_grads(params, state, inputs, targets, cfg)


class Run:
    """One C dump with --steps and the reference training from the same initial values."""

    def __init__(self, variant, dump):
        self.variant = variant
        self.dump = dump
        self.cfg = R.parse_config(dump.config_text)
        self.params = as_f64(dump.group("params"))
        self.state = R.init_state(self.cfg, jnp.float64)
        self.inputs = np.asarray(dump["/batch/inputs"], np.int64)
        self.targets = np.asarray(dump["/batch/targets"], np.int64)
        self._trained = None

    @property
    def trained(self):
        """(losses, grad norms, final params, final router state) of the reference; also
        self.margin, the smallest top-k margin of the STEPS forwards (conftest.MARGIN_MIN)."""
        if self._trained is None:
            margins = []
            losses, norms, final, state = R.train(
                self.params, self.state, self.inputs, self.targets, self.cfg, STEPS,
                before_step=lambda p, st: margins.append(topk_margin(self.cfg, p, st,
                                                                     self.inputs)))
            self.margin = min(margins)
            self._trained = losses, norms, final, state
        return self._trained


@pytest.fixture(params=list(VARIANTS), scope="module")
def unclipped(request, run_dump, tmp_path_factory):
    overrides = dict(VARIANTS[request.param], train=TRAIN)
    directory = tmp_path_factory.mktemp(request.param.replace(",", "_").replace(" ", "_"))
    return Run(request.param, run_dump(directory, "model", make_ini(overrides),
                                       "--steps", STEPS))


@pytest.fixture(scope="module")
def clipped(unclipped, run_dump, tmp_path_factory):
    """The same run with grad_clip at the median of the unclipped gradient norms, so that
    some steps are clipped and others not (Adam is nearly scale invariant, so the clipped
    trajectory stays close to the unclipped one; the test checks the split)."""
    clip = float(np.median(unclipped.trained[1]))
    directory = tmp_path_factory.mktemp(unclipped.variant.replace(",", "_").replace(" ", "_")
                                        + "_clip")
    overrides = dict(VARIANTS[unclipped.variant], train=TRAIN)
    dump = run_dump(directory, "model", make_ini(overrides), "--steps", STEPS,
                    "--set", f"train.grad_clip={clip:.6g}")
    return Run(unclipped.variant, dump)


def test_model_parameters_are_the_documented_ones(unclipped):
    run = unclipped
    expected = {t.name: t.shape for t in R.param_table(run.cfg)}
    got = {k: tuple(v.shape) for k, v in run.params.items()}
    assert got == expected, f"{run.variant}: /params differ from docs/model.md"
    assert run.inputs.shape == (run.cfg.batch_size, run.cfg.context)


def test_model_forward_backward(unclipped):
    run = unclipped
    assert_margin(topk_margin(run.cfg, run.params, run.state, run.inputs), run.variant)
    loss, logits, grads, _ = reference_step(run.params, run.state, run.inputs, run.targets,
                                            run.cfg)
    assert_close({"logits": run.dump["/out/logits"], "loss": run.dump["/out/loss"]},
                 {"logits": logits, "loss": loss}, run.variant)
    assert_close(run.dump.group("grads"), grads, f"{run.variant} gradients", floor=GRAD_FLOOR)


def check_training(run):
    losses, norms, final, state = run.trained
    what = f"{run.variant} grad_clip={run.cfg.grad_clip:g}"
    # TOL over 10 steps: C follows the reference to ~1e-6 per step (conftest.TOL), which
    # Adam passes on at about its size (eps 1e-6 keeps it from dividing rounding noise up);
    # measured: losses and norms ~1e-7, parameters up to ~1e-5. That holds while no selection
    # flips along the way (conftest.MARGIN_MIN, checked on every step's forward).
    assert_margin(run.margin, f"{what}: {STEPS} training steps")
    c_losses = np.asarray(run.dump["/train/losses"], np.float64)
    c_norms = np.asarray(run.dump["/train/grad_norms"], np.float64)
    assert c_losses.shape == (STEPS,) and c_norms.shape == (STEPS,)
    loss_err = np.abs(c_losses - losses) / np.abs(losses)
    norm_err = np.abs(c_norms - norms) / np.abs(norms)
    print(f"{what}: largest relative error of the losses {loss_err.max():.2g}, "
          f"of the gradient norms {norm_err.max():.2g} (tolerance {TOL:g})")
    assert (loss_err <= TOL).all(), (
        f"{what}: step {int(np.argmax(loss_err))} loss relative error {loss_err.max():.3g}; "
        f"C {c_losses} reference {losses}")
    assert (norm_err <= TOL).all(), (
        f"{what}: step {int(np.argmax(norm_err))} grad norm relative error "
        f"{norm_err.max():.3g}; C {c_norms} reference {norms}")
    assert_close(run.dump.group("final"), final, f"{what}: parameters after {STEPS} steps")
    if run.dump.group("final_state"):   # BN running statistics, balance biases
        assert_close(run.dump.group("final_state"), state,
                     f"{what}: router state after {STEPS} steps")
    # Every parameter moved by much more than the tolerance, so the check above has teeth.
    moved = {k: rel_err(final[k], run.params[k]) for k in run.params}
    assert min(moved.values()) > 10 * TOL, f"{what}: some parameters barely moved: {moved}"


def test_model_training(unclipped):
    assert unclipped.cfg.grad_clip == 0
    check_training(unclipped)


def test_model_training_clipped(clipped):
    norms = clipped.trained[1]
    clip = clipped.cfg.grad_clip
    assert (norms > clip).any() and (norms < clip).any(), \
        f"{clipped.variant}: grad_clip {clip} does not split the gradient norms {norms}"
    check_training(clipped)
