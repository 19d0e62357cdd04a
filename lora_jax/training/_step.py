"""One LoRA training step, run by any strategy of `lora_jax.parallel`.

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
import optax
from jax import lax

from lora_jax.core._packed import is_packed
from lora_jax.core._paths import flatten
from lora_jax.core._weights import LoraWeights, check_fits, flatten_lora, is_concrete
from lora_jax.parallel._placement import check_divisible, signature
from lora_jax.parallel._strategies import Strategy, jit
from lora_jax.training._state import TrainState

__all__ = ["TrainState", "make_train_step"]


def check_loss_fn(loss_fn: Callable[..., Any]) -> None:
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


def check_accum_steps(accum_steps: Any) -> None:
    """A ValueError unless `accum_steps` is an int >= 1."""
    if isinstance(accum_steps, bool) or not isinstance(accum_steps, int) or accum_steps < 1:
        raise ValueError(f"`accum_steps` must be an int >= 1; found {accum_steps!r}.")


def check_strategy(strategy: Any) -> Strategy:
    if strategy is None:
        return jit()
    if isinstance(strategy, Strategy):
        return strategy
    calls = {"jit": "jit()", "pmap": "pmap()", "mesh": "mesh(mesh, data_axis=..., fsdp_axis=...)"}
    found = type(strategy).__name__
    if isinstance(strategy, str):
        found = f"the string {strategy!r}"
        if strategy in calls:
            found += f" (strategies are values: strategy=lj.parallel.{calls[strategy]})"
    raise TypeError(
        f"`strategy` must be a lj.parallel.Strategy: lj.parallel.jit(), lj.parallel.pmap() or "
        f"lj.parallel.mesh(mesh, data_axis=..., fsdp_axis=...); found {found}."
    )


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
    check_divisible(batch, accum_steps, f"accum_steps={accum_steps}")
    micro = jax.tree.map(lambda x: x.reshape(accum_steps, -1, *x.shape[1:]), batch)

    def body(acc, inputs):
        mb, i = inputs
        (loss, aux), grads = grad_fn(lora, mb, jax.random.fold_in(key, i))
        return jax.tree.map(jnp.add, acc, grads), (loss, aux)

    zeros = jax.tree.map(jnp.zeros_like, lora)
    grads, (losses, auxs) = lax.scan(body, zeros, (micro, jnp.arange(accum_steps)))
    mean = lambda x: jnp.mean(x, axis=0)
    return mean(losses), jax.tree.map(mean, auxs), jax.tree.map(lambda g: g / accum_steps, grads)


def check_compute_dtype(compute_dtype: Any) -> jnp.dtype | None:
    if compute_dtype is None:
        return None
    try:
        dtype = jnp.dtype(compute_dtype)
    except TypeError as err:
        raise TypeError(
            f"`compute_dtype` must be a floating dtype such as jnp.bfloat16; found "
            f"{compute_dtype!r}."
        ) from err
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(
            f"`compute_dtype` must be a floating dtype such as jnp.bfloat16; found {dtype.name}."
        )
    return dtype


def cast_frozen(frozen: Any, dtype: jnp.dtype | None) -> Any:
    """`frozen` with its floating leaves of another dtype cast to `dtype` (the others as is);
    a packed (quantized) kernel keeps its storage and scales and is unpacked to `dtype`."""
    if dtype is None:
        return frozen

    def cast(x: Any) -> Any:
        x_dtype = getattr(x, "dtype", None)
        floating = x_dtype is not None and jnp.issubdtype(x_dtype, jnp.floating)
        return x.astype(dtype) if floating and x_dtype != dtype else x

    return jax.tree.map(cast, frozen, is_leaf=is_packed)


def _update(
    state, frozen, batch, *, loss_fn, optimizer, accum_steps, skip_nonfinite, axis_name, dtype
):
    # Shape checks run while tracing: once per compile, before it, never on the hot path.
    check_fits(flatten(frozen), flatten_lora(state.lora))
    frozen = cast_frozen(frozen, dtype)
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


def check_state_type(state: Any) -> None:
    if not isinstance(state, TrainState):
        raise TypeError(f"`state` must be a lj.TrainState; found {type(state).__name__}.")


def residual_check(gather: Callable[[Any], Any]) -> Callable[[Any, Any, Any], None]:
    """``check(state, frozen, batch)``: on the first call of each compiled signature, the
    PiSSA adapters (`LoraWeights.residual_norm`) are checked against the concrete base
    kernels (one copy, read with the strategy's `gather`), so the original weights given in
    place of the residual base are caught. Kernels that are not concrete (a step called
    inside another `jax.jit`) are skipped; runs without PiSSA adapters cost one tree
    structure per call."""
    pissa_of: dict[Any, dict[str, LoraWeights]] = {}
    seen: set[Any] = set()

    def check(state: Any, frozen: Any, batch: Any) -> None:
        lora_def = jax.tree.structure(state.lora)
        if lora_def not in pissa_of:
            flat = flatten_lora(state.lora)
            pissa_of[lora_def] = {p: w for p, w in flat.items() if w.residual_norm is not None}
        pissa = pissa_of[lora_def]
        if not pissa or (key := signature(state, frozen, batch)) in seen:
            return
        base = flatten(frozen)
        adapters = {p: w for p, w in pissa.items() if p not in base or is_concrete(base[p])}
        kernels = {p: base[p] for p in adapters if p in base}
        check_fits(gather(kernels), gather(adapters))
        seen.add(key)

    return check


def make_train_step(
    loss_fn: Callable[..., Any],
    optimizer: optax.GradientTransformation,
    *,
    strategy: Strategy | None = None,
    accum_steps: int = 1,
    skip_nonfinite: bool = False,
    donate: bool = True,
    compute_dtype: Any = None,
) -> Callable[[TrainState, Any, Any], tuple[TrainState, dict[str, Any]]]:
    """Builds ``step(state, frozen, batch) -> (state, metrics)``, run by `strategy`.

    The strategy is a value from `lora_jax.parallel`: ``jit()`` (one device; the default),
    ``pmap()`` (a replica per device, gradients averaged with `lax.pmean`; pass the state,
    base and batch through its ``place_state`` / ``place_frozen`` / ``place_batch``; metrics
    come back per device, ``strategy.metrics`` gives one value each) or
    ``mesh(mesh, data_axis=..., fsdp_axis=...)`` (`NamedSharding` over a mesh; pass plain
    arrays, the step places them and returns the state placed for the next call).

    Under `jax.distributed` every strategy works across processes unchanged. Buffers of the
    old state are donated (``donate=False`` keeps them). Metrics: ``loss``, ``grad_norm``,
    ``skipped`` (updates skipped so far) and ``aux`` (what `loss_fn` returned beside the
    loss, averaged). With dropout, pmap folds the device index into each step's key, so
    its random masks differ from jit's and mesh's, which match each other.

    Mixed precision: with ``compute_dtype`` (e.g. ``jnp.bfloat16``) the floating leaves of
    ``frozen`` whose dtype differs are cast to it inside the compiled step, before `loss_fn`
    sees them; a base already stored in that dtype is passed as is (no copy), so a base
    stored and computed in bfloat16 is never copied to float32 by the step. The adapters,
    their gradients and the optimizer state keep the adapters' dtype (float32 from
    `lora_jax.split`), and the loss is float32. Non-floating leaves (quantized codes, keys)
    are never cast.

    Args:
        loss_fn: ``loss_fn(frozen, lora, batch, key)`` returning a scalar loss or
            ``(loss, aux)``; it is differentiated with respect to ``lora`` only. The loss
            is taken in float32 (so a bfloat16 base trains float32 adapters).
        optimizer: any optax transformation over the lora tree (see also
            `lora_jax.optim.loraplus`).
        strategy: a `lora_jax.parallel.Strategy`; None means ``lj.parallel.jit()``.
        accum_steps: split each (per-device) batch into this many micro-batches and
            average their gradients (`lax.scan`), for the memory of one micro-batch.
        skip_nonfinite: skip an update whose loss or gradients are not finite, and count it.
        donate: donate the old state's buffers to the new one.
        compute_dtype: a floating dtype the frozen base is cast to inside the step (see
            Mixed precision above); None leaves it as given.

    Returns:
        The step function. It checks its inputs before any compile: a state that is not a
        `TrainState`, adapters that do not fit the base, a batch that does not divide
        across devices or micro-batches each raise a ValueError/TypeError. The first call
        of each compile also checks every PiSSA adapter against its concrete base kernel
        (a ValueError when given the original weights instead of the residual base).

    Raises:
        TypeError: `strategy` is not a `Strategy` (e.g. the string ``"pmap"``),
            `loss_fn` cannot be called as ``loss_fn(frozen, lora, batch, key)``, or
            `compute_dtype` is not a floating dtype.
        ValueError: `accum_steps` < 1.

    Example:
        >>> import jax, jax.numpy as jnp, optax, lora_jax as lj
        >>> params = {"w": jnp.eye(4)}
        >>> config = lj.LoraConfig(rank=2, targets="w")
        >>> frozen, lora = lj.split(params, config, key=jax.random.key(0))
        >>> def loss_fn(frozen, lora, batch, key):
        ...     w = lj.merge(frozen, lora)["w"]
        ...     return jnp.mean((batch["x"] @ w - batch["y"]) ** 2)
        >>> tx = optax.adam(1e-2)
        >>> step = lj.make_train_step(loss_fn, tx)
        >>> state = lj.TrainState.create(lora, tx, key=jax.random.key(1))
        >>> batch = {"x": jnp.ones((8, 4)), "y": jnp.zeros((8, 4))}
        >>> state, metrics = step(state, frozen, batch)
        >>> int(state.step), metrics["loss"].dtype
        (1, dtype('float32'))
        >>> pmap = lj.parallel.pmap()
        >>> pstep = lj.make_train_step(loss_fn, tx, strategy=pmap)
        >>> n = jax.local_device_count()
        >>> big = {"x": jnp.ones((8 * n, 4)), "y": jnp.zeros((8 * n, 4))}
        >>> placed, metrics = pstep(
        ...     pmap.place_state(state, frozen), pmap.place_frozen(frozen), pmap.place_batch(big)
        ... )
        >>> int(pmap.gather(placed).step), pmap.metrics(metrics)["loss"].shape
        (2, ())
    """
    check_loss_fn(loss_fn)
    strategy = check_strategy(strategy)
    check_accum_steps(accum_steps)
    dtype = check_compute_dtype(compute_dtype)
    update = functools.partial(
        _update,
        loss_fn=loss_fn,
        optimizer=optimizer,
        accum_steps=accum_steps,
        skip_nonfinite=skip_nonfinite,
        axis_name=strategy.axis_name,
        dtype=dtype,
    )
    compiled = strategy.compile(update, donate)
    check_residuals = residual_check(strategy.gather)

    def step(state: TrainState, frozen: Any, batch: Any) -> tuple[TrainState, dict[str, Any]]:
        check_state_type(state)
        strategy.check(state, frozen, batch, accum_steps)
        check_residuals(state, frozen, batch)
        return compiled(state, frozen, batch)

    return step
