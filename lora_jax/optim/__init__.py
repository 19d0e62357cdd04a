"""Optax pieces for adapters: `adapters_only(tx)`, `adapter_mask(tree)`, `loraplus(ratio)`.

>>> import lora_jax as lj
>>> sorted(lj.optim.__all__)
['adapter_mask', 'adapters_only', 'loraplus']
"""

from lora_jax.optim._transforms import adapter_mask, adapters_only, loraplus

__all__ = ["adapter_mask", "adapters_only", "loraplus"]
