"""`TrainState`: everything that changes during training (the frozen base is not in it)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct

from lora_jax.core._init import check_key

__all__ = ["TrainState"]


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

        Raises:
            TypeError: `key` is not a PRNG key (e.g. ``key=0``).

        Example:
            >>> import jax, jax.numpy as jnp, optax, lora_jax as lj
            >>> params = {"w": jnp.ones((4, 3))}
            >>> config = lj.LoraConfig(rank=2, targets="w")
            >>> frozen, lora = lj.split(params, config, key=jax.random.key(0))
            >>> state = lj.TrainState.create(lora, optax.sgd(0.1), key=jax.random.key(1))
            >>> int(state.step)
            0
        """
        key = check_key(key, "TrainState.create")
        # Own copies (adapters are small): the step donates the state's buffers, and the
        # caller's `lora` must stay usable. Two zero scalars: each buffer is donated once.
        lora = jax.tree.map(jnp.array, lora)
        zero = lambda: jnp.zeros((), jnp.int32)
        return cls(step=zero(), lora=lora, opt_state=optimizer.init(lora), rng=key, skipped=zero())
