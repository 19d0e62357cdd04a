"""Llama-family decoders in Flax linen and their local HuggingFace checkpoints.

`Llama` is the module, `LlamaConfig` its static description, `init_cache` the KV cache for
sampling; `from_pretrained` / `save_pretrained` read and write HuggingFace folders
(``config.json`` + safetensors) of ``LlamaForCausalLM``, ``MistralForCausalLM``,
``Qwen2ForCausalLM``, ``Qwen3ForCausalLM`` and ``Qwen3MoeForCausalLM`` checkpoints.
"""

from train.models.config import PRESETS, LlamaConfig
from train.models.hf import (
    SUPPORTED_ARCHITECTURES,
    config_from_hf,
    config_to_hf,
    from_hf_state,
    from_pretrained,
    save_pretrained,
    to_hf_state,
)
from train.models.llama import Llama, init_cache, num_params, rope_frequencies

__all__ = [
    "Llama",
    "LlamaConfig",
    "PRESETS",
    "SUPPORTED_ARCHITECTURES",
    "config_from_hf",
    "config_to_hf",
    "from_hf_state",
    "from_pretrained",
    "init_cache",
    "num_params",
    "rope_frequencies",
    "save_pretrained",
    "to_hf_state",
]
