"""The benchmark runs end to end (behaviour only: speed is what it reports, not what we test)."""

from __future__ import annotations

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lj
from train import benchmark
from train.bench import child, processes
from train.bench.models import GPT, PRESETS, CustomGPT
from train.bench.moe import EXPERT_LAYOUT, EXPERT_LORA, EXPERTS, FACTORED, MoEGPT, MoeMlp
from train.bench.steps import CUSTOM_ALL_LINEAR, CUSTOM_ROUTE, require_routes


@pytest.mark.slow
def test_benchmark_smoke_prints_every_row():
    table = benchmark.main(["--preset", "tiny", "--rounds", "1"])
    for row in (
        "LoRA q/v step / full fine-tune step",
        "LoRA all-linear step / full fine-tune step",
        "lora_jax on NNX (add_lora), all-linear / full",
        "peer: nnx.LoRALinear q/v / full",
        "factored / merged LoRA step",
        "custom-style: LoRA all-linear step / full fine-tune step",
        "custom-style all-linear ratio minus stock all-linear ratio",
        "custom-style: LoRA attention (q/v) / full",
        "MoE (8 experts, top-2): expert LoRA (experts + attention) step / full fine-tune step",
        "peak memory (process), LoRA q/v run / full fine-tune run",
        "optimizer state, LoRA q/v / full fine-tune",
        "forward, adapter merged / base forward",
        "forward, mixed batch of 4 adapters / one adapter",
        "adapter save",
        "adapter restore",
        "adapter size on disk / raw A/B bytes",
        "training-state step",
        "steps/s on 4 simulated CPU devices / 1 device",
        "base bytes, int8 / float32, whole base",
        "base bytes, int8 / float32, quantized kernels only",
        "base bytes, int4 g64 / float32, whole base",
        "base bytes, nf4 g64 / float32, whole base",
        "base bytes, nf4 g64 / float32, quantized kernels only",
        "QLoRA nf4 all-linear step / float LoRA all-linear step",
        "peak memory (process), QLoRA nf4 all-linear run / float LoRA all-linear run",
        "eval loss after the demo's fine-tune (tiny stand-in), nf4 base / float base",
        "8 adapters mixed in a batch of 8 (lj.multi.make_train_step) / one adapter",
        "DoRA all-linear step / LoRA all-linear step",
    ):
        assert re.search(rf"^\| {re.escape(row)}.*\| [+-]?[0-9.]+ \(?", table, re.M), row
    assert "| full fine-tune | " in table and "| 1.00 (1.00-1.00) |" in table
    assert "| custom-style full fine-tune | " in table and "| MoE full fine-tune | " in table
    assert "<= 0.65" in table and "<= 0.7" in table and "<= 1.02" in table
    assert "<= 0.72" in table and "<= +0.03" in table
    assert "<= 0.27" in table and "<= 0.16" in table and "<= 1.5" in table
    assert "<= 1.03" in table and "| QLoRA nf4 all-linear | " in table


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_custom_style_model_is_the_stock_model_in_size(preset):
    cfg = PRESETS[preset]
    ids = jax.ShapeDtypeStruct((cfg.batch, cfg.seq), jnp.int32)
    count = lambda model: sum(
        x.size for x in jax.tree.leaves(jax.eval_shape(model.init, jax.random.key(0), ids))
    )
    assert count(CustomGPT(cfg)) == pytest.approx(count(GPT(cfg)), rel=0.02)  # biases only


def test_custom_style_adapters_route_factored_through_dot_general():
    """What the custom-style rows time is the factored path: the 3-D head kernels get
    their layouts from the einsums, and every all-linear adapter meets a dot_general."""
    cfg = PRESETS["tiny"]
    model, ids = CustomGPT(cfg), jnp.zeros((cfg.batch, cfg.seq), jnp.int32)
    variables = model.init(jax.random.key(0), ids)
    layouts = lj.infer_layouts(model.apply, variables, ids)
    attn = "params/block_0/attn"
    assert (layouts[f"{attn}/query"].in_axes, layouts[f"{attn}/query"].out_axes) == ((0,), (1, 2))
    assert (layouts[f"{attn}/out"].in_axes, layouts[f"{attn}/out"].out_axes) == ((0, 1), (2,))
    config = lj.LoraConfig(rank=8, targets=CUSTOM_ALL_LINEAR)
    frozen, lora = lj.split(variables, config, key=jax.random.key(1), layouts=layouts)
    routes = lj.routes(model.apply, frozen, lora, ids)
    assert len(routes) == 6 * cfg.layers
    assert set(routes.values()) == {CUSTOM_ROUTE}
    require_routes(model, frozen, lora, ids, CUSTOM_ROUTE)  # the benchmark's own guard passes
    with pytest.raises(RuntimeError, match=r"CustomGPT: adapters not routed 'factored \(Dense\)'"):
        require_routes(model, frozen, lora, ids, "factored (Dense)")


def _dense_moe(x, router, w_in, w_out):
    """Every token through its top-2 experts, each expert computed densely for every token
    and weighted by a one-hot-style gate matrix (NumPy, float64); also the gates."""
    tokens, w_in, w_out = (np.asarray(a, np.float64) for a in (x, w_in, w_out))
    tokens = tokens.reshape(-1, w_in.shape[1])
    logits = tokens @ np.asarray(router, np.float64)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    top = np.argsort(-probs, axis=-1)[:, :2]
    gates = np.zeros_like(probs)
    np.put_along_axis(gates, top, np.take_along_axis(probs, top, -1), -1)
    gates /= gates.sum(-1, keepdims=True)
    h = np.einsum("td,edf->tef", tokens, w_in)
    h = 0.5 * h * (1 + np.tanh(np.sqrt(2 / np.pi) * (h + 0.044715 * h**3)))  # tanh gelu
    y = np.einsum("tef,efd,te->td", h, w_out, gates)
    return y.reshape(np.shape(x)), gates


def _sharp_router(variables):
    """`variables` with every router scaled up so that gates are far from 1/2 each."""
    return jax.tree_util.tree_map_with_path(
        lambda p, x: 50 * x if "router" in jax.tree_util.keystr(p) else x, variables
    )


def test_moe_layer_is_the_dense_top2_mixture():
    cfg = PRESETS["tiny"]
    x = jax.random.normal(jax.random.key(0), (cfg.batch, cfg.seq, cfg.d_model))
    params = _sharp_router(MoeMlp(cfg).init(jax.random.key(1), x))["params"]
    params = {**params, "w_out": 5 * params["w_out"]}  # outputs as large as the inputs
    want, gates = _dense_moe(x, params["router"], params["w_in"], params["w_out"])
    assert (gates > 0).any(0).all()  # every expert gets tokens: all groups are non-empty
    assert np.abs(gates[gates > 0] - 0.5).max() > 0.3  # the two gates differ
    got = MoeMlp(cfg).apply({"params": params}, x)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())


def test_moe_model_equals_the_model_with_dense_reference_mixtures():
    """The whole `MoEGPT`, with each block's MoE swapped for the NumPy reference: same
    logits (so the model wires the layer in as the reference says)."""
    cfg = PRESETS["tiny"]
    model = MoEGPT(cfg)
    ids = jax.random.randint(jax.random.key(3), (cfg.batch, cfg.seq), 0, cfg.vocab)
    variables = _sharp_router(model.init(jax.random.key(0), ids))
    swapped = []

    def dense(next_fun, args, kwargs, context):
        if not (isinstance(context.module, MoeMlp) and context.method_name == "__call__"):
            return next_fun(*args, **kwargs)
        p = context.module.variables["params"]
        swapped.append(context.module.name)
        return jnp.asarray(_dense_moe(args[0], p["router"], p["w_in"], p["w_out"])[0])

    with nn.intercept_methods(dense):
        want = model.apply(variables, ids)
    assert len(swapped) == cfg.layers
    got = model.apply(variables, ids)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_moe_expert_adapters_are_per_expert_and_route_factored():
    """What the MoE row times: one adapter per expert (layout read from the ragged_dot),
    every adapter factored, the router untouched, and the factored output equal to the
    merged model's."""
    cfg = PRESETS["tiny"]
    model = MoEGPT(cfg)
    ids = jax.random.randint(jax.random.key(3), (cfg.batch, cfg.seq), 0, cfg.vocab)
    variables = model.init(jax.random.key(0), ids)
    layouts = lj.infer_layouts(model.apply, variables, ids)
    assert layouts["params/block_0/moe/w_in"] == layouts["params/block_1/moe/w_out"]
    assert layouts["params/block_0/moe/w_in"] == EXPERT_LAYOUT
    config = lj.LoraConfig(rank=8, targets=EXPERT_LORA)
    frozen, lora = lj.split(variables, config, key=jax.random.key(1), layouts=layouts)
    w_in = lora["params"]["block_0"]["moe"]["w_in"]
    assert (w_in.a.shape, w_in.b.shape) == ((EXPERTS, 64, 8), (EXPERTS, 8, 128))
    routes = lj.routes(model.apply, frozen, lora, ids)
    assert len(routes) == 6 * cfg.layers and not any("router" in p for p in routes)
    assert all(r.startswith("factored (") for r in routes.values()), routes
    require_routes(model, frozen, lora, ids, FACTORED)  # the benchmark's own guard passes
    with pytest.raises(RuntimeError, match=r"MoEGPT: adapters not routed 'factored \(dot_general"):
        require_routes(model, frozen, lora, ids, CUSTOM_ROUTE)  # the experts' route differs
    leaves, tree = jax.tree.flatten(lora)
    keys = jax.random.split(jax.random.key(2), len(leaves))
    noisy = [x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)]
    lora = tree.unflatten(noisy)
    merged = model.apply(lj.merge(frozen, lora), ids)
    assert np.abs(merged - model.apply(variables, ids)).max() > 0.1  # the adapters matter
    np.testing.assert_allclose(
        lj.lora_apply(model.apply)(frozen, lora, ids),
        merged,
        rtol=1e-4,
        atol=1e-5,
    )


def test_memory_child_reports_a_peak_above_its_baseline():
    result = child.memory("tiny", "lora-qv", steps=1)
    assert result["peak_bytes"] >= result["baseline_bytes"] > 0
    assert result["trainable"] == 2 * 2 * (64 * 8 + 8 * 64)  # 2 layers, q and v, rank 8


def test_a_failing_child_is_an_error_with_its_output():
    with pytest.raises(RuntimeError, match=r"benchmark child memory .* failed \(exit"):
        processes.child("memory", "--preset", "tiny", "--variant", "nonsense")


def test_qlora_memory_child_builds_its_base_quantized():
    """The QLoRA memory process trains on a base built kernel by kernel: its kernels are
    nf4 (never a whole float base), its adapters the all-linear ones of the float run."""
    from train.bench.qlora import streamed_quantized_init

    cfg = PRESETS["tiny"]
    model, ids = GPT(cfg), jnp.zeros((cfg.batch, cfg.seq), jnp.int32)
    variables, layouts = streamed_quantized_init(model, ids, "nf4")
    leaves = jax.tree.leaves(variables, is_leaf=lj.quant.is_quantized)
    assert sum(lj.quant.is_quantized(x) for x in leaves) == 6 * cfg.layers + 1  # + lm_head
    assert "params/embed/embedding" in layouts
    result = child.memory("tiny", "qlora-nf4", steps=1)
    assert result["trainable"] == child.memory("tiny", "lora-all-linear", steps=1)["trainable"]
