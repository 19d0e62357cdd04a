"""`lora_apply_mixed` for either framework: a linen ``model.apply`` (or any function of a
params tree) or an NNX graphdef. Kept apart so `lora_jax.linen` and `lora_jax.nnx` never
import each other."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flax import nnx

from lora_jax.linen._mixed import lora_apply_mixed as linen_mixed
from lora_jax.nnx._mixed import lora_apply_mixed as nnx_mixed

__all__ = ["lora_apply_mixed"]


def lora_apply_mixed(
    apply_fn: Callable[..., Any] | nnx.GraphDef, *, deterministic: bool = False
) -> Callable[..., Any]:
    """Runs each example of a batch with its own adapter of k stacked ones, in one call.

    For a Flax linen ``model.apply`` or a plain function see
    `lora_jax.linen.lora_apply_mixed`; for an NNX graphdef,
    ``apply(frozen, stacked, adapter_ids, *args, rngs=None, method="__call__")`` runs the
    model through the contraction rewrite (every contraction that reads an adapted kernel
    adds each example's own term). Each example's output equals running it alone with its
    adapter; an id of -1 runs the plain base.

    Args:
        apply_fn: the model's apply function, a function of a params tree, or an
            ``nnx.GraphDef``.
        deterministic: never run LoRA dropout (evaluation).

    Returns:
        ``apply(frozen, stacked, adapter_ids, *args, **kwargs)``.

    Example:
        >>> import jax, jax.numpy as jnp, lora_jax as lj
        >>> params = {"w": jnp.ones((4, 3))}
        >>> fn = lambda p, x: x @ p["w"]
        >>> lora = lj.split(params, lj.LoraConfig(rank=1, targets="w"), key=jax.random.key(0))[1]
        >>> stacked = lj.multi.stack_adapters([lora, lora])
        >>> apply = lj.multi.lora_apply_mixed(fn)
        >>> apply(params, stacked, jnp.array([0, -1]), jnp.ones((2, 4))).shape
        (2, 3)
    """
    if isinstance(apply_fn, nnx.GraphDef):
        return nnx_mixed(apply_fn, deterministic=deterministic)
    return linen_mixed(apply_fn, deterministic=deterministic)
