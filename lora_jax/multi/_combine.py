"""`combine_adapters`: one adapter standing for a weighted sum of several, as PEFT's
``add_weighted_adapter`` (``"linear"``, ``"cat"``, ``"svd"``).

Adapter i with weight w_i and scale s_i stands for the update ``w_i·s_i·a_i@b_i``; the
intended combination is the sum of those updates.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import numbers
import re
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from lora_jax.core import _paths
from lora_jax.core._config import LoraConfig
from lora_jax.multi._merge_many import per_adapter
from lora_jax.core._weights import LoraWeights

__all__ = ["COMBINATIONS", "combine_adapters"]

COMBINATIONS = ("linear", "cat", "svd")
_HIGHEST = jax.lax.Precision.HIGHEST


def _kernel_sizes(w: LoraWeights) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    n = len(w.layout.stack_axes)
    return tuple(w.a.shape[:n]), tuple(w.a.shape[n:-1]), tuple(w.b.shape[n + 1 :])


def _at_path(flats: list, path: str) -> list[tuple[int, LoraWeights]]:
    """The adapters that have `path`, checked to agree on its layout and kernel shape."""
    present = [(i, flat[path]) for i, flat in enumerate(flats) if path in flat]
    j, first = present[0]
    for i, w in present[1:]:
        if w.layout != first.layout or _kernel_sizes(w) != _kernel_sizes(first):
            raise ValueError(
                f"`loras[{i}]` and `loras[{j}]` disagree at {path!r}: layout {w.layout} with "
                f"(stack, in, out) sizes {_kernel_sizes(w)} against {first.layout} with "
                f"{_kernel_sizes(first)}; they cannot be adapters of the same kernel."
            )
    return present


def _svd(path: str, ws: list[LoraWeights], cs: list[float], rank: int | None) -> LoraWeights:
    """Best rank-r approximation of ``Σ c_i·a_i@b_i``: per stacked slice, the top singular
    directions, with the singular values on ``b`` (as PEFT)."""
    stack, ins, outs = _kernel_sizes(ws[0])
    total, limit = sum(w.rank for w in ws), min(math.prod(ins), math.prod(outs))
    r = max(w.rank for w in ws) if rank is None else rank
    if not 1 <= r <= min(total, limit):
        raise ValueError(
            f"{path}: svd rank {r} must be in 1..{min(total, limit)}: the combined update has "
            f"rank at most {total} (the sum of the adapters' ranks) and the kernel allows at "
            f"most {limit}."
        )
    dtype = jnp.promote_types(ws[0].a.dtype, jnp.float32)
    s_n = math.prod(stack)

    def product(w: LoraWeights, c: float) -> jax.Array:
        a3, b3 = w.a.reshape(s_n, -1, w.rank), w.b.reshape(s_n, w.rank, -1)
        return c * jnp.matmul(a3.astype(dtype), b3.astype(dtype), precision=_HIGHEST)

    m = sum(product(w, c) for w, c in zip(ws, cs, strict=True))
    u, sv, vh = jnp.linalg.svd(m, full_matrices=False)
    a = u[..., :r].reshape(*stack, *ins, r)
    b = (sv[..., :r, None] * vh[..., :r, :]).reshape(*stack, r, *outs)
    return LoraWeights(a.astype(ws[0].a.dtype), b.astype(ws[0].b.dtype), ws[0].layout)


def _combine_path(
    path: str, present: list, cs: list[float], combination_type: str, rank: int | None
) -> LoraWeights:
    ws = [w for _, w in present]
    layout, n_stack = ws[0].layout, len(ws[0].layout.stack_axes)
    if combination_type == "svd":
        return _svd(path, ws, cs, rank)
    if combination_type == "cat":
        a = jnp.concatenate([c * w.a for w, c in zip(ws, cs, strict=True)], axis=-1)
        return LoraWeights(a, jnp.concatenate([w.b for w in ws], axis=n_stack), layout)
    for i, w in present:
        if w.rank != ws[0].rank:
            raise ValueError(
                f"{path}: `linear` needs one rank, but `loras[{i}]` has rank {w.rank} and "
                f"`loras[{present[0][0]}]` rank {ws[0].rank}. Pad with lj.pad_rank, or use "
                f"'cat' or 'svd'."
            )
    a = sum(math.copysign(math.sqrt(abs(c)), c) * w.a for w, c in zip(ws, cs, strict=True))
    b = sum(math.sqrt(abs(c)) * w.b for w, c in zip(ws, cs, strict=True))
    return LoraWeights(a, b, layout)


def _result_config(configs: list[LoraConfig], flats: list, ranks: dict[str, int]) -> LoraConfig:
    """A config with scale 1 at every path (alpha = rank there, as PEFT), giving the ranks."""
    base = configs[0]
    common = collections.Counter(ranks.values()).most_common(1)[0][0]
    odd = {re.escape(p): r for p, r in ranks.items() if r != common}
    same = all(c.targets == base.targets and c.exclude == base.exclude for c in configs)
    same = same and all(f.keys() == flats[0].keys() for f in flats)
    return dataclasses.replace(
        base,
        targets=base.targets if same else tuple(re.escape(p) for p in ranks),
        exclude=base.exclude if same else None,
        rank=common,
        alpha=float(common),
        use_rslora=False,
        rank_pattern=tuple(odd.items()),
        alpha_pattern=tuple((p, float(r)) for p, r in odd.items()),
    )


def combine_adapters(
    loras: Sequence[Any],
    configs: LoraConfig | Sequence[LoraConfig],
    weights: Sequence[float],
    *,
    combination_type: str,
    rank: int | None = None,
) -> tuple[dict[str, Any], LoraConfig]:
    """One adapter standing for ``Σ_i w_i·s_i·a_i@b_i``, as PEFT's ``add_weighted_adapter``.

    - ``"cat"``: the factors concatenated along the rank (``w_i·s_i`` on each ``a_i``):
      exactly the weighted sum of the updates, at rank ``Σ r_i``.
    - ``"svd"``: the best rank-`rank` approximation of that sum (Eckart-Young), from the SVD
      of each target's dense update; `rank` defaults to the largest adapter rank.
    - ``"linear"``: PEFT's formula, ``a = Σ sign(c_i)·sqrt(|c_i|)·a_i`` and
      ``b = Σ sqrt(|c_i|)·b_i`` with ``c_i = w_i·s_i``; ranks must match. Its product has
      cross terms ``a_i@b_j``, so it equals the weighted sum only for one adapter (or
      shared factors): cheap but rough, as PEFT warns. Kept identical to PEFT so results
      agree across the two libraries.

    Adapters may target different paths: each target combines the adapters that have it.
    The returned config has scale 1 at every target (``alpha`` = rank there, PEFT's choice),
    so the factors carry the whole update and ``lj.merge(frozen, lora, config)`` gives
    ``W + Σ w_i·s_i·a_i@b_i`` (exactly for cat, truncated for svd). It keeps the first
    config's other fields, and its `targets` (exact paths when the adapters' targets differ).

    Args:
        loras: the adapters.
        configs: the config of each adapter, or one config for all.
        weights: a weight per adapter (negative subtracts).
        combination_type: ``"linear"``, ``"cat"`` or ``"svd"``.
        rank: the rank of an ``"svd"`` result (at most the sum of the ranks at a target and
            the kernel's largest rank); only for ``"svd"``.

    Returns:
        ``(lora, config)``: a nested dict of `LoraWeights` and its `LoraConfig`.

    Raises:
        ValueError: an unknown combination, `configs` or `weights` of the wrong length,
            adapters that disagree on a target's layout or shape, ``"linear"`` over
            different ranks, or an svd rank out of range (the adapter and path are named).
        TypeError: a weight is not a finite number, a config is not a `LoraConfig`, or
            `rank` is not an int.

    Example:
        >>> import jax, jax.numpy as jnp, lora_jax as lj
        >>> params = {"params": {"fc": {"kernel": jnp.ones((8, 6))}}}
        >>> config = lj.LoraConfig(rank=2, targets=".*/kernel")
        >>> loras = [lj.split(params, config, key=jax.random.key(i))[1] for i in range(3)]
        >>> lora, cat = lj.combine_adapters(loras, config, [1.0, 0.5, -1.0], combination_type="cat")
        >>> lora["params"]["fc"]["kernel"].rank, cat.scale_for("params/fc/kernel", 6)
        (6, 1.0)
    """
    if combination_type not in COMBINATIONS:
        raise ValueError(
            f"`combination_type` must be one of {COMBINATIONS}; found {combination_type!r}."
        )
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, numbers.Integral)):
        raise TypeError(f"`rank` must be an int or None; found {rank!r}.")
    if rank is not None and combination_type != "svd":
        raise ValueError(
            f"`rank` applies to 'svd' only; found rank={rank} with {combination_type!r}."
        )
    flats, configs, weights = per_adapter(loras, configs, weights)
    paths = list(dict.fromkeys(p for flat in flats for p in flat))
    out = {}
    for path in paths:
        present = _at_path(flats, path)
        cs = [weights[i] * configs[i].scale_for(path, w.rank) for i, w in present]
        out[path] = _combine_path(path, present, cs, combination_type, rank)
    config = _result_config(configs, flats, {p: w.rank for p, w in out.items()})
    return _paths.nest(out), config
