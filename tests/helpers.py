"""Small test helpers shared by several test modules."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def perturb(lora, key, scale=0.1):
    """Random non-zero values in every a and b (so the low-rank path is visible)."""
    leaves, treedef = jax.tree_util.tree_flatten(lora)
    keys = jax.random.split(key, len(leaves))
    new = [
        x + scale * jax.random.normal(k, x.shape, x.dtype)
        for x, k in zip(leaves, keys, strict=True)
    ]
    return jax.tree_util.tree_unflatten(treedef, new)


def as_f64(x):
    return np.asarray(jnp.asarray(x, jnp.float32), dtype=np.float64)
