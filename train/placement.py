"""Where a LoRA run's arrays live for each strategy (jit, pmap, mesh), in one place.

`Placement` turns host trees into what `lj.make_train_step` expects for its strategy and
back: the state and base replicated for pmap, placed on a ``("data",)`` mesh for mesh, and
the batch sharded over devices (and, across processes, each process's own slice).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import lora_jax as lj
from train.settings import Settings, UserError

__all__ = ["Placement", "make_placement"]


@dataclasses.dataclass(frozen=True)
class Placement:
    """How to place trees for one strategy.

    Attributes:
        strategy: ``"jit"``, ``"pmap"`` or ``"mesh"``.
        devices: the devices the step runs on.
        mesh: the mesh (for ``"mesh"``).
    """

    strategy: str
    devices: tuple[jax.Device, ...]
    mesh: Mesh | None = None

    def state(self, state: lj.TrainState) -> Any:
        """The state as the step takes it: pmap replicated per device; mesh placed
        (replicated) on the mesh, so checkpoints save and restore it as global arrays."""
        if self.strategy == "pmap":
            return lj.replicate(state, self.devices)
        if self.strategy == "mesh" and self.mesh is not None:
            everywhere = NamedSharding(self.mesh, PartitionSpec())
            return lj.place(state, jax.tree.map(lambda _: everywhere, state))
        return state

    def frozen(self, frozen: Any, lora: Any) -> Any:
        """The base as the step takes it, placed once (never copied again per step)."""
        if self.strategy == "pmap":
            return lj.replicate(frozen, self.devices)
        if self.strategy == "mesh" and self.mesh is not None:
            return lj.place(frozen, lj.mesh_shardings(self.mesh, frozen, lora).frozen)
        return jax.device_put(frozen, self.devices[0])

    def batch(self, batch: Any) -> Any:
        """This process's batch as the step takes it (pmap: split over local devices)."""
        return lj.shard_batch(batch, len(self.devices)) if self.strategy == "pmap" else batch

    def restore_target(self, state: lj.TrainState) -> lj.TrainState:
        """Where a restored state should land: on the mesh for mesh, else as it is."""
        return self.state(state) if self.strategy == "mesh" else state

    def checkpoint_state(self, state: Any) -> lj.TrainState:
        """The state to checkpoint: one copy for pmap, the global arrays for mesh."""
        return lj.unreplicate(state) if self.strategy == "pmap" else state

    def host_lora(self, state: Any) -> Any:
        """The adapters as NumPy arrays on this process (they are replicated)."""
        lora = lj.unreplicate(state).lora if self.strategy == "pmap" else state.lora
        return jax.tree.map(_local_copy, lora)

    def metrics(self, metrics: Any) -> Any:
        """Metrics as one value each (pmap returns one per device, all equal)."""
        return jax.tree.map(lambda x: x[0], metrics) if self.strategy == "pmap" else metrics

    def eval_params(self, frozen_host: Any, frozen_placed: Any) -> Any:
        """The base to evaluate with (a single-device or fully replicated copy)."""
        return frozen_placed if self.strategy == "mesh" else frozen_host


def _local_copy(x: Any) -> np.ndarray:
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return np.asarray(x.addressable_data(0))  # replicated: every process has it all
    return np.asarray(x)


def make_placement(s: Settings) -> Placement:
    """Chooses the devices for `s.strategy` and checks `s.devices` and the batch size.

    Args:
        s: the run settings (``strategy``, ``devices``, ``batch_size``, ``accum_steps``,
            ``num_processes``).

    Returns:
        The `Placement`.

    Raises:
        UserError: too few devices, a device count the batch does not divide, or jit
            asked to run on several devices or processes.

    Example:
        >>> from train.settings import Settings
        >>> make_placement(Settings(strategy="jit")).strategy
        'jit'
    """
    local = jax.local_devices()
    if s.strategy == "jit":
        if (s.devices or 1) > 1 or jax.process_count() > 1:
            raise UserError(
                "--strategy jit runs on one device of one process; use --strategy pmap or "
                "mesh for several devices or processes."
            )
        return Placement("jit", (local[0],))
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
        devices = tuple(local)
        per_device = s.batch_size // jax.process_count()
        _check_divides(per_device, n * s.accum_steps, "local devices x --accum-steps", s)
        return Placement("pmap", devices)
    every = jax.devices()
    n = s.devices * jax.process_count() if s.devices else len(every)
    if n > len(every):
        raise UserError(f"--devices {s.devices}: only {len(every)} devices are available.")
    devices = tuple(every[:n]) if jax.process_count() == 1 else tuple(every)
    _check_divides(s.batch_size, len(devices) * s.accum_steps, "devices x --accum-steps", s)
    mesh = Mesh(np.asarray(devices), ("data",))
    return Placement("mesh", devices, mesh)


def _check_divides(batch: int, ways: int, what: str, s: Settings) -> None:
    if batch % ways:
        raise UserError(
            f"--batch-size {s.batch_size} does not divide evenly over {ways} ({what}, "
            f"{jax.process_count()} process(es)); choose a batch size that is a multiple "
            f"of {ways * jax.process_count()}."
        )
