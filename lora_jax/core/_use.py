"""Entry points of the contraction rewrite: run a function of a params tree with adapters
added factored wherever a contraction uses their kernels (`call`), and learn each kernel's
layout from the contractions that use it (`layouts_from_use`)."""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np

from lora_jax.core._layout import Layout
from lora_jax.core._learn import learn
from lora_jax.core._packed import is_packed
from lora_jax.core._paths import path_str
from lora_jax.core._rewrite import Interpreter
from lora_jax.core._views import Current, View
from lora_jax.core._weights import LoraWeights

__all__ = [
    "call",
    "dropout_for",
    "describe",
    "kernel_uses",
    "layouts_from_use",
    "rewrite",
    "trace",
    "warn_merged",
]

# Folded into a call's lora_dropout key for the masks the contraction rewrite draws (the
# framework layers draw theirs from the key itself).
REWRITE_STREAM = 0x10A5


def dropout_for(key: Any, rates: Mapping[str, float]) -> tuple | None:
    """`rewrite`'s ``dropout``: a stream folded off a call's ``lora_dropout`` key (the
    framework layers draw theirs from the key itself) and the rates, or None when no
    adapter runs dropout."""
    if key is None or not any(r > 0.0 for r in rates.values()):
        return None
    return jax.random.fold_in(key, REWRITE_STREAM), dict(rates)


def _traceable(leaves: list) -> list:
    """The leaves as the program sees them: a packed kernel as its float shape and dtype."""
    return [jax.ShapeDtypeStruct(x.shape, x.dtype) if is_packed(x) else x for x in leaves]


def trace(fn: Callable[..., Any], leaves: list, dynamic: list) -> tuple[Any, Any]:
    """The closed jaxpr of ``fn(leaves, dynamic)`` and its output tree structure."""
    closed, shape = jax.make_jaxpr(fn, return_shape=True)(_traceable(leaves), dynamic)
    return closed, jax.tree.structure(shape)


def rewrite(
    fn: Callable[[list, list], Any],
    leaves: list,
    dynamic: list,
    adapted: Mapping[int, tuple[str, LoraWeights]],
    routes: dict[str, set[str]] | None = None,
    *,
    dropout: tuple[Any, Mapping[str, float]] | None = None,
    mix: tuple[Any, Mapping[str, Any]] | None = None,
) -> Any:
    """``fn(leaves, dynamic)`` with the adapters of `adapted` added factored where they can.

    Args:
        fn: a function of two lists of arrays (the params leaves and the other inputs).
        leaves: the params leaves (the base kernels, never copied).
        dynamic: the other array inputs.
        adapted: ``{leaf index: (path, LoraWeights)}``.
        routes: filled with ``{path: {how each use was served}}``.
        dropout: ``(key, {path: rate})``: LoRA dropout on the low-rank inputs; None for none.
        mix: ``(rows, {path: gains})`` for a mixed batch: k stacked adapters, example i
            with adapter ``rows[i]`` times ``gains[path][i]`` (which carries its scale).

    Returns:
        What `fn` returns.
    """
    closed, tree = trace(fn, leaves, dynamic)
    key, rates = dropout if dropout is not None else (None, {})
    adapters = {}
    for path, w in adapted.values():
        rate = rates.get(path, 0.0)
        cur = Current(w.a, w.b, w.layout, w.scale, path, rate, None, None, w.magnitude, w.bias)
        if mix is not None and (w.magnitude is not None or w.bias is not None):
            raise ValueError(
                f"{path}: a mixed batch cannot serve DoRA or lora_bias adapters (each example "
                f"would need its own weight norm); run each adapter with lj.lora_apply."
            )
        if mix is not None:
            cur = dataclasses.replace(cur, scale=1.0, rows=mix[0], gains=mix[1][path])
        adapters[path] = cur
    views: list[View | None] = [None] * (len(leaves) + len(jax.tree.leaves(dynamic)))
    for i, (path, w) in adapted.items():
        views[i] = View(path, tuple(range(w.layout.ndim)))
    args = list(leaves) + jax.tree.leaves(dynamic)
    interp = Interpreter(routes if routes is not None else {}, key)
    outs = interp.run(closed.jaxpr, closed.consts, args, views, adapters)
    return jax.tree.unflatten(tree, outs)


def _is_array(x: Any) -> bool:
    arrays = (jax.Array, np.ndarray, np.generic, jax.ShapeDtypeStruct)
    return isinstance(x, arrays) or hasattr(x, "aval")


def _program(fn: Callable[..., Any], variables: Any, args: tuple, kwargs: Mapping[str, Any]):
    """``(run, leaves, dynamic, names)``: `fn` as a function of the params leaves and the
    array inputs (the rest of `args`/`kwargs` stays Python values), and the leaf paths."""
    with_paths, tree = jax.tree_util.tree_flatten_with_path(variables, is_leaf=is_packed)
    names = [path_str(kp) for kp, _ in with_paths]
    rest, rest_tree = jax.tree_util.tree_flatten((args, dict(kwargs)))
    dyn_index = [i for i, x in enumerate(rest) if _is_array(x)]

    def run(leaves_: list, dynamic: list) -> Any:
        full = list(rest)
        for i, value in zip(dyn_index, dynamic, strict=True):
            full[i] = value
        a, k = jax.tree_util.tree_unflatten(rest_tree, full)
        return fn(jax.tree_util.tree_unflatten(tree, leaves_), *a, **k)

    leaves = [x for _, x in with_paths]
    return run, leaves, [rest[i] for i in dyn_index], names


def call(
    fn: Callable[..., Any],
    variables: Any,
    adapters: Mapping[str, LoraWeights],
    args: tuple,
    kwargs: Mapping[str, Any],
    routes: dict[str, set[str]] | None = None,
    **options: Any,
) -> Any:
    """``fn(variables, *args, **kwargs)`` with `adapters` (keyed by their `/`-joined path
    in `variables`) added factored wherever a contraction uses their kernel.

    Array leaves of `args`/`kwargs` are traced inputs; everything else (flags, strings,
    methods) stays a Python value.

    Args:
        fn: the function, e.g. a Flax ``model.apply``.
        variables: its params tree (the base; never copied).
        adapters: ``{path: LoraWeights}``.
        args: positional inputs.
        kwargs: keyword inputs.
        routes: filled with ``{path: {how each use was served}}``.
        **options: `rewrite`'s ``dropout`` and ``mix``.

    Returns:
        What `fn` returns.
    """
    run, leaves, dynamic, names = _program(fn, variables, args, kwargs)
    missing = sorted(set(adapters) - set(names))
    if missing:
        raise ValueError(f"adapters for {missing} have no parameter in `variables`.")
    adapted = {names.index(p): (p, w) for p, w in adapters.items()}
    return rewrite(run, leaves, dynamic, adapted, routes, **options)


def kernel_uses(
    fn: Callable[..., Any], variables: Any, args: tuple, kwargs: Mapping[str, Any]
) -> tuple[dict[str, Layout], dict[str, int]]:
    """``(layouts, uses)``: `layouts_from_use`, and how many operations (other than casts,
    transposes and control flow) read each float kernel in one trace of the program."""
    run, leaves, dynamic, names = _program(fn, variables, args, kwargs)
    closed = jax.make_jaxpr(run)(_traceable(leaves), dynamic)
    kernels = {}
    for var, path, leaf in zip(closed.jaxpr.invars, names, leaves, strict=False):
        dtype = getattr(leaf, "dtype", None)
        if dtype is not None and np.ndim(leaf) >= 2 and jax.numpy.issubdtype(dtype, np.floating):
            kernels[var] = (path, tuple(np.shape(leaf)))
    return learn(closed.jaxpr, kernels)


def layouts_from_use(
    fn: Callable[..., Any], variables: Any, args: tuple, kwargs: Mapping[str, Any]
) -> dict[str, Layout]:
    """The layout of every float kernel (2+ axes) of `variables` that a contraction in
    ``fn(variables, *args, **kwargs)`` uses, read from the traced program (no FLOPs).

    Args:
        fn: the function.
        variables: its params tree.
        args: example positional inputs (arrays or `jax.ShapeDtypeStruct`).
        kwargs: keyword inputs.

    Returns:
        ``{path: Layout}`` (kind ``"einsum"``, or ``"embed"`` for a table read by rows).
    """
    return kernel_uses(fn, variables, args, kwargs)[0]


def describe(found: Mapping[str, set[str]], path: str) -> str:
    """One route string from the ways a kernel's uses were served."""
    ways = sorted(found.get(path, ()))
    return "; ".join(ways) if ways else "unused (no operation reads this kernel)"


def warn_merged(found: Mapping[str, set[str]], warned: set, key: Any) -> None:
    """The one-time warning (per `key`) listing the adapters merged for some use."""
    merged = sorted(p for p, ways in found.items() if any(w.startswith("merged") for w in ways))
    if merged and (key, tuple(merged)) not in warned:
        warned.add((key, tuple(merged)))
        listing = ", ".join(f"{p} ({describe(found, p)})" for p in merged)
        warnings.warn(
            f"{len(merged)} adapter(s) run merged for some uses (a weight-sized gradient "
            f"there): {listing}. lj.routes tells why.",
            stacklevel=3,
        )
