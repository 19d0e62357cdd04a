"""Placing a LoRA training state on devices: pmap replicas, and mesh shardings.

- pmap (classic data parallel): `replicate` / `unreplicate` the state and the frozen base,
  `shard_batch` splits a batch across the local devices.
- mesh (`jax.jit` with `NamedSharding`): `mesh_shardings` gives the batch a data-parallel
  sharding, the frozen base either replicated or sharded over an FSDP axis (largest
  divisible dimension), and each adapter the sharding of its base weight's input/output
  axes, with the rank axis replicated.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lora_jax.core import _paths
from lora_jax.core._weights import LoraWeights, flatten_lora

__all__ = ["replicate", "unreplicate", "shard_batch", "MeshShardings", "mesh_shardings", "place"]

_is_lora = lambda x: isinstance(x, LoraWeights)


def _device_mesh(devices: Sequence[jax.Device]) -> Mesh:
    return Mesh(np.asarray(devices), ("devices",))


def replicate(tree: Any, devices: Sequence[jax.Device] | None = None) -> Any:
    """One copy of every leaf per local device, stacked on a new leading axis (for pmap).

    Args:
        tree: a pytree of arrays (a `TrainState`, the frozen base).
        devices: the devices; defaults to `jax.local_devices()`.

    Returns:
        The pytree with each leaf of shape ``(n_devices, *shape)``, one slice per device.

    Example:
        >>> import jax, jax.numpy as jnp, lora_jax as lj
        >>> lj.replicate({"w": jnp.ones(3)})["w"].shape[1:]
        (3,)
    """
    devices = list(devices or jax.local_devices())
    sharding = NamedSharding(_device_mesh(devices), PartitionSpec("devices"))

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
        >>> w = lj.unreplicate(lj.replicate({"w": jnp.ones(3)}))["w"]
        >>> w.shape, len(w.devices())
        ((3,), 1)
    """
    return jax.tree.map(_first_replica, tree)


def _first_replica(x: Any) -> Any:
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
        >>> lj.shard_batch(jnp.zeros((2 * n, 5))).shape == (n, 2, 5)
        True
    """
    n = num_devices or jax.local_device_count()
    check_divisible(batch, n, f"{n} devices; use a batch size that is a multiple of {n}")
    devices = jax.local_devices()[:n]
    sharding = NamedSharding(_device_mesh(devices), PartitionSpec("devices"))
    return jax.tree.map(
        lambda x: jax.device_put(jnp.reshape(x, (n, -1, *np.shape(x)[1:])), sharding), batch
    )


def check_divisible(batch: Any, n: int, why: str) -> None:
    """A ValueError naming the leaf when a batch's leading size is not a multiple of `n`."""
    for path, x in _paths.flatten(batch).items():
        size = np.shape(x)[0] if np.ndim(x) else None
        if size is None or size % n:
            raise ValueError(
                f"batch leaf {path or '<root>'!r} has leading size {size}, which is not "
                f"divisible by {n} ({why})."
            )


class MeshShardings(NamedTuple):
    """Shardings of a LoRA training run on a mesh (pytrees of `NamedSharding`).

    Attributes:
        frozen: for the frozen base.
        lora: for the adapters (each follows its base weight; rank axis replicated).
        batch: for a batch leaf (leading axis over the data axes).
        replicated: for scalars and everything small.

    Example:
        >>> import jax, jax.numpy as jnp, lora_jax as lj
        >>> from jax.sharding import Mesh
        >>> mesh = Mesh(jax.devices()[:1], ("data",))
        >>> params = {"w": jnp.ones((4, 3))}
        >>> config = lj.LoraConfig(rank=2, targets="w")
        >>> frozen, lora = lj.split(params, config, key=jax.random.key(0))
        >>> lj.mesh_shardings(mesh, frozen, lora).lora["w"].b.spec
        P(None, None)
    """

    frozen: Any
    lora: Any
    batch: NamedSharding
    replicated: NamedSharding


def _fsdp_spec(shape: tuple[int, ...], size: int, axis: str, min_size: int) -> PartitionSpec:
    """Shards the largest dimension divisible by `size`; small or indivisible leaves stay whole."""
    if int(np.prod(shape)) < min_size:
        return PartitionSpec()
    candidates = [i for i, d in enumerate(shape) if d % size == 0]
    if not candidates:
        return PartitionSpec()
    best = max(candidates, key=lambda i: shape[i])
    return PartitionSpec(*(axis if i == best else None for i in range(len(shape))))


def _adapter_specs(spec: PartitionSpec, w: LoraWeights) -> tuple[PartitionSpec, PartitionSpec]:
    """Moves a kernel's sharded axes onto a (stack, in, r) and b (stack, r, out)."""
    full = tuple(spec) + (None,) * (w.layout.ndim - len(spec))
    lay = w.layout
    stack = tuple(full[i] for i in lay.stack_axes)
    a = (*stack, *(full[i] for i in lay.in_axes), None)
    b = (*stack, None, *(full[i] for i in lay.out_axes))
    return PartitionSpec(*a), PartitionSpec(*b)


def mesh_shardings(
    mesh: Mesh,
    frozen: Any,
    lora: Any,
    *,
    data_axis: str | tuple[str, ...] = "data",
    fsdp_axis: str | None = None,
    fsdp_min_size: int = 2**12,
) -> MeshShardings:
    """Shardings for the frozen base, the adapters and the batch on `mesh`.

    Args:
        mesh: a `jax.sharding.Mesh`.
        frozen: the frozen base (arrays or `jax.ShapeDtypeStruct`).
        lora: the adapters.
        data_axis: mesh axis (or axes) the batch is split over.
        fsdp_axis: mesh axis to shard the base over (largest divisible dimension of each
            leaf of at least `fsdp_min_size` elements); None keeps the base replicated. The
            batch is split over this axis too.
        fsdp_min_size: leaves smaller than this stay replicated.

    Returns:
        A `MeshShardings`.

    Raises:
        ValueError: an axis is not in the mesh.

    Example:
        >>> import jax, jax.numpy as jnp, lora_jax as lj
        >>> from jax.sharding import Mesh
        >>> mesh = Mesh(jax.devices()[:1], ("data",))
        >>> params = {"params": {"fc": {"kernel": jnp.ones((4, 3))}}}
        >>> config = lj.LoraConfig(rank=2, targets=".*/kernel")
        >>> frozen, lora = lj.split(params, config, key=jax.random.key(0))
        >>> lj.mesh_shardings(mesh, frozen, lora).batch.spec
        P('data',)
    """
    batch_axes = check_axes(mesh, data_axis, fsdp_axis)
    named = lambda spec: NamedSharding(mesh, spec)
    if fsdp_axis:
        size = mesh.shape[fsdp_axis]
        frozen_specs = jax.tree.map(
            lambda x: _fsdp_spec(tuple(np.shape(x)), size, fsdp_axis, fsdp_min_size), frozen
        )
    else:
        frozen_specs = jax.tree.map(lambda x: PartitionSpec(), frozen)
    spec_by_path = _paths.flatten(frozen_specs, is_leaf=lambda x: isinstance(x, PartitionSpec))
    lora_specs = {}
    for path, w in flatten_lora(lora).items():
        a, b = _adapter_specs(spec_by_path.get(path, PartitionSpec()), w)
        lora_specs[path] = LoraWeights(named(a), named(b), w.layout)
    return MeshShardings(
        frozen=jax.tree.map(named, frozen_specs, is_leaf=lambda x: isinstance(x, PartitionSpec)),
        lora=jax.tree_util.tree_map_with_path(
            lambda kp, w: lora_specs[_paths.path_str(kp)], lora, is_leaf=_is_lora
        ),
        batch=named(PartitionSpec(batch_axes if len(batch_axes) > 1 else batch_axes[0])),
        replicated=named(PartitionSpec()),
    )


def opt_state_shardings(
    optimizer: optax.GradientTransformation,
    opt_state: Any,
    lora_shardings: Any,
    replicated: NamedSharding,
) -> Any:
    """Each parameter-shaped part of the optimizer state takes its adapter's sharding."""
    return optax.tree_utils.tree_map_params(
        optimizer,
        lambda _, s: s,
        opt_state,
        lora_shardings,
        transform_non_params=lambda _: replicated,
        is_leaf=lambda x: isinstance(x, NamedSharding),
    )


def check_axes(
    mesh: Mesh, data_axis: str | tuple[str, ...], fsdp_axis: str | None
) -> tuple[str, ...]:
    """The mesh axes a batch is split over; a ValueError for an axis the mesh lacks."""
    data = (data_axis,) if isinstance(data_axis, str) else tuple(data_axis)
    axes = (*data, *((fsdp_axis,) if fsdp_axis else ()))
    for name in axes:
        if name not in mesh.axis_names:
            raise ValueError(f"mesh has no axis {name!r}; its axes are {mesh.axis_names}.")
    return axes


def batch_ways(mesh: Mesh, data_axis: str | tuple[str, ...], fsdp_axis: str | None) -> int:
    """Into how many shards the global batch is split."""
    return int(np.prod([mesh.shape[a] for a in check_axes(mesh, data_axis, fsdp_axis)]))


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
    passes the same host value and places its own shards. Place the frozen base once with
    ``lj.place(frozen, lj.mesh_shardings(mesh, frozen, lora).frozen)`` and hand the placed
    tree to every mesh step, so it is not copied again each step.

    Args:
        tree: a pytree of arrays (host or device).
        shardings: a pytree of `NamedSharding` with the structure of `tree` (or a prefix).

    Returns:
        The tree with every leaf a `jax.Array` on its sharding.

    Example:
        >>> import jax, jax.numpy as jnp, lora_jax as lj
        >>> from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
        >>> mesh = Mesh(jax.devices()[:1], ("data",))
        >>> placed = lj.place({"w": jnp.ones(4)}, {"w": NamedSharding(mesh, P())})
        >>> placed["w"].sharding.spec
        P()
    """
    return jax.tree.map(_place_leaf, tree, shardings)


def place_batch(batch: Any, shardings: Any) -> Any:
    """Assembles the global batch from each process's local slice."""

    def put(x: Any, sharding: NamedSharding) -> jax.Array:
        if isinstance(x, jax.Array) and x.sharding == sharding:
            return x
        return jax.make_array_from_process_local_data(sharding, np.asarray(x))

    return jax.tree.map(put, batch, shardings)
