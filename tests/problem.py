"""A small learnable task, shared by the training tests and the multi-process worker.

The teacher is the base model with a random low-rank change to both kernels, so rank-4
adapters can fit it exactly and the loss has somewhere to go.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from models import Mlp

import lora_jax as lj

IN, HIDDEN, OUT, BATCH = 32, 128, 32, 16
CONFIG = lj.LoraConfig(rank=4, alpha=8.0, targets=".*/kernel")
MODEL = Mlp(hidden=HIDDEN, out=OUT)
APPLY = lj.lora_apply(MODEL.apply, CONFIG)


def base() -> dict:
    return MODEL.init(jax.random.key(0), jnp.zeros((1, IN)))


def teacher(variables: dict) -> dict:
    def bump(path, w):
        if w.ndim != 2:
            return w
        k1, k2 = jax.random.split(jax.random.fold_in(jax.random.key(9), w.shape[0]))
        return w + 0.3 * jax.random.normal(k1, (w.shape[0], 2)) @ jax.random.normal(
            k2, (2, w.shape[1])
        ) / np.sqrt(w.shape[0])

    return jax.tree_util.tree_map_with_path(bump, variables)


def batches(n: int, size: int = BATCH, seed: int = 1) -> list[dict]:
    target = teacher(base())
    out = []
    for i in range(n):
        x = jax.random.normal(jax.random.fold_in(jax.random.key(seed), i), (size, IN))
        out.append({"x": np.asarray(x), "y": np.asarray(MODEL.apply(target, x))})
    return out


def loss_fn(frozen, lora, batch, key):
    del key
    pred = APPLY(frozen, lora, batch["x"])
    return jnp.mean((pred.astype(jnp.float32) - batch["y"]) ** 2)


def optimizer() -> optax.GradientTransformation:
    return optax.adam(3e-2)


def start(seed: int = 2):
    frozen, lora = lj.split(base(), CONFIG, key=jax.random.key(seed))
    return frozen, lj.TrainState.create(lora, optimizer(), key=jax.random.key(seed + 1))


def to_numpy(tree):
    """Host copies of every leaf (global arrays gathered across processes)."""
    from jax.experimental import multihost_utils

    def host(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(x)

    return jax.tree.map(host, tree)
