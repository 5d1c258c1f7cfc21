"""Self-tests of the JAX reference itself (no C involved): product-key top-k against brute
force, the PEER/PKM layer gradients against finite differences, and the optimizer against a
plain numpy transcription of docs/model.md's AdamW, schedule and clipping."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import millipede_ref as R
from conftest import make_ini, rel_err


@pytest.mark.parametrize("n,k,half,rows", [(4, 1, 2, 50), (8, 3, 4, 200), (16, 16, 8, 50),
                                           (32, 7, 3, 100)])
def test_topk_equals_brute_force(n, k, half, rows):
    rng = np.random.default_rng(n * 100 + k)
    q1, q2 = rng.normal(size=(2, rows, 2, half))
    k1, k2 = rng.normal(size=(2, n, half))
    scores, experts, _, _ = R.product_key_topk(q1, q2, k1, k2, k)
    # Brute force: every expert e = a*n + b scores s1[a] + s2[b].
    full = (q1 @ k1.T)[..., :, None] + (q2 @ k2.T)[..., None, :]   # (rows, 2, n, n)
    full = full.reshape(rows, 2, n * n)
    order = np.argsort(-full, axis=-1, kind="stable")[..., :k]
    np.testing.assert_array_equal(np.asarray(experts), order)
    # the same two float64 dot products of <= 16 terms, summed in other orders: <= ~16 x
    # 1.1e-16 of |scores| ~ 1..10; a wrong candidate is O(0.1)
    np.testing.assert_allclose(np.asarray(scores), np.take_along_axis(full, order, -1),
                               rtol=1e-12, atol=1e-12)


def _layer_case(kind, query_bn, act, train):
    cfg = R.parse_config(make_ini({
        "model": {"d_model": 6, "n_layers": 1, "ffn": kind},
        kind: {"experts": 16, "heads": 2, "topk": 3, "key_dim": 4,
               "query_bn": "true" if query_bn else "false", "activation": act}}))
    params = {k: v for k, v in R.init_params(cfg, jax.random.PRNGKey(3), jnp.float64).items()
              if k.startswith("h0.")}
    # Random (not identity) BN affine and running stats so every term is exercised.
    rng = np.random.default_rng(7)
    for name in list(params):
        if ".bn." in name:
            params[name] = params[name] + 0.3 * rng.normal(size=params[name].shape)
    state = {k: v + 0.5 * np.abs(rng.normal(size=v.shape))
             for k, v in R.init_state(cfg, jnp.float64).items()}
    x = rng.normal(size=(10, 6))
    dy = rng.normal(size=(10, 6))

    def objective(p, x):
        y, _, _ = R.ffn(cfg, 0, x, p, state, train)
        return jnp.sum(y * dy)
    return jax.jit(objective), params, x


@pytest.mark.parametrize("kind,query_bn,act,train", [
    ("peer", True, "gelu", True), ("peer", False, "relu", True), ("peer", True, "gelu", False),
    ("pkm", True, "gelu", True)])
def test_layer_grad_finite_differences(kind, query_bn, act, train):
    objective, params, x = _layer_case(kind, query_bn, act, train)
    grads, dx = jax.grad(objective, argnums=(0, 1))(params, x)
    rng = np.random.default_rng(11)
    # float64 (u = 1.1e-16): central differences err by h^2 |f'''| / 6 ~ 1e-13
    # (truncation) plus u |f| / h ~ 1e-10 |f| (rounding), both far below 1e-6 of
    # max(1, |f'|); a wrong gradient is O(1e-2) and more. No selection of these fixed float64
    # cases lies within h of a tie (a flip would be an O(1) jump), on any machine.
    h = 1e-6
    # Directional derivative along a random direction, per tensor and for x.
    for name in list(params) + ["x"]:
        base = x if name == "x" else params[name]
        d = rng.normal(size=base.shape)

        def at(t):
            if name == "x":
                return objective(params, x + t * d)
            return objective({**params, name: params[name] + t * d}, x)
        numeric = (at(h) - at(-h)) / (2 * h)
        analytic = np.sum(np.asarray(dx if name == "x" else grads[name]) * d)
        assert abs(numeric - analytic) <= 1e-6 * max(1.0, abs(numeric)), \
            f"{kind} {name}: finite difference {numeric} vs grad {analytic}"


def test_model_grad_finite_differences():
    cfg = R.parse_config(make_ini({"model": {"ffn": "pkm,peer", "d_model": 8, "vocab_size": 16,
                                             "context": 8}}))
    params = R.init_params(cfg, jax.random.PRNGKey(5), jnp.float64)
    state = R.init_state(cfg, jnp.float64)
    rng = np.random.default_rng(2)
    inputs = rng.integers(0, 16, (2, 8))
    targets = rng.integers(0, 16, (2, 8))
    loss_fn = jax.jit(lambda p: R.forward(p, state, inputs, targets, cfg)[0])
    grads = jax.grad(loss_fn)(params)
    # Relative perturbations: a flip of a selection (a near tie) makes the loss jump.
    # float64: truncation ~h^2 = 1e-14, rounding u |L| / h ~ 1e-9 |L|: far below 1e-6.
    h = 1e-7
    for name in params:
        scale = max(float(np.sqrt(np.mean(np.square(params[name])))), 1e-2)
        d = scale * rng.normal(size=params[name].shape)
        numeric = (loss_fn({**params, name: params[name] + h * d})
                   - loss_fn({**params, name: params[name] - h * d})) / (2 * h)
        analytic = float(np.sum(np.asarray(grads[name]) * d))
        assert abs(numeric - analytic) <= 1e-6 * max(1.0, abs(numeric)), \
            f"{name}: finite difference {numeric} vs grad {analytic}"


def _numpy_adamw(cfg, params, grad_seq):
    """docs/model.md's optimizer, transcribed literally."""
    table = {t.name: t for t in R.param_table(cfg)}
    peak = {"dense": cfg.lr, "keys": cfg.key_lr, "experts": cfg.expert_lr}
    wd = {"dense": cfg.weight_decay, "keys": cfg.key_weight_decay,
          "experts": cfg.expert_weight_decay}
    p = {k: np.array(v, np.float64) for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v = {k: np.zeros_like(x) for k, x in p.items()}
    for s, g in enumerate(grad_seq):
        norm = math.sqrt(sum(float(np.sum(x * x)) for x in g.values()))
        scale = min(1.0, cfg.grad_clip / norm) if cfg.grad_clip > 0 else 1.0
        t = s + 1
        for name in p:
            grp = table[name].group
            lr_peak, floor = peak[grp], peak[grp] * cfg.min_lr_frac
            if s < cfg.warmup:
                lr = lr_peak * (s + 1) / cfg.warmup
            else:
                lr = floor + (lr_peak - floor) * 0.5 * (
                    1 + math.cos(math.pi * (s - cfg.warmup) / (cfg.steps - cfg.warmup)))
            gi = g[name] * scale
            m[name] = cfg.beta1 * m[name] + (1 - cfg.beta1) * gi
            v[name] = cfg.beta2 * v[name] + (1 - cfg.beta2) * gi * gi
            mhat = m[name] / (1 - cfg.beta1 ** t)
            vhat = v[name] / (1 - cfg.beta2 ** t)
            decay = wd[grp] if table[name].decay else 0.0
            p[name] = p[name] - lr * (mhat / (np.sqrt(vhat) + cfg.eps) + decay * p[name])
    return p


def test_optimizer_matches_docs():
    cfg = R.parse_config(make_ini({
        "model": {"ffn": "pkm,peer"},
        "train": {"steps": 8, "warmup": 3, "lr": 0.01, "min_lr_frac": 0.2, "key_lr": 0.03,
                  "expert_lr": 0.05, "weight_decay": 0.1, "key_weight_decay": 0.3,
                  "expert_weight_decay": 0.2, "grad_clip": 1.5, "beta1": 0.8, "beta2": 0.9,
                  "eps": 1e-6}}))
    params = R.init_params(cfg, jax.random.PRNGKey(0), jnp.float64)
    rng = np.random.default_rng(4)
    # Gradient norms around the clip value: some steps are clipped, some are not.
    grad_seq = []
    for s in range(cfg.steps):
        g = {k: rng.normal(size=v.shape) for k, v in params.items()}
        n = math.sqrt(sum(float(np.sum(x * x)) for x in g.values()))
        target = [0.5, 3.0, 1.0, 2.0, 0.1, 5.0, 1.4, 1.6][s]
        grad_seq.append({k: x * target / n for k, x in g.items()})
    expected = _numpy_adamw(cfg, params, grad_seq)
    opt = R.make_optimizer(cfg, params)
    state = opt.init(params)
    update = jax.jit(opt.update)
    p = params
    for g in grad_seq:
        updates, state = update({k: jnp.asarray(x) for k, x in g.items()}, state, p)
        p = {k: p[k] + updates[k] for k in p}
    # both float64, ~10 operations a step for 8 steps: <= ~100 u = 1e-14; a wrong schedule,
    # bias correction or clipping is >= 1e-3
    for name in params:
        assert rel_err(p[name], expected[name]) < 1e-12, name


def test_schedule_edges():
    cfg = R.parse_config(make_ini({"train": {"steps": 5, "warmup": 5, "min_lr_frac": 0.1}}))
    sched = R.lr_schedule(2.0, cfg)
    assert [float(sched(s)) for s in range(5)] == pytest.approx([0.4, 0.8, 1.2, 1.6, 2.0])
    cfg = R.parse_config(make_ini({"train": {"steps": 5, "warmup": 0, "min_lr_frac": 0.1}}))
    sched = R.lr_schedule(2.0, cfg)
    assert float(sched(0)) == pytest.approx(2.0)
    assert float(sched(5)) == pytest.approx(0.2)


def test_bn_running_stats():
    r = R.Retrieval(experts=4, n_sub=2, heads=1, topk=1, key_dim=2, query_bn=True,
                    bn_momentum=0.25, bn_eps=1e-5, activation="gelu")
    rng = np.random.default_rng(0)
    q = rng.normal(size=(7, 2))
    rm, rv = rng.normal(size=2), 1 + rng.random(2)
    # float64 against the same formula in numpy: a few u (1e-16) apart; rtol 1e-12
    _, new_m, new_v = R.query_bn(q, np.ones(2), np.zeros(2), rm, rv, r, True)
    np.testing.assert_allclose(new_m, 0.75 * rm + 0.25 * q.mean(0), rtol=1e-12)
    np.testing.assert_allclose(new_v, 0.75 * rv + 0.25 * q.var(0, ddof=1), rtol=1e-12)
    out, m2, v2 = R.query_bn(q, np.ones(2), np.zeros(2), rm, rv, r, False)
    np.testing.assert_allclose(out, (q - rm) / np.sqrt(rv + 1e-5), rtol=1e-12)
    assert m2 is rm and v2 is rv


def test_grad_accum_is_the_mean_of_micro_batch_gradients():
    cfg = R.parse_config(make_ini({"model": {"ffn": "dense,peer", "d_model": 8, "vocab_size": 16,
                                             "context": 8},
                                   "train": {"grad_accum": 2, "batch_size": 2}}))
    params = R.init_params(cfg, jax.random.PRNGKey(1), jnp.float64)
    state = R.init_state(cfg, jnp.float64)
    rng = np.random.default_rng(8)
    inputs = rng.integers(0, 16, (2, 2, 8))
    targets = rng.integers(0, 16, (2, 2, 8))
    opt = R.make_optimizer(cfg, params)
    new_params, _, new_state, loss, gnorm = jax.jit(R.make_train_step(cfg, opt))(
        params, opt.init(params), state, inputs, targets)
    # By hand: two micro-batches, BN state threaded through, gradients averaged.
    loss_and_grads = jax.jit(R.loss_and_grads, static_argnums=4)
    l0, _, g0, s1 = loss_and_grads(params, state, inputs[0], targets[0], cfg)
    l1, _, g1, s2 = loss_and_grads(params, s1, inputs[1], targets[1], cfg)
    grads = {k: (g0[k] + g1[k]) / 2 for k in g0}
    updates, _ = jax.jit(opt.update)(grads, opt.init(params), params)
    # float64, the same operations in other orders: a few u (1e-16) apart; rel 1e-12
    assert float(loss) == pytest.approx((float(l0) + float(l1)) / 2, rel=1e-12)
    norm = math.sqrt(sum(float(jnp.sum(g * g)) for g in grads.values()))
    assert float(gnorm) == pytest.approx(norm, rel=1e-12)
    for k in params:
        assert rel_err(new_params[k], params[k] + updates[k]) < 1e-12, k
    for k in s2:
        assert rel_err(new_state[k], s2[k]) < 1e-12, k
