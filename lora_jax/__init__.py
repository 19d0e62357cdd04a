"""lora_jax: LoRA for JAX and Flax as a pure-function parameter transform.

    >>> import lora_jax as lj
    >>> config = lj.LoraConfig(rank=8, alpha=16.0, targets=r".*/(query|value)/kernel")

The core, at the top: `split` makes ``(frozen, lora)`` from a config (the only place a
config is needed: every adapter carries its own scale, layout and dropout rate),
`lora_apply` runs the model with the low-rank path computed factored, `merge`/`unmerge`
fold adapters in and out, `summary` describes them, `make_train_step` trains them,
`save_adapter`/`load_adapter`/`CheckpointManager` write them with orbax.

Namespaces for the rest: `lora_jax.nnx` (adapters on Flax NNX modules), `lora_jax.linen`
(the linen machinery), `lora_jax.multi` (many adapters on one base), `lora_jax.peft`
(HuggingFace PEFT files), `lora_jax.parallel` (strategies and placement for jit, pmap and
mesh), `lora_jax.optim` (optax pieces), `lora_jax.io` (file formats), `lora_jax.quant` (a
quantized frozen base: int8, int4, NF4), `lora_jax.tokens` (trainable token rows of an
embedding or head), `lora_jax.core` (targets, deltas, the summary type).
"""

from lora_jax import core, io, linen, multi, nnx, optim, parallel, peft, quant, tokens
from lora_jax._dispatch import infer_layouts, lora_apply, routes, summary
from lora_jax.core._config import DROPOUT_RNG, PRESETS, LoraConfig
from lora_jax.core._layout import Layout
from lora_jax.core._merge import merge, unmerge
from lora_jax.core._split import split
from lora_jax.core._weights import LoraWeights
from lora_jax.io._adapter import load_adapter, save_adapter
from lora_jax.io._checkpoint import CheckpointManager
from lora_jax.training._state import TrainState
from lora_jax.training._step import make_train_step

__version__ = "0.2.0"

__all__ = [
    "DROPOUT_RNG",
    "PRESETS",
    "CheckpointManager",
    "Layout",
    "LoraConfig",
    "LoraWeights",
    "TrainState",
    "core",
    "infer_layouts",
    "io",
    "linen",
    "load_adapter",
    "lora_apply",
    "make_train_step",
    "merge",
    "multi",
    "nnx",
    "optim",
    "parallel",
    "peft",
    "quant",
    "routes",
    "save_adapter",
    "split",
    "summary",
    "tokens",
    "unmerge",
]
