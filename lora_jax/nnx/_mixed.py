"""`lora_apply_mixed` for Flax NNX: one batch, each example with its own adapter.

The model is rebuilt from `frozen` for the call (as in the pure `lora_apply`) and run
through the contraction rewrite with k stacked adapters: at every contraction that reads
an adapted kernel (the ``dot_general`` inside an ``nnx.Linear``/``nnx.Einsum``, a raw
``nnx.Param`` used by ``@``, a row lookup of an ``nnx.Embed`` table), example i gets
``s[ids[i]]·((x[i] @ a[ids[i]]) @ b[ids[i]])``, the factors gathered per example.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from flax import nnx

from lora_jax.core._mixing import check_read, mixing, scales_of
from lora_jax.core._paths import flatten, replace
from lora_jax.core._use import call as rewrite_call
from lora_jax.core._weights import flatten_lora, unstacked_shapes
from lora_jax.nnx._pure import call_method, dropout_rates, rewrite_dropout

__all__ = ["lora_apply_mixed"]


def lora_apply_mixed(graphdef: nnx.GraphDef, *, deterministic: bool = False) -> Callable[..., Any]:
    """`lora_jax.multi.lora_apply_mixed` for an NNX graphdef.

    Args:
        graphdef: from ``graphdef, state = nnx.split(model)``, of a model without adapters.
        deterministic: never run LoRA dropout (evaluation).

    Returns:
        ``apply(frozen, stacked, adapter_ids, *args, rngs=None, method="__call__",
        **kwargs)``: `stacked` from `lora_jax.multi.stack_adapters`, one id per example
        (-1: the plain base); ``rngs`` takes only ``{"lora_dropout": key}``.

    Example:
        >>> import jax, jax.numpy as jnp, lora_jax as lj
        >>> from flax import nnx
        >>> graphdef, state = nnx.split(nnx.Linear(4, 3, rngs=nnx.Rngs(0)))
        >>> config = lj.LoraConfig(rank=2, targets="kernel")
        >>> frozen, lora = lj.split(state, config, key=jax.random.key(1))
        >>> stacked = lj.multi.stack_adapters([lora, lora])
        >>> x = jnp.ones((2, 4))
        >>> lj.multi.lora_apply_mixed(graphdef)(frozen, stacked, jnp.array([1, -1]), x).shape
        (2, 3)
    """

    def apply(
        frozen: Any,
        stacked: Any,
        adapter_ids: Any,
        *args: Any,
        rngs: Mapping[str, Any] | None = None,
        method: str | Callable[..., Any] = "__call__",
        **kwargs: Any,
    ) -> Any:
        k, _ = unstacked_shapes(flatten(frozen), stacked)
        adapters = flatten_lora(stacked)
        rows, _, gains = mixing(adapter_ids, k, scales_of(adapters, k))
        rates, stream = dropout_rates(adapters, rngs, deterministic)
        dropout = rewrite_dropout(stream, rates)

        def program(values_: dict, *args_: Any, **kwargs_: Any) -> Any:
            model = nnx.merge(graphdef, replace(frozen, values_), copy=True)
            return call_method(model, method, args_, kwargs_)

        found: dict[str, set[str]] = {}
        out = rewrite_call(
            program,
            flatten(frozen),
            adapters,
            args,
            kwargs,
            found,
            dropout=dropout,
            mix=(rows, gains),
        )
        check_read(found, adapters)
        return out

    return apply
