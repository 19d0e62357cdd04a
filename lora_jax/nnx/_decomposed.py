"""DoRA and ``lora_bias`` on an NNX layer that carries its adapter in place
(`lora_jax.nnx._layers`): the same formulas as the contraction rewrite
(`lora_jax.core._decomposed`), on a layer's own call, whose output features are its
trailing axes (`nnx.Linear`, `nnx.LinearGeneral`, `nnx.Conv`, `nnx.Embed`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lora_jax.core._dora import dora_gain, dora_kernel, dora_output
from lora_jax.core._weights import LoraWeights, delta

__all__ = ["finish", "gain", "merge_into", "own_bias"]


def gain(module: Any) -> Any:
    """DoRA's ``m / ‖W + s·a@b‖`` of a layer's adapter, float32 ``(*out)``."""
    kernel = getattr(module, module.lora_target).get_value()
    a, b = module.lora_a.get_value(), module.lora_b.get_value()
    magnitude = module.lora_magnitude.get_value()
    return dora_gain(kernel, a, b, module.lora_layout, module.lora_scale, magnitude)


def own_bias(module: Any) -> Any:
    """The layer's own bias value, or None."""
    bias = getattr(module, "bias", None)
    return None if bias is None else bias.get_value()


def finish(module: Any, y: Any, x: Any, dropped: Any, term: Any, base: Callable[[Any], Any]) -> Any:
    """The layer's output `y` (on input `x`) with its adapter's low-rank `term` (computed on
    `dropped`, the input after LoRA dropout): plus ``s·bias`` for a lora_bias; rescaled
    by DoRA's gain, PEFT's way (`base` runs the layer itself on another input)."""
    if module.lora_bias is not None:
        term = term + (module.lora_scale * module.lora_bias.get_value()).astype(term.dtype)
    if module.lora_magnitude is None:
        return y + term.astype(y.dtype)
    g = gain(module)
    bias = own_bias(module)
    unbiased = lambda v: v if bias is None else v - bias.astype(v.dtype)
    z_dropped = None if dropped is x else unbiased(base(dropped))
    out = dora_output(g, unbiased(y), term, z_dropped)
    return (out if bias is None else out + bias.astype(out.dtype)).astype(y.dtype)


def merge_into(module: Any, w: LoraWeights) -> None:
    """Folds a layer's adapter `w` into its kernel (DoRA's gain too) and a lora_bias into
    its bias, in place, as `lora_jax.merge` does to a tree."""
    kernel = getattr(module, module.lora_target)
    value = kernel.get_value()
    if w.magnitude is not None:
        merged = dora_kernel(value, w.a, w.b, w.layout, float(w.scale), w.magnitude)  # type: ignore[arg-type]
        kernel.set_value(merged.astype(value.dtype))
    else:
        kernel.set_value(value + delta(w, value.dtype))
    if w.bias is not None:
        bias = getattr(module, "bias", None)
        if bias is None:
            raise ValueError(
                f"{type(module).__name__}: its adapter trains a lora_bias, which merges into "
                f"the layer's bias, but the layer has none; remove it without merge=True."
            )
        bias.set_value(bias.get_value() + (w.scale * w.bias).astype(bias.get_value().dtype))
