"""The entry points that take either framework: a linen ``model.apply`` or an NNX graphdef
(or module). Each hands the call to `lora_jax.linen` or `lora_jax.nnx`; those two never
import each other."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from flax import nnx

from lora_jax import linen as linen_lora
from lora_jax import nnx as nnx_lora
from lora_jax.core._layout import Layout
from lora_jax.core._summary import Summary
from lora_jax.core._summary import summary as summary_of_trees
from lora_jax.nnx._inplace import model_routes

__all__ = ["infer_layouts", "lora_apply", "routes", "summary"]


def lora_apply(
    apply_fn: Callable[..., Any] | nnx.GraphDef, *, deterministic: bool = False
) -> Callable[..., Any]:
    """Wraps ``model.apply`` (or an NNX graphdef) so it runs the base plus the adapters.

    The returned ``apply(frozen, lora, *args, **kwargs)`` calls
    ``apply_fn(variables, *args, **kwargs)``. For `nn.Dense`, `nn.DenseGeneral`,
    `nn.Einsum`, `nn.Embed` (lookup and ``attend``) and `nn.Conv` the layer's own call runs
    untouched on the base kernel and ``s·((dropout(x) @ a) @ b)`` is added: ``W + a@b``
    is never formed and no gradient of W is ever computed. Any other adapted parameter
    (a raw ``self.param`` used by custom code, a non-Flax function) is merged before the
    call: the same numbers, slower. Which path each adapter takes is decided before the
    call, by one abstract trace per call structure (`lora_jax.routes` shows it).

    Each adapter carries its scale s and dropout rate (`LoraWeights`), so no config is
    needed here. LoRA dropout runs when the call is given the ``"lora_dropout"`` rng
    (``rngs={"lora_dropout": key}``; inside `nn.scan`/`nn.vmap` add ``"lora_dropout"`` to
    ``split_rngs``). Adapters with dropout called without that rng warn (no dropout runs);
    ``deterministic=True`` turns dropout off without a warning, for evaluation.

    The low-rank path runs in the dtype of the layer's output (bf16 for a bf16 model),
    whatever the adapters' dtype. `apply` is a pure function: jit, grad and vmap it freely;
    it retraces only when shapes or tree structures change, never for new lora values.

    **Flax NNX**: pass the graphdef of ``graphdef, state = nnx.split(model)`` (a model
    without adapters) and `frozen` / `lora` from ``lj.split(state, config, key=...,
    layouts=lj.infer_layouts(model))``; see `lora_jax.nnx.lora_apply`.

    Args:
        apply_fn: the model's apply function, ``apply_fn(variables, *args, **kwargs)``,
            or an ``nnx.GraphDef``.
        deterministic: never run LoRA dropout, and do not warn about it (evaluation).

    Returns:
        ``apply(frozen, lora, *args, **kwargs)``, returning what `apply_fn` returns.

    Example:
        >>> import jax, jax.numpy as jnp, flax.linen as nn, lora_jax as lj
        >>> model = nn.Dense(3)
        >>> x = jnp.ones((2, 4))
        >>> variables = model.init(jax.random.key(0), x)
        >>> config = lj.LoraConfig(rank=2, targets=".*/kernel")
        >>> frozen, lora = lj.split(variables, config, key=jax.random.key(1))
        >>> apply = lj.lora_apply(model.apply)
        >>> bool((apply(frozen, lora, x) == model.apply(variables, x)).all())
        True
    """
    if isinstance(apply_fn, nnx.GraphDef):
        return nnx_lora.lora_apply(apply_fn, deterministic=deterministic)
    return linen_lora.lora_apply(apply_fn, deterministic=deterministic)


def routes(
    apply_fn: Callable[..., Any] | nnx.GraphDef, frozen: Any, lora: Any, *args: Any, **kwargs: Any
) -> dict[str, str]:
    """Which path each adapter takes in `lora_apply`: ``"factored (<Layer>)"`` or ``"merged"``.

    Traces the model abstractly (`jax.eval_shape`, no FLOPs), exactly as `lora_apply`
    decides before its first call; for an NNX graphdef the layers are read directly and no
    inputs are needed.

    Args:
        apply_fn: the model's apply function, or an ``nnx.GraphDef``.
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
        >>> lj.routes(model.apply, frozen, lora, x)
        {'params/kernel': 'factored (Dense)'}
    """
    if isinstance(apply_fn, nnx.GraphDef):
        return nnx_lora.routes(apply_fn, frozen, lora, *args, **kwargs)
    return linen_lora.routes(apply_fn, frozen, lora, *args, **kwargs)


def infer_layouts(
    apply_fn: Callable[..., Any] | nnx.Module | nnx.GraphDef,
    variables: Any = None,
    *args: Any,
    **kwargs: Any,
) -> dict[str, Layout]:
    """Learns the layout of every kernel the model's Flax layers use, without running it.

    For Flax linen, traces ``apply_fn(variables, *args, **kwargs)`` with `jax.eval_shape`
    (no FLOPs) and records, for each `nn.Dense`, `nn.DenseGeneral`, `nn.Einsum`,
    `nn.Embed` and `nn.Conv` call, the kernel's path, kind and axes; a kernel with more
    axes than the layer sees (from `nn.scan` or `nn.vmap`) gets leading stack axes. For
    Flax NNX pass the model itself (or a graphdef and its state): the layouts are read
    from the layers' attributes; no inputs are needed.

    Args:
        apply_fn: ``model.apply``; or an ``nnx.Module``; or an ``nnx.GraphDef``.
        variables: what `apply_fn` takes first; the state for a graphdef; unused for an
            nnx.Module.
        *args: example positional inputs (arrays or `jax.ShapeDtypeStruct`).
        **kwargs: keyword arguments for `apply_fn` (``rngs``, ``method``...).

    Returns:
        ``{path: Layout}`` for every kernel seen; pass it to `lora_jax.split` as
        ``layouts=``.

    Raises:
        ValueError: when a kernel's recorded shape does not fit the stored parameter.

    Example:
        >>> import jax, jax.numpy as jnp, flax.linen as nn
        >>> import lora_jax as lj
        >>> model = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=8)
        >>> x = jnp.ones((1, 3, 8))
        >>> variables = model.init(jax.random.key(0), x)
        >>> layouts = lj.infer_layouts(model.apply, variables, x)
        >>> layouts["params/query/kernel"]
        Layout(kind='dense', in_axes=(0,), out_axes=(1, 2), stack_axes=())
    """
    if isinstance(apply_fn, (nnx.Module, nnx.GraphDef)):
        return nnx_lora.infer_layouts(apply_fn, variables)
    return linen_lora.infer_layouts(apply_fn, variables, *args, **kwargs)


def summary(frozen: Any, lora: Any = None, routes: Mapping[str, str] | None = None) -> Summary:
    """Describes the adapters: targets, shapes, ranks, scales, trainable count and share.

    ``summary(frozen, lora)`` for a split tree, ``summary(lora)`` for the adapters alone,
    ``summary(model)`` for an NNX model with adapters (`lora_jax.nnx.add_lora`; every
    route is then factored).

    Args:
        frozen: the base from `lora_jax.split`, the adapters alone, or an ``nnx.Module``.
        lora: the adapters (omitted for the other two forms).
        routes: optional ``{path: route}`` from `lora_jax.routes`, shown per target.

    Returns:
        A `lora_jax.core.Summary`; ``print`` it for a table.

    Example:
        >>> import jax, jax.numpy as jnp, lora_jax as lj
        >>> params = {"params": {"fc": {"kernel": jnp.ones((8, 8))}}}
        >>> config = lj.LoraConfig(rank=2, targets=".*/kernel")
        >>> frozen, lora = lj.split(params, config, key=jax.random.key(0))
        >>> s = lj.summary(frozen, lora)
        >>> s.trainable, s.total, round(s.fraction, 2)
        (32, 64, 0.5)
        >>> from flax import nnx
        >>> model = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
        >>> config = lj.LoraConfig(rank=2, targets="kernel")
        >>> model = lj.nnx.add_lora(model, config, key=jax.random.key(1))
        >>> lj.summary(model).rows[0][-1]
        'factored (Linear)'
    """
    if isinstance(frozen, nnx.Module):
        model = frozen
        frozen, lora = nnx_lora.lora_state(model)
        if routes is None:
            routes = model_routes(model)
    return summary_of_trees(frozen, lora, routes)
