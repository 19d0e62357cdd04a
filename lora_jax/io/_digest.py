"""Digests of array contents: what a saved adapter records so that a damaged array file is
refused on load instead of restoring wrong numbers (orbax's compressed chunks keep no
checksum). SHA-256 of the dtype, shape and bytes: about 1.2 GB/s here (the medium
benchmark adapter, 3.4 MB, in ~3 ms), so verification is on by default."""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from lora_jax.core._packed import unpack

__all__ = [
    "MISSING",
    "SAMPLE",
    "base_sample",
    "check_base_values",
    "digest",
    "host_array",
    "tree_digests",
    "verify_digests",
    "verify_tree_digests",
]

# A step saved before digests were recorded (told apart from one saved with digests=False).
MISSING = "missing"
# Values of each base kernel sampled for its content fingerprint (evenly spaced).
SAMPLE = 4096


def digest(x: Any) -> str:
    """``"sha256:<hex>"`` of an array's dtype, shape and C-order bytes.

    Args:
        x: an array (JAX arrays are copied to the host).

    Returns:
        The digest string.

    Example:
        >>> import numpy as np
        >>> import lora_jax as lj
        >>> lj.io.digest(np.zeros(3, np.float32)) == lj.io.digest(np.zeros(3, np.float32))
        True
    """
    a = np.ascontiguousarray(host_array(x))
    h = hashlib.sha256(f"{a.dtype.str}{a.shape}".encode())
    h.update(a.reshape(-1).view(np.uint8).data)  # no copy of the bytes
    return f"sha256:{h.hexdigest()}"


def verify_digests(
    entries: Mapping[str, Mapping[str, Any]], arrays: Mapping[str, Any], where: str
) -> None:
    """Raises a ValueError naming the first array whose digest differs from the record.

    Args:
        entries: ``{adapter path: metadata entry}``; an entry's ``digests`` maps ``"a"`` /
            ``"b"`` to the digest recorded at save.
        arrays: ``{"<adapter path>/a": array, ...}`` as restored.
        where: the folder the arrays were read from (for the message).
    """
    missing = [p for p, e in entries.items() if "digests" not in e]
    if missing:
        warnings.warn(
            f"{where}: no digests recorded for {missing[:3]} (saved by an older lora_jax); "
            f"their values are not verified. Re-save the adapter to record them.",
            stacklevel=3,
        )
    for path, entry in entries.items():
        for name, want in entry.get("digests", {}).items():
            got = digest(arrays[f"{path}/{name}"])
            if got != want:
                raise ValueError(
                    f"{path}: the restored `{name}` does not match what was saved (its array "
                    f"file under {where} is damaged): digest {got}, recorded {want}. Restore "
                    f"another copy of the adapter."
                )


def host_array(x: Any) -> np.ndarray:
    """The whole value of an array as a NumPy array on this host.

    A global array sharded over other processes' devices is gathered from them
    (`multihost_utils.process_allgather`): a collective, so under ``jax.distributed`` every
    process must call this for the same arrays in the same order (the save and restore
    functions that use it are collective calls).

    Args:
        x: an array (NumPy, or a JAX array local or global).

    Returns:
        The host copy.
    """
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        if x.sharding.is_fully_replicated:
            return np.asarray(x.addressable_data(0))
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def tree_digests(tree: Any) -> dict[str, dict[str, str]]:
    """``{key path: {"digest", "dtype"}}`` of every array leaf of `tree` (for a checkpoint
    step's metadata); leaves sharded over several processes are gathered (`host_array`).

    Args:
        tree: a pytree of arrays.

    Returns:
        The record, keyed by `jax.tree_util.keystr`.

    Example:
        >>> import numpy as np, lora_jax as lj
        >>> record = lj.io.tree_digests({"w": np.zeros(3, np.float32)})
        >>> list(record), record["['w']"]["dtype"]
        (["['w']"], '<f4')
    """
    out = {}
    for kp, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        host = host_array(leaf)
        out[jax.tree_util.keystr(kp)] = {"digest": digest(host), "dtype": host.dtype.str}
    return out


def verify_tree_digests(
    recorded: Mapping[str, Mapping[str, str]] | str | None, tree: Any, where: str
) -> None:
    """Raises a ValueError naming the first leaf of `tree` whose digest differs from
    `recorded` (leaves restored to another dtype are skipped).

    Args:
        recorded: from `tree_digests` at save; None for a step saved without digests (not
            verified), `MISSING` for one saved by an older version (warns).
        tree: the restored pytree.
        where: the step folder (for the message).

    Raises:
        ValueError: a leaf's digest differs from the one recorded.

    Example:
        >>> import numpy as np, lora_jax as lj
        >>> tree, other = {"w": np.zeros(3, np.float32)}, {"w": np.ones(3, np.float32)}
        >>> lj.io.verify_tree_digests(lj.io.tree_digests(tree), tree, "here")  # silent
        >>> try:
        ...     lj.io.verify_tree_digests(lj.io.tree_digests(tree), other, "there")
        ... except ValueError as err:
        ...     print(str(err)[:45])
        state['w']: the restored array does not match
    """
    if recorded is None:
        return
    if isinstance(recorded, str):
        warnings.warn(
            f"{where}: no digests recorded (saved by an older lora_jax); its values are not "
            f"verified.",
            stacklevel=3,
        )
        return
    for kp, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        key = jax.tree_util.keystr(kp)
        want = recorded.get(key)
        if want is None:
            continue
        host = host_array(leaf)
        if host.dtype.str != want["dtype"]:
            continue
        got = digest(host)
        if got != want["digest"]:
            raise ValueError(
                f"state{key}: the restored array does not match what was saved (its file "
                f"under {where} is damaged): digest {got}, recorded {want['digest']}. "
                f"Restore an earlier step."
            )


def base_sample(kernel: Any) -> str:
    """A content fingerprint of a base kernel: the digest of `SAMPLE` evenly spaced values,
    rounded to bfloat16 (so the same weights in float32 or bfloat16 agree, while another
    fine-tune of the architecture differs). Cheap for any size: only the sample leaves the
    device.

    Args:
        kernel: the base kernel.

    Returns:
        The digest string.

    Example:
        >>> import jax.numpy as jnp, lora_jax as lj
        >>> w = jnp.linspace(-1.0, 1.0, 10_000).reshape(100, 100)
        >>> lj.io.base_sample(w) == lj.io.base_sample(w.astype(jnp.bfloat16))
        True
    """
    flat = jax.numpy.ravel(unpack(kernel))  # a quantized kernel: its float values
    idx = np.linspace(0, flat.size - 1, min(flat.size, SAMPLE)).astype(np.int64)
    return digest(flat[idx].astype(jax.numpy.bfloat16))


def check_base_values(
    entries: Mapping[str, Mapping[str, Any]], frozen_flat: Mapping[str, Any], strict: bool
) -> None:
    """Warns (or, with `strict`, raises a ValueError) naming the first targeted kernel whose
    values differ from the base the adapter was saved with.

    Args:
        entries: the adapter record's entries (``base_sample`` where recorded).
        frozen_flat: the base, flattened.
        strict: raise instead of warning.
    """
    for path, entry in entries.items():
        want = entry.get("base_sample")
        if want is None or path not in frozen_flat:
            continue
        if base_sample(frozen_flat[path]) != want:
            message = (
                f"{path}: the base's values differ from those this adapter was saved with "
                f"(same shapes; another fine-tune or checkpoint of the architecture?). The "
                f"adapter was trained for the other weights."
            )
            if strict:
                raise ValueError(message + " (strict=True)")
            warnings.warn(message + " Pass strict=True to make this an error.", stacklevel=3)
            return
