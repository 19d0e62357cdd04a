"""Shared fixtures: small models with their variables, inputs and layouts."""

from __future__ import annotations

import jax
import pytest
from helpers import perturb
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


@pytest.fixture(scope="session")
def tiny_lora(tiny):
    _, variables, _, layouts = tiny
    config = lj.LoraConfig(rank=3, alpha=6.0, targets=[".*/kernel", ".*/embedding", ".*/gate"])
    frozen, lora = lj.split(variables, config, key=jax.random.key(2), layouts=layouts)
    return config, frozen, perturb(lora, jax.random.key(3))
