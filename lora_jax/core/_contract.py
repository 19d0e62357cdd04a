"""The factored low-rank term of one contraction, laid out as the contraction lays out its
result: the math of `lora_jax.core._rewrite`, on one `dot_general` equation."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

__all__ = ["low_rank_dot"]


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
    matching axes of x, `side` 0 when the kernel is the left operand.
    """
    lay = cur.layout
    axes = view.axes
    k_contract = [axes[i] for i in kc]
    k_batch = [axes[i] for i in kb]
    k_free = [axes[i] for i in range(len(axes)) if i not in kc and i not in kb]
    if sorted(k_batch) != sorted(lay.stack_axes):
        return None
    if sorted(k_contract) == sorted(lay.in_axes) and sorted(k_free) == sorted(lay.out_axes):
        first, second, swap = cur.a, cur.b, False
    elif sorted(k_contract) == sorted(lay.out_axes) and sorted(k_free) == sorted(lay.in_axes):
        first, second, swap = cur.b, cur.a, True
    else:
        return None
    letters = iter("abcdefghijklmnopqstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
    kl = {k: next(letters) for k in range(len(lay.perm))}
    r = "r"
    if not lay.stack_axes:
        return _two_d(x, cur, first, second, swap, xc, k_contract, k_free, side)
    xs = [""] * x.ndim
    for xi, ki in zip(xc, k_contract, strict=True):
        xs[xi] = kl[ki]
    for xi, ki in zip(xb, k_batch, strict=True):
        xs[xi] = kl[ki]
    for i in range(x.ndim):
        if not xs[i]:
            xs[i] = next(letters)
    stack = "".join(kl[k] for k in lay.stack_axes)
    a_sub = stack + "".join(kl[k] for k in lay.in_axes) + r
    b_sub = stack + r + "".join(kl[k] for k in lay.out_axes)
    first_sub, second_sub = (b_sub, a_sub) if swap else (a_sub, b_sub)
    x_batch = "".join(kl[k] for k in k_batch)
    x_free = "".join(xs[i] for i in range(x.ndim) if i not in xc and i not in xb)
    h_sub = x_batch + x_free + r
    k_free_sub = "".join(kl[k] for k in k_free)
    out_sub = x_batch + (k_free_sub + x_free if side == 0 else x_free + k_free_sub)
    dtype = x.dtype
    h = jnp.einsum(f"{''.join(xs)},{first_sub}->{h_sub}", x, first.astype(dtype))
    h = h * jnp.asarray(cur.scale, dtype)
    return jnp.einsum(f"{h_sub},{second_sub}->{out_sub}", h, second.astype(dtype))


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
