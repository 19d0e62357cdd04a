"""The pure form for Flax NNX: `lora_apply` and `routes` on ``nnx.split`` state.

``graphdef, state = nnx.split(model)``; ``frozen, lora = lj.split(state, config, key=...,
layouts=lj.nnx.infer_layouts(model))``; ``lj.nnx.lora_apply(graphdef)(frozen, lora, x)``
rebuilds the model from `frozen` for the call (`nnx.merge` into new `Variable`s around the
same arrays, so the inputs never change), gives each supported layer its adapter as
`lora_jax.nnx.add_lora` does, merges the others, and calls it. Which adapters run factored
is read from the layers before the call. Gradients flow to `lora` only; `frozen` is an
input. Each adapter brings its own scale and dropout rate: no config.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import jax
from flax import nnx

from lora_jax.core._abstract import eval_shape
from lora_jax.core._config import DROPOUT_RNG
from lora_jax.core._packed import has_packed
from lora_jax.core._paths import flatten, replace
from lora_jax.core._use import call as rewrite_call
from lora_jax.core._use import dropout_for, kernel_uses, warn_merged
from lora_jax.core._weights import LoraWeights, check_fits, flatten_lora
from lora_jax.nnx._layers import LAYER_CALLS, adapted_modules, attach, check_single, layers

__all__ = [
    "call_method",
    "dropout_rates",
    "lora_apply",
    "plan",
    "rewrite_dropout",
    "routes",
]


def _same_axes(a: Any, b: Any) -> bool:
    return (a.stack_axes, a.in_axes, a.out_axes) == (b.stack_axes, b.in_axes, b.out_axes)


def plan(model: Any, adapters: Mapping[str, LoraWeights]) -> dict[str, tuple | None]:
    """``{path: (module, parameter name) or None}``: the layer that takes each adapter
    factored, or None where it must be merged."""
    if any(True for _ in adapted_modules(model)):
        raise ValueError(
            "this graphdef already carries adapters (add_lora was called before "
            "nnx.split): pass the graphdef of the model without them, or call the model."
        )
    found = layers(model)
    out: dict[str, tuple | None] = {}
    for path, w in adapters.items():
        hit = found.get(path)
        plain = w.magnitude is None and w.bias is None  # DoRA, lora_bias: the rewrite
        out[path] = hit[:2] if hit is not None and plain and _same_axes(hit[2], w.layout) else None
    return out


def dropout_rates(
    adapters: Mapping[str, LoraWeights], rngs: Any, deterministic: bool
) -> tuple[dict[str, float], Any]:
    """The dropout rate each adapter runs with in this call, and the stream it draws from.

    Adapters carry their rate; it runs when the call has ``rngs={"lora_dropout": key}``.
    An adapter with a rate but no such rng in a non-deterministic call is a warning (it
    would otherwise silently train without dropout); the NNX counterpart of linen's.

    Raises:
        ValueError: `rngs` holds anything other than the ``lora_dropout`` key.
    """
    if rngs is not None and (not isinstance(rngs, Mapping) or set(rngs) - {DROPOUT_RNG}):
        raise ValueError(
            f"`rngs` takes only {{{DROPOUT_RNG!r}: key}} for an NNX model (its own streams "
            f"live in its state); found {rngs!r}."
        )
    off = {p: 0.0 for p in adapters}
    wanting = sorted(p for p, w in adapters.items() if w.dropout > 0.0)
    if deterministic or not wanting:
        return off, None
    if rngs is None or DROPOUT_RNG not in rngs:
        warnings.warn(
            f"{len(wanting)} adapter(s) have LoRA dropout (e.g. {wanting[0]!r}, rate "
            f"{adapters[wanting[0]].dropout}) but the call has no {DROPOUT_RNG!r} rng, so no "
            f"dropout runs. Pass rngs={{{DROPOUT_RNG!r}: key}} to train with it, or make the "
            f"apply function with lj.nnx.lora_apply(graphdef, deterministic=True) for "
            f"evaluation.",
            stacklevel=3,
        )
        return off, None
    stream = nnx.Rngs(**{DROPOUT_RNG: rngs[DROPOUT_RNG]})[DROPOUT_RNG]
    return {p: w.dropout for p, w in adapters.items()}, stream


def _with_adapters(
    graphdef: nnx.GraphDef,
    frozen: Any,
    adapters: dict[str, LoraWeights],
    rates: Any,
    stream: Any,
    skip: frozenset[str] = frozenset(),
) -> tuple[nnx.Module, list[str]]:
    """The model rebuilt from `frozen` with its supported layers carrying their adapters,
    and the paths of every other adapter (and of `skip`: served by the contraction
    rewrite)."""
    model = nnx.merge(graphdef, frozen, copy=True)  # new Variables: the inputs stay as they are
    rest = []
    for path, hit in plan(model, adapters).items():
        if hit is None or path in skip:
            rest.append(path)
        else:
            attach(hit[0], adapters[path], hit[1], rates[path], stream)
    return model, sorted(rest)


def call_method(model: nnx.Module, method: Any, args: tuple, kwargs: dict) -> Any:
    """``model.method(*args, **kwargs)``: `method` a name or a function of the model."""
    call = getattr(model, method) if isinstance(method, str) else functools.partial(method, model)
    return call(*args, **kwargs)


def _direct_reads(
    graphdef: nnx.GraphDef, frozen: Any, adapters: dict, method: Any, args: tuple, kwargs: dict
) -> frozenset[str]:
    """Supported layers' kernels that the program also reads outside the layer (a tied
    ``x @ embed.embedding.T``): one trace counting each kernel's reads against its layer's
    calls. The layer alone would miss those reads, so they go to the rewrite."""
    ids: dict[int, str] = {}

    def program(values_: dict, *args_: Any, **kwargs_: Any) -> Any:
        model = nnx.merge(graphdef, replace(frozen, values_), copy=True)
        for path, hit in plan(model, adapters).items():
            if hit is not None:
                attach(hit[0], adapters[path], hit[1], 0.0, None)
                ids[id(hit[0])] = path
        return call_method(model, method, args_, kwargs_)

    counts: dict[int, int] = {}
    token = LAYER_CALLS.set(counts)
    try:
        _, uses = kernel_uses(program, flatten(frozen), args, kwargs)
    finally:
        LAYER_CALLS.reset(token)
    calls: dict[str, int] = {}
    for i, n in counts.items():
        calls[ids[i]] = calls.get(ids[i], 0) + n
    return frozenset(p for p in set(ids.values()) if uses.get(p, 0) > calls.get(p, 0))


def _run(
    graphdef: nnx.GraphDef,
    frozen: Any,
    adapters: dict[str, LoraWeights],
    rates: Any,
    stream: Any,
    method: Any,
    args: tuple,
    kwargs: dict,
    found: dict[str, set[str]],
) -> Any:
    """One call: supported layers factored in place; every other adapter, and any whose
    kernel the program also reads outside its layer, through the contraction rewrite over
    the state's values (factored at each contraction)."""
    if has_packed(frozen):  # unpacked where used: every adapter goes through the rewrite
        rest, supported = sorted(adapters), {}
    else:
        direct = _direct_reads(graphdef, frozen, adapters, method, args, kwargs)
        model, rest = _with_adapters(graphdef, frozen, adapters, rates, stream, direct)
        if not rest:
            return call_method(model, method, args, kwargs)
        supported = {p: w for p, w in adapters.items() if p not in rest}
    values = flatten(frozen)

    def program(values_: dict, *args_: Any, **kwargs_: Any) -> Any:
        state = replace(frozen, values_)
        model_, _ = _with_adapters(graphdef, state, supported, rates, stream)
        return call_method(model_, method, args_, kwargs_)

    dropout = rewrite_dropout(stream, {p: rates[p] for p in rest})
    served = {p: adapters[p] for p in rest}
    return rewrite_call(program, values, served, args, kwargs, found, dropout=dropout)


def rewrite_dropout(stream: Any, rates: Mapping[str, float]) -> tuple | None:
    """The contraction rewrite's LoRA dropout for a call with the `lora_dropout` `stream`
    (None: no dropout): a key drawn from it, only when some adapter runs dropout."""
    wanted = stream is not None and any(r > 0.0 for r in rates.values())
    return dropout_for(stream() if wanted else None, rates)


def _checked(frozen: Any, lora: Any, where: str) -> dict[str, LoraWeights]:
    adapters = flatten_lora(lora)
    check_single(adapters, where)
    check_fits(flatten(frozen), adapters)
    return adapters


def lora_apply(graphdef: nnx.GraphDef, *, deterministic: bool = False) -> Callable[..., Any]:
    """`lora_jax.lora_apply` for an NNX graphdef: runs the model with its adapters.

    Args:
        graphdef: from ``graphdef, state = nnx.split(model)``, of a model without adapters.
        deterministic: never run LoRA dropout, and do not warn about it (evaluation).

    Returns:
        ``apply(frozen, lora, *args, rngs=None, method="__call__", **kwargs)``: calls
        ``method`` of the model rebuilt from `frozen` with `lora`. ``rngs`` takes only
        ``{"lora_dropout": key}``: adapters with dropout run it then; without it they warn
        (no dropout runs) unless `deterministic`.

    Example:
        >>> import jax, jax.numpy as jnp, lora_jax as lj
        >>> from flax import nnx
        >>> model = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
        >>> graphdef, state = nnx.split(model)
        >>> config = lj.LoraConfig(rank=2, targets="kernel")
        >>> frozen, lora = lj.split(state, config, key=jax.random.key(1))
        >>> x = jnp.ones((2, 4))
        >>> bool((lj.nnx.lora_apply(graphdef)(frozen, lora, x) == model(x)).all())
        True
    """

    warned: set[tuple] = set()

    def apply(
        frozen: Any,
        lora: Any,
        *args: Any,
        rngs: Mapping[str, Any] | None = None,
        method: str | Callable[..., Any] = "__call__",
        **kwargs: Any,
    ) -> Any:
        adapters = _checked(frozen, lora, "lora_apply")
        rates, stream = dropout_rates(adapters, rngs, deterministic)
        found: dict[str, set[str]] = {}
        out = _run(graphdef, frozen, adapters, rates, stream, method, args, kwargs, found)
        warn_merged(found, warned, jax.tree.structure(lora))
        return out

    return apply


def routes(
    graphdef: nnx.GraphDef,
    frozen: Any,
    lora: Any,
    *args: Any,
    method: str | Callable[..., Any] = "__call__",
    **kwargs: Any,
) -> dict[str, str]:
    """Which path each adapter takes in `lora_apply`.

    ``"factored (<Layer>)"`` for a supported NNX layer (read from the layers, no inputs
    needed); a raw ``nnx.Param``, or a layer's kernel the program also reads outside the
    layer, goes through the contraction rewrite, whose route per use
    (``"factored (dot_general)"``, ``"merged (used by ...)"``) shows with example inputs.

    Args:
        graphdef: from ``nnx.split(model)``, of a model without adapters.
        frozen: the base (``nnx.split(model)[1]``, or `frozen` from `lora_jax.split`).
        lora: the adapters.
        *args: example inputs (optional; needed to see how raw parameters are used).
        method: the model method `lora_apply` will call.
        **kwargs: keyword inputs for it.

    Returns:
        ``{path: route}`` for every adapter.

    Example:
        >>> import jax, lora_jax as lj
        >>> from flax import nnx
        >>> graphdef, state = nnx.split(nnx.Linear(4, 3, rngs=nnx.Rngs(0)))
        >>> config = lj.LoraConfig(rank=2, targets="kernel")
        >>> frozen, lora = lj.split(state, config, key=jax.random.key(1))
        >>> lj.nnx.routes(graphdef, frozen, lora)
        {'kernel': 'factored (Linear)'}
    """
    adapters = _checked(frozen, lora, "routes")
    hits = plan(nnx.merge(graphdef, frozen, copy=True), adapters)
    found: dict[str, set[str]] = {}
    direct: frozenset[str] = frozenset()
    if args:
        direct = _direct_reads(graphdef, frozen, adapters, method, args, kwargs)
    if args and (direct or any(hit is None for hit in hits.values())):
        rates = {p: 0.0 for p in adapters}
        run = lambda f, a, k: _run(graphdef, f, adapters, rates, None, method, a, k, found)
        eval_shape(run, frozen, args, kwargs)
    unknown = "the contraction rewrite (give example inputs to see each use)"
    out = {}
    for p, hit in hits.items():
        if hit is not None and p not in direct:
            out[p] = f"factored ({type(hit[0]).__name__})"
        else:
            out[p] = "; ".join(sorted(found.get(p, ()))) or (unknown if not args else "unused")
    return out
