"""Next-token losses with per-token weights, and the learning-rate schedule and optimizers.

Batches are ``{"inputs", "targets", "weights"}`` (see `train.data`). The training loss is
``sum(weights · nll) / tokens``: dividing by the (fixed) number of token slots instead of
by the weight sum makes the average over devices, micro-batches or processes equal the
loss of the whole batch, so every strategy trains the same adapters. The reported loss
is ``sum(weights · nll) / sum(weights)`` (nats per predicted token).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

__all__ = ["decay_mask", "make_optimizer", "schedule", "token_nll"]


def token_nll(logits: Any, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Weighted negative log-likelihood of the targets, in float32.

    Args:
        logits: ``(batch, seq, vocab)``.
        batch: with ``targets`` ``(batch, seq)`` int and ``weights`` ``(batch, seq)``.

    Returns:
        ``{"loss": sum(w·nll) / slots, "nll_sum": sum(w·nll), "weight": sum(w)}``.

    Example:
        >>> import jax.numpy as jnp
        >>> b = {"targets": jnp.array([[0, 1]]), "weights": jnp.array([[1.0, 0.0]])}
        >>> out = token_nll(jnp.zeros((1, 2, 4)), b)
        >>> round(float(out["nll_sum"]), 4), float(out["weight"])
        (1.3863, 1.0)
    """
    logits = logits.astype(jnp.float32)
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
    w = batch["weights"].astype(jnp.float32)
    total = (nll * w).sum()
    return {"loss": total / w.size, "nll_sum": total, "weight": w.sum()}


def schedule(lr: float, *, steps: int, warmup_steps: int, min_lr_ratio: float) -> optax.Schedule:
    """Linear warmup from 0 to `lr`, then cosine decay to ``lr * min_lr_ratio`` at `steps`.

    Example:
        >>> f = schedule(1.0, steps=10, warmup_steps=2, min_lr_ratio=0.1)
        >>> [round(float(f(i)), 3) for i in (0, 2, 10)]
        [0.0, 1.0, 0.1]
    """
    warmup = min(warmup_steps, max(steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=lr,
        warmup_steps=warmup,
        decay_steps=max(steps, warmup + 1),
        end_value=lr * min_lr_ratio,
    )


def decay_mask(params: Any) -> Any:
    """True for leaves that weight decay applies to: matrices, not norms or biases.

    Example:
        >>> import jax.numpy as jnp
        >>> decay_mask({"kernel": jnp.ones((2, 2)), "scale": jnp.ones(2)})
        {'kernel': True, 'scale': False}
    """
    return jax.tree.map(lambda x: x.ndim >= 2, params)


def make_optimizer(
    lr: optax.ScalarOrSchedule,
    *,
    weight_decay: float,
    clip_norm: float,
    mask: Any | Callable[[Any], Any] | None = None,
) -> optax.GradientTransformation:
    """Global-norm clipping (skipped when `clip_norm` is 0), then AdamW.

    Used on the adapter tree alone for LoRA, so weight decay touches adapters only.

    Args:
        lr: learning rate or schedule.
        weight_decay: decoupled weight decay.
        clip_norm: clip gradients to this global norm; 0 turns clipping off.
        mask: which leaves get weight decay (default: all the optimizer sees).

    Returns:
        The optax transformation.

    Example:
        >>> import jax.numpy as jnp
        >>> tx = make_optimizer(1e-3, weight_decay=0.0, clip_norm=1.0)
        >>> _ = tx.init({"a": jnp.zeros(3)})
    """
    adamw = optax.adamw(lr, weight_decay=weight_decay, mask=mask)
    return optax.chain(optax.clip_by_global_norm(clip_norm), adamw) if clip_norm else adamw
