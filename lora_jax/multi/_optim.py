"""Optimizer state per adapter for k stacked adapters: `init_state`, `put_adapter`,
`take_adapter`, and the update that runs the optimizer once per adapter.

Each optimizer-state leaf carries the adapter axis k first: ``optimizer.init`` and
``optimizer.update`` are vmapped over the adapters (each ``a`` and ``b`` with its adapter
axis moved to the front and back after), so clipping by global norm, Adam's moments and
count, schedules and weight decay are each adapter's own, exactly as k separate runs.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax

from lora_jax.core._init import check_key
from lora_jax.core._weights import LoraWeights, flatten_lora
from lora_jax.multi._stack import replace_adapter, unstack_adapter
from lora_jax.training._state import TrainState

__all__ = ["init_state", "put_adapter", "take_adapter"]

_is_lora = lambda x: isinstance(x, LoraWeights)


def adapter_count(stacked: Any, name: str = "state.lora") -> int:
    """The number k of stacked adapters; a ValueError naming the path when `stacked` does not
    hold adapters from `stack_adapters` (or holds a DoRA magnitude or lora_bias, which
    `stack_adapters` does not stack and `lora_apply_mixed` does not apply)."""
    counts: dict[int, str] = {}
    for path, w in flatten_lora(stacked).items():
        if not isinstance(w.scale, tuple):
            raise ValueError(
                f"`{name}` at {path!r} holds one adapter (scale {w.scale!r}); training many "
                f"adapters needs k of them stacked by lj.multi.stack_adapters."
            )
        if w.magnitude is not None or w.bias is not None:
            what = "a DoRA magnitude" if w.magnitude is not None else "a lora_bias"
            raise ValueError(
                f"`{name}` at {path!r} has {what}, which stacked adapters do not carry "
                f"(lj.multi.lora_apply_mixed runs plain LoRA); train DoRA adapters one by one."
            )
        counts.setdefault(len(w.scale), path)
    if len(counts) != 1:
        raise ValueError(f"`{name}` must stack the same k adapters at every path; found {counts}.")
    return next(iter(counts))


def _move(tree: Any, front: bool) -> Any:
    def move(w: LoraWeights) -> LoraWeights:
        n = len(w.layout.stack_axes)
        src, dst = (n, 0) if front else (0, n)
        return dataclasses.replace(w, a=jnp.moveaxis(w.a, src, dst), b=jnp.moveaxis(w.b, src, dst))

    return jax.tree.map(move, tree, is_leaf=_is_lora)


def to_front(tree: Any) -> Any:
    """Every stacked ``a`` and ``b`` (or a gradient shaped like them) with its adapter axis
    first."""
    return _move(tree, front=True)


def to_place(tree: Any) -> Any:
    """The inverse of `to_front`: the adapter axis back after the layout's stack axes."""
    return _move(tree, front=False)


def per_adapter_norms(front: Any, k: int) -> jax.Array:
    """``(k,)``: the global norm of each adapter's slice of a tree from `to_front`."""
    total = jnp.zeros((k,), jnp.float32)
    for x in jax.tree.leaves(front):
        total += jnp.sum(jnp.square(x.astype(jnp.float32)).reshape(k, -1), axis=1)
    return jnp.sqrt(total)


def check_per_adapter(opt_state: Any, k: int) -> None:
    """A ValueError when `opt_state` is not stacked per adapter (k first on every leaf)."""
    for path, x in jax.tree_util.tree_leaves_with_path(opt_state):
        if jnp.ndim(x) == 0 or jnp.shape(x)[0] != k:
            raise ValueError(
                f"`state.opt_state` leaf {jax.tree_util.keystr(path)} has shape "
                f"{jnp.shape(x)}, but a state of {k} stacked adapters keeps one optimizer "
                f"state per adapter (k={k} first on every leaf): make it with "
                f"lj.multi.init_state, not lj.TrainState.create."
            )


def _select(present: jax.Array, new: Any, old: Any) -> Any:
    def keep(n: jax.Array, o: jax.Array) -> jax.Array:
        return jnp.where(present.reshape((-1,) + (1,) * (jnp.ndim(n) - 1)), n, o)

    return jax.tree.map(keep, new, old)


def update_adapters(
    optimizer: optax.GradientTransformation,
    grads: Any,
    opt_state: Any,
    lora: Any,
    present: jax.Array,
    multipliers: jax.Array | None,
) -> tuple[Any, Any]:
    """``(lora, opt_state)`` after one optimizer update per adapter (vmapped); adapters where
    `present` is False keep their weights and optimizer state bit for bit."""
    params = to_front(lora)
    updates, new_opt = jax.vmap(optimizer.update)(to_front(grads), opt_state, params)
    if multipliers is not None:
        shaped = lambda u: multipliers.reshape((-1,) + (1,) * (u.ndim - 1)).astype(u.dtype)
        updates = jax.tree.map(lambda u: u * shaped(u), updates)
    new_params = _select(present, optax.apply_updates(params, updates), params)
    return to_place(new_params), _select(present, new_opt, opt_state)


def init_state(
    stacked: Any, optimizer: optax.GradientTransformation, *, key: jax.Array
) -> TrainState:
    """A fresh `TrainState` for k stacked adapters, with an optimizer state per adapter.

    Like `lora_jax.TrainState.create`, but ``optimizer.init`` runs on each adapter alone
    (vmapped), so every optimizer-state leaf has the adapter axis k first (Adam's count
    has shape ``(k,)``). `lora_jax.multi.make_train_step` takes this state.

    Args:
        stacked: adapters from `lora_jax.multi.stack_adapters`.
        optimizer: any optax transformation, as for one adapter.
        key: PRNG key for dropout and any randomness in the loss.

    Returns:
        A `TrainState` at step 0 holding a copy of `stacked`.

    Raises:
        ValueError: `stacked` does not hold stacked adapters, or holds DoRA magnitudes or
            lora_bias (the path is named).
        TypeError: `key` is not a PRNG key.

    Example:
        >>> import jax, jax.numpy as jnp, optax, lora_jax as lj
        >>> config = lj.LoraConfig(rank=2, targets="w")
        >>> _, lora = lj.split({"w": jnp.ones((4, 3))}, config, key=jax.random.key(0))
        >>> stacked = lj.multi.stack_adapters([lora, lora, lora])
        >>> state = lj.multi.init_state(stacked, optax.adam(1e-3), key=jax.random.key(1))
        >>> state.opt_state[0].count.shape, state.opt_state[0].mu["w"].a.shape
        ((3,), (3, 4, 2))
    """
    key = check_key(key, "lj.multi.init_state")
    adapter_count(stacked, "stacked")
    lora = jax.tree.map(jnp.array, stacked)  # own copies: the step donates them
    opt_state = jax.vmap(optimizer.init)(to_front(lora))
    zero = lambda: jnp.zeros((), jnp.int32)
    return TrainState(step=zero(), lora=lora, opt_state=opt_state, rng=key, skipped=zero())


def put_adapter(
    state: TrainState, i: int, lora: Any, optimizer: optax.GradientTransformation
) -> TrainState:
    """`state` with adapter `i` replaced by `lora` and its optimizer state reset.

    Adapter i's factors and scale become `lora`'s (`lora_jax.multi.replace_adapter`) and
    its optimizer-state slice becomes ``optimizer.init(lora)``; every other adapter's
    weights and optimizer state are untouched, bit for bit. The step, rng and skip count
    are kept.

    Args:
        state: a state from `lora_jax.multi.init_state` (or a step of it), on one device.
        i: which adapter, ``0 <= i < k``.
        lora: one adapter with the stacked ones' targets, layouts and ranks (pad a smaller
            one with `lora_jax.multi.pad_rank`).
        optimizer: the optimizer the state was made with.

    Returns:
        A new `TrainState`.

    Raises:
        IndexError: `i` is not in ``0..k-1``.
        ValueError: `lora` does not fit the stack, or `state` is not per adapter.

    Example:
        >>> import jax, jax.numpy as jnp, optax, lora_jax as lj
        >>> config = lj.LoraConfig(rank=2, targets="w")
        >>> _, lora = lj.split({"w": jnp.ones((4, 3))}, config, key=jax.random.key(0))
        >>> tx = optax.adam(1e-3)
        >>> state = lj.multi.init_state(lj.multi.stack_adapters([lora, lora]), tx,
        ...                             key=jax.random.key(1))
        >>> new = lj.multi.put_adapter(state, 1, jax.tree.map(jnp.ones_like, lora), tx)
        >>> a = new.lora["w"].a
        >>> float(a[1].sum()), bool((a[0] == lora["w"].a).all())
        (8.0, True)
    """
    k = adapter_count(state.lora)
    check_per_adapter(state.opt_state, k)
    stacked = replace_adapter(state.lora, i, lora)
    # optimizer.init(lora), in the stacked tree's structure (its static scale is a tuple)
    one = optimizer.init(jax.tree.map(lambda x: x[i], to_front(stacked)))
    opt_state = jax.tree.map(lambda s, o: s.at[i].set(o), state.opt_state, one)
    return dataclasses.replace(state, lora=stacked, opt_state=opt_state)


def take_adapter(state: TrainState, i: int) -> dict[str, Any]:
    """Adapter `i` of a multi-adapter state, alone: ``unstack_adapter(state.lora, i)``.

    The result is a plain adapter tree at the stacked rank, ready for
    `lora_jax.save_adapter`, `lora_jax.peft.export_adapter` or `lora_jax.merge` (an adapter
    padded with `lora_jax.multi.pad_rank` comes back to its own rank with
    `lora_jax.multi.trim_rank`).

    Args:
        state: a state from `lora_jax.multi.init_state` (or a step of it), on one device.
        i: which adapter, ``0 <= i < k``.

    Returns:
        A nested dict of `LoraWeights`, with adapter i's own scale.

    Raises:
        IndexError: `i` is not in ``0..k-1``.

    Example:
        >>> import jax, jax.numpy as jnp, optax, lora_jax as lj
        >>> config = lj.LoraConfig(rank=2, targets="w")
        >>> _, lora = lj.split({"w": jnp.ones((4, 3))}, config, key=jax.random.key(0))
        >>> state = lj.multi.init_state(lj.multi.stack_adapters([lora, lora]), optax.sgd(0.1),
        ...                             key=jax.random.key(1))
        >>> lj.multi.take_adapter(state, 1)["w"].a.shape
        (4, 2)
    """
    return unstack_adapter(state.lora, i)
