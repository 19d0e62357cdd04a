"""Adapters of different ranks on one stack: `pad_rank` brings an adapter to a larger rank
without changing what it computes, `trim_rank` cuts a padded one back to its own rank."""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any

import jax.numpy as jnp
import numpy as np

from lora_jax.core._paths import nest
from lora_jax.core._weights import LoraWeights, flatten_lora, is_concrete, kernel_shape

__all__ = ["pad_rank", "trim_rank"]


def _pad_one(path: str, w: LoraWeights, rank: int, scale: float | None) -> LoraWeights:
    if isinstance(w.scale, tuple):
        raise TypeError(
            f"{path}: `lora` stacks {len(w.scale)} adapters; pad each before "
            f"lj.multi.stack_adapters (lj.multi.unstack_adapter takes one out)."
        )
    if rank < w.rank:
        raise ValueError(
            f"{path}: cannot pad to rank {rank}, the adapter already has rank {w.rank}. "
            f"To lower a rank, use lj.multi.combine_adapters([lora], [1.0], "
            f"combination_type='svd', rank={rank})."
        )
    shape = kernel_shape(w)
    limit = w.layout.max_rank(shape)
    if rank > limit:
        raise ValueError(
            f"{path}: cannot pad to rank {rank}: the kernel {shape} allows at most rank "
            f"{limit} (the smaller of its flattened input and output sizes), as lj.split."
        )
    n_stack, extra = len(w.layout.stack_axes), rank - w.rank
    pad_a = [(0, 0)] * (w.a.ndim - 1) + [(0, extra)]
    pad_b = [(0, 0)] * w.b.ndim
    pad_b[n_stack] = (0, extra)
    new_scale = w.scale if scale is None else scale
    factor = w.scale / new_scale
    times = lambda x: x if x is None or factor == 1.0 else x * jnp.asarray(factor, x.dtype)
    b, bias = times(w.b), times(w.bias)  # s·(x a) b and s·bias unchanged (DoRA's m is not scaled)
    return dataclasses.replace(
        w, a=jnp.pad(w.a, pad_a), b=jnp.pad(b, pad_b), scale=new_scale, bias=bias
    )


def pad_rank(lora: Any, rank: int, *, scale: float | None = None) -> dict[str, Any]:
    """Every adapter padded with zeros to `rank`, computing what it computed before.

    ``a`` gets zero columns and ``b`` zero rows, so ``a @ b`` is unchanged. Each adapter
    keeps its scale and nothing is rounded: the original values are kept bit for bit, and
    outputs and `lora_jax.merge` equal the original's (bit for bit where XLA sums the
    longer rank axis in the same order, else to within that summation order). With
    `scale`, every adapter gets that scale instead and ``b`` is multiplied by
    ``old_scale / scale``: the same outputs up to rounding (``b`` is rounded once when the
    factor is not a power of two). Adapters of ranks 4, 8 and 16 padded to 16 then share
    one compiled `lora_apply`, and `stack_adapters` accepts them (stacking keeps each
    adapter's scale, so `scale` is rarely needed).

    Args:
        lora: adapters (a tree of `LoraWeights`, not stacked).
        rank: the new rank of every adapter, at least each one's current rank and at most
            its kernel's largest rank.
        scale: the scale the padded adapters carry; each keeps its own by default.

    Returns:
        A nested dict like `lora`, with ``a`` of shape ``(*stack, *in, rank)`` and ``b`` of
        shape ``(*stack, rank, *out)``.

    Raises:
        ValueError: `rank` is below an adapter's current rank or above its kernel's largest
            rank, or `scale` is zero (the path is named).
        TypeError: `lora` holds stacked adapters or something other than `LoraWeights`,
            `rank` is not an int, or `scale` is not a finite number.

    Example:
        >>> import jax, jax.numpy as jnp, lora_jax as lj
        >>> params = {"params": {"fc": {"kernel": jnp.ones((8, 6))}}}
        >>> config = lj.LoraConfig(rank=2, alpha=4.0, targets=".*/kernel")
        >>> _, lora = lj.split(params, config, key=jax.random.key(0))
        >>> w = lj.multi.pad_rank(lora, 4)["params"]["fc"]["kernel"]
        >>> w.a.shape, w.scale
        ((8, 4), 2.0)
    """
    if isinstance(rank, bool) or not isinstance(rank, numbers.Integral):
        raise TypeError(f"`rank` must be an int; found {rank!r}.")
    if scale is not None:
        if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
            raise TypeError(f"`scale` must be a finite number or None; found {scale!r}.")
        if not math.isfinite(scale) or scale == 0:
            raise ValueError(f"`scale` must be finite and non-zero; found {scale!r}.")
        scale = float(scale)
    padded = {path: _pad_one(path, w, int(rank), scale) for path, w in flatten_lora(lora).items()}
    return nest(padded)


def _trim_one(path: str, w: LoraWeights, rank: int) -> LoraWeights:
    if isinstance(w.scale, tuple):
        raise TypeError(
            f"{path}: `lora` stacks {len(w.scale)} adapters; trim one at a time "
            f"(lj.multi.unstack_adapter takes one out)."
        )
    if not 1 <= rank <= w.rank:
        raise ValueError(f"{path}: cannot trim to rank {rank}: the adapter has rank {w.rank}.")
    n_stack = len(w.layout.stack_axes)
    keep_b = (slice(None),) * n_stack + (slice(0, rank),)
    drop_b = (slice(None),) * n_stack + (slice(rank, None),)
    for name, dropped in (("a", w.a[..., rank:]), ("b", w.b[drop_b])):
        if is_concrete(dropped) and np.any(np.asarray(dropped) != 0):
            raise ValueError(
                f"{path}: the {name} entries beyond rank {rank} are not zero (largest "
                f"{float(np.abs(np.asarray(dropped)).max()):.3g}), so trimming would change "
                f"the adapter; only padding (lj.multi.pad_rank) can be trimmed."
            )
    return dataclasses.replace(w, a=w.a[..., :rank], b=w.b[keep_b])


def trim_rank(lora: Any, rank: int) -> dict[str, Any]:
    """Every adapter cut back to `rank`, the inverse of `pad_rank` (same scale).

    The padding `pad_rank` adds (zero columns of ``a``, zero rows of ``b``) stays exactly
    zero when the adapter trains in a stack (`lora_jax.multi.make_train_step`): its
    gradient is zero. Trimming it gives the adapter at its own rank, bit for bit what the
    padded one computes, ready for `lora_jax.save_adapter` or a PEFT export.

    Args:
        lora: adapters (a tree of `LoraWeights`, not stacked), e.g. from
            `lora_jax.multi.unstack_adapter`.
        rank: the rank to keep, ``1 <= rank <=`` each adapter's rank.

    Returns:
        A nested dict like `lora`, with ``a`` of shape ``(*stack, *in, rank)`` and ``b`` of
        shape ``(*stack, rank, *out)``.

    Raises:
        ValueError: `rank` is out of range, or an adapter's entries beyond `rank` are not
            zero (the path is named; checked when the values are concrete).
        TypeError: `lora` holds stacked adapters, or `rank` is not an int.

    Example:
        >>> import jax, jax.numpy as jnp, lora_jax as lj
        >>> params = {"w": jnp.ones((8, 6))}
        >>> _, lora = lj.split(params, lj.LoraConfig(rank=2, targets="w"), key=jax.random.key(0))
        >>> back = lj.multi.trim_rank(lj.multi.pad_rank(lora, 4), 2)
        >>> back["w"].a.shape, bool((back["w"].a == lora["w"].a).all())
        ((8, 2), True)
    """
    if isinstance(rank, bool) or not isinstance(rank, numbers.Integral):
        raise TypeError(f"`rank` must be an int; found {rank!r}.")
    return nest({path: _trim_one(path, w, int(rank)) for path, w in flatten_lora(lora).items()})
