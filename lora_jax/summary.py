"""`summary`: what is adapted, at which rank, and how much of the model is trainable."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

from flax import nnx

from lora_jax import _paths, nnx_lora
from lora_jax.weights import flatten_lora

__all__ = ["Summary", "summary"]


def _nbytes(x: Any) -> int:
    return math.prod(x.shape) * x.dtype.itemsize


@dataclasses.dataclass(frozen=True)
class Summary:
    """Adapter statistics; ``str()`` renders them as a table.

    Attributes:
        rows: one ``(path, kernel shape, a shape, b shape, rank, route)`` per adapter.
        trainable: number of adapter parameters.
        total: number of base parameters.
        adapter_bytes: bytes of all ``a`` and ``b`` arrays.
        base_bytes: bytes of the base.

    Example:
        >>> import lora_jax as lj
        >>> s = lj.Summary(rows=(), trainable=10, total=1000, adapter_bytes=40, base_bytes=4000)
        >>> s.fraction
        0.01
    """

    rows: tuple[tuple[str, tuple, tuple, tuple, int, str], ...]
    trainable: int
    total: int
    adapter_bytes: int
    base_bytes: int

    @property
    def fraction(self) -> float:
        """Trainable parameters as a share of the base's."""
        return self.trainable / max(self.total, 1)

    def __str__(self) -> str:
        head = ("path", "kernel", "a", "b", "rank", "route")
        cells = [head] + [
            (p, str(k), str(a), str(b), str(r), route) for p, k, a, b, r, route in self.rows
        ]
        widths = [max(len(row[i]) for row in cells) for i in range(len(head))]
        lines = [
            "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
            for row in cells
        ]
        lines.insert(1, "  ".join("-" * w for w in widths))
        lines.append(
            f"trainable: {self.trainable:,} of {self.total:,} base parameters "
            f"({100 * self.fraction:.3f}%); adapters {self.adapter_bytes:,} bytes, "
            f"base {self.base_bytes:,} bytes"
        )
        return "\n".join(lines)


def _from_module(model: Any, routes: Mapping[str, str] | None) -> tuple[Any, Any, Any]:
    frozen, lora = nnx_lora.lora_state(model)
    layers = dict(nnx_lora.adapted_modules(model))
    names = {p: f"factored ({m._lora_base.__name__})" for p, m in layers.items()}
    return frozen, lora, routes if routes is not None else names


def summary(frozen: Any, lora: Any = None, routes: Mapping[str, str] | None = None) -> Summary:
    """Describes the adapters: targets, shapes, ranks, trainable count and share, bytes.

    An NNX model with adapters (`lora_jax.add_lora`) can be passed alone:
    ``lj.summary(model)``; every route is then factored.

    Args:
        frozen: the base from `lora_jax.split`, or an ``nnx.Module`` with adapters.
        lora: the adapters (omitted for an nnx.Module).
        routes: optional ``{path: route}`` from `lora_jax.routes`, shown per target
            (otherwise the column says ``"-"``).

    Returns:
        A `Summary`; ``print`` it for a table.

    Raises:
        TypeError: `lora` is missing for something other than an nnx.Module.

    Example:
        >>> import jax, jax.numpy as jnp, lora_jax as lj
        >>> params = {"params": {"fc": {"kernel": jnp.ones((8, 8))}}}
        >>> config = lj.LoraConfig(rank=2, targets=".*/kernel")
        >>> frozen, lora = lj.split(params, config, key=jax.random.key(0))
        >>> s = lj.summary(frozen, lora)
        >>> s.trainable, s.total, round(s.fraction, 2)
        (32, 64, 0.5)
    """
    if isinstance(frozen, nnx.Module):
        frozen, lora, routes = _from_module(frozen, routes)
    elif lora is None:
        raise TypeError("`summary` needs `lora` (or an nnx.Module with adapters alone).")
    flat = _paths.flatten(frozen)
    base = [leaf for leaf in flat.values() if hasattr(leaf, "shape")]
    weights = flatten_lora(lora)
    rows = []
    for path, w in weights.items():
        kernel = tuple(getattr(flat.get(path), "shape", ()))
        route = (routes or {}).get(path, "-")
        rows.append((path, kernel, tuple(w.a.shape), tuple(w.b.shape), w.rank, route))
    adapters = [x for w in weights.values() for x in (w.a, w.b)]
    return Summary(
        rows=tuple(rows),
        trainable=sum(math.prod(x.shape) for x in adapters),
        total=sum(math.prod(x.shape) for x in base),
        adapter_bytes=sum(_nbytes(x) for x in adapters),
        base_bytes=sum(_nbytes(x) for x in base),
    )
