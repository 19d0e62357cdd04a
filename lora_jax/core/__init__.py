"""The framework-free core: adapters, configs, layouts, targets, merging and the kernel math.

Most of it is re-exported at the top of `lora_jax`; this namespace holds the rest:

    >>> import lora_jax as lj
    >>> lj.core.INITS
    ('normal', 'kaiming_uniform', 'gaussian', 'pissa', 'olora')
"""

from lora_jax.core._config import INITS
from lora_jax.core._split import select_targets
from lora_jax.core._summary import Summary
from lora_jax.core._weights import delta

__all__ = ["INITS", "Summary", "delta", "select_targets"]
