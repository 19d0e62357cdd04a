"""split and LoraConfig: target selection, shapes, init statistics and every error path."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lj

PARAMS = {
    "params": {
        "attn": {
            "query": {"kernel": jnp.ones((16, 8)), "bias": jnp.zeros(8)},
            "value": {"kernel": jnp.ones((16, 8)), "bias": jnp.zeros(8)},
            "out": {"kernel": jnp.ones((8, 16))},
        },
        "mlp": {"fc": {"kernel": jnp.ones((16, 32))}, "out": {"kernel": jnp.ones((32, 16))}},
        "embed": {"embedding": jnp.ones((50, 16))},
        "lm_head": {"kernel": jnp.ones((16, 50))},
        "step": jnp.zeros((4, 4), jnp.int32),
    }
}


def _targets(config, params=PARAMS, **kw):
    return list(lj.core.select_targets(params, config, **kw))


def test_regex_list_and_callable_targets():
    assert _targets(lj.LoraConfig(targets=r".*/(query|value)/kernel")) == [
        "params/attn/query/kernel",
        "params/attn/value/kernel",
    ]
    assert _targets(lj.LoraConfig(targets=[".*/query/kernel", ".*/fc/kernel"])) == [
        "params/attn/query/kernel",
        "params/mlp/fc/kernel",
    ]
    pick = lambda path, leaf: leaf.shape == (32, 16)
    assert _targets(lj.LoraConfig(targets=pick)) == ["params/mlp/out/kernel"]


def test_presets():
    assert _targets(lj.LoraConfig(targets="attention")) == [
        "params/attn/out/kernel",
        "params/attn/query/kernel",
        "params/attn/value/kernel",
    ]
    assert _targets(lj.LoraConfig(targets="all-linear")) == [
        "params/attn/out/kernel",
        "params/attn/query/kernel",
        "params/attn/value/kernel",
        "params/mlp/fc/kernel",
        "params/mlp/out/kernel",
    ]
    assert _targets(lj.LoraConfig(targets="all-linear", exclude=".*/mlp/.*")) == [
        "params/attn/out/kernel",
        "params/attn/query/kernel",
        "params/attn/value/kernel",
    ]


def test_split_shapes_and_frozen_is_the_input():
    config = lj.LoraConfig(rank=4, targets="attention")
    frozen, lora = lj.split(PARAMS, config, key=jax.random.key(0))
    assert frozen is PARAMS
    q = lora["params"]["attn"]["query"]["kernel"]
    assert q.a.shape == (16, 4) and q.b.shape == (4, 8) and q.rank == 4
    assert not np.asarray(q.b).any()
    assert set(lora["params"]) == {"attn"}


def test_rank_and_alpha_patterns():
    config = lj.LoraConfig(
        rank=4,
        alpha=8.0,
        targets="all-linear",
        rank_pattern={"mlp/fc": 2, r".*/out/kernel": 1},
        alpha_pattern={"query": 1.0},
    )
    _, lora = lj.split(PARAMS, config, key=jax.random.key(0))
    assert lora["params"]["mlp"]["fc"]["kernel"].rank == 2
    assert lora["params"]["mlp"]["out"]["kernel"].rank == 1
    assert lora["params"]["attn"]["query"]["kernel"].rank == 4
    assert config.scale_for("params/attn/query/kernel") == 0.25
    assert config.scale_for("params/mlp/fc/kernel") == 4.0
    rs = lj.LoraConfig(rank=16, alpha=8.0, targets="attention", use_rslora=True)
    assert rs.scale_for("params/attn/query/kernel") == 2.0
    assert hash(config) == hash(config) and config == config


def test_per_leaf_keys_do_not_depend_on_other_targets():
    one = lj.split(PARAMS, lj.LoraConfig(targets=".*/query/kernel"), key=jax.random.key(3))[1]
    two = lj.split(PARAMS, lj.LoraConfig(targets="all-linear"), key=jax.random.key(3))[1]
    a1 = one["params"]["attn"]["query"]["kernel"].a
    a2 = two["params"]["attn"]["query"]["kernel"].a
    np.testing.assert_array_equal(a1, a2)
    q, v = (two["params"]["attn"][n]["kernel"].a for n in ("query", "value"))
    assert not np.allclose(q, v)  # no key reused across layers


@pytest.mark.parametrize(
    ("init", "std"),
    [("normal", 0.02), ("gaussian", 1 / 8), ("kaiming_uniform", 1 / np.sqrt(3 * 256))],
)
def test_init_statistics(init, std):
    params = {"w": jnp.ones((256, 256))}
    config = lj.LoraConfig(rank=8, targets="w", init=init)
    _, lora = lj.split(params, config, key=jax.random.key(0))
    a = np.asarray(lora["w"].a)
    assert abs(a.std() - std) < 0.05 * std and abs(a.mean()) < 0.1 * std
    if init == "kaiming_uniform":
        assert np.abs(a).max() <= 1 / np.sqrt(256)


def test_pissa_residual_and_merge():
    w = jax.random.normal(jax.random.key(0), (3, 12, 10))
    layout = lj.Layout("dense", (1,), (2,), stack_axes=(0,))
    config = lj.LoraConfig(rank=3, alpha=6.0, targets="w", init="pissa")
    frozen, lora = lj.split({"w": w}, config, key=jax.random.key(1), layouts={"w": layout})
    np.testing.assert_allclose(lj.merge(frozen, lora)["w"], w, atol=1e-5)
    for i in range(3):  # the adapter holds the top-3 singular directions of each layer
        u, s, vh = np.linalg.svd(np.asarray(w[i]))
        top = (u[:, :3] * s[:3]) @ vh[:3]
        ab = 2.0 * np.asarray(lora["w"].a[i]) @ np.asarray(lora["w"].b[i])
        np.testing.assert_allclose(ab, top, atol=1e-4)
        np.testing.assert_allclose(
            np.linalg.svd(np.asarray(frozen["w"][i]))[1][:7], s[3:], atol=1e-4
        )


# ---- errors -----------------------------------------------------------------------------


def test_unmatched_pattern_lists_closest_paths():
    with pytest.raises(ValueError, match=r"'.\*/qeury/kernel' matches no parameter(.|\n)*query"):
        lj.split(PARAMS, lj.LoraConfig(targets=".*/qeury/kernel"), key=jax.random.key(0))
    with pytest.raises(ValueError, match=r"'.\*/nope' matches no parameter"):
        lj.split(
            PARAMS, lj.LoraConfig(targets=[".*/query/kernel", ".*/nope"]), key=jax.random.key(0)
        )
    with pytest.raises(ValueError, match="selected no parameter"):
        lj.split(PARAMS, lj.LoraConfig(targets=lambda p, x: False), key=jax.random.key(0))


def test_pattern_on_leaves_lora_cannot_adapt():
    with pytest.raises(ValueError, match=r"'params/attn/query/bias' of shape \(8,\).*'/kernel'"):
        lj.split(PARAMS, lj.LoraConfig(targets=".*/query/.*"), key=jax.random.key(0))
    with pytest.raises(ValueError, match=r"'params/step' of dtype int32"):
        lj.split(PARAMS, lj.LoraConfig(targets="params/step"), key=jax.random.key(0))
    with pytest.raises(TypeError, match=r"'n', which is a str"):
        lj.split({"n": "x"}, lj.LoraConfig(targets="n"), key=jax.random.key(0))


def test_rank_larger_than_kernel():
    with pytest.raises(ValueError, match=r"params/attn/query/kernel: rank 9 .* at most rank 8"):
        lj.split(PARAMS, lj.LoraConfig(rank=9, targets=".*/query/kernel"), key=jax.random.key(0))
    with pytest.raises(ValueError, match=r"params/mlp/fc/kernel: rank 20"):
        lj.split(
            PARAMS,
            lj.LoraConfig(targets=".*/fc/kernel", rank_pattern={"fc": 20}),
            key=jax.random.key(0),
        )


def test_kernel_with_more_axes_needs_layouts():
    params = {"params": {"q": {"kernel": jnp.ones((8, 2, 4))}}}
    with pytest.raises(ValueError, match=r"params/q/kernel has shape \(8, 2, 4\).*layouts="):
        lj.split(params, lj.LoraConfig(targets=".*/kernel"), key=jax.random.key(0))


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"rank": 0}, ValueError, r"`rank` must be >= 1; found 0"),
        ({"rank": 2.5}, TypeError, r"`rank` must be an int; found 2.5"),
        ({"alpha": 0.0}, ValueError, r"`alpha` must be a number > 0; found 0.0"),
        ({"alpha": -1}, ValueError, r"`alpha` must be a number > 0; found -1"),
        ({"dropout": 1.0}, ValueError, r"`dropout` must be in \[0, 1\); found 1.0"),
        ({"dropout": -0.1}, ValueError, r"`dropout` must be in \[0, 1\); found -0.1"),
        ({"init": "xavier"}, ValueError, r"`init` must be one of .*found 'xavier'"),
        ({"targets": "atention"}, ValueError, r"unknown preset 'atention'.*attention"),
        ({"targets": "all-linaer"}, ValueError, r"unknown preset 'all-linaer'"),
        (
            {"targets": "(unclosed"},
            ValueError,
            r"`targets` pattern '\(unclosed' is not a valid regex",
        ),
        ({"targets": [3]}, TypeError, r"`targets` entries must be regex strings; found 3"),
        ({"rank_pattern": {"q": 0}}, ValueError, r"`rank_pattern\['q'\]` must be an integer >= 1"),
        (
            {"alpha_pattern": {"q": -2.0}},
            ValueError,
            r"`alpha_pattern\['q'\]` must be a number > 0",
        ),
        ({"dtype": jnp.int32}, TypeError, r"`dtype` must be a floating dtype; found int32"),
    ],
)
def test_config_errors(kwargs, error, message):
    kwargs = {"targets": ".*/kernel", **kwargs}
    with pytest.raises(error, match=message):
        lj.LoraConfig(**kwargs)


def test_layout_errors():
    with pytest.raises(ValueError, match=r"Layout `kind` must be one of"):
        lj.Layout("lstm", (0,), (1,))
    with pytest.raises(ValueError, match=r"must split 0..ndim-1"):
        lj.Layout("dense", (0,), (0,))
    with pytest.raises(ValueError, match=r"params/k: layout .* does not fit shape \(4, 4\)"):
        lj.core.select_targets(
            {"params": {"k": jnp.ones((4, 4))}},
            lj.LoraConfig(targets="params/k"),
            layouts={"params/k": lj.Layout("dense", (0,), (1, 2))},
        )
