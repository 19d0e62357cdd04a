"""The Flax linen layers whose low-rank path lora_jax computes factored.

For each supported (layer, method) pair, `site` reads the module and its input and
returns the kernel it uses, that kernel's `Layout`, and a function computing the
low-rank update ``scale * ((x @ a) @ b)`` without ever forming ``a @ b``; and, for mixed
batches, one computing ``scale[i] * ((x[i] @ a[rows[i]]) @ b[rows[i]])`` for each example i
from k stacked adapters (the factors are gathered per example, never multiplied out).
Anything else returns None and is served by the merged path.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lora_jax.layout import Layout

Delta = Callable[[jax.Array, jax.Array, jax.Array, float], jax.Array]
# (x, a, b, scale, rows): a and b carry a leading adapter axis of size k, scale and rows
# one entry per example (x's first axis).
MixedDelta = Callable[[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class Site:
    """One intercepted layer call: its kernel's name and shape, layout and update."""

    param: str
    shape: tuple[int, ...]
    layout: Layout
    input_name: str
    delta: Delta
    mixed: MixedDelta | None = None  # None: the layer contracts its input's first axis


def _inherits(module: nn.Module, cls: type, method: str) -> bool:
    """True when `module` is a `cls` whose `method` is `cls`'s own (not overridden)."""
    return isinstance(module, cls) and getattr(type(module), method) is getattr(cls, method)


def _input(args: tuple, kwargs: dict, name: str) -> Any:
    return args[0] if args else kwargs.get(name)


def dense_delta(x_in: tuple[int, ...], out_perm: tuple[int, ...] | None) -> Delta:
    """Low-rank update contracting `x_in` axes of x with a, then b.

    The input is viewed as a 2-D (tokens, features) matrix for the two thin products:
    on XLA's CPU backend that is much faster than contracting 3-D activations.
    """

    def delta(x, a, b, scale):
        free = [i for i in range(x.ndim) if i not in x_in]
        xt = jnp.transpose(x, (*free, *x_in)) if free + list(x_in) != list(range(x.ndim)) else x
        lead = xt.shape[: len(free)]
        r = a.shape[-1]
        h = xt.reshape(math.prod(lead), -1) @ a.reshape(-1, r)
        y = (h * jnp.asarray(scale, h.dtype)) @ b.reshape(r, -1)
        y = y.reshape(*lead, *b.shape[1:])
        return jnp.transpose(y, out_perm) if out_perm is not None else y

    return delta


def _per_example(v: jax.Array, ndim: int) -> jax.Array:
    """A per-example vector shaped to broadcast against an array of `ndim` axes."""
    return v.reshape(-1, *([1] * (ndim - 1)))


def _dense_mixed(x_in: tuple[int, ...], out_perm: tuple[int, ...] | None) -> MixedDelta | None:
    """`dense_delta` for a mixed batch: x viewed as (examples, tokens, in), each example
    contracted with its own gathered a and b (two batched einsums)."""
    if 0 in x_in:
        return None

    def mixed(x, a, b, scale, rows):
        free = [i for i in range(x.ndim) if i not in x_in]
        xt = jnp.transpose(x, (*free, *x_in)) if free + list(x_in) != list(range(x.ndim)) else x
        lead = xt.shape[: len(free)]
        r = a.shape[-1]
        x3 = xt.reshape(lead[0], -1, math.prod(xt.shape[len(free) :]))
        a3 = jnp.take(a.reshape(a.shape[0], -1, r), rows, axis=0)
        b3 = jnp.take(b.reshape(b.shape[0], r, -1), rows, axis=0)
        h = jnp.einsum("etd,edr->etr", x3, a3) * _per_example(scale, 3)
        y = jnp.einsum("etr,ero->eto", h, b3).reshape(*lead, *b.shape[2:])
        return jnp.transpose(y, out_perm) if out_perm is not None else y

    return mixed


def _dense(module: Any, x: Any) -> Site:
    layout = Layout("dense", (0,), (1,))
    shape = (x.shape[-1], module.features)
    x_in = (x.ndim - 1,)
    return Site(
        "kernel", shape, layout, "inputs", dense_delta(x_in, None), _dense_mixed(x_in, None)
    )


def _dense_general(module: Any, x: Any) -> Site | None:
    if module.batch_dims:
        return None
    tup = lambda v: tuple(v) if isinstance(v, (tuple, list)) else (v,)
    axis = tuple(sorted(ax % x.ndim for ax in tup(module.axis)))
    features = tup(module.features)
    n_in = len(axis)
    layout = Layout("dense", tuple(range(n_in)), tuple(range(n_in, n_in + len(features))))
    shape = tuple(x.shape[ax] for ax in axis) + features
    delta, mixed = dense_delta(axis, None), _dense_mixed(axis, None)
    return Site("kernel", shape, layout, "inputs", delta, mixed)


def einsum_plan(eq: str | None) -> tuple[Layout, tuple[int, ...], tuple[int, ...] | None] | None:
    """For ``einsum(eq, x, kernel)``: the kernel's layout, the axes of x it contracts, and
    the output permutation of the update (None when the order is already right); None
    for an equation the factored path cannot take."""
    eq = (eq or "").replace(" ", "")
    try:
        lhs, rest = eq.split(",")
        rhs, out = rest.split("->")
    except ValueError:
        return None
    letters = lhs + rhs + out
    if not letters.isalpha() or any(len(set(s)) != len(s) for s in (lhs, rhs, out)):
        return None  # ellipsis, traces, repeated letters: left to the merged path
    contracted = [c for c in rhs if c not in out]
    kept = [c for c in rhs if c in out]
    free = [c for c in lhs if c not in contracted]
    if any(c not in lhs for c in contracted) or any(c in lhs for c in kept):
        return None  # a kernel axis summed alone, or a batch axis shared with the input
    if any(c not in out for c in free) or sorted(out) != sorted(free + kept):
        return None
    layout = Layout(
        "einsum", tuple(rhs.index(c) for c in contracted), tuple(rhs.index(c) for c in kept)
    )
    x_in = tuple(lhs.index(c) for c in contracted)
    order = free + kept
    out_perm = tuple(order.index(c) for c in out)
    return layout, x_in, None if out_perm == tuple(range(len(out))) else out_perm


def _einsum(module: Any, einsum_str: str | None) -> Site | None:
    plan = einsum_plan(einsum_str or module.einsum_str)
    if plan is None:
        return None
    layout, x_in, perm = plan
    delta, mixed = dense_delta(x_in, perm), _dense_mixed(x_in, perm)
    return Site("kernel", tuple(module.shape), layout, "inputs", delta, mixed)


def embed_lookup(ids, a, b, scale):
    h = jnp.take(a, ids.reshape(-1), axis=0) * jnp.asarray(scale, a.dtype)
    return (h @ b).reshape(*ids.shape, b.shape[-1])


def embed_attend(query, a, b, scale):
    q = query.reshape(-1, query.shape[-1])
    h = (q @ b.T) * jnp.asarray(scale, q.dtype)
    return (h @ a.T).reshape(*query.shape[:-1], a.shape[0])


def _embed_lookup_mixed(ids, a, b, scale, rows):
    flat = ids.reshape(ids.shape[0], -1)
    h = a[rows[:, None], flat] * _per_example(scale, 3)  # (examples, tokens, r)
    y = jnp.einsum("etr,erd->etd", h, jnp.take(b, rows, axis=0))
    return y.reshape(*ids.shape, b.shape[-1])


def _embed_attend_mixed(query, a, b, scale, rows):
    q = query.reshape(query.shape[0], -1, query.shape[-1])
    h = jnp.einsum("etd,erd->etr", q, jnp.take(b, rows, axis=0)) * _per_example(scale, 3)
    y = jnp.einsum("etr,evr->etv", h, jnp.take(a, rows, axis=0))
    return y.reshape(*query.shape[:-1], a.shape[1])


def conv_deltas(make_conv: Callable[[int], nn.Conv]) -> tuple[Delta, MixedDelta]:
    """The factored update of a convolution: x convolved with `a` (a conv with r output
    features, built by ``make_conv(r)`` with the layer's window, strides and padding), then
    the 1x1 product with `b`; and its mixed-batch form."""

    def delta(x, a, b, scale):
        conv = make_conv(a.shape[-1])
        h = jnp.asarray(conv.apply({"params": {"kernel": a}}, x)) * jnp.asarray(scale, x.dtype)
        return (h.reshape(-1, h.shape[-1]) @ b).reshape(*h.shape[:-1], b.shape[-1])

    def mixed(x, a, b, scale, rows):
        conv = make_conv(a.shape[-1])
        one = lambda xi, ai: conv.apply({"params": {"kernel": ai}}, xi[None])[0]
        h = jax.vmap(one)(x, jnp.take(a, rows, axis=0))  # (examples, *spatial, r)
        h3 = h.reshape(h.shape[0], -1, h.shape[-1]) * _per_example(scale, 3)
        y = jnp.einsum("etr,ero->eto", h3, jnp.take(b, rows, axis=0))
        return y.reshape(*h.shape[:-1], b.shape[-1])

    return delta, mixed


def _conv(module: Any, x: Any) -> Site | None:
    if module.feature_group_count != 1 or module.mask is not None:
        return None
    size = module.kernel_size
    window = (size,) if isinstance(size, int) else tuple(size)
    shape = (*window, x.shape[-1], module.features)
    n = len(window) + 1
    layout = Layout("conv", tuple(range(n)), (n,))
    delta, mixed = conv_deltas(lambda r: module.clone(parent=None, features=r, use_bias=False))
    unbatched = x.ndim == len(window) + 1  # Flax's unbatched conv input: no example axis
    return Site("kernel", shape, layout, "inputs", delta, None if unbatched else mixed)


def site(module: nn.Module, method: str, args: tuple, kwargs: dict) -> Site | None:
    """The factored description of this layer call, or None if it is not supported."""
    if method == "__call__":
        if _inherits(module, nn.Dense, method):
            return _dense(module, _input(args, kwargs, "inputs"))
        if _inherits(module, nn.DenseGeneral, method):
            return _dense_general(module, _input(args, kwargs, "inputs"))
        if _inherits(module, nn.Einsum, method):
            eq = args[1] if len(args) > 1 else kwargs.get("einsum_str")
            return _einsum(module, eq)
        if _inherits(module, nn.Conv, method):
            return _conv(module, _input(args, kwargs, "inputs"))
    if _inherits(module, nn.Embed, method) and method in ("__call__", "attend"):
        shape = (module.num_embeddings, module.features)
        layout = Layout("embed", (0,), (1,))
        if method == "__call__":
            return Site("embedding", shape, layout, "inputs", embed_lookup, _embed_lookup_mixed)
        return Site("embedding", shape, layout, "query", embed_attend, _embed_attend_mixed)
    return None


def kernel_path(module: nn.Module, param: str) -> str:
    """The variables path of a module's parameter: ``params/<module path>/<param>``."""
    return "/".join(("params", *module.path, param))
