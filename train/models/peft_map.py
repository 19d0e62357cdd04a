"""The PEFT module maps of the app's Llama-family models (Llama, Mistral, Qwen2).

`module_map` says how each Flax kernel of `train.models.Llama` is named in the
HuggingFace PyTorch model (``LlamaForCausalLM``, ``MistralForCausalLM``,
``Qwen2ForCausalLM``), for `lora_jax.peft.export_adapter` and `lora_jax.peft.import_adapter`:

==============================================  =======================================
Flax path                                       PyTorch module
==============================================  =======================================
``params/layers_{i}/self_attn/q_proj/kernel``   ``model.layers.{i}.self_attn.q_proj``
``params/layers/mlp/down_proj/kernel`` (scan)   ``model.layers.{i}.mlp.down_proj``
``params/embed_tokens/embedding``               ``model.embed_tokens`` (an Embedding)
``params/lm_head/kernel``                       ``lm_head``
==============================================  =======================================

With tied embeddings the table is also the output head (``embed.attend``): lora_jax adapts
both uses, PEFT's Embedding LoRA only the lookup, so such an adapter cannot be exported.
"""

from __future__ import annotations

import lora_jax as lj
from train.models.config import LlamaConfig

__all__ = ["module_map"]

_TIED = (
    "with tie_embeddings the embedding table is also the output head; lora_jax adapts the "
    "lookup and the head together, PEFT's Embedding LoRA only the lookup. Leave the "
    "embedding out of the targets, or export merged weights (train.models.export)."
)


def module_map(config: LlamaConfig) -> lj.peft.ModuleMap:
    """The Flax-path to PyTorch-module map of a `train.models.Llama`, scanned or not.

    Args:
        config: the model's config (``tie_embeddings`` decides whether the embedding can
            be exchanged; ``scan_layers`` makes no difference, both layouts are mapped).

    Returns:
        A `lora_jax.peft.ModuleMap` for `lora_jax.peft.export_adapter` /
        `lora_jax.peft.import_adapter`.

    Example:
        >>> from train.models import PRESETS
        >>> from train.models.peft_map import module_map
        >>> m = module_map(PRESETS["tiny"])
        >>> m.modules_for("params/layers_2/self_attn/q_proj/kernel", (128, 128))
        ['model.layers.2.self_attn.q_proj']
        >>> layout = lj.Layout("dense", (1,), (2,), stack_axes=(0,))
        >>> m.modules_for("params/layers/mlp/up_proj/kernel", (2, 128, 384), layout)
        ['model.layers.0.mlp.up_proj', 'model.layers.1.mlp.up_proj']
    """
    rules = (
        lj.peft.ModuleRule(
            r"params/layers_(\d+)/(self_attn|mlp)/(\w+)/kernel", r"model.layers.\1.\2.\3"
        ),
        lj.peft.ModuleRule(
            r"params/layers/(self_attn|mlp)/(\w+)/kernel", r"model.layers.{0}.\1.\2"
        ),
        lj.peft.ModuleRule("params/embed_tokens/embedding", "model.embed_tokens", kind="embedding"),
        lj.peft.ModuleRule("params/lm_head/kernel", "lm_head"),
    )
    unsupported = {"params/embed_tokens/embedding": _TIED} if config.tie_embeddings else {}
    return lj.peft.ModuleMap(rules, unsupported)
