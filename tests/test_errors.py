"""Each case that used to be silently wrong (issue 14) is now a clear error or a warning
that names the argument or the path."""

from __future__ import annotations

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import as_f64, perturb

import lora_jax as lj


class Mlp(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(4, name="fc2")(nn.relu(nn.Dense(8, name="fc1")(x)))


@pytest.fixture(scope="module")
def mlp():
    model = Mlp()
    x = jax.random.normal(jax.random.key(0), (3, 6))
    return model, model.init(jax.random.key(1), x), x


def test_scale_travels_with_the_adapter(mlp):
    """split with alpha=16, then apply and merge with no config: s = 16 / r, always."""
    model, variables, x = mlp
    config = lj.LoraConfig(rank=4, alpha=16.0, targets=".*/kernel")
    frozen, lora = lj.split(variables, config, key=jax.random.key(2))
    lora = perturb(lora, jax.random.key(3))
    w = lora["params"]["fc1"]["kernel"]
    assert w.scale == 4.0 and w.rank == 4
    kernel = as_f64(variables["params"]["fc1"]["kernel"])
    want = kernel + 4.0 * as_f64(w.a) @ as_f64(w.b)
    np.testing.assert_allclose(
        as_f64(lj.merge(frozen, lora)["params"]["fc1"]["kernel"]), want, rtol=1e-5
    )
    merged = model.apply(lj.merge(frozen, lora), x)
    np.testing.assert_allclose(
        lj.lora_apply(model.apply)(frozen, lora, x), merged, rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("rank_pattern", {"fc9": 2}, r"`rank_pattern` key 'fc9' matches none of the 2 targets"),
        ("alpha_pattern", {"nope": 2.0}, r"`alpha_pattern` key 'nope' matches none"),
        ("exclude", ".*/fc9/kernel", r"`exclude` pattern '.\*/fc9/kernel' matches no parameter"),
    ],
)
def test_patterns_that_match_nothing_are_errors(mlp, field, value, message):
    _, variables, _ = mlp
    config = lj.LoraConfig(rank=2, targets=".*/kernel", **{field: value})
    with pytest.raises(ValueError, match=message):
        lj.split(variables, config, key=jax.random.key(0))


def test_dropout_without_its_rng_warns(mlp):
    model, variables, x = mlp
    config = lj.LoraConfig(rank=2, targets=".*/kernel", dropout=0.1)
    frozen, lora = lj.split(variables, config, key=jax.random.key(0))
    assert lora["params"]["fc1"]["kernel"].dropout == 0.1
    with pytest.warns(UserWarning, match=r"'params/fc1/kernel', rate 0.1.*no 'lora_dropout' rng"):
        lj.lora_apply(model.apply)(frozen, lora, x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lj.lora_apply(model.apply, deterministic=True)(frozen, lora, x)
        lj.lora_apply(model.apply)(frozen, lora, x, rngs={lj.DROPOUT_RNG: jax.random.key(1)})


def test_pissa_adapter_on_the_original_weights_is_refused(mlp):
    model, variables, x = mlp
    config = lj.LoraConfig(rank=2, targets=".*/kernel", init="pissa")
    frozen, lora = lj.split(variables, config, key=jax.random.key(0))
    apply = lj.lora_apply(model.apply)
    np.testing.assert_allclose(apply(frozen, lora, x), model.apply(variables, x), atol=1e-5)
    with pytest.raises(ValueError, match=r"params/fc1/kernel: .*init='pissa'.*residual"):
        apply(variables, lora, x)
    with pytest.raises(ValueError, match=r"params/fc1/kernel: .*init='pissa'"):
        lj.merge(variables, lora)
    back = lj.unmerge(lj.merge(frozen, lora), lora)  # unmerge takes merged weights: allowed
    np.testing.assert_allclose(
        back["params"]["fc1"]["kernel"], frozen["params"]["fc1"]["kernel"], atol=1e-5
    )


def test_summary_of_adapters_alone(mlp):
    _, variables, _ = mlp
    _, lora = lj.split(variables, lj.LoraConfig(rank=2, targets=".*/kernel"), key=jax.random.key(0))
    s = lj.summary(lora)
    assert s.trainable == 6 * 2 + 2 * 8 + 8 * 2 + 2 * 4
    assert [row[0] for row in s.rows] == ["params/fc1/kernel", "params/fc2/kernel"]
    assert s.rows[0][1] == (6, 8)  # the kernel shape, from the layout
    assert "trainable" in str(s)


def test_config_given_as_a_string(mlp):
    _, variables, _ = mlp
    with pytest.raises(
        TypeError,
        match=r"split: `config` must be a lj.LoraConfig; found str 'all-linear'.*targets=",
    ):
        lj.split(variables, "all-linear", key=jax.random.key(0))
    with pytest.raises(TypeError, match=r"select_targets: `config` must be a lj.LoraConfig"):
        lj.core.select_targets(variables, "all-linear")


def test_one_argument_targets_callable():
    with pytest.raises(
        TypeError, match=r"`targets` callable must take two arguments, \(path, leaf\)"
    ):
        lj.LoraConfig(targets=lambda path: path.endswith("kernel"))
    with pytest.raises(TypeError, match=r"`exclude` callable must take two arguments"):
        lj.LoraConfig(targets=".*", exclude=lambda: True)
    assert lj.LoraConfig(targets=lambda path, leaf: True).targets is not None


def test_params_without_the_params_collection(mlp):
    model, variables, x = mlp
    config = lj.LoraConfig(rank=2, targets=".*/kernel")
    frozen, lora = lj.split(variables["params"], config, key=jax.random.key(0))
    with pytest.raises(ValueError, match=r"`frozen` has no 'params' collection .*Mlp.apply"):
        lj.lora_apply(model.apply)(frozen, lora, x)
    with pytest.raises(ValueError, match=r"no 'params' collection"):
        lj.routes(model.apply, frozen, lora, x)


@pytest.mark.parametrize(
    "key", [0, "seed", np.zeros(3, np.uint32), jax.random.split(jax.random.key(0), 2)]
)
def test_bad_prng_key_names_key(mlp, key):
    _, variables, _ = mlp
    with pytest.raises(TypeError, match=r"split: `key` must be (a|one) PRNG key"):
        lj.split(variables, lj.LoraConfig(targets=".*/kernel"), key=key)


def test_raw_prng_key_still_works(mlp):
    _, variables, _ = mlp
    config = lj.LoraConfig(rank=2, targets=".*/kernel")
    _, lora = lj.split(variables, config, key=jax.random.PRNGKey(0))
    assert lora["params"]["fc1"]["kernel"].a.shape == (6, 2)


def test_routes_are_planned_before_the_call():
    """A model whose adapted parameter is used raw: the route is decided by one abstract
    trace, then the model runs once (not once factored and again merged)."""
    calls = []

    class Raw(nn.Module):
        @nn.compact
        def __call__(self, x):
            calls.append(1)
            w = self.param("w", nn.initializers.normal(), (x.shape[-1], 3))
            return nn.Dense(3, name="fc")(x) + x @ w + jnp.sum(w)  # one use is not a contraction

    model = Raw()
    x = jnp.ones((2, 4))
    variables = model.init(jax.random.key(0), x)
    frozen, lora = lj.split(
        variables, lj.LoraConfig(rank=2, targets=".*/(kernel|w)"), key=jax.random.key(1)
    )
    lora = perturb(lora, jax.random.key(2))
    apply = lj.lora_apply(model.apply)
    calls.clear()
    with pytest.warns(
        UserWarning, match=r"params/w \(factored \(dot_general\); merged \(used by reduce_sum\)\)"
    ):
        y = apply(frozen, lora, x)
    assert len(calls) == 2  # one abstract planning trace, one trace of the program
    calls.clear()
    apply(frozen, lora, x)
    assert len(calls) == 1  # same structure: the plan is reused (and warned once)
    np.testing.assert_allclose(y, model.apply(lj.merge(frozen, lora), x), rtol=1e-5, atol=1e-6)
    assert lj.routes(model.apply, frozen, lora, x) == {
        "params/fc/kernel": "factored (Dense)",
        "params/w": "factored (dot_general); merged (used by reduce_sum)",
    }
