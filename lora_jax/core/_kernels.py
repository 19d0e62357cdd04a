"""The kernel table: the factored low-rank update of each layer kind, for every framework.

One entry per kind of contraction a layer does with its kernel: dense (one or several
input and output axes), einsum, embedding (lookup and ``attend``) and convolution. Each
gives the kernel's `Layout` and two functions: ``delta(x, a, b, scale)``, the update
``scale * ((x @ a) @ b)`` computed without ever forming ``a @ b``; and, for mixed batches,
``mixed(x, a, b, scale, rows)``, the same for each example i with adapter ``rows[i]`` of k
stacked ones (the factors are gathered per example, never multiplied out). The Flax linen
and NNX adapters (`lora_jax.linen`, `lora_jax.nnx`) read a layer's attributes and pick the
entry; they hold no math of their own.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from lora_jax.core._layout import Layout

__all__ = ["LowRank", "conv", "conv_fn", "conv_of", "dense", "einsum", "einsum_plan", "embed"]

Delta = Callable[[jax.Array, jax.Array, jax.Array, Any], jax.Array]
# (x, a, b, scale, rows): a and b carry a leading adapter axis of size k, scale and rows
# one entry per example (x's first axis).
MixedDelta = Callable[[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class LowRank:
    """One layer call's factored update: the kernel layout and the two update functions.

    Attributes:
        layout: the kernel's `Layout` (no stack axes).
        delta: ``delta(x, a, b, scale)``.
        mixed: ``mixed(x, a, b, scale, rows)``, or None when the layer contracts its
            input's first axis (no per-example form).
    """

    layout: Layout
    delta: Delta
    mixed: MixedDelta | None


def _per_example(v: jax.Array, ndim: int) -> jax.Array:
    """A per-example vector shaped to broadcast against an array of `ndim` axes."""
    return v.reshape(-1, *([1] * (ndim - 1)))


def _to_tokens(x: jax.Array, x_in: tuple[int, ...]) -> tuple[jax.Array, tuple[int, ...]]:
    """x with its contracted axes moved last, and the sizes of the other (free) axes."""
    free = [i for i in range(x.ndim) if i not in x_in]
    xt = jnp.transpose(x, (*free, *x_in)) if free + list(x_in) != list(range(x.ndim)) else x
    return xt, xt.shape[: len(free)]


def _dense_delta(x_in: tuple[int, ...], out_perm: tuple[int, ...] | None) -> Delta:
    """Low-rank update contracting `x_in` axes of x with a, then b.

    The input is viewed as a 2-D (tokens, features) matrix for the two thin products:
    on XLA's CPU backend that is much faster than contracting 3-D activations.
    """

    def delta(x, a, b, scale):
        xt, lead = _to_tokens(x, x_in)
        r = a.shape[-1]
        h = xt.reshape(math.prod(lead), -1) @ a.reshape(-1, r)
        y = (h * jnp.asarray(scale, h.dtype)) @ b.reshape(r, -1)
        y = y.reshape(*lead, *b.shape[1:])
        return jnp.transpose(y, out_perm) if out_perm is not None else y

    return delta


def _dense_mixed(x_in: tuple[int, ...], out_perm: tuple[int, ...] | None) -> MixedDelta | None:
    """The mixed-batch form: x viewed as (examples, tokens, in), each example contracted
    with its own gathered a and b (two batched einsums)."""
    if 0 in x_in:
        return None

    def mixed(x, a, b, scale, rows):
        xt, lead = _to_tokens(x, x_in)
        r = a.shape[-1]
        x3 = xt.reshape(lead[0], -1, math.prod(xt.shape[len(lead) :]))
        a3 = jnp.take(a.reshape(a.shape[0], -1, r), rows, axis=0)
        b3 = jnp.take(b.reshape(b.shape[0], r, -1), rows, axis=0)
        h = jnp.einsum("etd,edr->etr", x3, a3) * _per_example(scale, 3)
        y = jnp.einsum("etr,ero->eto", h, b3).reshape(*lead, *b.shape[2:])
        return jnp.transpose(y, out_perm) if out_perm is not None else y

    return mixed


def dense(x_in: tuple[int, ...], n_out: int) -> LowRank:
    """A dense layer contracting the input axes `x_in` with the kernel's leading axes.

    Args:
        x_in: the input axes the kernel contracts (non-negative, ascending).
        n_out: number of kernel output axes (after its ``len(x_in)`` input axes).

    Returns:
        The `LowRank` entry (kind ``"dense"``).
    """
    n_in = len(x_in)
    layout = Layout("dense", tuple(range(n_in)), tuple(range(n_in, n_in + n_out)))
    return LowRank(layout, _dense_delta(x_in, None), _dense_mixed(x_in, None))


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


def einsum(eq: str | None) -> LowRank | None:
    """``einsum(eq, x, kernel)``, or None for an equation the factored path cannot take."""
    plan = einsum_plan(eq)
    if plan is None:
        return None
    layout, x_in, perm = plan
    return LowRank(layout, _dense_delta(x_in, perm), _dense_mixed(x_in, perm))


def _embed_lookup(ids, a, b, scale):
    h = jnp.take(a, ids.reshape(-1), axis=0) * jnp.asarray(scale, a.dtype)
    return (h @ b).reshape(*ids.shape, b.shape[-1])


def _embed_attend(query, a, b, scale):
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


def embed(method: str) -> LowRank:
    """An embedding table (vocab, dim): ``"lookup"`` of ids, or ``"attend"`` (logits
    ``query @ table.T``)."""
    layout = Layout("embed", (0,), (1,))
    if method == "attend":
        return LowRank(layout, _embed_attend, _embed_attend_mixed)
    return LowRank(layout, _embed_lookup, _embed_lookup_mixed)


def _tuple(v: int | Sequence[int] | None, n: int) -> tuple[int, ...]:
    if v is None:
        return (1,) * n
    return (int(v),) * n if isinstance(v, int) else tuple(int(x) for x in v)


def _padding(padding: Any, n: int) -> Any:
    """Flax's padding forms as `lax.conv_general_dilated` takes them (strings kept)."""
    if isinstance(padding, str):
        return padding.upper()
    if isinstance(padding, int):
        return [(padding, padding)] * n
    pads = [(p, p) if isinstance(p, int) else tuple(p) for p in padding]
    return pads * n if len(pads) == 1 else pads


def conv_fn(
    window: Sequence[int],
    *,
    strides: Any = 1,
    padding: Any = "SAME",
    input_dilation: Any = 1,
    kernel_dilation: Any = 1,
    precision: Any = None,
) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """``conv(x, kernel)``: the convolution Flax's `Conv` (linen and NNX) computes, with
    any kernel of the same window (``(*window, in, out)``), channels last, no bias; inputs
    with several batch axes or none, as Flax takes them."""
    n = len(window)
    strides_, in_dil, k_dil = (
        _tuple(strides, n),
        _tuple(input_dilation, n),
        _tuple(kernel_dilation, n),
    )
    pad = _padding(padding, n)

    def conv(x, kernel):
        batch = x.shape[: x.ndim - n - 1]
        x = x.reshape(-1, *x.shape[-n - 1 :])
        p = pad
        if p in ("CIRCULAR", "REFLECT"):
            sizes = [(k - 1) * d + 1 for k, d in zip(window, k_dil, strict=True)]
            pads = [(0, 0)] + [((s - 1) // 2, s // 2) for s in sizes] + [(0, 0)]
            x = jnp.pad(x, pads, mode={"CIRCULAR": "wrap", "REFLECT": "reflect"}[p])
            p = "VALID"
        elif p == "CAUSAL":
            x = jnp.pad(x, [(0, 0), (k_dil[0] * (window[0] - 1), 0), (0, 0)])
            p = "VALID"
        spatial = "".join("HWDXYZ"[i] for i in range(n))
        dims = lax.conv_dimension_numbers(
            x.shape, kernel.shape, (f"N{spatial}C", f"{spatial}IO", f"N{spatial}C")
        )
        y = lax.conv_general_dilated(
            x,
            kernel.astype(x.dtype),
            strides_,
            p,
            lhs_dilation=in_dil,
            rhs_dilation=k_dil,
            dimension_numbers=dims,
            precision=precision,
        )
        return y.reshape(*batch, *y.shape[1:])

    return conv


def conv(conv_with: Callable[[jax.Array, jax.Array], jax.Array], n_window: int) -> LowRank:
    """A convolution: x convolved with `a` (``conv_with(x, a)``, the layer's own
    convolution with r output features, see `conv_fn`), then the 1x1 product with `b`.

    Args:
        conv_with: ``conv(x, kernel)`` for the layer's window, strides and padding.
        n_window: number of window axes.

    Returns:
        The `LowRank` entry (kind ``"conv"``).
    """
    layout = Layout("conv", tuple(range(n_window + 1)), (n_window + 1,))

    def delta(x, a, b, scale):
        h = conv_with(x, a) * jnp.asarray(scale, x.dtype)
        return (h.reshape(-1, h.shape[-1]) @ b).reshape(*h.shape[:-1], b.shape[-1])

    def mixed(x, a, b, scale, rows):
        one = lambda xi, ai: conv_with(xi[None], ai)[0]
        h = jax.vmap(one)(x, jnp.take(a, rows, axis=0))  # (examples, *spatial, r)
        h3 = h.reshape(h.shape[0], -1, h.shape[-1]) * _per_example(scale, 3)
        y = jnp.einsum("etr,ero->eto", h3, jnp.take(b, rows, axis=0))
        return y.reshape(*h.shape[:-1], b.shape[-1])

    return LowRank(layout, delta, mixed)


def conv_of(layer: Any, window: Sequence[int]) -> LowRank:
    """The entry of a Flax ``Conv`` layer (linen or NNX: the same attribute names, read
    here once): its own strides, padding, dilations and precision, any kernel."""
    conv_with = conv_fn(
        window,
        strides=layer.strides,
        padding=layer.padding,
        input_dilation=layer.input_dilation,
        kernel_dilation=layer.kernel_dilation,
        precision=layer.precision,
    )
    return conv(conv_with, len(window))
