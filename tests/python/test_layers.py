"""One feed-forward layer of the C implementation against the JAX reference:
y, dx and every parameter gradient of sum(y * dy), and the selected experts."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import millipede_ref as R
from conftest import (as_f64, assert_close, assert_margin, layer_margin, make_ini, rel_err,
                      GRAD_FLOOR, TOL)

TOKENS = 32
BLOCK = 1

# name: (config overrides, eval mode). The tested layer is block 1, so names carry "h1.".
CASES = {
    "peer_bn_gelu": ({"model": {"ffn": "dense,peer"},
                      "peer": {"query_bn": "true", "activation": "gelu"}}, False),
    "peer_nobn_relu": ({"model": {"ffn": "dense,peer"},
                        "peer": {"query_bn": "false", "activation": "relu"}}, False),
    "peer_bn_eval": ({"model": {"ffn": "dense,peer"},
                      "peer": {"query_bn": "true", "activation": "gelu"}}, True),
    "pkm_bn": ({"model": {"ffn": "dense,pkm"}, "pkm": {"query_bn": "true"}}, False),
    "dense": ({"model": {"ffn": "peer,dense"}}, False),
}


@functools.partial(jax.jit, static_argnames=("cfg", "block", "train"))
def reference_layer(params, state, x, dy, cfg, block, train):
    """y, aux (expert ids, gates), parameter gradients and dx of sum(y * dy)."""
    def objective(p, x):
        y, _, aux = R.ffn(cfg, block, x, p, state, train)
        return jnp.sum(y * dy), (y, aux)
    (_, (y, aux)), (grads, dx) = jax.value_and_grad(objective, argnums=(0, 1),
                                                    has_aux=True)(params, x)
    return y, aux, grads, dx


_CACHE = {}


def build_case(name, run_dump, tmp_path_factory):
    """(name, cfg, dump, reference outputs, BN state) of one case, built once per module."""
    if name in _CACHE:
        return _CACHE[name]
    overrides, eval_mode = CASES[name]
    args = ["--block", BLOCK, "--tokens", TOKENS] + (["--eval"] if eval_mode else [])
    dump = run_dump(tmp_path_factory.mktemp(name), "layer", make_ini(overrides), *args)
    cfg = R.parse_config(dump.config_text)
    train = not eval_mode
    params = as_f64(dump.group("params"))
    if cfg.retrieval(BLOCK) is not None and cfg.retrieval(BLOCK).query_bn:
        state = as_f64(dump.group("state")) if eval_mode else R.init_state(cfg, jnp.float64)
        assert set(state) == set(R.init_state(cfg)), f"{name}: /state holds {sorted(state)}"
    else:
        state = {}
    x = np.asarray(dump["/layer/x"], np.float64)
    dy = np.asarray(dump["/layer/dy"], np.float64)
    # C picks the reference's experts only where no near-tie lies within its rounding
    # (conftest.MARGIN_MIN); every comparison below is at TOL (conftest.TOL's argument)
    assert_margin(layer_margin(cfg, BLOCK, x, params, state, train), name)
    ref = reference_layer(params, state, x, dy, cfg, BLOCK, train)
    _CACHE[name] = (name, cfg, dump, ref, state)
    return _CACHE[name]


@pytest.fixture(params=list(CASES), scope="module")
def layer_case(request, run_dump, tmp_path_factory):
    return build_case(request.param, run_dump, tmp_path_factory)


# the cases with a retrieval layer, and those whose BatchNorm runs in train mode
RETRIEVAL_CASES = [n for n, (o, _) in CASES.items() if o["model"]["ffn"].split(",")[BLOCK] != "dense"]
BN_TRAIN_CASES = [n for n in RETRIEVAL_CASES
                  if not CASES[n][1] and CASES[n][0].get(CASES[n][0]["model"]["ffn"].split(",")[BLOCK], {}).get("query_bn") == "true"]


def test_layer_parameters_are_the_documented_ones(layer_case):
    name, cfg, dump, *_ = layer_case
    expected = {t.name: t.shape for t in R.ffn_table(cfg, BLOCK)}
    got = {k: tuple(v.shape) for k, v in dump.group("params").items()}
    assert got == expected, f"{name}: /params differ from docs/model.md"
    train_attr = dump.attrs.get("train", dump.attrs.get("/layer/train"))
    if train_attr is not None:
        assert int(train_attr) == (0 if CASES[name][1] else 1)


def test_layer_output_and_dx(layer_case):
    name, cfg, dump, (y, _, _, dx), _ = layer_case
    assert_close({"y": dump["/layer/y"], "dx": dump["/layer/dx"]}, {"y": y, "dx": dx}, name)


def test_layer_param_grads(layer_case):
    name, cfg, dump, (_, _, grads, _), _ = layer_case
    assert_close(dump.group("grads"), grads, f"{name} gradients", floor=GRAD_FLOOR)


@pytest.mark.parametrize("case", RETRIEVAL_CASES)
def test_layer_selections(case, run_dump, tmp_path_factory):
    name, cfg, dump, (_, aux, _, _), _ = build_case(case, run_dump, tmp_path_factory)
    ids, gates = (np.asarray(a) for a in aux)                         # (N, H, k)
    c_ids = np.asarray(dump["/layer/selections"])
    assert c_ids.shape == ids.shape, f"{name}: selections shape {c_ids.shape} vs {ids.shape}"
    # As sets per (token, head): the order within the k is not part of the contract.
    differ = np.any(np.sort(c_ids, -1) != np.sort(ids, -1), axis=-1)
    if differ.any():
        t, h = np.argwhere(differ)[0]
        pytest.fail(f"{name}: {int(differ.sum())} of {differ.size} (token, head) selections "
                    f"differ; first at token {t} head {h}: C {sorted(c_ids[t, h])} "
                    f"reference {sorted(ids[t, h])}")
    if "/layer/gates" in dump:
        # Gates paired with their expert ids, compared in id order.
        c_gates = np.take_along_axis(np.asarray(dump["/layer/gates"]),
                                     np.argsort(c_ids, -1), -1)
        r_gates = np.take_along_axis(gates, np.argsort(ids, -1), -1)
        err = rel_err(c_gates, r_gates)
        assert err <= TOL, f"{name}: gates relative error {err:.3g}"


@pytest.mark.parametrize("case", BN_TRAIN_CASES)
def test_layer_running_stats(case, run_dump, tmp_path_factory):
    """Train mode updates the BN running statistics (from mean 0, var 1): /new_state."""
    name, cfg, dump, _, state = build_case(case, run_dump, tmp_path_factory)
    assert dump.group("new_state"), f"{name}: the dump has no /new_state"
    params = as_f64(dump.group("params"))
    x = np.asarray(dump["/layer/x"], np.float64)
    _, new_state, _ = R.ffn(cfg, BLOCK, x, params, state, True)
    assert_close(dump.group("new_state"), new_state, f"{name} running statistics")
