"""Many adapters on one base: stack them for mixed batches.

Adapters with the same targets, layouts and ranks are values of one pytree structure, so one
compiled `lora_apply` serves them all: swapping is a new argument, never a retrace.
`stack_adapters` puts k adapters (each keeping its own scale) on one extra axis for
`lora_apply_mixed`, and `unstack_adapter` / `replace_adapter` take one out or put one in
(adapters of other ranks join after `lora_jax.multi.pad_rank`, in ``_rank.py``).
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Sequence
from typing import Any, cast

import jax.numpy as jnp

from lora_jax.core._paths import nest
from lora_jax.core._weights import LoraWeights, flatten_lora
from lora_jax.multi._merge_many import weighted_adapters

__all__ = ["replace_adapter", "stack_adapters", "unstack_adapter"]


_HINTS = {
    "shapes": " Adapters of different ranks stack after lj.multi.pad_rank(lora, rank) "
    "brings them to one rank.",
    "dropout rates": " The rate lives on each adapter (LoraConfig.dropout at lj.split); "
    "adapters stacked together share one rate per target.",
    "residual norms": " Adapters made with init='pissa' on different residual bases "
    "need different `frozen`; run them separately.",
}


def _difference(w: LoraWeights, w0: LoraWeights) -> tuple[str, Any, Any] | None:
    """What makes two single adapters of one path unstackable, or None."""
    shapes = lambda x: f"a={tuple(x.a.shape)}, b={tuple(x.b.shape)}"
    for what, get in (
        ("layouts", lambda x: x.layout),
        ("shapes", shapes),
        ("dropout rates", lambda x: x.dropout),
        ("residual norms", lambda x: x.residual_norm),
    ):
        if get(w) != get(w0):
            return what, get(w), get(w0)
    return None


def _check_same(flat: dict, first: dict, who: str, name: str, first_name: str) -> None:
    """Raises a ValueError naming `who` and the path where `flat` cannot join `first`."""
    for path in (p for p in first if p not in flat):
        raise ValueError(f"{name} has no adapter for {path!r}, which {first_name} has.")
    for path in (p for p in flat if p not in first):
        raise ValueError(f"{name} has an adapter for {path!r}, which {first_name} lacks.")
    for path, w in flat.items():
        found = _difference(w, first[path])
        if found is not None:
            what, mine, theirs = found
            raise ValueError(
                f"{who} at {path!r}: their {what} differ, {mine} against {theirs} for "
                f"{first_name}.{_HINTS.get(what, '')}"
            )


def stack_adapters(loras: Sequence[Any]) -> dict[str, Any]:
    """k adapters on one new axis, for `lora_jax.multi.lora_apply_mixed`.

    Every ``a`` and ``b`` gets an adapter axis of size k right after its layout's stack
    axes: leading for a plain kernel (``a`` of shape ``(k, *in, r)``, ``b`` of shape
    ``(k, r, *out)``), second for a kernel scanned over layers (``(layers, k, *in, r)``),
    so that `nn.scan` still slices the layer axis. The layouts are unchanged, and each
    stacked `LoraWeights` has ``scale`` = the tuple of the k adapters' scales: adapters of
    different alphas (or rsLoRA) stack as they are.

    Args:
        loras: adapters with the same targets, layouts, ranks and dropout rates (and, for
            PiSSA, the same residual base).

    Returns:
        A nested dict of `LoraWeights` with the adapter axis added; adapter i is entry i.

    Raises:
        ValueError: `loras` is empty, or an adapter's targets, layouts, shapes (ranks),
            dropout rates or PiSSA residual norms differ from those of ``loras[0]`` (the
            adapter index and the path are named).
        TypeError: an entry holds stacked adapters or something other than `LoraWeights`.

    Example:
        >>> import jax, jax.numpy as jnp, lora_jax as lj
        >>> params = {"params": {"fc": {"kernel": jnp.ones((8, 6))}}}
        >>> make = lambda alpha: lj.LoraConfig(rank=2, alpha=alpha, targets=".*/kernel")
        >>> loras = [lj.split(params, make(a), key=jax.random.key(0))[1] for a in (2.0, 8.0)]
        >>> w = lj.multi.stack_adapters(loras)["params"]["fc"]["kernel"]
        >>> w.a.shape, w.scale
        ((2, 8, 2), (1.0, 4.0))
    """
    flats, _ = weighted_adapters(loras, None)
    for i, flat in enumerate(flats[1:], start=1):
        who = f"`loras[{i}]` cannot be stacked with `loras[0]`"
        _check_same(flat, flats[0], who, f"`loras[{i}]`", "`loras[0]`")
    stacked = {}
    for path, w0 in flats[0].items():
        axis = len(w0.layout.stack_axes)
        a = jnp.stack([flat[path].a for flat in flats], axis=axis)
        b = jnp.stack([flat[path].b for flat in flats], axis=axis)
        scales = tuple(cast(float, flat[path].scale) for flat in flats)
        stacked[path] = dataclasses.replace(w0, a=a, b=b, scale=scales)
    return nest(stacked)


def _stacked(stacked: Any, i: Any) -> tuple[dict[str, LoraWeights], int]:
    """The flat stacked adapters and the index, checked against the number k stacked."""
    flat = flatten_lora(stacked)
    counts: dict[int, str] = {}
    for path, w in flat.items():
        n_stack = len(w.layout.stack_axes)
        if not isinstance(w.scale, tuple) or w.a.shape[n_stack] != len(w.scale):
            raise ValueError(
                f"{path}: `stacked` must come from lj.multi.stack_adapters (a scale per "
                f"adapter and an adapter axis after the {n_stack} stack axes); found scale "
                f"{w.scale!r} and a of shape {tuple(w.a.shape)}."
            )
        counts.setdefault(len(w.scale), path)
    if len(counts) > 1:
        raise ValueError(f"`stacked` mixes different numbers of adapters: {counts}.")
    if isinstance(i, bool) or not isinstance(i, numbers.Integral):
        raise TypeError(f"`i` must be an int; found {i!r}.")
    k, i = next(iter(counts), 0), int(i)
    if not 0 <= i < k:
        raise IndexError(f"`i` is {i}, but `stacked` holds {k} adapters: i must be in 0..{k - 1}.")
    return flat, i


def _entry(w: LoraWeights, i: int) -> tuple:
    return (slice(None),) * len(w.layout.stack_axes) + (i,)


def _unstack_flat(flat: dict[str, LoraWeights], i: int) -> dict[str, LoraWeights]:
    return {
        p: dataclasses.replace(w, a=w.a[_entry(w, i)], b=w.b[_entry(w, i)], scale=w.scale[i])  # type: ignore[index]
        for p, w in flat.items()
    }


def unstack_adapter(stacked: Any, i: int) -> dict[str, Any]:
    """Adapter `i` of a `stack_adapters` result, with its own scale.

    Args:
        stacked: adapters from `lora_jax.multi.stack_adapters`.
        i: which adapter, ``0 <= i < k``.

    Returns:
        A nested dict of `LoraWeights`, bit for bit the i-th adapter that was stacked.

    Raises:
        IndexError: `i` is negative or not below the number k of stacked adapters.
        ValueError: `stacked` does not hold stacked adapters (the path is named).
        TypeError: `i` is not an int, or `stacked` holds something other than `LoraWeights`.

    Example:
        >>> import jax, jax.numpy as jnp, lora_jax as lj
        >>> params = {"params": {"fc": {"kernel": jnp.ones((8, 6))}}}
        >>> make = lambda alpha: lj.LoraConfig(rank=2, alpha=alpha, targets=".*/kernel")
        >>> loras = [lj.split(params, make(a), key=jax.random.key(0))[1] for a in (2.0, 8.0)]
        >>> stacked = lj.multi.stack_adapters(loras)
        >>> w = lj.multi.unstack_adapter(stacked, 1)["params"]["fc"]["kernel"]
        >>> w.a.shape, w.scale
        ((8, 2), 4.0)
    """
    flat, i = _stacked(stacked, i)
    return nest(_unstack_flat(flat, i))


def replace_adapter(stacked: Any, i: int, lora: Any) -> dict[str, Any]:
    """`stacked` with adapter `i` replaced by `lora` (its factors and its scale).

    Args:
        stacked: adapters from `lora_jax.multi.stack_adapters`.
        i: which adapter to replace, ``0 <= i < k``.
        lora: the new adapter: the same targets, layouts, shapes (ranks) and dropout rates
            as the stacked ones.

    Returns:
        A new nested dict of stacked `LoraWeights`; `stacked` is not modified.

    Raises:
        IndexError: `i` is negative or not below the number k of stacked adapters.
        ValueError: `stacked` does not hold stacked adapters, or `lora` does not fit it
            (the path is named).
        TypeError: `i` is not an int, or `lora` holds stacked adapters or something other
            than `LoraWeights`.

    Example:
        >>> import jax, jax.numpy as jnp, lora_jax as lj
        >>> params = {"params": {"fc": {"kernel": jnp.ones((8, 6))}}}
        >>> make = lambda alpha: lj.LoraConfig(rank=2, alpha=alpha, targets=".*/kernel")
        >>> loras = [lj.split(params, make(a), key=jax.random.key(0))[1] for a in (2.0, 8.0)]
        >>> stacked = lj.multi.stack_adapters([loras[0], loras[0]])
        >>> lj.multi.replace_adapter(stacked, 1, loras[1])["params"]["fc"]["kernel"].scale
        (1.0, 4.0)
    """
    flat, i = _stacked(stacked, i)
    new = flatten_lora(lora)
    for path, w in new.items():
        if isinstance(w.scale, tuple):
            raise TypeError(f"`lora` at {path!r} stacks {len(w.scale)} adapters; give one.")
    who = f"`lora` cannot replace adapter {i} of `stacked`"
    _check_same(new, _unstack_flat(flat, i), who, "`lora`", "`stacked`")
    out = {}
    for path, w in flat.items():
        entry, one = _entry(w, i), new[path]
        mine = cast(tuple, w.scale)
        scales = tuple(cast(float, one.scale) if j == i else s for j, s in enumerate(mine))
        out[path] = dataclasses.replace(
            w, a=w.a.at[entry].set(one.a), b=w.b.at[entry].set(one.b), scale=scales
        )
    return nest(out)
