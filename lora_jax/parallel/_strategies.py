"""Strategies as values: how a training step is compiled and where its arrays live.

A `Strategy` is a NamedTuple of pure functions, as an optax `GradientTransformation` is:
`jit()`, `pmap()` and `mesh(...)` build one, and `lora_jax.make_train_step` or a training
loop only call its fields; nothing switches on a strategy's name.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np
from jax.sharding import Mesh

from lora_jax.core._packed import is_packed
from lora_jax.core._paths import flatten
from lora_jax.core._weights import check_fits, flatten_lora, unstacked_shapes
from lora_jax.parallel._placement import (
    DEVICE_AXIS,
    assemble_batch,
    check_divisible,
    local_copy,
    place,
    replicate,
    signature,
    split_over,
    unreplicate,
)
from lora_jax.parallel._shardings import (
    MeshShardings,
    check_axes,
    mesh_shardings,
    state_shardings,
)

__all__ = ["Strategy", "jit", "mesh", "pmap"]

Update = Callable[[Any, Any, Any], tuple[Any, Any]]


class Strategy(NamedTuple):
    """How to run a training step: compile it, place its inputs, read its outputs.

    Build one with `jit`, `pmap` or `mesh` and hand it to `lora_jax.make_train_step`; a
    training loop calls the same fields to place the state, base and batches and to read
    results back, so it never switches on the strategy either.

    Attributes:
        check: ``check(state, frozen, batch, accum_steps)`` raises a ValueError naming the
            leaf when the inputs are not in the form the step takes (pmap: a leading device
            axis; mesh: a batch that splits over its shards and micro-batches).
        compile: ``compile(update, donate) -> step``: compiles
            ``update(state, frozen, batch) -> (state, metrics)``; with `donate` the old
            state's buffers are donated. The mesh step places its inputs itself.
        place_state: ``place_state(state, frozen)``: the state as the step takes it
            (pmap: one replica per device; mesh: each adapter and its optimizer slots
            sharded like its base kernel, the rest replicated).
        place_frozen: ``place_frozen(frozen)``: the base as the step takes it; place it
            once and hand the result to every step.
        place_batch: ``place_batch(batch)``: this process's batch as the step takes it
            (pmap: split over the devices; mesh: the global batch, assembled from every
            process's slice).
        gather: ``gather(tree)``: one host-local copy of a placed tree, on one device
            (pmap: the first replica; mesh: the whole value, all-gathered when sharded
            across processes, so every process calls it together).
        metrics: ``metrics(m)``: the step's metrics as one value each.
        axis_name: the collective axis `update` averages over (pmap), or None.

    Example:
        >>> import lora_jax as lj
        >>> strategy = lj.parallel.jit()
        >>> strategy.axis_name is None, callable(strategy.compile)
        (True, True)
    """

    check: Callable[[Any, Any, Any, int], None]
    compile: Callable[[Update, bool], Update]
    place_state: Callable[[Any, Any], Any]
    place_frozen: Callable[[Any], Any]
    place_batch: Callable[[Any], Any]
    gather: Callable[[Any], Any]
    metrics: Callable[[Any], Any]
    axis_name: str | None


def _same(tree: Any) -> Any:
    return tree


def _donated(donate: bool) -> tuple[int, ...]:
    return (0,) if donate else ()


def _commit_like(state: Any, frozen: Any) -> Any:
    """`state` committed to the device of the base (the first committed array of `frozen`),
    else to the default device: the step's outputs are committed, so a first call on an
    uncommitted state beside a committed base would compile the step a second time."""
    arrays = (x for x in jax.tree.leaves(frozen) if isinstance(x, jax.Array))
    committed = (x for x in arrays if x.committed and len(x.devices()) == 1)
    device = next((next(iter(x.devices())) for x in committed), jax.devices()[0])
    return jax.device_put(state, device)


def jit() -> Strategy:
    """One device: `jax.jit`, the state, base and batch passed as they are.

    ``place_state`` commits the state to the base's device (the default device when the
    base is not committed to one), so the step compiles once: its outputs are committed.

    Returns:
        A `Strategy`.

    Example:
        >>> import jax, jax.numpy as jnp, optax, lora_jax as lj
        >>> frozen, lora = lj.split({"w": jnp.eye(4)}, lj.LoraConfig(rank=2, targets="w"),
        ...                         key=jax.random.key(0))
        >>> def loss_fn(frozen, lora, batch, key):
        ...     return jnp.mean((batch @ lj.merge(frozen, lora)["w"]) ** 2)
        >>> tx = optax.sgd(0.1)
        >>> step = lj.make_train_step(loss_fn, tx, strategy=lj.parallel.jit())
        >>> state = lj.TrainState.create(lora, tx, key=jax.random.key(1))
        >>> state, metrics = step(state, frozen, jnp.ones((8, 4)))
        >>> int(state.step)
        1
    """

    def check(state: Any, frozen: Any, batch: Any, accum_steps: int) -> None:
        if accum_steps > 1:
            check_divisible(batch, accum_steps, f"accum_steps={accum_steps}")

    def compile(update: Update, donate: bool) -> Update:
        return jax.jit(update, donate_argnums=_donated(donate))

    return Strategy(
        check=check,
        compile=compile,
        place_state=_commit_like,
        place_frozen=jax.device_put,
        place_batch=_same,
        gather=_same,
        metrics=_same,
        axis_name=None,
    )


def _check_leading(tree: Any, name: str, n: int, hint: str) -> None:
    for path, x in flatten(tree).items():
        if is_packed(x):  # its stored arrays carry the device axis, not its float shape
            x = jax.tree.leaves(x)[0]
        lead = np.shape(x)[0] if np.ndim(x) else None
        if lead != n:
            raise ValueError(
                f"{name} leaf {path or '<root>'!r} has leading axis {lead}; the pmap step needs "
                f"{n} (one slice per local device). {hint}"
            )


def pmap(devices: Sequence[jax.Device] | None = None) -> Strategy:
    """Classic data parallel with `jax.pmap`: a replica of the state and base per device.

    Gradients, loss and metrics are averaged over the devices with `lax.pmean`; with
    dropout each device folds its index into the step's key. Under `jax.distributed` the
    step spans every process's devices (each process passes its own slice of the batch).

    Args:
        devices: the local devices to run on; None (the default) uses every local device,
            looked up when first needed (so building the strategy starts no backend).

    Returns:
        A `Strategy`: ``place_state`` / ``place_frozen`` replicate, ``place_batch`` splits
        the batch's leading axis over the devices, ``gather`` and ``metrics`` take the
        first replica.

    Example:
        >>> import jax, jax.numpy as jnp, optax, lora_jax as lj
        >>> frozen, lora = lj.split({"w": jnp.eye(4)}, lj.LoraConfig(rank=2, targets="w"),
        ...                         key=jax.random.key(0))
        >>> def loss_fn(frozen, lora, batch, key):
        ...     return jnp.mean((batch @ lj.merge(frozen, lora)["w"]) ** 2)
        >>> tx, strategy = optax.sgd(0.1), lj.parallel.pmap()
        >>> step = lj.make_train_step(loss_fn, tx, strategy=strategy)
        >>> state = lj.TrainState.create(lora, tx, key=jax.random.key(1))
        >>> placed, base = strategy.place_state(state, frozen), strategy.place_frozen(frozen)
        >>> batch = jnp.ones((2 * jax.local_device_count(), 4))
        >>> placed, metrics = step(placed, base, strategy.place_batch(batch))
        >>> int(strategy.gather(placed).step), strategy.metrics(metrics)["loss"].shape
        (1, ())
    """
    chosen = tuple(devices) if devices is not None else None
    local = lambda: list(chosen) if chosen else jax.local_devices()

    def check(state: Any, frozen: Any, batch: Any, accum_steps: int) -> None:
        n = len(local())
        _check_leading(state, "state", n, "Pass lj.parallel.replicate(state) (place_state).")
        _check_leading(frozen, "frozen", n, "Pass lj.parallel.replicate(frozen) (place_frozen).")
        _check_leading(batch, "batch", n, "Pass lj.parallel.shard_batch(batch) (place_batch).")

    def compile(update: Update, donate: bool) -> Update:
        return jax.pmap(
            update, axis_name=DEVICE_AXIS, devices=chosen, donate_argnums=_donated(donate)
        )

    return Strategy(
        check=check,
        compile=compile,
        place_state=lambda state, frozen: replicate(state, local()),
        place_frozen=lambda frozen: replicate(frozen, local()),
        place_batch=lambda batch: split_over(batch, local()),
        gather=unreplicate,
        metrics=unreplicate,
        axis_name=DEVICE_AXIS,
    )


def mesh(
    mesh: Mesh, *, data_axis: str | tuple[str, ...] = "data", fsdp_axis: str | None = None
) -> Strategy:
    """`jax.jit` over a device mesh with `NamedSharding`, on one process or many.

    The batch is split over `data_axis` (and `fsdp_axis`); the base is replicated or, with
    `fsdp_axis`, sharded over it (`lora_jax.parallel.mesh_shardings`); each adapter and its
    optimizer slots are sharded like its base kernel (rank axis replicated). The step
    places plain arrays itself: each process passes its own slice of the global batch and
    the same state and base, and gets back the state placed for the next call. Place the
    base once with ``place_frozen`` so it is not copied again every step.

    Args:
        mesh: a `jax.sharding.Mesh`.
        data_axis: mesh axis (or axes) the batch is split over.
        fsdp_axis: mesh axis the frozen base is sharded over; None replicates it.

    Returns:
        A `Strategy`.

    Raises:
        TypeError: `mesh` is not a `jax.sharding.Mesh`.
        ValueError: the mesh has no axis named `data_axis` or `fsdp_axis`.

    Example:
        >>> import jax, jax.numpy as jnp, optax, lora_jax as lj
        >>> from jax.sharding import Mesh
        >>> frozen, lora = lj.split({"w": jnp.eye(4)}, lj.LoraConfig(rank=2, targets="w"),
        ...                         key=jax.random.key(0))
        >>> def loss_fn(frozen, lora, batch, key):
        ...     return jnp.mean((batch @ lj.merge(frozen, lora)["w"]) ** 2)
        >>> strategy = lj.parallel.mesh(Mesh(jax.devices(), ("data",)))
        >>> tx = optax.sgd(0.1)
        >>> step = lj.make_train_step(loss_fn, tx, strategy=strategy)
        >>> state = lj.TrainState.create(lora, tx, key=jax.random.key(1))
        >>> base = strategy.place_frozen(frozen)
        >>> state, metrics = step(state, base, jnp.ones((2 * jax.device_count(), 4)))
        >>> int(state.step), strategy.gather(state.lora)["w"].a.shape
        (1, (4, 2))
    """
    if not isinstance(mesh, Mesh):
        raise TypeError(f"`mesh` must be a jax.sharding.Mesh; found {type(mesh).__name__}.")
    ways = int(np.prod([mesh.shape[a] for a in check_axes(mesh, data_axis, fsdp_axis)]))
    shardings = lambda frozen, lora: mesh_shardings(
        mesh, frozen, lora, data_axis=data_axis, fsdp_axis=fsdp_axis
    )
    batch_sharding = shardings({}, {}).batch
    home = next(d for d in mesh.devices.flat if d.process_index == jax.process_index())

    def local_ways() -> int:
        n = jax.process_count()
        return max(ways // n if ways % n == 0 else ways, 1)

    def check(state: Any, frozen: Any, batch: Any, accum_steps: int) -> None:
        why = f"{ways} batch shards over the mesh x accum_steps={accum_steps}, per process"
        check_divisible(batch, local_ways() * accum_steps, why)

    def place_state(state: Any, frozen: Any) -> Any:
        return place(state, state_shardings(state, shardings(frozen, state.lora)))

    def place_batch(batch: Any) -> Any:
        check_divisible(batch, local_ways(), f"{ways} batch shards over the mesh, per process")
        return assemble_batch(batch, batch_sharding)

    def compile(update: Update, donate: bool) -> Update:
        cache: dict[Any, tuple[Any, MeshShardings, Callable[..., Any]]] = {}

        def build(state: Any, frozen: Any, batch: Any) -> Any:
            adapters = flatten_lora(state.lora)
            if any(isinstance(w.scale, tuple) for w in adapters.values()):
                unstacked_shapes(flatten(frozen), state.lora)  # k stacked adapters
            else:
                check_fits(flatten(frozen), adapters, residuals=False)
            sh = shardings(frozen, state.lora)
            state_sh = state_shardings(state, sh)
            fn = jax.jit(
                update,
                in_shardings=(state_sh, sh.frozen, jax.tree.map(lambda _: sh.batch, batch)),
                out_shardings=(state_sh, sh.replicated),
                donate_argnums=_donated(donate),
            )
            return state_sh, sh, fn

        def step(state: Any, frozen: Any, batch: Any) -> Any:
            key = signature(state, frozen, batch)
            if key not in cache:
                cache[key] = build(state, frozen, batch)
            state_sh, sh, fn = cache[key]
            state, frozen = place(state, state_sh), place(frozen, sh.frozen)
            return fn(state, frozen, assemble_batch(batch, sh.batch))

        return step

    return Strategy(
        check=check,
        compile=compile,
        place_state=place_state,
        place_frozen=lambda frozen: place(frozen, shardings(frozen, {}).frozen),
        place_batch=place_batch,
        gather=lambda tree: jax.tree.map(lambda x: local_copy(x, home), tree),
        metrics=_same,
        axis_name=None,
    )
