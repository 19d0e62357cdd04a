"""Initial values of the adapter factors: normal, kaiming_uniform, gaussian and PiSSA."""

from __future__ import annotations

import math
import zlib

import jax
import jax.numpy as jnp

from lora_jax.layout import Layout
from lora_jax.weights import LoraWeights, delta, to_matrix

NORMAL_STD = 0.02


def path_key(key: jax.Array, path: str) -> jax.Array:
    """A key for one leaf, folded from its path: adding a target never moves the others."""
    return jax.random.fold_in(key, zlib.crc32(path.encode()) & 0x7FFFFFFF)


def init_factors(
    key: jax.Array,
    kernel: jax.Array,
    layout: Layout,
    *,
    rank: int,
    scale: float,
    init: str,
    dtype: jnp.dtype,
) -> tuple[LoraWeights, jax.Array | None]:
    """Initial adapter for one kernel, and the PiSSA residual kernel (None otherwise)."""
    a_shape, b_shape = layout.factor_shapes(tuple(kernel.shape), rank)
    b = jnp.zeros(b_shape, dtype)
    if init == "normal":
        a = NORMAL_STD * jax.random.normal(key, a_shape, dtype)
    elif init == "kaiming_uniform":
        fan_in = math.prod(layout.sizes(tuple(kernel.shape))[1])
        bound = 1.0 / math.sqrt(fan_in)
        a = jax.random.uniform(key, a_shape, dtype, -bound, bound)
    elif init == "gaussian":
        a = jax.random.normal(key, a_shape, dtype) / rank
    else:  # pissa
        return _pissa(kernel, layout, rank=rank, scale=scale, dtype=dtype)
    return LoraWeights(a, b, layout), None


def _pissa(
    kernel: jax.Array, layout: Layout, *, rank: int, scale: float, dtype: jnp.dtype
) -> tuple[LoraWeights, jax.Array]:
    """PiSSA: ``s·a@b`` is the top-`rank` SVD part of W; the base keeps the rest."""
    w = to_matrix(kernel.astype(jnp.float32), layout)
    u, sv, vh = jnp.linalg.svd(w, full_matrices=False)
    root = jnp.sqrt(sv[:, :rank] / scale)
    a = u[:, :, :rank] * root[:, None, :]
    b = root[:, :, None] * vh[:, :rank, :]
    a_shape, b_shape = layout.factor_shapes(tuple(kernel.shape), rank)
    weights = LoraWeights(
        a.reshape(a_shape).astype(dtype), b.reshape(b_shape).astype(dtype), layout
    )
    residual = kernel.astype(jnp.float32) - delta(weights, scale, jnp.float32)
    return weights, residual.astype(kernel.dtype)
