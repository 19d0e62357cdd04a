"""`merge_many` / `unmerge_many`: several adapters folded into (and out of) one set of plain
weights, ``W ± Σ_i w_i·s_i·a_i@b_i``, for serving a fixed mix without any adapter code."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import jax

from lora_jax.core import _paths
from lora_jax.core._config import LoraConfig
from lora_jax.core._weights import check_fits, delta, flatten_loras

__all__ = ["merge_many", "unmerge_many"]


def per_adapter(loras: Sequence[Any], configs: Any, weights: Any) -> tuple[list, list, list]:
    """Flat adapters, one config and one float weight per adapter; errors name the counts."""
    k = len(loras)
    if k == 0:
        raise ValueError("`loras` is empty; give at least one adapter.")
    configs = [configs] * k if isinstance(configs, LoraConfig) else list(configs)
    weights = [1.0] * k if weights is None else list(weights)
    for name, values in (("configs", configs), ("weights", weights)):
        if len(values) != k:
            raise ValueError(f"`{name}` has {len(values)} entries but there are {k} adapters.")
    for i, c in enumerate(configs):
        if not isinstance(c, LoraConfig):
            raise TypeError(f"`configs[{i}]` must be a LoraConfig; found {type(c).__name__}.")
    for i, w in enumerate(weights):
        if isinstance(w, bool) or not isinstance(w, numbers.Real) or not math.isfinite(w):
            raise TypeError(f"`weights[{i}]` must be a finite number; found {w!r}.")
    flats = flatten_loras(loras)
    return flats, configs, [float(w) for w in weights]


def _shifted_many(tree: Any, loras: Any, configs: Any, weights: Any, sign: float) -> Any:
    flats, configs, weights = per_adapter(loras, configs, weights)
    flat = _paths.flatten(tree)
    sums: dict[str, jax.Array] = {}
    for i, adapters in enumerate(flats):
        try:
            check_fits(flat, adapters)
        except ValueError as err:
            raise ValueError(f"`loras[{i}]`: {err}") from None
        for path, w in adapters.items():
            d = delta(w, sign * weights[i] * configs[i].scale_for(path, w.rank))
            sums[path] = sums[path] + d if path in sums else d
    return _paths.replace(tree, {p: flat[p] + d.astype(flat[p].dtype) for p, d in sums.items()})


def merge_many(
    frozen: Any,
    loras: Sequence[Any],
    configs: LoraConfig | Sequence[LoraConfig],
    weights: Sequence[float] | None = None,
) -> Any:
    """Plain weights with several adapters folded in: ``W + Σ_i w_i·s_i·a_i@b_i``.

    The adapters may target different paths; each adapted kernel gets the sum of the
    updates of the adapters that have it (summed in the adapters' dtype, then cast once to
    the kernel's dtype). With one adapter and weight 1 it is `lora_jax.merge`.

    Args:
        frozen: the base from `lora_jax.split`.
        loras: the adapters.
        configs: the config of each adapter, or one config for all.
        weights: a multiplier per adapter (negative subtracts); all 1.0 by default.

    Returns:
        A pytree like `frozen`, for the unmodified ``model.apply``.

    Raises:
        ValueError: `configs` or `weights` has the wrong length, or an adapter does not fit
            `frozen` (the adapter index and path are named).
        TypeError: a weight is not a finite number, or a config is not a `LoraConfig`.

    Example:
        >>> import jax, jax.numpy as jnp, lora_jax as lj
        >>> params = {"params": {"fc": {"kernel": jnp.zeros((4, 3))}}}
        >>> config = lj.LoraConfig(rank=1, alpha=1.0, targets=".*/kernel")
        >>> w = lj.LoraWeights(jnp.ones((4, 1)), jnp.ones((1, 3)), lj.Layout("matrix", (0,), (1,)))
        >>> lora = {"params": {"fc": {"kernel": w}}}
        >>> merged = lj.merge_many(params, [lora, lora], config, weights=[0.5, 2.0])
        >>> float(merged["params"]["fc"]["kernel"][0, 0])
        2.5
    """
    return _shifted_many(frozen, loras, configs, weights, 1.0)


def unmerge_many(
    params: Any,
    loras: Sequence[Any],
    configs: LoraConfig | Sequence[LoraConfig],
    weights: Sequence[float] | None = None,
) -> Any:
    """The base back from `merge_many`'s weights: ``W' - Σ_i w_i·s_i·a_i@b_i``.

    Args:
        params: merged weights (from `merge_many`).
        loras: the adapters that were merged in.
        configs: the config of each adapter, or one config for all.
        weights: the weights they were merged with; all 1.0 by default.

    Returns:
        A pytree like `params`, equal to the base within float rounding.

    Raises:
        ValueError: `configs` or `weights` has the wrong length, or an adapter does not fit
            `params`.
        TypeError: a weight is not a finite number, or a config is not a `LoraConfig`.

    Example:
        >>> import jax, jax.numpy as jnp, lora_jax as lj
        >>> params = {"params": {"fc": {"kernel": jnp.zeros((4, 3))}}}
        >>> config = lj.LoraConfig(rank=1, alpha=1.0, targets=".*/kernel")
        >>> w = lj.LoraWeights(jnp.ones((4, 1)), jnp.ones((1, 3)), lj.Layout("matrix", (0,), (1,)))
        >>> loras = [{"params": {"fc": {"kernel": w}}}] * 2
        >>> back = lj.unmerge_many(lj.merge_many(params, loras, config), loras, config)
        >>> float(jnp.abs(back["params"]["fc"]["kernel"]).max())
        0.0
    """
    return _shifted_many(params, loras, configs, weights, -1.0)
