"""`save_adapter` / `load_adapter`: an adapter alone on disk, with orbax, restorable with no flags.

A saved adapter is a folder: ``arrays/`` (an orbax checkpoint of every ``a`` and ``b``) and
``lora_adapter.json`` (each adapter's layout, kernel shape, rank, scale, dropout rate,
dtype and the SHA-256 digests of its arrays, verified on load; the library and format
versions, a fingerprint of the base and, for information, the config if one was given).
`load_adapter` rebuilds every `LoraWeights` with its own scale, so no config is needed to
use a loaded adapter. The folder is written under a temporary name and renamed into place
only when complete, so a crash never leaves a half-written adapter where a good one was.
The base is never written.

Under ``jax.distributed`` both are collective calls (every process calls them with the same
arguments, on a folder every process sees): the adapters are gathered to the hosts (they are
small), process 0 writes the files, and every process reads them back onto the requested
sharding.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental.multihost_utils import sync_global_devices

from lora_jax.core._config import LoraConfig
from lora_jax.core._packed import is_packed
from lora_jax.core._paths import flatten, nest
from lora_jax.core._weights import flatten_lora
from lora_jax.io._digest import (
    base_sample,
    check_base_values,
    digest,
    host_array,
    verify_digests,
)
from lora_jax.io._metadata import (
    EXTRAS,
    check_base,
    check_record,
    describe,
    weights_from_record,
)

__all__ = ["save_adapter", "load_adapter", "read_metadata", "METADATA_FILE"]

METADATA_FILE = "lora_adapter.json"
ARRAYS = "arrays"


def _sync(name: str) -> None:
    """A barrier across processes under ``jax.distributed`` (nothing in one process)."""
    if jax.process_count() > 1:
        sync_global_devices(name)


def _host_arrays(lora: Any) -> dict[str, np.ndarray]:
    """``{"<path>/a": host copy, ...}``: every factor whole on this host (gathered from the
    other processes where sharded over them)."""
    flat = {}
    for path, w in flatten_lora(lora).items():
        for name in EXTRAS:
            if getattr(w, name) is not None:
                flat[f"{path}/{name}"] = host_array(getattr(w, name))
    return flat


def _default_sharding() -> jax.sharding.Sharding:
    """The first device; under ``jax.distributed``, replicated on every device."""
    if jax.process_count() == 1:
        return jax.sharding.SingleDeviceSharding(jax.devices()[0])
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("devices",))
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def save_adapter(
    path: str | os.PathLike,
    lora: Any,
    *,
    overwrite: bool = False,
    config: LoraConfig | None = None,
    frozen: Any = None,
) -> None:
    """Writes the adapters (never the base) and their metadata to the folder `path`.

    Every adapter's scale, dropout rate, layout and residual norm are stored with it, so
    `load_adapter` needs nothing else. Under ``jax.distributed`` every process calls it;
    process 0 writes.

    Args:
        path: destination folder; its parent must exist.
        lora: the adapters (from `lora_jax.split`, possibly trained).
        overwrite: replace an existing adapter at `path` (atomically: the old one stays
            until the new one is complete).
        config: optional config the adapters were made with, recorded in the metadata for
            information only (a callable `targets` is stored as the exact paths it
            selected); nothing reads it back.
        frozen: optional base the adapters were trained on: a content fingerprint of each
            targeted kernel (a digest of 4096 sampled values) is recorded, so that
            `load_adapter` onto a base of the same shapes but other weights warns; for a
            quantized kernel (`lora_jax.quant`), also how it was stored
            (``base_quantization``: format, group size, grouped axis, double, dtype).

    Raises:
        ValueError: `path` exists and `overwrite` is False.
        TypeError: `lora` holds something other than `LoraWeights`.

    Example:
        >>> import tempfile, jax, jax.numpy as jnp, lora_jax as lj
        >>> config = lj.LoraConfig(rank=2, alpha=16.0, targets="w")
        >>> _, lora = lj.split({"w": jnp.ones((4, 3))}, config, key=jax.random.key(0))
        >>> folder = tempfile.mkdtemp() + "/adapter"
        >>> lj.save_adapter(folder, lora)
        >>> lora = lj.load_adapter(folder)
        >>> lora["w"].scale, lora["w"].rank
        (8.0, 2)
    """
    dest = pathlib.Path(path).absolute()
    if dest.exists() and not overwrite:
        raise ValueError(f"{dest} exists; pass overwrite=True to replace it.")
    record = describe(lora, config)
    base = {} if frozen is None else flatten(frozen)
    arrays = _host_arrays(lora)  # a collective where the adapters span processes
    for p in flatten_lora(lora):
        names = [n for n in EXTRAS if f"{p}/{n}" in arrays]
        record["adapters"][p]["digests"] = {n: digest(arrays[f"{p}/{n}"]) for n in names}
        if p in base:
            record["adapters"][p]["base_sample"] = base_sample(base[p])
            if is_packed(base[p]):  # trained on a quantized base: say how it was stored
                record["adapters"][p]["base_quantization"] = base[p].describe()
    writer = jax.process_index() == 0
    tmp = dest.with_name(f".{dest.name}.tmp")
    if writer:
        shutil.rmtree(tmp, ignore_errors=True)  # a leftover from a crash
        tmp.mkdir()
    _sync("lora_jax_save_adapter_begin")
    with ocp.StandardCheckpointer() as ckptr:  # host arrays: orbax writes them on process 0
        ckptr.save(tmp / ARRAYS, nest(arrays))
        ckptr.wait_until_finished()
    if writer:
        with open(tmp / METADATA_FILE, "w") as f:
            json.dump(record, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        old = dest.with_name(f".{dest.name}.old")
        if dest.exists():
            os.replace(dest, old)
        os.replace(tmp, dest)
        shutil.rmtree(old, ignore_errors=True)
    _sync("lora_jax_save_adapter_end")


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The metadata record of a saved adapter, checked for format and version.

    Args:
        path: the adapter folder written by `save_adapter`.

    Returns:
        The JSON record: ``format``, ``format_version``, ``library_version``,
        ``fingerprint`` (of the base's targeted paths and shapes), ``config`` (None unless
        one was given to `save_adapter`) and ``adapters``: for each path its ``kind``,
        ``in_axes``, ``out_axes``, ``stack_axes``, ``kernel_shape``, ``rank``, ``scale``,
        ``dropout``, ``residual_norm``, ``a_shape``, ``b_shape``, ``dtype`` and ``b_dtype``
        (and ``magnitude_shape``/``magnitude_dtype``, ``bias_shape``/``bias_dtype`` for
        DoRA and lora_bias adapters, null otherwise).

    Raises:
        ValueError: no adapter at `path`, damaged JSON, or another format version.

    Example:
        >>> import tempfile, jax, jax.numpy as jnp, lora_jax as lj
        >>> config = lj.LoraConfig(rank=2, alpha=16.0, targets="w")
        >>> _, lora = lj.split({"w": jnp.ones((4, 3))}, config, key=jax.random.key(0))
        >>> folder = tempfile.mkdtemp() + "/adapter"
        >>> lj.save_adapter(folder, lora)
        >>> record = lj.io.read_metadata(folder)
        >>> record["library_version"], record["adapters"]["w"]["scale"]
        ('0.2.0', 8.0)
    """
    where = pathlib.Path(path).absolute() / METADATA_FILE
    if not where.exists():
        raise ValueError(f"no lora_jax adapter at {where.parent}: {METADATA_FILE} is missing.")
    try:
        record = json.loads(where.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{where} is not valid JSON ({err}); the adapter is damaged.") from err
    check_record(record, str(where))
    return record


def load_adapter(
    path: str | os.PathLike,
    *,
    frozen: Any = None,
    sharding: jax.sharding.Sharding | None = None,
    verify: bool = True,
    strict: bool = False,
) -> dict[str, Any]:
    """Reads an adapter written by `save_adapter`; needs no config.

    Under ``jax.distributed`` every process calls it and reads the files itself.

    Args:
        path: the adapter folder.
        frozen: optional base to check against: every targeted path must exist there with
            the kernel shape the adapter was trained on, and, when the adapter was saved
            with its base (`save_adapter(..., frozen=)`), the same values (a sample of
            each kernel): a base with other weights warns, naming the first kernel.
        sharding: where to put every array (default: the first device; under
            ``jax.distributed``, replicated on every device of every process); for
            per-array placement use `lora_jax.parallel.place` afterwards.
        verify: check every restored array against the SHA-256 digest recorded at save
            (on by default; about 1 s per GB on a CPU core). ``verify=False`` skips it,
            for those who need the speed and trust the storage.
        strict: a base with the right shapes but other values is a ValueError, not a
            warning.

    Returns:
        The adapters: each `LoraWeights` with its stored scale, dropout rate, layout and
        residual norm, ready for `lora_jax.lora_apply` or `lora_jax.merge`.

    Raises:
        ValueError: no adapter at `path`, another format version, a base that does not fit
            (each mismatch listed), or damaged array files (unreadable, or an array whose
            digest differs from the one recorded at save: the message names the array).

    Example:
        >>> import tempfile, jax, jax.numpy as jnp, lora_jax as lj
        >>> config = lj.LoraConfig(rank=2, targets="w")
        >>> frozen, lora = lj.split({"w": jnp.ones((4, 3))}, config, key=jax.random.key(0))
        >>> folder = tempfile.mkdtemp() + "/adapter"
        >>> lj.save_adapter(folder, lora)
        >>> lora2 = lj.load_adapter(folder, frozen=frozen)
        >>> lora2["w"].layout == lora["w"].layout, lora2["w"].scale == lora["w"].scale
        (True, True)
    """
    record = read_metadata(path)
    if frozen is not None:
        check_base(record, flatten(frozen))
        check_base_values(record["adapters"], flatten(frozen), strict)
    sharding = sharding or _default_sharding()
    abstract = {}
    for p, entry in record["adapters"].items():
        dtypes = {"a": entry["dtype"], "b": entry.get("b_dtype", entry["dtype"])}
        for name in ("magnitude", "bias"):
            if entry.get(f"{name}_shape") is not None:
                dtypes[name] = entry[f"{name}_dtype"]
        for name, dtype in dtypes.items():
            shape = tuple(entry[f"{name}_shape"])
            abstract[f"{p}/{name}"] = jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
    where = pathlib.Path(path).absolute() / ARRAYS
    try:
        with ocp.StandardCheckpointer() as ckptr:
            arrays = ckptr.restore(where, nest(abstract))
    except Exception as err:  # orbax/tensorstore raise many types for damaged files
        raise ValueError(f"cannot read the adapter arrays at {where}: {err}") from err
    flat = flatten(arrays)
    if verify:
        verify_digests(record["adapters"], flat, str(where))
    return weights_from_record(record, flat)
