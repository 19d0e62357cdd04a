"""Placing trees on devices, and reading them back.

- pmap (classic data parallel): `replicate` / `unreplicate` the state and the frozen base,
  `shard_batch` splits a batch across the local devices.
- mesh: `place` puts a tree on its shardings (`lora_jax.parallel.mesh_shardings`), across
  processes too; `assemble_batch` builds the global batch from each process's slice;
  `local_copy` reads one whole copy back on this process.

The strategies of `lora_jax.parallel` (`jit`, `pmap`, `mesh`) are built from these.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lora_jax.core._paths import flatten

__all__ = ["place", "replicate", "shard_batch", "unreplicate"]

DEVICE_AXIS = "devices"


def _device_sharding(devices: Sequence[jax.Device]) -> NamedSharding:
    return NamedSharding(Mesh(np.asarray(devices), (DEVICE_AXIS,)), PartitionSpec(DEVICE_AXIS))


def replicate(tree: Any, devices: Sequence[jax.Device] | None = None) -> Any:
    """One copy of every leaf per local device, stacked on a new leading axis (for pmap).

    Args:
        tree: a pytree of arrays (a `TrainState`, the frozen base).
        devices: the devices; defaults to `jax.local_devices()`.

    Returns:
        The pytree with each leaf of shape ``(n_devices, *shape)``, one slice per device.

    Example:
        >>> import jax, jax.numpy as jnp, lora_jax as lj
        >>> lj.parallel.replicate({"w": jnp.ones(3)})["w"].shape[1:]
        (3,)
    """
    devices = list(devices or jax.local_devices())
    sharding = _device_sharding(devices)

    def put(x: Any) -> jax.Array:
        x = jnp.asarray(x)
        parts = [jax.device_put(x[None], d) for d in devices]
        return jax.make_array_from_single_device_arrays((len(devices), *x.shape), sharding, parts)

    return jax.tree.map(put, tree)


def unreplicate(tree: Any) -> Any:
    """The first replica of every leaf (inverse of `replicate`), on one device.

    Each leaf is the first local device's own copy, so the result mixes freely with
    single-device arrays under `jax.jit` (indexing ``x[0]`` would keep the array spread over
    every device, which jit refuses to combine with arrays on one device).

    Args:
        tree: a replicated pytree.

    Returns:
        The pytree without the leading device axis.

    Example:
        >>> import jax.numpy as jnp, lora_jax as lj
        >>> w = lj.parallel.unreplicate(lj.parallel.replicate({"w": jnp.ones(3)}))["w"]
        >>> w.shape, len(w.devices())
        ((3,), 1)
    """
    return jax.tree.map(first_replica, tree)


def first_replica(x: Any) -> Any:
    """The first local device's slice of a replicated leaf, as a single-device array."""
    if not isinstance(x, jax.Array):
        return x[0]
    shard = x.addressable_data(0)
    return shard[0] if shard.ndim == x.ndim else shard


def shard_batch(batch: Any, num_devices: int | None = None) -> Any:
    """Splits the leading (batch) axis across devices: ``(B, ...) -> (n, B // n, ...)``.

    Args:
        batch: a pytree of arrays with a common leading batch axis.
        num_devices: how many devices; defaults to `jax.local_device_count()`.

    Returns:
        The reshaped pytree, each leaf placed one slice per device.

    Raises:
        ValueError: a leaf's batch size is not divisible by the device count.

    Example:
        >>> import jax, jax.numpy as jnp, lora_jax as lj
        >>> n = jax.local_device_count()
        >>> lj.parallel.shard_batch(jnp.zeros((2 * n, 5))).shape == (n, 2, 5)
        True
    """
    n = num_devices or jax.local_device_count()
    return split_over(batch, jax.local_devices()[:n])


def split_over(batch: Any, devices: Sequence[jax.Device]) -> Any:
    """`shard_batch` onto the given devices (one slice each, in order)."""
    n = len(devices)
    check_divisible(batch, n, f"{n} devices; use a batch size that is a multiple of {n}")
    sharding = _device_sharding(devices)
    return jax.tree.map(
        lambda x: jax.device_put(jnp.reshape(x, (n, -1, *np.shape(x)[1:])), sharding), batch
    )


def check_divisible(batch: Any, n: int, why: str) -> None:
    """A ValueError naming the leaf when a batch's leading size is not a multiple of `n`."""
    for path, x in flatten(batch).items():
        size = np.shape(x)[0] if np.ndim(x) else None
        if size is None or size % n:
            raise ValueError(
                f"batch leaf {path or '<root>'!r} has leading size {size}, which is not "
                f"divisible by {n} ({why})."
            )


def signature(*trees: Any) -> tuple[Any, ...]:
    """The structure and shapes of some trees: what decides whether a step compiles anew."""
    return jax.tree.structure(trees), tuple(np.shape(x) for x in jax.tree.leaves(trees))


def _place_leaf(x: Any, sharding: NamedSharding) -> jax.Array:
    if isinstance(x, jax.Array) and x.sharding == sharding:
        return x
    if isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        data = _place_leaf(jax.random.key_data(x), sharding)
        return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
    if sharding.is_fully_addressable:
        return jax.device_put(x, sharding)
    host = np.asarray(x)  # every process holds the same value: each one places its shards
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def place(tree: Any, shardings: Any) -> Any:
    """Puts every leaf on its sharding; a no-op for leaves already there.

    Works under `jax.distributed` too: when the sharding spans processes, every process
    passes the same host value and places its own shards. The mesh strategy's
    ``place_frozen`` does this for the frozen base (`lora_jax.parallel.mesh`).

    Args:
        tree: a pytree of arrays (host or device).
        shardings: a pytree of `NamedSharding` with the structure of `tree` (or a prefix).

    Returns:
        The tree with every leaf a `jax.Array` on its sharding.

    Example:
        >>> import jax, jax.numpy as jnp, lora_jax as lj
        >>> from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
        >>> mesh = Mesh(jax.devices()[:1], ("data",))
        >>> placed = lj.parallel.place({"w": jnp.ones(4)}, {"w": NamedSharding(mesh, P())})
        >>> placed["w"].sharding.spec
        P()
    """
    return jax.tree.map(_place_leaf, tree, shardings)


def assemble_batch(batch: Any, sharding: NamedSharding) -> Any:
    """The global batch on `sharding`, assembled from each process's local slice."""

    def put(x: Any) -> jax.Array:
        if isinstance(x, jax.Array) and x.sharding == sharding:
            return x
        return jax.make_array_from_process_local_data(sharding, np.asarray(x))

    return jax.tree.map(put, batch)


def local_copy(x: Any, device: jax.Device) -> Any:
    """The whole value of a placed leaf as an array on `device` (one of this process's):
    a replicated leaf's own shard, or its shards gathered (across processes a collective:
    every process calls it)."""
    if not isinstance(x, jax.Array):
        return x
    if x.is_fully_replicated:
        shard = x.addressable_data(0)
        return shard if shard.devices() == {device} else jax.device_put(shard, device)
    if not x.is_fully_addressable:
        x = multihost_utils.process_allgather(x, tiled=True)
    return jax.device_put(x, device)
