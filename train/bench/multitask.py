"""Training many adapters in one step: k adapters mixed in one batch (one example each,
`lj.multi.make_train_step` with per-adapter optimizer state) against one adapter trained
by `lj.make_train_step` on the same batch, same model, targets and rank."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

import lora_jax as lj
from train.bench.models import GPT, RANK, GPTConfig
from train.bench.steps import ALL_LINEAR, STOCK_ROUTE, Runner, require_routes

MULTITASK_ADAPTERS = 8  # adapters mixed in the batch, and the batch size


def _bytes(tree: object) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree) if hasattr(x, "dtype"))


def multitask_batch(cfg: GPTConfig) -> jax.Array:
    """``(MULTITASK_ADAPTERS, seq)`` token ids: one example per adapter."""
    return jax.random.randint(jax.random.key(3), (MULTITASK_ADAPTERS, cfg.seq), 0, cfg.vocab)


def _example_losses(logits: jax.Array, ids: jax.Array) -> jax.Array:
    """Each example's mean next-token cross-entropy, ``(batch,)``, in float32."""
    logits = logits[:, :-1].astype(jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean(axis=1)


def multitask_runners(model: GPT, variables: dict, ids: jax.Array) -> dict[str, Runner]:
    """``{"one": ..., "mixed": ...}``: a step of one adapter (all-linear, rank 8) on the
    batch, and a step of `MULTITASK_ADAPTERS` adapters, example i training adapter i."""
    k = ids.shape[0]
    config = lj.LoraConfig(rank=RANK, alpha=16.0, targets=ALL_LINEAR)
    loras = [lj.split(variables, config, key=jax.random.key(i))[1] for i in range(k)]
    frozen = lj.split(variables, config, key=jax.random.key(0))[0]
    require_routes(model, frozen, loras[0], ids, STOCK_ROUTE)
    tx = optax.adamw(1e-4)
    apply, mixed = lj.lora_apply(model.apply), lj.multi.lora_apply_mixed(model.apply)

    def one_loss(frozen, lora, batch, key):
        return _example_losses(apply(frozen, lora, batch["ids"]), batch["ids"]).mean()

    def mixed_loss(frozen, stacked, batch, key):
        logits = mixed(frozen, stacked, batch["adapter_ids"], batch["ids"])
        return _example_losses(logits, batch["ids"])

    one_step = lj.make_train_step(one_loss, tx)
    mixed_step = lj.multi.make_train_step(mixed_loss, tx)
    stacked = lj.multi.stack_adapters(loras)
    # Committed to the device, as the step's outputs are: one compile per step function.
    commit = lambda tree: jax.device_put(tree, jax.devices()[0])
    box = {
        "one": commit(lj.TrainState.create(loras[0], tx, key=jax.random.key(1))),
        "mixed": commit(lj.multi.init_state(stacked, tx, key=jax.random.key(1))),
    }
    batch = commit({"ids": ids, "adapter_ids": jnp.arange(k, dtype=jnp.int32)})
    frozen = commit(frozen)

    def run_one() -> None:
        box["one"], metrics = one_step(box["one"], frozen, batch)
        metrics["loss"].block_until_ready()

    def run_mixed() -> None:
        box["mixed"], metrics = mixed_step(box["mixed"], frozen, batch)
        metrics["loss"].block_until_ready()

    n = sum(x.size for x in jax.tree.leaves(loras[0]))
    return {
        "one": Runner(
            f"one adapter, batch {k} (lj.make_train_step)",
            run_one,
            n,
            _bytes(loras[0]),
            _bytes(box["one"].opt_state),
        ),
        "mixed": Runner(
            f"{k} adapters mixed in a batch of {k} (lj.multi.make_train_step)",
            run_mixed,
            n * k,
            _bytes(stacked),
            _bytes(box["mixed"].opt_state),
        ),
    }
