"""Many adapters on one base: pad them to a shared rank, stack them for mixed batches.

Adapters with the same targets, layouts and ranks are values of one pytree structure, so one
compiled `lora_apply` serves them all: swapping is a new argument, never a retrace.
`pad_rank` brings a smaller adapter to a shared rank without changing what it computes, and
`stack_adapters` puts k adapters on one extra axis for `lora_apply_mixed`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax.core import _paths
from lora_jax.core._config import LoraConfig
from lora_jax.core._weights import LoraWeights, check_fits, flatten_lora, flatten_loras

__all__ = ["pad_rank", "stack_adapters"]


def _pad_one(w: LoraWeights, rank: int, factor: float) -> LoraWeights:
    n_stack = len(w.layout.stack_axes)
    extra = rank - w.rank
    pad_a = [(0, 0)] * (w.a.ndim - 1) + [(0, extra)]
    pad_b = [(0, 0)] * w.b.ndim
    pad_b[n_stack] = (0, extra)
    b = w.b if factor == 1.0 else w.b * jnp.asarray(factor, w.b.dtype)
    return LoraWeights(jnp.pad(w.a, pad_a), jnp.pad(b, pad_b), w.layout)


def pad_rank(
    lora: Any, rank: int, config: LoraConfig, *, to_config: LoraConfig | None = None
) -> dict[str, Any]:
    """Every adapter padded with zeros to `rank`, computing what it computed before.

    ``a`` gets zero columns and ``b`` zero rows, so ``a @ b`` is unchanged. The scale of the
    low-rank path depends on the rank (``alpha / rank``), so ``b`` is also multiplied by
    ``config.scale_for(path, old_rank) / to_config.scale_for(path, rank)``: the padded
    adapter run with `to_config` gives the outputs the original gave with `config`, and its
    `lora_jax.merge` gives the same weights. This is exact in real arithmetic; in floating
    point ``b`` is rounded once when that factor is not a power of two (outputs then agree
    to about one ulp), and nothing is rounded when it is (e.g. rank 4 to 8 at a fixed
    alpha, or the same scale). Adapters of ranks 4, 8 and 16 padded to 16 then share one
    compiled function, and `stack_adapters` accepts them.

    The config's `rank_for` still gives the old rank: pass `config=` to
    `lora_jax.load_adapter` only for unpadded adapters.

    Args:
        lora: adapters from `lora_jax.split`.
        rank: the new rank of every adapter, at least each one's current rank.
        config: the config `lora` was made with (it gives the current scales).
        to_config: the config the padded adapters will run with; defaults to `config`.
            Rescaling onto one shared config is also how adapters trained with different
            alphas become stackable.

    Returns:
        A nested dict like `lora`, with ``a`` of shape ``(*stack, *in, rank)`` and ``b`` of
        shape ``(*stack, rank, *out)``.

    Raises:
        ValueError: `rank` is below an adapter's current rank (the path is named).
        TypeError: `lora` holds something other than `LoraWeights`, or `rank` is not an int.

    Example:
        >>> import jax, jax.numpy as jnp, lora_jax as lj
        >>> params = {"params": {"fc": {"kernel": jnp.ones((8, 6))}}}
        >>> config = lj.LoraConfig(rank=2, alpha=4.0, targets=".*/kernel")
        >>> _, lora = lj.split(params, config, key=jax.random.key(0))
        >>> lj.pad_rank(lora, 4, config)["params"]["fc"]["kernel"].a.shape
        (8, 4)
    """
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)):
        raise TypeError(f"`rank` must be an int; found {rank!r}.")
    target = config if to_config is None else to_config
    padded = {}
    for path, w in flatten_lora(lora).items():
        if rank < w.rank:
            raise ValueError(
                f"{path}: cannot pad to rank {rank}, the adapter already has rank {w.rank}. "
                f"To lower a rank, use lj.combine_adapters([lora], [config], [1.0], "
                f"combination_type='svd', rank={rank})."
            )
        factor = config.scale_for(path, w.rank) / target.scale_for(path, rank)
        padded[path] = _pad_one(w, int(rank), factor)
    return _paths.nest(padded)


def _stack_error(i: int, path: str, what: str, mine: Any, first: Any) -> ValueError:
    hint = ""
    if what == "shapes":
        hint = (
            " Adapters of different ranks stack after lj.pad_rank(lora, rank, config) "
            "brings them to one rank."
        )
    return ValueError(
        f"`loras[{i}]` cannot be stacked with `loras[0]` at {path!r}: its {what} are "
        f"{mine}, `loras[0]`'s are {first}.{hint}"
    )


def _check_same(flats: list[dict[str, LoraWeights]]) -> None:
    first = flats[0]
    for i, flat in enumerate(flats[1:], start=1):
        for path in (p for p in first if p not in flat):
            raise ValueError(f"`loras[{i}]` has no adapter for {path!r}, which `loras[0]` has.")
        for path in (p for p in flat if p not in first):
            raise ValueError(f"`loras[{i}]` has an adapter for {path!r}, which `loras[0]` lacks.")
        for path, w in flat.items():
            w0 = first[path]
            if w.layout != w0.layout:
                raise _stack_error(i, path, "layouts", w.layout, w0.layout)
            mine, theirs = (tuple(w.a.shape), tuple(w.b.shape)), (w0.a.shape, w0.b.shape)
            if mine != (tuple(theirs[0]), tuple(theirs[1])):
                fmt = lambda s: f"a={tuple(s[0])}, b={tuple(s[1])}"
                raise _stack_error(i, path, "shapes", fmt(mine), fmt(theirs))


def stack_adapters(loras: Sequence[Any]) -> dict[str, Any]:
    """k adapters on one new axis, for `lora_apply_mixed`.

    Every ``a`` and ``b`` gets an adapter axis of size k right after its layout's stack
    axes: leading for a plain kernel (``a`` of shape ``(k, *in, r)``, ``b`` of shape
    ``(k, r, *out)``), second for a kernel scanned over layers (``(layers, k, *in, r)``),
    so that `nn.scan` still slices the layer axis. The layouts are unchanged.

    Args:
        loras: adapters from `lora_jax.split` with the same targets, layouts and ranks,
            all made with (or rescaled by `pad_rank` onto) one config.

    Returns:
        A nested dict of `LoraWeights` with the adapter axis added; adapter i is entry i.

    Raises:
        ValueError: `loras` is empty, or an adapter's targets, layouts or shapes (ranks)
            differ from those of ``loras[0]`` (the adapter index and the path are named).
        TypeError: an entry holds something other than `LoraWeights`.

    Example:
        >>> import jax, jax.numpy as jnp, lora_jax as lj
        >>> params = {"params": {"fc": {"kernel": jnp.ones((8, 6))}}}
        >>> config = lj.LoraConfig(rank=2, targets=".*/kernel")
        >>> loras = [lj.split(params, config, key=jax.random.key(i))[1] for i in range(3)]
        >>> lj.stack_adapters(loras)["params"]["fc"]["kernel"].a.shape
        (3, 8, 2)
    """
    if len(loras) == 0:
        raise ValueError("`loras` is empty; stack at least one adapter.")
    flats = flatten_loras(loras)
    _check_same(flats)
    stacked = {}
    for path, w0 in flats[0].items():
        axis = len(w0.layout.stack_axes)
        a = jnp.stack([flat[path].a for flat in flats], axis=axis)
        b = jnp.stack([flat[path].b for flat in flats], axis=axis)
        stacked[path] = LoraWeights(a, b, w0.layout)
    return _paths.nest(stacked)
