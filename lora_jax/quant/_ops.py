"""How a `QuantizedKernel` takes part in a model call: the packed-kernel protocol of
`lora_jax.core._packed` (unpack it, cast it, cut or squeeze it along an axis it is not
grouped on, hand it to a scan slice by slice) without unpacking it until it is used."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec

__all__ = ["KernelOps"]


class KernelOps:
    """The protocol's methods, mixed into `QuantizedKernel`."""

    lora_jax_packed = True

    def dequantize(self) -> jax.Array:
        """The float kernel (`lora_jax.quant.dequantize`)."""
        from lora_jax.quant._kernel import dequantize

        return dequantize(self)  # type: ignore[arg-type]

    def describe(self) -> dict[str, Any]:
        """How the kernel is stored, as JSON (recorded with adapters trained on it)."""
        keys = ("format", "group_size", "axis", "double", "dtype")
        return {k: getattr(self, k) for k in keys}

    def single(self) -> Any:
        """The same kernel with float32 scales (double quantization undone for the
        scales alone, which are 1/group_size of the kernel): cut and sliced like the
        codes."""
        from lora_jax.quant._kernel import kernel_scales

        if not self.double:  # type: ignore[attr-defined]
            return self
        return dataclasses.replace(
            self,  # type: ignore[type-var]
            scales=kernel_scales(self),  # type: ignore[arg-type]
            scale_codes=None,
            scale_scales=None,
            scale_offset=None,
            double=False,
        )

    def astype(self, dtype: Any) -> Any:
        """The same storage, unpacked to another float `dtype`; None for a non-float one."""
        if not jnp.issubdtype(dtype, jnp.floating):
            return None
        return dataclasses.replace(self, dtype=jnp.dtype(dtype).name)  # type: ignore[type-var]

    def slice_axis(self, axis: int, start: Any, size: int) -> Any:
        """`size` entries from `start` (an int or a traced index) along `axis`; None along
        the grouped axis."""
        if axis == self.axis:  # type: ignore[attr-defined]
            return None
        q = self.single()
        cut = lambda x: lax.dynamic_slice_in_dim(x, start, size, axis)
        shape = list(q.shape)
        shape[axis] = size
        return dataclasses.replace(q, codes=cut(q.codes), scales=cut(q.scales), shape=tuple(shape))

    def squeeze(self, axes: tuple[int, ...]) -> Any:
        """The kernel without the given size-1 axes; None if one is the grouped axis."""
        if self.axis in axes:  # type: ignore[attr-defined]
            return None
        q = self.single()
        shape = tuple(d for i, d in enumerate(q.shape) if i not in axes)
        return dataclasses.replace(
            q,
            codes=jnp.squeeze(q.codes, axes),
            scales=jnp.squeeze(q.scales, axes),
            shape=shape,
            axis=q.axis - sum(a < q.axis for a in axes),
        )

    def scan_parts(self) -> tuple[Any, Callable[[Any], Any]] | None:
        """``(parts, rebuild)``: the arrays a scan slices along the leading axis, and the
        kernel of one slice of them; None when the leading axis is the grouped one."""
        if self.axis == 0:  # type: ignore[attr-defined]
            return None
        q = self.single()

        def rebuild(parts: tuple) -> Any:
            return dataclasses.replace(
                q, codes=parts[0], scales=parts[1], shape=tuple(q.shape[1:]), axis=q.axis - 1
            )

        return (q.codes, q.scales), rebuild

    def with_specs(self, spec: PartitionSpec) -> Any:
        """The kernel with a `PartitionSpec` for each stored array, sharded as `spec`
        shards the float kernel: codes and scales alike along every axis but the grouped
        one (replicated there), the small arrays of double quantization replicated."""
        full = [*tuple(spec), *([None] * (len(self.shape) - len(spec)))]  # type: ignore[attr-defined]
        full[self.axis] = None  # type: ignore[attr-defined]
        kernel, whole = PartitionSpec(*full), PartitionSpec()
        some = lambda x, s: None if x is None else s
        return dataclasses.replace(
            self,  # type: ignore[type-var]
            codes=kernel,
            scales=some(self.scales, kernel),  # type: ignore[attr-defined]
            scale_codes=some(self.scale_codes, whole),  # type: ignore[attr-defined]
            scale_scales=some(self.scale_scales, whole),  # type: ignore[attr-defined]
            scale_offset=some(self.scale_offset, whole),  # type: ignore[attr-defined]
        )
