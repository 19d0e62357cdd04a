"""The benchmark runs end to end (behaviour only: speed is what it reports, not what we test)."""

from __future__ import annotations

import pytest

from train import benchmark


@pytest.mark.slow
def test_benchmark_smoke_prints_every_variant():
    table = benchmark.main(["--preset", "tiny", "--rounds", "1"])
    for name in (
        "full fine-tune",
        "lora q/v",
        "lora all-linear",
        "merged path",
        "nnx.LoRALinear",
    ):
        assert name in table
    assert "| full fine-tune | " in table and "| 1.00 |" in table
