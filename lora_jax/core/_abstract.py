"""Abstract evaluation with static arguments left as Python values."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np

_ARRAYS = (jax.Array, np.ndarray, np.generic, jax.ShapeDtypeStruct)


def eval_shape(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """`jax.eval_shape(fn, ...)` where only array leaves (or ShapeDtypeStructs) are traced.

    Flags, strings and methods in the arguments stay Python values, so a model's
    ``if train:`` still works; no FLOPs are spent.
    """
    leaves, treedef = jax.tree_util.tree_flatten((args, kwargs))
    dynamic = [i for i, leaf in enumerate(leaves) if isinstance(leaf, _ARRAYS)]

    def call(*values: Any) -> Any:
        full = list(leaves)
        for i, value in zip(dynamic, values, strict=True):
            full[i] = value
        a, k = jax.tree_util.tree_unflatten(treedef, full)
        return fn(*a, **k)

    return jax.eval_shape(call, *(leaves[i] for i in dynamic))
