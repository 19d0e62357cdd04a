"""Training every weight: pretraining the built-in base, and the full fine-tuning baseline
that ``--compare-full`` measures LoRA against. One jitted step, one device.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np
import optax

from train.evaluation import eval_loss, make_eval_fn
from train.losses import decay_mask, make_optimizer, schedule, token_nll
from train.models import Llama, LlamaConfig
from train.report import Reporter

__all__ = ["FullResult", "train_full"]


@dataclasses.dataclass
class FullResult:
    """What a full training run produced."""

    variables: Any
    eval_loss: float | None
    train_loss: float | None
    tokens_per_s: float | None
    seconds: float
    opt_state_bytes: int


def _step_fn(model: Llama, optimizer: optax.GradientTransformation) -> Any:
    def step(variables: Any, opt_state: Any, batch: dict) -> tuple[Any, Any, dict]:
        def loss(v: Any) -> tuple[jax.Array, dict]:
            out = token_nll(model.apply(v, batch["inputs"]), batch)
            return out["loss"], out

        grads, out = jax.grad(loss, has_aux=True)(variables)
        updates, opt_state = optimizer.update(grads, opt_state, variables)
        return optax.apply_updates(variables, updates), opt_state, out

    return jax.jit(step, donate_argnums=(0, 1))


def train_full(
    config: LlamaConfig,
    variables: Any,
    batches: Iterator[dict],
    eval_sets: list[dict],
    *,
    steps: int,
    lr: float,
    warmup_steps: int,
    min_lr_ratio: float,
    weight_decay: float,
    clip_norm: float,
    log_every: int,
    eval_every: int,
    tokens_per_step: int,
    reporter: Reporter,
) -> FullResult:
    """Trains all weights of a Llama model with AdamW for `steps` steps.

    Weight decay applies to matrices only (not norms). The caller's `variables` are not
    modified (the loop trains a copy).

    Args:
        config: the model config.
        variables: ``{"params": ...}`` to start from.
        batches: an endless iterator of ``{"inputs", "targets", "weights"}`` batches.
        eval_sets: fixed evaluation batches.
        steps: how many steps.
        lr: peak learning rate (warmup then cosine).
        warmup_steps: linear warmup length.
        min_lr_ratio: final learning rate as a fraction of `lr`.
        weight_decay: AdamW decoupled weight decay.
        clip_norm: global-norm clipping (0: off).
        log_every: log the train loss every this many steps.
        eval_every: evaluate every this many steps (and at the end).
        tokens_per_step: tokens in one batch, for tokens/s.
        reporter: where metrics go.

    Returns:
        The `FullResult`.
    """
    model = Llama(config)
    optimizer = make_optimizer(
        schedule(lr, steps=steps, warmup_steps=warmup_steps, min_lr_ratio=min_lr_ratio),
        weight_decay=weight_decay,
        clip_norm=clip_norm,
        mask=decay_mask,
    )
    params = jax.tree.map(lambda x: jax.numpy.array(x, copy=True), variables)
    opt_state = optimizer.init(params)
    opt_bytes = sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(opt_state))
    step_fn = _step_fn(model, optimizer)
    eval_fn = make_eval_fn(model.apply)
    last_eval = last_train = None
    window: list[Any] = []
    timed_tokens, timed_seconds = 0, 0.0
    t0 = tick = time.perf_counter()
    for step in range(1, steps + 1):
        params, opt_state, out = step_fn(params, opt_state, next(batches))
        window.append(out)
        if step % log_every == 0 or step == steps:
            got = jax.device_get(window)
            last_train = sum(float(o["nll_sum"]) for o in got) / max(
                sum(float(o["weight"]) for o in got), 1e-9
            )
            now = time.perf_counter()
            if step > len(window):  # not the window that holds the compile
                timed_tokens += tokens_per_step * len(window)
                timed_seconds += now - tick
            tick = now
            reporter.log(step, "train", loss=last_train, tokens=tokens_per_step * len(window))
            window = []
        if step % eval_every == 0 or step == steps:
            last_eval = eval_loss(eval_fn, params, eval_sets)
            reporter.log(step, "eval", loss=last_eval)
            tick = time.perf_counter()
    return FullResult(
        variables=params,
        eval_loss=last_eval,
        train_loss=last_train,
        tokens_per_s=timed_tokens / timed_seconds if timed_seconds else None,
        seconds=time.perf_counter() - t0,
        opt_state_bytes=opt_bytes,
    )
