"""`lora_apply_mixed`: one batch, each example with its own adapter, in one call.

k adapters stacked by `lora_jax.multi.stack_adapters` ride next to their kernels in the
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

from lora_jax.core._paths import flatten
from lora_jax.core._weights import flatten_lora, unstacked_shapes
from lora_jax.linen._inject import (
    A_SUFFIX,
    B_SUFFIX,
    adapted,
    dropout_rates,
    inject,
    layer_input,
)

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
    scales: Mapping[str, jax.Array],
    rates: Mapping[str, float],
    rows: jax.Array,
    gate: jax.Array,
    seen: dict[str, str],
) -> Callable:
    """Adds each example's own low-rank path to every supported layer with an adapter."""

    def intercept(next_fun, args, kwargs, context):
        found = adapted(context, args, kwargs)
        if found is None:
            return next_fun(*args, **kwargs)
        module, site, a, b, path, x = found
        n = rows.shape[0]
        if site.low_rank.mixed is None or x.ndim == 0 or x.shape[0] != n:
            raise ValueError(
                f"{path}: the {type(module).__name__} input has shape {tuple(x.shape)}, but a "
                f"mixed batch needs the example axis first (and not contracted) at every "
                f"adapted layer, with {n} examples (the length of `adapter_ids`)."
            )
        seen[path] = type(module).__name__
        y = next_fun(*args, **kwargs)
        x = layer_input(module, path, x, y.dtype, rates.get(path, 0.0))
        scale = (gate * jnp.take(scales[path], rows)).astype(y.dtype)
        d = site.low_rank.mixed(x, a.astype(y.dtype), b.astype(y.dtype), scale, rows)
        return y + d.astype(y.dtype)

    return intercept


def _scales(scale: float | tuple[float, ...], k: int) -> tuple[float, ...]:
    return scale if isinstance(scale, tuple) else (scale,) * k


def _variables(frozen: Any, stacked: Any) -> tuple[Any, int, dict[str, Any]]:
    """`frozen` with the stacked adapters injected, k, and each path's stacked adapter."""
    if not isinstance(frozen, Mapping):
        raise TypeError(
            f"`frozen` must be a Flax variables dict for a mixed batch; found "
            f"{type(frozen).__name__}."
        )
    k, _ = unstacked_shapes(flatten(frozen), stacked)
    entries = {}
    flat = flatten_lora(stacked)
    for path, w in flat.items():
        if not path.startswith("params/"):
            raise ValueError(
                f"{path}: a mixed batch adapts only `params` kernels used by a supported Flax "
                f"layer; exclude this target from the config."
            )
        entries[path + A_SUFFIX], entries[path + B_SUFFIX] = w.a, w.b
    return inject(frozen, entries), k, flat


def lora_apply_mixed(
    apply_fn: Callable[..., Any], *, deterministic: bool = False
) -> Callable[..., Any]:
    """Wraps a Flax linen ``model.apply`` to run each example of a batch with its own adapter.

    The returned ``apply(frozen, stacked, adapter_ids, *args, **kwargs)`` calls
    ``apply_fn(variables, *args, **kwargs)`` once. `stacked` comes from
    `lora_jax.multi.stack_adapters` (k adapters with the same targets and ranks; each keeps
    its own scale), and `adapter_ids` has one integer per example: ``i`` runs that example
    with adapter ``i``, ``-1`` with the plain base. At each adapted `nn.Dense`,
    `nn.DenseGeneral`, `nn.Einsum`, `nn.Embed` or `nn.Conv`, example ``e`` gets
    ``s[ids[e]]·((x[e] @ a[ids[e]]) @ b[ids[e]])`` added to the layer's untouched output,
    with the factors gathered per example (never ``W + s·a@b`` per example). Each example's
    output equals running it alone through `lora_apply` with its adapter, and a ``-1``
    example gets the base output (the term added to it is exactly zero). Gradients flow
    to every stacked adapter, so several adapters can also train in one batch.

    The example axis must be the first axis of the input of every adapted layer (true for
    ``(batch, ...)`` activations), and every target must be such a layer: there is no
    merged fallback here. New `adapter_ids` or new adapter values never retrace. LoRA
    dropout runs as in `lora_jax.lora_apply` (each adapter's own rate, with the
    ``"lora_dropout"`` rng).

    Ids are checked when they are concrete: out of range raises a ValueError. Under
    `jax.jit` they cannot be read, and an example whose id is outside ``-1..k-1`` gets NaN
    outputs (never another adapter's).

    Args:
        apply_fn: the model's apply function, ``apply_fn(variables, *args, **kwargs)``.
        deterministic: never run LoRA dropout (evaluation), and do not warn about it.

    Returns:
        ``apply(frozen, stacked, adapter_ids, *args, **kwargs)``, returning what `apply_fn`
        returns.

    Raises:
        TypeError: `apply_fn` is not callable (NNX graphdefs: mixed batches are linen-only
            for now).

    Example:
        >>> import jax, jax.numpy as jnp, flax.linen as nn, lora_jax as lj
        >>> model = nn.Dense(3)
        >>> x = jnp.ones((2, 4))
        >>> variables = model.init(jax.random.key(0), x)
        >>> config = lj.LoraConfig(rank=2, targets=".*/kernel")
        >>> frozen, lora = lj.split(variables, config, key=jax.random.key(1))
        >>> stacked = lj.multi.stack_adapters([lora, lora])
        >>> y = lj.multi.lora_apply_mixed(model.apply)(frozen, stacked, jnp.array([1, -1]), x)
        >>> bool((y == model.apply(variables, x)).all())
        True
    """
    if not callable(apply_fn):
        raise TypeError(
            "lora_apply_mixed supports Flax linen models (an apply function); NNX graphdefs "
            f"are not supported yet (found {type(apply_fn).__name__}): run each adapter with "
            "lj.lora_apply(graphdef)."
        )

    def apply(frozen: Any, stacked: Any, adapter_ids: Any, *args: Any, **kwargs: Any) -> Any:
        variables, k, adapters = _variables(frozen, stacked)
        ids = _check_ids(adapter_ids, k)
        rows = jnp.clip(ids, 0, k - 1)
        gate = jnp.where(ids == -1, 0.0, jnp.where(ids == rows, 1.0, jnp.nan))
        scales = {p: jnp.asarray(_scales(w.scale, k), jnp.float32) for p, w in adapters.items()}
        rates = dropout_rates({p: w.dropout for p, w in adapters.items()}, kwargs, deterministic)
        seen: dict[str, str] = {}
        with nn.intercept_methods(_interceptor(scales, rates, rows, gate, seen)):
            out = apply_fn(variables, *args, **kwargs)
        missed = sorted(set(adapters) - set(seen))
        if missed:
            raise ValueError(
                f"no supported Flax layer used the adapters of {missed}: a mixed batch has no "
                f"merged fallback (see lj.routes); exclude these targets from the config."
            )
        return out

    return apply
