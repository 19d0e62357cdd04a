"""Optax pieces for adapters: train only the adapters of a combined tree, a mask for
`optax.masked`, and LoRA+.

The usual path needs none of them: give the optimizer the ``lora`` tree alone
(``tx.init(lora)``), so it never sees the base. For code that keeps base and adapters in one
tree, `adapters_only` updates only the adapters' ``a``/``b`` leaves, gives every other leaf
a zero update and keeps no optimizer state for it. `adapter_mask` is the mask itself, for
composing with optax's own transforms (with their own meaning: see its docstring).
"""

from __future__ import annotations

from typing import Any

import jax
import optax

from lora_jax.core._weights import LoraWeights

__all__ = ["adapter_mask", "adapters_only", "loraplus"]

_is_lora = lambda x: isinstance(x, LoraWeights)


def adapter_mask(tree: Any) -> Any:
    """A boolean pytree shaped like `tree`: True at the ``a``/``b`` leaves of every adapter.

    Every other leaf is False. With ``optax.masked(tx, adapter_mask(tree))`` the mask has
    optax's own meaning: ``a``/``b`` get `tx`'s updates, and every other leaf passes its
    incoming update through *unchanged* (not zeroed). To train only the adapters of a
    combined tree, use `adapters_only`, which gives the other leaves a zero update.

    Args:
        tree: any pytree holding `LoraWeights`, e.g. ``{"frozen": frozen, "lora": lora}``
            (or the gradients or updates of one).

    Returns:
        A pytree of bools with the structure of `tree`.

    Raises:
        ValueError: `tree` holds no `LoraWeights`.

    Example:
        >>> import jax, jax.numpy as jnp, lora_jax as lj
        >>> params = {"params": {"fc": {"kernel": jnp.ones((4, 3))}}}
        >>> config = lj.LoraConfig(rank=2, targets=".*/kernel")
        >>> frozen, lora = lj.split(params, config, key=jax.random.key(0))
        >>> jax.tree.leaves(lj.optim.adapter_mask({"frozen": frozen, "lora": lora}))
        [False, True, True]
    """
    if not any(map(_is_lora, jax.tree.leaves(tree, is_leaf=_is_lora))):
        raise ValueError("`tree` holds no LoraWeights: no adapter for the optimizer to train.")
    return jax.tree.map(
        lambda x: jax.tree.map(lambda _: True, x) if _is_lora(x) else False, tree, is_leaf=_is_lora
    )


def adapters_only(tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """`tx` on the adapters of a combined tree; every other leaf gets a zero update.

    Built on `optax.partition`: `tx` sees only the ``a``/``b`` leaves (`adapter_mask`) and
    keeps state only for them; the rest go to `optax.set_to_zero`, which keeps none. So
    training a ``{"frozen": ..., "lora": ...}`` tree gives the same adapters as `tx` on the
    lora tree alone, and the base comes out bit-identical.

    Args:
        tx: any optax transformation.

    Returns:
        An optax `GradientTransformation`.

    Example:
        >>> import jax, jax.numpy as jnp, optax, lora_jax as lj
        >>> params = {"params": {"fc": {"kernel": jnp.ones((4, 3))}}}
        >>> config = lj.LoraConfig(rank=2, targets=".*/kernel")
        >>> frozen, lora = lj.split(params, config, key=jax.random.key(0))
        >>> tx = lj.optim.adapters_only(optax.adam(1e-3))
        >>> state = tx.init({"frozen": frozen, "lora": lora})
        >>> sum(x.size for x in jax.tree.leaves(state))  # adam's mu and nu for a and b only
        29
    """

    def labels(params: Any) -> Any:
        return jax.tree.map(lambda t: "adapter" if t else "other", adapter_mask(params))

    return optax.partition({"adapter": tx, "other": optax.set_to_zero()}, labels)


def loraplus(lr_ratio: float) -> optax.GradientTransformation:
    """LoRA+: scales the updates of every ``b`` by `lr_ratio` (PEFT's ``loraplus_lr_ratio``).

    Chain it after the optimizer: ``optax.chain(optax.adamw(lr), lj.optim.loraplus(16.0))``
    trains ``b`` at ``16 · lr`` and ``a`` at ``lr``, with decoupled weight decay scaled the
    same way, as in LoRA+ (Hayou et al., 2024). DoRA's magnitude and a lora_bias are scaled
    like ``b``, as PEFT's ``create_loraplus_optimizer`` puts every 1-D adapter parameter in
    ``b``'s group. Stateless; works on a lora tree or a combined tree.

    Args:
        lr_ratio: learning-rate multiplier for ``b``, > 0 (LoRA+ suggests about 16).

    Returns:
        An optax `GradientTransformation`.

    Raises:
        ValueError: `lr_ratio` is not > 0.

    Example:
        >>> import jax, jax.numpy as jnp, optax, lora_jax as lj
        >>> w = lj.LoraWeights(jnp.ones((2, 1)), jnp.ones((1, 2)), lj.Layout("matrix", (0,), (1,)))
        >>> tx = lj.optim.loraplus(4.0)
        >>> updates, _ = tx.update({"w": w}, tx.init({"w": w}))
        >>> updates["w"].a.tolist(), updates["w"].b.tolist()
        ([[1.0], [1.0]], [[4.0, 4.0]])
    """
    if isinstance(lr_ratio, bool) or not isinstance(lr_ratio, (int, float)) or not lr_ratio > 0:
        raise ValueError(f"`lr_ratio` must be a number > 0; found {lr_ratio!r}.")

    def update(updates: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
        del params
        times = lambda v: None if v is None else v * lr_ratio
        scale_b = lambda x: (
            x.replace(b=x.b * lr_ratio, magnitude=times(x.magnitude), bias=times(x.bias))
            if _is_lora(x)
            else x
        )
        return jax.tree.map(scale_b, updates, is_leaf=_is_lora), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)
