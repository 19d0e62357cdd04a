"""DoRA's weight norm, computed factored: ``‖W + s·a@b‖`` per output feature (over the input
axes) without forming ``W + s·a@b``, and the vectors of one value per output feature
(DoRA's magnitude, ``lora_bias``) laid out against a kernel."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from lora_jax.core._layout import Layout
from lora_jax.core._weights import LoraWeights, scaled_delta, to_matrix

__all__ = ["dora_gain", "dora_kernel", "dora_output", "out_shape", "per_output", "weight_norm"]

_HIGHEST = lax.Precision.HIGHEST


def out_shape(b_shape: tuple[int, ...], layout: Layout) -> tuple[int, ...]:
    """The shape of a vector of one value per output feature, ``(*stack, *out)``: `b`'s shape
    without its rank axis."""
    n = len(layout.stack_axes)
    return tuple(b_shape[:n]) + tuple(b_shape[n + 1 :])


def weight_norm(kernel: Any, a: Any, b: Any, layout: Layout, scale: float) -> jax.Array:
    """``‖W + s·a@b‖₂`` over the input axes, shape ``(*stack, *out)``, in float32.

    Factored: per output column j, ``‖W_j‖² + 2s·(Wᵀa)_j·b_j + s²·b_jᵀ(aᵀa)b_j``: one pass
    over W (the squares and ``Wᵀa``, ``in·out·r`` multiply-adds, as PEFT's ``B@A``) and
    nothing kernel-sized is formed besides. No gradient flows through it (DoRA's §4.3).

    Args:
        kernel: the base kernel (its own axis order).
        a: ``(*stack, *in, r)``.
        b: ``(*stack, r, *out)``.
        layout: the adapter's layout.
        scale: the low-rank multiplier s.
    """
    kernel, a, b = (lax.stop_gradient(x) for x in (kernel, a, b))
    w = to_matrix(kernel, layout)  # (S, in, out), in the kernel's dtype
    r = a.shape[-1]
    a3 = a.astype(jnp.float32).reshape(w.shape[0], w.shape[1], r)
    b3 = b.astype(jnp.float32).reshape(w.shape[0], r, w.shape[2])
    if jnp.dtype(w.dtype).itemsize < 4:
        # A bf16/f16 base: contract it as stored with float32 accumulation (a product of two
        # such values is exact in float32), so no float32 copy of W is made.
        f32 = jnp.float32
        w_sq = jnp.einsum("sio,sio->so", w, w, preferred_element_type=f32)
        wa = jnp.einsum("sio,sir->sor", w, a3.astype(w.dtype), preferred_element_type=f32)
    else:
        w = w.astype(jnp.float32)
        w_sq = jnp.sum(jnp.square(w), axis=1)
        wa = jnp.einsum("sio,sir->sor", w, a3, precision=_HIGHEST)
    gram = jnp.einsum("sir,siq->srq", a3, a3, precision=_HIGHEST)
    cross = jnp.einsum("sor,sro->so", wa, b3, precision=_HIGHEST)
    low = jnp.einsum("sro,srq,sqo->so", b3, gram, b3, precision=_HIGHEST)
    squared = w_sq + 2.0 * scale * cross + scale * scale * low
    norm = jnp.sqrt(jnp.maximum(squared, 0.0))
    return norm.reshape(out_shape(tuple(b.shape), layout))


def per_output(v: Any, layout: Layout) -> Any:
    """A ``(*stack, *out)`` vector as an array that broadcasts against the kernel (size 1
    along the input axes), in the kernel's own axis order."""
    n_in = len(layout.in_axes)
    n = len(layout.stack_axes)
    expanded = v.reshape(v.shape[:n] + (1,) * n_in + v.shape[n:])
    inverse = [0] * layout.ndim
    for pos, axis in enumerate(layout.perm):
        inverse[axis] = pos
    return jnp.transpose(expanded, inverse)


def dora_kernel(kernel: Any, a: Any, b: Any, layout: Layout, scale: float, magnitude: Any) -> Any:
    """The DoRA kernel ``m / ‖W + s·a@b‖ · (W + s·a@b)`` (per output feature), in float32:
    what merging folds in, and what a use that cannot be factored reads."""
    w = LoraWeights(a, b, layout, scale=1.0)
    full = kernel.astype(jnp.float32) + scaled_delta(w, scale, jnp.float32)
    return full * per_output(dora_gain(kernel, a, b, layout, scale, magnitude), layout)


def dora_gain(kernel: Any, a: Any, b: Any, layout: Layout, scale: float, magnitude: Any) -> Any:
    """DoRA's gain ``m / ‖W + s·a@b‖``, float32 ``(*stack, *out)``; no gradient reaches the
    norm (`weight_norm`)."""
    return magnitude.astype(jnp.float32) / weight_norm(kernel, a, b, layout, scale)


def dora_output(g: Any, base: Any, term: Any, base_dropped: Any = None) -> Any:
    """A DoRA layer's output from its parts, in float32, as PEFT computes it: ``g·(W x +
    term)``, or while LoRA dropout runs ``W x + (g - 1)·W x' + g·term`` (`base_dropped` is
    ``W x'``, the base on the dropped input the term was computed on)."""
    base, term = base.astype(jnp.float32), term.astype(jnp.float32)
    if base_dropped is None:
        return g * (base + term)
    return base + (g - 1.0) * base_dropped.astype(jnp.float32) + g * term
