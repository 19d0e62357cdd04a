"""A mixed batch (each example with its own adapter of k stacked ones): the ids checked,
and each example's adapter row and multiplier, for the Flax layers and the rewrite."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax.core._weights import LoraWeights

__all__ = ["check_read", "mixing", "scales_of"]


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


def scales_of(adapters: Mapping[str, LoraWeights], k: int) -> dict[str, jax.Array]:
    """Each path's k scales (one per stacked adapter), as an array."""
    pick = lambda s: s if isinstance(s, tuple) else (s,) * k
    return {p: jnp.asarray(pick(w.scale), jnp.float32) for p, w in adapters.items()}


def mixing(adapter_ids: Any, k: int, scales: Mapping[str, Any]) -> tuple[Any, Any, dict]:
    """``(rows, gate, gains)``: each example's adapter (clipped into range), its gate (1,
    0 for the plain base, NaN for a bad id) and, per path, gate times its adapter's scale."""
    ids = _check_ids(adapter_ids, k)
    rows = jnp.clip(ids, 0, k - 1)
    gate = jnp.where(ids == -1, 0.0, jnp.where(ids == rows, 1.0, jnp.nan))
    return rows, gate, {p: gate * jnp.take(s, rows) for p, s in scales.items()}


def check_read(found: Mapping[str, Any], paths: Any) -> None:
    """A mixed batch's adapters that no operation read (the rewrite's routes lack them)."""
    unused = sorted(set(paths) - set(found))
    if unused:
        raise ValueError(
            f"no operation of the program reads the kernels of {unused}: exclude these "
            f"targets from the config."
        )
