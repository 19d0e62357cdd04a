"""Shared fixtures: small models with their variables, inputs and layouts."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from models import Mlp, Tiny

import lora_jax as lj


@pytest.fixture(scope="session")
def mlp():
    model = Mlp()
    x = jax.random.normal(jax.random.key(1), (3, 8))
    return model, model.init(jax.random.key(0), x), x


@pytest.fixture(scope="session")
def tiny():
    model = Tiny()
    ids = jax.random.randint(jax.random.key(1), (2, 6), 0, model.vocab)
    variables = model.init(jax.random.key(0), ids)
    layouts = lj.infer_layouts(model.apply, variables, ids)
    return model, variables, ids, layouts


def perturb(lora, key, scale=0.1):
    """Random non-zero values in every a and b (so the low-rank path is visible)."""
    leaves, treedef = jax.tree_util.tree_flatten(lora)
    keys = jax.random.split(key, len(leaves))
    new = [
        x + scale * jax.random.normal(k, x.shape, x.dtype)
        for x, k in zip(leaves, keys, strict=True)
    ]
    return jax.tree_util.tree_unflatten(treedef, new)


@pytest.fixture(scope="session")
def tiny_lora(tiny):
    _, variables, _, layouts = tiny
    config = lj.LoraConfig(rank=3, alpha=6.0, targets=[".*/kernel", ".*/embedding", ".*/gate"])
    frozen, lora = lj.split(variables, config, key=jax.random.key(2), layouts=layouts)
    return config, frozen, perturb(lora, jax.random.key(3))


def as_f64(x):
    import numpy as np

    return np.asarray(jnp.asarray(x, jnp.float32), dtype=np.float64)
