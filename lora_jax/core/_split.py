"""`split`: choose the targets of a config in a params tree and create their adapters."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from lora_jax.core._config import (
    LoraConfig,
    require_config,
    unused_excludes,
    unused_pattern_keys,
)
from lora_jax.core._dora import out_shape, weight_norm
from lora_jax.core._init import check_key, init_factors, path_key
from lora_jax.core._layout import Layout, matrix_layout
from lora_jax.core._packed import is_packed, unpack
from lora_jax.core._paths import close_matches, flatten, nest, replace
from lora_jax.core._weights import LoraWeights

__all__ = ["split", "select_targets"]  # and BASE_KEEPING_INITS for lora_jax.quant

# The inits whose adapter starts at B = 0 on the base as it is (`init_factors` returns no
# residual for them); every other init (PiSSA) rewrites the base kernel.
BASE_KEEPING_INITS = ("normal", "kaiming_uniform", "gaussian")


def _kind(layouts: Mapping[str, Layout] | None, path: str) -> str:
    layout = (layouts or {}).get(path)
    return layout.kind if layout is not None else "matrix"


def _check_leaf(path: str, leaf: Any, why: str) -> None:
    shape = getattr(leaf, "shape", None)
    dtype = getattr(leaf, "dtype", None)
    if shape is None or dtype is None:
        raise TypeError(f"{why} selects {path!r}, which is a {type(leaf).__name__}, not an array.")
    if len(shape) < 2:
        raise ValueError(
            f"{why} selects {path!r} of shape {tuple(shape)}; LoRA adapts kernels with at "
            f"least 2 axes (biases and scales cannot be adapted). Narrow the pattern, "
            f"e.g. end it with '/kernel'."
        )
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"{why} selects {path!r} of dtype {dtype}; LoRA needs a float kernel.")


def _unmatched_error(pattern: str, paths: list[str]) -> ValueError:
    near = "\n  ".join(close_matches(pattern, paths))
    return ValueError(
        f"target pattern {pattern!r} matches no parameter (patterns must match the whole "
        f"`/`-joined path). Closest paths:\n  {near}"
    )


def select_targets(
    variables: Any, config: LoraConfig, layouts: Mapping[str, Layout] | None = None
) -> dict[str, Layout]:
    """The parameters `config` adapts, with the layout of each.

    Args:
        variables: the params pytree (what ``model.apply`` takes).
        config: the LoRA config.
        layouts: ``{path: Layout}`` from `lora_jax.infer_layouts`, needed for kernels with
            more than 2 axes.

    Returns:
        ``{path: Layout}`` in tree order.

    Raises:
        ValueError: a pattern (`targets`, `exclude`, a `rank_pattern`/`alpha_pattern`/
            `slices` key) matches nothing (the closest paths are listed), selects a 1-D or
            integer leaf, or selects a >2-D kernel with no layout; a `slices` axis is out of
            range, already a stack axis, or the kernel's only input or output axis.
        TypeError: `config` is not a `LoraConfig`, or a pattern selects something that is
            not an array.

    Example:
        >>> import jax.numpy as jnp, lora_jax as lj
        >>> params = {"params": {"fc": {"kernel": jnp.ones((4, 3)), "bias": jnp.ones(3)}}}
        >>> list(lj.core.select_targets(params, lj.LoraConfig(targets=".*/kernel")))
        ['params/fc/kernel']
    """
    config = require_config(config, "select_targets")
    flat = flatten(variables)
    found: dict[str, Layout] = {}
    used: set[str] = set()
    for path, leaf in flat.items():
        kind = _kind(layouts, path)
        hits = config.matched_by(path, leaf, kind)
        used.update(hits)
        if not hits or config.is_excluded(path, leaf, kind):
            continue
        _check_leaf(path, leaf, f"target pattern {hits[0]!r}")
        layout = (layouts or {}).get(path) or matrix_layout(len(leaf.shape))
        if layout is None:
            raise ValueError(
                f"{path} has shape {tuple(leaf.shape)}: which of its axes are inputs, outputs "
                f"or stacked layers cannot be known from the shape alone. Pass "
                f"layouts=lj.infer_layouts(model.apply, variables, *example_inputs) to split "
                f"(Flax NNX: layouts=lj.infer_layouts(model))."
            )
        if layout.ndim != len(leaf.shape):
            raise ValueError(f"{path}: layout {layout} does not fit shape {tuple(leaf.shape)}.")
        found[path] = _sliced(config, path, layout)
    for pattern in config.patterns():
        if pattern not in used:
            raise _unmatched_error(pattern, list(flat))
    if not found:
        raise ValueError(f"`targets` selected no parameter among {len(flat)} leaves.")
    _check_unused(config, flat, layouts, list(found))
    return found


def _sliced(config: LoraConfig, path: str, layout: Layout) -> Layout:
    """`layout` with the `slices` axis of `path` (if any) made a stack axis."""
    axis = config.slice_axis_for(path, layout.ndim)
    if axis is None:
        return layout
    try:
        return layout.sliced(axis)
    except ValueError as err:
        raise ValueError(f"{path}: `slices` gives {err}") from None


def _check_unused(
    config: LoraConfig, flat: dict[str, Any], layouts: Mapping[str, Layout] | None, found: list
) -> None:
    """`exclude`, `rank_pattern`, `alpha_pattern` and `slices` entries selecting nothing are errors:
    ignoring them would silently train something other than what was asked."""
    kinds = {p: _kind(layouts, p) for p in flat}
    for pattern in unused_excludes(config, flat, kinds):
        near = "\n  ".join(close_matches(pattern, list(flat)))
        raise ValueError(
            f"`exclude` pattern {pattern!r} matches no parameter (patterns must match the "
            f"whole `/`-joined path). Closest paths:\n  {near}"
        )
    for field, key in unused_pattern_keys(config, found):
        near = "\n  ".join(close_matches(key, found))
        raise ValueError(
            f"`{field}` key {key!r} matches none of the {len(found)} targets (a key matches "
            f"the whole path or a trailing run of module names, e.g. 'attn/query'). "
            f"Closest targets:\n  {near}"
        )


# One compiled program per kernel shape (op by op, the norm costs a compile per operation).
_norm = jax.jit(weight_norm, static_argnums=(3, 4))


def _extras(config: LoraConfig, w: LoraWeights, kernel: Any) -> LoraWeights:
    """The adapter with DoRA's magnitude (``‖W + s·a@b‖`` of its base, so the output starts
    at the base's) and PEFT's lora_bias (zeros) when the config asks for them."""
    dtype = jnp.dtype(config.dtype)
    if config.use_dora:
        norm = _norm(unpack(kernel), w.a, w.b, w.layout, float(w.scale))  # type: ignore[arg-type]
        w = dataclasses.replace(w, magnitude=norm.astype(dtype))
    if config.lora_bias:
        w = dataclasses.replace(w, bias=jnp.zeros(out_shape(tuple(w.b.shape), w.layout), dtype))
    return w


def split(
    variables: Any,
    config: LoraConfig,
    *,
    key: jax.Array,
    layouts: Mapping[str, Layout] | None = None,
) -> tuple[Any, dict[str, Any]]:
    """Splits a params pytree into a frozen base and trainable LoRA factors.

    Args:
        variables: what ``model.apply`` takes (a Flax variables dict) or any pytree.
            Paths are the `/`-joined keys, e.g. ``params/layers_0/attn/query/kernel``.
        config: which leaves to adapt and how.
        key: PRNG key for the initial factors. Each target's key is folded from its
            path, so adding a target never changes the others' initial values.
        layouts: ``{path: Layout}`` from `lora_jax.infer_layouts`; required when a target
            has more than 2 axes.

    Returns:
        ``(frozen, lora)``: `frozen` is `variables` itself (the same arrays, no copies) or,
        with ``init="pissa"``, `variables` with each target replaced by its residual;
        `lora` is a nested dict holding a `LoraWeights` at each target path, each with its
        own scale, layout and dropout rate: nothing after `split` needs the config again.

    Raises:
        ValueError: a pattern (`targets`, `exclude`, a `rank_pattern`/`alpha_pattern`/
            `slices` key) matches nothing, selects a leaf LoRA cannot adapt, a `slices` axis
            cannot be sliced, a rank is larger than the smaller side of a kernel (of each
            slice, with `slices`), or a residual init (``"pissa"``) meets a quantized
            kernel.
        TypeError: `config` is not a `LoraConfig`, or `key` is not a PRNG key.

    Example:
        >>> import jax, jax.numpy as jnp, lora_jax as lj
        >>> params = {"params": {"fc": {"kernel": jnp.ones((4, 3)), "bias": jnp.ones(3)}}}
        >>> config = lj.LoraConfig(rank=2, targets=".*/kernel")
        >>> frozen, lora = lj.split(params, config, key=jax.random.key(0))
        >>> lora["params"]["fc"]["kernel"].a.shape, lora["params"]["fc"]["kernel"].b.shape
        ((4, 2), (2, 3))
    """
    config = require_config(config, "split")
    key = check_key(key, "split")
    targets = select_targets(variables, config, layouts)
    flat = flatten(variables)
    if config.init not in BASE_KEEPING_INITS:
        for path in targets:
            if is_packed(flat[path]):
                raise ValueError(
                    f"{path} is quantized: a residual init rewrites the base kernel "
                    f"(init={config.init!r}); use lj.quant.loftq, or split the float base "
                    f"and quantize the residual it returns."
                )
    adapters, residuals = {}, {}
    for path, layout in targets.items():
        kernel = flat[path]
        rank = config.rank_for(path)
        limit = layout.max_rank(tuple(kernel.shape))
        if rank > limit:
            per = ", per stack index" if layout.stack_axes else ""
            raise ValueError(
                f"{path}: rank {rank} is larger than the kernel allows: shape "
                f"{tuple(kernel.shape)} has at most rank {limit} (the smaller of its "
                f"flattened input and output sizes{per})."
            )
        weights, residual = init_factors(
            path_key(key, path),
            kernel,
            layout,
            rank=rank,
            scale=config.scale_for(path, rank),
            init=config.init,
            dtype=jnp.dtype(config.dtype),
            dropout=config.dropout,
        )
        adapters[path] = _extras(config, weights, kernel if residual is None else residual)
        if residual is not None:
            residuals[path] = residual
    return replace(variables, residuals), nest(adapters)
