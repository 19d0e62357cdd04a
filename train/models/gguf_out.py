"""GGUF files out: (`LlamaConfig`, variables) -> a ``.gguf`` file llama.cpp-family runtimes run.

`save_gguf` writes llama.cpp's ``llama`` architecture (or ``qwen2`` for a model with q/k/v
biases) with the ``gguf`` package's writer: the hyperparameters, the tokenizer fields it is
given, and the tensors under llama.cpp's names, Llama's q/k rows permuted for llama.cpp's
rotary layout. Matrices are stored as F16 or Q8_0 (rows not a multiple of 32 wide stay F16),
norms and biases as F32, as llama.cpp's own converter does. Llama 3 rope scaling is stored as
llama.cpp stores it: a ``rope_freqs.weight`` tensor of per-frequency factors.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import uuid
from collections.abc import Mapping
from typing import Any

import numpy as np

import lora_jax as lj
from train.models.config import LlamaConfig
from train.models.gguf_in import gguf_module, gguf_name, permute_rows
from train.models.hf_state import to_hf_state
from train.models.llama import rope_frequencies

__all__ = ["GGUF_TYPES", "export_gguf", "save_gguf"]

GGUF_TYPES = ("f16", "q8_0")


def _architecture(config: LlamaConfig) -> str:
    if config.sliding_window is not None:
        raise ValueError(
            f"GGUF export: a sliding window ({config.sliding_window}) has no GGUF key for the "
            "llama / qwen2 architectures; llama.cpp would attend to every position."
        )
    return "qwen2" if config.attention_bias else "llama"


def _hyperparameters(writer: Any, config: LlamaConfig, gguf_type: str) -> None:
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
    if head_dim * heads != config.hidden_size:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)


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
    if values.ndim == 1:
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
        config: the architecture (no sliding window).
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
        _hyperparameters(writer, config, gguf_type)
        for key, value in vocab.items():
            _add_field(writer, key, value)
        heads = {"attn_q": config.num_heads, "attn_k": config.num_kv_heads}
        for hf, array in to_hf_state(config, variables).items():
            out = gguf_name(hf)
            kind = out.split(".")[-2]
            if arch == "llama" and kind in heads:
                array = permute_rows(np.asarray(array), heads[kind])
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
