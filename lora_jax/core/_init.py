"""Initial values of the adapter factors: normal, kaiming_uniform, gaussian, PiSSA and
OLoRA."""

from __future__ import annotations

import dataclasses
import math
import zlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax.core._layout import Layout
from lora_jax.core._weights import LoraWeights, scaled_delta, to_matrix

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
    dropout: float = 0.0,
) -> tuple[LoraWeights, jax.Array | None]:
    """Initial adapter for one kernel, and the residual kernel of a residual init (PiSSA,
    OLoRA; None otherwise)."""
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
    elif init == "olora":
        return _olora(kernel, layout, rank=rank, scale=scale, dtype=dtype, dropout=dropout)
    else:  # pissa
        return _pissa(kernel, layout, rank=rank, scale=scale, dtype=dtype, dropout=dropout)
    return LoraWeights(a, b, layout, scale=scale, dropout=dropout), None


def _residual(
    kernel: jax.Array, weights: LoraWeights, scale: float
) -> tuple[LoraWeights, jax.Array]:
    """The residual kernel ``W - s·a@b`` (the frozen base of a residual init), and the
    adapter carrying its norm (checked wherever the base is given back)."""
    residual = (kernel.astype(jnp.float32) - scaled_delta(weights, scale, jnp.float32)).astype(
        kernel.dtype
    )
    norm = float(np.linalg.norm(np.asarray(residual, np.float64).ravel()))
    return dataclasses.replace(weights, residual_norm=norm), residual


def _olora(
    kernel: jax.Array, layout: Layout, *, rank: int, scale: float, dtype: jnp.dtype, dropout: float
) -> tuple[LoraWeights, jax.Array]:
    """OLoRA as PEFT's `olora_init` (peft 0.21, ``tuners/lora/layer.py``): ``Q, R = qr(W)``
    of the ``(out, in)`` weight, ``A = R[:r]``, ``B = Q[:, :r]`` (not divided by the scale),
    and the base becomes ``W - s·B@A``; per stack slice. Our ``a = Aᵀ``, ``b = Bᵀ``."""
    w = to_matrix(kernel.astype(jnp.float32), layout)  # (slices, in, out)
    q, r = jnp.linalg.qr(jnp.swapaxes(w, -1, -2))  # PEFT's (out, in) weight
    a = jnp.swapaxes(r[:, :rank, :], -1, -2)
    b = jnp.swapaxes(q[:, :, :rank], -1, -2)
    a_shape, b_shape = layout.factor_shapes(tuple(kernel.shape), rank)
    a, b = a.reshape(a_shape).astype(dtype), b.reshape(b_shape).astype(dtype)
    return _residual(kernel, LoraWeights(a, b, layout, scale=scale, dropout=dropout), scale)


def _pissa(
    kernel: jax.Array, layout: Layout, *, rank: int, scale: float, dtype: jnp.dtype, dropout: float
) -> tuple[LoraWeights, jax.Array]:
    """PiSSA: ``s·a@b`` is the top-`rank` SVD part of W; the base keeps the rest."""
    w = to_matrix(kernel.astype(jnp.float32), layout)
    u, sv, vh = jnp.linalg.svd(w, full_matrices=False)
    root = jnp.sqrt(sv[:, :rank] / scale)
    a = u[:, :, :rank] * root[:, None, :]
    b = root[:, :, None] * vh[:, :rank, :]
    a_shape, b_shape = layout.factor_shapes(tuple(kernel.shape), rank)
    a, b = a.reshape(a_shape).astype(dtype), b.reshape(b_shape).astype(dtype)
    return _residual(kernel, LoraWeights(a, b, layout, scale=scale, dropout=dropout), scale)


def check_key(key: Any, where: str) -> jax.Array:
    """`key` as a PRNG key, or a TypeError naming the `key` argument of `where`."""
    if isinstance(key, jax.Array) and jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        if key.shape != ():
            raise TypeError(
                f"{where}: `key` must be one PRNG key; found a key array of shape {key.shape}."
            )
        return key
    if isinstance(key, (jax.Array, np.ndarray)) and key.dtype == np.uint32 and key.shape == (2,):
        return jnp.asarray(key)  # a raw jax.random.PRNGKey
    raise TypeError(
        f"{where}: `key` must be a PRNG key such as jax.random.key(0); found "
        f"{type(key).__name__} {key!r}."
    )
