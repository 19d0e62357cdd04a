"""Starts the benchmark's child processes (`train.bench.child`) and reads their results."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

MEMORY_VARIANTS = ("full", "lora-qv", "lora-all-linear")
QLORA_MEMORY_VARIANTS = ("lora-all-linear", "qlora-nf4")
DORA_MEMORY_VARIANTS = ("lora-all-linear", "dora-all-linear")
DEVICE_COUNTS = (1, 2, 4)


def child(*args: str, timeout: float = 900.0) -> dict[str, Any]:
    """Runs ``python -m train.bench.child *args`` and returns the JSON it prints last.

    Raises:
        RuntimeError: the child failed or printed no result (its stderr tail is included).
    """
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    cmd = [sys.executable, "-m", "train.bench.child", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(
            f"benchmark child {' '.join(args)} failed (exit {done.returncode}):\n"
            f"{done.stderr[-2000:]}"
        )
    return json.loads(lines[-1])


def peak_memory(
    preset: str, steps: int = 3, variants: tuple[str, ...] = MEMORY_VARIANTS
) -> dict[str, dict[str, Any]]:
    """Peak resident bytes and optimizer-state bytes of each variant, one process each."""
    return {
        v: child("memory", "--preset", preset, "--variant", v, "--steps", str(steps))
        for v in variants
    }


def scaling(preset: str, steps: int) -> dict[int, float]:
    """All-linear LoRA mesh-step throughput (steps/s) on 1, 2 and 4 simulated devices."""
    return {
        n: child("scaling", "--preset", preset, "--devices", str(n), "--steps", str(steps))[
            "steps_per_s"
        ]
        for n in DEVICE_COUNTS
    }
