"""`QuantizedKernel`: one frozen kernel stored as int8, int4 or NF4 codes with per-group
scales, a pytree whose arrays are its children; `quantize_kernel` makes one, `dequantize`
gives the float kernel back."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from lora_jax.quant._formats import (
    FORMATS,
    decode,
    double_dequantize,
    double_quantize,
    encode,
    group_problem,
    pack_nibbles,
    scale_back,
    unpack_nibbles,
)
from lora_jax.quant._ops import KernelOps

__all__ = ["QuantizedKernel", "dequantize", "is_quantized", "quantize_kernel"]


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class QuantizedKernel(KernelOps):
    """A float kernel stored as codes plus per-group scales (a JAX pytree).

    The grouped `axis` is cut into groups of `group_size` consecutive elements; every
    other axis keeps its size, so sharding the kernel along any other axis shards `codes`
    and `scales` alike. Each group has one float32 scale:

    - ``"int8"``: codes in [-127, 127], one group per output channel (the whole `axis`),
      ``scale = absmax / 127``.
    - ``"int4"``: symmetric codes in [-7, 7], ``scale = absmax / 7``, stored as ``code + 8``.
    - ``"nf4"``: the 16 NormalFloat4 values of QLoRA, ``scale = absmax``; the code is the
      value nearest ``w / absmax`` (a value exactly between two takes the lower index).

    4-bit codes are packed two per uint8 along `axis` (element ``2i`` in the low nibble,
    ``2i + 1`` in the high one). An all-zero group has scale 0 and dequantizes to 0.

    With `double`, the scales themselves are quantized (QLoRA's double quantization):
    ``scale_offset`` is their mean, and ``scales - scale_offset`` (flattened row-major) is
    stored in blocks of 256 as int8 `scale_codes` in [-127, 127] with a float32 step
    (`scale_scales`, block absmax / 127) per block; `scales` is then None. bitsandbytes
    codes this step with its 8-bit "dynamic" code book; we use linear int8, whose error on
    each scale is at most half a step: ``max |scales - offset| over the block / 254``
    (plus float32 rounding). Each dequantized weight then moves by at most that times the
    magnitude of its code value (127, 7 or 1).

    Attributes:
        codes: int8 codes of the kernel's shape, or uint8 packed nibbles with
            ``shape[axis] // 2`` along `axis`.
        scales: float32, the kernel's shape with ``shape[axis] // group_size`` along `axis`;
            None with `double`.
        scale_codes: with `double`, int8, one per scale (row-major); else None.
        scale_scales: with `double`, float32, one step per block of 256 scales; else None.
        scale_offset: with `double`, a float32 scalar (the mean of the scales); else None.
        format: ``"int8"``, ``"int4"`` or ``"nf4"`` (static).
        shape: the float kernel's shape (static).
        dtype: the float kernel's dtype name, what `dequantize` returns (static).
        axis: the grouped axis, non-negative (static).
        group_size: elements per group along `axis`; ``shape[axis]`` for int8 (static).
        double: whether the scales are quantized too (static).

    Example:
        >>> import jax.numpy as jnp, lora_jax as lj
        >>> q = lj.quant.quantize_kernel(jnp.ones((128, 16)), "nf4", group_size=64)
        >>> q
        QuantizedKernel(nf4, shape=(128, 16), float32, axis=0, group_size=64)
        >>> q.codes.shape, q.codes.dtype, q.scales.shape, q.nbytes
        ((64, 16), dtype('uint8'), (2, 16), 1152)
    """

    codes: Any
    scales: Any
    scale_codes: Any
    scale_scales: Any
    scale_offset: Any
    format: str
    shape: tuple[int, ...]
    dtype: str
    axis: int
    group_size: int
    double: bool

    @property
    def ndim(self) -> int:
        """Number of axes of the float kernel."""
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes of every child array: what the quantized kernel really takes."""
        return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in self._arrays())

    def _arrays(self) -> list[Any]:
        """The children that are present (arrays, or `jax.ShapeDtypeStruct`s)."""
        names = ("codes", "scales", "scale_codes", "scale_scales", "scale_offset")
        return [getattr(self, n) for n in names if getattr(self, n) is not None]

    def __repr__(self) -> str:
        extra = ", double" if self.double else ""
        return (
            f"QuantizedKernel({self.format}, shape={self.shape}, {self.dtype}, "
            f"axis={self.axis}, group_size={self.group_size}{extra})"
        )


jax.tree_util.register_dataclass(
    QuantizedKernel,
    data_fields=["codes", "scales", "scale_codes", "scale_scales", "scale_offset"],
    meta_fields=["format", "shape", "dtype", "axis", "group_size", "double"],
)
# An NNX module may hold one as an attribute: it is data (arrays), not static structure.
nnx.register_data_type(QuantizedKernel)


def is_quantized(x: Any) -> bool:
    """Whether `x` is a `QuantizedKernel`.

    Args:
        x: anything.

    Returns:
        True for a `QuantizedKernel`.

    Example:
        >>> import jax.numpy as jnp, lora_jax as lj
        >>> w = jnp.ones((8, 4))
        >>> lj.quant.is_quantized(w), lj.quant.is_quantized(lj.quant.quantize_kernel(w, "int8"))
        (False, True)
    """
    return isinstance(x, QuantizedKernel)


def _check_input(w: Any, format: str, axis: int) -> tuple[jax.Array, int]:
    if format not in FORMATS:
        raise ValueError(f"quantize_kernel: unknown format {format!r}; formats are {FORMATS}.")
    w = jnp.asarray(w)
    if not jnp.issubdtype(w.dtype, jnp.floating):
        raise TypeError(f"quantize_kernel: `w` must be a float array; found dtype {w.dtype}.")
    if w.ndim < 1:
        raise ValueError(f"quantize_kernel: `w` must have at least 1 axis; found shape {w.shape}.")
    if isinstance(axis, bool) or not isinstance(axis, int) or not -w.ndim <= axis < w.ndim:
        raise ValueError(
            f"quantize_kernel: `axis` {axis!r} is out of range for shape {w.shape} (ndim {w.ndim})."
        )
    return w, axis % w.ndim


def quantize_kernel(
    w: jax.typing.ArrayLike,
    format: str,
    *,
    axis: int = -2,
    group_size: int = 64,
    double: bool = False,
) -> QuantizedKernel:
    """Quantizes one float kernel (pure `jax.numpy`: jit it with the options static).

    Args:
        w: the float kernel, any shape with at least one axis.
        format: ``"int8"``, ``"int4"`` or ``"nf4"``.
        axis: the grouped axis: the contracted (input) axis of the kernel, ``-2`` for a
            Dense ``(in, out)`` kernel. Stored non-negative.
        group_size: elements per scale along `axis` for the 4-bit formats: even and a
            divisor of ``shape[axis]``. Ignored for int8, which has one scale per output
            channel (``group_size`` becomes ``shape[axis]``).
        double: also quantize the scales (int8 blocks of 256, see `QuantizedKernel`);
            allowed for every format.

    Returns:
        The `QuantizedKernel`.

    Raises:
        ValueError: unknown `format`, `w` has no axis, `axis` is out of range, or
            `group_size` is not a positive even divisor of ``shape[axis]`` (the message
            lists those that are).
        TypeError: `w` is not a float array.

    Example:
        >>> import jax, jax.numpy as jnp, lora_jax as lj
        >>> w = jax.random.normal(jax.random.key(0), (256, 32))
        >>> q = lj.quant.quantize_kernel(w, "int4", group_size=64)
        >>> q.codes.shape, q.scales.shape
        ((128, 32), (4, 32))
        >>> bool(jnp.abs(lj.quant.dequantize(q) - w).max() <= q.scales.max() / 2 + 1e-6)
        True
    """
    w, axis = _check_input(w, format, axis)
    size = w.shape[axis]
    problem = group_problem(size, format, group_size)
    if problem:
        raise ValueError(f"quantize_kernel: {problem} (shape {w.shape}, axis {axis}).")
    group = size if format == "int8" else group_size
    codes, scales = encode(w, format, axis, group)
    if format != "int8":
        codes = pack_nibbles(codes, axis)
    scale_codes = scale_scales = scale_offset = None
    if double:
        scale_codes, scale_scales, scale_offset = double_quantize(scales)
    return QuantizedKernel(
        codes,
        None if double else scales,
        scale_codes,
        scale_scales,
        scale_offset,
        format=format,
        shape=tuple(w.shape),
        dtype=jnp.dtype(w.dtype).name,
        axis=axis,
        group_size=group,
        double=bool(double),
    )


def kernel_scales(q: QuantizedKernel) -> jax.Array:
    """The float32 first-level scales of `q` (reconstructed from their codes with `double`)."""
    if not q.double:
        return q.scales
    shape = list(q.shape)
    shape[q.axis] //= q.group_size
    return double_dequantize(q.scale_codes, q.scale_scales, q.scale_offset, tuple(shape))


def dequantize(q: QuantizedKernel) -> jax.Array:
    """The float kernel back from a `QuantizedKernel`, in ``q.dtype``.

    Computed in float32 and cast at the end; cheap enough to call at every use inside a
    model under `jax.jit` (unpack, table lookup, one multiply per element).

    Args:
        q: the quantized kernel.

    Returns:
        An array of shape ``q.shape`` and dtype ``q.dtype``.

    Raises:
        TypeError: `q` is not a `QuantizedKernel`.

    Example:
        >>> import jax.numpy as jnp, lora_jax as lj
        >>> w = jnp.array([[0.5, -2.0], [-1.0, 0.0]])
        >>> lj.quant.dequantize(lj.quant.quantize_kernel(w, "nf4", group_size=2))
        Array([[ 0.44070983, -2.        ],
               [-1.        ,  0.        ]], dtype=float32)
    """
    if not is_quantized(q):
        raise TypeError(f"dequantize: expected a QuantizedKernel; found {type(q).__name__}.")
    codes = q.codes if q.format == "int8" else unpack_nibbles(q.codes, q.axis)
    values = scale_back(decode(codes, q.format), kernel_scales(q), q.axis, q.group_size)
    return values.astype(q.dtype)
