"""A `TrainState` as a checkpoint step stores it: plain arrays (typed PRNG keys as their raw
key data), the abstract target a restore reads into, and the state rebuilt from them."""

from __future__ import annotations

from typing import Any

import jax

from lora_jax.training._state import TrainState

__all__ = ["abstract", "from_storable", "storable"]


def storable(state: TrainState) -> dict[str, Any]:
    """The state as a dict of arrays: step, lora, opt_state, raw rng key data, skipped.

    Args:
        state: the training state.

    Returns:
        The dict orbax writes.
    """
    return {
        "step": state.step,
        "lora": state.lora,
        "opt_state": state.opt_state,
        "rng": jax.random.key_data(state.rng),
        "skipped": state.skipped,
    }


def abstract(tree: Any) -> Any:
    """Every leaf as a `jax.ShapeDtypeStruct` keeping its sharding (a restore target).

    Args:
        tree: arrays (or shape/dtype structs).

    Returns:
        The same tree of structs.
    """

    def spec(x: Any) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))

    return jax.tree.map(spec, tree)


def from_storable(stored: dict[str, Any], target: TrainState) -> TrainState:
    """The `TrainState` of a restored dict, its rng wrapped with `target`'s key impl.

    Args:
        stored: what `storable` gave, as restored.
        target: the restore target (for the PRNG implementation).

    Returns:
        The state.
    """
    return TrainState(
        step=stored["step"],
        lora=stored["lora"],
        opt_state=stored["opt_state"],
        rng=jax.random.wrap_key_data(stored["rng"], impl=jax.random.key_impl(target.rng)),
        skipped=stored["skipped"],
    )
