"""`merge` / `unmerge`: fold adapters into plain weights for serving, and take them out again."""

from __future__ import annotations

from typing import Any

from lora_jax.core._dora import dora_kernel
from lora_jax.core._packed import unpack
from lora_jax.core._paths import flatten, replace
from lora_jax.core._weights import check_fits, flatten_lora, scaled_delta

__all__ = ["merge", "unmerge"]


def _shifted(tree: Any, lora: Any, sign: float) -> Any:
    adapters = flatten_lora(lora)
    # a packed (quantized) kernel is merged as its float value: the result is float there
    flat = {p: unpack(v) if p in adapters else v for p, v in flatten(tree).items()}
    for path, w in adapters.items():
        if isinstance(w.scale, tuple):
            raise TypeError(
                f"{path}: `lora` stacks {len(w.scale)} adapters (lj.multi.stack_adapters); "
                f"merge one with lj.multi.unstack_adapter(stacked, i), or several with "
                f"lj.multi.merge_many."
            )
    check_fits(flat, adapters, residuals=sign > 0)
    new = {}
    for path, w in adapters.items():
        kernel = flat[path]
        if w.magnitude is not None:
            if sign < 0:
                raise ValueError(
                    f"{path}: a DoRA adapter cannot be taken out of merged weights: merging "
                    f"rescales each output feature by m / ‖W + s·a@b‖, and that norm of the "
                    f"original W is not recoverable from the merged kernel (whose norms are "
                    f"m). Keep the base (`frozen`, never changed by lj) instead."
                )
            merged = dora_kernel(kernel, w.a, w.b, w.layout, w.scale, w.magnitude)  # type: ignore[arg-type]
            new[path] = merged.astype(kernel.dtype)
        else:
            new[path] = kernel + scaled_delta(w, sign * w.scale, kernel.dtype)  # type: ignore[operator]
        if w.bias is not None:
            new.update(_bias_update(flat, path, w, sign))
    return replace(tree, new)


def _bias_update(flat: dict[str, Any], path: str, w: Any, sign: float) -> dict[str, Any]:
    """``{bias path: bias ± s·lora_bias}`` for the base bias beside an adapted kernel (as
    PEFT merges ``lora_bias``); a ValueError naming the path when there is none that fits."""
    bias_path = path.rsplit("/", 1)[0] + "/bias"
    found = flat.get(bias_path)
    want = tuple(w.bias.shape)
    if found is None or tuple(getattr(found, "shape", ())) != want:
        what = "none" if found is None else f"shape {tuple(found.shape)}"
        raise ValueError(
            f"{path}: the adapter trains a lora_bias, which merges into the layer's bias "
            f"{bias_path!r} of shape {want}; found {what}. PEFT cannot merge it either: serve "
            f"the adapter unmerged (lj.lora_apply)."
        )
    return {bias_path: found + (sign * w.scale * w.bias).astype(found.dtype)}


def merge(frozen: Any, lora: Any) -> Any:
    """Plain weights with the adapters folded in: ``W + s·a@b`` at every adapted path.

    Each adapter's scale s is its own (`LoraWeights.scale`). The result has the structure
    of `frozen` (a Flax variables dict, an ``nnx.State`` or any pytree) and works with the
    unmodified ``model.apply``. Each merged kernel keeps its dtype (the update is cast to
    it); a quantized kernel (`lora_jax.quant`) is merged as its float value and comes back
    float (`lora_jax.quant.merge` requantizes it and reports the error).

    Args:
        frozen: the base from `lora_jax.split` (for PiSSA, the residual base it returned).
        lora: the adapters.

    Returns:
        A new params tree; `frozen` is not modified.

    Raises:
        ValueError: an adapter's path is not in `frozen`, its shapes do not fit the kernel,
            or a PiSSA adapter meets the original weights instead of its residual base.
        TypeError: `lora` holds something other than `LoraWeights`, or stacked adapters.

    Example:
        >>> import jax, jax.numpy as jnp, lora_jax as lj
        >>> params = {"params": {"fc": {"kernel": jnp.ones((4, 3))}}}
        >>> config = lj.LoraConfig(rank=2, targets=".*/kernel")
        >>> frozen, lora = lj.split(params, config, key=jax.random.key(0))
        >>> bool((lj.merge(frozen, lora)["params"]["fc"]["kernel"] == 1.0).all())
        True
    """
    return _shifted(frozen, lora, 1.0)


def unmerge(params: Any, lora: Any) -> Any:
    """Takes adapters back out of merged weights: ``W - s·a@b`` at every adapted path.

    Args:
        params: weights produced by `merge` with the same adapters.
        lora: the adapters that were merged in.

    Returns:
        The base (equal to the original `frozen` up to floating-point rounding).

    Raises:
        ValueError: an adapter's path is not in `params` or its shapes do not fit.
        TypeError: `lora` holds something other than `LoraWeights`, or stacked adapters.

    Example:
        >>> import jax, jax.numpy as jnp, lora_jax as lj
        >>> params = {"params": {"fc": {"kernel": jnp.arange(12.0).reshape(4, 3)}}}
        >>> config = lj.LoraConfig(rank=2, targets=".*/kernel", init="pissa")
        >>> frozen, lora = lj.split(params, config, key=jax.random.key(0))
        >>> back = lj.unmerge(lj.merge(frozen, lora), lora)
        >>> kernel = frozen["params"]["fc"]["kernel"]
        >>> bool(jnp.allclose(back["params"]["fc"]["kernel"], kernel, atol=1e-4))
        True
    """
    return _shifted(params, lora, -1.0)
