"""GGUF files out: (`LlamaConfig`, variables) -> a ``.gguf`` file llama.cpp-family runtimes run.

`save_gguf` writes llama.cpp's ``llama`` architecture (``qwen2`` for a model with q/k/v
biases, ``qwen3`` for one with q/k norms, ``qwen3moe`` for Qwen3-MoE) with the ``gguf``
package's writer: the hyperparameters, the tokenizer fields it is given, and the tensors under
llama.cpp's names, Llama's q/k rows permuted for llama.cpp's rotary layout (only Llama's, as
llama.cpp's converter does). Qwen3-MoE's experts are stacked into the 3-D
``blk.N.ffn_{gate,up,down}_exps``; llama.cpp runs every layer sparse with renormalised top-k
weights, so a model with dense layers or ``norm_topk_prob=False`` is refused. Matrices are
stored as F16 or Q8_0 (rows not a multiple of 32 wide stay F16), norms, biases and the router
``ffn_gate_inp`` as F32, as llama.cpp's own converter does. Llama 3 rope scaling is stored as
llama.cpp stores it: a ``rope_freqs.weight`` tensor of per-frequency factors.

Gemma 3 (``family="gemma3"``) is written as llama.cpp's ``gemma3``: norm weights stored as
``1 + w``, ``gemma3.attention.sliding_window``, key/value lengths, linear rope scaling as
``rope.scaling.type`` / ``factor``. llama.cpp hard-codes the rest, so a model it would run
differently is refused: global layers other than every 6th, a local rotary base other than
10000 (or scaled), an attention scale other than llama.cpp's (``query_pre_attn_scalar`` =
head_dim; ``hidden / heads`` for 62 layers) and final-logit soft-capping.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import re
import uuid
from collections.abc import Mapping
from typing import Any

import numpy as np

import lora_jax as lj
from train.models.config import LlamaConfig
from train.models.gguf_in import (
    GEMMA3_LOCAL_THETA,
    GEMMA3_PATTERN,
    QK_NORM,
    gguf_module,
    gguf_name,
    permute_rows,
)
from train.models.hf_state import to_hf_state
from train.models.llama import rope_frequencies

__all__ = ["GGUF_TYPES", "export_gguf", "save_gguf"]

GGUF_TYPES = ("f16", "q8_0")
# A per-expert Linear of `to_hf_state` (expert-major, so each stack fills in expert order).
_EXPERT = re.compile(
    r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight"
)


def _gemma3(config: LlamaConfig) -> str:
    """``"gemma3"``, or a `ValueError` naming what llama.cpp's gemma3 would run differently."""
    n = config.num_layers
    problems = []
    if config.sliding_window is not None:
        pattern = tuple(i for i in range(n) if (i + 1) % GEMMA3_PATTERN == 0)
        if config.global_layers != pattern:
            problems.append(
                f"global layers {list(config.global_layers)} (llama.cpp: every "
                f"{GEMMA3_PATTERN}th, {list(pattern)})"
            )
        local = config.rope_local_theta
        if (local is None and (config.rope_scaling or config.rope_theta != GEMMA3_LOCAL_THETA)) or (
            local is not None and local != GEMMA3_LOCAL_THETA
        ):
            problems.append(
                f"a local rotary base {local or config.rope_theta} (llama.cpp: "
                f"{GEMMA3_LOCAL_THETA:g}, unscaled)"
            )
    scalar = config.hidden_size // config.num_heads if n == 62 else config.head_dim
    if (config.query_pre_attn_scalar or config.head_dim) != scalar:
        problems.append(
            f"query_pre_attn_scalar {config.query_pre_attn_scalar} (llama.cpp: {scalar})"
        )
    if config.final_logit_softcapping is not None:
        problems.append(f"final_logit_softcapping {config.final_logit_softcapping}")
    kind = dict(config.rope_scaling or {}).get("rope_type", "linear")
    if kind != "linear":
        problems.append(f"rope scaling {kind!r} (llama.cpp's gemma3: linear only)")
    if problems:
        raise ValueError(
            "GGUF export: llama.cpp's gemma3 would run this Gemma 3 differently: "
            + "; ".join(problems)
            + "."
        )
    return "gemma3"


def _architecture(config: LlamaConfig) -> str:
    if config.family == "gemma3":
        return _gemma3(config)
    if config.family != "llama" or dict(config.rope_scaling or {}).get("rope_type") == "linear":
        raise ValueError(
            f"GGUF export: family {config.family!r} with rope scaling "
            f"{dict(config.rope_scaling or {}).get('rope_type', 'default')!r} is not supported; "
            "only the llama / qwen2 / qwen3 / qwen3moe / gemma3 architectures (linear rope "
            "scaling for gemma3 only) are written."
        )
    if config.sliding_window is not None:
        raise ValueError(
            f"GGUF export: a sliding window ({config.sliding_window}) has no GGUF key for the "
            "llama / qwen2 / qwen3 architectures; llama.cpp would attend to every position."
        )
    if (config.qk_norm or config.num_experts) and config.attention_bias:
        raise ValueError(
            "GGUF export: q/k norms or experts with q/k/v biases match no llama.cpp "
            "architecture (qwen3 / qwen3moe have no biases)."
        )
    if not config.num_experts:
        arch = "qwen3" if config.qk_norm else "qwen2" if config.attention_bias else "llama"
        if arch == "qwen3" and config.rope_scaling is not None:
            raise ValueError(
                f"GGUF export: llama.cpp keeps Llama 3 rope scaling for llama only, not {arch}."
            )
        return arch
    dense = [i for i in range(config.num_layers) if not config.is_sparse_layer(i)]
    if not config.qk_norm or dense or not config.norm_topk_prob:
        raise ValueError(
            "GGUF export: llama.cpp's qwen3moe runs every layer sparse, with q/k norms and "
            f"renormalised top-k weights; found dense layers {dense}, qk_norm={config.qk_norm}, "
            f"norm_topk_prob={config.norm_topk_prob}."
        )
    if config.rope_scaling is not None:
        raise ValueError(
            "GGUF export: llama.cpp keeps Llama 3 rope scaling for llama only, not qwen3moe."
        )
    return "qwen3moe"


def _hyperparameters(writer: Any, config: LlamaConfig, gguf_type: str, arch: str) -> None:
    gguf = gguf_module()
    heads, head_dim = config.num_heads, int(config.head_dim or 0)
    writer.add_file_type(
        gguf.LlamaFileType.MOSTLY_F16 if gguf_type == "f16" else gguf.LlamaFileType.MOSTLY_Q8_0
    )
    writer.add_context_length(config.max_seq_len)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.num_kv_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    if head_dim * heads != config.hidden_size or arch in QK_NORM:  # as llama.cpp's converter
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if arch == "gemma3":
        if config.sliding_window is not None:
            writer.add_sliding_window(config.sliding_window)
        if config.rope_scaling:
            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(float(dict(config.rope_scaling)["factor"]))
    if arch == "qwen3moe":
        writer.add_expert_count(config.num_experts)
        writer.add_expert_used_count(config.num_experts_per_tok)
        writer.add_expert_feed_forward_length(int(config.moe_intermediate_size or 0))


def _add_field(writer: Any, key: str, value: Any) -> None:
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_uint32(key, value)
    elif isinstance(value, str):
        writer.add_string(key, value)
    else:
        writer.add_array(key, list(value))


def _add_tensor(writer: Any, name: str, array: np.ndarray, gguf_type: str) -> None:
    gguf = gguf_module()
    values = np.ascontiguousarray(array, np.float32)
    if values.ndim == 1 or name.endswith(".ffn_gate_inp.weight"):
        writer.add_tensor(name, values)
    elif gguf_type == "q8_0" and values.shape[-1] % 32 == 0:
        kind = gguf.GGMLQuantizationType.Q8_0
        writer.add_tensor(name, gguf.quants.quantize(values, kind), raw_dtype=kind)
    else:
        writer.add_tensor(name, values.astype(np.float16))


def save_gguf(
    path: str | os.PathLike,
    config: LlamaConfig,
    variables: Mapping[str, Any],
    *,
    vocab: Mapping[str, Any],
    gguf_type: str = "f16",
    name: str = "lora_jax model",
) -> pathlib.Path:
    """Writes a GGUF file of the model (written to a temporary sibling, then renamed).

    Args:
        path: the ``.gguf`` file to create or replace.
        config: the architecture (no sliding window, except Gemma 3's as llama.cpp runs it).
        variables: ``{"params": ...}`` (scanned or not) or the params collection.
        vocab: the ``tokenizer.ggml.*`` fields (`train.gguf_tokenizer.gguf_vocab_fields`).
        gguf_type: ``"f16"`` or ``"q8_0"`` for the matrices.
        name: ``general.name``.

    Returns:
        The file.

    Raises:
        ValueError: an unknown `gguf_type`, a sliding window, or params not fitting `config`.
    """
    if gguf_type not in GGUF_TYPES:
        raise ValueError(
            f"GGUF export: `gguf_type` must be one of {GGUF_TYPES}; found {gguf_type!r}."
        )
    arch = _architecture(config)
    gguf = gguf_module()
    file = pathlib.Path(path)
    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = file.with_name(f".{file.name}.{uuid.uuid4().hex[:8]}.tmp")
    writer = gguf.GGUFWriter(tmp, arch)
    try:
        writer.add_name(name)
        _hyperparameters(writer, config, gguf_type, arch)
        for key, value in vocab.items():
            _add_field(writer, key, value)
        heads = {"attn_q": config.num_heads, "attn_k": config.num_kv_heads}
        stacks: dict[str, list[np.ndarray]] = {}
        for hf, array in to_hf_state(config, variables).items():
            expert = _EXPERT.fullmatch(hf)
            if expert:  # stacked once every expert's Linear is in: (experts, out, in)
                layer, part = expert.group(1), expert.group(3)
                out = f"blk.{layer}.ffn_{part.removesuffix('_proj')}_exps.weight"
                stacks.setdefault(out, []).append(np.asarray(array))
                if len(stacks[out]) == config.num_experts:
                    _add_tensor(writer, out, np.stack(stacks.pop(out)), gguf_type)
                continue
            out = gguf_name(hf, arch)
            kind = out.split(".")[-2]
            if arch == "llama" and kind in heads:
                array = permute_rows(np.asarray(array), heads[kind])
            if arch == "gemma3" and out.endswith("norm.weight"):  # llama.cpp stores 1 + w
                array = np.asarray(array, np.float32) + 1.0
            _add_tensor(writer, out, np.asarray(array), gguf_type)
        if dict(config.rope_scaling or {}).get("rope_type") == "llama3":
            plain = rope_frequencies(dataclasses.replace(config, rope_scaling=None))
            writer.add_tensor("rope_freqs.weight", plain / rope_frequencies(config))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, file)
    finally:
        tmp.unlink(missing_ok=True)
    return file


def export_gguf(
    path: str | os.PathLike,
    model_config: LlamaConfig,
    frozen: Any,
    lora: Any,
    *,
    vocab: Mapping[str, Any],
    gguf_type: str = "f16",
) -> pathlib.Path:
    """Writes ``W + s·a@b`` (`lora_jax.merge`) as a GGUF file (see `save_gguf`).

    Args:
        path: the ``.gguf`` file.
        model_config: the base's architecture.
        frozen: the float base from `lora_jax.split` (scanned or not).
        lora: the adapters.
        vocab: the ``tokenizer.ggml.*`` fields.
        gguf_type: ``"f16"`` or ``"q8_0"``.

    Returns:
        The file.
    """
    merged = lj.merge(frozen, lora)
    return save_gguf(path, model_config, merged, vocab=vocab, gguf_type=gguf_type)
