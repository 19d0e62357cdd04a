"""Contractions beyond ``x @ w`` through the contraction rewrite: experts (`lax.ragged_dot`
and batched einsums), stacked projections (one adapter per slice or per kernel),
convolutions, reshaped kernels, vmapped layers, custom derivatives, LoRA dropout and mixed
batches.

Each case compares outputs and gradients (w.r.t. the adapters) with the merged path
``fn(lj.merge(frozen, lora), ...)``, outputs with a float64 NumPy reference built from the
factors alone (never from the library's delta), and the route of every adapter; the
compiled gradient step of each holds no contraction the size of an adapted kernel.

Sizes are distinct primes per role (rank 2, heads 3, experts 5, model 7, hidden 11, head
dim 13) so an element count in compiled HLO names one kind of array.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import as_f64, assert_tree_close, check_against_merged, contraction_sizes
from jax import lax

import lora_jax as lj

RANK, H, E, DM, FF, K = 2, 3, 5, 7, 11, 13
T = 6  # tokens
L = 3  # layers
BLOCKED = 3  # an expert no token is routed to: a group of size 0
STACKED = (1,), (2,), (0,)  # in, out, stack axes of an expert kernel (E, in, out)
FACTORED = "factored (dot_general)"


def _normal(shape, seed, scale=1.0):
    """Host-drawn values (eager `jax.random` compiles per shape)."""
    x = scale * np.random.default_rng(seed).standard_normal(shape)
    return jnp.asarray(x.astype(np.float32))


def _adapters(params, targets, layouts=None, *, seed=100, alpha=4.0, **config):
    """``(frozen, lora)`` with random non-zero a and b (so the low-rank path shows)."""
    config = lj.LoraConfig(rank=RANK, alpha=alpha, targets=targets, **config)
    frozen, lora = lj.split(params, config, key=jax.random.key(2), layouts=layouts)
    leaves, treedef = jax.tree.flatten(lora)
    return frozen, treedef.unflatten(
        [_normal(x.shape, seed + i, 0.3) for i, x in enumerate(leaves)]
    )


def _flat(lora):
    is_w = lambda x: isinstance(x, lj.LoraWeights)
    found = jax.tree_util.tree_leaves_with_path(lora, is_leaf=is_w)
    return {"/".join(str(k.key) for k in kp): w for kp, w in found}


def _delta_f64(w):
    """``s·a@b`` in float64 in the kernel's axis order, from the factors and the layout."""
    n = len(w.layout.stack_axes)
    a, b = as_f64(w.a), as_f64(w.b)
    stack, ins, outs = a.shape[:n], a.shape[n:-1], b.shape[n + 1 :]
    d = np.matmul(a.reshape(*stack, math.prod(ins), RANK), b.reshape(*stack, RANK, -1))
    d = d.reshape(*stack, *ins, *outs)  # kernel axes in (*stack, *in, *out) order
    return w.scale * np.transpose(d, np.argsort(w.layout.perm))


def _merged_f64(frozen, lora):
    """``{path: W + s·a@b}`` in float64 NumPy, keyed like `lj.routes`."""
    out = {}
    for path, w in _flat(lora).items():
        base = frozen
        for k in path.split("/"):
            base = base[k]
        out[path] = as_f64(base) + _delta_f64(w)
    return out


def _init(model, *args):
    abstract = jax.eval_shape(model.init, jax.random.key(0), *args)
    leaves, treedef = jax.tree.flatten(abstract)
    return treedef.unflatten([_normal(x.shape, 1 + i, 0.4) for i, x in enumerate(leaves)])


def _layout_axes(layout):
    return layout.in_axes, layout.out_axes, layout.stack_axes


@contextlib.contextmanager
def _warns_merged(merged):
    """Expects the one warning of a use served merged, or no warning at all."""
    if merged:
        with pytest.warns(UserWarning, match=r"1 adapter\(s\) run merged for some uses"):
            yield
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            yield


def _gelu(x):
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def _softmax(s):
    e = np.exp(s - s.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


# -- 1. mixture of experts through lax.ragged_dot ------------------------------------------
def _top2(logits):
    """Top-2 routing with expert `BLOCKED` never chosen: ``(experts, gates)``, (tokens, 2)."""
    logits = jnp.where(jnp.arange(logits.shape[-1]) == BLOCKED, -1e9, logits)
    vals, experts = lax.top_k(logits, 2)
    return experts, jax.nn.softmax(vals, axis=-1)


def _moe_ragged(router, w_in, w_out, x):
    """Tokens sorted by expert, each group through its expert's kernels, combined by gate."""
    experts, gates = _top2(x @ router)
    experts, gates = experts.reshape(-1), gates.reshape(-1)
    order = jnp.argsort(experts, stable=True)
    tokens = jnp.repeat(jnp.arange(x.shape[0]), 2)[order]
    sizes = jnp.bincount(experts, length=router.shape[1]).astype(jnp.int32)
    h = jax.nn.gelu(lax.ragged_dot(x[tokens], w_in, sizes))
    y = lax.ragged_dot(h, w_out, sizes) * gates[order][:, None]
    return jnp.zeros_like(x).at[tokens].add(y)


# -- 2. mixture of experts through a batched einsum, one-hot dispatch and combine --------------
def _moe_einsum(router, w_in, w_out, x):
    experts, gates = _top2(x @ router)
    chosen = jax.nn.one_hot(experts, router.shape[1])  # (tokens, 2, E)
    mask, gate = chosen.sum(1), (chosen * gates[..., None]).sum(1)  # (tokens, E)
    slot = jnp.cumsum(mask, axis=0).astype(jnp.int32) - 1  # place in each expert's buffer
    dispatch = jax.nn.one_hot(slot, x.shape[0]) * mask[..., None]  # (tokens, E, capacity)
    xe = jnp.einsum("tec,td->ecd", dispatch, x)
    h = jax.nn.gelu(jnp.einsum("ecd,edf->ecf", xe, w_in))
    ye = jnp.einsum("ecf,efd->ecd", h, w_out)
    return jnp.einsum("tec,ecd->td", dispatch * gate[..., None], ye)


MOES = {"ragged_dot": _moe_ragged, "einsum": _moe_einsum}


class _Moe(nn.Module):
    """Raw ``self.param`` kernels: router (d, E), experts (E, d, f) and (E, f, d)."""

    combine: str = "ragged_dot"

    @nn.compact
    def __call__(self, x):
        init = nn.initializers.normal(0.4)
        router = self.param("router", init, (DM, E))
        w_in, w_out = self.param("w_in", init, (E, DM, FF)), self.param("w_out", init, (E, FF, DM))
        return MOES[self.combine](router, w_in, w_out, x)


def _moe_f64(w, x):
    """Token by token: its two experts (never `BLOCKED`), each expert's own kernels."""
    logits = x @ w["router"]
    logits[:, BLOCKED] = -np.inf
    out = np.zeros_like(x)
    for t in range(len(x)):
        top = np.argsort(-logits[t])[:2]
        assert BLOCKED not in top
        for e, gate in zip(top, _softmax(logits[t, top]), strict=True):
            out[t] += gate * _gelu(x[t] @ w["w_in"][e]) @ w["w_out"][e]
    return out


def _moe_setup(combine, form):
    x = _normal((T, DM), 0)
    if form == "linen":
        model = _Moe(combine)
        return model.apply, _init(model, x), x, "params/"
    params = {
        "router": _normal((DM, E), 1, 0.4),
        "w_in": _normal((E, DM, FF), 2, 0.4),
        "w_out": _normal((E, FF, DM), 3, 0.4),
    }
    fn = lambda p, x: MOES[combine](p["router"], p["w_in"], p["w_out"], x)
    return fn, params, x, ""


@pytest.mark.parametrize("form", ["function", "linen"])
@pytest.mark.parametrize("combine", sorted(MOES))
def test_moe_experts_factored(combine, form):
    fn, params, x, prefix = _moe_setup(combine, form)
    layouts = lj.infer_layouts(fn, params, x)
    for name in ("w_in", "w_out"):
        assert _layout_axes(layouts[prefix + name]) == STACKED, layouts
    frozen, lora = _adapters(params, f"{prefix}(router|w_in|w_out)", layouts)
    routes = lj.routes(fn, frozen, lora, x)
    experts = "factored (ragged_dot)" if combine == "ragged_dot" else FACTORED
    assert routes == {
        prefix + "router": FACTORED,
        prefix + "w_in": experts,
        prefix + "w_out": experts,
    }
    with _warns_merged(False):
        y = check_against_merged(lj.lora_apply(fn), fn, frozen, lora, x)
    merged = {k.removeprefix(prefix): v for k, v in _merged_f64(frozen, lora).items()}
    assert_tree_close(y, _moe_f64(merged, as_f64(x)))
    assert np.abs(np.asarray(y - fn(frozen, x))).max() > 1e-2


EXPERT_USES = {
    # name: (kernel shape, fn, (in, out, stack) axes), all with a (E, d, r) and b (E, r, ...)
    "ragged_dot": ((E, DM, FF), lambda p, x, g: lax.ragged_dot(x, p["w"], g), STACKED),
    "ragged_dot, kernel stored (E, out, in)": (
        (E, FF, DM),
        lambda p, x, g: lax.ragged_dot(x, jnp.swapaxes(p["w"], 1, 2), g),
        ((2,), (1,), (0,)),
    ),
    "ragged_dot, kernel (E, d, h, k) flattened": (
        (E, DM, H, K),
        lambda p, x, g: lax.ragged_dot(x, p["w"].reshape(E, DM, H * K), g),
        ((1,), (2, 3), (0,)),
    ),
    # the same tokens in per-expert buffers of capacity T (rows past a group's size: zeros)
    "einsum": (
        (E, DM, FF),
        lambda p, x, g: jnp.einsum("ecd,edf->ecf", _buffers(x, g), p["w"]),
        STACKED,
    ),
}


def _buffers(x, sizes):
    starts = jnp.cumsum(sizes) - sizes
    rows = starts[:, None] + jnp.arange(x.shape[0])
    valid = jnp.arange(x.shape[0]) < sizes[:, None]
    return jnp.where(valid[..., None], x[jnp.clip(rows, 0, x.shape[0] - 1)], 0.0)


SIZES = (2, 0, 1, 3, 1)  # expert 1: no token


@pytest.mark.parametrize("use", sorted(EXPERT_USES))
def test_each_token_meets_only_its_experts_factors(use):
    """The low-rank term of a token routed to expert e is ``s·x@a[e]@b[e]``, with one
    expert given no token."""
    shape, fn, axes = EXPERT_USES[use]
    sizes = jnp.array(SIZES, jnp.int32)
    x = _normal((sum(SIZES), DM), 0)
    params = {"w": _normal(shape, 1, 0.4)}
    layouts = lj.infer_layouts(fn, params, x, sizes)
    assert _layout_axes(layouts["w"]) == axes, layouts
    frozen, lora = _adapters(params, "w", layouts)
    how = FACTORED if use == "einsum" else "factored (ragged_dot)"
    assert lj.routes(fn, frozen, lora, x, sizes) == {"w": how}
    y = check_against_merged(lj.lora_apply(fn), fn, frozen, lora, x, sizes)
    term = as_f64(y) - as_f64(fn(frozen, x, sizes))
    w, xs = lora["w"], as_f64(x)
    a, b = as_f64(w.a), as_f64(w.b).reshape(E, RANK, -1)
    expert = np.repeat(np.arange(E), SIZES)
    want = np.stack([w.scale * xs[t] @ a[e] @ b[e] for t, e in enumerate(expert)])
    if use == "einsum":  # (E, capacity, f): empty slots get exactly nothing
        slot = np.concatenate([np.arange(n) for n in SIZES])
        empty = np.ones(term.shape[:2], bool)
        empty[expert, slot] = False
        assert not term[empty].any()
        term = term[expert, slot]
    assert_tree_close(term.reshape(len(expert), -1), want)


def _scanned_experts(p, x, sizes):
    layer = lambda h, w: (jnp.tanh(lax.ragged_dot(h, w, sizes)), None)
    return lax.scan(layer, x, p["w"])[0]


def test_scanned_layers_of_experts():
    """Kernel (layers, E, d, d): the scan slices the layer axis, ragged_dot the expert."""
    sizes = jnp.array(SIZES, jnp.int32)
    params, x = {"w": _normal((L, E, DM, DM), 1, 0.4)}, _normal((sum(SIZES), DM), 0)
    layouts = lj.infer_layouts(_scanned_experts, params, x, sizes)
    assert _layout_axes(layouts["w"]) == ((2,), (3,), (0, 1)), layouts
    frozen, lora = _adapters(params, "w", layouts)
    assert lj.routes(_scanned_experts, frozen, lora, x, sizes) == {"w": "factored (ragged_dot)"}
    apply = lj.lora_apply(_scanned_experts)
    y = check_against_merged(apply, _scanned_experts, frozen, lora, x, sizes)
    w, h = _merged_f64(frozen, lora)["w"], as_f64(x)
    expert = np.repeat(np.arange(E), SIZES)
    for layer in w:
        h = np.tanh(np.stack([h[t] @ layer[e] for t, e in enumerate(expert)]))
    assert_tree_close(y, h)


# -- 3. stacked projections: one adapter per slice, or one for the whole kernel ---------------
B, S = 2, 4
PROJECTIONS = {
    # name: (kernel shape, einsum, slice axis, layout per slice, layout of the whole kernel)
    "kv": (
        (2, DM, H, K),
        "bsd,cdhk->cbshk",
        0,
        lj.Layout("einsum", (1,), (2, 3), (0,)),
        lj.Layout("einsum", (1,), (0, 2, 3)),
    ),
    "kv_left": (  # the kernel as the left operand
        (2, DM, H, K),
        "cdhk,bsd->cbshk",
        0,
        lj.Layout("einsum", (1,), (2, 3), (0,)),
        lj.Layout("einsum", (1,), (0, 2, 3)),
    ),
    "gate_up": (
        (DM, 2, FF),
        "bsd,dcf->bscf",
        1,
        lj.Layout("einsum", (0,), (2,), (1,)),
        lj.Layout("einsum", (0,), (1, 2)),
    ),
}


def _projection(name):
    shape, eq, _, _, _ = PROJECTIONS[name]
    left = not eq.startswith("bsd")
    fn = lambda p, x: jnp.tanh(jnp.einsum(eq, *((p[name], x) if left else (x, p[name]))))
    return fn, {name: _normal(shape, 1, 0.4)}, _normal((B, S, DM), 0)


@pytest.mark.parametrize("per", ["slice (Layout)", "slice (slices=)", "kernel"])
@pytest.mark.parametrize("name", sorted(PROJECTIONS))
def test_stacked_projection(name, per):
    _, eq, axis, sliced, whole = PROJECTIONS[name]
    fn, params, x = _projection(name)
    inferred = lj.infer_layouts(fn, params, x)
    assert inferred[name].in_axes == whole.in_axes, inferred
    assert inferred[name].out_axes == whole.out_axes, inferred
    if per == "kernel":
        frozen, lora = _adapters(params, name, inferred)
    elif per == "slice (Layout)":
        frozen, lora = _adapters(params, name, {name: sliced})
    else:
        assert "slices" in lj.LoraConfig.__dataclass_fields__
        frozen, lora = _adapters(params, name, inferred, slices={name: axis})
        assert _layout_axes(lora[name].layout) == _layout_axes(sliced)
    w = lora[name]
    n_stack = 0 if per == "kernel" else 1
    assert w.a.shape[:n_stack] == w.b.shape[:n_stack] == (2,) * n_stack
    assert lj.routes(fn, frozen, lora, x) == {name: FACTORED}
    y = check_against_merged(lj.lora_apply(fn), fn, frozen, lora, x)
    ops = [as_f64(x), _merged_f64(frozen, lora)[name]]
    assert_tree_close(y, np.tanh(np.einsum(eq, *(ops if eq.startswith("bsd") else ops[::-1]))))
    if per != "kernel":  # slice c of the output gets s·x@a[c]@b[c] alone
        left = not eq.startswith("bsd")
        raw = lambda p, x: jnp.einsum(eq, *((p[name], x) if left else (x, p[name])))
        term = as_f64(lj.lora_apply(raw)(frozen, lora, x)) - as_f64(raw(frozen, x))
        term = np.moveaxis(term, 0 if name.startswith("kv") else 2, 0)
        for c in range(2):
            want = w.scale * as_f64(x) @ as_f64(w.a[c]) @ as_f64(w.b[c]).reshape(RANK, -1)
            assert_tree_close(term[c], want.reshape(term[c].shape))


# -- 4. convolutions on raw kernels ------------------------------------------------------------
CONVS = {
    # name: (input shape, kernel shape, conv keyword arguments)
    "2d": (
        (2, 9, 8, 5),
        (3, 3, 5, 2 * H),
        dict(
            window_strides=(2, 2),
            padding="SAME",
            rhs_dilation=(2, 2),
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        ),
    ),
    "1d": (
        (2, 9, 5),
        (3, 5, 2 * H),
        dict(window_strides=(1,), padding=((1, 2),), dimension_numbers=("NWC", "WIO", "NWC")),
    ),
    "grouped": (
        (2, 9, 8, 4),
        (3, 3, 2, 2 * H),
        dict(
            window_strides=(1, 1),
            padding="SAME",
            feature_group_count=2,
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        ),
    ),
    "transposed (lhs_dilation)": (
        (2, 5, 4, 5),
        (3, 3, 5, 2 * H),
        dict(
            window_strides=(1, 1),
            padding=((2, 1), (1, 2)),
            lhs_dilation=(2, 2),
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        ),
    ),
    "channels first (NCHW, OIHW)": (
        (2, 5, 9, 8),
        (2 * H, 5, 3, 3),
        dict(window_strides=(2, 1), padding="VALID", dimension_numbers=("NCHW", "OIHW", "NCHW")),
    ),
}


def _conv_f64(x, w, window_strides, padding, dimension_numbers, **kw):
    """`_conv_nhwc_f64` for either layout of `CONVS`."""
    if dimension_numbers[0] != "NCHW":
        return _conv_nhwc_f64(x, w, window_strides, padding, **kw)
    y = _conv_nhwc_f64(x.transpose(0, 2, 3, 1), w.transpose(2, 3, 1, 0), window_strides, padding)
    return y.transpose(0, 3, 1, 2)


def _conv_nhwc_f64(
    x, w, strides, padding, lhs_dilation=None, rhs_dilation=None, feature_group_count=1
):
    """Channels-last convolution as a sum over the kernel's taps, in float64."""
    n = w.ndim - 2
    if lhs_dilation is not None:  # zeros between the input's pixels
        inner = [(s - 1) * d + 1 for s, d in zip(x.shape[1:-1], lhs_dilation, strict=True)]
        grown = np.zeros((x.shape[0], *inner, x.shape[-1]))
        grown[(slice(None), *(slice(None, None, d) for d in lhs_dilation))] = x
        x = grown
    dil = rhs_dilation or (1,) * n
    span = [(w.shape[i] - 1) * dil[i] + 1 for i in range(n)]
    if padding == "SAME":
        total = [
            max((-(-x.shape[1 + i] // s) - 1) * s + span[i] - x.shape[1 + i], 0)
            for i, s in enumerate(strides)
        ]
        padding = [(p // 2, p - p // 2) for p in total]
    elif padding == "VALID":
        padding = [(0, 0)] * n
    xp = np.pad(x, [(0, 0), *padding, (0, 0)])
    out_sp = [(xp.shape[1 + i] - span[i]) // strides[i] + 1 for i in range(n)]
    gi, go = w.shape[-2], w.shape[-1] // feature_group_count
    out = np.zeros((x.shape[0], *out_sp, w.shape[-1]))
    for tap in np.ndindex(*w.shape[:n]):
        start = [tap[i] * dil[i] for i in range(n)]
        win = tuple(
            slice(start[i], start[i] + strides[i] * (out_sp[i] - 1) + 1, strides[i])
            for i in range(n)
        )
        patch = xp[(slice(None), *win)]
        for g in range(feature_group_count):
            out[..., g * go : (g + 1) * go] += (
                patch[..., g * gi : (g + 1) * gi] @ w[tap][:, g * go : (g + 1) * go]
            )
    return out


@pytest.mark.parametrize("name", sorted(CONVS))
def test_conv_on_a_raw_kernel(name):
    x_shape, w_shape, kw = CONVS[name]
    fn = lambda p, x: jnp.tanh(lax.conv_general_dilated(x, p["w"], **kw))
    params, x = {"w": _normal(w_shape, 1, 0.4)}, _normal(x_shape, 0)
    layouts = lj.infer_layouts(fn, params, x)
    out = kw["dimension_numbers"][1].index("O")
    ins = tuple(i for i in range(len(w_shape)) if i != out)
    assert layouts["w"] == lj.Layout("conv", ins, (out,)), layouts
    frozen, lora = _adapters(params, "w", layouts)
    route = lj.routes(fn, frozen, lora, x)
    grouped = kw.get("feature_group_count", 1) > 1
    assert route == {"w": "merged (used by conv_general_dilated)" if grouped else "factored (conv)"}
    with _warns_merged(grouped):
        y = check_against_merged(lj.lora_apply(fn), fn, frozen, lora, x)
    assert_tree_close(y, np.tanh(_conv_f64(as_f64(x), _merged_f64(frozen, lora)["w"], **kw)))


# -- 5. reshaped kernels -----------------------------------------------------------------------
RESHAPES = {
    # name: (kernel shape, fn, float64 reference on the merged kernel w, inferred (in, out)
    # axes or None for none, route)
    "head kernel flattened for @": (
        (DM, H, K),
        lambda p, x: x @ p["w"].reshape(DM, H * K),
        lambda w, x: x @ w.reshape(DM, H * K),
        ((0,), (1, 2)),
        FACTORED,
    ),
    "flat kernel, split for einsum": (
        (DM, H * K),
        lambda p, x: jnp.einsum("bsd,dhk->bshk", x, p["w"].reshape(DM, H, K)),
        lambda w, x: np.einsum("bsd,dhk->bshk", x, w.reshape(DM, H, K)),
        ((0,), (1,)),
        FACTORED,
    ),
    "stored (out, in), transposed then split": (
        (H * K, DM),
        lambda p, x: jnp.einsum("bsd,dhk->bshk", x, p["w"].T.reshape(DM, H, K)),
        lambda w, x: np.einsum("bsd,dhk->bshk", x, w.T.reshape(DM, H, K)),
        ((1,), (0,)),
        FACTORED,
    ),
    "flattened (inputs mixed with outputs)": (
        (DM, FF),
        lambda p, x: x @ p["w"].reshape(-1).reshape(DM, FF),
        lambda w, x: x @ w,
        None,
        "merged (used by reshape)",
    ),
}


@pytest.mark.parametrize("name", sorted(RESHAPES))
def test_reshaped_kernel(name):
    shape, fn, ref, axes, route = RESHAPES[name]
    params, x = {"w": _normal(shape, 1, 0.4)}, _normal((B, S, DM), 0)
    layouts = lj.infer_layouts(fn, params, x)
    found = layouts.get("w")
    assert (found and (found.in_axes, found.out_axes)) == axes, layouts
    frozen, lora = _adapters(params, "w", layouts)
    assert lj.routes(fn, frozen, lora, x) == {"w": route}
    with _warns_merged(route != FACTORED):
        y = check_against_merged(lj.lora_apply(fn), fn, frozen, lora, x)
    assert_tree_close(y, ref(_merged_f64(frozen, lora)["w"], as_f64(x)))


# -- 5b. a kernel indexed along its stack axis -------------------------------------------------
def _kv_by_index(p, x):
    k = jnp.einsum("bsd,dhk->bshk", x, p["w"][0])
    return jnp.tanh(k) * jnp.einsum("bsd,dhk->bshk", x, p["w"][1])


def _layers_by_index(p, x):
    for i in range(L):
        x = jnp.tanh(jnp.einsum("bsd,de->bse", x, p["w"][i]))
    return x


def _layers_by_fori(p, x):
    return lax.fori_loop(0, L, lambda i, h: jnp.tanh(jnp.einsum("bsd,de->bse", h, p["w"][i])), x)


INDEXED = {
    # name: (kernel shape, layout, fn, float64 reference on the merged kernel)
    "kv[0], kv[1]": (
        (2, DM, H, K),
        lj.Layout("einsum", (1,), (2, 3), (0,)),
        _kv_by_index,
        lambda w, x: np.tanh(x @ w[0].reshape(DM, -1)) * (x @ w[1].reshape(DM, -1)),
    ),
    "python loop over layers": (
        (L, DM, DM),
        lj.Layout("einsum", (1,), (2,), (0,)),
        _layers_by_index,
        None,
    ),
    "fori_loop over layers": (
        (L, DM, DM),
        lj.Layout("einsum", (1,), (2,), (0,)),
        _layers_by_fori,
        None,
    ),
}


def _indexed_setup(name):
    shape, layout, fn, ref = INDEXED[name]
    params, x = {"w": _normal(shape, 1, 0.4)}, _normal((B, S, DM), 0)
    frozen, lora = _adapters(params, "w", {"w": layout})
    return fn, ref, frozen, lora, x


@pytest.mark.parametrize("name", sorted(INDEXED))
def test_kernel_indexed_along_a_stack_axis_is_correct(name):
    fn, ref, frozen, lora, x = _indexed_setup(name)
    with _warns_merged(False):
        y = check_against_merged(lj.lora_apply(fn), fn, frozen, lora, x)
    w, want = _merged_f64(frozen, lora)["w"], as_f64(x)
    if ref is not None:
        want = ref(w, want)
    else:
        for layer in w:
            want = np.tanh(want @ layer)
    assert_tree_close(y.reshape(want.shape), want)


@pytest.mark.parametrize("name", sorted(INDEXED))
def test_kernel_indexed_along_a_stack_axis_is_factored(name):
    """``w[i]`` (slice + squeeze, or dynamic_slice under fori_loop) cuts a and b the same
    way, and `infer_layouts` learns the indexed axis as a stack axis."""
    fn, _, frozen, lora, x = _indexed_setup(name)
    assert lj.routes(fn, frozen, lora, x) == {"w": FACTORED}
    layout = INDEXED[name][1]
    assert lj.infer_layouts(fn, {"w": frozen["w"]}, x)["w"].stack_axes == layout.stack_axes


# -- 6. jax.vmap over layers -------------------------------------------------------------------
VMAPS = {
    # name: (kernel shape, fn, inferred (in, out, stack) axes, float64 reference)
    "kernel batched": (
        (L, DM, FF),
        lambda p, xs: jax.vmap(lambda w, x: jnp.tanh(x @ w))(p["w"], xs),
        STACKED,
        lambda w, xs: np.tanh(np.einsum("ltd,ldf->ltf", xs, w)),
    ),
    "kernel batched on axis 1": (
        (DM, L, FF),
        lambda p, xs: jax.vmap(lambda w, x: jnp.tanh(x @ w), in_axes=(1, 0))(p["w"], xs),
        ((0,), (2,), (1,)),
        lambda w, xs: np.tanh(np.einsum("ltd,dlf->ltf", xs, w)),
    ),
    "kernel unbatched": (
        (DM, FF),
        lambda p, xs: jax.vmap(lambda w, x: jnp.tanh(x @ w), in_axes=(None, 0))(p["w"], xs),
        ((0,), (1,), ()),
        lambda w, xs: np.tanh(xs @ w),
    ),
}


@pytest.mark.parametrize("name", sorted(VMAPS))
def test_vmap_over_layers(name):
    shape, fn, axes, ref = VMAPS[name]
    params, xs = {"w": _normal(shape, 1, 0.4)}, _normal((L, T, DM), 0)
    layouts = lj.infer_layouts(fn, params, xs)
    assert _layout_axes(layouts["w"]) == axes, layouts
    frozen, lora = _adapters(params, "w", layouts)
    assert lj.routes(fn, frozen, lora, xs) == {"w": FACTORED}
    y = check_against_merged(lj.lora_apply(fn), fn, frozen, lora, xs)
    assert_tree_close(y, ref(_merged_f64(frozen, lora)["w"], as_f64(xs)))


# -- 7. custom derivatives around a matmul ----------------------------------------------------
@jax.custom_vjp
def _vjp_matmul(x, w):
    return x @ w


_vjp_matmul.defvjp(lambda x, w: (x @ w, (x, w)), lambda res, g: (g @ res[1].T, res[0].T @ g))


@jax.custom_jvp
def _jvp_matmul(x, w):
    return x @ w


_jvp_matmul.defjvp(lambda p, t: (p[0] @ p[1], t[0] @ p[1] + p[0] @ t[1]))

CUSTOM = {"custom_vjp": _vjp_matmul, "custom_jvp": _jvp_matmul}


@pytest.mark.parametrize("kind", sorted(CUSTOM))
def test_custom_derivative_around_a_matmul(kind):
    fn = lambda p, x: jnp.tanh(CUSTOM[kind](x, p["w"])) @ p["w2"]
    params = {"w": _normal((DM, FF), 1, 0.4), "w2": _normal((FF, DM), 2, 0.4)}
    x = _normal((T, DM), 0)
    frozen, lora = _adapters(params, "w.*")
    routes = lj.routes(fn, frozen, lora, x)
    assert routes["w2"] == FACTORED
    assert routes["w"].startswith(FACTORED + "; inside custom_") and "merged" not in routes["w"]
    y = check_against_merged(lj.lora_apply(fn), fn, frozen, lora, x)
    w = _merged_f64(frozen, lora)
    assert_tree_close(y, np.tanh(as_f64(x) @ w["w"]) @ w["w2"])
    # the input's gradient too (the rewrite differentiates the primal program)
    dx = jax.grad(lambda x: lj.lora_apply(fn)(frozen, lora, x).sum())(x)
    assert_tree_close(dx, jax.grad(lambda x: fn(lj.merge(frozen, lora), x).sum())(x))


# -- 8. LoRA dropout on a rewritten path -------------------------------------------------------
def _dropout_matmul(p, x, rngs=None):
    del rngs  # a plain function receives the call's rngs too
    return x @ p["w"]


def _dropout_setup(zero_b=False):
    params, x = {"w": _normal((DM, FF), 1, 0.4)}, _normal((4, DM), 0)
    frozen, lora = _adapters(params, "w", dropout=0.5)
    if zero_b:
        lora = {"w": lora["w"].replace(b=jnp.zeros_like(lora["w"].b))}
    return frozen, lora, x


def _keyed(key):
    return {"rngs": {lj.DROPOUT_RNG: key}}


def test_dropout_masks_the_low_rank_input():
    frozen, lora, x = _dropout_setup()
    apply = jax.jit(lj.lora_apply(_dropout_matmul))
    y1 = apply(frozen, lora, x, **_keyed(jax.random.key(1)))
    np.testing.assert_array_equal(y1, apply(frozen, lora, x, **_keyed(jax.random.key(1))))
    y2 = apply(frozen, lora, x, **_keyed(jax.random.key(2)))
    assert np.abs(np.asarray(y1 - y2)).max() > 1e-3
    full = _dropout_matmul(lj.merge(frozen, lora), x)
    evaluate = lj.lora_apply(_dropout_matmul, deterministic=True)
    assert_tree_close(evaluate(frozen, lora, x, **_keyed(jax.random.key(1))), full)
    # each row's term is 2s·(x⊙m)@a@b for one of the 2^d keep-masks m of that row
    w = lora["w"]
    term = as_f64(y1) - as_f64(_dropout_matmul(frozen, x))
    masks = np.array(list(itertools.product([0.0, 1.0], repeat=DM)))
    ab = as_f64(w.a) @ as_f64(w.b) * w.scale / 0.5
    kept = []
    for xt, tt in zip(as_f64(x), term, strict=True):
        err = np.abs((masks * xt) @ ab - tt).max(axis=1)
        assert err.min() < 1e-5 * (1 + np.abs(tt).max()), err.min()
        kept.append(masks[err.argmin()])
    assert 0.2 < np.mean(kept) < 0.8, kept


def test_dropout_mean_over_keys_is_the_full_term():
    frozen, lora, x = _dropout_setup()
    apply = lj.lora_apply(_dropout_matmul)
    keys = jax.random.split(jax.random.key(0), 400)
    ys = jax.jit(jax.vmap(lambda k: apply(frozen, lora, x, **_keyed(k))))(keys)
    base = as_f64(_dropout_matmul(frozen, x))
    full = as_f64(_dropout_matmul(lj.merge(frozen, lora), x)) - base
    mean = as_f64(ys.mean(0)) - base
    assert np.abs(mean - full).max() < 0.15 * np.abs(full).max()
    assert as_f64(ys.std(0)).max() > 0.1 * np.abs(full).max()  # the keys do differ


def test_dropout_with_zero_b_is_the_base_exactly():
    frozen, lora, x = _dropout_setup(zero_b=True)
    apply = lj.lora_apply(_dropout_matmul)
    base = np.asarray(_dropout_matmul(frozen, x))
    for seed in range(3):
        np.testing.assert_array_equal(apply(frozen, lora, x, **_keyed(jax.random.key(seed))), base)


def _scanned_matmuls(p, xs, rngs=None):
    del rngs
    return lax.scan(lambda c, wx: (c, wx[1] @ wx[0]), jnp.zeros(()), (p["w"], xs))[1]


def test_dropout_masks_differ_between_scan_iterations():
    """Identical layers, adapters and inputs: each iteration's own mask."""
    w0, x0 = _normal((DM, FF), 1, 0.4), _normal((4, DM), 0)
    params, xs = {"w": jnp.stack([w0] * L)}, jnp.stack([x0] * L)
    layouts = {"w": lj.Layout("einsum", (1,), (2,), (0,))}
    frozen, lora = _adapters(params, "w", layouts, dropout=0.5)
    w = lora["w"]
    lora = {"w": w.replace(a=jnp.stack([w.a[0]] * L), b=jnp.stack([w.b[0]] * L))}
    assert lj.routes(_scanned_matmuls, frozen, lora, xs) == {"w": FACTORED}
    ys = jax.jit(lj.lora_apply(_scanned_matmuls))(frozen, lora, xs, **_keyed(jax.random.key(3)))
    for i, j in itertools.combinations(range(L), 2):
        assert np.abs(np.asarray(ys[i] - ys[j])).max() > 1e-3, (i, j)
    same = lj.lora_apply(_scanned_matmuls, deterministic=True)(
        frozen, lora, xs, **_keyed(jax.random.key(3))
    )
    assert_tree_close(same, np.stack([as_f64(x0) @ _merged_f64(frozen, lora)["w"][0]] * L))


# -- 9. mixed batches through the rewrite ------------------------------------------------------
def _heads(p, x):
    q = jnp.einsum("bsd,dhk->bshk", x, p["q"])
    return jnp.einsum("bshk,hkd->bsd", jnp.tanh(q), p["o"])


MIXED = {
    # name: (params, layouts, input, fn)
    "matmul": (
        lambda: {"w1": _normal((DM, FF), 1, 0.4), "w2": _normal((FF, DM), 2, 0.4)},
        None,
        lambda: _normal((4, DM), 0),
        lambda p, x: jnp.tanh(x @ p["w1"]) @ p["w2"],
    ),
    "head kernels": (
        lambda: {"q": _normal((DM, H, K), 1, 0.4), "o": _normal((H, K, DM), 2, 0.4)},
        {"q": lj.Layout("dense", (0,), (1, 2)), "o": lj.Layout("dense", (0, 1), (2,))},
        lambda: _normal((4, S, DM), 0),
        _heads,
    ),
    "row lookup": (
        lambda: {"table": _normal((FF, DM), 1, 1.0)},
        {"table": lj.Layout("embed", (0,), (1,))},
        lambda: jnp.asarray(np.random.default_rng(0).integers(0, FF, (4, S))),
        lambda p, ids: jnp.tanh(p["table"][ids]),
    ),
    "scanned stack": (
        lambda: {"w": _normal((L, DM, DM), 1, 0.4)},
        {"w": lj.Layout("dense", (1,), (2,), (0,))},
        lambda: _normal((4, DM), 0),
        lambda p, x: lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, p["w"])[0],
    ),
    "kv slices": (
        lambda: {"kv": _normal((2, DM, H, K), 1, 0.4)},
        {"kv": PROJECTIONS["kv"][3]},
        lambda: _normal((4, S, DM), 0),
        lambda p, x: jnp.einsum("bsd,cdhk->bcshk", x, p["kv"]),
    ),
    "experts einsum (per-example buffers)": (
        lambda: {"w": _normal((E, DM, FF), 1, 0.4)},
        {"w": lj.Layout("einsum", *STACKED)},
        lambda: _normal((4, E, 2, DM), 0),
        lambda p, x: jnp.einsum("becd,edf->becf", x, p["w"]),
    ),
}
MIXED_XFAIL = {
    "conv": (
        lambda: {"w": _normal((3, 3, 5, 2 * H), 1, 0.4)},
        {"w": lj.Layout("conv", (0, 1, 2), (3,))},
        lambda: _normal((4, 6, 6, 5), 0),
        lambda p, x: lax.conv_general_dilated(
            x, p["w"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        ),
    ),
}


@pytest.mark.parametrize("name", [*sorted(MIXED), "conv"])
def test_mixed_batch_equals_each_adapter_alone(name):
    make_params, layouts, make_x, fn = {**MIXED, **MIXED_XFAIL}[name]
    params, x = make_params(), make_x()
    targets = "|".join(params)
    loras = [
        _adapters(params, targets, layouts, seed=100 + 10 * i, alpha=2.0 + i)[1] for i in range(3)
    ]
    ids = [1, -1, 0, 2]
    mixed = jax.jit(lj.multi.lora_apply_mixed(fn))
    y = mixed(params, lj.multi.stack_adapters(loras), jnp.array(ids), x)
    apply, base_fn = jax.jit(lj.lora_apply(fn)), jax.jit(fn)
    for i, k in enumerate(ids):
        alone = base_fn(params, x[i : i + 1]) if k < 0 else apply(params, loras[k], x[i : i + 1])
        assert_tree_close(y[i : i + 1], alone)
    base = base_fn(params, x)
    assert all(np.abs(np.asarray(y[i] - base[i])).max() > 1e-3 for i in (0, 2, 3))


# -- 10. the compiled gradient step holds no kernel-sized contraction -------------------------
def _hlo_case(name):
    """``(fn, params, inputs, layouts, targets)`` of one case of tests 1 to 5."""
    kind, _, which = name.partition(": ")
    if kind == "moe":
        fn, params, x, _ = _moe_setup(which, "function")
        return fn, params, (x,), lj.infer_layouts(fn, params, x), ".*"
    if kind in ("per slice", "whole kernel"):
        fn, params, x = _projection(which)
        return fn, params, (x,), {which: PROJECTIONS[which][3 if kind == "per slice" else 4]}, ".*"
    if kind == "conv":
        x_shape, w_shape, kw = CONVS[which]
        fn = lambda p, x: jnp.tanh(lax.conv_general_dilated(x, p["w"], **kw))
        params, x = {"w": _normal(w_shape, 1)}, _normal(x_shape, 0)
        return fn, params, (x,), lj.infer_layouts(fn, params, x), "w"
    shape, fn, *_ = RESHAPES[which]
    params, x = {"w": _normal(shape, 1)}, _normal((B, S, DM), 0)
    return fn, params, (x,), lj.infer_layouts(fn, params, x), "w"


HLO_CASES = [
    *(f"moe: {c}" for c in sorted(MOES)),
    *(f"{per}: {p}" for per in ("per slice", "whole kernel") for p in sorted(PROJECTIONS)),
    *(f"conv: {c}" for c in sorted(CONVS) if c != "grouped"),
    *(f"reshape: {r}" for r, (*_, route) in sorted(RESHAPES.items()) if route == FACTORED),
]


def _kernel_sizes(frozen, lora):
    """``{path: (element count of the kernel, of one index of its stack axes)}``."""
    sizes = {}
    for path, w in _flat(lora).items():
        base = frozen
        for k in path.split("/"):
            base = base[k]
        one = math.prod(base.shape[i] for i in (*w.layout.in_axes, *w.layout.out_axes))
        sizes[path] = (math.prod(base.shape), one)
    return sizes


@pytest.mark.parametrize("factored", [True, False])
@pytest.mark.parametrize("name", HLO_CASES)
def test_compiled_gradient_has_no_kernel_sized_contraction(name, factored):
    """The factored step has no contraction the size of a kernel (nor of one expert's or
    one slice's); the merged one has one per kernel (its gradient), so the check can fail.
    On CPU, `lax.ragged_dot` lowers to dots on group-masked operands: the forward a dot of
    (tokens, E·in) by (E·in, out), the kernel's gradient a dot batched over experts."""
    fn, params, inputs, layouts, targets = _hlo_case(name)
    frozen, lora = _adapters(params, targets, layouts)
    merged = lambda f, lo, *a: fn(lj.merge(f, lo), *a)
    apply = lj.lora_apply(fn) if factored else merged
    loss = lambda lo, f, *a: jnp.sum(apply(f, lo, *a) ** 2)
    hlo = jax.jit(jax.grad(loss)).lower(lora, frozen, *inputs).compile().as_text()
    sizes = set(contraction_sizes(hlo))
    assert sizes, "no contraction found: has the HLO text format changed?"
    kernels = _kernel_sizes(frozen, lora)
    if factored:
        assert not sizes & {n for pair in kernels.values() for n in pair}, (kernels, sizes)
    else:
        assert all(whole in sizes for whole, _ in kernels.values()), (kernels, sizes)


def test_ragged_dot_rows_past_the_groups_get_no_update():
    """``ragged_dot`` leaves rows past ``sum(group_sizes)`` at zero; the factored term
    (on CPU one product against every expert's ``a``, then a per-row pick) must too."""
    params = {"w": _normal((3, 5, 4), 1, 0.4)}
    fn = lambda p, x, g: lax.ragged_dot(x, p["w"], g)
    x, groups = _normal((9, 5), 0), jnp.array([2, 0, 4], jnp.int32)  # rows 6..8: no group
    layouts = lj.infer_layouts(fn, params, x, groups)
    frozen, lora = _adapters(params, "w", layouts)
    y = check_against_merged(lj.lora_apply(fn), fn, frozen, lora, x, groups)
    assert lj.routes(fn, frozen, lora, x, groups) == {"w": "factored (ragged_dot)"}
    np.testing.assert_array_equal(np.asarray(y[6:]), 0.0)
    w, a, b = as_f64(frozen["w"]), as_f64(lora["w"].a), as_f64(lora["w"].b)
    owner = np.repeat(np.arange(3), [2, 0, 4])
    want = [as_f64(x)[t] @ (w[e] + lora["w"].scale * a[e] @ b[e]) for t, e in enumerate(owner)]
    assert_tree_close(y[:6], np.stack(want))
