"""Flax linen: the factored low-rank path through `flax.linen.intercept_methods`.

`lora_jax.lora_apply`, `lora_jax.routes` and `lora_jax.infer_layouts` dispatch here for a
linen ``model.apply``; `lora_apply_mixed` (also `lora_jax.multi.lora_apply_mixed`) runs a
batch with one adapter per example.
"""

from lora_jax.linen._apply import lora_apply, routes
from lora_jax.linen._infer import infer_layouts
from lora_jax.linen._mixed import lora_apply_mixed

__all__ = ["infer_layouts", "lora_apply", "lora_apply_mixed", "routes"]
