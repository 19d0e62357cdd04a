"""`LoraWeights`: the (a, b) pair of one adapted kernel, and the dense update it stands for."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from lora_jax import _paths
from lora_jax.layout import Layout

__all__ = ["LoraWeights", "delta"]


@struct.dataclass
class LoraWeights:
    """The low-rank factors of one kernel, a pytree node with children ``a`` and ``b``.

    The layout is static metadata (not a leaf), so it never becomes a traced value and
    a change of layout means a different pytree structure.

    Attributes:
        a: down-projection, shape ``(*stack, *in, rank)``.
        b: up-projection, shape ``(*stack, rank, *out)``; zeros at init.
        layout: which kernel axes `a` and `b` stand for (see `Layout`).

    Example:
        >>> import jax.numpy as jnp, lora_jax as lj
        >>> w = lj.LoraWeights(jnp.ones((4, 2)), jnp.zeros((2, 3)), lj.Layout("matrix", (0,), (1,)))
        >>> w.rank
        2
    """

    a: Any
    b: Any
    layout: Layout = struct.field(pytree_node=False)

    @property
    def rank(self) -> int:
        """The adapter rank r (last axis of `a`)."""
        return int(self.a.shape[-1])


def delta(weights: LoraWeights, scale: float, dtype: Any = None) -> jax.Array:
    """The dense kernel update ``scale * a @ b``, in the kernel's own axis order.

    Only merge/unmerge and the merged path use this; training computes the product
    factored and never forms it.

    Args:
        weights: the adapter of one kernel.
        scale: the multiplier s (`LoraConfig.scale_for`).
        dtype: dtype of the result; defaults to the adapters' dtype.

    Returns:
        An array with the kernel's shape.

    Example:
        >>> import jax.numpy as jnp, lora_jax as lj
        >>> w = lj.LoraWeights(jnp.ones((4, 1)), jnp.ones((1, 3)), lj.Layout("matrix", (0,), (1,)))
        >>> lj.delta(w, 0.5).shape
        (4, 3)
    """
    layout, a, b = weights.layout, weights.a, weights.b
    n_stack = len(layout.stack_axes)
    stack, ins, outs = a.shape[:n_stack], a.shape[n_stack:-1], b.shape[n_stack + 1 :]
    r = a.shape[-1]
    a3 = a.reshape(math.prod(stack), math.prod(ins), r)
    b3 = b.reshape(math.prod(stack), r, math.prod(outs))
    d = jnp.matmul(a3, b3, precision=jax.lax.Precision.HIGHEST) * scale
    d = d.reshape(*stack, *ins, *outs)
    inverse = [0] * layout.ndim
    for pos, axis in enumerate(layout.perm):
        inverse[axis] = pos
    d = jnp.transpose(d, inverse) if list(layout.perm) != list(range(layout.ndim)) else d
    return d.astype(dtype or a.dtype)


def to_matrix(kernel: jax.Array, layout: Layout) -> jax.Array:
    """Views a kernel as ``(prod(stack), prod(in), prod(out))`` in factor order."""
    stack, ins, outs = layout.sizes(kernel.shape)
    moved = jnp.transpose(kernel, layout.perm)
    return moved.reshape(math.prod(stack), math.prod(ins), math.prod(outs))


def flatten_lora(lora: Any) -> dict[str, LoraWeights]:
    """`{path: LoraWeights}` for a lora tree; a TypeError for anything else in it."""
    flat = _paths.flatten(lora, is_leaf=lambda x: isinstance(x, LoraWeights))
    for path, leaf in flat.items():
        if not isinstance(leaf, LoraWeights):
            raise TypeError(
                f"`lora` must hold only LoraWeights (from lora_jax.split); found "
                f"{type(leaf).__name__} at {path!r}."
            )
    return flat


def flatten_loras(loras: Any) -> list[dict[str, LoraWeights]]:
    """`flatten_lora` of each adapter in a sequence; errors name the index (`loras[i]`)."""
    flats = []
    for i, lora in enumerate(loras):
        try:
            flats.append(flatten_lora(lora))
        except TypeError as err:
            raise TypeError(f"`loras[{i}]`: {err}") from None
    return flats


def check_fits(frozen_flat: dict[str, Any], adapters: dict[str, LoraWeights]) -> None:
    """Raises a ValueError naming the path when an adapter does not fit its base kernel."""
    paths = list(frozen_flat)
    for path, w in adapters.items():
        if path not in frozen_flat:
            near = ", ".join(_paths.close_matches(path, paths, 3))
            raise ValueError(
                f"`lora` has an adapter for {path!r}, which is not a parameter of `frozen`. "
                f"Closest parameters: {near}."
            )
        shape = tuple(getattr(frozen_flat[path], "shape", ()))
        if len(shape) != w.layout.ndim:
            raise ValueError(
                f"{path}: the adapter's layout is for a {w.layout.ndim}-D kernel but the "
                f"frozen parameter has shape {shape}."
            )
        want_a, want_b = w.layout.factor_shapes(shape, w.rank)
        if tuple(w.a.shape) != want_a or tuple(w.b.shape) != want_b:
            raise ValueError(
                f"{path}: adapter shapes a={tuple(w.a.shape)}, b={tuple(w.b.shape)} do not "
                f"fit the frozen kernel {shape}; expected a={want_a}, b={want_b}."
            )
