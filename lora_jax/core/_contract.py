"""The factored low-rank term of one contraction, laid out as the contraction lays out its
result: the math of `lora_jax.core._rewrite`, on one `dot_general` equation."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

__all__ = [
    "conv_vector",
    "dot_vector",
    "input_vector",
    "low_rank_conv",
    "low_rank_dot",
    "low_rank_ragged",
]


def low_rank_dot(
    x: Any,
    cur: Any,
    view: Any,
    kc: tuple[int, ...],
    xc: tuple[int, ...],
    kb: tuple[int, ...],
    xb: tuple[int, ...],
    side: int,
) -> Any:
    """``s·(x·a)·b`` laid out as ``dot_general`` lays out its result, or None when the
    contraction does not split along the adapter's layout (then the use is merged).

    `kc`/`kb` are the contracted and batch axes of the kernel's value, `xc`/`xb` the
    matching axes of x, `side` 0 when the kernel is the left operand. Stack axes are
    either batch axes of the contraction (a batched einsum over experts or layers) or
    free ones (several projections in one kernel: each slice its own adapter).
    """
    lay = cur.layout
    axes = view.axes
    k_contract = [axes[i] for i in kc]
    k_batch = [axes[i] for i in kb]
    k_free = [axes[i] for i in range(len(axes)) if i not in kc and i not in kb]
    free_stack = [k for k in k_free if k in lay.stack_axes]
    k_rest = [k for k in k_free if k not in lay.stack_axes]
    if not set(k_batch) <= set(lay.stack_axes):
        return None
    if sorted(k_contract) == sorted(lay.in_axes) and sorted(k_rest) == sorted(lay.out_axes):
        swap = False
    elif sorted(k_contract) == sorted(lay.out_axes) and sorted(k_rest) == sorted(lay.in_axes):
        swap = True
    else:
        return None
    a, b = cur.factors()
    first, second = (b, a) if swap else (a, b)
    if not lay.stack_axes and not cur.mixed:
        return _two_d(x, cur, first, second, swap, xc, k_contract, k_free, side)
    letters = iter("abcdefghijklmnopqstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
    kl = {k: next(letters) for k in range(len(lay.perm))}
    r, e = "r", "E" if cur.mixed else ""
    xs = [""] * x.ndim
    for xi, ki in zip(xc, k_contract, strict=True):
        xs[xi] = kl[ki]
    for xi, ki in zip(xb, k_batch, strict=True):
        xs[xi] = kl[ki]
    x_free_axes = [i for i in range(x.ndim) if i not in xc and i not in xb]
    if cur.mixed:
        _check_examples(x, x_free_axes, cur)
        xs[x_free_axes[0]] = e
    for i in range(x.ndim):
        if not xs[i]:
            xs[i] = next(letters)
    stack = "".join(kl[k] for k in lay.stack_axes) + e
    a_sub = stack + "".join(kl[k] for k in lay.in_axes) + r
    b_sub = stack + r + "".join(kl[k] for k in lay.out_axes)
    first_sub, second_sub = (b_sub, a_sub) if swap else (a_sub, b_sub)
    x_batch = "".join(kl[k] for k in k_batch)
    x_free = "".join(xs[i] for i in x_free_axes)
    h_sub = x_batch + x_free + "".join(kl[k] for k in free_stack) + r
    k_free_sub = "".join(kl[k] for k in k_free)
    out_sub = x_batch + (k_free_sub + x_free if side == 0 else x_free + k_free_sub)
    dtype = x.dtype
    h = jnp.einsum(f"{''.join(xs)},{first_sub}->{h_sub}", x, first.astype(dtype))
    h = h * _gain(cur, h_sub.index(e) if e else None, h.ndim, dtype)
    return jnp.einsum(f"{h_sub},{second_sub}->{out_sub}", h, second.astype(dtype))


def _check_examples(x: Any, free: list[int], cur: Any) -> None:
    n = cur.rows.shape[0]
    if not free or x.shape[free[0]] != n:
        raise ValueError(
            f"{cur.origin}: a contraction reads this kernel with an input of shape "
            f"{tuple(x.shape)}, but a mixed batch needs the example axis ({n} examples, the "
            f"length of `adapter_ids`) as the input's first free axis at every use."
        )


def _gain(cur: Any, axis: int | None, ndim: int, dtype: Any) -> Any:
    """The multiplier of the rank-r activations: the scale, or a mixed batch's per-example
    gains broadcast along the example `axis`."""
    if axis is None:
        return jnp.asarray(cur.scale, dtype)
    shape = [1] * ndim
    shape[axis] = -1
    return cur.gains.astype(dtype).reshape(shape)


def low_rank_ragged(x: Any, cur: Any, view: Any, group_sizes: Any, params: dict) -> Any:
    """``s·(x·a)·b`` for ``ragged_dot_general(x, kernel, group_sizes)``: each group of rows
    (the tokens routed to one expert) meets its own expert's factors, through the same
    grouped matmul (never ``E`` dense updates). None unless the kernel is the right operand
    grouped along its one stack axis, with one output axis."""
    dn = params["ragged_dot_dimension_numbers"]
    (lc, rc), (lb, rb) = dn.dot_dimension_numbers
    lay, axes = cur.layout, view.axes
    group = [axes[i] for i in dn.rhs_group_dimensions]
    contracted = sorted(axes[i] for i in rc)
    rest = [i for i in range(len(axes)) if i not in rc and i not in dn.rhs_group_dimensions]
    if cur.mixed or lb or rb or len(dn.lhs_ragged_dimensions) != 1:
        return None
    if dn.lhs_ragged_dimensions[0] in lc or group != list(lay.stack_axes):
        return None
    if contracted != sorted(lay.in_axes) or [axes[i] for i in rest] != list(lay.out_axes):
        return None
    if len(lay.out_axes) != 1:
        return None
    # a in the kernel value's axis order, with the rank where the output axis is.
    order = list(lay.stack_axes) + list(lay.in_axes) + list(lay.out_axes)
    a_val = jnp.transpose(cur.a, [order.index(k) for k in axes]).astype(x.dtype)
    plain = x.ndim == 2 and tuple(lc) == (1,) and dn.lhs_ragged_dimensions == (0,)
    if plain and axes == (0, 1, 2) and params.get("group_offset") is None and _dense_groups():
        h = _rows_first(x, a_val, group_sizes)
    else:
        h = _ragged(x, a_val, group_sizes, params, dn)
    h = h * jnp.asarray(cur.scale, h.dtype)
    free = [i for i in range(x.ndim) if i not in lc]
    pos = len(free)  # the rank axis of h: after x's free axes
    ragged = free.index(dn.lhs_ragged_dimensions[0])
    second = type(dn)(
        dot_dimension_numbers=(((pos,), (1,)), ((), ())),
        lhs_ragged_dimensions=(ragged,),
        rhs_group_dimensions=(0,),
    )
    return _ragged(h, cur.b.astype(x.dtype), group_sizes, params, second)


def _dense_groups() -> bool:
    """Whether ``ragged_dot`` runs as masked dense products here (JAX's CPU lowering: every
    expert over every row, the rows copied per expert), where the thin first factor is
    cheaper as one matmul against all experts' ``a`` followed by a per-row pick."""
    return jax.default_backend() == "cpu"


def _rows_first(x: Any, a: Any, group_sizes: Any) -> Any:
    """``ragged_dot(x, a, group_sizes)`` for x (rows, in), a (E, in, r): ``x @ [a_0 .. a_E]``
    (rows, E·r), then each row keeps its own group's r columns (rows past the groups get
    zeros, as in ``ragged_dot``). Exact; E·r columns instead of E copies of x."""
    n_groups, _, r = a.shape
    h = (x @ jnp.moveaxis(a, 0, 1).reshape(a.shape[1], -1)).reshape(x.shape[0], n_groups, r)
    rows = jnp.arange(x.shape[0])
    group = jnp.searchsorted(jnp.cumsum(group_sizes), rows, side="right")
    h = jnp.take_along_axis(h, jnp.minimum(group, n_groups - 1)[:, None, None], axis=1)[:, 0]
    return jnp.where((group < n_groups)[:, None], h, jnp.zeros_like(h))


def _ragged(x: Any, w: Any, group_sizes: Any, params: dict, dn: Any) -> Any:
    return lax.ragged_dot_general(
        x,
        w,
        group_sizes,
        dn,
        precision=params.get("precision"),
        preferred_element_type=params.get("preferred_element_type"),
        group_offset=params.get("group_offset"),
    )


def low_rank_conv(x: Any, cur: Any, view: Any, params: dict) -> Any:
    """``s·conv(x, a)·b`` for ``conv_general_dilated(x, kernel)``: the window and
    input-feature axes contract with a (a conv to r channels, same strides, padding and
    dilations), then b maps the r channels to the outputs (as PEFT's Conv LoRA). None
    unless the kernel's output-feature axis is its one output axis and there are no
    feature or batch groups."""
    dn = params["dimension_numbers"]
    lay, axes = cur.layout, view.axes
    out_axis = axes[dn.rhs_spec[0]]
    if lay.stack_axes or list(lay.out_axes) != [out_axis]:
        return None
    if params["feature_group_count"] != 1 or params["batch_group_count"] != 1:
        return None
    a = cur.a
    if cur.mixed:  # all k adapters' a in one conv to k·r channels; each example picks its own
        _check_examples(x, [dn.lhs_spec[0]], cur)
        a = jnp.moveaxis(a, 0, -2).reshape(*a.shape[1:-1], -1)
    order = [*lay.in_axes, out_axis]
    a_val = jnp.transpose(a, [order.index(k) for k in axes]).astype(x.dtype)
    h = lax.conv_general_dilated_p.bind(x, a_val, **params)
    h = jnp.moveaxis(h, (dn.out_spec[0], dn.out_spec[1]), (0, -1))  # (examples, ..., channels)
    if cur.mixed:
        k, r = cur.a.shape[0], cur.a.shape[-1]
        h = h.reshape(*h.shape[:-1], k, r)
        pick = cur.rows.reshape(-1, *([1] * (h.ndim - 1)))
        h = jnp.take_along_axis(h, pick, axis=-2)[..., 0, :]
        h = h * _gain(cur, 0, h.ndim, h.dtype)
        y = jnp.einsum("n...r,nro->n...o", h, jnp.take(cur.b, cur.rows, axis=0).astype(h.dtype))
    else:
        y = (h * jnp.asarray(cur.scale, h.dtype)) @ cur.b.astype(h.dtype)
    return jnp.moveaxis(y, (0, -1), (dn.out_spec[0], dn.out_spec[1]))


def _two_d(x, cur, first, second, swap, xc, k_contract, k_free, side):
    """The no-stack case on 2-D (tokens, features) views: on XLA's CPU backend the thin
    rank-r products are much faster on a matrix than on 3-D activations."""
    lay = cur.layout
    contracted = lay.out_axes if swap else lay.in_axes  # the first factor's kernel axes
    order = [xc[k_contract.index(k)] for k in contracted]
    free = [i for i in range(x.ndim) if i not in xc]
    xt = jnp.transpose(x, free + order) if free + order != list(range(x.ndim)) else x
    lead = xt.shape[: len(free)]
    r = cur.a.shape[-1]
    dtype = x.dtype
    if swap:
        f = first.reshape(r, -1).T  # b: (r, *out) -> (out, r)
        g = second.reshape(-1, r).T  # a: (*in, r) -> (r, in)
        kept = lay.in_axes
    else:
        f, g, kept = first.reshape(-1, r), second.reshape(r, -1), lay.out_axes
    h = xt.reshape(-1, f.shape[0]) @ f.astype(dtype)
    y = (h * jnp.asarray(cur.scale, dtype)) @ g.astype(dtype)
    sizes = {
        k: cur.b.shape[1 + lay.out_axes.index(k)]
        if k in lay.out_axes
        else cur.a.shape[lay.in_axes.index(k)]
        for k in kept
    }
    y = y.reshape(*lead, *(sizes[k] for k in kept))
    # dot_general's order: the kernel's free axes in the order the value has them.
    want = [kept.index(k) for k in k_free]
    n = len(lead)
    tail = [n + i for i in want]
    perm = (tail + list(range(n))) if side == 0 else (list(range(n)) + tail)
    return jnp.transpose(y, perm) if perm != list(range(y.ndim)) else y


def dot_vector(v: Any, cur: Any, view: Any, kc: tuple, kb: tuple, side: int, x_free: int) -> Any:
    """A ``(*stack, *out)`` vector (DoRA's gain, a lora_bias) laid out against a
    ``dot_general`` result that contracts the kernel's input axes: the batch axes first, then
    the two operands' free axes (size 1 along the input's)."""
    lay, axes = cur.layout, view.axes
    k_batch = [axes[i] for i in kb]
    k_free = [axes[i] for i in range(len(axes)) if i not in kc and i not in kb]
    src = list(lay.stack_axes) + list(lay.out_axes)
    t = jnp.transpose(v, [src.index(k) for k in k_batch + k_free])
    shape, nb = list(t.shape), len(k_batch)
    ones = [1] * x_free
    return t.reshape(shape + ones if side == 0 else shape[:nb] + ones + shape[nb:])


def input_vector(v: Any, cur: Any, view: Any, kc: tuple, xc: tuple, x_ndim: int) -> Any:
    """A ``(*out)`` vector laid out against the input of a ``dot_general`` that contracts
    the kernel's output axes (a tied head reading an embedding table as ``x @ Wᵀ``)."""
    lay = cur.layout
    shape = [1] * x_ndim
    positions = sorted(xc)
    kernel_axes = [view.axes[kc[list(xc).index(p)]] for p in positions]
    t = jnp.transpose(v, [list(lay.out_axes).index(k) for k in kernel_axes])
    for p, size in zip(positions, t.shape, strict=True):
        shape[p] = size
    return t.reshape(shape)


def conv_vector(v: Any, params: dict, ndim: int) -> Any:
    """A ``(out,)`` vector laid out against a ``conv_general_dilated`` result (its feature
    axis)."""
    shape = [1] * ndim
    shape[params["dimension_numbers"].out_spec[1]] = v.shape[0]
    return v.reshape(shape)
