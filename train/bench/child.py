"""One measurement in a fresh process: peak memory of a training run, or training steps/s
on N simulated devices. Prints one JSON line.

    python -m train.bench.child memory --preset medium --variant full|lora-qv|lora-all-linear
    python -m train.bench.child memory --preset medium --variant qlora-nf4
    python -m train.bench.child memory --preset medium --variant dora-all-linear
    python -m train.bench.child scaling --preset medium --devices 4

Peak memory is a property of a whole process, and the device count must be set before JAX
starts, so each of these runs alone (`train.bench.processes` starts them).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
from typing import Any


def peak_rss() -> int:
    """This process's peak resident bytes: VmHWM, which a fresh program starts anew (unlike
    ``getrusage``'s ru_maxrss, which on Linux keeps the high-water mark of the process that
    forked it, here the benchmark itself)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _model(preset: str, batch: int | None = None) -> tuple[Any, Any, Any]:
    import jax

    from train.bench.models import GPT, PRESETS

    cfg = PRESETS[preset]
    model = GPT(cfg)
    ids = jax.random.randint(jax.random.key(0), (batch or cfg.batch, cfg.seq), 0, cfg.vocab)
    return model, jax.jit(model.init)(jax.random.key(0), ids), ids


def memory(preset: str, variant: str, steps: int) -> dict[str, Any]:
    """Peak resident memory of a process that trains `steps` steps of one variant, and the
    peak before the model existed (after importing JAX, the library and the benchmark)."""
    import jax.numpy as jnp

    from train.bench.steps import ALL_LINEAR, DORA_ROUTE, QV, full_runner, lora_runner

    jnp.ones(()).block_until_ready()  # the runtime is up
    baseline = peak_rss()
    if variant.startswith("qlora-"):  # the base built kernel by kernel, never whole in float
        return _qlora_memory(preset, variant.removeprefix("qlora-"), steps, baseline)
    model, variables, ids = _model(preset)
    if variant == "full":
        runner = full_runner(model, variables, ids)
    elif variant == "dora-all-linear":
        runner = lora_runner(
            variant, model, variables, ids, ALL_LINEAR, route=DORA_ROUTE, dora=True
        )
    else:
        targets = {"lora-qv": QV, "lora-all-linear": ALL_LINEAR}[variant]
        runner = lora_runner(variant, model, variables, ids, targets)
    del variables  # the full step trains its own copy; LoRA keeps the base it was given
    for _ in range(steps):
        runner.run()
    peak = peak_rss()
    return {
        "peak_bytes": peak,
        "baseline_bytes": baseline,
        "opt_bytes": runner.opt_bytes,
        "trainable": runner.trainable,
    }


def _qlora_memory(preset: str, fmt: str, steps: int, baseline: int) -> dict[str, Any]:
    import jax

    from train.bench.models import GPT, PRESETS
    from train.bench.qlora import QLORA_ROUTE, streamed_quantized_init
    from train.bench.steps import ALL_LINEAR, lora_runner

    cfg = PRESETS[preset]
    model = GPT(cfg)
    ids = jax.random.randint(jax.random.key(0), (cfg.batch, cfg.seq), 0, cfg.vocab)
    variables, layouts = streamed_quantized_init(model, ids, fmt)
    runner = lora_runner(
        f"qlora-{fmt}", model, variables, ids, ALL_LINEAR, route=QLORA_ROUTE, layouts=layouts
    )
    del variables
    for _ in range(steps):
        runner.run()
    return {
        "peak_bytes": peak_rss(),
        "baseline_bytes": baseline,
        "opt_bytes": runner.opt_bytes,
        "trainable": runner.trainable,
    }


def scaling(preset: str, steps: int) -> dict[str, Any]:
    """Steps/s of all-linear LoRA with the mesh strategy over every (simulated) device, on a
    global batch of 4 sequences split over them."""
    import jax
    import numpy as np
    import optax
    from jax.sharding import Mesh

    import lora_jax as lj
    from train.bench.models import RANK, lm_loss
    from train.bench.steps import ALL_LINEAR

    model, variables, ids = _model(preset, batch=4)
    config = lj.LoraConfig(rank=RANK, alpha=16.0, targets=ALL_LINEAR)
    frozen, lora = lj.split(variables, config, key=jax.random.key(1))
    apply = lj.lora_apply(model.apply)
    tx = optax.adamw(1e-4)
    mesh = Mesh(np.array(jax.devices()), ("data",))
    step = lj.make_train_step(
        lambda f, lo, b, k: lm_loss(apply(f, lo, b), b), tx, strategy=lj.parallel.mesh(mesh)
    )
    state = lj.TrainState.create(lora, tx, key=jax.random.key(2))
    for _ in range(2):  # compile, then one warm step
        state, metrics = step(state, frozen, ids)
        metrics["loss"].block_until_ready()
    start = time.perf_counter()
    for _ in range(steps):
        state, metrics = step(state, frozen, ids)
        metrics["loss"].block_until_ready()
    elapsed = time.perf_counter() - start
    return {"devices": jax.device_count(), "steps_per_s": steps / elapsed}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("command", choices=("memory", "scaling"))
    parser.add_argument("--preset", default="medium")
    parser.add_argument("--variant", default="full")
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args(argv)
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"
    if args.command == "memory":
        result = memory(args.preset, args.variant, args.steps)
    else:
        result = scaling(args.preset, args.steps)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
