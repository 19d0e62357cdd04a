"""A small learnable task, shared by the training tests and the multi-process worker.

The teacher is the base model with a random low-rank change to both kernels, so rank-4
adapters can fit it exactly and the loss has somewhere to go.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh
from models import Mlp

import lora_jax as lj

IN, HIDDEN, OUT, BATCH = 32, 128, 32, 16
CONFIG = lj.LoraConfig(rank=4, alpha=8.0, targets=".*/kernel")
MODEL = Mlp(hidden=HIDDEN, out=OUT)
APPLY = lj.lora_apply(MODEL.apply)


def base() -> dict:
    return MODEL.init(jax.random.key(0), jnp.zeros((1, IN)))


def teacher(variables: dict) -> dict:
    def bump(path, w):
        if w.ndim != 2:
            return w
        k1, k2 = jax.random.split(jax.random.fold_in(jax.random.key(9), w.shape[0]))
        return w + 0.3 * jax.random.normal(k1, (w.shape[0], 2)) @ jax.random.normal(
            k2, (2, w.shape[1])
        ) / np.sqrt(w.shape[0])

    return jax.tree_util.tree_map_with_path(bump, variables)


def batches(n: int, size: int = BATCH, seed: int = 1) -> list[dict]:
    target = teacher(base())
    out = []
    for i in range(n):
        x = jax.random.normal(jax.random.fold_in(jax.random.key(seed), i), (size, IN))
        out.append({"x": np.asarray(x), "y": np.asarray(MODEL.apply(target, x))})
    return out


def loss_fn(frozen, lora, batch, key):
    del key
    pred = APPLY(frozen, lora, batch["x"])
    return jnp.mean((pred.astype(jnp.float32) - batch["y"]) ** 2)


def optimizer() -> optax.GradientTransformation:
    return optax.adam(3e-2)


def start(seed: int = 2):
    frozen, lora = lj.split(base(), CONFIG, key=jax.random.key(seed))
    return frozen, lj.TrainState.create(lora, optimizer(), key=jax.random.key(seed + 1))


def strategy_named(name: str, fsdp: bool = False) -> lj.parallel.Strategy:
    """The strategy a test names: ``"jit"``, ``"pmap"`` (4 devices) or ``"mesh"`` (4 devices
    on ``("data",)``, or with `fsdp` a 2x2 ``("data", "fsdp")`` mesh)."""
    if name == "pmap":
        return lj.parallel.pmap(jax.devices()[:4])
    if name == "mesh":
        shape, names = ((2, 2), ("data", "fsdp")) if fsdp else ((4,), ("data",))
        mesh = Mesh(np.array(jax.devices()[:4]).reshape(shape), names)
        return lj.parallel.mesh(mesh, fsdp_axis="fsdp" if fsdp else None)
    return lj.parallel.jit()


def run_strategy(
    loss, frozen, state, strategy: str, data, fsdp: bool = False, place: bool = True, **kw
):
    """Trains `state` on `data` with one of the step strategies (see `strategy_named`),
    placing everything through the strategy itself (with ``place=False`` the arrays go in
    as they are: the mesh step places them). Returns the final state (one copy; for mesh
    the placed state, to check its shardings) and the last metrics (one value each)."""
    chosen = strategy_named(strategy, fsdp)
    step = lj.make_train_step(loss, optimizer(), strategy=chosen, **kw)
    if place:
        state, frozen = chosen.place_state(state, frozen), chosen.place_frozen(frozen)
    for b in data:
        state, metrics = step(state, frozen, chosen.place_batch(b) if place else b)
    if strategy == "mesh":
        return state, chosen.metrics(metrics)
    return chosen.gather(state), chosen.metrics(metrics)


def assert_close(got, want, rtol=1e-5):
    """Every leaf within `rtol` of the largest magnitude of its reference."""
    for g, w in zip(jax.tree.leaves(to_numpy(got)), jax.tree.leaves(to_numpy(want)), strict=True):
        assert np.abs(g - w).max() <= rtol * np.abs(w).max(), np.abs(g - w).max()


def train_counting(loss, frozen, state, data):
    """Trains with the jit step, counting traces, and checks that the base comes out bit
    for bit as it went in. Returns the state, the losses and the number of traces."""
    before = jax.tree.map(np.array, frozen)
    traces = []

    def counted(frozen, lora, batch, key):
        traces.append(1)
        return loss(frozen, lora, batch, key)

    step = lj.make_train_step(counted, optimizer())
    losses = []
    for b in data:
        state, metrics = step(state, frozen, b)
        losses.append(float(metrics["loss"]))
    for got, want in zip(jax.tree.leaves(frozen), jax.tree.leaves(before), strict=True):
        np.testing.assert_array_equal(np.asarray(got), want)
    return state, losses, len(traces)


def train_adapters_only(loss, frozen, lora, data):
    """Trains one combined ``{"frozen", "lora"}`` tree with `lj.optim.adapters_only` (for
    users who keep one tree). Returns the trained tree and the optimizer state's size."""
    tx = lj.optim.adapters_only(optimizer())
    params = {"frozen": frozen, "lora": lora}
    opt_state = tx.init(params)
    size = sum(x.size for x in jax.tree.leaves(opt_state))

    @jax.jit
    def step(params, opt_state, batch):
        grads = jax.grad(lambda p: loss(p["frozen"], p["lora"], batch, None))(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    for b in data:
        params, opt_state = step(params, opt_state, b)
    return params, size


def to_numpy(tree):
    """Host copies of every leaf (global arrays gathered across processes)."""
    from jax.experimental import multihost_utils

    def host(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(x)

    return jax.tree.map(host, tree)


# ---- the same task for k adapters trained together (lj.multi.make_train_step) ------------

MIXED = lj.multi.lora_apply_mixed(MODEL.apply)
ADAPTERS = 3


def multi_loss_fn(frozen, stacked, batch, key):
    """Per-example losses, each example through its own adapter."""
    del key
    pred = MIXED(frozen, stacked, batch["adapter_ids"], batch["x"])
    return jnp.mean((pred.astype(jnp.float32) - batch["y"]) ** 2, axis=-1)


def multi_start(seed: int = 2):
    frozen, _ = lj.split(base(), CONFIG, key=jax.random.key(seed))
    loras = [lj.split(base(), CONFIG, key=jax.random.key(seed + 10 * i))[1] for i in range(3)]
    state = lj.multi.init_state(
        lj.multi.stack_adapters(loras), optimizer(), key=jax.random.key(seed + 1)
    )
    return frozen, state


def multi_batches(n: int) -> list[dict]:
    """`batches(n)` with an adapter id per example: uneven shares, some -1, adapter 2
    absent from the first step, and each adapter's examples unevenly split between the two
    halves of a batch (the two processes' parts)."""
    rng = np.random.default_rng(0)
    out = []
    for i, b in enumerate(batches(n)):
        ids = rng.choice([-1, 0, 1, 2], size=BATCH, p=[0.1, 0.5, 0.25, 0.15])
        if i == 0:
            ids[ids == 2] = 1
        out.append({**b, "adapter_ids": ids.astype(np.int32)})
    return out
