"""`infer_layouts`: learn every kernel's layout from the model, by abstract tracing."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn

from lora_jax.core._layout import Layout
from lora_jax.core._paths import flatten
from lora_jax.core._use import layouts_from_use
from lora_jax.linen._sites import kernel_path, site

__all__ = ["infer_layouts"]


def infer_layouts(apply_fn: Callable[..., Any], variables: Any, *args: Any, **kwargs: Any) -> dict:
    """The linen half of `lora_jax.infer_layouts`: one trace of the program (no FLOPs),
    recording each supported layer's kernel path and axes (leading stack axes from
    `nn.scan`/`nn.vmap`), and, for every other float kernel, the layout the contractions
    that use it imply (`lora_jax.core._use.layouts_from_use`: contracted axes are inputs,
    dot_general batch axes and scanned axes are stack axes, the rest outputs).

    Args:
        apply_fn: the model's apply function, e.g. ``model.apply``.
        variables: what `apply_fn` takes first (a variables dict).
        *args: example positional inputs (arrays or `jax.ShapeDtypeStruct`).
        **kwargs: keyword arguments for `apply_fn` (``rngs``, ``method``...).

    Returns:
        ``{path: Layout}`` for every kernel seen.

    Raises:
        ValueError: when a kernel's recorded shape does not fit the stored parameter.

    Example:
        >>> import jax, jax.numpy as jnp, flax.linen as nn, lora_jax as lj
        >>> model, x = nn.DenseGeneral((2, 4)), jnp.ones((1, 8))
        >>> variables = model.init(jax.random.key(0), x)
        >>> lj.linen.infer_layouts(model.apply, variables, x)["params/kernel"].out_axes
        (1, 2)
    """
    seen: dict[str, tuple[Layout, tuple[int, ...]]] = {}

    def record(next_fun, args_, kwargs_, context):
        found = site(context.module, context.method_name, args_, kwargs_)
        kernel = None if found is None else context.module.scope.get_variable("params", found.param)
        if found is not None and kernel is not None:
            path = kernel_path(context.module, found.param)
            seen.setdefault(path, (found.low_rank.layout, tuple(kernel.shape)))
        return next_fun(*args_, **kwargs_)

    def traced(variables_: Any, *args_: Any, **kwargs_: Any) -> Any:
        with nn.intercept_methods(record):
            return apply_fn(variables_, *args_, **kwargs_)

    from_use = layouts_from_use(traced, variables, args, kwargs)
    stock = _fit_to_variables(seen, variables)
    return {**{p: lay for p, lay in from_use.items() if p not in stock}, **stock}


def _fit_to_variables(seen: Mapping[str, tuple[Layout, tuple]], variables: Any) -> dict:
    leaves = flatten(variables)
    layouts = {}
    for path, (layout, call_shape) in seen.items():
        if path not in leaves:
            continue
        shape = tuple(getattr(leaves[path], "shape", ()))
        n_stack = len(shape) - len(call_shape)
        if n_stack < 0 or shape[n_stack:] != tuple(call_shape):
            raise ValueError(
                f"{path}: the layer saw a kernel of shape {tuple(call_shape)} but the stored "
                f"parameter has shape {shape}; only leading stacked axes (nn.scan/nn.vmap "
                f"with variable_axes={{'params': 0}}) are supported."
            )
        layouts[path] = layout.restack(n_stack) if n_stack else layout
    return layouts
