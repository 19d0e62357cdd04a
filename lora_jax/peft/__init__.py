"""HuggingFace PEFT interop: our adapters as PEFT LoRA folders, and PEFT folders as ours.

A PEFT LoRA adapter is a folder with ``adapter_config.json`` and
``adapter_model.safetensors``; its tensors are keyed by PyTorch module names
(``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``), never by Flax paths.
`export_adapter` writes one from adapters alone (each carries its scale and dropout);
`import_adapter` reads one onto a Flax base, each adapter with the scale PEFT computes.
A `ModuleMap` says how a Flax kernel path becomes PyTorch module names, one `ModuleRule`
per kind of kernel:

- the name: ``ModuleRule(r"params/layers_(\\d+)/mlp/(\\w+)/kernel",
  r"model.layers.\\1.mlp.\\2")``: the pattern must match the whole path; the template takes
  its groups (``\\1``, ``\\g<name>``) and ``{0}``, ``{1}``... for the indices along the
  kernel's stack axes, so a scanned ``params/layers/mlp/up_proj/kernel`` of shape
  ``(layers, in, out)`` becomes ``model.layers.{0}.mlp.up_proj``, one module per layer;
- the transpose: a Flax kernel is ``(in, out)``, a PyTorch Linear weight ``(out, in)``;
  ``lora_A.weight`` is ``a.T`` ``(r, in)`` and ``lora_B.weight`` is ``b.T`` ``(out, r)``;
- multi-axis kernels are flattened row-major in the layout's axis order: a DenseGeneral
  q kernel ``(d_model, heads, head_dim)`` is the Linear ``(heads*head_dim, d_model)``,
  head-major, and an output kernel ``(heads, head_dim, d_model)`` the Linear
  ``(d_model, heads*head_dim)``;
- a fused kernel is split along its (flattened) output by giving several templates, e.g.
  ``ModuleRule("params/attn/qkv/kernel", ("attn.q", "attn.k", "attn.v"), sizes=(64, 16, 16))``:
  every part gets the same A and its own slice of B. On import the parts must carry
  identical A's (as our export writes them); a part absent from the file gets B = 0;
- embeddings (`nn.Embed` tables, ``(vocab, dim)``) become PEFT's ``lora_embedding_A``
  ``(r, vocab)`` and ``lora_embedding_B`` ``(dim, r)``;
- per-slice adapters of a kernel that stacks projections (k and v in one kernel, the k/v
  axis a stack axis) become separate modules: ``names={0: ("k_proj", "v_proj")}`` makes
  placeholder ``{0}`` a name instead of an index; each module gets its own A and B;
- expert kernels ``(experts, in, out)`` (a stack axis of experts) become one 3-D
  ``nn.Parameter`` each, adapted through PEFT's ``target_parameters``
  (``kind="parameter"``): ``lora_A.weight`` ``(E*r, in)`` holds each expert's ``a_e.T``
  in its rows ``e*r ..``, ``lora_B.weight`` ``(out, r*E)`` each ``b_e.T`` in its columns
  ``k*E + e``: independent per-expert pairs, exactly as ours. Several parameters of one
  module are nested wrappers in PEFT (``experts.base_layer.lora_A.weight``), in the
  module's registration order (``parameter_order``).

The app's Llama-family models have built-in maps (``train.models.peft_map.module_map``).

Scales translate exactly: PEFT multiplies by ``lora_alpha / r`` (``/ sqrt(r)`` with
``use_rslora``). The export writes ``lora_alpha = scale * r`` per module (``use_rslora``
false), lists every module by its full name in ``target_modules`` and puts a module's
rank or alpha in ``rank_pattern``/``alpha_pattern`` (as an escaped full name) when it
differs from the most common one; the import resolves PEFT's patterns with PEFT's own
rule (``(.*\\.)?(key)$``, first key wins).

DoRA and ``lora_bias`` adapters (`LoraWeights.magnitude`, `LoraWeights.bias`) travel both
ways as PEFT's ``use_dora: true`` / ``lora_bias: true`` with one vector per module,
``<module>.lora_magnitude_vector`` ``(out,)`` (for an Embedding one value per embedding
feature, the norm taken over the vocabulary) and ``<module>.lora_B.bias`` ``(out,)``
(scaled by s with the low-rank path): flattened, split per fused part and unstacked per
layer or slice as b's output is. One PEFT config holds one ``use_dora`` and one
``lora_bias`` for all its modules, so an export with DoRA on some adapters only is
refused (a module without a lora_bias is written with a zero one: the same output).

What PEFT's format cannot say is an error, never a silent difference: a PiSSA adapter
(its base is a residual), stacked adapters, a conv kernel, a kernel with no rule, DoRA on
some adapters only, DoRA with lora_bias, lora_bias on an Embedding, DoRA or lora_bias
with expert kernels (PEFT's ``target_parameters`` has neither); on import, bias training
of the base (``bias`` other than ``"none"``), ``modules_to_save`` and other PEFT
variants, and every key that PEFT would load with only a warning (no
``base_model.model.`` prefix, a module the base lacks, a magnitude or lora_B bias missing
where the config has ``use_dora`` / ``lora_bias``, or present where it has not).

Trainable token rows (`lora_jax.tokens`, PEFT's ``trainable_token_indices``) travel with
``tokens=`` both ways: ``<module>.token_adapter.trainable_tokens_delta`` ``(n, dim)``.

``safetensors`` is needed (``pip install safetensors``); PyTorch and PEFT are not.

    >>> import lora_jax as lj
    >>> lj.peft.CONFIG_FILE
    'adapter_config.json'
"""

from lora_jax.peft._config import CONFIG_FILE
from lora_jax.peft._export import export_adapter
from lora_jax.peft._import import import_adapter
from lora_jax.peft._module_map import ModuleMap, ModuleRule

__all__ = ["CONFIG_FILE", "ModuleMap", "ModuleRule", "export_adapter", "import_adapter"]
