"""Issue 14's acceptance test: adapters carry their own scale. `split` with alpha=16, then
apply, merge, unmerge, save/load, PEFT export/import and a checkpoint round trip, none of
them given a config, all match a float64 NumPy reference computed with s = alpha / r."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import as_f64, perturb

import lora_jax as lj

ALPHA, RANK, SMALL = 16.0, 4, 2  # `fc2` gets rank 2 through rank_pattern: s = 8 there


class Mlp(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Dense(16, name="fc1")(x))
        return nn.Dense(5, name="fc2")(h)


def _reference(variables, lora, x):
    """float64 NumPy forward pass with W + (alpha / r)·a@b at each layer."""
    p = variables["params"]

    def layer(name, h):
        w = lora["params"][name]["kernel"]
        rank = RANK if name == "fc1" else SMALL
        kernel = as_f64(p[name]["kernel"]) + ALPHA / rank * as_f64(w.a) @ as_f64(w.b)
        return h @ kernel + as_f64(p[name]["bias"])

    return layer("fc2", np.maximum(layer("fc1", as_f64(x)), 0.0))


@pytest.fixture(scope="module")
def setup():
    model = Mlp()
    x = jax.random.normal(jax.random.key(0), (4, 8))
    variables = model.init(jax.random.key(1), x)
    config = lj.LoraConfig(rank=RANK, alpha=ALPHA, targets=".*/kernel", rank_pattern={"fc2": SMALL})
    frozen, lora = lj.split(variables, config, key=jax.random.key(2))
    return model, x, variables, frozen, perturb(lora, jax.random.key(3), 0.3)


def _check(model, x, frozen, lora, variables):
    want = _reference(variables, lora, x)
    got = lj.lora_apply(model.apply)(frozen, lora, x)
    np.testing.assert_allclose(as_f64(got), want, rtol=1e-4, atol=1e-5)
    merged = model.apply(lj.merge(frozen, lora), x)
    np.testing.assert_allclose(as_f64(merged), want, rtol=1e-4, atol=1e-5)
    assert np.abs(want - as_f64(model.apply(variables, x))).max() > 0.1  # adapters matter


def test_scales_come_from_the_adapters(setup):
    model, x, variables, frozen, lora = setup
    assert lora["params"]["fc1"]["kernel"].scale == ALPHA / RANK
    assert lora["params"]["fc2"]["kernel"].scale == ALPHA / SMALL
    _check(model, x, frozen, lora, variables)
    back = lj.unmerge(lj.merge(frozen, lora), lora)
    for got, want in zip(jax.tree.leaves(back), jax.tree.leaves(variables), strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5)


def test_adapter_file_round_trip(setup, tmp_path):
    model, x, variables, frozen, lora = setup
    lj.save_adapter(tmp_path / "adapter", lora)
    loaded = lj.load_adapter(tmp_path / "adapter")
    assert jax.tree.structure(loaded) == jax.tree.structure(lora)  # scales are in the structure
    _check(model, x, frozen, loaded, variables)


def test_peft_round_trip(setup, tmp_path):
    model, x, variables, frozen, lora = setup
    module_map = lj.peft.ModuleMap((lj.peft.ModuleRule(r"params/(\w+)/kernel", r"\1"),))
    lj.peft.export_adapter(tmp_path / "peft", lora, module_map=module_map, task_type=None)
    back = lj.peft.import_adapter(tmp_path / "peft", frozen, module_map=module_map)
    for path in ("fc1", "fc2"):
        assert back["params"][path]["kernel"].scale == lora["params"][path]["kernel"].scale
    _check(model, x, frozen, back, variables)


def test_checkpoint_round_trip(setup, tmp_path):
    model, x, variables, frozen, lora = setup
    tx = optax.adam(1e-3)
    state = lj.TrainState.create(lora, tx, key=jax.random.key(4))
    with lj.CheckpointManager(tmp_path / "ckpt") as mgr:
        mgr.save(3, state)
        target = lj.TrainState.create(jax.tree.map(jnp.zeros_like, lora), tx, key=jax.random.key(0))
        restored, _ = mgr.restore(target, frozen=frozen)
    assert int(restored.step) == 0
    _check(model, x, frozen, restored.lora, variables)
