"""The benchmark runs end to end (behaviour only: speed is what it reports, not what we test)."""

from __future__ import annotations

import re

import pytest

from train import benchmark
from train.bench import child, processes


@pytest.mark.slow
def test_benchmark_smoke_prints_every_row():
    table = benchmark.main(["--preset", "tiny", "--rounds", "1"])
    for row in (
        "LoRA q/v step / full fine-tune step",
        "LoRA all-linear step / full fine-tune step",
        "lora_jax on NNX (add_lora), all-linear / full",
        "peer: nnx.LoRALinear q/v / full",
        "factored / merged LoRA step",
        "peak memory (process), LoRA q/v run / full fine-tune run",
        "optimizer state, LoRA q/v / full fine-tune",
        "forward, adapter merged / base forward",
        "forward, mixed batch of 4 adapters / one adapter",
        "adapter save",
        "adapter restore",
        "adapter size on disk / raw A/B bytes",
        "steps/s on 4 simulated CPU devices / 1 device",
    ):
        assert re.search(rf"^\| {re.escape(row)}.*\| [0-9.]+ \(?", table, re.M), row
    assert "| full fine-tune | " in table and "| 1.00 (1.00-1.00) |" in table
    assert "<= 0.65" in table and "<= 0.7" in table and "<= 1.02" in table


def test_memory_child_reports_a_peak_above_its_baseline():
    result = child.memory("tiny", "lora-qv", steps=1)
    assert result["peak_bytes"] >= result["baseline_bytes"] > 0
    assert result["trainable"] == 2 * 2 * (64 * 8 + 8 * 64)  # 2 layers, q and v, rank 8


def test_a_failing_child_is_an_error_with_its_output():
    with pytest.raises(RuntimeError, match=r"benchmark child memory .* failed \(exit"):
        processes.child("memory", "--preset", "tiny", "--variant", "nonsense")
