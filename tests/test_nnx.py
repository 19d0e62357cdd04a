"""Flax NNX: the same LoRA as linen, in place (`add_lora`) or pure (on ``nnx.split`` state).

References: the merged weights (``W + s·a@b`` in a plain model), and the linen twin of
the model with the same weights and adapters.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import perturb
from nnx_models import NnxLayers, NnxMlp, NnxTiny, load_linen, lora_from_linen

import lora_jax as lj

CONFIG = lj.LoraConfig(rank=2, alpha=4.0, targets=[".*/kernel", "emb/embedding"])
MLP = lj.LoraConfig(rank=2, targets=".*/kernel")
IDS = jnp.arange(12).reshape(2, 6) % 11


def _equal(xs, ys):
    for x, y in zip(jax.tree.leaves(xs), jax.tree.leaves(ys), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _is_w(x):
    return isinstance(x, lj.LoraWeights)


def _close(xs, ys, tol=1e-5):
    for x, y in zip(jax.tree.leaves(xs), jax.tree.leaves(ys), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=tol, rtol=tol)


def _merged_reference(model_fn, lora, *args):
    """The plain model with ``W + s·a@b`` written into its kernels (s from each adapter)."""
    graphdef, state = nnx.split(model_fn())
    return nnx.merge(graphdef, lj.merge(state, lora))(*args)


def test_every_layer_kind_is_factored_exact_at_init_and_equal_to_merged():
    model = NnxLayers(rngs=nnx.Rngs(0))
    base = model(IDS)
    graphdef, state = nnx.split(model)
    lj.nnx.add_lora(model, CONFIG, key=jax.random.key(1))
    _equal(model(IDS), base)  # b = 0: bit for bit the base
    assert {type(m).__name__ for _, m in nnx.iter_graph(model) if isinstance(m, nnx.Module)} >= {
        "LoraEmbed",
        "LoraLinearGeneral",
        "LoraEinsum",
        "LoraConv",
        "LoraLinear",
    }
    _, lora = lj.nnx.lora_state(model)
    lora = perturb(lora, jax.random.key(2), scale=0.3)
    lj.nnx.remove_lora(model)
    lj.nnx.add_lora(model, lora=lora)
    want = _merged_reference(lambda: NnxLayers(rngs=nnx.Rngs(0)), lora, IDS)
    got = model(IDS)
    _close(got, want)
    assert min(float(jnp.abs(g - b).max()) for g, b in zip(got, base, strict=True)) > 1e-2
    # the pure form computes the same thing on the split state
    pure = lj.lora_apply(graphdef)(state, lora, IDS)
    _close(pure, got, tol=1e-6)
    _close(lj.nnx.lora_apply(graphdef)(state, lora, IDS), got, tol=1e-6)
    routes = lj.routes(graphdef, state, lora)
    assert routes == lj.nnx.routes(graphdef, state, lora)
    assert set(routes.values()) >= {"factored (Conv)", "factored (Einsum)", "factored (Embed)"}
    assert all(r.startswith("factored") for r in routes.values())
    table = str(lj.summary(model))
    assert "factored (LinearGeneral)" in table and lj.summary(model).trainable == sum(
        x.size for x in jax.tree.leaves(lora)
    )


def test_nnx_model_equals_linen_model_with_same_weights_and_adapters(tiny, tiny_lora):
    linen, variables, ids, _ = tiny
    config, frozen, lora = tiny_lora  # targets every kernel, the embedding and `gate`
    model = load_linen(NnxTiny(rngs=nnx.Rngs(0)), variables)
    graphdef, state = nnx.split(model)
    layouts = lj.infer_layouts(model)
    nnx_lora = lora_from_linen(lora, layouts)
    want = lj.lora_apply(linen.apply)(frozen, lora, ids)
    # pure form: `gate` is a raw nnx.Param, factored by the contraction rewrite
    gate = np.array(model.gate.get_value())
    pure = lj.lora_apply(graphdef)(state, nnx_lora, ids)
    np.testing.assert_array_equal(np.asarray(model.gate.get_value()), gate)  # inputs unchanged
    np.testing.assert_allclose(np.asarray(pure), np.asarray(want), atol=1e-5)
    assert lj.routes(graphdef, state, nnx_lora, ids)["gate"] == "factored (dot_general)"
    # in place: all but `gate` (add_lora adapts layers only); the adapters bring the
    # linen config's scale (alpha/r = 2)
    lin_frozen = lj.merge(frozen, {"params": {"gate": lora["params"]["gate"]}})
    no_gate = {"params": {k: v for k, v in lora["params"].items() if k != "gate"}}
    want = lj.lora_apply(linen.apply)(lin_frozen, no_gate, ids)
    model.gate.set_value(lj.merge(state, {"gate": nnx_lora["gate"]})["gate"].get_value())
    nnx_no_gate = {k: v for k, v in nnx_lora.items() if k != "gate"}
    lj.nnx.add_lora(model, lora=nnx_no_gate)
    assert {w.scale for w in jax.tree.leaves(lj.nnx.lora_state(model)[1], is_leaf=_is_w)} == {
        config.alpha / config.rank
    }
    np.testing.assert_allclose(np.asarray(model(ids)), np.asarray(want), atol=1e-5)


def test_at_init_both_forms_are_the_base_bit_for_bit(tiny):
    _, variables, ids, _ = tiny
    model = load_linen(NnxTiny(rngs=nnx.Rngs(0)), variables)
    base = model(ids)
    graphdef, state = nnx.split(model)
    config = lj.LoraConfig(rank=4, targets="all-linear")
    frozen, lora = lj.split(state, config, key=jax.random.key(0), layouts=lj.infer_layouts(model))
    _equal(lj.lora_apply(graphdef)(frozen, lora, ids), base)
    lj.nnx.add_lora(model, config, key=jax.random.key(0))
    _equal(model(ids), base)
    # the same key gives the same adapters in both forms (keys fold in the path), with the
    # same static metadata (scale, dropout: part of the tree structure)
    _equal(lj.nnx.lora_state(model)[1], lora)
    assert jax.tree.structure(lj.nnx.lora_state(model)[1]) == jax.tree.structure(lora)


def test_pure_form_differentiates_adapters_only():
    model = NnxMlp(rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    config = lj.LoraConfig(rank=2, targets=".*/kernel")
    frozen, lora = lj.split(state, config, key=jax.random.key(1))
    apply = lj.lora_apply(graphdef)
    x = jnp.ones((3, 8))
    grads = jax.grad(lambda lo: jnp.sum(apply(frozen, lo, x) ** 2))(lora)
    assert jax.tree.structure(grads) == jax.tree.structure(lora)
    assert float(jnp.abs(grads["fc2"]["kernel"].b).sum()) > 0  # b = 0 but its grad is not
    # the jaxpr has no weight-sized gradient: every output of the backward pass is an adapter
    jaxpr = jax.make_jaxpr(jax.grad(lambda lo: jnp.sum(apply(frozen, lo, x) ** 2)))(lora)
    assert {tuple(v.aval.shape) for v in jaxpr.jaxpr.outvars} == {(8, 2), (2, 16), (16, 2), (2, 4)}


def test_lora_params_are_selected_by_type():
    model = lj.nnx.add_lora(NnxMlp(rngs=nnx.Rngs(0)), MLP, key=jax.random.key(1))
    graphdef, lora_state, rest = nnx.split(model, nnx.LoRAParam, ...)
    names = {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(lora_state)}
    assert names == {"fc1/lora_a", "fc1/lora_b", "fc2/lora_a", "fc2/lora_b"}
    assert all(isinstance(v, nnx.LoRAParam) for _, v in nnx.to_flat_state(lora_state))
    assert not any(isinstance(v, nnx.LoRAParam) for _, v in nnx.to_flat_state(rest))
    x = jnp.ones((2, 8))
    _equal(nnx.merge(graphdef, lora_state, rest)(x), model(x))


def test_remove_lora_restores_the_model_and_merge_folds_adapters():
    model = NnxLayers(rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    before = jax.tree.map(np.array, state)
    lj.nnx.add_lora(model, CONFIG, key=jax.random.key(1))
    _, lora = lj.nnx.lora_state(model)
    lora = perturb(lora, jax.random.key(3), scale=0.3)
    lj.nnx.remove_lora(model)
    assert nnx.graphdef(model) == graphdef
    _equal(nnx.state(model), before)
    lj.nnx.add_lora(model, lora=lora)
    adapted = model(IDS)
    lj.nnx.remove_lora(model, merge=True)
    assert type(model.q) is nnx.LinearGeneral and not hasattr(model.q, "lora_a")
    _close(model(IDS), adapted)
    # merge / unmerge on state: the pure functions take nnx.State (`state` shares the
    # model's Variables, so it now holds the merged kernels too: start from `before`)
    merged = lj.merge(before, lora)
    assert isinstance(merged, nnx.State) and isinstance(merged["q"]["kernel"], nnx.Param)
    _close(nnx.state(model), merged, tol=1e-6)
    _close(lj.unmerge(merged, lora), before, tol=1e-6)


def test_dropout_in_place_and_pure():
    config = lj.LoraConfig(rank=2, targets=".*/kernel", dropout=0.5)
    with pytest.raises(ValueError, match=r"needs `rngs=nnx.Rngs"):
        lj.nnx.add_lora(NnxMlp(rngs=nnx.Rngs(0)), config, key=jax.random.key(1))
    model = NnxMlp(rngs=nnx.Rngs(0))
    frozen, lora = lj.split(nnx.state(model), config, key=jax.random.key(1))
    lora = perturb(lora, jax.random.key(2), scale=0.5)
    with pytest.raises(ValueError, match=r"fc1/kernel: the adapter has dropout=0.5, which needs"):
        lj.nnx.add_lora(NnxMlp(rngs=nnx.Rngs(0)), lora=lora)  # the rate comes with `lora`
    lj.nnx.add_lora(model, lora=lora, rngs=nnx.Rngs(lora_dropout=7))
    x = jnp.ones((4, 8))
    first, second = model(x), model(x)  # the stream advances: new masks each call
    assert float(jnp.abs(first - second).max()) > 1e-3
    model.eval()
    graphdef = nnx.graphdef(NnxMlp(rngs=nnx.Rngs(0)))
    no_dropout = lj.lora_apply(graphdef, deterministic=True)(frozen, lora, x)
    _equal(model(x), no_dropout)
    model.train()
    assert float(jnp.abs(model(x) - no_dropout).max()) > 1e-3
    apply = lj.lora_apply(graphdef)
    key = {lj.DROPOUT_RNG: jax.random.key(5)}
    _equal(apply(frozen, lora, x, rngs=key), apply(frozen, lora, x, rngs=key))
    assert float(jnp.abs(apply(frozen, lora, x, rngs=key) - no_dropout).max()) > 1e-3
    with pytest.raises(ValueError, match=r"`rngs` takes only \{'lora_dropout': key\}"):
        apply(frozen, lora, x, rngs={"dropout": jax.random.key(0)})


def test_pissa_init_in_place_changes_the_base_not_the_output():
    model = NnxMlp(rngs=nnx.Rngs(0))
    x = jnp.ones((2, 8))
    base = model(x)
    kernel = np.array(model.fc1.kernel.get_value())
    lj.nnx.add_lora(
        model, lj.LoraConfig(rank=2, targets=".*/kernel", init="pissa"), key=jax.random.key(1)
    )
    assert not np.array_equal(np.asarray(model.fc1.kernel.get_value()), kernel)
    _close(model(x), base)


def test_scanned_stack_of_layers(tiny):
    """Layers made by nnx.vmap and run by nnx.scan: the adapters carry the layer axis."""

    @nnx.vmap(in_axes=0, out_axes=0)
    def make(key):
        return nnx.Linear(6, 6, rngs=nnx.Rngs(key))

    class Stack(nnx.Module):
        def __init__(self):
            self.layers = make(jax.random.split(jax.random.key(0), 3))

        def __call__(self, x):
            @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
            def body(x, layer):
                return jnp.tanh(layer(x))

            return body(x, self.layers)

    model = Stack()
    layouts = lj.infer_layouts(model)
    assert layouts["layers/kernel"].stack_axes == (0,)
    config = lj.LoraConfig(rank=2, targets=".*/kernel")
    lj.nnx.add_lora(model, config, key=jax.random.key(1))
    assert model.layers.lora_a.shape == (3, 6, 2) and model.layers.lora_b.shape == (3, 2, 6)
    _, lora = lj.nnx.lora_state(model)
    lora = perturb(lora, jax.random.key(2), scale=0.3)
    lj.nnx.remove_lora(model)
    lj.nnx.add_lora(model, lora=lora)
    x = jnp.ones((2, 6))
    _close(model(x), _merged_reference(Stack, lora, x))


# ---------------------------------------------------------------------------- bad input


def test_errors_are_the_linen_errors(mlp):
    _, variables, _ = mlp
    model = NnxMlp(rngs=nnx.Rngs(0))
    state = nnx.state(model, nnx.Param)
    for config in (
        lj.LoraConfig(rank=2, targets=".*/kernal"),
        lj.LoraConfig(rank=9, targets=".*fc2/kernel"),
    ):
        with pytest.raises(ValueError) as from_linen:
            lj.split(variables, config, key=jax.random.key(0))
        with pytest.raises(ValueError) as in_place:
            lj.nnx.add_lora(NnxMlp(rngs=nnx.Rngs(0)), config, key=jax.random.key(0))
        with pytest.raises(ValueError) as pure:
            lj.split(state, config, key=jax.random.key(0))
        assert str(in_place.value) == str(pure.value)
        assert str(from_linen.value).replace("params/", "") == str(pure.value)
    _, lora = lj.split(state, lj.LoraConfig(rank=2, targets=".*/kernel"), key=jax.random.key(0))
    wrong = {"fc1": lora["fc2"], "fc2": lora["fc2"]}
    with pytest.raises(ValueError, match=r"fc1/kernel"):
        lj.nnx.add_lora(NnxMlp(rngs=nnx.Rngs(0)), lora=wrong)
    with pytest.raises(ValueError, match=r"fc1/kernel"):
        lj.lora_apply(nnx.graphdef(model))(state, wrong, jnp.ones((1, 8)))


def test_in_place_refusals():
    model = lj.nnx.add_lora(NnxMlp(rngs=nnx.Rngs(0)), MLP, key=jax.random.key(1))
    with pytest.raises(ValueError, match=r"already carries adapters at \['fc1/kernel'"):
        lj.nnx.add_lora(model, MLP, key=jax.random.key(1))
    with pytest.raises(TypeError, match=r"needs `key=`"):
        lj.nnx.add_lora(NnxMlp(rngs=nnx.Rngs(0)), MLP)
    with pytest.raises(TypeError, match=r"takes an nnx.Module; found dict"):
        lj.nnx.add_lora({"w": jnp.ones((2, 2))}, CONFIG, key=jax.random.key(0))
    tiny = NnxTiny(rngs=nnx.Rngs(0))
    config = lj.LoraConfig(rank=2, targets="gate")
    with pytest.raises(ValueError, match=r"gate belongs to NnxTiny: add_lora adapts"):
        lj.nnx.add_lora(tiny, config, key=jax.random.key(0))
    assert not hasattr(tiny.embed, "lora_a")  # nothing was changed
    graphdef, state = nnx.split(model)
    with pytest.raises(ValueError, match=r"graphdef already carries adapters"):
        lj.lora_apply(graphdef)(state, lj.nnx.lora_state(model)[1], jnp.ones((1, 8)))


class _MixedNnx(nnx.Module):
    """A stock Linear and Embed and a raw nnx.Param: all served by the rewrite per example."""

    def __init__(self, rngs):
        self.emb = nnx.Embed(7, 4, rngs=rngs)
        self.fc = nnx.Linear(4, 5, rngs=rngs)
        self.w = nnx.Param(jax.random.normal(rngs.params(), (5, 3)))

    def __call__(self, ids):
        return jnp.tanh(self.fc(self.emb(ids))) @ self.w


def test_mixed_batch_on_a_graphdef_equals_each_example_alone():
    model = _MixedNnx(nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    ids = jnp.array([[1, 2, 3], [4, 5, 6], [0, 1, 2]])
    config = lj.LoraConfig(rank=2, targets=["fc/kernel", "w", "emb/embedding"])
    layouts = lj.infer_layouts(model)
    splits = [lj.split(state, config, key=jax.random.key(i), layouts=layouts) for i in range(2)]
    frozen = splits[0][0]
    loras = [perturb(lo, jax.random.key(10 + i)) for i, (_, lo) in enumerate(splits)]
    stacked = lj.multi.stack_adapters(loras)
    mixed = lj.multi.lora_apply_mixed(graphdef)(frozen, stacked, jnp.array([1, -1, 0]), ids)
    apply = lj.lora_apply(graphdef)
    alone = [apply(frozen, loras[1], ids[:1]), model(ids[1:2]), apply(frozen, loras[0], ids[2:])]
    np.testing.assert_allclose(mixed, jnp.concatenate(alone), atol=1e-5)
    grads = jax.grad(
        lambda s: lj.multi.lora_apply_mixed(graphdef)(frozen, s, jnp.array([1, -1, 0]), ids).sum()
    )(stacked)
    # example 1 runs the base: adapter rows get gradient only from their own examples.
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))


def test_bf16_layers_train_float32_adapters():
    model = nnx.Linear(8, 4, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    x = jnp.ones((2, 8), jnp.bfloat16)
    base = model(x)
    lj.nnx.add_lora(model, lj.LoraConfig(rank=2, targets="kernel"), key=jax.random.key(1))
    assert model.lora_a.get_value().dtype == jnp.float32
    y = model(x)
    assert y.dtype == jnp.bfloat16 and bool((y == base).all())
    loss = lambda m: jnp.sum(m(x).astype(jnp.float32) ** 2)
    grads = nnx.grad(loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
    assert {v.get_value().dtype for _, v in nnx.to_flat_state(grads)} == {jnp.dtype("float32")}


# ------------------------------------------------ adapters carry their scale and dropout


def test_lora_state_adapters_carry_the_config_scale_and_dropout():
    config = lj.LoraConfig(
        rank=2,
        alpha=6.0,
        targets=".*/kernel",
        dropout=0.25,
        rank_pattern={"fc2/kernel": 4},
        alpha_pattern={"fc2/kernel": 2.0},
    )
    model = lj.nnx.add_lora(
        NnxMlp(rngs=nnx.Rngs(0)), config, key=jax.random.key(1), rngs=nnx.Rngs(0)
    )
    _, lora = lj.nnx.lora_state(model)
    fc1, fc2 = lora["fc1"]["kernel"], lora["fc2"]["kernel"]
    assert (fc1.rank, fc1.scale, fc1.dropout) == (2, 6.0 / 2, 0.25)  # alpha / r
    assert (fc2.rank, fc2.scale, fc2.dropout) == (4, 2.0 / 4, 0.25)
    rows = {row[0]: row for row in lj.summary(model).rows}
    assert rows["fc1/kernel"][5:] == (3.0, "factored (Linear)")
    assert rows["fc2/kernel"][5:] == (0.5, "factored (Linear)")
    rs = lj.LoraConfig(rank=4, alpha=8.0, targets=".*/kernel", use_rslora=True)
    _, lora_rs = lj.nnx.lora_state(
        lj.nnx.add_lora(NnxMlp(rngs=nnx.Rngs(0)), rs, key=jax.random.key(1))
    )
    assert lora_rs["fc1"]["kernel"].scale == 8.0 / 2.0  # alpha / sqrt(r)
    # the layers run with those scales: in place (eval: no dropout), and merged by
    # remove_lora, both equal the merged-weights reference
    lora = perturb(lora, jax.random.key(2), scale=0.3)
    lj.nnx.remove_lora(model)
    lj.nnx.add_lora(model, lora=lora, rngs=nnx.Rngs(0))
    assert lj.nnx.lora_state(model)[1]["fc2"]["kernel"].scale == 0.5
    x = jnp.ones((3, 8))
    want = _merged_reference(lambda: NnxMlp(rngs=nnx.Rngs(0)), lora, x)
    model.eval()
    _close(model(x), want)
    _close(lj.nnx.remove_lora(model, merge=True)(x), want)


def test_add_lora_takes_a_config_or_adapters():
    state = nnx.state(NnxMlp(rngs=nnx.Rngs(0)), nnx.Param)
    _, lora = lj.split(state, MLP, key=jax.random.key(0))
    with pytest.raises(TypeError, match=r"add_lora: `config` must be a lj.LoraConfig; found str"):
        lj.nnx.add_lora(NnxMlp(rngs=nnx.Rngs(0)), "attention", key=jax.random.key(0))
    with pytest.raises(TypeError, match=r"needs `config` \(with `key=`\) .* or `lora=`"):
        lj.nnx.add_lora(NnxMlp(rngs=nnx.Rngs(0)))
    with pytest.raises(TypeError, match=r"not both; `config` was given with `lora`"):
        lj.nnx.add_lora(NnxMlp(rngs=nnx.Rngs(0)), MLP, lora=lora)
    with pytest.raises(TypeError, match=r"not both; `key` was given with `lora`"):
        lj.nnx.add_lora(NnxMlp(rngs=nnx.Rngs(0)), lora=lora, key=jax.random.key(0))
    with pytest.raises(TypeError, match=r"add_lora: `key` must be a PRNG key"):
        lj.nnx.add_lora(NnxMlp(rngs=nnx.Rngs(0)), MLP, key=0)
    stacked = lj.multi.stack_adapters([lora, lora])
    with pytest.raises(TypeError, match=r"'fc1/kernel' stacks 2 adapters"):
        lj.nnx.add_lora(NnxMlp(rngs=nnx.Rngs(0)), lora=stacked)


def test_pure_apply_warns_when_adapters_have_dropout_and_no_rng():
    graphdef, state = nnx.split(NnxMlp(rngs=nnx.Rngs(0)))
    config = lj.LoraConfig(rank=2, targets=".*/kernel", dropout=0.5)
    frozen, lora = lj.split(state, config, key=jax.random.key(1))
    lora = perturb(lora, jax.random.key(2), scale=0.5)
    x = jnp.ones((4, 8))
    key = {lj.DROPOUT_RNG: jax.random.key(5)}
    want = (
        r"2 adapter\(s\) have LoRA dropout \(e.g. 'fc1/kernel', rate 0.5\) but the call has "
        r"no 'lora_dropout' rng, so no dropout runs. Pass rngs=\{'lora_dropout': key\}.*"
        r"deterministic=True"
    )
    with pytest.warns(UserWarning, match=want):
        y = lj.lora_apply(graphdef)(frozen, lora, x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        evaluate = lj.lora_apply(graphdef, deterministic=True)
        _equal(evaluate(frozen, lora, x), y)
        _equal(evaluate(frozen, lora, x, rngs=key), y)  # deterministic: the rng is not used
        assert float(jnp.abs(lj.lora_apply(graphdef)(frozen, lora, x, rngs=key) - y).max()) > 1e-3
        _, no_dropout = lj.split(state, MLP, key=jax.random.key(1))
        lj.lora_apply(graphdef)(frozen, no_dropout, x)  # no dropout to warn about


# -------------------------------------------------------------------- conv, every form


def _conv_check(make, x):
    """In place and pure, an adapted conv equals the conv with merged weights."""
    base = make()
    graphdef, state = nnx.split(base)
    config = lj.LoraConfig(rank=2, alpha=4.0, targets="kernel")
    frozen, lora = lj.split(
        state, config, key=jax.random.key(1), layouts=lj.nnx.infer_layouts(base)
    )
    lora = perturb(lora, jax.random.key(2), scale=0.3)
    want = _merged_reference(make, lora, x)
    assert float(jnp.abs(want - base(x)).max()) > 1e-2
    assert lj.nnx.routes(graphdef, frozen, lora) == {"kernel": "factored (Conv)"}
    _close(lj.nnx.lora_apply(graphdef)(frozen, lora, x), want)
    _close(lj.nnx.add_lora(make(), lora=lora)(x), want)


@pytest.mark.parametrize("padding", ["SAME", "VALID", "CIRCULAR", ((1, 2), (0, 1))])
@pytest.mark.parametrize(("strides", "kernel_dilation"), [(1, 1), (2, 1), (1, 2)])
def test_conv_2d_equals_merged_weights(padding, strides, kernel_dilation):
    def make():
        return nnx.Conv(
            3,
            4,
            kernel_size=(3, 3),
            strides=strides,
            padding=padding,
            kernel_dilation=kernel_dilation,
            rngs=nnx.Rngs(0),
        )

    _conv_check(make, jax.random.normal(jax.random.key(0), (2, 9, 9, 3)))


@pytest.mark.parametrize(
    ("kwargs", "shape"),
    [
        ({"padding": "CAUSAL"}, (2, 7, 3)),
        ({"padding": "REFLECT", "kernel_dilation": 2}, (2, 7, 3)),
        ({"input_dilation": 2, "strides": 2, "padding": [(1, 1)]}, (2, 7, 3)),
        ({"padding": 2}, (7, 3)),  # no batch axis
        ({"padding": [(2, 0)]}, (2, 2, 7, 3)),  # two batch axes
    ],
)
def test_conv_1d_padding_forms_and_batch_axes(kwargs, shape):
    def make():
        return nnx.Conv(3, 4, kernel_size=(3,), rngs=nnx.Rngs(0), **kwargs)

    _conv_check(make, jax.random.normal(jax.random.key(0), shape))
