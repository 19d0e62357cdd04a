"""One LoRA training step, run jitted, pmapped, or mesh-sharded (one or many processes).

`make_train_step(loss_fn, optimizer, strategy=...)` builds ``step(state, frozen, batch)``.
Gradients are taken with respect to ``state.lora`` only; the frozen base is an argument,
never differentiated, never given optimizer state, and comes out bit-identical.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from jax import lax
from jax.sharding import Mesh

from lora_jax.core import _paths
from lora_jax.parallel import _placement as distributed
from lora_jax.core._weights import check_fits, flatten_lora

__all__ = ["TrainState", "make_train_step", "STRATEGIES"]

STRATEGIES = ("jit", "pmap", "mesh")
_PMAP_AXIS = "devices"


@struct.dataclass
class TrainState:
    """Everything that changes during training (the frozen base is not here).

    Attributes:
        step: number of steps taken (int32 scalar).
        lora: the adapters.
        opt_state: the optimizer state, for the adapters only.
        rng: PRNG key; step ``t`` uses ``fold_in(rng, t)`` (plus the device index under pmap).
        skipped: number of updates skipped for non-finite gradients.

    Example:
        >>> import jax, jax.numpy as jnp, optax, lora_jax as lj
        >>> config = lj.LoraConfig(rank=2, targets="w")
        >>> _, lora = lj.split({"w": jnp.ones((4, 3))}, config, key=jax.random.key(0))
        >>> state = lj.TrainState.create(lora, optax.adam(1e-3), key=jax.random.key(1))
        >>> state.lora["w"].a.shape, int(state.skipped)
        ((4, 2), 0)
    """

    step: jax.Array
    lora: Any
    opt_state: Any
    rng: jax.Array
    skipped: jax.Array

    @classmethod
    def create(
        cls, lora: Any, optimizer: optax.GradientTransformation, *, key: jax.Array
    ) -> TrainState:
        """A fresh state: step 0, a copy of `lora`, and ``optimizer.init(lora)``.

        Args:
            lora: the adapters from `lora_jax.split`.
            optimizer: any optax transformation; it sees only the adapters.
            key: PRNG key for dropout and any randomness in the loss.

        Returns:
            A `TrainState`.

        Example:
            >>> import jax, jax.numpy as jnp, optax, lora_jax as lj
            >>> params = {"w": jnp.ones((4, 3))}
            >>> config = lj.LoraConfig(rank=2, targets="w")
            >>> frozen, lora = lj.split(params, config, key=jax.random.key(0))
            >>> state = lj.TrainState.create(lora, optax.sgd(0.1), key=jax.random.key(1))
            >>> int(state.step)
            0
        """
        # Own copies (adapters are small): the step donates the state's buffers, and the
        # caller's `lora` must stay usable. Two zero scalars: each buffer is donated once.
        lora = jax.tree.map(jnp.array, lora)
        zero = lambda: jnp.zeros((), jnp.int32)
        return cls(step=zero(), lora=lora, opt_state=optimizer.init(lora), rng=key, skipped=zero())


def _check_loss_fn(loss_fn: Callable[..., Any]) -> None:
    try:
        sig = inspect.signature(loss_fn)
    except (TypeError, ValueError):
        return
    try:
        sig.bind(None, None, None, None)
    except TypeError as err:
        raise TypeError(
            f"`loss_fn` must be callable as loss_fn(frozen, lora, batch, key) and return a loss "
            f"or (loss, aux); found {getattr(loss_fn, '__name__', 'loss_fn')}{sig}."
        ) from err


def _loss_and_grads(loss_fn, frozen, lora, batch, key, accum_steps):
    def loss_of(lora_, batch_, key_):
        out = loss_fn(frozen, lora_, batch_, key_)
        loss, aux = out if isinstance(out, tuple) else (out, {})
        if jnp.shape(loss) != ():
            raise TypeError(f"`loss_fn` must return a scalar loss; found shape {jnp.shape(loss)}.")
        return jnp.asarray(loss, jnp.float32), aux

    grad_fn = jax.value_and_grad(loss_of, has_aux=True)
    if accum_steps == 1:
        (loss, aux), grads = grad_fn(lora, batch, key)
        return loss, aux, grads
    distributed.check_divisible(batch, accum_steps, f"accum_steps={accum_steps}")
    micro = jax.tree.map(lambda x: x.reshape(accum_steps, -1, *x.shape[1:]), batch)

    def body(acc, inputs):
        mb, i = inputs
        (loss, aux), grads = grad_fn(lora, mb, jax.random.fold_in(key, i))
        return jax.tree.map(jnp.add, acc, grads), (loss, aux)

    zeros = jax.tree.map(jnp.zeros_like, lora)
    grads, (losses, auxs) = lax.scan(body, zeros, (micro, jnp.arange(accum_steps)))
    mean = lambda x: jnp.mean(x, axis=0)
    return mean(losses), jax.tree.map(mean, auxs), jax.tree.map(lambda g: g / accum_steps, grads)


def _update(state, frozen, batch, *, loss_fn, optimizer, accum_steps, skip_nonfinite, axis_name):
    # Shape checks run while tracing: once per compile, before it, never on the hot path.
    check_fits(_paths.flatten(frozen), flatten_lora(state.lora))
    key = jax.random.fold_in(state.rng, state.step)
    if axis_name:
        key = jax.random.fold_in(key, lax.axis_index(axis_name))
    loss, aux, grads = _loss_and_grads(loss_fn, frozen, state.lora, batch, key, accum_steps)
    if axis_name:
        loss, aux, grads = lax.pmean((loss, aux, grads), axis_name)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.lora)
    lora = optax.apply_updates(state.lora, updates)
    finite = jnp.isfinite(loss)
    for g in jax.tree.leaves(grads):
        finite &= jnp.all(jnp.isfinite(g))
    if skip_nonfinite:
        keep = lambda new, old: jnp.where(finite, new, old)
        lora = jax.tree.map(keep, lora, state.lora)
        opt_state = jax.tree.map(keep, opt_state, state.opt_state)
    skipped = state.skipped + (~finite).astype(jnp.int32) if skip_nonfinite else state.skipped
    new = state.replace(step=state.step + 1, lora=lora, opt_state=opt_state, skipped=skipped)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "skipped": skipped, "aux": aux}
    return new, metrics


def _check_type(state: Any) -> None:
    if not isinstance(state, TrainState):
        raise TypeError(f"`state` must be a lj.TrainState; found {type(state).__name__}.")


def _check_leading(tree: Any, name: str, n: int, hint: str) -> None:
    for path, x in _paths.flatten(tree).items():
        lead = np.shape(x)[0] if np.ndim(x) else None
        if lead != n:
            raise ValueError(
                f"{name} leaf {path or '<root>'!r} has leading axis {lead}; the pmap step needs "
                f"{n} (one slice per local device). {hint}"
            )


def make_train_step(
    loss_fn: Callable[..., Any],
    optimizer: optax.GradientTransformation,
    *,
    strategy: str = "jit",
    mesh: Mesh | None = None,
    data_axis: str | tuple[str, ...] = "data",
    fsdp_axis: str | None = None,
    accum_steps: int = 1,
    skip_nonfinite: bool = False,
    donate: bool = True,
) -> Callable[[TrainState, Any, Any], tuple[TrainState, dict[str, Any]]]:
    """Builds ``step(state, frozen, batch) -> (state, metrics)`` for one of three strategies.

    - ``"jit"``: one device. Pass the state, base and batch as they are.
    - ``"pmap"``: classic data parallel over the local devices; gradients and metrics are
      averaged with `lax.pmean`. Pass ``lj.replicate(state)``, ``lj.replicate(frozen)`` and
      ``lj.shard_batch(batch)``; metrics come back with a leading device axis.
    - ``"mesh"``: `jax.jit` over `mesh` with `NamedSharding`: the batch split over
      `data_axis` (and `fsdp_axis`), the base replicated or, with `fsdp_axis`, sharded over it,
      each adapter sharded like its base weight (rank axis replicated). Pass plain arrays:
      the step places them (each process passes its own slice of the global batch and the
      same state and base), and returns the state already placed for the next call.

    Under `jax.distributed` every strategy works across processes unchanged. Buffers of the
    old state are donated (``donate=False`` keeps them). Metrics: ``loss``, ``grad_norm``,
    ``skipped`` (updates skipped so far) and ``aux`` (what `loss_fn` returned beside the
    loss, averaged). With dropout, pmap folds the device index into each step's key, so
    its random masks differ from jit's and mesh's, which match each other.

    Args:
        loss_fn: ``loss_fn(frozen, lora, batch, key)`` returning a scalar loss or
            ``(loss, aux)``; it is differentiated with respect to ``lora`` only. The loss
            is taken in float32 (so a bfloat16 base trains float32 adapters).
        optimizer: any optax transformation over the lora tree (see also `loraplus`).
        strategy: ``"jit"``, ``"pmap"`` or ``"mesh"``.
        mesh: the `jax.sharding.Mesh`, for ``strategy="mesh"``.
        data_axis: mesh axis (or axes) the batch is split over.
        fsdp_axis: mesh axis the frozen base is sharded over; None replicates it.
        accum_steps: split each (per-device) batch into this many micro-batches and
            average their gradients (`lax.scan`), for the memory of one micro-batch.
        skip_nonfinite: skip an update whose loss or gradients are not finite, and count it.
        donate: donate the old state's buffers to the new one.

    Returns:
        The step function. It checks its inputs before any compile: a state that is not a
        `TrainState`, adapters that do not fit the base, a batch that does not divide
        across devices or micro-batches each raise a ValueError/TypeError.

    Raises:
        ValueError: unknown strategy, ``"mesh"`` without a mesh, a mesh without the named
            axes, or `accum_steps` < 1.
        TypeError: `loss_fn` cannot be called as ``loss_fn(frozen, lora, batch, key)``.

    Example:
        >>> import jax, jax.numpy as jnp, optax, lora_jax as lj
        >>> params = {"w": jnp.eye(4)}
        >>> config = lj.LoraConfig(rank=2, targets="w")
        >>> frozen, lora = lj.split(params, config, key=jax.random.key(0))
        >>> def loss_fn(frozen, lora, batch, key):
        ...     w = lj.merge(frozen, lora, config)["w"]
        ...     return jnp.mean((batch["x"] @ w - batch["y"]) ** 2)
        >>> tx = optax.adam(1e-2)
        >>> step = lj.make_train_step(loss_fn, tx)
        >>> state = lj.TrainState.create(lora, tx, key=jax.random.key(1))
        >>> batch = {"x": jnp.ones((8, 4)), "y": jnp.zeros((8, 4))}
        >>> state, metrics = step(state, frozen, batch)
        >>> int(state.step), metrics["loss"].dtype
        (1, dtype('float32'))
    """
    _check_loss_fn(loss_fn)
    if strategy not in STRATEGIES:
        raise ValueError(f"`strategy` must be one of {STRATEGIES}; found {strategy!r}.")
    if isinstance(accum_steps, bool) or not isinstance(accum_steps, int) or accum_steps < 1:
        raise ValueError(f"`accum_steps` must be an int >= 1; found {accum_steps!r}.")
    update = functools.partial(
        _update,
        loss_fn=loss_fn,
        optimizer=optimizer,
        accum_steps=accum_steps,
        skip_nonfinite=skip_nonfinite,
        axis_name=_PMAP_AXIS if strategy == "pmap" else None,
    )
    donated = (0,) if donate else ()
    if strategy == "jit":
        return _jit_step(update, donated)
    if strategy == "pmap":
        return _pmap_step(update, donated)
    if mesh is None:
        raise ValueError('strategy="mesh" needs `mesh=` (a jax.sharding.Mesh).')
    distributed.check_axes(mesh, data_axis, fsdp_axis)
    return _mesh_step(update, donated, accum_steps, optimizer, mesh, data_axis, fsdp_axis)


def _jit_step(update, donated):
    compiled = jax.jit(update, donate_argnums=donated)

    def step(state, frozen, batch):
        _check_type(state)
        return compiled(state, frozen, batch)

    return step


def _pmap_step(update, donated):
    compiled = jax.pmap(update, axis_name=_PMAP_AXIS, donate_argnums=donated)

    def step(state, frozen, batch):
        n = jax.local_device_count()
        _check_leading(state, "state", n, "Pass lj.replicate(state).")
        _check_leading(frozen, "frozen", n, "Pass lj.replicate(frozen).")
        _check_leading(batch, "batch", n, "Pass lj.shard_batch(batch).")
        _check_type(state)
        return compiled(state, frozen, batch)

    return step


def _mesh_step(update, donated, accum_steps, optimizer, mesh, data_axis, fsdp_axis):
    cache: dict[Any, tuple[Any, Any, Any, Callable]] = {}

    def build(state, frozen, batch):
        check_fits(_paths.flatten(frozen), flatten_lora(state.lora))  # before any sharding
        sh = distributed.mesh_shardings(
            mesh, frozen, state.lora, data_axis=data_axis, fsdp_axis=fsdp_axis
        )
        rep = sh.replicated
        opt = distributed.opt_state_shardings(optimizer, state.opt_state, sh.lora, rep)
        state_sh = TrainState(step=rep, lora=sh.lora, opt_state=opt, rng=rep, skipped=rep)  # type: ignore[arg-type]
        batch_sh = jax.tree.map(lambda _: sh.batch, batch)
        fn = jax.jit(
            update,
            in_shardings=(state_sh, sh.frozen, batch_sh),
            out_shardings=(state_sh, rep),
            donate_argnums=donated,
        )
        return state_sh, sh.frozen, batch_sh, fn

    ways = distributed.batch_ways(mesh, data_axis, fsdp_axis)
    local = ways // jax.process_count() if ways % jax.process_count() == 0 else ways
    why = f"{ways} batch shards over the mesh x accum_steps={accum_steps}, per process"

    def step(state, frozen, batch):
        _check_type(state)
        distributed.check_divisible(batch, max(local, 1) * accum_steps, why)
        key = (
            jax.tree.structure((state, frozen, batch)),
            tuple(np.shape(x) for x in jax.tree.leaves((state, frozen, batch))),
        )
        if key not in cache:
            cache[key] = build(state, frozen, batch)
        state_sh, frozen_sh, batch_sh, fn = cache[key]
        state = distributed.place(state, state_sh)
        frozen = distributed.place(frozen, frozen_sh)
        batch = distributed.place_batch(batch, batch_sh)
        return fn(state, frozen, batch)

    return step
