"""Many adapters trained in one step: `make_train_step` for k stacked adapters.

Each example of a batch carries an adapter id; the loss is the sum over adapters of each
adapter's weighted mean loss on its own examples (over the global batch), so each adapter
gets the gradient of a separate run on its examples. The optimizer runs once per adapter
(`lora_jax.multi.init_state`), and an adapter with no examples in a step is not updated.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from lora_jax.core._paths import flatten
from lora_jax.core._weights import unstacked_shapes
from lora_jax.multi._optim import (
    adapter_count,
    check_per_adapter,
    per_adapter_norms,
    to_front,
    update_adapters,
)
from lora_jax.parallel._placement import check_divisible
from lora_jax.parallel._strategies import Strategy
from lora_jax.training._state import TrainState
from lora_jax.training._step import (
    cast_frozen,
    check_accum_steps,
    check_compute_dtype,
    check_loss_fn,
    check_state_type,
    check_strategy,
)

__all__ = ["make_train_step"]


def _column(batch: Any, key: str, what: str) -> Any:
    if not isinstance(batch, Mapping):
        raise TypeError(
            f"`batch` must be a mapping with the {what} under {key!r}; found "
            f"{type(batch).__name__}."
        )
    if key not in batch:
        raise ValueError(
            f"`batch` has no {key!r} ({what}); its keys are {sorted(map(str, batch))}."
        )
    return batch[key]


def _check_ids(ids: Any, k: int, name: str) -> None:
    """Concrete ids outside -1..k-1 raise a ValueError naming the values and k."""
    if isinstance(ids, jax.core.Tracer):
        return  # inside a user's jit: see make_train_step's docstring
    if isinstance(ids, jax.Array) and not ids.is_fully_addressable:  # this process's part
        values = np.concatenate([np.ravel(s.data) for s in ids.addressable_shards])
    else:
        values = np.asarray(ids)
    if not np.issubdtype(values.dtype, np.integer):
        raise TypeError(f"`batch[{name!r}]` must hold integer adapter ids; found {values.dtype}.")
    bad = np.unique(values[(values < -1) | (values >= k)])
    if bad.size:
        raise ValueError(
            f"`batch[{name!r}]` holds ids {bad.tolist()} outside -1..{k - 1}: the state "
            f"stacks k={k} adapters (-1 = no adapter)."
        )


def _multipliers(lr_multipliers: Any) -> np.ndarray | None:
    if lr_multipliers is None:
        return None
    values = np.asarray(lr_multipliers, dtype=np.float64)
    if values.ndim != 1 or not np.all(np.isfinite(values)):
        raise ValueError(
            f"`lr_multipliers` must be a sequence of k finite floats (one per adapter); "
            f"found {lr_multipliers!r}."
        )
    return values


def _shares(ids, weights, k, axis_name):
    """Each example's share ``w_e / W_{ids_e}`` of its adapter's loss, each example's
    one-hot adapter row, and the global example counts and weight sums per adapter."""
    valid = (ids >= 0) & (ids < k)
    onehot = jax.nn.one_hot(jnp.where(valid, ids, -1), k, dtype=jnp.float32)
    w = jnp.where(valid, weights.astype(jnp.float32), 0.0)
    sums, counts = jnp.sum(onehot * w[:, None], axis=0), jnp.sum(onehot, axis=0)
    if axis_name:
        sums, counts = lax.psum((sums, counts), axis_name)
    denom = jnp.take(sums, jnp.clip(ids, 0, k - 1))
    share = jnp.where(valid & (denom > 0), w / jnp.where(denom > 0, denom, 1.0), 0.0)
    return share, sums, counts.astype(jnp.int32)


def _loss_and_grads(loss_fn, frozen, lora, batch, share, key, k, id_key, accum_steps):
    """Sum over adapters of each one's weighted mean loss: its per-adapter values ``(k,)``,
    the aux, and the gradients (summed over micro-batches, never averaged)."""

    def objective(lora_, batch_, share_, key_):
        out = loss_fn(frozen, lora_, batch_, key_)
        losses, aux = out if isinstance(out, tuple) else (out, {})
        if jnp.shape(losses) != jnp.shape(share_):
            raise TypeError(
                f"`loss_fn` must return one loss per example, shape {jnp.shape(share_)}; "
                f"found shape {jnp.shape(losses)}."
            )
        part = share_ * jnp.where(share_ > 0, jnp.asarray(losses, jnp.float32), 0.0)
        rows = jax.nn.one_hot(batch_[id_key], k, dtype=jnp.float32)
        return jnp.sum(part), (jnp.sum(rows * part[:, None], axis=0), aux)

    grad_fn = jax.grad(objective, has_aux=True)
    if accum_steps == 1:
        grads, (per_adapter, aux) = grad_fn(lora, batch, share, key)
        return per_adapter, aux, grads
    check_divisible(batch, accum_steps, f"accum_steps={accum_steps}")
    split = lambda x: x.reshape(accum_steps, -1, *x.shape[1:])
    micro = (jax.tree.map(split, batch), split(share), jnp.arange(accum_steps))

    def body(acc, inputs):
        mb, share_mb, i = inputs
        grads, (per_adapter, aux) = grad_fn(lora, mb, share_mb, jax.random.fold_in(key, i))
        return jax.tree.map(jnp.add, acc, grads), (per_adapter, aux)

    zeros = jax.tree.map(jnp.zeros_like, lora)
    grads, (per_adapter, auxs) = lax.scan(body, zeros, micro)
    return jnp.sum(per_adapter, 0), jax.tree.map(lambda x: jnp.mean(x, 0), auxs), grads


def _update(state, frozen, batch, *, loss_fn, optimizer, id_key, weight_key, multipliers,
            accum_steps, skip_nonfinite, axis_name, dtype):  # fmt: skip
    frozen = cast_frozen(frozen, dtype)
    # Shape checks run while tracing: once per compile, before it.
    k, _ = unstacked_shapes(flatten(frozen), state.lora)
    adapter_count(state.lora)
    check_per_adapter(state.opt_state, k)
    if multipliers is not None and len(multipliers) != k:
        raise ValueError(
            f"`lr_multipliers` has {len(multipliers)} values, but the state stacks k={k} "
            f"adapters: give one per adapter."
        )
    ids = batch[id_key]
    weights = jnp.ones(jnp.shape(ids), jnp.float32) if weight_key is None else batch[weight_key]
    share, sums, counts = _shares(ids, weights, k, axis_name)
    key = jax.random.fold_in(state.rng, state.step)
    if axis_name:
        key = jax.random.fold_in(key, lax.axis_index(axis_name))
    losses, aux, grads = _loss_and_grads(
        loss_fn, frozen, state.lora, batch, share, key, k, id_key, accum_steps
    )
    if axis_name:
        losses, grads = lax.psum((losses, grads), axis_name)
        aux = lax.pmean(aux, axis_name)
    norms = per_adapter_norms(to_front(grads), k)
    present = sums > 0
    finite = jnp.isfinite(losses) & jnp.isfinite(norms)
    update = present & finite if skip_nonfinite else present
    m = None if multipliers is None else jnp.asarray(multipliers, jnp.float32)
    lora, opt_state = update_adapters(optimizer, grads, state.opt_state, state.lora, update, m)
    skipped = state.skipped
    if skip_nonfinite:
        skipped = skipped + jnp.any(present & ~finite).astype(jnp.int32)
    n_present = jnp.maximum(jnp.sum(present), 1)
    metrics = {
        "loss": jnp.sum(jnp.where(present, losses, 0.0)) / n_present,
        "losses": jnp.where(present, losses, 0.0),
        "examples": counts,
        "grad_norm": norms,
        "skipped": skipped,
        "aux": aux,
    }
    new = state.replace(step=state.step + 1, lora=lora, opt_state=opt_state, skipped=skipped)
    return new, metrics


def make_train_step(
    loss_fn: Callable[..., Any],
    optimizer: optax.GradientTransformation,
    *,
    adapter_ids: str = "adapter_ids",
    weights: str | None = None,
    lr_multipliers: Sequence[float] | jax.Array | None = None,
    strategy: Strategy | None = None,
    accum_steps: int = 1,
    skip_nonfinite: bool = False,
    donate: bool = True,
    compute_dtype: Any = None,
) -> Callable[[TrainState, Any, Any], tuple[TrainState, dict[str, Any]]]:
    """Builds ``step(state, frozen, batch) -> (state, metrics)`` training k adapters at once.

    Each example trains its own adapter: ``batch[adapter_ids]`` holds one id per example
    (``-1``: no adapter, the example trains nothing). The objective is
    ``L = sum_i L_i``, ``L_i = sum_{e in i} w_e l_e / sum_{e in i} w_e``, with the sums
    over the global batch (every device, process and micro-batch; the weight sums are
    taken from the batch before differentiation), so adapter i's gradient is that of a
    separate run on its own examples. The optimizer runs per adapter (vmapped over the
    adapter axis of a state from `lora_jax.multi.init_state`): clipping, Adam's moments
    and count, schedules and weight decay are each adapter's own. An adapter with no
    examples in a step (a weight sum of 0) gets no update, and its optimizer state does not
    move (no count, momentum or weight decay), as if its separate run had skipped the step.

    Adapters of different ranks train together padded by `lora_jax.multi.pad_rank`: the
    padded rows and columns get exactly zero gradient and stay zero, and
    `lora_jax.multi.trim_rank` cuts each back to its rank. Strategies, accumulation and
    donation work as in `lora_jax.make_train_step` (under pmap the gradients are
    psum'd). Ids are checked when the batch is concrete; called inside a user's
    `jax.jit` they cannot be: an example whose id is outside ``-1..k-1`` is then dropped
    from every adapter's sums, but `lora_jax.multi.lora_apply_mixed` gives it NaN outputs,
    so the gradients of the adapter it is clipped to become NaN (``skip_nonfinite=True``
    skips that adapter's update).

    Metrics: ``loss`` (mean of ``L_i`` over the adapters present), ``losses`` ``(k,)``
    (``L_i``, 0 for an absent adapter), ``examples`` ``(k,)`` (example counts),
    ``grad_norm`` ``(k,)`` (each adapter's global gradient norm), ``skipped`` (steps with
    a skipped update) and ``aux`` (averaged, as in `lora_jax.make_train_step`).

    Args:
        loss_fn: ``loss_fn(frozen, stacked, batch, key)`` returning the per-example losses,
            shape ``(batch,)``, or ``(losses, aux)``; it normally runs the model with
            ``lj.multi.lora_apply_mixed(apply_fn)(frozen, stacked, batch[adapter_ids], ...)``.
        optimizer: any optax transformation of one adapter; it runs once per adapter.
        adapter_ids: the batch key of the int ids, shape ``(batch,)``.
        weights: None (every example weighs 1), or the batch key of per-example float
            weights (e.g. target-token counts, so each adapter's loss is its token mean).
        lr_multipliers: None, or k floats: adapter i's updates are multiplied by entry i
            (its own learning rate for SGD- and Adam-type rules).
        strategy: a `lora_jax.parallel.Strategy`; None means ``lj.parallel.jit()``.
        accum_steps: micro-batches per (per-device) batch; their gradients are summed.
        skip_nonfinite: skip the update of an adapter whose loss or gradients are not
            finite (the others still train), and count the step in ``skipped``.
        donate: donate the old state's buffers to the new one.
        compute_dtype: a floating dtype the frozen base is cast to inside the step, as in
            `lora_jax.make_train_step` (adapters and optimizer state keep theirs).

    Returns:
        The step function. Before any compile it raises a ValueError for a batch without
        the `adapter_ids` (or `weights`) key (naming the keys found) or with ids outside
        ``-1..k-1`` (naming them and k); while tracing, for `lr_multipliers` of a length
        other than k or a state made by `lora_jax.TrainState.create` (not per adapter).

    Raises:
        TypeError: `strategy` is not a `Strategy`, `loss_fn` has the wrong signature, or
            `compute_dtype` is not a floating dtype.
        ValueError: `accum_steps` < 1, or `lr_multipliers` is not a 1-D sequence of
            finite floats.

    Example:
        >>> import jax, jax.numpy as jnp, optax, lora_jax as lj
        >>> params = {"w": jnp.eye(4)}
        >>> config = lj.LoraConfig(rank=2, targets="w")
        >>> frozen, lora = lj.split(params, config, key=jax.random.key(0))
        >>> apply = lj.multi.lora_apply_mixed(lambda p, x: x @ p["w"])
        >>> def loss_fn(frozen, stacked, batch, key):
        ...     pred = apply(frozen, stacked, batch["adapter_ids"], batch["x"])
        ...     return jnp.mean((pred - batch["y"]) ** 2, axis=-1)
        >>> tx = optax.adam(1e-2)
        >>> state = lj.multi.init_state(lj.multi.stack_adapters([lora] * 3), tx,
        ...                             key=jax.random.key(1))
        >>> step = lj.multi.make_train_step(loss_fn, tx)
        >>> batch = {"x": jnp.ones((4, 4)), "y": jnp.zeros((4, 4)),
        ...          "adapter_ids": jnp.array([0, 0, 2, -1])}
        >>> state, metrics = step(state, frozen, batch)
        >>> metrics["examples"].tolist(), metrics["losses"].shape
        ([2, 0, 1], (3,))
    """
    check_loss_fn(loss_fn)
    strategy = check_strategy(strategy)
    check_accum_steps(accum_steps)
    multipliers = _multipliers(lr_multipliers)
    update = functools.partial(
        _update,
        loss_fn=loss_fn,
        optimizer=optimizer,
        id_key=adapter_ids,
        weight_key=weights,
        multipliers=None if multipliers is None else tuple(multipliers.tolist()),
        accum_steps=accum_steps,
        skip_nonfinite=skip_nonfinite,
        axis_name=strategy.axis_name,
        dtype=check_compute_dtype(compute_dtype),
    )
    compiled = strategy.compile(update, donate)

    def step(state: TrainState, frozen: Any, batch: Any) -> tuple[TrainState, dict[str, Any]]:
        check_state_type(state)
        k = adapter_count(state.lora)
        _check_ids(_column(batch, adapter_ids, "adapter ids"), k, adapter_ids)
        if weights is not None:
            _column(batch, weights, "per-example weights")
        strategy.check(state, frozen, batch, accum_steps)
        return compiled(state, frozen, batch)

    return step
