"""`combine_adapters`: one adapter standing for a weighted sum of several, as PEFT's
``add_weighted_adapter`` (``"linear"``, ``"cat"``, ``"svd"``).

Adapter i with weight w_i and its own scale s_i stands for the update ``w_i·s_i·a_i@b_i``;
the intended combination is the sum of those updates. The result carries scale 1.0: its
factors hold the whole update. ``"cat"`` gives that sum exactly and ``"svd"`` its best
low-rank approximation; ``"linear"`` is PEFT's formula kept unchanged (the same inputs give
the same adapter in both libraries), which adds cross terms ``a_i@b_j``: prefer ``"cat"`` or
``"svd"`` unless PEFT parity is the point.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from lora_jax.core._paths import nest
from lora_jax.core._weights import LoraWeights
from lora_jax.multi._merge_many import weighted_adapters

__all__ = ["COMBINATIONS", "combine_adapters"]

COMBINATIONS = ("linear", "cat", "svd")
_HIGHEST = jax.lax.Precision.HIGHEST


def _kernel_sizes(w: LoraWeights) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    n = len(w.layout.stack_axes)
    return tuple(w.a.shape[:n]), tuple(w.a.shape[n:-1]), tuple(w.b.shape[n + 1 :])


def _at_path(flats: list, path: str) -> list[tuple[int, LoraWeights]]:
    """The adapters that have `path`, checked to agree on its layout, kernel shape and
    base (a PiSSA adapter's residual)."""
    present = [(i, flat[path]) for i, flat in enumerate(flats) if path in flat]
    j, first = present[0]
    for i, w in present[1:]:
        if w.layout != first.layout or _kernel_sizes(w) != _kernel_sizes(first):
            raise ValueError(
                f"`loras[{i}]` and `loras[{j}]` disagree at {path!r}: layout {w.layout} with "
                f"(stack, in, out) sizes {_kernel_sizes(w)} against {first.layout} with "
                f"{_kernel_sizes(first)}; they cannot be adapters of the same kernel."
            )
        if w.residual_norm != first.residual_norm:
            raise ValueError(
                f"`loras[{i}]` and `loras[{j}]` need different bases at {path!r}: residual "
                f"norm {w.residual_norm} against {first.residual_norm} (init='pissa' changes "
                f"the base kernel); combine only adapters made on one base."
            )
    return present


Factors = tuple[jax.Array, jax.Array]


def _svd(path: str, ws: list[LoraWeights], cs: list[float], rank: int | None) -> Factors:
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
    return a.astype(ws[0].a.dtype), b.astype(ws[0].b.dtype)


def _combine_path(
    path: str, present: list, cs: list[float], combination_type: str, rank: int | None
) -> Factors:
    ws = [w for _, w in present]
    if combination_type == "svd":
        return _svd(path, ws, cs, rank)
    if combination_type == "cat":
        a = jnp.concatenate([c * w.a for w, c in zip(ws, cs, strict=True)], axis=-1)
        return a, jnp.concatenate([w.b for w in ws], axis=len(ws[0].layout.stack_axes))
    for i, w in present:
        if w.rank != ws[0].rank:
            raise ValueError(
                f"{path}: `linear` needs one rank, but `loras[{i}]` has rank {w.rank} and "
                f"`loras[{present[0][0]}]` rank {ws[0].rank}. Pad with lj.multi.pad_rank, or "
                f"use 'cat' or 'svd'."
            )
    a = sum(math.copysign(math.sqrt(abs(c)), c) * w.a for w, c in zip(ws, cs, strict=True))
    b = sum(math.sqrt(abs(c)) * w.b for w, c in zip(ws, cs, strict=True))
    return a, b


def combine_adapters(
    loras: Sequence[Any],
    weights: Sequence[float],
    *,
    combination_type: str = "cat",
    rank: int | None = None,
) -> dict[str, Any]:
    """One adapter standing for ``Σ_i w_i·s_i·a_i@b_i``, as PEFT's ``add_weighted_adapter``.

    Each adapter brings its own scale s_i (`LoraWeights.scale`), so adapters of different
    ranks and alphas combine without any config.

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
    Every result adapter has scale 1.0 (PEFT's choice, ``alpha`` = rank), so its factors
    carry the whole update and ``lj.merge(frozen, lora)`` gives ``W + Σ w_i·s_i·a_i@b_i``
    (exactly for cat, truncated for svd). The dropout rate and PiSSA residual norm are
    those of the first adapter at the target.

    Args:
        loras: the adapters (one `LoraWeights` tree each, not stacked).
        weights: a weight per adapter (negative subtracts).
        combination_type: ``"linear"``, ``"cat"`` or ``"svd"``.
        rank: the rank of an ``"svd"`` result (at most the sum of the ranks at a target and
            the kernel's largest rank); only for ``"svd"``.

    Returns:
        A nested dict of `LoraWeights`, each with scale 1.0.

    Raises:
        ValueError: an unknown combination, `loras` empty, `weights` of the wrong length,
            adapters that disagree on a target's layout, shape or PiSSA base, ``"linear"``
            over different ranks, or an svd rank out of range (the adapter and path are
            named).
        TypeError: a weight is not a finite number, `rank` is not an int, or an entry holds
            stacked adapters or something other than `LoraWeights`.

    Example:
        >>> import jax, jax.numpy as jnp, lora_jax as lj
        >>> params = {"params": {"fc": {"kernel": jnp.ones((8, 6))}}}
        >>> config = lj.LoraConfig(rank=2, alpha=8.0, targets=".*/kernel")
        >>> loras = [lj.split(params, config, key=jax.random.key(i))[1] for i in range(3)]
        >>> lora = lj.multi.combine_adapters(loras, [1.0, 0.5, -1.0], combination_type="cat")
        >>> lora["params"]["fc"]["kernel"].rank, lora["params"]["fc"]["kernel"].scale
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
    flats, weights = weighted_adapters(loras, weights)
    paths = list(dict.fromkeys(p for flat in flats for p in flat))
    out = {}
    for path in paths:
        present = _at_path(flats, path)
        cs = [weights[i] * w.scale for i, w in present]  # type: ignore[operator]
        a, b = _combine_path(path, present, cs, combination_type, rank)
        out[path] = dataclasses.replace(present[0][1], a=a, b=b, scale=1.0)
    return nest(out)
