"""The arithmetic of each storage format: per-group absmax codes, nibble packing, and the
second-level (double) quantization of the scales. Pure `jax.numpy`, no Python loops over
groups, so all of it traces under `jax.jit`."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

__all__ = [
    "DOUBLE_BLOCK",
    "FORMATS",
    "NF4_VALUES",
    "decode",
    "double_dequantize",
    "double_quantize",
    "encode",
    "group_problem",
    "pack_nibbles",
    "scale_back",
    "unpack_nibbles",
]

FORMATS = ("int8", "int4", "nf4")

# NormalFloat4 (QLoRA, Dettmers et al. 2023, Appendix E; bitsandbytes `get_4bit_type("nf4")`).
NF4_VALUES = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)

# The largest code magnitude of each linear format: scale = absmax / LEVELS.
LEVELS = {"int8": 127, "int4": 7}

# Scales per block of the double quantization (as bitsandbytes' `compress_statistics`).
DOUBLE_BLOCK = 256


def group_problem(size: int, format: str, group_size: int) -> str | None:
    """What is wrong with grouping an axis of `size` by `group_size`, or None if nothing.

    int8 has one group per output channel (the whole axis), so only 4-bit formats are
    checked: the group size must be a positive even divisor of `size` (codes are packed two
    per byte along the axis)."""
    if format == "int8":
        return None
    even = [d for d in range(2, size + 1, 2) if size % d == 0]
    fits = (
        f"even group sizes that divide {size}: {even}"
        if even
        else (
            f"no even group size divides {size} (an odd axis cannot hold packed 4-bit codes; "
            f"use format='int8')"
        )
    )
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        return f"`group_size` must be a positive int; found {group_size!r} ({fits})"
    if group_size % 2:
        return (
            f"`group_size` {group_size} is odd; {format} packs two codes per byte along the "
            f"grouped axis, so it must be even ({fits})"
        )
    if size % group_size:
        return f"`group_size` {group_size} does not divide the grouped axis of size {size} ({fits})"
    return None


def _grouped(x: jax.Array, axis: int, group_size: int) -> jax.Array:
    """`x` with `axis` split into ``(groups, group_size)``: the group axis is ``axis + 1``."""
    shape = x.shape
    return x.reshape((*shape[:axis], shape[axis] // group_size, group_size, *shape[axis + 1 :]))


def _safe(scale: jax.Array) -> jax.Array:
    """`scale` with zeros replaced by ones, to divide by (an all-zero group codes to 0)."""
    return jnp.where(scale > 0, scale, 1.0)


def encode(w: jax.Array, format: str, axis: int, group_size: int) -> tuple[jax.Array, jax.Array]:
    """Codes (unpacked; int8 values, or 0..15 for 4-bit) and float32 scales of `w`.

    The scales have `w`'s shape with ``shape[axis] // group_size`` groups along `axis`.
    """
    grouped = _grouped(w.astype(jnp.float32), axis, group_size)
    absmax = jnp.max(jnp.abs(grouped), axis=axis + 1, keepdims=True)
    if format == "nf4":
        scaled = grouped / _safe(absmax)
        table = jnp.asarray(NF4_VALUES, jnp.float32)
        midpoints = (table[1:] + table[:-1]) / 2
        # side="left": a value exactly on a midpoint takes the lower index.
        codes = jnp.searchsorted(midpoints, scaled, side="left").astype(jnp.uint8)
        scale = absmax
    else:
        levels = LEVELS[format]
        scale = absmax / levels
        codes = jnp.clip(jnp.round(grouped / _safe(scale)), -levels, levels)
        codes = codes.astype(jnp.int8) if format == "int8" else (codes + 8).astype(jnp.uint8)
    return codes.reshape(w.shape), jnp.squeeze(scale, axis + 1)


def decode(codes: jax.Array, format: str) -> jax.Array:
    """The float32 values of unpacked codes, before scaling (the inverse of `encode`)."""
    if format == "int8":
        return codes.astype(jnp.float32)
    if format == "int4":
        return codes.astype(jnp.float32) - 8.0
    return jnp.take(jnp.asarray(NF4_VALUES, jnp.float32), codes.astype(jnp.int32), axis=0)


def scale_back(values: jax.Array, scales: jax.Array, axis: int, group_size: int) -> jax.Array:
    """``values * scale`` with each scale repeated over its group along `axis`."""
    grouped = _grouped(values, axis, group_size)
    return (grouped * jnp.expand_dims(scales, axis + 1)).reshape(values.shape)


def pack_nibbles(codes: jax.Array, axis: int) -> jax.Array:
    """Packs 4-bit codes two per uint8 along `axis`: element ``2i`` in the low nibble,
    ``2i + 1`` in the high one (``shape[axis]`` must be even)."""
    pairs = _grouped(codes.astype(jnp.uint8), axis, 2)
    low = jnp.take(pairs, 0, axis=axis + 1)
    high = jnp.take(pairs, 1, axis=axis + 1)
    return low | (high << 4)


def unpack_nibbles(packed: jax.Array, axis: int) -> jax.Array:
    """The inverse of `pack_nibbles`: ``shape[axis]`` doubles, codes 0..15 as uint8."""
    pairs = jnp.stack([packed & 0xF, packed >> 4], axis=axis + 1)
    shape = packed.shape
    return pairs.reshape((*shape[:axis], 2 * shape[axis], *shape[axis + 1 :]))


def double_quantize(scales: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Second-level quantization of float32 scales: ``(codes, steps, offset)``.

    ``offset`` is the mean of the scales; ``scales - offset``, flattened row-major, is cut
    into blocks of `DOUBLE_BLOCK` (the last one padded with zeros), and each block is coded
    as int8 in [-127, 127] with step ``block absmax / 127``. `codes` has one int8 per scale
    (the padding is not stored), `steps` one float32 per block.
    """
    offset = jnp.mean(scales)
    flat = (scales - offset).reshape(-1)
    blocks = math.ceil(flat.size / DOUBLE_BLOCK)
    padded = jnp.pad(flat, (0, blocks * DOUBLE_BLOCK - flat.size)).reshape(blocks, DOUBLE_BLOCK)
    steps = jnp.max(jnp.abs(padded), axis=1) / 127
    codes = jnp.clip(jnp.round(padded / _safe(steps)[:, None]), -127, 127).astype(jnp.int8)
    return codes.reshape(-1)[: flat.size], steps, offset


def double_dequantize(
    codes: jax.Array, steps: jax.Array, offset: jax.Array, shape: tuple[int, ...]
) -> jax.Array:
    """The float32 scales of shape `shape` back from `double_quantize`'s output."""
    blocks = steps.shape[0]
    padded = jnp.pad(codes.astype(jnp.float32), (0, blocks * DOUBLE_BLOCK - codes.size))
    flat = (padded.reshape(blocks, DOUBLE_BLOCK) * steps[:, None]).reshape(-1)
    return flat[: codes.size].reshape(shape) + offset
