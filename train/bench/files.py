"""Adapter files: how long `save_adapter` and `load_adapter` take (with and without the
digest check), and the size on disk against the raw bytes of the A/B arrays."""

from __future__ import annotations

import dataclasses
import pathlib
import statistics
import tempfile
import time
from typing import Any

import jax
import jax.numpy as jnp
import optax

import lora_jax as lj
from train.bench.models import RANK
from train.bench.steps import ALL_LINEAR


def _folder_bytes(folder: pathlib.Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def adapter_files(variables: Any, rounds: int) -> dict[str, float]:
    """Median save and restore seconds over `rounds` tries, bytes on disk, raw A/B bytes
    (all-linear adapters, rank 8, float32, B drawn at random like a trained adapter's: at
    init B is zeros, which compresses to nothing and would flatter the size)."""
    config = lj.LoraConfig(rank=RANK, alpha=16.0, targets=ALL_LINEAR)
    frozen, lora = lj.split(variables, config, key=jax.random.key(1))
    lora = jax.tree.map(
        lambda w: w.replace(b=0.02 * jax.random.normal(jax.random.key(2), w.b.shape)),
        lora,
        is_leaf=lambda x: isinstance(x, lj.LoraWeights),
    )
    raw = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(lora))
    saves, loads, unverified, size = [], [], [], 0
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(max(rounds, 1)):
            folder = pathlib.Path(tmp) / f"adapter_{i}"
            start = time.perf_counter()
            lj.save_adapter(folder, lora)
            saves.append(time.perf_counter() - start)
            start = time.perf_counter()
            back = lj.load_adapter(folder, frozen=frozen)
            jax.block_until_ready(back)
            loads.append(time.perf_counter() - start)
            start = time.perf_counter()
            jax.block_until_ready(lj.load_adapter(folder, frozen=frozen, verify=False))
            unverified.append(time.perf_counter() - start)
            size = _folder_bytes(folder)
    return {
        "save_s": statistics.median(saves),
        "restore_s": statistics.median(loads),
        "restore_unverified_s": statistics.median(unverified),
        "disk_bytes": float(size),
        "raw_bytes": float(raw),
    }


def _train_state(variables: Any) -> lj.TrainState:
    """A training state as a checkpoint step holds it: all-linear adapters with random B and
    their Adam moments (non-zero, as after some steps)."""
    config = lj.LoraConfig(rank=RANK, alpha=16.0, targets=ALL_LINEAR)
    _, lora = lj.split(variables, config, key=jax.random.key(1))

    def noise(x: Any, k: int) -> Any:
        if not jnp.issubdtype(x.dtype, jnp.floating):
            return jnp.zeros_like(x)
        return 0.02 * jax.random.normal(jax.random.key(k), x.shape, x.dtype)

    lora = jax.tree.map(lambda x: x + noise(x, 2), lora)
    state = lj.TrainState.create(lora, optax.adam(1e-3), key=jax.random.key(3))
    return dataclasses.replace(
        state, opt_state=jax.tree.map(lambda x: x + noise(x, 4), state.opt_state)
    )


def state_files(variables: Any, rounds: int) -> dict[str, float]:
    """Median seconds of a `CheckpointManager` step holding the training state: `save` until
    it returns (digests are computed before it does; the write goes on in the background),
    save until on disk, and restore, each with and without digests."""
    state = _train_state(variables)
    times: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for digests in (True, False):
            tag = "" if digests else "_unverified"
            folder = pathlib.Path(tmp) / f"ckpt{tag}"
            with lj.CheckpointManager(folder, max_to_keep=2, digests=digests) as mgr:
                for i in range(max(rounds, 1) + 1):  # the first save warms orbax up
                    start = time.perf_counter()
                    mgr.save(i, state)
                    returned = time.perf_counter() - start
                    mgr.wait_until_finished()
                    written = time.perf_counter() - start
                    start = time.perf_counter()
                    jax.block_until_ready(mgr.restore(state, i, verify=digests)[0])
                    restored = time.perf_counter() - start
                    if i:
                        for name, t in (
                            ("save", returned),
                            ("write", written),
                            ("restore", restored),
                        ):
                            times.setdefault(f"state_{name}{tag}_s", []).append(t)
    out = {k: statistics.median(v) for k, v in times.items()}
    out["state_bytes"] = float(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state)))
    return out
