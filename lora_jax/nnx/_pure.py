"""The pure form for Flax NNX: `lora_apply` and `routes` on ``nnx.split`` state.

``graphdef, state = nnx.split(model)``; ``frozen, lora = lj.split(state, config, ...)``;
``lj.lora_apply(graphdef, config)(frozen, lora, x)`` rebuilds the model from `frozen` for
the call (`nnx.merge` into new `Variable`s around the same arrays, so the inputs never
change), gives each supported layer its adapter as in
`lora_jax.add_lora`, and calls it. Gradients flow to `lora` only; `frozen` is an input.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Mapping
from typing import Any

from flax import nnx

from lora_jax.core import _paths
from lora_jax.nnx import _inplace as nnx_lora
from lora_jax.core._config import DROPOUT_RNG, LoraConfig
from lora_jax.core._weights import LoraWeights, check_fits, delta, flatten_lora


def _same_axes(a: Any, b: Any) -> bool:
    return (a.stack_axes, a.in_axes, a.out_axes) == (b.stack_axes, b.in_axes, b.out_axes)


def plan(model: Any, adapters: Mapping[str, LoraWeights]) -> dict[str, tuple | None]:
    """``{path: (module, parameter name) or None}``: the layer that takes each adapter
    factored, or None where it must be merged."""
    if any(True for _ in nnx_lora.adapted_modules(model)):
        raise ValueError(
            "this graphdef already carries adapters (add_lora was called before "
            "nnx.split): pass the graphdef of the model without them, or call the model."
        )
    found = nnx_lora.layers(model)
    out: dict[str, tuple | None] = {}
    for path, w in adapters.items():
        hit = found.get(path)
        out[path] = hit[:2] if hit is not None and _same_axes(hit[2], w.layout) else None
    return out


def _stream(config: LoraConfig, rngs: Any) -> tuple[float, Any]:
    if rngs is None:
        return 0.0, None
    if not isinstance(rngs, Mapping) or set(rngs) - {DROPOUT_RNG}:
        raise ValueError(
            f"`rngs` takes only {{{DROPOUT_RNG!r}: key}} for an NNX model (its own streams "
            f"live in its state); found {rngs!r}."
        )
    if DROPOUT_RNG not in rngs or config.dropout <= 0.0:
        return 0.0, None
    return config.dropout, nnx.Rngs(**{DROPOUT_RNG: rngs[DROPOUT_RNG]})[DROPOUT_RNG]


def with_adapters(
    graphdef: nnx.GraphDef, config: LoraConfig, frozen: Any, lora: Any, rngs: Any = None
) -> nnx.Module:
    """The model rebuilt from `frozen`, its supported layers carrying their adapters and
    every other adapted parameter merged."""
    adapters = flatten_lora(lora)
    flat = _paths.flatten(frozen)
    check_fits(flat, adapters)
    model = nnx.merge(graphdef, frozen, copy=True)  # new Variables: the inputs stay as they are
    rate, stream = _stream(config, rngs)
    merged = {}
    for path, hit in plan(model, adapters).items():
        w = adapters[path]
        scale = config.scale_for(path, w.rank)
        if hit is None:
            merged[path] = flat[path] + delta(w, scale, flat[path].dtype)
        else:
            nnx_lora.attach(hit[0], w, hit[1], scale, rate, stream)
    if merged:
        if rate > 0.0:
            warnings.warn(
                f"LoRA dropout is not applied on merged paths: {sorted(merged)}.", stacklevel=3
            )
        for parts, node in nnx.iter_graph(model):
            name = "/".join(str(p) for p in parts)
            if isinstance(node, nnx.Variable) and name in merged:
                node.set_value(merged[name])
    return model


def lora_apply_nnx(graphdef: nnx.GraphDef, config: LoraConfig) -> Callable[..., Any]:
    """`lora_jax.lora_apply` for an NNX graphdef (see there)."""

    def apply(
        frozen: Any,
        lora: Any,
        *args: Any,
        rngs: Mapping[str, Any] | None = None,
        method: str | Callable[..., Any] = "__call__",
        **kwargs: Any,
    ) -> Any:
        model = with_adapters(graphdef, config, frozen, lora, rngs)
        call = (
            getattr(model, method) if isinstance(method, str) else functools.partial(method, model)
        )
        return call(*args, **kwargs)

    return apply


def routes_nnx(graphdef: nnx.GraphDef, frozen: Any, lora: Any) -> dict[str, str]:
    """`lora_jax.routes` for an NNX graphdef: read from the layers, nothing traced."""
    adapters = flatten_lora(lora)
    check_fits(_paths.flatten(frozen), adapters)
    found = plan(nnx.merge(graphdef, frozen, copy=True), adapters)
    return {
        p: "merged" if hit is None else f"factored ({type(hit[0]).__name__})"
        for p, hit in found.items()
    }
