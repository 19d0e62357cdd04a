"""DoRA and PEFT's ``lora_bias`` on every layer kind, against float64 references written
from the factors alone (issue 18).

Each case names its adapted kernels with the einsum that builds ``a@b`` in the kernel's own
axis order and the kernel's input axes, and gives its forward pass as a function of an
array namespace (NumPy for the forward reference, float64 ``jax.numpy`` for the gradient
reference). Nothing here reads lora_jax's norm, delta or layout code. The semantics are
PEFT's (0.21, ``tuners/lora/dora.py``):

* DoRA: ``y = g ⊙ (W x + s·(x a) b)`` (+ the layer's own bias, unscaled) with
  ``g = m / ‖W + s·a@b‖`` per output feature, the norm over the kernel's input axes and
  constant in the backward pass; that is, the kernel ``g ⊙ (W + s·a@b)``.
* ``lora_bias``: the low-rank term is ``s·((x a) b + bias)``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from helpers import as_f64, assert_tree_close
from jax import lax
from models import Mlp, ScannedMlp
from nnx_models import NnxMlp

import lora_jax as lj

RANK, ALPHA = 2, 3.0  # s = 1.5
KINDS = ("dora", "lora_bias")


def _normal(shape, seed, scale=1.0):
    """Host-drawn float32 values (eager `jax.random` compiles per shape)."""
    x = scale * np.random.default_rng(seed).standard_normal(shape)
    return jnp.asarray(x.astype(np.float32))


def _randomised(tree, seed=1, scale=0.4):
    """Every float leaf redrawn, so biases are non-zero (the layer's bias must not be scaled
    by DoRA's gain)."""
    leaves, treedef = jax.tree.flatten(tree)
    new = [
        _normal(x.shape, seed + i, scale) if jnp.issubdtype(x.dtype, jnp.floating) else x
        for i, x in enumerate(leaves)
    ]
    return treedef.unflatten(new)


def _key_name(k):
    return str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))))


def _flat(tree):
    """``{"a/b/kernel": leaf}`` (an NNX Variable's trailing ``value`` dropped), adapters
    whole."""
    found = jax.tree_util.tree_leaves_with_path(
        tree, is_leaf=lambda x: isinstance(x, lj.LoraWeights)
    )
    out = {}
    for kp, leaf in found:
        keys = [k for k in kp if not isinstance(k, jax.tree_util.GetAttrKey)]
        out["/".join(_key_name(k) for k in keys)] = leaf
    return out


# -- the cases ---------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Case:
    """One layer kind.

    make: ``() -> (base, graphdef, variables, args, layouts, config)``: the plain forward
        ``base(params, *args)``, the NNX graphdef (None for linen and plain functions), the
        model's variables, its inputs, its layouts and extra `LoraConfig` fields.
    factors: ``{path: (einsum "a,b->kernel", input axes of the kernel)}``.
    ref: ``ref(xp, p, args, extra)``: the forward pass on the flat float params `p`, with
        ``extra[path]`` (``(*stack, *out)``) added to each adapted contraction's output.
    has_bias: every adapted kernel has a bias beside it (lora_bias merges into it).
    """

    make: Callable
    factors: dict
    ref: Callable
    has_bias: bool = True


def _linen(model, *args, **config):
    variables = _randomised(jax.eval_shape(model.init, jax.random.key(0), *args))
    layouts = lj.infer_layouts(model.apply, variables, *args)
    return model.apply, None, variables, args, layouts, config


def _function(fn, params, *args, **config):
    return fn, None, params, args, lj.infer_layouts(fn, params, *args), config


X = _normal((3, 4), 0)
X3 = _normal((2, 3, 4), 0)
IDS = jnp.asarray(np.random.default_rng(0).integers(0, 11, (2, 5)))
IMG = _normal((2, 7, 6, 3), 0)


class _Stored(nn.Module):
    """A raw kernel stored (out, in), read by ``x @ w.T`` through einsum."""

    @nn.compact
    def __call__(self, x):
        w = self.param("w", nn.initializers.normal(0.4), (5, 4))
        return jnp.einsum("bi,oi->bo", x, w)


class _Tied(nn.Module):
    """Embedding lookup and the tied head reading the same table."""

    @nn.compact
    def __call__(self, ids):
        embed = nn.Embed(11, 6, name="embed")
        return embed.attend(jnp.tanh(embed(ids)))


CONV = dict(strides=(2, 1), padding=((1, 1), (0, 2)))


def _conv(xp, x, k, strides, padding):
    """NHWC input, HWIO kernel, explicit padding: a sum over the kernel's taps."""
    x = xp.pad(x, ((0, 0), *padding, (0, 0)))
    (kh, kw), (sh, sw) = k.shape[:2], strides
    oh, ow = (x.shape[1] - kh) // sh + 1, (x.shape[2] - kw) // sw + 1
    out = 0.0
    for i in range(kh):
        for j in range(kw):
            patch = x[:, i : i + sh * (oh - 1) + 1 : sh, j : j + sw * (ow - 1) + 1 : sw]
            out = out + xp.einsum("bhwc,co->bhwo", patch, k[i, j])
    return out


def _scanned_ref(xp, p, args, e):
    h = args[0]
    up, down = "params/layers/up/kernel", "params/layers/down/kernel"
    for i in range(3):
        u = h @ p[up][i] + p["params/layers/up/bias"][i] + e[up][i]
        h = h + xp.tanh(u) @ p[down][i] + p["params/layers/down/bias"][i] + e[down][i]
    return h


def _mlp_ref(prefix):
    def ref(xp, p, args, e):
        k1, k2 = f"{prefix}fc1/kernel", f"{prefix}fc2/kernel"
        h = xp.tanh(args[0] @ p[k1] + p[f"{prefix}fc1/bias"] + e[k1])
        return h @ p[k2] + p[f"{prefix}fc2/bias"] + e[k2]

    return ref


def _nnx_mlp():
    model = NnxMlp(rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    state = _randomised(state)
    base = lambda s, x: nnx.merge(graphdef, s)(x)
    layouts = lj.nnx.infer_layouts(model)
    return base, graphdef, state, (_normal((3, 8), 0),), layouts, {}


def _qlora_mlp():
    x = _normal((3, 8), 0)
    base, _, variables, args, layouts, config = _linen(Mlp(), x)
    q = lj.quant.quantize(variables, "nf4", group_size=8, layouts=layouts)
    return base, None, q, args, layouts, config


def _kv(p, x):
    return jnp.einsum("bsd,cdhk->cbshk", x, p["kv"])


DENSE = "ir,ro->io"
CASES = {
    "Dense": Case(
        lambda: _linen(nn.Dense(5), X),
        {"params/kernel": (DENSE, (0,))},
        lambda xp, p, a, e: a[0] @ p["params/kernel"] + p["params/bias"] + e["params/kernel"],
    ),
    "DenseGeneral, out axes (1, 2)": Case(
        lambda: _linen(nn.DenseGeneral((3, 2)), X3),
        {"params/kernel": ("ir,rhk->ihk", (0,))},
        lambda xp, p, a, e: (
            xp.einsum("bsi,ihk->bshk", a[0], p["params/kernel"])
            + p["params/bias"]
            + e["params/kernel"]
        ),
    ),
    "DenseGeneral, in axes (0, 1)": Case(
        lambda: _linen(nn.DenseGeneral(5, axis=(-2, -1)), X3),
        {"params/kernel": ("hkr,ro->hko", (0, 1))},
        lambda xp, p, a, e: (
            xp.einsum("bhk,hko->bo", a[0], p["params/kernel"])
            + p["params/bias"]
            + e["params/kernel"]
        ),
    ),
    "einsum on a raw (out, in) param": Case(
        lambda: _linen(_Stored(), X),
        {"params/w": ("ir,ro->oi", (1,))},
        lambda xp, p, a, e: a[0] @ p["params/w"].T + e["params/w"],
        has_bias=False,
    ),
    "matmul in a plain function": Case(
        lambda: _function(
            lambda p, x: jnp.tanh(x @ p["w1"]) @ p["w2"],
            {"w1": _normal((4, 6), 1, 0.4), "w2": _normal((6, 5), 2, 0.4)},
            X,
        ),
        {"w1": (DENSE, (0,)), "w2": (DENSE, (0,))},
        lambda xp, p, a, e: xp.tanh(a[0] @ p["w1"] + e["w1"]) @ p["w2"] + e["w2"],
        has_bias=False,
    ),
    "Embed lookup": Case(
        lambda: _linen(nn.Embed(11, 6), IDS),
        {"params/embedding": ("vr,rd->vd", (0,))},
        lambda xp, p, a, e: p["params/embedding"][np.asarray(a[0])] + e["params/embedding"],
        has_bias=False,
    ),
    "Embed lookup and tied attend": Case(
        lambda: _linen(_Tied(), IDS),
        {"params/embed/embedding": ("vr,rd->vd", (0,))},
        lambda xp, p, a, e: (
            xp.tanh(p["params/embed/embedding"][np.asarray(a[0])]) @ p["params/embed/embedding"].T
        ),
        has_bias=False,
    ),
    "Conv 2-D, stride and padding": Case(
        lambda: _linen(nn.Conv(4, (3, 3), **CONV), IMG),
        {"params/kernel": ("hwcr,ro->hwco", (0, 1, 2))},
        lambda xp, p, a, e: (
            _conv(xp, a[0], p["params/kernel"], **CONV) + p["params/bias"] + e["params/kernel"]
        ),
    ),
    "scanned stack (per-layer norms)": Case(
        lambda: _linen(ScannedMlp(), _normal((2, 24), 0)),
        {
            "params/layers/up/kernel": ("lir,lro->lio", (1,)),
            "params/layers/down/kernel": ("lir,lro->lio", (1,)),
        },
        _scanned_ref,
    ),
    "k/v slices of one kernel": Case(
        lambda: _function(_kv, {"kv": _normal((2, 4, 3, 2), 1, 0.4)}, X3, slices={"kv": 0}),
        {"kv": ("cdr,crhk->cdhk", (1,))},
        lambda xp, p, a, e: xp.einsum("bsd,cdhk->cbshk", a[0], p["kv"]) + e["kv"][:, None, None],
        has_bias=False,
    ),
    "NNX pure form": Case(
        _nnx_mlp,
        {"fc1/kernel": (DENSE, (0,)), "fc2/kernel": (DENSE, (0,))},
        _mlp_ref(""),
    ),
    "QLoRA (nf4) base": Case(
        _qlora_mlp,
        {"params/fc1/kernel": (DENSE, (0,)), "params/fc2/kernel": (DENSE, (0,))},
        _mlp_ref("params/"),
    ),
}
NO_LORA_BIAS = {"Embed lookup and tied attend"}  # a table read transposed: refused


@dataclasses.dataclass(frozen=True)
class Setup:
    name: str
    case: Case
    base: Callable
    apply: Callable  # apply(frozen, lora, *args, **kwargs)
    routes: Callable  # routes(frozen, lora, *args)
    twin: object  # the base's variables in float (a quantized base dequantized)
    plain: dict  # `twin` flat
    frozen: object
    init: dict  # {path: LoraWeights} as split made them
    lora: object  # perturbed: b != 0, magnitude != norm, bias != 0
    args: tuple


@functools.cache
def _setup(name, kind):
    case = CASES[name]
    base, graphdef, variables, args, layouts, extra = case.make()
    targets = sorted(case.factors)
    config = lj.LoraConfig(
        rank=RANK,
        alpha=ALPHA,
        targets=targets,
        **{"use_dora" if kind == "dora" else kind: True},
        **extra,
    )
    frozen, lora = lj.split(variables, config, key=jax.random.key(2), layouts=layouts)
    plain = lj.quant.dequantize_tree(variables) if name.startswith("QLoRA") else variables
    leaves, treedef = jax.tree.flatten(lora)
    init = _flat(lora)
    perturbed = treedef.unflatten([_normal(x.shape, 100 + i, 0.3) for i, x in enumerate(leaves)])
    if kind == "dora":  # magnitude: the init norm times a factor in [0.6, 1.4]
        flat = _flat(perturbed)
        for i, (path, w) in enumerate(sorted(flat.items())):
            u = np.random.default_rng(200 + i).uniform(0.6, 1.4, w.magnitude.shape)
            flat[path] = w.replace(magnitude=init[path].magnitude * u.astype(np.float32))
        perturbed = _renest(perturbed, flat)
    if graphdef is None:
        apply, routes = lj.lora_apply(base), functools.partial(lj.routes, base)
    else:
        apply, routes = lj.nnx.lora_apply(graphdef), functools.partial(lj.nnx.routes, graphdef)
    base, apply = jax.jit(base), jax.jit(apply)  # one compile each, not one per operation
    flat_plain = _flat(plain)
    return Setup(name, case, base, apply, routes, plain, flat_plain, frozen, init, perturbed, args)


def _renest(tree, flat):
    """`tree` with its adapters replaced by ``flat[path]``."""
    treedef = jax.tree.structure(tree, is_leaf=lambda x: isinstance(x, lj.LoraWeights))
    return treedef.unflatten([flat[p] for p in _flat(tree)])


def _factors(lora):
    return {p: (w.a, w.b, w.magnitude, w.bias) for p, w in _flat(lora).items()}


def _effective(xp, case, plain, scales, factors, stop=lambda v: v):
    """``(params, extra)``: the flat params with each adapted kernel replaced by
    ``g ⊙ (W + s·a@b)`` (DoRA; the norm passed through `stop`) or ``W + s·a@b``, and the
    output term ``s·bias`` (zeros without lora_bias) of each adapted contraction."""
    params, extra = dict(plain), {}
    for path, (eq, ins) in case.factors.items():
        a, b, m, bias = factors[path]
        s = scales[path]
        v = plain[path] + s * xp.einsum(eq, a, b)
        if m is not None:
            norm = stop(xp.sqrt(xp.sum(v * v, axis=ins, keepdims=True)))
            v = xp.expand_dims(m, ins) / norm * v
        params[path] = v
        out = tuple(n for i, n in enumerate(v.shape) if i not in ins)
        extra[path] = s * bias if bias is not None else xp.zeros(out)
    return params, extra


def _float_args(xp, args):
    return tuple(
        xp.asarray(as_f64(x)) if jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating) else x
        for x in args
    )


def _reference(setup, lora):
    """The float64 NumPy output for adapters `lora`."""
    plain = {p: as_f64(v) for p, v in setup.plain.items()}
    scales = {p: w.scale for p, w in _flat(lora).items()}
    factors = {
        p: tuple(None if x is None else as_f64(x) for x in f) for p, f in _factors(lora).items()
    }
    params, extra = _effective(np, setup.case, plain, scales, factors)
    return setup.case.ref(np, params, _float_args(np, setup.args), extra)


def _cases(kind):
    return [n for n in CASES if kind == "dora" or n not in NO_LORA_BIAS]


ALL = [(n, k) for k in KINDS for n in _cases(k)]


# -- the checks of one case: each raises AssertionError -----------------------------------------
def _check_init(s, kind):
    """b = 0 (and magnitude = ‖W‖, bias = 0): the output is the base's."""
    got = s.apply(s.frozen, _renest(s.lora, s.init), *s.args)
    assert_tree_close(got, s.base(s.twin, *s.args), 1e-6)
    for path, (_, ins) in s.case.factors.items():
        w, kernel = s.init[path], as_f64(s.plain[path])
        out = tuple(n for i, n in enumerate(kernel.shape) if i not in ins)
        if kind == "dora":  # ‖W‖ over the input axes, per output feature
            assert w.magnitude.shape == out and w.bias is None, (path, w.magnitude.shape)
            assert_tree_close(w.magnitude, np.sqrt((kernel**2).sum(axis=ins)), 1e-6)
        else:
            assert w.bias.shape == out and w.magnitude is None, (path, w.bias.shape)
            assert not np.asarray(w.bias).any()


def _check_forward(s, kind):
    for path, (eq, _) in s.case.factors.items():  # the factors are laid out as we assume
        w = _flat(s.lora)[path]
        lhs, rhs = eq.split("->")[0].split(",")
        assert (w.a.ndim, w.b.ndim) == (len(lhs), len(rhs)), (path, w.a.shape, w.b.shape)
    y = s.apply(s.frozen, s.lora, *s.args)
    assert_tree_close(y, _reference(s, s.lora))
    # the adapters matter: the output moved away from the base's
    assert np.abs(as_f64(y) - as_f64(s.base(s.twin, *s.args))).max() > 1e-2
    found = s.routes(s.frozen, s.lora, *s.args)
    assert set(found) == set(s.case.factors), found
    for path, route in found.items():
        assert route.startswith("factored"), (path, route)
        assert ("DoRA" in route) == (kind == "dora"), (path, route)


def _cotangent(y):
    return _normal(np.shape(y), 7)


def _reference_grads(setup, lora, cot, detach=True):
    """``{path: (da, db, dm, dbias)}`` of ``sum(y · cot)`` in float64 (`jax.grad` of the
    reference forward), with DoRA's norm held constant unless not `detach`."""
    scales = {p: w.scale for p, w in _flat(lora).items()}
    stop = lax.stop_gradient if detach else (lambda v: v)
    with jax.enable_x64(True):
        plain = {p: jnp.asarray(as_f64(v)) for p, v in setup.plain.items()}
        args, cot64 = _float_args(jnp, setup.args), jnp.asarray(as_f64(cot))
        theta = {
            p: tuple(None if x is None else jnp.asarray(as_f64(x)) for x in f)
            for p, f in _factors(lora).items()
        }

        def loss(theta_):
            params, extra = _effective(jnp, setup.case, plain, scales, theta_, stop)
            return jnp.sum(setup.case.ref(jnp, params, args, extra) * cot64)

        grads = jax.jit(jax.grad(loss))(theta)
        return jax.tree.map(lambda g: np.asarray(g, np.float64), grads)


def _grads(setup, lora, cot):
    loss = lambda lo, f, a: jnp.sum(setup.apply(f, lo, *a) * cot)
    grads = jax.jit(jax.grad(loss))(lora, setup.frozen, setup.args)
    return {p: tuple(f) for p, f in _factors(grads).items()}


# A reference that differentiates through DoRA's norm gives other gradients for a and b:
# checked on these cases, so the gradient check is known to see the difference.
ATTACHED = {"Dense", "Conv 2-D, stride and padding", "Embed lookup and tied attend"}


def _check_gradients(s, kind):
    """Gradients reach a, b and the magnitude (or the bias), DoRA's norm held constant."""
    cot = _cotangent(_reference(s, s.lora))
    got = _grads(s, s.lora, cot)
    want = _reference_grads(s, s.lora, cot)
    for path in s.case.factors:
        for label, g, w in zip(("a", "b", "magnitude", "bias"), got[path], want[path], strict=True):
            assert (g is None) == (w is None), (path, label)
            if g is not None:
                assert np.abs(as_f64(g)).max() > 0, (path, label)
                assert_tree_close(g, w, 1e-5)
    if kind == "dora" and s.name in ATTACHED:
        attached = _reference_grads(s, s.lora, cot, detach=False)
        gap = max(
            np.abs(as_f64(got[p][i]) - attached[p][i]).max() / np.abs(attached[p][i]).max()
            for p in s.case.factors
            for i in (0, 1)
        )
        assert gap > 1e-3, gap


def _bias_path(path):
    return path.rsplit("/", 1)[0] + "/bias"


def _check_merge(s, kind):
    """DoRA merges as ``g ⊙ (W + s·a@b)`` and refuses to unmerge; lora_bias merges into the
    base bias beside the kernel (and unmerges), or is refused where there is none."""
    if kind == "lora_bias" and not s.case.has_bias:
        with pytest.raises(ValueError, match="lora_bias, which merges into the layer's bias"):
            lj.merge(s.frozen, s.lora)
        return
    merged = lj.merge(s.frozen, s.lora)
    assert_tree_close(s.base(merged, *s.args), s.apply(s.frozen, s.lora, *s.args))
    flat, adapters = _flat(merged), _flat(s.lora)
    if kind == "dora":
        plain = {p: as_f64(v) for p, v in s.plain.items()}
        scales = {p: w.scale for p, w in adapters.items()}
        factors = {
            p: tuple(None if x is None else as_f64(x) for x in f)
            for p, f in _factors(s.lora).items()
        }
        want, _ = _effective(np, s.case, plain, scales, factors)
        for path in s.case.factors:
            assert_tree_close(flat[path], want[path])
        with pytest.raises(ValueError, match="DoRA adapter cannot be taken out"):
            lj.unmerge(merged, s.lora)
        return
    for path in s.case.factors:
        w = adapters[path]
        bias = as_f64(s.plain[_bias_path(path)]) + w.scale * as_f64(w.bias)
        assert_tree_close(flat[_bias_path(path)], bias)
    back = _flat(lj.unmerge(merged, s.lora))
    for path in s.case.factors:  # a plain adapter with a bias comes back out
        assert_tree_close(back[_bias_path(path)], s.plain[_bias_path(path)])
        assert_tree_close(back[path], s.plain[path])


CHECKS = (_check_init, _check_forward, _check_gradients, _check_merge)


@pytest.mark.parametrize(("name", "kind"), ALL)
def test_layer_kind_against_the_float64_reference(name, kind):
    """At init the base's output and ‖W‖ (or zeros) as the extra; perturbed adapters: the
    reference output, every adapter factored, the reference gradients, and merge.

    One test per case (the setup compiles once per process); every check runs and each
    failure is reported by name.
    """
    s = _setup(name, kind)
    failures = []
    for check in CHECKS:
        try:
            check(s, kind)
        except (AssertionError, pytest.fail.Exception) as err:
            failures.append(f"{check.__name__}: {type(err).__name__}: {err}")
    assert not failures, "\n\n".join(failures)


def test_lora_bias_on_a_table_read_transposed_is_refused():
    """A tied head reads the embedding table with its output axis contracted: a bias of the
    up-projection has no place there."""
    s = _setup("Embed lookup and tied attend", "dora")
    w = _flat(s.lora)["params/embed/embedding"]
    lora = _renest(s.lora, {"params/embed/embedding": w.replace(magnitude=None, bias=w.magnitude)})
    with pytest.raises(ValueError, match="an adapter with lora_bias needs every use"):
        s.apply(s.frozen, lora, *s.args)


# -- dropout ------------------------------------------------------------------------------------
D = 4
DROP = 0.5


def _dropout_model(form, seed, identity):
    """``(fn, params, kernel path)``: ``x @ W`` in a plain function or an `nn.Dense` with a
    bias; `identity`: W = I and no bias (the probe that shows the dropped input)."""
    w = np.eye(D, dtype=np.float32) if identity else np.asarray(_normal((D, D), seed, 0.5))
    if form == "function":
        return (lambda p, x, rngs=None: x @ p["w"]), {"w": jnp.asarray(w)}, "w"
    bias = np.zeros(D, np.float32) if identity else np.asarray(_normal((D,), seed + 1, 0.5))
    params = {"params": {"kernel": jnp.asarray(w), "bias": jnp.asarray(bias)}}
    return nn.Dense(D).apply, params, "params/kernel"


def _dropout_adapters(params, path, seed, gain=None):
    """Random a, b and magnitude; with `gain`: b = 0 and magnitude = gain·‖W‖."""
    config = lj.LoraConfig(rank=RANK, alpha=ALPHA, targets=path, dropout=DROP, use_dora=True)
    _, lora = lj.split(params, config, key=jax.random.key(0))
    w = _flat(lora)[path]
    if gain is None:
        u = np.random.default_rng(seed).uniform(0.6, 1.4, D).astype(np.float32)
        w = w.replace(a=_normal(w.a.shape, seed, 0.5), b=_normal(w.b.shape, seed + 1, 0.5))
        w = w.replace(magnitude=w.magnitude * u)
    else:
        w = w.replace(a=_normal(w.a.shape, seed, 0.5), magnitude=gain * w.magnitude)
    return _renest(lora, {path: w})


@pytest.mark.parametrize("form", ["function", "linen Dense"])
def test_dropout_follows_peft_with_one_mask_for_both_terms(form):
    """PEFT, with dropout running: ``y = W x + (g - 1)·W x' + g·s·(x' a) b`` (+ bias), x' the
    dropped input. The mask is recovered from a probe with the same key and shapes: W = I,
    b = 0 and g = 2 give ``y = x + x'``. With it, a random W, a, b and m must give PEFT's
    formula, which holds only if both terms saw the same x'."""
    x = _normal((3, D), 5)
    key = {"rngs": {lj.DROPOUT_RNG: jax.random.key(11)}}
    fn, probe, path = _dropout_model(form, 1, identity=True)
    apply = jax.jit(lj.lora_apply(fn))
    dropped = as_f64(apply(probe, _dropout_adapters(probe, path, 3, gain=2.0), x, **key))
    dropped -= as_f64(x)
    kept = np.isclose(dropped, as_f64(x) / (1 - DROP), rtol=1e-6, atol=1e-7)
    assert (kept | (dropped == 0)).all(), dropped
    assert 0 < kept.sum() < kept.size, kept

    _, params, _ = _dropout_model(form, 1, identity=False)
    lora = _dropout_adapters(params, path, 3)
    w, flat = _flat(lora)[path], _flat(params)
    kernel, bias = as_f64(flat[path]), as_f64(flat.get(_bias_path(path), np.zeros(D)))
    a, b, s = as_f64(w.a), as_f64(w.b), w.scale
    g = as_f64(w.magnitude) / np.linalg.norm(kernel + s * a @ b, axis=0)
    x64 = as_f64(x)
    want = x64 @ kernel + (g - 1) * (dropped @ kernel) + g * s * (dropped @ a @ b) + bias
    assert_tree_close(apply(params, lora, x, **key), want)
    # no dropout (no rng, or deterministic): g·(W x + s·(x a) b) + bias
    full = g * (x64 @ kernel + s * x64 @ a @ b) + bias
    evaluate = jax.jit(lj.lora_apply(fn, deterministic=True))
    assert_tree_close(evaluate(params, lora, x, **key), full)
    with pytest.warns(UserWarning, match="no 'lora_dropout' rng"):
        assert_tree_close(lj.lora_apply(fn)(params, lora, x), full)


# -- training, checkpoints, mixed batches, configs ---------------------------------------------
def test_a_short_dora_training_run():
    """Adam, 5 jitted steps: the loss falls, the base comes out bit-identical, and the
    optimizer holds state for a, b and the magnitude only."""
    model, x = Mlp(), _normal((16, 8), 0)
    target = _normal((16, 4), 1)
    variables = _randomised(model.init(jax.random.key(0), x))
    config = lj.LoraConfig(rank=RANK, alpha=ALPHA, targets=".*/kernel", use_dora=True)
    frozen, lora = lj.split(variables, config, key=jax.random.key(1))
    before = jax.tree.map(np.array, frozen)
    apply = lj.lora_apply(model.apply)

    def loss_fn(frozen_, lora_, batch, key):
        del key
        return jnp.mean((apply(frozen_, lora_, batch[0]) - batch[1]) ** 2)

    optimizer = optax.adam(3e-2)
    state = lj.TrainState.create(lora, optimizer, key=jax.random.key(2))
    step = lj.make_train_step(loss_fn, optimizer)
    losses = []
    for _ in range(5):
        state, metrics = step(state, frozen, (x, target))
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0] and all(np.isfinite(losses)), losses
    for got, want in zip(jax.tree.leaves(frozen), jax.tree.leaves(before), strict=True):
        np.testing.assert_array_equal(np.asarray(got), want)
    adam = state.opt_state[0]
    for moments in (adam.mu, adam.nu):
        found = _flat(moments)
        assert set(found) == set(_flat(lora)), found
        for path, w in found.items():
            ref = _flat(lora)[path]
            assert w.bias is None
            for name in ("a", "b", "magnitude"):
                assert getattr(w, name).shape == getattr(ref, name).shape, (path, name)
        assert len(jax.tree.leaves(moments)) == 3 * len(found)
    for path, w in _flat(state.lora).items():  # every part trained
        ref = _flat(lora)[path]
        for name in ("a", "b", "magnitude"):
            assert np.abs(as_f64(getattr(w, name)) - as_f64(getattr(ref, name))).max() > 0


def _same_adapters(got, want):
    got, want = _flat(got), _flat(want)
    assert set(got) == set(want)
    for path, w in want.items():
        g = got[path]
        assert (g.layout, g.scale, g.dropout) == (w.layout, w.scale, w.dropout), path
        for name in ("a", "b", "magnitude", "bias"):
            x, y = getattr(g, name), getattr(w, name)
            assert (x is None) == (y is None), (path, name)
            if y is not None:
                assert x.dtype == y.dtype, (path, name)
                np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("kind", KINDS)
def test_adapter_files_round_trip_exactly(kind, tmp_path):
    s = _setup("k/v slices of one kernel", kind)
    lj.save_adapter(tmp_path / "adapter", s.lora, frozen=s.frozen)
    _same_adapters(lj.load_adapter(tmp_path / "adapter", frozen=s.frozen), s.lora)


@pytest.mark.parametrize("kind", KINDS)
def test_checkpoint_manager_round_trips_exactly(kind, tmp_path):
    s = _setup("k/v slices of one kernel", kind)
    state = lj.TrainState.create(s.lora, optax.adam(1e-3), key=jax.random.key(0))
    with lj.CheckpointManager(tmp_path / "run") as manager:
        manager.save(3, state, frozen=s.frozen)
        restored, _ = manager.restore(state, frozen=s.frozen)
    _same_adapters(restored.lora, s.lora)
    restored, state = (r.replace(rng=jax.random.key_data(r.rng)) for r in (restored, state))
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(state), strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def _stacked_by_hand(lora, k):
    """k copies of each adapter stacked as `lj.multi.stack_adapters` would (an adapter axis
    after the stack axes, a tuple of scales), extras included."""
    out = {}
    for path, w in _flat(lora).items():
        n = len(w.layout.stack_axes)
        stack = lambda v, n=n: None if v is None else jnp.stack([v] * k, axis=n)
        out[path] = w.replace(
            a=stack(w.a),
            b=stack(w.b),
            magnitude=stack(w.magnitude),
            bias=stack(w.bias),
            scale=(w.scale,) * k,
        )
    return _renest(lora, out)


@pytest.mark.parametrize("kind", KINDS)
def test_mixed_batches_refuse_dora_and_lora_bias(kind):
    s = _setup("matmul in a plain function", kind)
    what = "DoRA" if kind == "dora" else "lora_bias"
    with pytest.raises(ValueError, match=f"is a {what} adapter; lj.multi stacks"):
        lj.multi.stack_adapters([s.lora, s.lora])
    mixed = lj.multi.lora_apply_mixed(CASES["matmul in a plain function"].make()[0])
    with pytest.raises(ValueError, match="a mixed batch cannot serve DoRA or lora_bias"):
        mixed(s.twin, _stacked_by_hand(s.lora, 2), jnp.array([0, 1, -1]), *s.args)


def test_configs_refuse_what_peft_refuses():
    with pytest.raises(ValueError, match="does not combine with `use_dora=True`"):
        lj.LoraConfig(targets="w", use_dora=True, lora_bias=True)
    for init in ("pissa", "olora"):
        with pytest.raises(ValueError, match="needs an init that keeps the base"):
            lj.LoraConfig(targets="w", lora_bias=True, init=init)


def test_the_norm_of_a_bfloat16_kernel_makes_no_float32_copy():
    """A bf16 base: the norm contracts the kernel as stored with float32 accumulation. It
    equals the float64 norm of the bf16 kernel's values (a rounds to bf16 in the cross term
    only), and the traced program never converts the kernel to float32."""
    from lora_jax.core._dora import weight_norm
    from lora_jax.core._layout import Layout

    keys = jax.random.split(jax.random.key(0), 3)
    kernel = (0.05 * jax.random.normal(keys[0], (64, 48))).astype(jnp.bfloat16)
    a = 0.02 * jax.random.normal(keys[1], (64, 4))
    b = 0.1 * jax.random.normal(keys[2], (4, 48))
    layout = Layout("dense", (0,), (1,))
    want = np.linalg.norm(as_f64(kernel) + 2.0 * as_f64(a) @ as_f64(b), axis=0)
    got = weight_norm(kernel, a, b, layout, 2.0)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-3)
    program = jax.make_jaxpr(lambda k: weight_norm(k, a, b, layout, 2.0))(kernel)
    for eqn in program.jaxpr.eqns:
        if eqn.primitive.name == "convert_element_type":
            assert eqn.invars[0].aval.shape != kernel.shape, eqn
