"""Many adapters on one base: pad, stack and unstack, serve mixed batches, train k adapters
in one step, combine, merge several. Every adapter carries its own scale, so none of these
takes a config.

    >>> import lora_jax as lj
    >>> "stack_adapters" in lj.multi.__all__
    True
"""

from lora_jax._mixed import lora_apply_mixed
from lora_jax.multi._combine import COMBINATIONS, combine_adapters
from lora_jax.multi._merge_many import merge_many, unmerge_many
from lora_jax.multi._optim import init_state, put_adapter, take_adapter
from lora_jax.multi._rank import pad_rank, trim_rank
from lora_jax.multi._stack import replace_adapter, stack_adapters, unstack_adapter
from lora_jax.multi._train import make_train_step

__all__ = [
    "COMBINATIONS",
    "combine_adapters",
    "init_state",
    "lora_apply_mixed",
    "make_train_step",
    "merge_many",
    "pad_rank",
    "put_adapter",
    "replace_adapter",
    "stack_adapters",
    "take_adapter",
    "trim_rank",
    "unmerge_many",
    "unstack_adapter",
]
