"""LoRA on Flax NNX modules, in place: `add_lora`, `remove_lora`, `lora_state`.

`add_lora` gives each targeted `nnx.Linear`, `nnx.LinearGeneral`, `nnx.Einsum`, `nnx.Embed`
or `nnx.Conv` two `nnx.LoRAParam`s, ``lora_a`` and ``lora_b``, and makes it a ``Lora<Layer>``
(a subclass whose call adds ``s·((dropout(x) @ a) @ b)`` to the layer's untouched output).
Each layer keeps its adapter's scale s and dropout rate, so `lora_state` hands back
self-describing `LoraWeights`. Parameter paths do not change, so ``nnx.state(model,
nnx.Param)`` paths are the ones the config matches, and the adapters are selected by type:
``nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)``, ``nnx.split(model, nnx.LoRAParam, ...)``.
`lora_state` hands the model to the pure functions (`merge`, `summary`, `save_adapter`...).
"""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx

from lora_jax.core._config import DROPOUT_RNG, LoraConfig, require_config
from lora_jax.core._init import check_key
from lora_jax.core._layout import Layout
from lora_jax.core._paths import flatten, nest
from lora_jax.core._split import split
from lora_jax.core._weights import LoraWeights, check_fits, flatten_lora
from lora_jax.nnx._decomposed import merge_into
from lora_jax.nnx._layers import (
    adapted_modules,
    adapter_of,
    attach,
    check_single,
    detach,
    layer_class,
    layers,
    original_class,
    path_name,
)

__all__ = ["add_lora", "infer_layouts", "lora_state", "model_routes", "remove_lora"]


def check_module(model: Any, what: str) -> None:
    """A TypeError naming `what` when `model` is not an ``nnx.Module``."""
    if not isinstance(model, nnx.Module):
        raise TypeError(f"`{what}` takes an nnx.Module; found {type(model).__name__}.")


def _dropout_stream(adapters: dict[str, LoraWeights], rngs: Any) -> Any:
    """The RNG stream LoRA dropout draws from: ``rngs.lora_dropout`` (or NNX's default);
    None when no adapter has dropout."""
    wanting = [(p, w.dropout) for p, w in adapters.items() if w.dropout > 0.0]
    if not wanting:
        return None
    if not isinstance(rngs, nnx.Rngs):
        path, rate = wanting[0]
        raise ValueError(
            f"{path}: the adapter has dropout={rate}, which needs `rngs=nnx.Rngs(...)` (the "
            f"{DROPOUT_RNG!r} stream, or the default one); found {type(rngs).__name__}."
        )
    return rngs[DROPOUT_RNG]


def _unsupported_error(path: str, module: Any) -> ValueError:
    kind = type(module).__name__ if module is not None else "no layer"
    return ValueError(
        f"{path} belongs to {kind}: add_lora adapts the kernels of nnx.Linear, "
        f"nnx.LinearGeneral (no batch_axis), nnx.Einsum, nnx.Embed and nnx.Conv (no groups or "
        f"mask), and subclasses that do not override their call. Exclude it from the "
        f"targets, or use the pure form, lj.nnx.lora_apply(graphdef), which merges it."
    )


def _axes(layout: Layout) -> tuple:
    return layout.stack_axes, layout.in_axes, layout.out_axes


def _owner(model: Any, path: str) -> Any:
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    for p, node in nnx.iter_graph(model):
        if isinstance(node, nnx.Module) and path_name(p) == parent:
            return node
    return None


def _created(params: Any, config: Any, key: Any, found: dict) -> tuple[Any, Any]:
    """``(frozen, lora)``: new adapters from `config` (the base changes for PiSSA)."""
    config = require_config(config, "add_lora")
    if key is None:
        raise TypeError("`add_lora` needs `key=` for new adapters, or `lora=` to attach.")
    key = check_key(key, "add_lora")
    layouts = {p: layout for p, (_, _, layout) in found.items()}
    return split(params, config, key=key, layouts=layouts)


def _check_arguments(config: Any, key: Any, lora: Any) -> None:
    if lora is None and config is None:
        raise TypeError(
            "`add_lora` needs `config` (with `key=`) to create adapters, or `lora=` to "
            "attach existing ones."
        )
    if lora is not None and (config is not None or key is not None):
        given = "`config`" if config is not None else "`key`"
        raise TypeError(
            f"`add_lora` takes `lora=` (existing adapters, which carry their own scale and "
            f"dropout) or `config` with `key=` (new adapters), not both; {given} was given "
            f"with `lora`."
        )


def add_lora(
    model: nnx.Module,
    config: LoraConfig | None = None,
    *,
    key: jax.Array | None = None,
    lora: Any = None,
    rngs: nnx.Rngs | None = None,
) -> nnx.Module:
    """Adds LoRA adapters to an NNX model, in place, as `nnx.LoRAParam`s.

    Either creates adapters from `config` and `key`, or attaches existing ones (`lora`);
    never both: attached adapters carry their own scale and dropout rate, and a config
    beside them would be a second, possibly different, answer (a TypeError).

    Targets are matched against the paths of ``nnx.state(model, nnx.Param)``, e.g.
    ``layers/0/attn/q/kernel``, with the same rules and errors as `lora_jax.split`. Each
    targeted layer gets ``lora_a`` ``(*in, rank)`` and ``lora_b`` ``(rank, *out)`` and, when
    called, adds ``s·((dropout(x) @ a) @ b)`` to its untouched output: ``W + a@b`` is never
    formed. With ``b = 0`` at init the model's outputs are unchanged, bit for bit. A DoRA
    or lora_bias config adds ``lora_magnitude`` / ``lora_bias`` LoRAParams too, computed
    as in `lora_jax.LoraConfig` (not on an ``nnx.Einsum``: the pure form serves those).
    `model.eval()` turns LoRA dropout off, `model.train()` on.

    Args:
        model: the NNX model; it must not carry adapters already.
        config: which kernels to adapt and how (rank, alpha, dropout...); only to create
            adapters, with `key`.
        key: PRNG key for new adapters (as in `lora_jax.split`: each target's key is
            folded from its path).
        lora: existing adapters to attach instead of `config` (from `lora_state`,
            `lora_jax.load_adapter`, `lora_jax.peft.import_adapter`, training in the pure
            form...), keyed by kernel path; each runs with its own scale and dropout.
        rngs: the ``lora_dropout`` (or default) stream for LoRA dropout; needed only when
            an adapter has dropout > 0.

    Returns:
        `model` itself, now with adapters.

    Raises:
        ValueError: a pattern matches nothing, a rank is too large, an adapter does not
            fit its kernel, a target is not in a supported layer, the model already
            carries adapters, or an adapter has dropout and `rngs` is not given.
        TypeError: `model` is not an nnx.Module; `config` is not a `LoraConfig`; neither
            `config` nor `lora` is given, or `lora` with `config` or `key`; `key` is
            missing for new adapters.

    Example:
        >>> import jax, jax.numpy as jnp, optax, lora_jax as lj
        >>> from flax import nnx
        >>> model = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
        >>> x = jnp.ones((2, 4))
        >>> y = model(x)
        >>> config = lj.LoraConfig(rank=2, alpha=4.0, targets="kernel")
        >>> lj.nnx.add_lora(model, config, key=jax.random.key(1))
        LoraLinear(...)
        >>> bool((model(x) == y).all()), model.lora_a.shape, model.lora_b.shape
        (True, (4, 2), (2, 3))
        >>> optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.LoRAParam)
    """
    check_module(model, "add_lora")
    _check_arguments(config, key, lora)
    present = [p for p, _ in adapted_modules(model)]
    if present:
        raise ValueError(
            f"the model already carries adapters at {present[:5]}; call "
            f"lj.nnx.remove_lora(model) first (or update them with nnx.update)."
        )
    params = nnx.state(model, nnx.Param)
    found = layers(model)
    frozen = params
    if lora is None:
        frozen, lora = _created(params, config, key, found)
    adapters = flatten_lora(lora)
    check_single(adapters, "add_lora")
    check_fits(flatten(frozen), adapters)
    for path, w in adapters.items():
        einsum = path in found and layer_class(original_class(found[path][0])) is nnx.Einsum
        if (w.magnitude is not None or w.bias is not None) and einsum:
            raise ValueError(
                f"{path}: DoRA and lora_bias adapters of an nnx.Einsum run in the pure NNX "
                f"form, not in place (its output features need not be the trailing axes): "
                f"graphdef, state = nnx.split(model); frozen, lora = lj.split(state, config, "
                f"key=..., layouts=lj.nnx.infer_layouts(model)); then "
                f"lj.nnx.lora_apply(graphdef)(frozen, lora, x)."
            )
        if path not in found:
            raise _unsupported_error(path, _owner(model, path))
        if _axes(found[path][2]) != _axes(w.layout):
            raise ValueError(
                f"{path}: the adapter's layout {w.layout} does not fit the layer's "
                f"{found[path][2]}."
            )
    stream = _dropout_stream(adapters, rngs)
    if frozen is not params:  # residual inits (PiSSA) change the base
        nnx.update(model, frozen)
    for path, w in adapters.items():
        module, param, _ = found[path]
        attach(module, w, param, w.dropout, stream)
    return model


def lora_state(model: nnx.Module) -> tuple[nnx.State, dict[str, Any]]:
    """The model's base parameters and adapters, as the pure functions take them.

    Args:
        model: an NNX model with adapters (from `add_lora`).

    Returns:
        ``(frozen, lora)``: `frozen` is ``nnx.state`` of the model's `nnx.Param`s other
        than LoRA's (the same arrays, no copies); `lora` holds a `LoraWeights` at each
        adapted kernel path, with the scale and dropout rate the layer runs, like
        `lora_jax.split` makes from ``nnx.split(model)[1]``.

    Raises:
        TypeError: `model` is not an nnx.Module.

    Example:
        >>> import jax, lora_jax as lj
        >>> from flax import nnx
        >>> model = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
        >>> config = lj.LoraConfig(rank=2, alpha=4.0, targets="kernel")
        >>> frozen, lora = lj.nnx.lora_state(lj.nnx.add_lora(model, config, key=jax.random.key(1)))
        >>> lora["kernel"].a.shape, lora["kernel"].scale, lj.summary(frozen, lora).trainable
        ((4, 2), 2.0, 14)
    """
    check_module(model, "lora_state")
    frozen = nnx.state(model, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam)))
    adapters = {path: adapter_of(m) for path, m in adapted_modules(model)}
    return frozen, nest(adapters)


def model_routes(model: nnx.Module) -> dict[str, str]:
    """``{kernel path: "factored (<Layer>)"}`` for a model with adapters in place (every
    adapted layer computes its low-rank path factored)."""
    check_module(model, "model_routes")
    return {p: f"factored ({original_class(m).__name__})" for p, m in adapted_modules(model)}


def remove_lora(model: nnx.Module, *, merge: bool = False) -> nnx.Module:
    """Takes the adapters out of an NNX model, in place; with ``merge=True`` folds them in.

    Args:
        model: an NNX model with adapters (from `add_lora`).
        merge: add ``s·a@b`` to each adapted kernel first (PEFT's ``merge_and_unload``),
            with each adapter's own scale s, so the plain model computes what the adapted
            one did.

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
        >>> lj.nnx.remove_lora(lj.nnx.add_lora(model, config, key=jax.random.key(1)), merge=True)
        Linear(...)
    """
    check_module(model, "remove_lora")
    for _, module in list(adapted_modules(model)):
        if merge:
            merge_into(module, adapter_of(module))
        detach(module)
    return model


def infer_layouts(model: Any, state: Any = None) -> dict[str, Layout]:
    """The layout of every supported layer's kernel, read from the layers (no inputs).

    Args:
        model: an ``nnx.Module``, or an ``nnx.GraphDef`` with its `state`.
        state: the state for a graphdef; unused for a module.

    Returns:
        ``{path: Layout}``; pass it to `lora_jax.split` as ``layouts=``.

    Raises:
        TypeError: `model` is neither an nnx.Module nor an nnx.GraphDef.

    Example:
        >>> import jax, lora_jax as lj
        >>> from flax import nnx
        >>> model = nnx.LinearGeneral(8, (2, 4), rngs=nnx.Rngs(0))
        >>> lj.nnx.infer_layouts(model)["kernel"]
        Layout(kind='dense', in_axes=(0,), out_axes=(1, 2), stack_axes=())
    """
    if isinstance(model, nnx.GraphDef):
        model = nnx.merge(model, state, copy=True)
    check_module(model, "infer_layouts")
    return {p: layout for p, (_, _, layout) in layers(model).items()}
