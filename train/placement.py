"""The app's strategy: ``--strategy jit|pmap|mesh`` becomes a `lj.parallel.Strategy` once.

`make_strategy` checks the devices and the batch size for the chosen strategy and returns
the library's own strategy value; the training loop then asks it to place the state, base
and batches and to gather results (`Strategy.place_state`, `place_frozen`, `place_batch`,
`gather`, `metrics`), so nothing in the app switches on the strategy's name again.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

import lora_jax as lj
from train.settings import Settings, UserError

__all__ = ["make_strategy", "restore_target"]


def make_strategy(s: Settings) -> lj.parallel.Strategy:
    """The `lj.parallel.Strategy` for `s.strategy`, after checking devices and batch size.

    ``jit`` runs on one device; ``pmap`` on every local device; ``mesh`` on a ``("data",)``
    mesh of ``--devices`` devices per process (all of them by default).

    Args:
        s: the run settings (``strategy``, ``devices``, ``batch_size``, ``accum_steps``,
            ``num_processes``).

    Returns:
        The strategy.

    Raises:
        UserError: too few devices, a device count the batch does not divide, or jit
            asked to run on several devices or processes.

    Example:
        >>> from train.settings import Settings
        >>> make_strategy(Settings(strategy="jit")).axis_name is None
        True
    """
    local = jax.local_devices()
    if s.strategy == "jit":
        if (s.devices or 1) > 1 or jax.process_count() > 1:
            raise UserError(
                "--strategy jit runs on one device of one process; use --strategy pmap or "
                "mesh for several devices or processes."
            )
        return lj.parallel.jit()
    if s.strategy == "pmap":
        if jax.process_count() > 1:
            raise UserError(
                "multi-process runs of the app use --strategy mesh (the library's pmap step "
                "works across processes, but the app checkpoints global mesh arrays)."
            )
        n = s.devices or len(local)
        if n != len(local):
            raise UserError(
                f"--strategy pmap uses every local device: this process has {len(local)}, "
                f"--devices asks for {n}. Start a new process with --devices {n}."
            )
        _check_divides(s.batch_size, n * s.accum_steps, "local devices x --accum-steps", s)
        return lj.parallel.pmap(local)
    every = jax.devices()
    n = s.devices * jax.process_count() if s.devices else len(every)
    if n > len(every):
        raise UserError(f"--devices {s.devices}: only {len(every)} devices are available.")
    devices = every[:n] if jax.process_count() == 1 else every
    _check_divides(s.batch_size, len(devices) * s.accum_steps, "devices x --accum-steps", s)
    return lj.parallel.mesh(Mesh(np.asarray(devices), ("data",)))


def restore_target(strategy: lj.parallel.Strategy, state: lj.TrainState, frozen: Any) -> Any:
    """The state a checkpoint is restored into: placed as the step takes it (so a mesh run
    restores global arrays), unless placing adds a device axis (pmap keeps one replica per
    device, a checkpoint holds one copy), then the state as it is.

    Args:
        strategy: the run's strategy.
        state: a fresh state (structure, dtypes).
        frozen: the base (the adapters are placed like their kernels).

    Returns:
        The restore target.
    """
    placed = strategy.place_state(state, frozen)
    return placed if np.ndim(placed.step) == np.ndim(state.step) else state


def _check_divides(batch: int, ways: int, what: str, s: Settings) -> None:
    if batch % ways:
        raise UserError(
            f"--batch-size {s.batch_size} does not divide evenly over {ways} ({what}, "
            f"{jax.process_count()} process(es)); choose a batch size that is a multiple "
            f"of {ways * jax.process_count()}."
        )
