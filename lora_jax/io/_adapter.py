"""`save_adapter` / `load_adapter`: an adapter alone on disk, with orbax, restorable with no flags.

A saved adapter is a folder: ``arrays/`` (an orbax checkpoint of every ``a`` and ``b``) and
``lora_adapter.json`` (the `LoraConfig`, each adapter's layout and kernel shape, the library
and format versions, a fingerprint of the base). The folder is written under a temporary
name and renamed into place only when complete, so a crash never leaves a half-written
adapter where a good one was. The base is never written.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
from typing import Any

import jax
import orbax.checkpoint as ocp

from lora_jax.core import _paths
from lora_jax.io import _metadata as metadata
from lora_jax.core._config import LoraConfig
from lora_jax.core._weights import LoraWeights, flatten_lora

__all__ = ["save_adapter", "load_adapter", "METADATA_FILE"]

METADATA_FILE = "lora_adapter.json"
_ARRAYS = "arrays"


def _single_process(what: str) -> None:
    if jax.process_count() > 1:
        raise ValueError(
            f"{what} is a single-process call; under jax.distributed use lj.CheckpointManager, "
            f"which every process calls."
        )


def _arrays_tree(lora: Any) -> dict[str, Any]:
    flat = {}
    for path, w in flatten_lora(lora).items():
        flat[f"{path}/a"], flat[f"{path}/b"] = w.a, w.b
    return _paths.nest(flat)


def save_adapter(
    path: str | os.PathLike, lora: Any, config: LoraConfig, *, overwrite: bool = False
) -> None:
    """Writes the adapters (never the base) and their metadata to the folder `path`.

    Args:
        path: destination folder; its parent must exist.
        lora: the adapters (from `lora_jax.split`, possibly trained).
        config: the config they were made with; stored as JSON (a callable `targets` is
            stored as the exact paths it selected).
        overwrite: replace an existing adapter at `path` (atomically: the old one stays
            until the new one is complete).

    Raises:
        ValueError: `path` exists and `overwrite` is False, or this is a multi-process run.

    Example:
        >>> import tempfile, jax, jax.numpy as jnp, lora_jax as lj
        >>> config = lj.LoraConfig(rank=2, targets="w")
        >>> _, lora = lj.split({"w": jnp.ones((4, 3))}, config, key=jax.random.key(0))
        >>> folder = tempfile.mkdtemp() + "/adapter"
        >>> lj.save_adapter(folder, lora, config)
        >>> loaded, loaded_config = lj.load_adapter(folder)
        >>> loaded_config == config, bool((loaded["w"].a == lora["w"].a).all())
        (True, True)
    """
    _single_process("save_adapter")
    dest = pathlib.Path(path).absolute()
    if dest.exists() and not overwrite:
        raise ValueError(f"{dest} exists; pass overwrite=True to replace it.")
    record = metadata.describe(lora, config)
    tmp = dest.with_name(f".{dest.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # a leftover from a crash
    tmp.mkdir()
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(tmp / _ARRAYS, _arrays_tree(lora))
        ckptr.wait_until_finished()
    with open(tmp / METADATA_FILE, "w") as f:
        json.dump(record, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    old = dest.with_name(f".{dest.name}.old")
    if dest.exists():
        os.replace(dest, old)
    os.replace(tmp, dest)
    shutil.rmtree(old, ignore_errors=True)


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The metadata record of a saved adapter, checked for format and version."""
    where = pathlib.Path(path).absolute() / METADATA_FILE
    if not where.exists():
        raise ValueError(f"no lora_jax adapter at {where.parent}: {METADATA_FILE} is missing.")
    try:
        record = json.loads(where.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{where} is not valid JSON ({err}); the adapter is damaged.") from err
    metadata.check_record(record, str(where))
    return record


def load_adapter(
    path: str | os.PathLike,
    frozen: Any = None,
    *,
    config: LoraConfig | None = None,
    sharding: jax.sharding.Sharding | None = None,
) -> tuple[dict[str, Any], LoraConfig]:
    """Reads an adapter written by `save_adapter`; needs no config.

    Args:
        path: the adapter folder.
        frozen: optional base to check against: every targeted path must exist there with
            the kernel shape the adapter was trained on.
        config: optional config; its ranks must match the stored ones.
        sharding: where to put the arrays (default: the first device).

    Returns:
        ``(lora, config)``: the adapters and the stored config.

    Raises:
        ValueError: no adapter at `path`, an unknown format version, a base or config that
            does not fit (each mismatch listed), or damaged array files.

    Example:
        >>> import tempfile, jax, jax.numpy as jnp, lora_jax as lj
        >>> config = lj.LoraConfig(rank=2, targets="w")
        >>> frozen, lora = lj.split({"w": jnp.ones((4, 3))}, config, key=jax.random.key(0))
        >>> folder = tempfile.mkdtemp() + "/adapter"
        >>> lj.save_adapter(folder, lora, config)
        >>> lora2, _ = lj.load_adapter(folder, frozen)
        >>> lora2["w"].layout == lora["w"].layout
        True
    """
    _single_process("load_adapter")
    record = read_metadata(path)
    if frozen is not None:
        metadata.check_base(record, _paths.flatten(frozen))
    if config is not None:
        metadata.check_config(record, config)
    sharding = sharding or jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = {}
    for p, entry in record["adapters"].items():
        for name in ("a", "b"):
            shape = tuple(entry[f"{name}_shape"])
            abstract[f"{p}/{name}"] = jax.ShapeDtypeStruct(shape, entry["dtype"], sharding=sharding)
    where = pathlib.Path(path).absolute() / _ARRAYS
    try:
        with ocp.StandardCheckpointer() as ckptr:
            arrays = ckptr.restore(where, _paths.nest(abstract))
    except Exception as err:  # orbax/tensorstore raise many types for damaged files
        raise ValueError(f"cannot read the adapter arrays at {where}: {err}") from err
    flat = _paths.flatten(arrays)
    adapters = {}
    for p, entry in record["adapters"].items():
        a, b = flat[f"{p}/a"], flat[f"{p}/b"]
        if tuple(a.shape) != tuple(entry["a_shape"]) or tuple(b.shape) != tuple(entry["b_shape"]):
            raise ValueError(f"{p}: stored arrays do not have the shapes the metadata records.")
        adapters[p] = LoraWeights(a, b, metadata.layout_of(entry))
    return _paths.nest(adapters), config or metadata.config_from_json(record["config"])
