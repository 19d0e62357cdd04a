"""The Flax NNX layers lora_jax adapts, and the adapter each one carries.

For `nnx.Linear`, `nnx.LinearGeneral`, `nnx.Einsum`, `nnx.Embed` (lookup and ``attend``)
and `nnx.Conv`, `kernel_layout` reads the adapted parameter's name and `Layout` from the
module's attributes (no call needed), and `call_delta` picks the entry of the one kernel
table (`lora_jax.core._kernels`, shared with linen) for a call: this module holds no math
of its own. `attach` gives a layer its adapter in place (two `nnx.LoRAParam`s, a third for DoRA's
magnitude or a lora_bias, and the adapter's scale and dropout rate, read back by
`adapter_of`) and makes it ``Lora<Layer>``, whose call adds ``s·((dropout(x) @ a) @ b)``
to the layer's untouched output (DoRA rescales it: `lora_jax.nnx._decomposed`). A subclass
that overrides a call method is not supported: its computation is unknown.
"""

from __future__ import annotations

import contextvars
import types
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from lora_jax.core._kernels import Delta, LowRank, conv_of, dense, einsum, embed
from lora_jax.core._layout import Layout
from lora_jax.core._weights import LoraWeights
from lora_jax.nnx._decomposed import finish, gain

__all__ = [
    "adapted_modules",
    "adapter_of",
    "attach",
    "call_delta",
    "check_single",
    "detach",
    "kernel_layout",
    "layers",
    "original_class",
    "path_name",
]

_CLASSES = (nnx.Linear, nnx.LinearGeneral, nnx.Einsum, nnx.Conv, nnx.Embed)


def methods(cls: type) -> tuple[str, ...]:
    """The call methods that carry the low-rank path for a supported class."""
    return ("__call__", "attend") if issubclass(cls, nnx.Embed) else ("__call__",)


def original_class(module: Any) -> type:
    """The module's class before `attach` replaced it."""
    return getattr(type(module), "_lora_base", type(module))


def layer_class(cls: type) -> type | None:
    """The supported NNX class `cls` behaves as, or None (unsupported or overridden)."""
    for base in _CLASSES:
        if issubclass(cls, base):
            same = all(getattr(cls, m) is getattr(base, m) for m in methods(base))
            return base if same else None
    return None


def _conv(module: Any) -> LowRank:
    """The kernel-table entry of an `nnx.Conv`: its own convolution, any kernel."""
    return conv_of(module, tuple(module.kernel_shape[:-2]))


def kernel_layout(module: Any) -> tuple[str, Layout] | None:
    """``(parameter name, Layout)`` of the kernel a supported layer adapts, else None."""
    cls = layer_class(original_class(module))
    if cls is nnx.Linear:
        return "kernel", dense((0,), 1).layout
    if cls is nnx.LinearGeneral:
        if module.batch_axis:
            return None
        n_in = len(module.in_features)
        return "kernel", dense(tuple(range(n_in)), len(module.out_features)).layout
    if cls is nnx.Einsum:
        entry = einsum(module.einsum_str)
        return None if entry is None else ("kernel", entry.layout)
    if cls is nnx.Conv:
        custom = module.conv_general_dilated is not lax.conv_general_dilated
        if module.feature_group_count != 1 or module.mask is not None or custom:
            return None
        return "kernel", _conv(module).layout
    if cls is nnx.Embed:
        return "embedding", embed("lookup").layout
    return None


def call_delta(
    module: Any, method: str, layout: Layout, args: tuple, kwargs: dict
) -> tuple[Any, Delta]:
    """The input of one call and the function computing its low-rank update.

    Raises:
        ValueError: an `nnx.Einsum` called with an equation whose kernel layout differs
            from the one the adapter was made for.
    """
    name = "query" if method == "attend" else "inputs"
    x = args[0] if args else kwargs[name]
    cls = layer_class(original_class(module))
    if cls is nnx.Embed:
        return x, embed("attend" if method == "attend" else "lookup").delta
    if cls is nnx.Conv:
        return x, _conv(module).delta
    if cls is nnx.Einsum:
        eq = args[1] if len(args) > 1 else kwargs.get("einsum_str")
        entry = einsum(eq or module.einsum_str)
        n_stack = len(layout.stack_axes)
        if entry is None or entry.layout.restack(n_stack).perm != layout.perm:
            raise ValueError(
                f"nnx.Einsum called with {eq!r}: its kernel axes differ from those of "
                f"{module.einsum_str!r}, which the adapter was made for."
            )
        return x, entry.delta
    axes = module.axis if cls is nnx.LinearGeneral else (-1,)
    axes = (axes,) if isinstance(axes, int) else axes
    x_in = tuple(sorted(ax % x.ndim for ax in axes))
    return x, dense(x_in, len(layout.out_axes)).delta


# While set (by `lora_jax.nnx._pure`), counts the calls of each adapted layer, by id.
LAYER_CALLS: contextvars.ContextVar[dict[int, int] | None] = contextvars.ContextVar(
    "lora_jax_nnx_layer_calls", default=None
)


class _LoraLayer(nnx.Module):
    """What `attach` adds to a layer (mixed in before the layer's own class)."""

    _lora_base: type
    lora_a: nnx.LoRAParam
    lora_b: nnx.LoRAParam
    lora_layout: Layout
    lora_target: str
    lora_scale: float
    lora_dropout: float
    lora_residual_norm: float | None
    lora_magnitude: nnx.LoRAParam | None
    lora_bias: nnx.LoRAParam | None
    lora_rngs: nnx.RngStream | None
    deterministic: bool

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        y = super().__call__(*args, **kwargs)
        return self._lora_add("__call__", y, args, kwargs, self._lora_base_call(args, kwargs))

    def _lora_base_call(self, args: tuple, kwargs: dict) -> Any:
        """The layer's own call on another input (DoRA under dropout runs it on x')."""
        call = super().__call__
        if args:
            return lambda x: call(x, *args[1:], **kwargs)
        return lambda x: call(**{**kwargs, "inputs": x})

    def _lora_add(self, method: str, y: Any, args: tuple, kwargs: dict, base: Any) -> Any:
        counts = LAYER_CALLS.get()
        if counts is not None:
            counts[id(self)] = counts.get(id(self), 0) + 1
        x, update = call_delta(self, method, self.lora_layout, args, kwargs)
        dropped = x
        if jnp.issubdtype(x.dtype, jnp.floating):
            x = dropped = x.astype(y.dtype)
            rate = self.lora_dropout
            if rate > 0.0 and not self.deterministic and self.lora_rngs is not None:
                keep = jax.random.bernoulli(self.lora_rngs(), 1.0 - rate, x.shape)
                dropped = jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))
        a, b = self.lora_a.get_value().astype(y.dtype), self.lora_b.get_value().astype(y.dtype)
        term = update(dropped, a, b, self.lora_scale)
        if method == "attend":  # DoRA's gain is already on the query
            return y + term.astype(y.dtype)
        return finish(self, y, x, dropped, term, base)


class _LoraEmbedLayer(_LoraLayer):
    """`_LoraLayer` for `nnx.Embed`: the lookup and ``attend`` both carry the update."""

    def attend(self, *args: Any, **kwargs: Any) -> Any:
        if self.lora_bias is not None:
            raise ValueError(
                "an Embed adapter with lora_bias cannot serve `attend` (the bias would be on "
                "the contracted axis); train the table without lora_bias."
            )
        if self.lora_magnitude is not None:  # DoRA's gain scales the contracted axis
            query = args[0] if args else kwargs.pop("query")
            args = ((query * gain(self)).astype(query.dtype), *args[1:])
        y = super().attend(*args, **kwargs)  # type: ignore[misc]
        return self._lora_add("attend", y, args, kwargs, None)


_LORA_CLASSES: dict[type, type] = {}
_ATTRIBUTES = (
    "lora_a",
    "lora_b",
    "lora_layout",
    "lora_target",
    "lora_scale",
    "lora_dropout",
    "lora_residual_norm",
    "lora_magnitude",
    "lora_bias",
    "lora_rngs",
    "deterministic",
)


def _lora_class(cls: type) -> type:
    """``Lora<cls>``: `cls` with the adapter mixin in front (one class per layer class)."""
    if cls not in _LORA_CLASSES:
        mixin = _LoraEmbedLayer if issubclass(cls, nnx.Embed) else _LoraLayer
        body = {"_lora_base": cls, "__module__": __name__}
        _LORA_CLASSES[cls] = types.new_class(
            f"Lora{cls.__name__}", (mixin, cls), exec_body=lambda ns: ns.update(body)
        )
    return _LORA_CLASSES[cls]


def attach(module: Any, w: LoraWeights, target: str, rate: float, rngs: Any) -> None:
    """Gives `module` the adapter `w` (in place): LoRAParams, its scale, class.

    `rate` is the dropout rate this module runs (``w.dropout``, or 0.0 where dropout is
    off); `rngs` the stream it draws from (unused at rate 0).
    """
    object.__setattr__(module, "__class__", _lora_class(type(module)))  # not an NNX attribute
    module.lora_a = nnx.LoRAParam(w.a)
    module.lora_b = nnx.LoRAParam(w.b)
    module.lora_layout = w.layout
    module.lora_target = target
    module.lora_scale = float(w.scale)  # type: ignore[arg-type]  # one adapter: checked
    module.lora_dropout = float(rate)
    module.lora_residual_norm = w.residual_norm
    optional = lambda v: None if v is None else nnx.LoRAParam(v)
    module.lora_magnitude = optional(w.magnitude)
    module.lora_bias = optional(w.bias)
    module.lora_rngs = rngs if rate > 0.0 else None
    module.deterministic = False


def detach(module: Any) -> None:
    """Takes the adapter out of `module` (in place): back to its own class."""
    for name in _ATTRIBUTES:
        delattr(module, name)
    object.__setattr__(module, "__class__", module._lora_base)


def adapter_of(module: Any) -> LoraWeights:
    """The adapter a module carries, with the scale, dropout rate and residual norm it
    was attached with."""
    return LoraWeights(
        module.lora_a.get_value(),
        module.lora_b.get_value(),
        module.lora_layout,
        scale=module.lora_scale,
        dropout=module.lora_dropout,
        residual_norm=module.lora_residual_norm,
        magnitude=None if module.lora_magnitude is None else module.lora_magnitude.get_value(),
        bias=None if module.lora_bias is None else module.lora_bias.get_value(),
    )


def path_name(path: tuple) -> str:
    """``layers/0/attn`` for an `nnx.iter_graph` path."""
    return "/".join(str(p) for p in path)


def adapted_modules(model: Any) -> Iterator[tuple[str, Any]]:
    """``(kernel path, module)`` of every layer that carries an adapter."""
    for path, node in nnx.iter_graph(model):
        if isinstance(node, _LoraLayer):
            yield path_name((*path, node.lora_target)), node


def layers(model: Any) -> dict[str, tuple[Any, str, Layout]]:
    """``{kernel path: (module, parameter name, layout)}`` of every supported layer; a
    kernel with more axes than the layer's own (from `nnx.vmap`/`nnx.scan`) gets leading
    stack axes."""
    found = {}
    for path, node in nnx.iter_graph(model):
        if not isinstance(node, nnx.Module):
            continue
        known = kernel_layout(node)
        if known is None:
            continue
        param, layout = known
        n_stack = len(getattr(node, param).get_value().shape) - layout.ndim
        if n_stack >= 0:
            found[path_name((*path, param))] = (node, param, layout.restack(n_stack))
    return found


def check_single(adapters: dict[str, LoraWeights], where: str) -> None:
    """A TypeError when `lora` holds stacked adapters (a tuple of scales)."""
    for path, w in adapters.items():
        if isinstance(w.scale, tuple):
            raise TypeError(
                f"{where}: `lora` at {path!r} stacks {len(w.scale)} adapters "
                f"(lj.multi.stack_adapters); take one with lj.multi.unstack_adapter."
            )
