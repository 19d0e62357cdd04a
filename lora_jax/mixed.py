"""`lora_apply_mixed`: one batch, each example with its own adapter, in one call.

k adapters stacked by `lora_jax.stack_adapters` ride next to their kernels in the
``params`` collection (as in `lora_apply`), and each supported Flax layer adds, for example
i, ``s·((x[i] @ a[ids[i]]) @ b[ids[i]])``: the factors are gathered per example and
contracted with two batched einsums, so no per-example weight matrix ``W + s·a@b`` is ever
formed. An id of -1 leaves that example on the plain base.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lora_jax import _paths
from lora_jax.adapters import unstacked_shapes
from lora_jax.apply import _A, _B, DROPOUT_RNG, _adapted, _dropout, _inject
from lora_jax.config import LoraConfig
from lora_jax.weights import flatten_lora

__all__ = ["lora_apply_mixed"]


def _check_ids(adapter_ids: Any, k: int) -> jax.Array:
    """The ids as an int array; a ValueError naming the first bad entry when they are known."""
    ids = jnp.asarray(adapter_ids)
    if ids.ndim != 1 or not jnp.issubdtype(ids.dtype, jnp.integer):
        raise TypeError(
            f"`adapter_ids` must be a 1-D integer array (one id per example); found shape "
            f"{ids.shape} and dtype {ids.dtype}."
        )
    if not isinstance(adapter_ids, jax.core.Tracer):
        values = np.asarray(ids)
        bad = np.flatnonzero((values < -1) | (values >= k))
        if bad.size:
            i = int(bad[0])
            raise ValueError(
                f"adapter_ids[{i}] is {int(values[i])}, but `stacked` holds {k} adapters: an "
                f"id must be in 0..{k - 1}, or -1 for the plain base."
            )
    return ids


def _interceptor(
    scales: Mapping[str, float],
    rate: float,
    rows: jax.Array,
    gate: jax.Array,
    seen: dict[str, str],
) -> Callable:
    """Adds each example's own low-rank path to every supported layer with an adapter."""

    def intercept(next_fun, args, kwargs, context):
        found = _adapted(context, args, kwargs)
        if found is None:
            return next_fun(*args, **kwargs)
        module, site, a, b, path, x = found
        n = rows.shape[0]
        if site.mixed is None or x.ndim == 0 or x.shape[0] != n:
            raise ValueError(
                f"{path}: the {type(module).__name__} input has shape {tuple(x.shape)}, but a "
                f"mixed batch needs the example axis first (and not contracted) at every "
                f"adapted layer, with {n} examples (the length of `adapter_ids`)."
            )
        seen[path] = type(module).__name__
        y = next_fun(*args, **kwargs)
        if jnp.issubdtype(x.dtype, jnp.floating):
            x = x.astype(y.dtype)
            if rate > 0.0:
                x = _dropout(module, path, x, rate)
        scale = (gate * scales[path]).astype(y.dtype)
        d = site.mixed(x, a.astype(y.dtype), b.astype(y.dtype), scale, rows)
        return y + d.astype(y.dtype)

    return intercept


def _variables(frozen: Any, stacked: Any) -> tuple[Any, int, dict[str, int]]:
    """`frozen` with the stacked adapters injected, k, and the rank of each adapter."""
    if not isinstance(frozen, Mapping):
        raise TypeError(
            f"`frozen` must be a Flax variables dict for a mixed batch; found "
            f"{type(frozen).__name__}."
        )
    k, views = unstacked_shapes(_paths.flatten(frozen), stacked)
    inject = {}
    for path, w in flatten_lora(stacked).items():
        if not path.startswith("params/"):
            raise ValueError(
                f"{path}: a mixed batch adapts only `params` kernels used by a supported Flax "
                f"layer; exclude this target from the config."
            )
        inject[path + _A], inject[path + _B] = w.a, w.b
    return _inject(frozen, inject), k, {p: w.rank for p, w in views.items()}


def lora_apply_mixed(apply_fn: Callable[..., Any], config: LoraConfig) -> Callable[..., Any]:
    """Wraps ``model.apply`` to run each example of a batch with its own adapter.

    The returned ``apply(frozen, stacked, adapter_ids, *args, **kwargs)`` calls
    ``apply_fn(variables, *args, **kwargs)`` once. `stacked` comes from
    `lora_jax.stack_adapters` (k adapters with the same targets and ranks, made with, or
    rescaled by `lora_jax.pad_rank` onto, `config`), and `adapter_ids` has one integer per
    example: ``i`` runs that example with adapter ``i``, ``-1`` with the plain base. At each
    adapted `nn.Dense`, `nn.DenseGeneral`, `nn.Einsum`, `nn.Embed` or `nn.Conv`, example
    ``e`` gets ``s·((x[e] @ a[ids[e]]) @ b[ids[e]])`` added to the layer's untouched output,
    with the factors gathered per example (never ``W + s·a@b`` per example). Each example's
    output equals running it alone through `lora_apply` with its adapter, and a ``-1``
    example gets the base output (the term added to it is exactly zero). Gradients flow
    to every stacked adapter, so several adapters can also train in one batch.

    The example axis must be the first axis of the input of every adapted layer (true for
    ``(batch, ...)`` activations), and every target must be such a layer: there is no
    merged fallback here. New `adapter_ids` or new adapter values never retrace.

    Ids are checked when they are concrete: out of range raises a ValueError. Under
    `jax.jit` they cannot be read, and an example whose id is outside ``-1..k-1`` gets NaN
    outputs (never another adapter's).

    Args:
        apply_fn: the model's apply function, ``apply_fn(variables, *args, **kwargs)``.
        config: the config of the stacked adapters (it gives the scales).

    Returns:
        ``apply(frozen, stacked, adapter_ids, *args, **kwargs)``, returning what `apply_fn`
        returns.

    Raises:
        TypeError: `apply_fn` is an NNX graphdef (mixed batches are linen-only for now).

    Example:
        >>> import jax, jax.numpy as jnp, flax.linen as nn, lora_jax as lj
        >>> model = nn.Dense(3)
        >>> x = jnp.ones((2, 4))
        >>> variables = model.init(jax.random.key(0), x)
        >>> config = lj.LoraConfig(rank=2, targets=".*/kernel")
        >>> frozen, lora = lj.split(variables, config, key=jax.random.key(1))
        >>> stacked = lj.stack_adapters([lora, lora])
        >>> y = lj.lora_apply_mixed(model.apply, config)(frozen, stacked, jnp.array([1, -1]), x)
        >>> bool((y == model.apply(variables, x)).all())
        True
    """
    if isinstance(apply_fn, nnx.GraphDef):
        raise TypeError(
            "lora_apply_mixed supports Flax linen models (an apply function); NNX graphdefs "
            "are not supported yet: run each adapter with lj.lora_apply(graphdef, config)."
        )

    def apply(frozen: Any, stacked: Any, adapter_ids: Any, *args: Any, **kwargs: Any) -> Any:
        variables, k, ranks = _variables(frozen, stacked)
        ids = _check_ids(adapter_ids, k)
        rows = jnp.clip(ids, 0, k - 1)
        gate = jnp.where(ids == -1, 0.0, jnp.where(ids == rows, 1.0, jnp.nan))
        scales = {p: config.scale_for(p, r) for p, r in ranks.items()}
        rngs = kwargs.get("rngs")
        rate = config.dropout if isinstance(rngs, Mapping) and DROPOUT_RNG in rngs else 0.0
        seen: dict[str, str] = {}
        with nn.intercept_methods(_interceptor(scales, rate, rows, gate, seen)):
            out = apply_fn(variables, *args, **kwargs)
        missed = sorted(set(ranks) - set(seen))
        if missed:
            raise ValueError(
                f"no supported Flax layer used the adapters of {missed}: a mixed batch has no "
                f"merged fallback (see lj.routes); exclude these targets from the config."
            )
        return out

    return apply
