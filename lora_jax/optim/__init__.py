"""Optax pieces for adapters.

    >>> import lora_jax as lj
    >>> "loraplus" in lj.optim.__all__
    True
"""

from lora_jax.optim._transforms import lora_mask, loraplus, masked

__all__ = ["lora_mask", "loraplus", "masked"]
