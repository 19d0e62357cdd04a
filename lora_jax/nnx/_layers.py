"""The Flax NNX layers whose low-rank path lora_jax computes factored.

The NNX counterpart of `_layers`: for `nnx.Linear`, `nnx.LinearGeneral`, `nnx.Einsum`,
`nnx.Embed` (lookup and ``attend``) and `nnx.Conv`, `kernel_layout` reads the adapted
parameter's name and `Layout` from the module's attributes (no call needed), and
`call_delta` gives a call's input and its update ``scale * ((x @ a) @ b)``, the same
functions the linen layers use. A subclass that overrides a call method is not supported:
its computation is unknown.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
from flax import nnx

from lora_jax.core import _kernels as _layers
from lora_jax.core._layout import Layout

_CLASSES = (nnx.Linear, nnx.LinearGeneral, nnx.Einsum, nnx.Conv, nnx.Embed)


def methods(cls: type) -> tuple[str, ...]:
    """The call methods that carry the low-rank path for a supported class."""
    return ("__call__", "attend") if issubclass(cls, nnx.Embed) else ("__call__",)


def original_class(module: Any) -> type:
    """The module's class before `add_lora` replaced it."""
    return getattr(type(module), "_lora_base", type(module))


def layer_class(cls: type) -> type | None:
    """The supported NNX class `cls` behaves as, or None (unsupported or overridden)."""
    for base in _CLASSES:
        if issubclass(cls, base):
            same = all(getattr(cls, m) is getattr(base, m) for m in methods(base))
            return base if same else None
    return None


def kernel_layout(module: Any) -> tuple[str, Layout] | None:
    """``(parameter name, Layout)`` of the kernel a supported layer adapts, else None."""
    cls = layer_class(original_class(module))
    if cls is nnx.Linear:
        return "kernel", Layout("dense", (0,), (1,))
    if cls is nnx.LinearGeneral:
        if module.batch_axis:
            return None
        n_in, n_out = len(module.in_features), len(module.out_features)
        return "kernel", Layout("dense", tuple(range(n_in)), tuple(range(n_in, n_in + n_out)))
    if cls is nnx.Einsum:
        plan = _layers.einsum_plan(module.einsum_str)
        return None if plan is None else ("kernel", plan[0])
    if cls is nnx.Conv:
        if module.feature_group_count != 1 or module.mask is not None:
            return None
        n = len(module.kernel_shape) - 1
        return "kernel", Layout("conv", tuple(range(n)), (n,))
    if cls is nnx.Embed:
        return "embedding", Layout("embed", (0,), (1,))
    return None


def _linen_conv(module: Any, features: int) -> nn.Conv:
    return nn.Conv(
        features=features,
        kernel_size=tuple(module.kernel_shape[:-2]),
        strides=module.strides,
        padding=module.padding,
        input_dilation=module.input_dilation,
        kernel_dilation=module.kernel_dilation,
        use_bias=False,
        precision=module.precision,
    )


def call_delta(
    module: Any, method: str, layout: Layout, args: tuple, kwargs: dict
) -> tuple[Any, _layers.Delta]:
    """The input of one call and the function computing its low-rank update.

    Raises:
        ValueError: an `nnx.Einsum` called with an equation whose kernel layout differs
            from the one the adapter was made for.
    """
    name = "query" if method == "attend" else "inputs"
    x = args[0] if args else kwargs[name]
    cls = layer_class(original_class(module))
    if cls is nnx.Embed:
        return x, _layers.embed_attend if method == "attend" else _layers.embed_lookup
    if cls is nnx.Conv:
        return x, _layers.conv_deltas(lambda r: _linen_conv(module, r))[0]
    if cls is nnx.Einsum:
        eq = args[1] if len(args) > 1 else kwargs.get("einsum_str")
        plan = _layers.einsum_plan(eq or module.einsum_str)
        n_stack = len(layout.stack_axes)
        if plan is None or plan[0].restack(n_stack).perm != layout.perm:
            raise ValueError(
                f"nnx.Einsum called with {eq!r}: its kernel axes differ from those of "
                f"{module.einsum_str!r}, which the adapter was made for."
            )
        return x, _layers.dense_delta(plan[1], plan[2])
    axes = module.axis if cls is nnx.LinearGeneral else (-1,)
    x_in = tuple(sorted(ax % x.ndim for ax in axes))
    return x, _layers.dense_delta(x_in, None)
