"""Adapter files and training checkpoints with orbax: self-describing, atomic, resumable.

Every adapter is stored with its layout, rank, scale and dropout rate, so nothing needs a
config to read it back:

    >>> import lora_jax as lj
    >>> lj.io.METADATA_FILE
    'lora_adapter.json'
"""

from lora_jax.io._adapter import METADATA_FILE, load_adapter, read_metadata, save_adapter
from lora_jax.io._checkpoint import CheckpointManager
from lora_jax.io._digest import base_sample, digest, tree_digests, verify_tree_digests

__all__ = [
    "METADATA_FILE",
    "CheckpointManager",
    "base_sample",
    "digest",
    "load_adapter",
    "read_metadata",
    "save_adapter",
    "tree_digests",
    "verify_tree_digests",
]
