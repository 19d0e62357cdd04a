"""DoRA and lora_bias in place on NNX layers (`lj.nnx.add_lora`): the same outputs and
gradients as the pure form (`lj.nnx.lora_apply` on ``nnx.split`` state, which the contraction
rewrite serves and tests/test_dora.py holds against float64 NumPy references), PEFT's dropout
form, merging with `remove_lora(merge=True)`, `lora_state` and NNX's optimizer."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import lora_jax as lj


class Net(nnx.Module):
    """Every layer kind add_lora adapts in place, and a tied head reading the table."""

    def __init__(self, rngs: nnx.Rngs):
        self.embed = nnx.Embed(32, 12, rngs=rngs)
        self.lin = nnx.Linear(12, 10, rngs=rngs)
        self.gen = nnx.LinearGeneral(10, (2, 6), rngs=rngs)
        self.conv = nnx.Conv(12, 12, kernel_size=(3,), rngs=rngs)

    def __call__(self, ids):
        h = self.embed(ids)
        h = jnp.tanh(self.lin(h))
        h = self.gen(h).reshape(*h.shape[:-1], 12)
        h = self.conv(h)
        return self.embed.attend(h)


IDS = jnp.asarray(np.random.default_rng(0).integers(0, 32, (2, 7)))
TARGETS = r"(embed/embedding|lin/kernel|gen/kernel|conv/kernel)"
BIAS_TARGETS = r"(lin/kernel|gen/kernel|conv/kernel)"


def _perturbed(lora, seed=1):
    leaves, tree = jax.tree.flatten(lora)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return tree.unflatten(
        [
            x + 0.3 * jax.random.normal(k, x.shape, x.dtype)
            for x, k in zip(leaves, keys, strict=True)
        ]
    )


def _both(config):
    """The pure form's ``(apply, frozen, lora)`` and a model with the same adapters in place."""
    graphdef, state = nnx.split(Net(nnx.Rngs(0)))
    layouts = lj.nnx.infer_layouts(Net(nnx.Rngs(0)))
    frozen, lora = lj.split(state, config, key=jax.random.key(1), layouts=layouts)
    lora = _perturbed(lora)
    model = nnx.merge(graphdef, frozen)
    lj.nnx.add_lora(model, lora=lora)
    return lj.nnx.lora_apply(graphdef), frozen, lora, model


@pytest.mark.parametrize(
    "config",
    [
        lj.LoraConfig(rank=3, alpha=6.0, targets=TARGETS, use_dora=True),
        lj.LoraConfig(rank=3, alpha=6.0, targets=BIAS_TARGETS, lora_bias=True),
    ],
    ids=["dora", "lora_bias"],
)
def test_in_place_equals_the_pure_form_forward_gradients_and_merge(config):
    apply, frozen, lora, model = _both(config)
    want = apply(frozen, lora, IDS)
    np.testing.assert_allclose(model(IDS), want, rtol=2e-5, atol=2e-5)
    # gradients: the pure form's w.r.t. lora, the model's w.r.t. its LoRAParams
    cot = jax.random.normal(jax.random.key(5), want.shape)
    pure = jax.grad(lambda ad: jnp.sum(apply(frozen, ad, IDS) * cot))(lora)
    grads = nnx.grad(lambda m: jnp.sum(m(IDS) * cot), argnums=nnx.DiffState(0, nnx.LoRAParam))(
        model
    )
    names = {"lora_a": "a", "lora_b": "b", "lora_magnitude": "magnitude", "lora_bias": "bias"}
    leaf = {"embed": "embedding"}
    found = {}
    for path, g in nnx.to_flat_state(grads):
        module, name = str(path[0]), names[str(path[-1])]
        found[(module, name)] = g.get_value()
        ref = getattr(pure[module][leaf.get(module, "kernel")], name)
        np.testing.assert_allclose(found[(module, name)], ref, rtol=1e-4, atol=1e-5)
    extra = "magnitude" if config.use_dora else "bias"
    assert {n for _, n in found} == {"a", "b", extra} and len(found) == 3 * len(
        jax.tree.leaves(lora, is_leaf=lambda x: isinstance(x, lj.LoraWeights))
    )
    _, lora_back = lj.nnx.lora_state(model)
    assert jax.tree.structure(lora_back) == jax.tree.structure(lora)
    lj.nnx.remove_lora(model, merge=True)  # DoRA's gain folded in; s·bias into the biases
    np.testing.assert_allclose(model(IDS), want, rtol=1e-4, atol=1e-4)


def test_in_place_dropout_follows_peft():
    """With W = I, b = 0 and gain g: W x + (g - 1)·W x' for the dropped x' (PEFT's form):
    each output is x or x + (g - 1)·x / (1 - p) (kept) or x (dropped), never anything else;
    `eval()` is the no-dropout output g·x."""
    layer = nnx.Linear(6, 6, use_bias=False, rngs=nnx.Rngs(0))
    layer.kernel.set_value(jnp.eye(6))
    config = lj.LoraConfig(rank=2, targets="kernel", use_dora=True, dropout=0.5)
    lj.nnx.add_lora(layer, config, key=jax.random.key(1), rngs=nnx.Rngs(lora_dropout=3))
    layer.lora_magnitude.set_value(jnp.full((6,), 3.0))  # ‖I columns‖ = 1: g = 3
    x = jax.random.normal(jax.random.key(2), (64, 6)) + 2.0
    y = layer(x)
    kept = jnp.isclose(y, x + 2.0 * x / 0.5, rtol=1e-5)
    dropped = jnp.isclose(y, x, rtol=1e-5)
    assert bool((kept | dropped).all()) and 0.3 < float(kept.mean()) < 0.7
    layer.eval()
    np.testing.assert_allclose(layer(x), 3.0 * x, rtol=1e-5)


def test_in_place_refuses_einsum_and_merging_a_bias_into_none():
    class E(nnx.Module):
        def __init__(self, rngs):
            self.e = nnx.Einsum("bd,dhk->bhk", (4, 2, 3), rngs=rngs)

        def __call__(self, x):
            return self.e(x)

    model = E(nnx.Rngs(0))
    config = lj.LoraConfig(rank=2, targets="e/kernel", use_dora=True)
    with pytest.raises(ValueError, match=r"nnx\.Einsum run in the pure NNX form"):
        lj.nnx.add_lora(model, config, key=jax.random.key(1))
    layer = nnx.Linear(4, 3, use_bias=False, rngs=nnx.Rngs(0))
    lj.nnx.add_lora(
        layer, lj.LoraConfig(rank=2, targets="kernel", lora_bias=True), key=jax.random.key(1)
    )
    with pytest.raises(ValueError, match="the layer has none"):
        lj.nnx.remove_lora(layer, merge=True)


def test_in_place_dora_trains_with_nnx_optimizer():
    model = Net(nnx.Rngs(0))
    config = lj.LoraConfig(rank=3, alpha=6.0, targets=TARGETS, use_dora=True)
    lj.nnx.add_lora(model, config, key=jax.random.key(1))
    before = nnx.state(model, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam)))
    before = jax.tree.map(jnp.copy, before)
    optimizer = nnx.Optimizer(model, optax.adam(3e-2), wrt=nnx.LoRAParam)
    target = jax.random.normal(jax.random.key(4), (2, 7, 32))
    loss = lambda m: jnp.mean((m(IDS) - target) ** 2)
    grad = nnx.grad(loss, argnums=nnx.DiffState(0, nnx.LoRAParam))
    first = loss(model)
    magnitude = jnp.copy(model.lin.lora_magnitude.get_value())
    for _ in range(5):
        optimizer.update(model, grad(model))
    assert loss(model) < first
    assert not jnp.allclose(model.lin.lora_magnitude.get_value(), magnitude)
    after = nnx.state(model, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam)))
    for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=True):
        assert (x == y).all()  # the base is untouched
