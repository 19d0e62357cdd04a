"""Which step folders of a checkpoint directory are complete, and removing what a kill left
behind (steps set aside by retention, step folders missing part of their files)."""

from __future__ import annotations

import os
import pathlib
import shutil
import uuid

import jax
from jax.experimental.multihost_utils import sync_global_devices

__all__ = ["DELETED", "complete", "purge", "remove_leftovers"]

# Where retention moves a step before deleting it; emptied when the folder is opened/closed.
DELETED = "_deleted"
# What a complete step holds (orbax writes the step under a temporary name and renames it
# into place when every item is written; these are read to list and restore it).
_REQUIRED = (
    "_CHECKPOINT_METADATA",
    "state/_METADATA",
    "state/manifest.ocdbt",
    "data/metadata",
    "meta/metadata",
)


def complete(step_dir: pathlib.Path) -> bool:
    """Whether a step folder holds every file a restore reads (not only a committed name)."""
    return all((step_dir / name).is_file() for name in _REQUIRED)


def purge(directory: pathlib.Path) -> None:
    """Deletes the steps retention set aside (process 0; a kill midway leaves them aside,
    never listed, for the next purge)."""
    if jax.process_index() == 0:
        shutil.rmtree(directory / DELETED, ignore_errors=True)


def remove_leftovers(directory: pathlib.Path) -> None:
    """On opening for writing: deletes what a kill left behind: steps set aside by
    retention, orbax's temporary folders of a save cut short, and step folders under their
    final name that lack part of their files (a deletion cut short by an older version).
    Process 0 only; the others wait for it. Each is first moved aside (one rename), so a
    kill during the cleanup leaves nothing listed."""
    if jax.process_index() == 0 and directory.is_dir():
        for entry in directory.iterdir():
            partial = entry.name.isdigit() and not complete(entry)
            aside = ".orbax-checkpoint-tmp" in entry.name or entry.name.endswith(".partial")
            if entry.is_dir() and (partial or aside):
                (directory / DELETED).mkdir(exist_ok=True)
                os.replace(entry, directory / DELETED / f"{entry.name}.{uuid.uuid4().hex}")
        purge(directory)
    if jax.process_count() > 1:
        sync_global_devices("lora_jax_checkpoint_open")
