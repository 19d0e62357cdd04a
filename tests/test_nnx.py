"""Flax NNX: the same LoRA as linen, in place (`add_lora`) or pure (on ``nnx.split`` state).

References: the merged weights (``W + s·a@b`` in a plain model), and the linen twin of
the model with the same weights and adapters.
"""

from __future__ import annotations

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


def _close(xs, ys, tol=1e-5):
    for x, y in zip(jax.tree.leaves(xs), jax.tree.leaves(ys), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=tol, rtol=tol)


def _merged_reference(model_fn, config, lora, *args):
    """The plain model with ``W + s·a@b`` written into its kernels."""
    graphdef, state = nnx.split(model_fn())
    return nnx.merge(graphdef, lj.merge(state, lora, config))(*args)


def test_every_layer_kind_is_factored_exact_at_init_and_equal_to_merged():
    model = NnxLayers(rngs=nnx.Rngs(0))
    base = model(IDS)
    graphdef, state = nnx.split(model)
    lj.add_lora(model, CONFIG, key=jax.random.key(1))
    _equal(model(IDS), base)  # b = 0: bit for bit the base
    assert {type(m).__name__ for _, m in nnx.iter_graph(model) if isinstance(m, nnx.Module)} >= {
        "LoraEmbed",
        "LoraLinearGeneral",
        "LoraEinsum",
        "LoraConv",
        "LoraLinear",
    }
    _, lora = lj.lora_state(model)
    lora = perturb(lora, jax.random.key(2), scale=0.3)
    lj.remove_lora(model)
    lj.add_lora(model, CONFIG, lora=lora)
    want = _merged_reference(lambda: NnxLayers(rngs=nnx.Rngs(0)), CONFIG, lora, IDS)
    got = model(IDS)
    _close(got, want)
    assert min(float(jnp.abs(g - b).max()) for g, b in zip(got, base, strict=True)) > 1e-2
    # the pure form computes the same thing on the split state
    pure = lj.lora_apply(graphdef, CONFIG)(state, lora, IDS)
    _close(pure, got, tol=1e-6)
    routes = lj.routes(graphdef, CONFIG, state, lora)
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
    want = lj.lora_apply(linen.apply, config)(frozen, lora, ids)
    # pure form: `gate` is a raw nnx.Param, merged; everything else factored
    gate = np.array(model.gate.get_value())
    pure = lj.lora_apply(graphdef, config)(state, nnx_lora, ids)
    np.testing.assert_array_equal(np.asarray(model.gate.get_value()), gate)  # inputs unchanged
    np.testing.assert_allclose(np.asarray(pure), np.asarray(want), atol=1e-5)
    assert lj.routes(graphdef, config, state, nnx_lora)["gate"] == "merged"
    # in place: all but `gate` (add_lora adapts layers only)
    layer_config = lj.LoraConfig(rank=3, alpha=6.0, targets=[".*/kernel", ".*/embedding"])
    lin_frozen = lj.merge(frozen, {"params": {"gate": lora["params"]["gate"]}}, config)
    no_gate = {"params": {k: v for k, v in lora["params"].items() if k != "gate"}}
    want = lj.lora_apply(linen.apply, layer_config)(lin_frozen, no_gate, ids)
    model.gate.set_value(lj.merge(state, {"gate": nnx_lora["gate"]}, config)["gate"].get_value())
    nnx_no_gate = {k: v for k, v in nnx_lora.items() if k != "gate"}
    lj.add_lora(model, layer_config, lora=nnx_no_gate)
    np.testing.assert_allclose(np.asarray(model(ids)), np.asarray(want), atol=1e-5)


def test_at_init_both_forms_are_the_base_bit_for_bit(tiny):
    _, variables, ids, _ = tiny
    model = load_linen(NnxTiny(rngs=nnx.Rngs(0)), variables)
    base = model(ids)
    graphdef, state = nnx.split(model)
    config = lj.LoraConfig(rank=4, targets="all-linear")
    frozen, lora = lj.split(state, config, key=jax.random.key(0), layouts=lj.infer_layouts(model))
    _equal(lj.lora_apply(graphdef, config)(frozen, lora, ids), base)
    lj.add_lora(model, config, key=jax.random.key(0))
    _equal(model(ids), base)
    # the same key gives the same adapters in both forms (keys fold in the path)
    _equal(lj.lora_state(model)[1], lora)
    assert jax.tree.structure(lj.lora_state(model)[1]) == jax.tree.structure(lora)


def test_pure_form_differentiates_adapters_only():
    model = NnxMlp(rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    config = lj.LoraConfig(rank=2, targets=".*/kernel")
    frozen, lora = lj.split(state, config, key=jax.random.key(1))
    apply = lj.lora_apply(graphdef, config)
    x = jnp.ones((3, 8))
    grads = jax.grad(lambda lo: jnp.sum(apply(frozen, lo, x) ** 2))(lora)
    assert jax.tree.structure(grads) == jax.tree.structure(lora)
    assert float(jnp.abs(grads["fc2"]["kernel"].b).sum()) > 0  # b = 0 but its grad is not
    # the jaxpr has no weight-sized gradient: every output of the backward pass is an adapter
    jaxpr = jax.make_jaxpr(jax.grad(lambda lo: jnp.sum(apply(frozen, lo, x) ** 2)))(lora)
    assert {tuple(v.aval.shape) for v in jaxpr.jaxpr.outvars} == {(8, 2), (2, 16), (16, 2), (2, 4)}


def test_lora_params_are_selected_by_type():
    model = lj.add_lora(NnxMlp(rngs=nnx.Rngs(0)), MLP, key=jax.random.key(1))
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
    lj.add_lora(model, CONFIG, key=jax.random.key(1))
    _, lora = lj.lora_state(model)
    lora = perturb(lora, jax.random.key(3), scale=0.3)
    lj.remove_lora(model)
    assert nnx.graphdef(model) == graphdef
    _equal(nnx.state(model), before)
    lj.add_lora(model, CONFIG, lora=lora)
    adapted = model(IDS)
    lj.remove_lora(model, merge=True)
    assert type(model.q) is nnx.LinearGeneral and not hasattr(model.q, "lora_a")
    _close(model(IDS), adapted)
    # merge / unmerge on state: the pure functions take nnx.State (`state` shares the
    # model's Variables, so it now holds the merged kernels too: start from `before`)
    merged = lj.merge(before, lora, CONFIG)
    assert isinstance(merged, nnx.State) and isinstance(merged["q"]["kernel"], nnx.Param)
    _close(nnx.state(model), merged, tol=1e-6)
    _close(lj.unmerge(merged, lora, CONFIG), before, tol=1e-6)


def test_dropout_in_place_and_pure():
    config = lj.LoraConfig(rank=2, targets=".*/kernel", dropout=0.5)
    with pytest.raises(ValueError, match=r"needs `rngs=nnx.Rngs"):
        lj.add_lora(NnxMlp(rngs=nnx.Rngs(0)), config, key=jax.random.key(1))
    model = NnxMlp(rngs=nnx.Rngs(0))
    frozen, lora = lj.split(nnx.state(model), config, key=jax.random.key(1))
    lora = perturb(lora, jax.random.key(2), scale=0.5)
    lj.add_lora(model, config, lora=lora, rngs=nnx.Rngs(lora_dropout=7))
    x = jnp.ones((4, 8))
    first, second = model(x), model(x)  # the stream advances: new masks each call
    assert float(jnp.abs(first - second).max()) > 1e-3
    model.eval()
    no_dropout = lj.lora_apply(nnx.graphdef(NnxMlp(rngs=nnx.Rngs(0))), config)(frozen, lora, x)
    _equal(model(x), no_dropout)
    model.train()
    assert float(jnp.abs(model(x) - no_dropout).max()) > 1e-3
    graphdef = nnx.graphdef(NnxMlp(rngs=nnx.Rngs(0)))
    apply = lj.lora_apply(graphdef, config)
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
    lj.add_lora(
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
    lj.add_lora(model, config, key=jax.random.key(1))
    assert model.layers.lora_a.shape == (3, 6, 2) and model.layers.lora_b.shape == (3, 2, 6)
    _, lora = lj.lora_state(model)
    lora = perturb(lora, jax.random.key(2), scale=0.3)
    lj.remove_lora(model)
    lj.add_lora(model, config, lora=lora)
    x = jnp.ones((2, 6))
    _close(model(x), _merged_reference(Stack, config, lora, x))


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
            lj.add_lora(NnxMlp(rngs=nnx.Rngs(0)), config, key=jax.random.key(0))
        with pytest.raises(ValueError) as pure:
            lj.split(state, config, key=jax.random.key(0))
        assert str(in_place.value) == str(pure.value)
        assert str(from_linen.value).replace("params/", "") == str(pure.value)
    _, lora = lj.split(state, lj.LoraConfig(rank=2, targets=".*/kernel"), key=jax.random.key(0))
    wrong = {"fc1": lora["fc2"], "fc2": lora["fc2"]}
    with pytest.raises(ValueError, match=r"fc1/kernel"):
        lj.add_lora(NnxMlp(rngs=nnx.Rngs(0)), MLP, lora=wrong)
    with pytest.raises(ValueError, match=r"fc1/kernel"):
        lj.lora_apply(nnx.graphdef(model), MLP)(state, wrong, jnp.ones((1, 8)))


def test_in_place_refusals():
    model = lj.add_lora(NnxMlp(rngs=nnx.Rngs(0)), MLP, key=jax.random.key(1))
    with pytest.raises(ValueError, match=r"already carries adapters at \['fc1/kernel'"):
        lj.add_lora(model, MLP, key=jax.random.key(1))
    with pytest.raises(TypeError, match=r"needs `key=`"):
        lj.add_lora(NnxMlp(rngs=nnx.Rngs(0)), MLP)
    with pytest.raises(TypeError, match=r"takes an nnx.Module; found dict"):
        lj.add_lora({"w": jnp.ones((2, 2))}, CONFIG, key=jax.random.key(0))
    tiny = NnxTiny(rngs=nnx.Rngs(0))
    config = lj.LoraConfig(rank=2, targets="gate")
    with pytest.raises(ValueError, match=r"gate belongs to NnxTiny: add_lora adapts"):
        lj.add_lora(tiny, config, key=jax.random.key(0))
    assert not hasattr(tiny.embed, "lora_a")  # nothing was changed
    graphdef, state = nnx.split(model)
    with pytest.raises(ValueError, match=r"graphdef already carries adapters"):
        lj.lora_apply(graphdef, MLP)(state, lj.lora_state(model)[1], jnp.ones((1, 8)))
    with pytest.raises(TypeError, match=r"NNX graphdefs are not supported yet"):
        lj.lora_apply_mixed(graphdef, MLP)


def test_bf16_layers_train_float32_adapters():
    model = nnx.Linear(8, 4, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    x = jnp.ones((2, 8), jnp.bfloat16)
    base = model(x)
    lj.add_lora(model, lj.LoraConfig(rank=2, targets="kernel"), key=jax.random.key(1))
    assert model.lora_a.get_value().dtype == jnp.float32
    y = model(x)
    assert y.dtype == jnp.bfloat16 and bool((y == base).all())
    loss = lambda m: jnp.sum(m(x).astype(jnp.float32) ** 2)
    grads = nnx.grad(loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
    assert {v.get_value().dtype for _, v in nnx.to_flat_state(grads)} == {jnp.dtype("float32")}
