"""One variant of the accelerator measurement in a fresh process; prints one JSON line.

    python -m train.bench.accel_child --preset 1b --variant full|lora-qv|lora-all-linear

A fresh process because ``peak_bytes_in_use`` is per process and never resets
(`train.bench.accel` starts one per variant). The parameters are initialised on the device
under `jax.jit`, directly in their storage dtype: float32 for full fine-tuning (bf16
compute), bf16 for the LoRA base (float32 adapters and optimizer state). A variant whose
estimated bytes exceed the device's ``bytes_limit`` is reported as skipped, not run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import time
from typing import Any

WARMUP = 2  # steps before timing; the first one compiles


def _device() -> tuple[Any, dict[str, Any]]:
    import jax

    dev = jax.devices()[0]
    stats = dev.memory_stats() or {}
    return dev, {
        "platform": dev.platform,
        "device_kind": dev.device_kind,
        "bytes_limit": stats.get("bytes_limit"),
    }


def _batch(p: Any) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp

    @jax.jit
    def make(key: jax.Array) -> dict[str, jax.Array]:
        ids = jax.random.randint(key, (p.batch, p.seq + 1), 0, p.config.vocab_size)
        weights = jnp.ones((p.batch, p.seq), jnp.float32)
        return {"inputs": ids[:, :-1], "targets": ids[:, 1:], "weights": weights}

    return make(jax.random.key(0))


def _lora_config(p: Any, variant: str) -> Any:
    import lora_jax as lj
    from train.bench.accel import LORA_TARGETS

    return lj.LoraConfig(rank=p.rank, alpha=2.0 * p.rank, targets=LORA_TARGETS[variant])


def _full_step(model: Any, variables: Any) -> tuple[Any, Any]:
    import jax
    import optax

    from train.losses import decay_mask, make_optimizer, token_nll

    tx = make_optimizer(1e-5, weight_decay=0.01, clip_norm=1.0, mask=decay_mask)
    box = {"params": variables, "opt": jax.jit(tx.init)(variables)}

    def step(params: Any, opt_state: Any, batch: dict) -> tuple[Any, Any, jax.Array]:
        loss_fn = lambda v: token_nll(model.apply(v, batch["inputs"]), batch)["loss"]
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    jitted = jax.jit(step, donate_argnums=(0, 1))

    def run(batch: dict) -> None:
        box["params"], box["opt"], loss = jitted(box["params"], box["opt"], batch)
        loss.block_until_ready()

    return run, box


def _lora_step(model: Any, frozen: Any, lora: Any) -> Any:
    import jax

    import lora_jax as lj
    from train.losses import make_optimizer, token_nll

    apply = lj.lora_apply(model.apply)

    def loss_fn(frozen: Any, lora: Any, batch: dict, key: jax.Array) -> Any:
        logits = apply(frozen, lora, batch["inputs"], rngs={lj.DROPOUT_RNG: key})
        return token_nll(logits, batch)["loss"]

    tx = make_optimizer(1e-4, weight_decay=0.0, clip_norm=1.0)
    step = lj.make_train_step(loss_fn, tx)
    create = lambda lora: lj.TrainState.create(lora, tx, key=jax.random.key(2))
    box = {"state": jax.jit(create)(lora)}

    def run(batch: dict) -> None:
        box["state"], metrics = step(box["state"], frozen, batch)
        metrics["loss"].block_until_ready()

    return run


def _sizes(p: Any, variant: str, model: Any, ids: Any) -> tuple[Any, Any, int, int]:
    """The abstract params (no allocation), the kernels' layouts (the scanned layers have a
    leading layer axis), the params' count and the LoRA params' count."""
    import jax

    import lora_jax as lj
    from train.models import num_params

    shapes = jax.eval_shape(model.init, jax.random.key(0), ids)
    layouts = lj.infer_layouts(model.apply, shapes, ids)
    if variant == "full":
        return shapes, layouts, num_params(shapes), 0
    config = _lora_config(p, variant)
    split = lambda v: lj.split(v, config, key=jax.random.key(1), layouts=layouts)
    _, lora = jax.eval_shape(split, shapes)
    return shapes, layouts, num_params(shapes), num_params(lora)


def _skip_reason(p: Any, info: dict[str, Any], estimate: int) -> str | None:
    """Why a variant is not started: a big preset on a CPU, or more bytes than the device has."""
    if info["platform"] == "cpu" and not p.cpu_ok:
        return "no accelerator: JAX sees only the CPU (install jax[cuda12] or jax[tpu])"
    limit = info["bytes_limit"]
    if limit is not None and estimate > limit:
        return f"does not fit (estimate {estimate / 2**30:.1f} GiB > {limit / 2**30:.1f} GiB)"
    return None


def _runner(p: Any, variant: str, model: Any, layouts: Any, small: Any) -> Any:
    """The variant's step, its parameters initialised on the device under `jax.jit` in their
    storage dtype (`model`'s `param_dtype`)."""
    import jax

    import lora_jax as lj

    variables = jax.jit(model.init)(jax.random.key(0), small)
    if variant == "full":
        return _full_step(model, variables)[0]
    # `split` returns the base itself as `frozen`; under one jit it makes the adapters on
    # the device in one compile (eagerly, every small op would compile by itself)
    config = _lora_config(p, variant)
    lora = jax.jit(lambda v: lj.split(v, config, key=jax.random.key(1), layouts=layouts)[1])(
        variables
    )
    routes = lj.routes(model.apply, variables, lora, small)
    wrong = {k: v for k, v in routes.items() if not v.startswith("factored")}
    if wrong:  # a factored variant must never time the merged path
        raise RuntimeError(f"adapters not routed factored: {wrong}")
    return _lora_step(model, variables, lora)


def _measure(run: Any, batch: dict, steps: int, device: Any) -> dict[str, Any]:
    """Times `WARMUP` steps (the first compiles), then `steps` steps; reads the peak memory."""
    from train.bench.child import peak_rss

    start = time.perf_counter()
    run(batch)
    first = time.perf_counter() - start
    for _ in range(WARMUP - 1):
        run(batch)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        run(batch)
        times.append(time.perf_counter() - start)
    stats = device.memory_stats()
    if stats and "peak_bytes_in_use" in stats:
        peak, kind = stats["peak_bytes_in_use"], "device peak_bytes_in_use"
    else:
        peak, kind = peak_rss(), "process peak RSS (no device memory stats)"
    step_s = statistics.median(times)
    return {
        "step_s": step_s,
        "step_times": times,
        "first_step_s": first,
        "peak_bytes": peak,
        "peak_kind": kind,
    }


def run_variant(preset: str, variant: str, steps: int) -> dict[str, Any]:
    """Runs one variant: `WARMUP` steps, then `steps` timed ones; returns its record, with
    ``status`` ``"ok"``, ``"skipped"`` (and why) or ``"failed"`` (and the error)."""
    import jax.numpy as jnp

    from train.bench.accel import PRESETS, estimate_bytes, matmul_params
    from train.models import Llama

    p = PRESETS[preset]
    dtype = "float32" if variant == "full" else "bfloat16"
    config = dataclasses.replace(p.config, param_dtype=dtype)
    model = Llama(config)
    device, info = _device()
    small = jnp.zeros((1, 8), jnp.int32)
    shapes, layouts, params, lora_params = _sizes(p, variant, model, small)
    record: dict[str, Any] = {
        **info,
        "preset": preset,
        "variant": variant,
        "batch": p.batch,
        "seq": p.seq,
        "rank": None if variant == "full" else p.rank,
        "remat": config.remat,
        "attention": config.attention,
        "param_dtype": dtype,
        "params": params,
        "matmul_params": matmul_params(shapes, tied=config.tie_embeddings),
        "trainable": params if variant == "full" else lora_params,
        "estimate_bytes": estimate_bytes(p, variant, params, lora_params),
    }
    why = _skip_reason(p, info, record["estimate_bytes"])
    if why is not None:
        return {**record, "status": "skipped", "reason": why}
    try:
        run = _runner(p, variant, model, layouts, small)
        measured = _measure(run, _batch(p), steps, device)
    except Exception as err:  # out of memory, say: reported beside the estimate, not raised
        return {**record, "status": "failed", "reason": f"{type(err).__name__}: {err}"[:400]}
    tokens_per_s = p.batch * p.seq / measured["step_s"]
    return {**record, "status": "ok", **measured, "tokens_per_s": tokens_per_s}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--preset", required=True)
    parser.add_argument("--variant", required=True)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args(argv)
    # The child owns the device: let JAX's allocator take nearly all of it (default 75%).
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
    print(json.dumps(run_variant(args.preset, args.variant, args.steps)), flush=True)


if __name__ == "__main__":
    main()
