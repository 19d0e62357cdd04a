"""LoRA on Flax NNX modules, in place: `add_lora`, `remove_lora`, `lora_state`.

`add_lora` gives each targeted `nnx.Linear`, `nnx.LinearGeneral`, `nnx.Einsum`, `nnx.Embed`
or `nnx.Conv` two `nnx.LoRAParam`s, ``lora_a`` and ``lora_b``, and makes it a ``Lora<Layer>``
(a subclass whose call adds ``s·((dropout(x) @ a) @ b)`` to the layer's untouched output).
Parameter paths do not change, so ``nnx.state(model, nnx.Param)`` paths are the ones the
config matches, and the adapters are selected by type: ``nnx.Optimizer(model, tx,
wrt=nnx.LoRAParam)``, ``nnx.split(model, nnx.LoRAParam, ...)``. `lora_state` hands the
model to the pure functions (`merge`, `summary`, `save_adapter`, `export_peft`...).
"""

from __future__ import annotations

import types
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from lora_jax.core import _paths
from lora_jax.nnx import _layers as _nnx_layers
from lora_jax.core._config import DROPOUT_RNG, LoraConfig
from lora_jax.core._layout import Layout
from lora_jax.core._split import split
from lora_jax.core._weights import LoraWeights, check_fits, delta, flatten_lora

__all__ = ["add_lora", "remove_lora", "lora_state"]


class _LoraLayer(nnx.Module):
    """What `add_lora` adds to a layer (mixed in before the layer's own class)."""

    _lora_base: type
    lora_a: nnx.LoRAParam
    lora_b: nnx.LoRAParam
    lora_layout: Layout
    lora_target: str
    lora_scale: float
    lora_dropout: float
    lora_rngs: nnx.RngStream | None
    deterministic: bool

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        y = super().__call__(*args, **kwargs)
        return self._lora_add("__call__", y, args, kwargs)

    def _lora_add(self, method: str, y: Any, args: tuple, kwargs: dict) -> Any:
        x, update = _nnx_layers.call_delta(self, method, self.lora_layout, args, kwargs)
        if jnp.issubdtype(x.dtype, jnp.floating):
            x = x.astype(y.dtype)
            if self.lora_dropout > 0.0 and not self.deterministic and self.lora_rngs is not None:
                keep = jax.random.bernoulli(self.lora_rngs(), 1.0 - self.lora_dropout, x.shape)
                x = jnp.where(keep, x / (1.0 - self.lora_dropout), jnp.zeros_like(x))
        a, b = self.lora_a.get_value().astype(y.dtype), self.lora_b.get_value().astype(y.dtype)
        return y + update(x, a, b, self.lora_scale).astype(y.dtype)


class _LoraEmbedLayer(_LoraLayer):
    """`_LoraLayer` for `nnx.Embed`: the lookup and ``attend`` both carry the update."""

    def attend(self, *args: Any, **kwargs: Any) -> Any:
        y = super().attend(*args, **kwargs)  # type: ignore[misc]
        return self._lora_add("attend", y, args, kwargs)


_LORA_CLASSES: dict[type, type] = {}


def _lora_class(cls: type) -> type:
    """``Lora<cls>``: `cls` with the adapter mixin in front (one class per layer class)."""
    if cls not in _LORA_CLASSES:
        mixin = _LoraEmbedLayer if issubclass(cls, nnx.Embed) else _LoraLayer
        body = {"_lora_base": cls, "__module__": __name__}
        _LORA_CLASSES[cls] = types.new_class(
            f"Lora{cls.__name__}", (mixin, cls), exec_body=lambda ns: ns.update(body)
        )
    return _LORA_CLASSES[cls]


def attach(module: Any, w: LoraWeights, target: str, scale: float, rate: float, rngs: Any) -> None:
    """Gives `module` the adapter `w` (in place): LoRAParams, scale, dropout, class."""
    object.__setattr__(module, "__class__", _lora_class(type(module)))  # not an NNX attribute
    module.lora_a = nnx.LoRAParam(w.a)
    module.lora_b = nnx.LoRAParam(w.b)
    module.lora_layout = w.layout
    module.lora_target = target
    module.lora_scale = float(scale)
    module.lora_dropout = float(rate)
    module.lora_rngs = rngs if rate > 0.0 else None
    module.deterministic = False


def _detach(module: Any) -> None:
    for name in ("lora_a", "lora_b", "lora_layout", "lora_target", "lora_scale"):
        delattr(module, name)
    for name in ("lora_dropout", "lora_rngs", "deterministic"):
        delattr(module, name)
    object.__setattr__(module, "__class__", module._lora_base)


def _name(path: tuple) -> str:
    return "/".join(str(p) for p in path)


def adapted_modules(model: Any) -> Iterator[tuple[str, Any]]:
    """``(kernel path, module)`` of every layer that carries an adapter."""
    for path, node in nnx.iter_graph(model):
        if isinstance(node, _LoraLayer):
            yield _name((*path, node.lora_target)), node


def layers(model: Any) -> dict[str, tuple[Any, str, Layout]]:
    """``{kernel path: (module, parameter name, layout)}`` of every supported layer; a
    kernel with more axes than the layer's own (from `nnx.vmap`/`nnx.scan`) gets leading
    stack axes."""
    found = {}
    for path, node in nnx.iter_graph(model):
        if not isinstance(node, nnx.Module):
            continue
        known = _nnx_layers.kernel_layout(node)
        if known is None:
            continue
        param, layout = known
        n_stack = len(getattr(node, param).get_value().shape) - layout.ndim
        if n_stack >= 0:
            found[_name((*path, param))] = (node, param, layout.restack(n_stack))
    return found


def _check_module(model: Any, what: str) -> None:
    if not isinstance(model, nnx.Module):
        raise TypeError(f"`{what}` takes an nnx.Module; found {type(model).__name__}.")


def dropout_stream(config: LoraConfig, rngs: Any) -> Any:
    """The RNG stream LoRA dropout draws from: ``rngs.lora_dropout`` (or NNX's default)."""
    if config.dropout <= 0.0:
        return None
    if not isinstance(rngs, nnx.Rngs):
        raise ValueError(
            f"config.dropout={config.dropout} needs `rngs=nnx.Rngs(...)` (the "
            f"{DROPOUT_RNG!r} stream, or the default one); found {type(rngs).__name__}."
        )
    return rngs[DROPOUT_RNG]


def unsupported_error(path: str, module: Any, what: str) -> ValueError:
    kind = type(module).__name__ if module is not None else "no layer"
    return ValueError(
        f"{path} belongs to {kind}: {what} adapts the kernels of nnx.Linear, "
        f"nnx.LinearGeneral (no batch_axis), nnx.Einsum, nnx.Embed and nnx.Conv (no groups or "
        f"mask), and subclasses that do not override their call. Exclude it from the "
        f"targets, or use the pure form, lj.lora_apply(graphdef, config), which merges it."
    )


def add_lora(
    model: nnx.Module,
    config: LoraConfig,
    *,
    key: jax.Array | None = None,
    lora: Any = None,
    rngs: nnx.Rngs | None = None,
) -> nnx.Module:
    """Adds LoRA adapters to an NNX model, in place, as `nnx.LoRAParam`s.

    Targets are matched against the paths of ``nnx.state(model, nnx.Param)``, e.g.
    ``layers/0/attn/q/kernel``, with the same rules and errors as `lora_jax.split`. Each
    targeted layer gets ``lora_a`` ``(*in, rank)`` and ``lora_b`` ``(rank, *out)`` and, when
    called, adds ``s·((dropout(x) @ a) @ b)`` to its untouched output: ``W + a@b`` is never
    formed. With ``b = 0`` at init the model's outputs are unchanged, bit for bit.
    `model.eval()` turns LoRA dropout off, `model.train()` on.

    Args:
        model: the NNX model; it must not carry adapters already.
        config: which kernels to adapt and how.
        key: PRNG key for new adapters (as in `lora_jax.split`: each target's key is
            folded from its path).
        lora: existing adapters to attach instead (from `lora_state`, `load_adapter`,
            `import_peft`, training in the pure form...), keyed by kernel path.
        rngs: the ``lora_dropout`` (or default) stream for LoRA dropout; needed only when
            ``config.dropout > 0``.

    Returns:
        `model` itself, now with adapters.

    Raises:
        ValueError: a pattern matches nothing, a rank is too large, an adapter does not
            fit its kernel, a target is not in a supported layer, the model already
            carries adapters, or dropout is on without `rngs`.
        TypeError: `model` is not an nnx.Module, or neither `key` nor `lora` is given.

    Example:
        >>> import jax, jax.numpy as jnp, optax, lora_jax as lj
        >>> from flax import nnx
        >>> model = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
        >>> x = jnp.ones((2, 4))
        >>> y = model(x)
        >>> lj.add_lora(model, lj.LoraConfig(rank=2, targets="kernel"), key=jax.random.key(1))
        LoraLinear(...)
        >>> bool((model(x) == y).all()), model.lora_a.shape, model.lora_b.shape
        (True, (4, 2), (2, 3))
        >>> optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.LoRAParam)
    """
    _check_module(model, "add_lora")
    present = [p for p, _ in adapted_modules(model)]
    if present:
        raise ValueError(
            f"the model already carries adapters at {present[:5]}; call "
            f"lj.remove_lora(model) first (or update them with nnx.update)."
        )
    params = nnx.state(model, nnx.Param)
    found = layers(model)
    if lora is None:
        if key is None:
            raise TypeError("`add_lora` needs `key=` for new adapters, or `lora=` to attach.")
        layouts = {p: layout for p, (_, _, layout) in found.items()}
        frozen, lora = split(params, config, key=key, layouts=layouts)
        if frozen is not params:  # residual inits (PiSSA) change the base
            nnx.update(model, frozen)
    adapters = flatten_lora(lora)
    check_fits(_paths.flatten(params), adapters)
    for path, w in adapters.items():
        if path not in found:
            raise unsupported_error(path, _owner(model, path), "add_lora")
        if _axes(found[path][2]) != _axes(w.layout):
            raise ValueError(
                f"{path}: the adapter's layout {w.layout} does not fit the layer's "
                f"{found[path][2]}."
            )
    stream = dropout_stream(config, rngs)
    for path, w in adapters.items():
        module, param, _ = found[path]
        attach(module, w, param, config.scale_for(path, w.rank), config.dropout, stream)
    return model


def _axes(layout: Layout) -> tuple:
    return layout.stack_axes, layout.in_axes, layout.out_axes


def _owner(model: Any, path: str) -> Any:
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    for p, node in nnx.iter_graph(model):
        if isinstance(node, nnx.Module) and _name(p) == parent:
            return node
    return None


def lora_state(model: nnx.Module) -> tuple[nnx.State, dict[str, Any]]:
    """The model's base parameters and adapters, as the pure functions take them.

    Args:
        model: an NNX model with adapters (from `add_lora`).

    Returns:
        ``(frozen, lora)``: `frozen` is ``nnx.state`` of the model's `nnx.Param`s other
        than LoRA's (the same arrays, no copies); `lora` holds a `LoraWeights` at each
        adapted kernel path, like `lora_jax.split` makes from ``nnx.split(model)[1]``.

    Raises:
        TypeError: `model` is not an nnx.Module.

    Example:
        >>> import jax, lora_jax as lj
        >>> from flax import nnx
        >>> model = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
        >>> config = lj.LoraConfig(rank=2, targets="kernel")
        >>> frozen, lora = lj.lora_state(lj.add_lora(model, config, key=jax.random.key(1)))
        >>> lora["kernel"].a.shape, lj.summary(frozen, lora).trainable
        ((4, 2), 14)
    """
    _check_module(model, "lora_state")
    frozen = nnx.state(model, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam)))
    adapters = {
        path: LoraWeights(m.lora_a.get_value(), m.lora_b.get_value(), m.lora_layout)
        for path, m in adapted_modules(model)
    }
    return frozen, _paths.nest(adapters)


def remove_lora(model: nnx.Module, *, merge: bool = False) -> nnx.Module:
    """Takes the adapters out of an NNX model, in place; with ``merge=True`` folds them in.

    Args:
        model: an NNX model with adapters (from `add_lora`).
        merge: add ``s·a@b`` to each adapted kernel first (PEFT's ``merge_and_unload``),
            so the plain model computes what the adapted one did.

    Returns:
        `model` itself, with its layers back to their own classes and no LoRAParams.
        Merging writes into the kernels' Variables, which states taken earlier with
        ``nnx.split``/``nnx.state``/`lora_state` share (NNX semantics).

    Raises:
        TypeError: `model` is not an nnx.Module.

    Example:
        >>> import jax, jax.numpy as jnp, lora_jax as lj
        >>> from flax import nnx
        >>> model = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
        >>> config = lj.LoraConfig(rank=2, targets="kernel")
        >>> lj.remove_lora(lj.add_lora(model, config, key=jax.random.key(1)), merge=True)
        Linear(...)
    """
    _check_module(model, "remove_lora")
    for _, module in list(adapted_modules(model)):
        if merge:
            kernel = getattr(module, module.lora_target)
            w = LoraWeights(
                module.lora_a.get_value(), module.lora_b.get_value(), module.lora_layout
            )
            value = kernel.get_value()
            kernel.set_value(value + delta(w, module.lora_scale, value.dtype))
        _detach(module)
    return model


def infer_layouts(model: Any, state: Any = None) -> dict[str, Layout]:
    """The layout of every supported layer's kernel, read from the layers (no inputs).

    Args:
        model: an ``nnx.Module``, or an ``nnx.GraphDef`` with its `state`.
        state: the state for a graphdef; unused for a module.

    Returns:
        ``{path: Layout}``; pass it to `lora_jax.split` as ``layouts=``.

    Example:
        >>> import jax, lora_jax as lj
        >>> from flax import nnx
        >>> model = nnx.LinearGeneral(8, (2, 4), rngs=nnx.Rngs(0))
        >>> lj.nnx.infer_layouts(model)["kernel"]
        Layout(kind='dense', in_axes=(0,), out_axes=(1, 2), stack_axes=())
    """
    if isinstance(model, nnx.GraphDef):
        model = nnx.merge(model, state, copy=True)
    _check_module(model, "infer_layouts")
    return {p: layout for p, (_, _, layout) in layers(model).items()}
