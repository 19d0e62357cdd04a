"""lora_jax: LoRA for JAX and Flax as a pure-function parameter transform.

    >>> import lora_jax as lj
    >>> config = lj.LoraConfig(rank=8, alpha=16.0, targets=r".*/(query|value)/kernel")

`split` makes ``(frozen, lora)``, `lora_apply` runs the model with the low-rank path
computed factored, `merge`/`unmerge` fold adapters in and out, `summary` describes them,
`make_train_step` trains them (jit, pmap or mesh), `save_adapter`/`CheckpointManager`
write them with orbax, `export_peft`/`import_peft` exchange them with HuggingFace PEFT.
Flax NNX: the same functions on ``nnx.split`` state (``lora_apply(graphdef, config)``),
or `add_lora` / `remove_lora` / `lora_state` on the model itself (``nnx.LoRAParam``s).
Many adapters on one base: `pad_rank` and `stack_adapters` for one compile and mixed
batches (`lora_apply_mixed`), `combine_adapters` and `merge_many` to combine them.
"""

from lora_jax.adapter_io import METADATA_FILE, load_adapter, save_adapter
from lora_jax.adapters import pad_rank, stack_adapters
from lora_jax.apply import DROPOUT_RNG, lora_apply, routes
from lora_jax.checkpoint import CheckpointManager
from lora_jax.combine import COMBINATIONS, combine_adapters
from lora_jax.config import PRESETS, LoraConfig
from lora_jax.distributed import (
    MeshShardings,
    mesh_shardings,
    place,
    replicate,
    shard_batch,
    unreplicate,
)
from lora_jax.infer import infer_layouts
from lora_jax.layout import Layout
from lora_jax.merge import merge, unmerge
from lora_jax.merge_many import merge_many, unmerge_many
from lora_jax.mixed import lora_apply_mixed
from lora_jax.module_map import ModuleMap, ModuleRule
from lora_jax.nnx_lora import add_lora, lora_state, remove_lora
from lora_jax.optim import lora_mask, loraplus, masked
from lora_jax.peft import export_peft, import_peft
from lora_jax.split import select_targets, split
from lora_jax.summary import Summary, summary
from lora_jax.training import STRATEGIES, TrainState, make_train_step
from lora_jax.weights import LoraWeights, delta

__version__ = "0.1.0"

__all__ = [
    "COMBINATIONS",
    "CheckpointManager",
    "DROPOUT_RNG",
    "Layout",
    "LoraConfig",
    "LoraWeights",
    "METADATA_FILE",
    "MeshShardings",
    "ModuleMap",
    "ModuleRule",
    "PRESETS",
    "STRATEGIES",
    "Summary",
    "TrainState",
    "add_lora",
    "combine_adapters",
    "delta",
    "export_peft",
    "import_peft",
    "infer_layouts",
    "load_adapter",
    "lora_apply",
    "lora_apply_mixed",
    "lora_mask",
    "lora_state",
    "loraplus",
    "make_train_step",
    "masked",
    "merge",
    "merge_many",
    "mesh_shardings",
    "pad_rank",
    "place",
    "remove_lora",
    "replicate",
    "routes",
    "save_adapter",
    "select_targets",
    "shard_batch",
    "split",
    "stack_adapters",
    "summary",
    "unmerge",
    "unmerge_many",
    "unreplicate",
]
