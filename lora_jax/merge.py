"""`merge` / `unmerge`: fold adapters into plain weights for serving, and take them out again."""

from __future__ import annotations

from typing import Any

from lora_jax import _paths
from lora_jax.config import LoraConfig
from lora_jax.weights import check_fits, delta, flatten_lora

__all__ = ["merge", "unmerge"]


def _shifted(tree: Any, lora: Any, config: LoraConfig, sign: float) -> Any:
    flat = _paths.flatten(tree)
    adapters = flatten_lora(lora)
    check_fits(flat, adapters)
    new = {}
    for path, w in adapters.items():
        kernel = flat[path]
        d = delta(w, sign * config.scale_for(path, w.rank), kernel.dtype)
        new[path] = kernel + d
    return _paths.replace(tree, new)


def merge(frozen: Any, lora: Any, config: LoraConfig) -> Any:
    """Plain weights with the adapters folded in: ``W + s·a@b`` at every adapted path.

    The result has the structure of `frozen` and works with the unmodified
    ``model.apply``. Each merged kernel keeps its dtype (the update is cast to it).

    Args:
        frozen: the base from `lora_jax.split`.
        lora: the adapters from `lora_jax.split` (possibly trained).
        config: the config the adapters were made with (it gives the scales).

    Returns:
        A pytree like `frozen`.

    Raises:
        ValueError: an adapter path or shape does not fit `frozen`.
        TypeError: `lora` holds something other than `LoraWeights`.

    Example:
        >>> import jax, jax.numpy as jnp, lora_jax as lj
        >>> params = {"params": {"fc": {"kernel": jnp.ones((4, 3))}}}
        >>> config = lj.LoraConfig(rank=2, targets=".*/kernel")
        >>> frozen, lora = lj.split(params, config, key=jax.random.key(0))
        >>> bool((lj.merge(frozen, lora, config)["params"]["fc"]["kernel"] == 1.0).all())
        True
    """
    return _shifted(frozen, lora, config, 1.0)


def unmerge(params: Any, lora: Any, config: LoraConfig) -> Any:
    """The base back from merged weights: ``W' - s·a@b`` at every adapted path.

    Args:
        params: merged weights (from `merge`).
        lora: the adapters that were merged in.
        config: the config the adapters were made with.

    Returns:
        A pytree like `params`, equal to the original base within float rounding.

    Raises:
        ValueError: an adapter path or shape does not fit `params`.
        TypeError: `lora` holds something other than `LoraWeights`.

    Example:
        >>> import jax, jax.numpy as jnp, lora_jax as lj
        >>> params = {"params": {"fc": {"kernel": jnp.ones((4, 3))}}}
        >>> config = lj.LoraConfig(rank=2, targets=".*/kernel", init="pissa")
        >>> frozen, lora = lj.split(params, config, key=jax.random.key(0))
        >>> merged = lj.merge(frozen, lora, config)
        >>> back = lj.unmerge(merged, lora, config)
        >>> kernel = frozen["params"]["fc"]["kernel"]
        >>> bool(jnp.allclose(back["params"]["fc"]["kernel"], kernel, atol=1e-6))
        True
    """
    return _shifted(params, lora, config, -1.0)
