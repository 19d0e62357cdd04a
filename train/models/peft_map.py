"""The PEFT module maps of the app's Llama-family models (Llama, Mistral, Qwen2, Qwen3,
Qwen3-MoE).

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
``params/layers_{i}/mlp/experts/gate_up_proj``  ``model.layers.{i}.mlp.experts.gate_up_proj``
                                                (a 3-D parameter: ``target_parameters``)
==============================================  =======================================

Qwen3-MoE's expert kernels ``(E, in, out)`` are PEFT ``target_parameters`` of the
``Qwen3MoeExperts`` module (``gate_up_proj`` then ``down_proj`` in registration order); its
router ``params/layers_{i}/mlp/gate`` is no ``nn.Linear`` in transformers, so PEFT cannot
adapt it and an adapter on it cannot be exported. Nor can one on the dense MLP of a
Qwen3-MoE's ``mlp_only_layers``: on a transformers 5 MoE model PEFT (0.21) reads every
``target_modules`` entry named ``gate_proj`` / ``up_proj`` / ``down_proj`` as a transformers 4
per-expert Linear and rewrites it into the experts' ``target_parameters``.

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
_ROUTER = (
    "the Qwen3-MoE router (transformers' Qwen3MoeTopKRouter) is not an nn.Linear and PEFT "
    "cannot adapt it. Leave `mlp/gate` out of the targets, or export merged weights."
)
_MOE_DENSE_MLP = (
    "on a Qwen3-MoE model PEFT rewrites target_modules named gate_proj / up_proj / down_proj "
    "into the experts' target_parameters (transformers 4 per-expert names), so an adapter on "
    "a dense MLP layer (mlp_only_layers) would load on the experts instead. Leave the dense "
    "MLP out of the targets, or export merged weights."
)
_EXPERT_ORDER = ("gate_up_proj", "down_proj")  # Qwen3MoeExperts' registration order


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
        lj.peft.ModuleRule(
            r"params/layers_(\d+)/mlp/experts/(\w+)",
            r"model.layers.\1.mlp.experts.\2",
            kind="parameter",
            parameter_order=_EXPERT_ORDER,
        ),
        lj.peft.ModuleRule(
            r"params/layers/mlp/experts/(\w+)",
            r"model.layers.{0}.mlp.experts.\1",
            kind="parameter",
            parameter_order=_EXPERT_ORDER,
        ),
    )
    unsupported = {r"params/layers(_\d+)?/mlp/gate": _ROUTER}
    if config.num_experts:
        unsupported[r"params/layers(_\d+)?/mlp/(gate|up|down)_proj/kernel"] = _MOE_DENSE_MLP
    if config.tie_embeddings:
        unsupported["params/embed_tokens/embedding"] = _TIED
    return lj.peft.ModuleMap(rules, unsupported)
