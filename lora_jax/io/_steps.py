"""Which step folders of a checkpoint directory are complete, and removing what a kill left
behind (steps set aside by retention, step folders missing part of their files)."""

from __future__ import annotations

import os
import pathlib
import shutil

import jax
from jax.experimental.multihost_utils import sync_global_devices

__all__ = ["DELETED", "complete", "remove_leftovers"]

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


def remove_leftovers(directory: pathlib.Path) -> None:
    """On opening: deletes what a kill left behind: steps set aside by retention, and step
    folders under their final name that lack part of their files (a deletion cut short by
    an older version). Process 0 only; the others wait for it."""
    if jax.process_index() == 0 and directory.is_dir():
        shutil.rmtree(directory / DELETED, ignore_errors=True)
        for step_dir in directory.iterdir():
            if step_dir.name.isdigit() and step_dir.is_dir() and not complete(step_dir):
                aside = directory / f".{step_dir.name}.partial"
                os.replace(step_dir, aside)
                shutil.rmtree(aside, ignore_errors=True)
    if jax.process_count() > 1:
        sync_global_devices("lora_jax_checkpoint_open")
