"""`merge_many` / `unmerge_many`: several adapters folded into (and out of) one set of plain
weights, ``W ± Σ_i w_i·s_i·a_i@b_i``, for serving a fixed mix without any adapter code.
Each adapter's scale s_i is its own (`LoraWeights.scale`)."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import jax

from lora_jax.core._paths import flatten, replace
from lora_jax.core._weights import LoraWeights, check_fits, flatten_loras, scaled_delta

__all__ = ["merge_many", "unmerge_many"]


def weighted_adapters(
    loras: Sequence[Any], weights: Sequence[float] | None
) -> tuple[list[dict[str, LoraWeights]], list[float]]:
    """``({path: LoraWeights} per adapter, one float weight per adapter)``, checked: at least
    one adapter, one finite weight each (all 1.0 for None), no stacked adapters."""
    k = len(loras)
    if k == 0:
        raise ValueError("`loras` is empty; give at least one adapter.")
    weights = [1.0] * k if weights is None else list(weights)
    if len(weights) != k:
        raise ValueError(f"`weights` has {len(weights)} entries but there are {k} adapters.")
    for i, x in enumerate(weights):
        if isinstance(x, bool) or not isinstance(x, numbers.Real) or not math.isfinite(x):
            raise TypeError(f"`weights[{i}]` must be a finite number; found {x!r}.")
    flats = flatten_loras(loras)
    for i, flat in enumerate(flats):
        for path, w in flat.items():
            if w.magnitude is not None or w.bias is not None:
                what = "DoRA" if w.magnitude is not None else "lora_bias"
                raise ValueError(
                    f"`loras[{i}]` at {path!r} is a {what} adapter; lj.multi stacks, merges and "
                    f"combines plain LoRA adapters only (a {what} output is not a sum of "
                    f"low-rank terms). Merge it alone with lj.merge, or serve it with "
                    f"lj.lora_apply."
                )
            if isinstance(w.scale, tuple):
                raise TypeError(
                    f"`loras[{i}]` at {path!r} stacks {len(w.scale)} adapters "
                    f"(lj.multi.stack_adapters); pass them one by one "
                    f"(lj.multi.unstack_adapter(stacked, i))."
                )
    return flats, [float(x) for x in weights]


def _shifted_many(tree: Any, loras: Any, weights: Any, sign: float) -> Any:
    flats, weights = weighted_adapters(loras, weights)
    flat = flatten(tree)
    sums: dict[str, jax.Array] = {}
    for i, adapters in enumerate(flats):
        try:
            check_fits(flat, adapters, residuals=sign > 0)
        except ValueError as err:
            raise ValueError(f"`loras[{i}]`: {err}") from None
        for path, w in adapters.items():
            d = scaled_delta(w, sign * weights[i] * w.scale)
            sums[path] = sums[path] + d if path in sums else d
    return replace(tree, {p: flat[p] + d.astype(flat[p].dtype) for p, d in sums.items()})


def merge_many(frozen: Any, loras: Sequence[Any], weights: Sequence[float] | None = None) -> Any:
    """Plain weights with several adapters folded in: ``W + Σ_i w_i·s_i·a_i@b_i``.

    Each adapter brings its own scale s_i, so adapters of different ranks and alphas mix
    freely. The adapters may target different paths; each adapted kernel gets the sum of
    the updates of the adapters that have it (summed in the adapters' dtype, then cast
    once to the kernel's dtype). With one adapter and weight 1 it is `lora_jax.merge`.

    Args:
        frozen: the base from `lora_jax.split`.
        loras: the adapters (one `LoraWeights` tree each, not stacked).
        weights: a multiplier per adapter (negative subtracts); all 1.0 by default.

    Returns:
        A pytree like `frozen`, for the unmodified ``model.apply``.

    Raises:
        ValueError: `loras` is empty, `weights` has the wrong length, or an adapter does
            not fit `frozen` (the adapter index and path are named).
        TypeError: a weight is not a finite number, or an entry holds stacked adapters or
            something other than `LoraWeights`.

    Example:
        >>> import jax.numpy as jnp, lora_jax as lj
        >>> params = {"params": {"fc": {"kernel": jnp.zeros((4, 3))}}}
        >>> layout = lj.Layout("matrix", (0,), (1,))
        >>> adapter = lambda s: lj.LoraWeights(jnp.ones((4, 1)), jnp.ones((1, 3)), layout, scale=s)
        >>> one, two = ({"params": {"fc": {"kernel": adapter(s)}}} for s in (1.0, 2.0))
        >>> merged = lj.multi.merge_many(params, [one, two], weights=[0.5, 1.0])
        >>> float(merged["params"]["fc"]["kernel"][0, 0])
        2.5
    """
    return _shifted_many(frozen, loras, weights, 1.0)


def unmerge_many(params: Any, loras: Sequence[Any], weights: Sequence[float] | None = None) -> Any:
    """The base back from `merge_many`'s weights: ``W' - Σ_i w_i·s_i·a_i@b_i``.

    Args:
        params: merged weights (from `merge_many`).
        loras: the adapters that were merged in.
        weights: the weights they were merged with; all 1.0 by default.

    Returns:
        A pytree like `params`, equal to the base within float rounding.

    Raises:
        ValueError: `loras` is empty, `weights` has the wrong length, or an adapter does
            not fit `params`.
        TypeError: a weight is not a finite number, or an entry holds stacked adapters or
            something other than `LoraWeights`.

    Example:
        >>> import jax.numpy as jnp, lora_jax as lj
        >>> params = {"params": {"fc": {"kernel": jnp.zeros((4, 3))}}}
        >>> layout = lj.Layout("matrix", (0,), (1,))
        >>> w = lj.LoraWeights(jnp.ones((4, 1)), jnp.ones((1, 3)), layout, scale=0.5)
        >>> loras = [{"params": {"fc": {"kernel": w}}}] * 2
        >>> back = lj.multi.unmerge_many(lj.multi.merge_many(params, loras), loras)
        >>> float(jnp.abs(back["params"]["fc"]["kernel"]).max())
        0.0
    """
    return _shifted_many(params, loras, weights, -1.0)
