"""`lora_apply`: run a model with adapters, factored wherever a Flax layer is visible.

The adapters of Flax linen layers are placed next to their kernel in the ``params``
collection for the duration of the call (so `nn.scan`, `nn.vmap` and `nn.remat` slice them
like the kernel), and `flax.linen.intercept_methods` adds ``s·((dropout(x) @ a) @ b)`` to
each layer's untouched output. Every other adapted parameter is merged (``W + s·a@b``)
before the call: same numbers, but it costs a weight-sized gradient.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

from lora_jax import _abstract, _layers, _paths, nnx_apply
from lora_jax.config import DROPOUT_RNG, LoraConfig
from lora_jax.weights import check_fits, delta, flatten_lora

__all__ = ["lora_apply", "routes", "DROPOUT_RNG"]

_A, _B = ":lora_a", ":lora_b"


def _inject(frozen: Mapping, entries: Mapping[str, Any]) -> dict:
    """A shallow copy of `frozen` with extra leaves at the given paths (no array copies)."""
    out = dict(frozen)
    for path, value in entries.items():
        node, parts = out, path.split("/")
        for name in parts[:-1]:
            node[name] = dict(node[name])
            node = node[name]
        node[parts[-1]] = value
    return out


def _dropout(module: nn.Module, path: str, x: jax.Array, rate: float) -> jax.Array:
    if not module.has_rng(DROPOUT_RNG):
        raise ValueError(
            f"{path}: LoRA dropout is on but this layer cannot see the {DROPOUT_RNG!r} rng "
            f"stream. Inside nn.scan/nn.vmap add {DROPOUT_RNG!r} to `split_rngs`."
        )
    keep = jax.random.bernoulli(module.make_rng(DROPOUT_RNG), 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


def _adapted(context: Any, args: tuple, kwargs: dict) -> tuple | None:
    """``(module, site, a, b, kernel path, input)`` of an intercepted call to a supported
    layer that carries an adapter; None for any other call."""
    module = context.module
    site = _layers.site(module, context.method_name, args, kwargs)
    if site is None:
        return None
    a = module.scope.get_variable("params", site.param + _A)
    b = module.scope.get_variable("params", site.param + _B)
    if a is None or b is None:
        return None
    x = args[0] if args else kwargs[site.input_name]
    return module, site, a, b, _layers.kernel_path(module, site.param), x


def _interceptor(scales: Mapping[str, float], rate: float, seen: dict[str, str]) -> Callable:
    """Adds ``s·((dropout(x) @ a) @ b)`` to each supported layer that carries an adapter."""

    def intercept(next_fun, args, kwargs, context):
        found = _adapted(context, args, kwargs)
        if found is None:
            return next_fun(*args, **kwargs)
        module, site, a, b, path, x = found
        seen[path] = type(module).__name__
        y = next_fun(*args, **kwargs)
        if jnp.issubdtype(x.dtype, jnp.floating):
            x = x.astype(y.dtype)
            if rate > 0.0:
                x = _dropout(module, path, x, rate)
        d = site.delta(x, a.astype(y.dtype), b.astype(y.dtype), scales[path])
        return y + d.astype(y.dtype)

    return intercept


def _run(
    apply_fn: Callable[..., Any],
    config: LoraConfig,
    frozen: Any,
    lora: Any,
    args: tuple,
    kwargs: dict,
    merged_paths: frozenset[str],
) -> tuple[Any, dict[str, str], set[str]]:
    """One call: factored for injected adapters, merged for the rest.

    Returns the output, ``{path: layer class}`` of the adapters a layer consumed, and the
    injected adapters no layer consumed (the caller re-runs with those merged).
    """
    flat = _paths.flatten(frozen)
    adapters = flatten_lora(lora)
    check_fits(flat, adapters)
    scales = {p: config.scale_for(p, w.rank) for p, w in adapters.items()}
    injectable = isinstance(frozen, Mapping)
    inject, merged = {}, {}
    for path, w in adapters.items():
        if injectable and path.startswith("params/") and path not in merged_paths:
            inject[path + _A], inject[path + _B] = w.a, w.b
        else:
            merged[path] = flat[path] + delta(w, scales[path], flat[path].dtype)
    variables = _paths.replace(frozen, merged)
    if inject:
        variables = _inject(variables, inject)
    rngs = kwargs.get("rngs")
    rate = config.dropout if isinstance(rngs, Mapping) and DROPOUT_RNG in rngs else 0.0
    if rate > 0.0 and merged:
        warnings.warn(
            f"LoRA dropout is not applied on merged paths: {sorted(merged)}.", stacklevel=3
        )
    seen: dict[str, str] = {}
    with nn.intercept_methods(_interceptor(scales, rate, seen)):
        out = apply_fn(variables, *args, **kwargs)
    missed = {p[: -len(_A)] for p in inject if p.endswith(_A)} - set(seen)
    return out, seen, missed


def _route_key(lora: Any, kwargs: Mapping[str, Any]) -> tuple:
    method = kwargs.get("method")
    return jax.tree_util.tree_structure(lora), getattr(method, "__name__", repr(method))


def lora_apply(
    apply_fn: Callable[..., Any] | nnx.GraphDef, config: LoraConfig
) -> Callable[..., Any]:
    """Wraps ``model.apply`` (or an NNX graphdef) so it runs the base plus the adapters.

    The returned ``apply(frozen, lora, *args, **kwargs)`` calls
    ``apply_fn(variables, *args, **kwargs)``. For `nn.Dense`, `nn.DenseGeneral`,
    `nn.Einsum`, `nn.Embed` (lookup and ``attend``) and `nn.Conv` the layer's own call runs
    untouched on the base kernel and ``s·((dropout(x) @ a) @ b)`` is added: ``W + a@b``
    is never formed and no gradient of W is ever computed. Any other adapted parameter
    (a raw ``self.param`` used by custom code, a non-Flax function) is merged before the
    call: the same numbers, slower. `lora_jax.routes` tells which path each target takes.

    LoRA dropout is active only when ``config.dropout > 0`` and the ``"lora_dropout"`` rng
    stream is passed (``rngs={"lora_dropout": key}``); otherwise the path is
    deterministic. Inside `nn.scan`/`nn.vmap`, add ``"lora_dropout"`` to ``split_rngs``.

    The low-rank path runs in the dtype of the layer's output (bf16 for a bf16 model),
    whatever the adapters' dtype. `apply` is a pure function: jit, grad and vmap it freely;
    it retraces only when shapes or tree structures change, never for new lora values.

    **Flax NNX**: pass the graphdef of ``graphdef, state = nnx.split(model)`` (a model
    without adapters) and `frozen` / `lora` from ``lj.split(state, config, key=...,
    layouts=lj.infer_layouts(model))``. ``apply(frozen, lora, *args, rngs=None,
    method="__call__", **kwargs)`` rebuilds the model from `frozen` (new Variables around
    the same arrays: `frozen` is never modified), gives `nnx.Linear`, `nnx.LinearGeneral`,
    `nnx.Einsum`, `nnx.Embed` and `nnx.Conv` their adapters as `lora_jax.add_lora` does
    (factored), merges any other adapted parameter, and returns
    ``model.<method>(*args, **kwargs)`` (`method` may also be a function of the model).
    ``rngs`` takes only ``{"lora_dropout": key}``. Changes the call makes to the model's
    own state (batch statistics, RNG counts) are dropped; use the stateful form
    (`lora_jax.add_lora`) to keep them.

    Args:
        apply_fn: the model's apply function, ``apply_fn(variables, *args, **kwargs)``,
            or an ``nnx.GraphDef``.
        config: the config the adapters were made with.

    Returns:
        ``apply(frozen, lora, *args, **kwargs)``, returning what `apply_fn` returns.

    Example:
        >>> import jax, jax.numpy as jnp, flax.linen as nn, lora_jax as lj
        >>> model = nn.Dense(3)
        >>> x = jnp.ones((2, 4))
        >>> variables = model.init(jax.random.key(0), x)
        >>> config = lj.LoraConfig(rank=2, targets=".*/kernel")
        >>> frozen, lora = lj.split(variables, config, key=jax.random.key(1))
        >>> apply = lj.lora_apply(model.apply, config)
        >>> bool((apply(frozen, lora, x) == model.apply(variables, x)).all())
        True
    """
    if isinstance(apply_fn, nnx.GraphDef):
        return nnx_apply.lora_apply_nnx(apply_fn, config)
    merged_before: dict[tuple, frozenset[str]] = {}

    def apply(frozen: Any, lora: Any, *args: Any, **kwargs: Any) -> Any:
        key = _route_key(lora, kwargs)
        merged = merged_before.get(key, frozenset())
        out, _, missed = _run(apply_fn, config, frozen, lora, args, kwargs, merged)
        if missed:  # adapters no supported layer consumed: run again with them merged
            merged_before[key] = merged | missed
            out, _, _ = _run(apply_fn, config, frozen, lora, args, kwargs, merged | missed)
        return out

    return apply


def routes(
    apply_fn: Callable[..., Any] | nnx.GraphDef,
    config: LoraConfig,
    frozen: Any,
    lora: Any,
    *args: Any,
    **kwargs: Any,
) -> dict[str, str]:
    """Which path each adapter takes in `lora_apply`: ``"factored (<Layer>)"`` or ``"merged"``.

    Traces the model abstractly (`jax.eval_shape`, no FLOPs); for an NNX graphdef the
    layers are read directly and no inputs are needed.

    Args:
        apply_fn: the model's apply function, or an ``nnx.GraphDef``.
        config: the LoRA config.
        frozen: the base from `lora_jax.split`.
        lora: the adapters from `lora_jax.split`.
        *args: example inputs for `apply_fn`.
        **kwargs: keyword arguments for `apply_fn`.

    Returns:
        ``{path: route}`` for every adapter, in tree order.

    Example:
        >>> import jax, jax.numpy as jnp, flax.linen as nn, lora_jax as lj
        >>> model = nn.Dense(3)
        >>> x = jnp.ones((2, 4))
        >>> variables = model.init(jax.random.key(0), x)
        >>> config = lj.LoraConfig(rank=2, targets=".*/kernel")
        >>> frozen, lora = lj.split(variables, config, key=jax.random.key(1))
        >>> lj.routes(model.apply, config, frozen, lora, x)
        {'params/kernel': 'factored (Dense)'}
    """
    if isinstance(apply_fn, nnx.GraphDef):
        return nnx_apply.routes_nnx(apply_fn, frozen, lora)
    seen: dict[str, str] = {}

    def trace(frozen_: Any, lora_: Any, args_: tuple, kwargs_: dict) -> Any:
        out, found, _ = _run(apply_fn, config, frozen_, lora_, args_, kwargs_, frozenset())
        seen.update(found)
        return out

    _abstract.eval_shape(trace, frozen, lora, args, kwargs)
    names = flatten_lora(lora)
    return {p: f"factored ({seen[p]})" if p in seen else "merged" for p in names}
