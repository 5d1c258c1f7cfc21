"""Independent JAX reference of the millipede model (the test oracle).

Written from docs/model.md only. Everything is a pure function of plain dicts of arrays:

    params: {name: array}      names and shapes as in docs/model.md ("h1.peer.wq", ...)
    state:  {name: array}      router state: BatchNorm running statistics
                               ("h1.peer.bn.running_mean", ...) and sub-key balance
                               biases ("h1.peer.k1_bias", (H, n))

The tests run this in float64 (jax_enable_x64) on the float32 parameters the C program
dumped; the benchmark runs it in float32. Nothing here switches x64 on or off: dtypes
follow the arrays passed in.
"""
import configparser
import dataclasses
import math
from typing import Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

FFN_KINDS = ("dense", "peer", "pkm")
LN_EPS = 1e-5

# ----------------------------------------------------------------------------------------
# configuration


@dataclasses.dataclass(frozen=True)
class Retrieval:
    """Product-key retrieval of one kind of layer ([peer] or [pkm])."""
    experts: int        # N = n*n
    n_sub: int          # n
    heads: int          # H
    topk: int           # k
    key_dim: int        # dk (even)
    query_bn: bool
    bn_momentum: float
    bn_eps: float
    activation: str     # gelu | relu (PEER only)
    balance_rate: float = 0.0   # sub-key balance bias step, 0 = no biases


@dataclasses.dataclass(frozen=True)
class Config:
    """The keys of a resolved millipede INI that the model and optimizer depend on.
    Frozen (hashable) so that it can be a static argument of jax.jit."""
    vocab_size: int
    context: int
    d_model: int
    n_layers: int
    n_heads: int
    dense_hidden: int
    ffn: Tuple[str, ...]   # one kind per layer
    init_std: float
    peer: Retrieval
    pkm: Retrieval
    steps: int
    seed: int
    batch_size: int
    grad_accum: int
    lr: float
    min_lr_frac: float
    warmup: int
    weight_decay: float
    beta1: float
    beta2: float
    eps: float
    grad_clip: float
    expert_lr: float
    expert_weight_decay: float
    key_lr: float
    key_weight_decay: float
    expert_optimizer: str = "adamw"   # adamw | lazy_adamw (docs/model.md, "Lazy AdamW")

    def retrieval(self, layer):
        kind = self.ffn[layer]
        return None if kind == "dense" else getattr(self, kind)


# Fallbacks for keys a hand-written INI leaves out (the benchmark reads configs/*.ini):
# the defaults of docs/config.md. The tests never rely on these: the dump program writes
# the fully resolved INI.
DEFAULTS = {
    "model": {"vocab_size": "256", "context": "128", "d_model": "128", "n_layers": "4",
              "n_heads": "4", "dense_hidden": "0", "ffn": "dense", "init_std": "0.02"},
    "retrieval": {"experts": "65536", "heads": "4", "topk": "8", "key_dim": "64",
                  "query_bn": "true", "bn_momentum": "0.1", "bn_eps": "1e-5",
                  "activation": "gelu", "balance_rate": "0"},
    "train": {"steps": "1000", "seed": "1337", "batch_size": "8", "grad_accum": "1",
              "lr": "1e-3", "min_lr_frac": "0.1", "warmup": "100", "weight_decay": "0.1",
              "beta1": "0.9", "beta2": "0.95", "eps": "1e-8", "grad_clip": "1.0",
              "expert_lr": "1e-3", "expert_weight_decay": "0", "key_lr": "1e-3",
              "key_weight_decay": "0", "expert_optimizer": "adamw"},
}

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _bool(section, key, text):
    t = text.strip().lower()
    if t in _TRUE:
        return True
    if t in _FALSE:
        return False
    raise ValueError(f"config: key '{section}.{key}': expected a boolean, got '{text}'")


def parse_config(text, overrides=()):
    """Parses INI text (plus "section.key=value" overrides) into a Config."""
    cp = configparser.ConfigParser(interpolation=None, inline_comment_prefixes=(";", "#"))
    cp.read_string(text)
    for ov in overrides:
        lhs, sep, value = ov.partition("=")
        section, dot, key = lhs.strip().partition(".")
        if not sep or not dot:
            raise ValueError(f"override '{ov}': expected section.key=value")
        if not cp.has_section(section):
            cp.add_section(section)
        cp.set(section, key, value.strip())

    def get(section, key, defaults_section=None):
        if cp.has_option(section, key):
            return cp.get(section, key).strip().strip('"')
        return DEFAULTS[defaults_section or section][key]

    def retrieval(section):
        g = lambda key: get(section, key, "retrieval")  # noqa: E731
        experts = int(g("experts"))
        n = math.isqrt(experts)
        if n * n != experts:
            raise ValueError(f"config: key '{section}.experts': expected a square, got {experts}")
        act = g("activation").lower()
        if act not in ("gelu", "relu"):
            raise ValueError(f"config: key '{section}.activation': expected gelu|relu, got {act}")
        return Retrieval(experts=experts, n_sub=n, heads=int(g("heads")), topk=int(g("topk")),
                         key_dim=int(g("key_dim")),
                         query_bn=_bool(section, "query_bn", g("query_bn")),
                         bn_momentum=float(g("bn_momentum")), bn_eps=float(g("bn_eps")),
                         activation=act, balance_rate=float(g("balance_rate")))

    m = lambda key: get("model", key)  # noqa: E731
    t = lambda key: get("train", key)  # noqa: E731
    L = int(m("n_layers"))
    C = int(m("d_model"))
    kinds = [k.strip().lower() for k in m("ffn").split(",")]
    if len(kinds) == 1:
        kinds = kinds * L
    if len(kinds) != L or any(k not in FFN_KINDS for k in kinds):
        raise ValueError(f"config: key 'model.ffn': expected one of dense|peer|pkm or {L} of them, "
                         f"got '{m('ffn')}'")
    F = int(m("dense_hidden"))
    return Config(
        vocab_size=int(m("vocab_size")), context=int(m("context")), d_model=C, n_layers=L,
        n_heads=int(m("n_heads")), dense_hidden=F if F > 0 else 4 * C, ffn=tuple(kinds),
        init_std=float(m("init_std")), peer=retrieval("peer"), pkm=retrieval("pkm"),
        steps=int(t("steps")), seed=int(t("seed")), batch_size=int(t("batch_size")),
        grad_accum=int(t("grad_accum")), lr=float(t("lr")), min_lr_frac=float(t("min_lr_frac")),
        warmup=int(t("warmup")), weight_decay=float(t("weight_decay")),
        beta1=float(t("beta1")), beta2=float(t("beta2")), eps=float(t("eps")),
        grad_clip=float(t("grad_clip")), expert_lr=float(t("expert_lr")),
        expert_weight_decay=float(t("expert_weight_decay")), key_lr=float(t("key_lr")),
        key_weight_decay=float(t("key_weight_decay")),
        expert_optimizer=t("expert_optimizer"))


# ----------------------------------------------------------------------------------------
# parameter table (docs/model.md, "Parameters")


@dataclasses.dataclass(frozen=True)
class Tensor:
    name: str
    shape: Tuple[int, ...]
    group: str      # dense | keys | experts
    decay: bool     # weight decay applies
    init: str       # normal:<std> | ones | zeros | uniform:<bound>


def param_table(cfg):
    """All parameters in model order."""
    C, L = cfg.d_model, cfg.n_layers
    std, pstd = cfg.init_std, cfg.init_std / math.sqrt(2 * L)
    out = [Tensor("wte", (cfg.vocab_size, C), "dense", True, f"normal:{std}"),
           Tensor("wpe", (cfg.context, C), "dense", True, f"normal:{std}")]
    for l in range(L):
        h = f"h{l}."
        out += [Tensor(h + "ln1.w", (C,), "dense", False, "ones"),
                Tensor(h + "ln1.b", (C,), "dense", False, "zeros"),
                Tensor(h + "attn.qkv.w", (3 * C, C), "dense", True, f"normal:{std}"),
                Tensor(h + "attn.qkv.b", (3 * C,), "dense", False, "zeros"),
                Tensor(h + "attn.proj.w", (C, C), "dense", True, f"normal:{pstd}"),
                Tensor(h + "attn.proj.b", (C,), "dense", False, "zeros"),
                Tensor(h + "ln2.w", (C,), "dense", False, "ones"),
                Tensor(h + "ln2.b", (C,), "dense", False, "zeros")]
        out += ffn_table(cfg, l)
    out += [Tensor("lnf.w", (C,), "dense", False, "ones"),
            Tensor("lnf.b", (C,), "dense", False, "zeros")]
    return out


def ffn_table(cfg, l):
    """The parameters of block l's feed-forward."""
    C, F = cfg.d_model, cfg.dense_hidden
    kind = cfg.ffn[l]
    p = f"h{l}.{'mlp' if kind == 'dense' else kind}."
    if kind == "dense":
        return [Tensor(p + "fc.w", (F, C), "dense", True, f"normal:{cfg.init_std}"),
                Tensor(p + "fc.b", (F,), "dense", False, "zeros"),
                Tensor(p + "proj.w", (C, F), "dense", True,
                       f"normal:{cfg.init_std / math.sqrt(2 * cfg.n_layers)}"),
                Tensor(p + "proj.b", (C,), "dense", False, "zeros")]
    r = cfg.retrieval(l)
    hd, half = r.heads * r.key_dim, r.key_dim // 2
    out = [Tensor(p + "wq", (hd, C), "dense", True, f"normal:{cfg.init_std}")]
    if r.query_bn:
        out += [Tensor(p + "bn.w", (hd,), "dense", False, "ones"),
                Tensor(p + "bn.b", (hd,), "dense", False, "zeros")]
    bound = 1.0 / math.sqrt(half)
    out += [Tensor(p + "k1", (r.n_sub, half), "keys", True, f"uniform:{bound}"),
            Tensor(p + "k2", (r.n_sub, half), "keys", True, f"uniform:{bound}")]
    if kind == "peer":
        out.append(Tensor(p + "u", (r.experts, C), "experts", True,
                          f"normal:{1 / math.sqrt(C)}"))
    out.append(Tensor(p + "v", (r.experts, C), "experts", True,
                      f"normal:{1 / math.sqrt(C)}"))
    return out


def init_state(cfg, dtype=jnp.float32):
    """BatchNorm running statistics: mean 0, var 1; balance biases 0."""
    state = {}
    for l in range(cfg.n_layers):
        r = cfg.retrieval(l)
        if r is None:
            continue
        p = f"h{l}.{cfg.ffn[l]}."
        if r.query_bn:
            state[p + "bn.running_mean"] = jnp.zeros((r.heads * r.key_dim,), dtype)
            state[p + "bn.running_var"] = jnp.ones((r.heads * r.key_dim,), dtype)
        if r.balance_rate > 0:
            state[p + "k1_bias"] = jnp.zeros((r.heads, r.n_sub), dtype)
            state[p + "k2_bias"] = jnp.zeros((r.heads, r.n_sub), dtype)
    return state


def init_params(cfg, key, dtype=jnp.float32):
    """Random parameters with the documented distributions (not the C values: the tests
    use the dumped parameters; this is for the benchmark)."""
    params = {}
    for i, t in enumerate(param_table(cfg)):
        k = jax.random.fold_in(key, i)
        kind, _, arg = t.init.partition(":")
        if kind == "normal":
            params[t.name] = float(arg) * jax.random.normal(k, t.shape, dtype)
        elif kind == "uniform":
            params[t.name] = jax.random.uniform(k, t.shape, dtype, -float(arg), float(arg))
        elif kind == "ones":
            params[t.name] = jnp.ones(t.shape, dtype)
        else:
            params[t.name] = jnp.zeros(t.shape, dtype)
    return params


# ----------------------------------------------------------------------------------------
# layers


def layer_norm(x, w, b):
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)   # biased
    return (x - mean) / jnp.sqrt(var + LN_EPS) * w + b


def attention(a, p, prefix, n_heads):
    """Causal self-attention, a (B, T, C) -> (B, T, C), without the residual."""
    B, T, C = a.shape
    hs = C // n_heads
    qkv = a @ p[prefix + "qkv.w"].T + p[prefix + "qkv.b"]          # (B, T, 3C)
    q, k, v = (qkv[..., i * C:(i + 1) * C].reshape(B, T, n_heads, hs) for i in range(3))
    scores = jnp.einsum("bthd,bshd->bhts", q, k) / math.sqrt(hs)  # (B, NH, T, T)
    causal = jnp.tril(jnp.ones((T, T), dtype=bool))
    scores = jnp.where(causal, scores, -jnp.inf)
    att = jax.nn.softmax(scores, axis=-1)
    o = jnp.einsum("bhts,bshd->bthd", att, v).reshape(B, T, C)
    return o @ p[prefix + "proj.w"].T + p[prefix + "proj.b"]


def dense_mlp(f, p, prefix):
    """f (..., C) -> (..., C); exact (erf) GELU."""
    h = jax.nn.gelu(f @ p[prefix + "fc.w"].T + p[prefix + "fc.b"], approximate=False)
    return h @ p[prefix + "proj.w"].T + p[prefix + "proj.b"]


def query_bn(q, w, b, running_mean, running_var, r, train):
    """BatchNorm of the queries q (N_tok, H*dk) over the token rows.
    Returns (q_hat, new_running_mean, new_running_var)."""
    if train:
        n = q.shape[0]
        mean = jnp.mean(q, axis=0)
        var = jnp.mean(jnp.square(q - mean), axis=0)                 # biased, for normalising
        m = r.bn_momentum
        new_mean = (1 - m) * running_mean + m * jax.lax.stop_gradient(mean)
        new_var = (1 - m) * running_var + m * jax.lax.stop_gradient(var) * n / (n - 1)
    else:
        mean, var = running_mean, running_var
        new_mean, new_var = running_mean, running_var
    q_hat = w * (q - mean) / jnp.sqrt(var + r.bn_eps) + b
    return q_hat, new_mean, new_var


def product_key_topk(q1, q2, k1, k2, k, b1=None, b2=None):
    """Product-key top-k.  q1, q2 (..., H, dk/2); k1, k2 (n, dk/2); b1, b2 (H, n) balance
    biases or None. Ranks (s1 + b1)[a] + (s2 + b2)[b] and returns the plain scores
    s1[a] + s2[b] (..., H, k) in the ranking's order and expert ids (..., H, k) = a*n + b.
    The scores are differentiable (gathers of s1 and s2); the ids are not."""
    n = k1.shape[0]
    s1 = q1 @ k1.T                                                    # (..., H, n)
    s2 = q2 @ k2.T                                                    # (..., H, n)
    r1 = s1 if b1 is None else s1 + jax.lax.stop_gradient(b1)        # ranked scores
    r2 = s2 if b2 is None else s2 + jax.lax.stop_gradient(b2)
    v1, i1 = jax.lax.top_k(r1, k)                                     # (..., H, k)
    v2, i2 = jax.lax.top_k(r2, k)
    cand = (v1[..., :, None] + v2[..., None, :])                      # (..., H, k, k)
    cand = cand.reshape(cand.shape[:-2] + (k * k,))
    _, c = jax.lax.top_k(cand, k)                                     # (..., H, k)
    a = jnp.take_along_axis(i1, c // k, axis=-1)
    b = jnp.take_along_axis(i2, c % k, axis=-1)
    scores = jnp.take_along_axis(s1, a, axis=-1) + jnp.take_along_axis(s2, b, axis=-1)
    return scores, a * n + b, a, b


def balance_update(bias, idx, r):
    """New balance biases (H, n) after a training forward that selected sub-keys idx
    (N_tok, H, k) of one half: +rate where a head selected a sub-key less often than the
    mean N_tok*k/n, -rate where more often."""
    counts = jnp.sum(jax.nn.one_hot(idx, r.n_sub, dtype=jnp.int32), axis=(0, 2))   # (H, n)
    d = idx.shape[0] * r.topk - r.n_sub * counts
    return bias + jnp.asarray(r.balance_rate, bias.dtype) * jnp.sign(d).astype(bias.dtype)


def retrieve(f, p, prefix, r, state, train):
    """Queries, BN and product-key top-k for rows f (N_tok, C).
    Returns gates (N_tok, H, k), expert ids (N_tok, H, k) and the new router state."""
    new_state = {}
    q = f @ p[prefix + "wq"].T                                        # (N_tok, H*dk)
    if r.query_bn:
        rm, rv = prefix + "bn.running_mean", prefix + "bn.running_var"
        q, new_state[rm], new_state[rv] = query_bn(q, p[prefix + "bn.w"], p[prefix + "bn.b"],
                                                   state[rm], state[rv], r, train)
    q = q.reshape(q.shape[0], r.heads, r.key_dim)                     # (N_tok, H, dk)
    half = r.key_dim // 2
    b1 = b2 = None
    if r.balance_rate > 0:
        b1, b2 = state[prefix + "k1_bias"], state[prefix + "k2_bias"]
    scores, experts, a, b = product_key_topk(q[..., :half], q[..., half:], p[prefix + "k1"],
                                             p[prefix + "k2"], r.topk, b1, b2)
    if r.balance_rate > 0 and train:
        new_state[prefix + "k1_bias"] = balance_update(b1, a, r)
        new_state[prefix + "k2_bias"] = balance_update(b2, b, r)
    gates = jax.nn.softmax(scores, axis=-1)                           # (N_tok, H, k)
    return gates, experts, new_state


def activation(x, name):
    return jax.nn.relu(x) if name == "relu" else jax.nn.gelu(x, approximate=False)


def peer_layer(f, p, prefix, r, state, train):
    """PEER: y_t = sum_h sum_sel g_e act(u_e . f_t) v_e.  f (N_tok, C).
    Returns y (N_tok, C), new router state, (expert ids, gates)."""
    gates, experts, new_state = retrieve(f, p, prefix, r, state, train)
    u = p[prefix + "u"][experts]                                      # (N_tok, H, k, C)
    h = activation(jnp.einsum("thkc,tc->thk", u, f), r.activation)    # (N_tok, H, k)
    v = p[prefix + "v"][experts]                                      # (N_tok, H, k, C)
    y = jnp.einsum("thk,thkc->tc", gates * h, v)
    return y, new_state, (experts, gates)


def pkm_layer(f, p, prefix, r, state, train):
    """PKM: y_t = sum_h sum_sel g_e v_e."""
    gates, experts, new_state = retrieve(f, p, prefix, r, state, train)
    v = p[prefix + "v"][experts]                                      # (N_tok, H, k, C)
    y = jnp.einsum("thk,thkc->tc", gates, v)
    return y, new_state, (experts, gates)


def ffn(cfg, l, f, p, state, train):
    """Block l's feed-forward on rows f (N_tok, C): (y, new router state, aux or None)."""
    kind = cfg.ffn[l]
    if kind == "dense":
        return dense_mlp(f, p, f"h{l}.mlp."), {}, None
    layer = peer_layer if kind == "peer" else pkm_layer
    return layer(f, p, f"h{l}.{kind}.", cfg.retrieval(l), state, train)


# ----------------------------------------------------------------------------------------
# model


def forward(params, state, inputs, targets, cfg, train=True, with_experts=False):
    """inputs, targets (B, T) int. Returns (loss, logits (B, T, V), new_state).
    new_state holds the whole router state: BN running statistics and balance biases
    (unchanged in eval mode). with_experts: also {layer prefix: selected expert ids
    (B*T, H, k)} of every retrieval layer, last."""
    p = params
    B, T = inputs.shape
    x = p["wte"][inputs] + p["wpe"][:T]                               # (B, T, C)
    new_state = dict(state)
    experts = {}
    for l in range(cfg.n_layers):
        h = f"h{l}."
        x = x + attention(layer_norm(x, p[h + "ln1.w"], p[h + "ln1.b"]), p, h + "attn.",
                          cfg.n_heads)
        f = layer_norm(x, p[h + "ln2.w"], p[h + "ln2.b"]).reshape(B * T, -1)
        y, st, aux = ffn(cfg, l, f, p, state, train)
        if aux is not None:
            experts[f"h{l}.{cfg.ffn[l]}."] = aux[0]
        new_state.update(st)
        x = x + y.reshape(B, T, -1)
    logits = layer_norm(x, p["lnf.w"], p["lnf.b"]) @ p["wte"].T       # (B, T, V), tied head
    logp = jax.nn.log_softmax(logits, axis=-1)
    loss = -jnp.mean(jnp.take_along_axis(logp, targets[..., None], axis=-1))
    if with_experts:
        return loss, logits, new_state, experts
    return loss, logits, new_state


def loss_and_grads(params, state, inputs, targets, cfg):
    """Train-mode mean loss, logits, gradients (dict like params) and new router state."""
    def f(p):
        loss, logits, new_state = forward(p, state, inputs, targets, cfg, train=True)
        return loss, (logits, new_state)
    (loss, (logits, new_state)), grads = jax.value_and_grad(f, has_aux=True)(params)
    return loss, logits, grads, new_state


def loss_grads_touched(params, state, inputs, targets, cfg):
    """loss_and_grads, and {expert tensor name: touched (rows,) bool}: the rows that at
    least one selection of this batch chose (docs/model.md, "Lazy AdamW")."""
    def f(p):
        loss, logits, new_state, experts = forward(p, state, inputs, targets, cfg, train=True,
                                                   with_experts=True)
        return loss, (logits, new_state, experts)
    (loss, (logits, new_state, experts)), grads = jax.value_and_grad(f, has_aux=True)(params)
    touched = {}
    for prefix, ids in experts.items():
        rows = params[prefix + "v"].shape[0]
        mask = jnp.zeros((rows,), bool).at[ids.reshape(-1)].set(True)
        for name in (prefix + "u", prefix + "v"):
            if name in params:
                touched[name] = mask
    return loss, logits, grads, new_state, touched


# ----------------------------------------------------------------------------------------
# training


def lr_schedule(peak, cfg):
    """lr at 0-based step s: linear warmup to peak, then cosine to peak*min_lr_frac at
    train.steps. With steps <= warmup there is no cosine part: the lr stays at the peak
    after warmup (never reached inside a run)."""
    floor = peak * cfg.min_lr_frac
    warmup, decay_steps = cfg.warmup, max(cfg.steps - cfg.warmup, 1)

    def schedule(count):
        s = jnp.asarray(count, dtype=jnp.result_type(float))
        warm = peak * (s + 1) / max(warmup, 1)
        progress = jnp.clip((s - warmup) / decay_steps, 0.0, 1.0)
        if cfg.steps <= cfg.warmup:
            progress = jnp.zeros_like(progress)
        cos = floor + (peak - floor) * 0.5 * (1 + jnp.cos(math.pi * progress))
        return jnp.where(s < warmup, warm, cos)
    return schedule


def make_optimizer(cfg, params, lazy=False):
    """Global-norm clipping of all gradients together, then AdamW per group.
    optax.adamw is exactly docs/model.md's formula: eps outside the sqrt, bias correction,
    decoupled decay multiplied by lr, applied only where masked. lazy: the expert group
    gets zero updates here (lazy_adamw_rows updates it, make_lazy_train_step)."""
    table = {t.name: t for t in param_table(cfg)}
    labels = {name: table[name].group for name in params}
    groups = {"dense": (cfg.lr, cfg.weight_decay), "keys": (cfg.key_lr, cfg.key_weight_decay),
              "experts": (cfg.expert_lr, cfg.expert_weight_decay)}
    transforms = {}
    for g, (peak, wd) in groups.items():
        mask = {name: table[name].decay and table[name].group == g for name in params}
        transforms[g] = optax.adamw(learning_rate=lr_schedule(peak, cfg), b1=cfg.beta1,
                                    b2=cfg.beta2, eps=cfg.eps, eps_root=0.0, weight_decay=wd,
                                    mask=mask)
    if lazy:
        transforms["experts"] = optax.set_to_zero()
    chain = []
    if cfg.grad_clip > 0:
        chain.append(optax.clip_by_global_norm(cfg.grad_clip))
    chain.append(optax.multi_transform(transforms, labels))
    return optax.chain(*chain)


def make_train_step(cfg, optimizer):
    """One optimizer step. inputs, targets (A, B, T): A = grad_accum micro-batches whose
    mean-loss gradients are averaged. Returns (params, opt_state, state, mean loss,
    global gradient norm before clipping)."""
    def micro(carry, batch):
        params, state, gsum, lsum = carry
        inputs, targets = batch
        loss, _, grads, state = loss_and_grads(params, state, inputs, targets, cfg)
        gsum = jax.tree_util.tree_map(jnp.add, gsum, grads)
        return (params, state, gsum, lsum + loss), None

    def step(params, opt_state, state, inputs, targets):
        A = inputs.shape[0]
        if A == 1:   # no accumulation buffer: it would double the expert-gradient memory
            lsum, _, grads, state = loss_and_grads(params, state, inputs[0], targets[0], cfg)
        else:
            zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
            loss0 = jnp.zeros((), dtype=params["wte"].dtype)
            (_, state, gsum, lsum), _ = jax.lax.scan(micro, (params, state, zeros, loss0),
                                                     (inputs, targets))
            grads = jax.tree_util.tree_map(lambda g: g / A, gsum)
        gnorm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree_util.tree_leaves(grads)))
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, opt_state, state, lsum / A, gnorm
    return step


def lazy_adamw_rows(p, g, m, v, touched, t, lr, wd, cfg):
    """docs/model.md, "Lazy AdamW", written out with jnp (optax has no such rule): the AdamW
    step with the global 1-based step count t in the bias corrections, on the rows whose
    touched (rows,) is set; every other row keeps its value and both moments (no decay
    either). p, g, m, v (rows, C), g already clipped."""
    t = jnp.asarray(t, dtype=p.dtype)
    m1 = cfg.beta1 * m + (1 - cfg.beta1) * g
    v1 = cfg.beta2 * v + (1 - cfg.beta2) * g * g
    mhat = m1 / (1 - cfg.beta1 ** t)
    vhat = v1 / (1 - cfg.beta2 ** t)
    p1 = p - lr * (mhat / (jnp.sqrt(vhat) + cfg.eps) + wd * p)
    row = touched[:, None]
    return jnp.where(row, p1, p), jnp.where(row, m1, m), jnp.where(row, v1, v)


def make_lazy_train_step(cfg, optimizer):
    """make_train_step for train.expert_optimizer = lazy_adamw. optimizer (make_optimizer
    with lazy) updates the dense and key groups; lazy_adamw_rows the expert tensors, from
    lazy = (m, v, t): their moments (dicts) and the number of steps done. A row is touched
    if a selection chose it in any of the step's micro-batches."""
    table = {t.name: t for t in param_table(cfg)}
    lr_of = lr_schedule(cfg.expert_lr, cfg)

    def micro(carry, batch):
        params, state, gsum, tsum, lsum = carry
        loss, _, grads, state, touched = loss_grads_touched(params, state, batch[0], batch[1], cfg)
        gsum = jax.tree_util.tree_map(jnp.add, gsum, grads)
        tsum = {k: tsum[k] | touched[k] for k in tsum}
        return (params, state, gsum, tsum, lsum + loss), None

    def step(params, opt_state, lazy, state, inputs, targets):
        m, v, t = lazy
        A = inputs.shape[0]
        if A == 1:
            lsum, _, grads, state, touched = loss_grads_touched(params, state, inputs[0],
                                                                targets[0], cfg)
        else:
            zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
            none = {k: jnp.zeros((params[k].shape[0],), bool) for k in m}
            loss0 = jnp.zeros((), dtype=params["wte"].dtype)
            (_, state, gsum, touched, lsum), _ = jax.lax.scan(
                micro, (params, state, zeros, none, loss0), (inputs, targets))
            grads = jax.tree_util.tree_map(lambda g: g / A, gsum)
        gnorm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree_util.tree_leaves(grads)))
        scale = 1.0
        if cfg.grad_clip > 0:   # optax.clip_by_global_norm's rule, for the expert gradients
            scale = jnp.where(gnorm > cfg.grad_clip, cfg.grad_clip / gnorm, 1.0)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = dict(optax.apply_updates(params, updates))   # experts: + 0
        t = t + 1
        lr = lr_of(t - 1)                                     # the 0-based step's rate
        m, v = dict(m), dict(v)
        for k in m:
            wd = cfg.expert_weight_decay if table[k].decay else 0.0
            params[k], m[k], v[k] = lazy_adamw_rows(params[k], grads[k] * scale, m[k], v[k],
                                                    touched[k], t, lr, wd, cfg)
        return params, opt_state, (m, v, t), state, lsum / A, gnorm
    return step


def train(params, state, inputs, targets, cfg, steps, before_step=None):
    """`steps` AdamW steps on one fixed batch (inputs, targets (B, T), grad_accum 1) or on
    fixed micro-batches (A, B, T) each step; with cfg.expert_optimizer = lazy_adamw the
    expert tables take lazy AdamW steps (make_lazy_train_step).
    before_step(params, state), if given, sees the values each step starts from.
    Returns (losses (steps,), grad_norms (steps,), final params, final state)."""
    lazy = cfg.expert_optimizer == "lazy_adamw"
    optimizer = make_optimizer(cfg, params, lazy=lazy)
    opt_state = optimizer.init(params)
    inputs, targets = jnp.asarray(inputs), jnp.asarray(targets)
    if inputs.ndim == 2:
        inputs, targets = inputs[None], targets[None]
    if lazy:
        step = jax.jit(make_lazy_train_step(cfg, optimizer))
        experts = [t.name for t in param_table(cfg) if t.group == "experts"]
        zeros = {k: jnp.zeros_like(params[k]) for k in experts}
        lz = (zeros, dict(zeros), jnp.zeros((), jnp.int32))
    else:
        step = jax.jit(make_train_step(cfg, optimizer))
    losses, norms = [], []
    for _ in range(steps):
        if before_step is not None:
            before_step(params, state)
        if lazy:
            params, opt_state, lz, state, loss, gnorm = step(params, opt_state, lz, state,
                                                             inputs, targets)
        else:
            params, opt_state, state, loss, gnorm = step(params, opt_state, state, inputs,
                                                         targets)
        losses.append(float(loss))
        norms.append(float(gnorm))
    return np.array(losses), np.array(norms), params, state
