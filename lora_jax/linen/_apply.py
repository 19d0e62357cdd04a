"""`lora_apply` for Flax linen: run a model with adapters, factored wherever a layer is visible.

The adapters of linen layers ride next to their kernel in the ``params`` collection for the
duration of the call (`lora_jax.linen._inject`), and `flax.linen.intercept_methods` adds
``s·((dropout(x) @ a) @ b)`` to each layer's untouched output. Which adapters a layer
consumes is decided before the call, by one abstract trace per structure (`plan`); every
other adapted parameter is merged (``W + s·a@b``) before the call: same numbers, but it
costs a weight-sized gradient.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from lora_jax.core._abstract import eval_shape
from lora_jax.core._config import DROPOUT_RNG
from lora_jax.core._layout import Layout
from lora_jax.core._packed import has_packed
from lora_jax.core._paths import flatten
from lora_jax.core._use import call as rewrite_call
from lora_jax.core._use import describe, dropout_for, kernel_uses, warn_merged
from lora_jax.core._weights import LoraWeights, check_fits, flatten_lora
from lora_jax.linen._inject import (
    A_SUFFIX,
    B_SUFFIX,
    adapted,
    check_variables,
    dropout_rates,
    inject,
    layer_input,
)

__all__ = ["call_signature", "lora_apply", "plan", "rewrite_dropout", "routes"]


def _interceptor(adapters: Mapping[str, LoraWeights], rates: Mapping[str, float]) -> Callable:
    """Adds ``s·((dropout(x) @ a) @ b)`` to each supported layer that carries an adapter."""

    def intercept(next_fun, args, kwargs, context):
        found = adapted(context, args, kwargs)
        if found is None:
            return next_fun(*args, **kwargs)
        module, site, a, b, path, x = found
        y = next_fun(*args, **kwargs)
        x = layer_input(module, path, x, y.dtype, rates.get(path, 0.0))
        d = site.low_rank.delta(x, a.astype(y.dtype), b.astype(y.dtype), adapters[path].scale)
        return y + d.astype(y.dtype)

    return intercept


def _run(
    apply_fn: Callable[..., Any],
    frozen: Any,
    adapters: Mapping[str, LoraWeights],
    factored: frozenset[str],
    rates: Mapping[str, float],
    args: tuple,
    kwargs: dict,
    found: dict[str, set[str]],
) -> Any:
    """One call: adapters of stock layers injected next to their kernels (the interceptor
    adds their low-rank path); every other adapter through the contraction rewrite, which
    adds it factored wherever a contraction uses its kernel and merged elsewhere."""
    entries = {}
    for path in factored:
        entries[path + A_SUFFIX], entries[path + B_SUFFIX] = adapters[path].a, adapters[path].b
    variables = inject(frozen, entries) if entries else frozen

    def call_model(variables_: Any, *args_: Any, **kwargs_: Any) -> Any:
        with nn.intercept_methods(_interceptor(adapters, rates)):
            return apply_fn(variables_, *args_, **kwargs_)

    rest = {p: w for p, w in adapters.items() if p not in factored}
    if not rest and not has_packed(frozen):
        return call_model(variables, *args, **kwargs)
    dropout = rewrite_dropout(kwargs, {p: rates.get(p, 0.0) for p in rest})
    return rewrite_call(call_model, variables, rest, args, kwargs, found, dropout=dropout)


def rewrite_dropout(kwargs: Mapping[str, Any], rates: Mapping[str, float]) -> tuple | None:
    """The rewrite's LoRA dropout: its own stream folded off the call's ``lora_dropout``
    key (the layers draw theirs through Flax), or None when no adapter runs dropout."""
    rngs = kwargs.get("rngs")
    return dropout_for(rngs.get(DROPOUT_RNG) if isinstance(rngs, Mapping) else None, rates)


def _injectable(apply_fn: Any, frozen: Any, adapters: Mapping[str, Any]) -> frozenset[str]:
    """Adapters that may ride next to their kernel: a linen module's ``params`` only (any
    other function of a tree that happens to have a ``params`` key goes to the rewrite)."""
    if not isinstance(getattr(apply_fn, "__self__", None), nn.Module):
        return frozenset()
    if not isinstance(frozen, Mapping) or has_packed(frozen):
        return frozenset()  # a packed kernel is unpacked where it is used: the rewrite
    # DoRA and lora_bias change the layer's output beyond an added term: the rewrite serves them
    plain = (p for p, w in adapters.items() if w.magnitude is None and w.bias is None)
    return frozenset(p for p in plain if p.startswith("params/"))


def _as_layer(layer: Layout, adapter: Layout) -> bool:
    """Whether an adapter is laid out as the layer contracts its kernel (up to leading
    scanned axes). One adapter per slice of a stacked-projection kernel is not: the
    contraction rewrite serves it."""
    n = len(adapter.stack_axes)
    return adapter.stack_axes == tuple(range(n)) and layer.restack(n).perm == adapter.perm


def plan(
    apply_fn: Callable[..., Any], frozen: Any, lora: Any, args: tuple, kwargs: dict
) -> dict[str, str]:
    """``{path: layer class}`` of the adapters a supported layer consumes in this call,
    and nothing else reads.

    One trace of the program (no FLOPs) with every injectable adapter placed next to its
    kernel; works on concrete arrays and on tracers alike.
    """
    adapters = flatten_lora(lora)
    candidates = _injectable(apply_fn, frozen, adapters)
    if not candidates:
        return {}
    seen: dict[str, str] = {}
    calls: dict[str, int] = {}

    def count(next_fun, args_, kwargs_, context):
        found = adapted(context, args_, kwargs_)
        if found is not None and _as_layer(found[1].low_rank.layout, adapters[found[4]].layout):
            seen[found[4]] = type(found[0]).__name__
            calls[found[4]] = calls.get(found[4], 0) + 1
        return next_fun(*args_, **kwargs_)

    def traced(variables_: Any, *args_: Any, **kwargs_: Any) -> Any:
        with nn.intercept_methods(count):
            return apply_fn(variables_, *args_, **kwargs_)

    entries = {}
    for path in candidates:
        entries[path + A_SUFFIX], entries[path + B_SUFFIX] = adapters[path].a, adapters[path].b
    _, uses = kernel_uses(traced, inject(frozen, entries), args, kwargs)
    # A kernel the program also reads outside its layer (x @ embed.embedding.T) goes to
    # the rewrite for every use: the layer alone would miss the others.
    return {p: cls for p, cls in seen.items() if uses.get(p, 0) <= calls[p]}


def call_signature(tree: Any) -> tuple:
    """A hashable key for a call's structure: the tree structure, array shapes and dtypes,
    and every other leaf's value (flags such as ``train=True`` change what runs)."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    sig: list[tuple[Any, Any]] = []
    for leaf in leaves:
        if hasattr(leaf, "shape") and hasattr(leaf, "dtype"):
            sig.append((tuple(np.shape(leaf)), str(leaf.dtype)))
        else:
            try:
                hash(leaf)
                sig.append((type(leaf).__name__, leaf))
            except TypeError:
                sig.append((type(leaf).__name__, id(leaf)))
    return treedef, tuple(sig)


def lora_apply(apply_fn: Callable[..., Any], *, deterministic: bool = False) -> Callable[..., Any]:
    """Wraps a Flax linen ``model.apply`` so it runs the base plus the adapters.

    See `lora_jax.lora_apply` (which also takes an NNX graphdef) for the full contract.

    Args:
        apply_fn: the model's apply function, ``apply_fn(variables, *args, **kwargs)``.
        deterministic: never run LoRA dropout (evaluation), and do not warn about it.

    Returns:
        ``apply(frozen, lora, *args, **kwargs)``, returning what `apply_fn` returns.

    Example:
        >>> import jax, jax.numpy as jnp, flax.linen as nn, lora_jax as lj
        >>> model, x = nn.Dense(3), jnp.ones((2, 4))
        >>> variables = model.init(jax.random.key(0), x)
        >>> config = lj.LoraConfig(rank=2, targets=".*/kernel")
        >>> frozen, lora = lj.split(variables, config, key=jax.random.key(1))
        >>> lj.linen.lora_apply(model.apply)(frozen, lora, x).shape
        (2, 3)
    """
    if not callable(apply_fn):
        raise TypeError(
            f"`apply_fn` must be a model's apply function (model.apply) or an NNX graphdef; "
            f"found {type(apply_fn).__name__}."
        )
    plans: dict[tuple, frozenset[str]] = {}
    warned: set[tuple] = set()

    def apply(frozen: Any, lora: Any, *args: Any, **kwargs: Any) -> Any:
        adapters = flatten_lora(lora)
        check_variables(apply_fn, frozen, list(adapters))
        check_fits(flatten(frozen), adapters)
        key = call_signature((frozen, lora, args, kwargs))
        if key not in plans:
            plans[key] = frozenset(plan(apply_fn, frozen, lora, args, kwargs))
        factored = plans[key]
        rates = dropout_rates({p: w.dropout for p, w in adapters.items()}, kwargs, deterministic)
        found: dict[str, set[str]] = {}
        out = _run(apply_fn, frozen, adapters, factored, rates, args, kwargs, found)
        warn_merged(found, warned, key)
        return out

    return apply


def routes(
    apply_fn: Callable[..., Any], frozen: Any, lora: Any, *args: Any, **kwargs: Any
) -> dict[str, str]:
    """``{path: "factored (<Layer>)" | "merged"}`` for a linen model: see `lora_jax.routes`.

    Args:
        apply_fn: the model's apply function.
        frozen: the base from `lora_jax.split`.
        lora: the adapters.
        *args: example inputs for `apply_fn`.
        **kwargs: keyword arguments for `apply_fn`.

    Returns:
        ``{path: route}`` for every adapter, in tree order.

    Example:
        >>> import jax, jax.numpy as jnp, flax.linen as nn, lora_jax as lj
        >>> model, x = nn.Dense(3), jnp.ones((2, 4))
        >>> variables = model.init(jax.random.key(0), x)
        >>> config = lj.LoraConfig(rank=2, targets=".*/kernel")
        >>> frozen, lora = lj.split(variables, config, key=jax.random.key(1))
        >>> lj.linen.routes(model.apply, frozen, lora, x)
        {'params/kernel': 'factored (Dense)'}
    """
    adapters = flatten_lora(lora)
    check_variables(apply_fn, frozen, list(adapters))
    check_fits(flatten(frozen), adapters)
    seen = plan(apply_fn, frozen, lora, args, kwargs)
    found: dict[str, set[str]] = {p: {f"factored ({cls})"} for p, cls in seen.items()}
    factored = frozenset(seen)
    if set(adapters) - factored:
        rates = {p: 0.0 for p in adapters}
        run = lambda f, lo, a, k: _run(apply_fn, f, flatten_lora(lo), factored, rates, a, k, found)
        eval_shape(run, frozen, lora, args, kwargs)
    return {p: describe(found, p) for p in adapters}
