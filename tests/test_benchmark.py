"""The benchmark runs end to end (behaviour only: speed is what it reports, not what we test)."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import pytest

import lora_jax as lj
from train import benchmark
from train.bench import child, processes
from train.bench.models import GPT, PRESETS, CustomGPT
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
        "peak memory (process), LoRA q/v run / full fine-tune run",
        "optimizer state, LoRA q/v / full fine-tune",
        "forward, adapter merged / base forward",
        "forward, mixed batch of 4 adapters / one adapter",
        "adapter save",
        "adapter restore",
        "adapter size on disk / raw A/B bytes",
        "steps/s on 4 simulated CPU devices / 1 device",
    ):
        assert re.search(rf"^\| {re.escape(row)}.*\| [+-]?[0-9.]+ \(?", table, re.M), row
    assert "| full fine-tune | " in table and "| 1.00 (1.00-1.00) |" in table
    assert "| custom-style full fine-tune | " in table
    assert "<= 0.65" in table and "<= 0.7" in table and "<= 1.02" in table
    assert "<= 0.72" in table and "<= +0.03" in table


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


def test_memory_child_reports_a_peak_above_its_baseline():
    result = child.memory("tiny", "lora-qv", steps=1)
    assert result["peak_bytes"] >= result["baseline_bytes"] > 0
    assert result["trainable"] == 2 * 2 * (64 * 8 + 8 * 64)  # 2 layers, q and v, rank 8


def test_a_failing_child_is_an_error_with_its_output():
    with pytest.raises(RuntimeError, match=r"benchmark child memory .* failed \(exit"):
        processes.child("memory", "--preset", "tiny", "--variant", "nonsense")
