"""Merging adapters into a quantized base: the float merge, and optionally each adapted
kernel quantized again in its own format, with the error that cost."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax

from lora_jax.core._merge import merge as merge_float
from lora_jax.core._paths import flatten, replace
from lora_jax.core._weights import flatten_lora
from lora_jax.quant._kernel import is_quantized, quantize_kernel
from lora_jax.quant._tree import errors as measure

__all__ = ["Merged", "merge"]

_requantize = jax.jit(quantize_kernel, static_argnames=("format", "axis", "group_size", "double"))


class Merged(NamedTuple):
    """What `lora_jax.quant.merge` returns.

    Attributes:
        params: the merged params tree.
        errors: ``{path: {"max_abs": float, "max_rel": float}}`` for each requantized
            kernel, against the exact float merge; empty without requantizing.

    Example:
        >>> import jax.numpy as jnp, lora_jax as lj
        >>> lj.quant.Merged({"w": jnp.ones((2, 2))}, {}).errors
        {}
    """

    params: Any
    errors: dict[str, dict[str, float]]


def merge(frozen: Any, lora: Any, *, requantize: bool = False) -> Merged:
    """Folds adapters into a (partly) quantized base: ``dequantize(Q) + s·a@b``.

    Without `requantize`, `params` is `lora_jax.merge` (each adapted quantized kernel comes
    back float, in its own dtype). With it, each adapted kernel that was quantized is
    quantized again in its own format, grouped axis, group size and double quantization
    (fresh scales, as PEFT's merge into a 4-bit layer), and `errors` reports what that
    rounding cost against the float merge. Kernels without an adapter are untouched.

    Args:
        frozen: the base, with `QuantizedKernel`s (from `lora_jax.quant.quantize` or
            `lora_jax.quant.loftq`).
        lora: the adapters.
        requantize: quantize the merged kernels again.

    Returns:
        ``Merged(params, errors)``: `errors` is ``{path: {"max_abs": max |dequantize(Q') -
        merged|, "max_rel": max_abs / max |merged|}}`` for each requantized kernel, ``{}``
        without `requantize`.

    Raises:
        ValueError: an adapter's path is not in `frozen` or does not fit its kernel.
        TypeError: `lora` holds something other than `LoraWeights`, or stacked adapters.

    Example:
        >>> import jax, lora_jax as lj
        >>> w = jax.random.normal(jax.random.key(0), (128, 64))
        >>> config = lj.LoraConfig(rank=4, targets="fc/kernel")
        >>> frozen, lora = lj.quant.loftq({"fc": {"kernel": w}}, config, key=jax.random.key(1))
        >>> merged = lj.quant.merge(frozen, lora, requantize=True)
        >>> merged.params["fc"]["kernel"]
        QuantizedKernel(nf4, shape=(128, 64), float32, axis=0, group_size=64)
        >>> 0 < merged.errors["fc/kernel"]["max_rel"] < 0.1
        True
    """
    params = merge_float(frozen, lora)
    if not requantize:
        return Merged(params, {})
    before = flatten(frozen)
    merged = flatten(params)
    floats, new = {}, {}
    for path in flatten_lora(lora):
        q = before[path]
        if not is_quantized(q):
            continue
        floats[path] = merged[path]
        new[path] = _requantize(
            merged[path], q.format, axis=q.axis, group_size=q.group_size, double=q.double
        )
    return Merged(replace(params, new), measure(floats, new))
