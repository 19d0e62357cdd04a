"""DoRA and ``lora_bias`` at a contraction of the rewrite (`lora_jax.core._rewrite`):
functions of the `Interpreter` and one equation, as `lora_jax.core._flow` is for control
flow.

With a bias, the low-rank term is ``s·((x a) b + bias)``. With DoRA's magnitude m, the
result is ``g·(W x + term)`` for the gain ``g = m / ‖W + s·a@b‖`` per output feature (the
norm factored and held constant: `lora_jax.core._dora.weight_norm`); while LoRA dropout
runs, PEFT's form ``W x + (g - 1)·W x' + g·term(x')`` on the dropped input x' (the base
contraction runs a second time on x', as in PEFT)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax.numpy as jnp

from lora_jax.core._contract import (
    conv_vector,
    dot_vector,
    input_vector,
    low_rank_conv,
    low_rank_dot,
)
from lora_jax.core._dora import dora_gain, dora_output
from lora_jax.core._packed import unpack

__all__ = ["decomposed_conv", "decomposed_dot", "finish"]


def _gain(cur: Any, value: Any, view: Any) -> Any:
    """DoRA's gain (`dora_gain`) for the kernel `value` as `view` sees it."""
    inverse = [view.axes.index(k) for k in range(len(view.axes))]
    kernel = jnp.transpose(unpack(value), inverse)
    return dora_gain(kernel, cur.a, cur.b, cur.layout, cur.scale, cur.magnitude)


def finish(
    interp: Any,
    eqn: Any,
    invals: list,
    at: int,
    dropped: Any,
    cur: Any,
    term: Any,
    arrange: Callable[[Any], Any],
    kernel: tuple[Any, Any],
    how: str,
) -> Any:
    """The equation's result with the adapter's term: `term` computed on `dropped` (the
    input ``invals[at]`` after LoRA dropout), `arrange` laying a ``(*stack, *out)`` vector
    out against the result, `kernel` the ``(value, view)`` of the adapted kernel."""
    if term is None:
        return None
    if cur.bias is not None:
        term = term + arrange(cur.bias.astype(jnp.float32) * cur.scale).astype(term.dtype)
    if cur.magnitude is None:
        return interp.added(eqn, invals, cur, term, how)
    g = arrange(_gain(cur, *kernel))
    base = interp.bind(eqn, invals)
    interp.note(cur, f"factored ({how}, DoRA)")
    base_dropped = None
    if dropped is not invals[at]:
        vals = list(invals)
        vals[at] = dropped
        base_dropped = interp.bind(eqn, vals)
    out = dora_output(g, base, term, base_dropped)
    return out.astype(base.dtype)


def decomposed_dot(
    interp: Any, eqn: Any, invals: list, side: int, cur: Any, view: Any, dims: tuple
) -> Any:
    """A ``dot_general`` reading a kernel whose adapter has a magnitude or a bias; None when
    it does not split along the layout (the use is merged)."""
    kc, xc, kb, xb = dims
    x, lay = invals[1 - side], cur.layout
    contracted = sorted(view.axes[i] for i in kc)
    if contracted == sorted(lay.out_axes) and contracted != sorted(lay.in_axes):
        # x @ Wᵀ (a tied head reading an embedding table): DoRA's per-feature gain scales
        # the contracted axis, so it scales the input.
        if cur.bias is not None or cur.magnitude is None or lay.stack_axes:
            return None
        g = input_vector(_gain(cur, invals[side], view), cur, view, kc, xc, x.ndim)
        vals = list(invals)
        vals[1 - side] = (x * g).astype(x.dtype)
        term = low_rank_dot(interp.dropped(vals[1 - side], cur), cur, view, kc, xc, kb, xb, side)
        if term is None:
            return None
        interp.note(cur, "factored (dot_general, DoRA)")
        base = interp.bind(eqn, vals)
        return base + term.astype(base.dtype)
    dropped = interp.dropped(x, cur)
    term = low_rank_dot(dropped, cur, view, kc, xc, kb, xb, side)
    x_free = x.ndim - len(xc) - len(xb)
    arrange = lambda v: dot_vector(v, cur, view, kc, kb, side, x_free)
    kernel = (invals[side], view)
    return finish(interp, eqn, invals, 1 - side, dropped, cur, term, arrange, kernel, "dot_general")


def decomposed_conv(interp: Any, eqn: Any, invals: list, cur: Any, view: Any) -> Any:
    """A ``conv_general_dilated`` reading a kernel whose adapter has a magnitude or a bias."""
    dropped = interp.dropped(invals[0], cur)
    term = low_rank_conv(dropped, cur, view, eqn.params)
    ndim = eqn.outvars[0].aval.ndim
    arrange = lambda v: conv_vector(v, eqn.params, ndim)
    return finish(interp, eqn, invals, 0, dropped, cur, term, arrange, (invals[1], view), "conv")
