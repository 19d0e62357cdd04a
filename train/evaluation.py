"""Evaluation: the weighted next-token loss of a model over fixed held-out batches."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import jax
import numpy as np

from train.losses import token_nll

__all__ = ["eval_loss", "make_eval_fn"]


def make_eval_fn(logits_fn: Callable[..., Any]) -> Callable[..., Any]:
    """Jits ``(params, batch) -> (nll_sum, weight)`` from ``logits_fn(params, inputs)``.

    Example:
        >>> import jax.numpy as jnp
        >>> fn = make_eval_fn(lambda p, ids: jnp.zeros(ids.shape + (4,)))
        >>> b = {"inputs": jnp.zeros((1, 2), int), "targets": jnp.zeros((1, 2), int),
        ...      "weights": jnp.ones((1, 2))}
        >>> [round(float(v), 3) for v in fn(None, b)]
        [2.773, 2.0]
    """

    @jax.jit
    def fn(params: Any, batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
        out = token_nll(logits_fn(params, batch["inputs"]), batch)
        return out["nll_sum"], out["weight"]

    return fn


def eval_loss(eval_fn: Callable[..., Any], params: Any, batches: Iterable[dict]) -> float:
    """Mean loss (nats per weighted token) of `params` over `batches`.

    Args:
        eval_fn: from `make_eval_fn`.
        params: what `eval_fn` takes.
        batches: batches with ``inputs``, ``targets`` and ``weights``.

    Returns:
        ``sum(w·nll) / sum(w)`` over all batches.

    Raises:
        ValueError: when the batches hold no weighted token.

    Example:
        >>> import jax.numpy as jnp
        >>> fn = make_eval_fn(lambda p, ids: jnp.zeros(ids.shape + (4,)))
        >>> b = {"inputs": jnp.zeros((1, 2), int), "targets": jnp.zeros((1, 2), int),
        ...      "weights": jnp.ones((1, 2))}
        >>> round(eval_loss(fn, None, [b, b]), 4)
        1.3863
    """
    sums = [eval_fn(params, b) for b in batches]
    total = float(np.sum([float(s) for s, _ in sums]))
    weight = float(np.sum([float(w) for _, w in sums]))
    if weight == 0:
        raise ValueError("the evaluation batches hold no token with a nonzero loss weight.")
    return total / weight
