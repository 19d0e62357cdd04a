"""Adapter files and training checkpoints with orbax: self-describing, atomic, resumable.

    >>> import lora_jax as lj
    >>> lj.io.METADATA_FILE
    'lora_adapter.json'
"""

from lora_jax.io._adapter import METADATA_FILE, load_adapter, save_adapter
from lora_jax.io._checkpoint import CheckpointManager

__all__ = ["METADATA_FILE", "CheckpointManager", "load_adapter", "save_adapter"]
