"""`summary`: what is adapted, at which rank, and how much of the model is trainable."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from lora_jax.core._packed import is_packed
from lora_jax.core._paths import flatten
from lora_jax.core._weights import flatten_lora, kernel_shape

__all__ = ["Summary", "summary"]


def _nbytes(x: Any) -> int:
    """Bytes an array takes; a packed (quantized) kernel, the bytes of what it stores."""
    if is_packed(x):
        return sum(_nbytes(y) for y in jax.tree.leaves(x))
    return math.prod(x.shape) * np.dtype(x.dtype).itemsize


@dataclasses.dataclass(frozen=True)
class Summary:
    """Adapter statistics; ``str()`` renders them as a table.

    Attributes:
        rows: one ``(path, kernel shape, a shape, b shape, rank, scale, route)`` per adapter.
        trainable: number of adapter parameters.
        total: number of base parameters.
        adapter_bytes: bytes of all ``a`` and ``b`` arrays.
        base_bytes: bytes of the base.

    Example:
        >>> import lora_jax as lj
        >>> s = lj.core.Summary((), trainable=10, total=1000, adapter_bytes=40, base_bytes=4000)
        >>> s.fraction
        0.01
    """

    rows: tuple[tuple[str, tuple, tuple, tuple, int, Any, str], ...]
    trainable: int
    total: int
    adapter_bytes: int
    base_bytes: int

    @property
    def fraction(self) -> float:
        """Trainable parameters as a share of the base's."""
        return self.trainable / max(self.total, 1)

    def __str__(self) -> str:
        head = ("path", "kernel", "a", "b", "rank", "scale", "route")
        cells = [head] + [
            (p, str(k), str(a), str(b), str(r), f"{s:g}" if isinstance(s, float) else str(s), route)
            for p, k, a, b, r, s, route in self.rows
        ]
        widths = [max(len(row[i]) for row in cells) for i in range(len(head))]
        lines = [
            "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
            for row in cells
        ]
        lines.insert(1, "  ".join("-" * w for w in widths))
        if self.total:
            lines.append(
                f"trainable: {self.trainable:,} of {self.total:,} base parameters "
                f"({100 * self.fraction:.3f}%); adapters {self.adapter_bytes:,} bytes, "
                f"base {self.base_bytes:,} bytes"
            )
        else:
            lines.append(f"trainable: {self.trainable:,}; adapters {self.adapter_bytes:,} bytes")
        return "\n".join(lines)


def summary(frozen: Any, lora: Any = None, routes: Mapping[str, str] | None = None) -> Summary:
    """Describes the adapters: targets, shapes, ranks, scales, trainable count and share, bytes.

    ``summary(lora)`` alone describes the adapters (kernel shapes from their layouts; the
    base's totals are then 0). An NNX model with adapters (`lora_jax.nnx.add_lora`) can be
    passed alone too: ``lj.summary(model)``.

    Args:
        frozen: the base from `lora_jax.split`, or the adapters alone, or an NNX model.
        lora: the adapters (omitted when `frozen` is the adapters or a model).
        routes: optional ``{path: route}`` from `lora_jax.routes`, shown per target
            (otherwise the column says ``"-"``).

    Returns:
        A `Summary`; ``print`` it for a table.

    Example:
        >>> import jax, jax.numpy as jnp, lora_jax as lj
        >>> params = {"params": {"fc": {"kernel": jnp.ones((8, 8))}}}
        >>> config = lj.LoraConfig(rank=2, targets=".*/kernel")
        >>> frozen, lora = lj.split(params, config, key=jax.random.key(0))
        >>> s = lj.summary(frozen, lora)
        >>> s.trainable, s.total, round(s.fraction, 2)
        (32, 64, 0.5)
        >>> lj.summary(lora).trainable
        32
    """
    if lora is None:
        lora, frozen = frozen, None
    weights = flatten_lora(lora)
    flat = flatten(frozen) if frozen is not None else {}
    base = [leaf for leaf in flat.values() if hasattr(leaf, "shape")]
    rows = []
    for path, w in weights.items():
        kernel = tuple(getattr(flat.get(path), "shape", None) or kernel_shape(w))
        route = (routes or {}).get(path, "-")
        rows.append((path, kernel, tuple(w.a.shape), tuple(w.b.shape), w.rank, w.scale, route))
    adapters = [x for w in weights.values() for x in jax.tree.leaves(w)]  # a, b (m, bias)
    return Summary(
        rows=tuple(rows),
        trainable=sum(math.prod(x.shape) for x in adapters),
        total=sum(math.prod(x.shape) for x in base),
        adapter_bytes=sum(_nbytes(x) for x in adapters),
        base_bytes=sum(_nbytes(x) for x in base),
    )
