"""Adapters next to their kernels in the ``params`` collection, seen from inside a layer.

For the duration of one call, each adapter of a ``params`` kernel rides beside it as two
extra leaves (``<name>:lora_a``, ``<name>:lora_b``), so `nn.scan`, `nn.vmap` and `nn.remat`
slice them exactly like the kernel; an interceptor (`flax.linen.intercept_methods`) finds
them from the layer it intercepts. Shared by `lora_apply` and `lora_apply_mixed`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lora_jax.core._config import DROPOUT_RNG
from lora_jax.linen._sites import Site, kernel_path, site

__all__ = [
    "A_SUFFIX",
    "B_SUFFIX",
    "adapted",
    "check_variables",
    "dropout",
    "dropout_rates",
    "inject",
]

A_SUFFIX, B_SUFFIX = ":lora_a", ":lora_b"


def inject(frozen: Mapping, entries: Mapping[str, Any]) -> dict:
    """A shallow copy of `frozen` with extra leaves at the given paths (no array copies)."""
    out = dict(frozen)
    for path, value in entries.items():
        node, parts = out, path.split("/")
        for name in parts[:-1]:
            node[name] = dict(node[name])
            node = node[name]
        node[parts[-1]] = value
    return out


def dropout(module: nn.Module, path: str, x: jax.Array, rate: float) -> jax.Array:
    """Inverted dropout on the low-rank path's input, from the ``lora_dropout`` stream."""
    if not module.has_rng(DROPOUT_RNG):
        raise ValueError(
            f"{path}: LoRA dropout is on but this layer cannot see the {DROPOUT_RNG!r} rng "
            f"stream. Inside nn.scan/nn.vmap add {DROPOUT_RNG!r} to `split_rngs`."
        )
    keep = jax.random.bernoulli(module.make_rng(DROPOUT_RNG), 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


def layer_input(module: nn.Module, path: str, x: Any, dtype: Any, rate: float) -> Any:
    """The low-rank path's input: a float input cast to the layer output's dtype, with LoRA
    dropout at `rate` (integer inputs, such as token ids, pass unchanged)."""
    if not jnp.issubdtype(x.dtype, jnp.floating):
        return x
    x = x.astype(dtype)
    return dropout(module, path, x, rate) if rate > 0.0 else x


def adapted(
    context: Any, args: tuple, kwargs: dict
) -> tuple[nn.Module, Site, Any, Any, str, Any] | None:
    """``(module, site, a, b, kernel path, input)`` of an intercepted call to a supported
    layer that carries an adapter; None for any other call."""
    module = context.module
    found = site(module, context.method_name, args, kwargs)
    if found is None:
        return None
    a = module.scope.get_variable("params", found.param + A_SUFFIX)
    b = module.scope.get_variable("params", found.param + B_SUFFIX)
    if a is None or b is None:
        return None
    x = args[0] if args else kwargs[found.input_name]
    return module, found, a, b, kernel_path(module, found.param), x


def check_variables(apply_fn: Callable[..., Any], frozen: Any, paths: list[str]) -> None:
    """A linen ``model.apply`` needs a variables dict with a ``params`` collection; say so
    instead of Flax's ScopeCollectionNotFound deep inside the model."""
    owner = getattr(apply_fn, "__self__", None)
    if not isinstance(owner, nn.Module):
        return
    if not isinstance(frozen, Mapping) or "params" not in frozen:
        keys = list(frozen)[:5] if isinstance(frozen, Mapping) else type(frozen).__name__
        raise ValueError(
            f"`frozen` has no 'params' collection (found {keys}), but "
            f"{type(owner).__name__}.apply takes the variables dict that "
            f"model.init returns, {{'params': ...}}. Split that dict: "
            f"lj.split(variables, config, key=...), not variables['params']."
        )


def dropout_rates(
    rates: Mapping[str, float], kwargs: Mapping[str, Any], deterministic: bool
) -> dict[str, float]:
    """The dropout rate each adapter runs with in this call.

    Adapters carry their rate; it runs when the call has the ``lora_dropout`` rng. An
    adapter with a rate but no rng in a non-deterministic call is a warning (it would
    otherwise silently train without dropout)."""
    rngs = kwargs.get("rngs")
    has_rng = isinstance(rngs, Mapping) and DROPOUT_RNG in rngs
    if deterministic:
        return {p: 0.0 for p in rates}
    wanting = sorted(p for p, r in rates.items() if r > 0.0)
    if wanting and not has_rng:
        warnings.warn(
            f"{len(wanting)} adapter(s) have LoRA dropout (e.g. {wanting[0]!r}, rate "
            f"{rates[wanting[0]]}) but the call has no {DROPOUT_RNG!r} rng, so no dropout "
            f"runs. Pass rngs={{{DROPOUT_RNG!r}: key}} to train with it, or make the apply "
            f"function with deterministic=True for evaluation.",
            stacklevel=4,
        )
    return {p: r if has_rng else 0.0 for p, r in rates.items()}
