"""Serving variants: the base forward, one adapter swapped every call, a mixed batch."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

import lora_jax as lj
from train.bench.models import GPT
from train.bench.steps import ALL_LINEAR, RANK, Runner

SERVING_ADAPTERS = 4
SERVING_TARGET = 1.2


def serving_runners(model: GPT, variables: dict, ids: jax.Array) -> list[Runner]:
    """Forward passes: the base, an adapter merged into the weights (what serving one adapter
    costs), one adapter swapped at every call (factored), a mixed batch of 4."""
    config = lj.LoraConfig(rank=RANK, alpha=16.0, targets=ALL_LINEAR)
    loras = [
        jax.tree.map(lambda x: x + 0.01, lj.split(variables, config, key=jax.random.key(i))[1])
        for i in range(SERVING_ADAPTERS)
    ]  # B != 0, so no adapter is trivially the base
    stacked = lj.multi.stack_adapters(loras)
    merged = lj.merge(variables, loras[0])
    apply, mixed = lj.lora_apply(model.apply), lj.multi.lora_apply_mixed(model.apply)

    def runner(name: str, fn: Callable[..., Any], args: Callable[[int], tuple]) -> Runner:
        box = Runner(name, lambda: None, 0, 0, 0)

        def traced(*a: Any) -> Any:
            box.traces += 1  # runs once per trace, not per call
            return fn(*a)

        jitted = jax.jit(traced)

        def run() -> None:
            jitted(*args(box.calls)).block_until_ready()
            box.calls += 1

        box.run = run
        return box

    rotations = [(jnp.arange(ids.shape[0]) + i) % SERVING_ADAPTERS for i in range(4)]
    return [
        runner("forward, base (no adapter)", model.apply, lambda i: (variables, ids)),
        runner("forward, adapter merged into the weights", model.apply, lambda i: (merged, ids)),
        runner(
            "forward, one adapter (swapped every call)",
            apply,
            lambda i: (variables, loras[i % SERVING_ADAPTERS], ids),
        ),
        runner(
            f"forward, mixed batch of {SERVING_ADAPTERS} adapters",
            mixed,
            lambda i: (variables, stacked, rotations[i % 4], ids),
        ),
    ]
