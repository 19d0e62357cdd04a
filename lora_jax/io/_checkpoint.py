"""`CheckpointManager`: the whole LoRA training state, every N steps, with orbax.

A thin layer over `orbax.checkpoint.CheckpointManager` (use ``.orbax`` for anything it
does not expose). Each step folder holds three items: ``state`` (adapters, optimizer state,
step, rng, skip count), ``data`` (the data-position record the caller hands in, JSON) and
``meta`` (the adapter metadata of `lora_jax.save_adapter`: each adapter's layout, rank,
scale and dropout rate, the base fingerprint, and the SHA-256 digest of every state array,
verified on restore). Orbax finalizes a step only when every item is written, so a crash
mid-save leaves the previous steps usable and the partial one invisible. The frozen base
is never written. No config is needed: a restore checks the target's adapters against the
stored metadata and refuses one whose scales differ.

Resuming is exact: 20 steps in one go equal 10 steps, a save, a fresh process, a restore and
10 more, bit for bit (same data order and rng; tested). After a ``kill -9`` mid-save the
partial step is cleaned up when the folder is next opened (tested by killing a writer at
several moments). Retention renames a step aside (deleted at the next save), `all_steps`
lists only steps with all their files, and opening the folder for writing removes what a
kill left behind (tested with 20 random kills of a writer keeping 3 steps). One process
group writes a folder; readers open it with ``read_only=True``.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from lora_jax.core._paths import flatten
from lora_jax.core._weights import flatten_lora
from lora_jax.io._digest import (
    MISSING,
    base_sample,
    check_base_values,
    tree_digests,
    verify_tree_digests,
)
from lora_jax.io._metadata import check_base, check_record, check_target, describe
from lora_jax.io._steps import DELETED, complete, purge, remove_leftovers
from lora_jax.io._stored import abstract, from_storable, storable
from lora_jax.training._state import TrainState

__all__ = ["CheckpointManager"]


class CheckpointManager:
    """Saves and restores a `TrainState` (plus a data position) every N steps, with orbax.

    Saving is asynchronous: `save` returns once the arrays are copied off the devices, and
    the files are written in the background while training goes on. `wait_until_finished`
    blocks until the last save is on disk; `close` (or leaving a ``with`` block) waits too,
    then releases orbax's threads. Retention keeps the last `max_to_keep` steps and, with
    `best_metric`, also the best `keep_best` by that metric.

    Each step also stores the adapters' metadata (layout, rank, scale, dropout rate per
    path, and a fingerprint of the base); `restore` refuses a target whose adapters differ
    from it, so a scale cannot silently change across a resume.

    Example:
        >>> import tempfile, jax, jax.numpy as jnp, optax, lora_jax as lj
        >>> config = lj.LoraConfig(rank=2, targets="w")
        >>> frozen, lora = lj.split({"w": jnp.ones((4, 3))}, config, key=jax.random.key(0))
        >>> state = lj.TrainState.create(lora, optax.adam(1e-3), key=jax.random.key(1))
        >>> with lj.CheckpointManager(tempfile.mkdtemp()) as mgr:
        ...     _ = mgr.save(0, state, data_position={"epoch": 0, "index": 8})
        ...     restored, position = mgr.restore(state)
        >>> position, int(restored.step)
        ({'epoch': 0, 'index': 8}, 0)
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        max_to_keep: int = 3,
        save_interval_steps: int = 1,
        best_metric: str | None = None,
        best_mode: str = "min",
        keep_best: int = 1,
        async_save: bool = True,
        digests: bool = True,
        read_only: bool = False,
    ) -> None:
        """Opens (or creates) a checkpoint folder.

        Args:
            directory: the run's checkpoint folder.
            max_to_keep: how many of the latest steps to keep.
            save_interval_steps: `save` writes only steps that are multiples of this
                (unless forced).
            best_metric: a key of the ``metrics`` given to `save`; when set, the best
                `keep_best` steps by it are kept too.
            best_mode: ``"min"`` or ``"max"``: which direction is better.
            keep_best: how many best steps to keep.
            async_save: write in a background thread.
            digests: record the SHA-256 digest of every state array in each step, for
                `restore` to verify (on by default; computed before `save` returns, about
                1 s per GB on a CPU core). ``False`` is for those who need the speed and
                trust the storage: its steps restore unverified.
            read_only: only list and restore: no saves, and nothing in the folder is
                touched (opening for writing removes temporary folders, so a reader, such
                as an evaluation job, must open a folder a training run writes this way).

        Raises:
            ValueError: a bad `best_mode` or a count below 1.
        """
        if best_mode not in ("min", "max"):
            raise ValueError(f"`best_mode` must be 'min' or 'max'; found {best_mode!r}.")
        if max_to_keep < 1 or keep_best < 1 or save_interval_steps < 1:
            raise ValueError(
                f"`max_to_keep`, `keep_best` and `save_interval_steps` must be >= 1; found "
                f"{max_to_keep}, {keep_best}, {save_interval_steps}."
            )
        self.directory = pathlib.Path(directory).absolute()
        keep: list[Any] = [policies.LatestN(n=max_to_keep)]
        if best_metric is not None:
            keep.append(
                policies.BestN(
                    get_metric_fn=lambda m: m[best_metric],
                    reverse=best_mode == "min",  # orbax keeps the end of an ascending sort
                    n=keep_best,
                )
            )
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=save_interval_steps,
            preservation_policy=policies.AnyPreservationPolicy(keep),
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=not read_only,
            read_only=read_only,
            # Retention renames a step aside (one atomic rename) before anything is
            # deleted, so a kill mid-delete never leaves a partial step under its name.
            todelete_subdir=DELETED,
        )
        self.digests = digests
        self._base: tuple[Any, dict[str, str]] | None = None
        self.read_only = read_only
        if not read_only:
            remove_leftovers(self.directory)
        self.orbax = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "data", "meta")
        )

    def save(
        self,
        step: int,
        state: TrainState,
        *,
        data_position: dict[str, Any] | None = None,
        metrics: dict[str, float] | None = None,
        force: bool = False,
        frozen: Any = None,
    ) -> bool:
        """Saves `state` as `step` (asynchronously by default).

        Args:
            step: the step number to save under.
            state: the training state (the base is not part of it and is never written).
                A pmap-replicated state (`lora_jax.parallel.replicate`) is saved as one
                copy, so it restores anywhere.
            data_position: a JSON-able record of where the data pipeline is, handed back
                by `restore`.
            metrics: scalar metrics for `best_metric` retention.
            force: save even if `step` is not a multiple of `save_interval_steps`.
            frozen: optional base being trained on: a content fingerprint of each targeted
                kernel is recorded (as `lora_jax.save_adapter` does; computed once per
                base object), for `restore(..., frozen=)` to check.

        Returns:
            Whether a save was started.

        Raises:
            ValueError: the manager was opened with ``read_only=True``.
        """
        if self.read_only:
            raise ValueError(f"{self.directory} was opened with read_only=True; it cannot save.")
        if force or self.orbax.should_save(step):
            # The steps the last save's retention set aside go now (orbax waits for that
            # save here anyway), so the folder holds max_to_keep steps plus one at most.
            self.orbax.wait_until_finished()
            purge(self.directory)
        if jnp.ndim(state.step) == 1:  # replicated for pmap: every copy is the same
            state = jax.tree.map(lambda x: x[0], state)
        record = describe(state.lora)
        for path, sample in self._base_samples(frozen, record["adapters"]).items():
            record["adapters"][path]["base_sample"] = sample
        stored = storable(state)
        record["state_digests"] = tree_digests(stored) if self.digests else None
        metrics = {k: float(v) for k, v in (metrics or {}).items()}
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(stored),
            data=ocp.args.JsonSave(data_position or {}),
            meta=ocp.args.JsonSave(record),
        )
        return self.orbax.save(step, args=args, metrics=metrics or None, force=force)

    def restore(
        self,
        target: TrainState,
        step: int | None = None,
        *,
        frozen: Any = None,
        verify: bool = True,
        strict: bool = False,
    ) -> tuple[TrainState, dict[str, Any]]:
        """Restores a step (the latest by default) into the structure of `target`.

        Waits for a save still in flight first, so the step just saved is restorable. The
        stored metadata is the truth about the adapters: `target`'s adapters must have the
        same paths, layouts, ranks, scales and dropout rates (build it from
        `lora_jax.load_adapter` or from the same `lora_jax.split` that made the saved ones).

        Args:
            target: a `TrainState` (concrete, or abstract from `jax.eval_shape`) giving the
                structure, dtypes and shardings to restore into: restore a checkpoint
                written on 4 devices onto 1 or 2, or onto a mesh, by giving a target with
                those shardings.
            step: which step; None for the latest.
            frozen: optional base to check against: the targeted paths and shapes, and,
                for a step saved with its base, a sample of each kernel's values (a base
                with other weights warns, naming the first kernel).
            verify: check every restored array against the SHA-256 digest recorded at
                save (on by default); ``verify=False`` skips it.
            strict: a base with the right shapes but other values is a ValueError.

        Returns:
            ``(state, data_position)``.

        Raises:
            ValueError: no checkpoint in the folder or no such step, a target whose adapters
                differ from the stored ones (the path and both values named), a base that
                does not fit the stored metadata, or damaged files (unreadable, or an
                array whose digest differs from the one recorded at save: named).
        """
        self.orbax.wait_until_finished()  # a save still in flight is part of what exists
        step = self.latest_step() if step is None else step
        if step is None or step not in self.all_steps():
            raise ValueError(
                f"no checkpoint {'steps' if step is None else f'for step {step}'} in "
                f"{self.directory}; steps there: {list(self.all_steps())}."
            )
        record = self._metadata(step)
        check_target(record, flatten_lora(target.lora))
        if frozen is not None:
            check_base(record, flatten(frozen))
            check_base_values(record["adapters"], flatten(frozen), strict)
        target_tree = abstract(storable(target))
        try:
            got = self.orbax.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(target_tree), data=ocp.args.JsonRestore()
                ),
            )
        except Exception as err:  # orbax/tensorstore raise many types for damaged files
            raise ValueError(f"cannot restore step {step} from {self.directory}: {err}") from err
        s = got["state"]
        if verify:
            where = str(self.directory / str(step))
            verify_tree_digests(record.get("state_digests", MISSING), s, where)
        return from_storable(s, target), dict(got["data"] or {})

    def _base_samples(self, frozen: Any, adapters: dict[str, Any]) -> dict[str, str]:
        """``{path: base_sample}`` of the targeted kernels, kept for the last base object."""
        if frozen is None:
            return {}
        if self._base is None or self._base[0] is not frozen:
            flat = flatten(frozen)
            samples = {p: base_sample(flat[p]) for p in adapters if p in flat}
            self._base = (frozen, samples)
        return self._base[1]

    def _metadata(self, step: int) -> dict[str, Any]:
        args = ocp.args.Composite(meta=ocp.args.JsonRestore())
        try:
            record = self.orbax.restore(step, args=args)["meta"]
        except Exception as err:
            raise ValueError(
                f"step {step} in {self.directory} has no readable metadata: {err}"
            ) from err
        check_record(record, f"step {step} metadata in {self.directory}")
        return record

    def latest_step(self) -> int | None:
        """The newest complete step on disk, or None."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    def all_steps(self) -> list[int]:
        """Every complete step on disk (committed, with every item's files), oldest first."""
        self.orbax.reload()
        return sorted(s for s in self.orbax.all_steps() if complete(self.directory / str(s)))

    def wait_until_finished(self) -> None:
        """Blocks until the last save is fully on disk."""
        self.orbax.wait_until_finished()

    def is_saving(self) -> bool:
        """Whether a background save is still writing."""
        return self.orbax.is_saving_in_progress()

    def close(self) -> None:
        """Waits for pending saves, then releases orbax's resources and deletes the steps
        retention set aside."""
        self.orbax.wait_until_finished()
        self.orbax.close()
        if not self.read_only:
            purge(self.directory)

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
