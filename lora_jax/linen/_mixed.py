"""`lora_apply_mixed`: one batch, each example with its own adapter, in one call.

k adapters stacked by `lora_jax.multi.stack_adapters` ride next to their kernels in the
``params`` collection (as in `lora_apply`), and each supported Flax layer adds, for example
i, ``s·((x[i] @ a[ids[i]]) @ b[ids[i]])``: the factors are gathered per example and
contracted with two batched einsums, so no per-example weight matrix ``W + s·a@b`` is ever
formed. Every other adapted kernel (raw params, plain functions) goes through the
contraction rewrite, which does the same at each contraction. An id of -1 leaves that
example on the plain base.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lora_jax.core._mixing import check_read, mixing, scales_of
from lora_jax.core._paths import flatten
from lora_jax.core._use import call as rewrite_call
from lora_jax.core._weights import flatten_lora, unstacked_shapes
from lora_jax.linen._apply import call_signature, plan, rewrite_dropout
from lora_jax.linen._inject import (
    A_SUFFIX,
    B_SUFFIX,
    adapted,
    dropout_rates,
    inject,
    layer_input,
)

__all__ = ["lora_apply_mixed"]


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

    Adapters of other kernels (raw ``self.param``s used by ``jnp.einsum``/``@``, experts,
    plain functions of a params dict) go through the contraction rewrite (see
    `lora_jax.lora_apply`), which adds each example's term at every contraction. The
    example axis must be the first axis of the input of every adapted layer, and the first
    free axis of the other operand at every other contraction (true for ``(batch, ...)``
    activations); a use that is not a contraction is a ValueError: there is no merged
    fallback per example. New `adapter_ids` or new adapter values never retrace. LoRA
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
        TypeError: `apply_fn` is not callable.
        ValueError: an id is out of range, an input lacks the example axis, or a kernel has
            a use that is not a contraction.

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
            f"`apply_fn` must be a model's apply function or an NNX graphdef; found "
            f"{type(apply_fn).__name__}."
        )

    plans: dict[tuple, frozenset[str]] = {}

    def apply(frozen: Any, stacked: Any, adapter_ids: Any, *args: Any, **kwargs: Any) -> Any:
        k, _ = unstacked_shapes(flatten(frozen), stacked)
        adapters = flatten_lora(stacked)
        scales = scales_of(adapters, k)
        rows, gate, gains = mixing(adapter_ids, k, scales)
        rates = dropout_rates({p: w.dropout for p, w in adapters.items()}, kwargs, deterministic)
        key = call_signature((frozen, stacked, args, kwargs))
        if key not in plans:
            plans[key] = frozenset(plan(apply_fn, frozen, stacked, args, kwargs))
        entries = {}
        for path in plans[key]:
            entries[path + A_SUFFIX], entries[path + B_SUFFIX] = adapters[path].a, adapters[path].b
        variables = inject(frozen, entries) if entries else frozen
        seen: dict[str, str] = {}

        def call_model(variables_: Any, *args_: Any, **kwargs_: Any) -> Any:
            with nn.intercept_methods(_interceptor(scales, rates, rows, gate, seen)):
                return apply_fn(variables_, *args_, **kwargs_)

        rest = {p: w for p, w in adapters.items() if p not in plans[key]}
        if not rest:
            return call_model(variables, *args, **kwargs)
        found: dict[str, set[str]] = {}
        mix = (rows, {p: gains[p] for p in rest})
        dropout = rewrite_dropout(kwargs, {p: rates[p] for p in rest})
        out = rewrite_call(
            call_model, variables, rest, args, kwargs, found, dropout=dropout, mix=mix
        )
        check_read(found, rest)
        return out

    return apply
