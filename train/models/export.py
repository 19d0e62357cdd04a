"""`export_merged`: a trained adapter folded into a plain HuggingFace checkpoint folder."""

from __future__ import annotations

import os
import pathlib
from typing import Any

import lora_jax as lj
from train.models.config import LlamaConfig
from train.models.hf import save_pretrained

__all__ = ["export_merged"]


def export_merged(
    path: str | os.PathLike,
    model_config: LlamaConfig,
    frozen: Any,
    lora: Any,
) -> pathlib.Path:
    """Writes ``W + s·a@b`` as a HuggingFace folder that ``transformers`` loads with no PEFT.

    Works for every adapter, also those PEFT cannot express (PiSSA, a tied embedding).
    The tensors are stored in the config's ``param_dtype`` (float32, bfloat16 or float16).

    Args:
        path: the folder to create or update (``config.json`` + ``model.safetensors``).
        model_config: the base's architecture.
        frozen: the base from `lora_jax.split` (scanned or not).
        lora: the adapters (each carries its own scale).

    Returns:
        The folder.

    Raises:
        ValueError: the adapters do not fit `frozen`, or `frozen` does not fit
            `model_config` (from `lora_jax.merge` and `save_pretrained`).

    Example:
        >>> import tempfile, jax, jax.numpy as jnp, lora_jax as lj
        >>> from train.models import Llama, LlamaConfig, from_pretrained
        >>> c = LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_layers=1,
        ...                 num_heads=2, num_kv_heads=1)
        >>> v = Llama(c).init(jax.random.key(0), jnp.zeros((1, 2), jnp.int32))
        >>> cfg = lj.LoraConfig(rank=2, targets="all-linear")
        >>> frozen, lora = lj.split(v, cfg, key=jax.random.key(1))
        >>> folder = export_merged(tempfile.mkdtemp() + "/merged", c, frozen, lora)
        >>> sorted(p.name for p in folder.iterdir())
        ['config.json', 'model.safetensors']
    """
    merged = lj.merge(frozen, lora)
    return save_pretrained(path, model_config, merged, dtype=model_config.param_dtype)
