"""Many adapters on one base: pad, stack and unstack, serve mixed batches, combine, merge
several. Every adapter carries its own scale, so none of these takes a config.

    >>> import lora_jax as lj
    >>> "stack_adapters" in lj.multi.__all__
    True
"""

from lora_jax._mixed import lora_apply_mixed
from lora_jax.multi._combine import COMBINATIONS, combine_adapters
from lora_jax.multi._merge_many import merge_many, unmerge_many
from lora_jax.multi._stack import pad_rank, replace_adapter, stack_adapters, unstack_adapter

__all__ = [
    "COMBINATIONS",
    "combine_adapters",
    "lora_apply_mixed",
    "merge_many",
    "pad_rank",
    "replace_adapter",
    "stack_adapters",
    "unmerge_many",
    "unstack_adapter",
]
