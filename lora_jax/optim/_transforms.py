"""Optimizers for adapters: a mask for combined trees, and LoRA+ as an optax transformation.

The usual path needs neither mask nor wrapper: give the optimizer the ``lora`` tree alone
(``tx.init(lora)``), so it never sees the base. For code that keeps base and adapters in one
tree, `masked` updates only the adapters' ``a``/``b`` leaves and keeps no optimizer state
for anything else.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import optax

from lora_jax.core import _paths
from lora_jax.core._config import LoraConfig
from lora_jax.core._weights import LoraWeights

__all__ = ["lora_mask", "masked", "loraplus"]

_is_lora = lambda x: isinstance(x, LoraWeights)


def _config_targets(config: LoraConfig, path: str, w: LoraWeights) -> bool:
    """Whether `config` targets `path` or a trailing part of it (the lora tree's own path)."""
    parts = path.split("/")
    return any(config.matched_by("/".join(parts[i:]), w, w.layout.kind) for i in range(len(parts)))


def lora_mask(tree: Any, config: LoraConfig) -> Any:
    """A boolean pytree shaped like `tree`: True at the ``a``/``b`` leaves of every adapter.

    Args:
        tree: any pytree that holds base parameters and `LoraWeights` together, e.g.
            ``{"frozen": frozen, "lora": lora}``.
        config: the config the adapters were made with; every adapter found must be one of
            its targets (a guard against mixing trees from different configs).

    Returns:
        A pytree of bools with the structure of `tree`.

    Raises:
        ValueError: `tree` holds no adapter, or an adapter `config` does not target.

    Example:
        >>> import jax, jax.numpy as jnp, lora_jax as lj
        >>> params = {"params": {"fc": {"kernel": jnp.ones((4, 3))}}}
        >>> config = lj.LoraConfig(rank=2, targets=".*/kernel")
        >>> frozen, lora = lj.split(params, config, key=jax.random.key(0))
        >>> mask = lj.lora_mask({"frozen": frozen, "lora": lora}, config)
        >>> jax.tree.leaves(mask)
        [False, True, True]
    """
    found = _paths.flatten(tree, is_leaf=_is_lora)
    adapters = {p: w for p, w in found.items() if isinstance(w, LoraWeights)}
    if not adapters:
        raise ValueError("`tree` holds no LoraWeights: nothing for the optimizer to train.")
    for path, w in adapters.items():
        if not _config_targets(config, path, w):
            raise ValueError(
                f"{path}: this adapter is not a target of `config` (targets={config.targets!r})."
            )
    return jax.tree.map(
        lambda x: jax.tree.map(lambda _: True, x) if _is_lora(x) else False, tree, is_leaf=_is_lora
    )


def masked(
    tx: optax.GradientTransformation, mask: LoraConfig | Any | Callable[[Any], Any]
) -> optax.GradientTransformation:
    """`tx` on the adapters of a combined tree; every other leaf gets a zero update.

    Built on `optax.partition`: `tx` sees only the ``a``/``b`` leaves and keeps state only
    for them; the rest go to `optax.set_to_zero`, which keeps none. With this, training
    a ``{"frozen": ..., "lora": ...}`` tree gives the same adapters as ``tx`` on the lora
    tree alone, and the base comes out bit-identical.

    Args:
        tx: any optax transformation.
        mask: a `LoraConfig` (the mask is `lora_mask(params, config)`), a boolean pytree,
            or a callable ``params -> boolean pytree``.

    Returns:
        An optax `GradientTransformation`.

    Example:
        >>> import jax, jax.numpy as jnp, optax, lora_jax as lj
        >>> params = {"params": {"fc": {"kernel": jnp.ones((4, 3))}}}
        >>> config = lj.LoraConfig(rank=2, targets=".*/kernel")
        >>> frozen, lora = lj.split(params, config, key=jax.random.key(0))
        >>> tx = lj.masked(optax.adam(1e-3), config)
        >>> state = tx.init({"frozen": frozen, "lora": lora})
        >>> sum(x.size for x in jax.tree.leaves(state))  # adam's mu and nu for a and b only
        29
    """
    if isinstance(mask, LoraConfig):
        config = mask
        mask = lambda params: lora_mask(params, config)

    def labels(params: Any) -> Any:
        m = mask(params) if callable(mask) else mask
        return jax.tree.map(lambda t: "lora" if t else "frozen", m)

    return optax.partition({"lora": tx, "frozen": optax.set_to_zero()}, labels)


def loraplus(lr_ratio: float) -> optax.GradientTransformation:
    """LoRA+: scales the updates of every ``b`` by `lr_ratio` (PEFT's ``loraplus_lr_ratio``).

    Chain it after the optimizer: ``optax.chain(optax.adamw(lr), lj.loraplus(16.0))``
    trains ``b`` at ``16 · lr`` and ``a`` at ``lr``, with decoupled weight decay scaled the
    same way, as in LoRA+ (Hayou et al., 2024). Stateless; works on a lora tree or a
    combined tree.

    Args:
        lr_ratio: learning-rate multiplier for ``b``, > 0 (LoRA+ suggests about 16).

    Returns:
        An optax `GradientTransformation`.

    Raises:
        ValueError: `lr_ratio` is not > 0.

    Example:
        >>> import jax, jax.numpy as jnp, optax, lora_jax as lj
        >>> w = lj.LoraWeights(jnp.ones((2, 1)), jnp.ones((1, 2)), lj.Layout("matrix", (0,), (1,)))
        >>> tx = lj.loraplus(4.0)
        >>> updates, _ = tx.update({"w": w}, tx.init({"w": w}))
        >>> updates["w"].a.tolist(), updates["w"].b.tolist()
        ([[1.0], [1.0]], [[4.0, 4.0]])
    """
    if not isinstance(lr_ratio, (int, float)) or not lr_ratio > 0:
        raise ValueError(f"`lr_ratio` must be a number > 0; found {lr_ratio!r}.")

    def update(updates: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
        del params
        scale_b = lambda x: x.replace(b=x.b * lr_ratio) if _is_lora(x) else x
        return jax.tree.map(scale_b, updates, is_leaf=_is_lora), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)
