"""GGUF files in: a llama.cpp checkpoint of the Llama family -> (`LlamaConfig`, variables).

`from_gguf` reads the hyperparameters (``llama.*`` / ``qwen2.*`` / ``qwen3.*`` /
``qwen3moe.*`` / ``gemma3.*`` keys) and the tensors of a ``.gguf`` file with the ``gguf``
package (the format's reference reader, an optional dependency: ``pip install
'lora_jax[interop]'``), one tensor at a time, dequantizing the common types to float32
before casting to the requested dtype. llama.cpp stores Llama's q/k rows permuted for its
rotary layout; they are permuted back here (llama.cpp's converter permutes only ``llama``:
Qwen2 / Qwen3 are stored as is).
Qwen3's per-head q/k norms are ``blk.N.attn_{q,k}_norm``; Qwen3-MoE's router is
``blk.N.ffn_gate_inp`` (experts, hidden) and its experts the 3-D ``blk.N.ffn_{gate,up,down}_exps``
((experts, out, in), numpy order), gate and up joined into the fused ``gate_up_proj``. llama.cpp
always renormalises Qwen3-MoE's top-k routing weights, so ``norm_topk_prob`` is True unless
the file says ``qwen3moe.expert_weights_norm`` false (transformers' GGUF loader does the same).

Gemma 3 (``gemma3``) follows llama.cpp's conventions, which transformers' GGUF loader mirrors:
every RMSNorm weight is stored as ``1 + w`` (llama.cpp's converter adds the one Gemma's norms
apply; it is subtracted here), ``blk.N.post_attention_norm`` / ``ffn_norm`` / ``post_ffw_norm``
are the post-attention, pre- and post-feed-forward norms, q/k rows are not permuted, and the
head is tied unless ``output.weight`` is present. llama.cpp hard-codes the rest: with
``gemma3.attention.sliding_window`` set, every 6th layer is global (``i % 6 == 5``) and the
local layers rotate with base 10000 unscaled (``rope.freq_base_swa`` and an integer or per-layer
``attention.sliding_window_pattern`` are honoured when a file has them); the attention scale
is ``head_dim ** -0.5`` (``hidden / heads`` for the 62-layer 27B); linear rope scaling
(``rope.scaling.type = "linear"``, ``rope.scaling.factor``) applies to the global layers.
The tensor names and that permutation are shared with `train.models.gguf_out`.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from train.models.config import LlamaConfig
from train.models.hf_state import from_hf_state, listing
from train.models.llama import rope_frequencies

__all__ = [
    "ARCHITECTURES",
    "EXPERTS",
    "QK_NORM",
    "TENSOR_TYPES",
    "config_from_gguf",
    "from_gguf",
    "gguf_module",
    "gguf_name",
    "hf_name",
    "permute_rows",
    "read_fields",
]

ARCHITECTURES = ("llama", "qwen2", "qwen3", "qwen3moe", "gemma3")
QK_NORM = ("qwen3", "qwen3moe", "gemma3")
# llama.cpp's Gemma 3: every 6th layer global, local layers with rotary base 10000, unscaled.
GEMMA3_PATTERN, GEMMA3_LOCAL_THETA = 6, 10000.0
TENSOR_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_K", "Q5_K", "Q6_K")
# Llama 3.1 / 3.2 rope scaling as Meta ships it; llama.cpp keeps only its factors.
META_LLAMA3 = {
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}
_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LAYER = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate_inp": "mlp.gate",
}
# Gemma 3's norms around attention and MLP (llama.cpp's ``ffn_norm`` is the pre-MLP norm).
_GEMMA3_LAYER = {
    **_LAYER,
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
# Qwen3-MoE's stacked experts -> the fused HF tensor they make (gate and up: gate_up_proj).
EXPERTS = {
    "ffn_gate_exps": "gate_up_proj",
    "ffn_up_exps": "gate_up_proj",
    "ffn_down_exps": "down_proj",
}


def gguf_module() -> Any:
    """The ``gguf`` package, or a `ValueError` saying how to install it."""
    try:
        import gguf
    except ImportError as err:
        raise ValueError(
            "GGUF files need the `gguf` package: pip install 'lora_jax[interop]' (or gguf)."
        ) from err
    return gguf


def _layer_map(arch: str) -> dict[str, str]:
    return _GEMMA3_LAYER if arch == "gemma3" else _LAYER


def hf_name(name: str, arch: str = "llama") -> str | None:
    """The HuggingFace name of a llama.cpp tensor name (None for one we do not know).

    `arch` picks the norm names (``gemma3``'s ``ffn_norm`` is its pre-feed-forward norm).

    Example:
        >>> hf_name("blk.3.attn_q.bias"), hf_name("output.weight"), hf_name("rope_freqs.weight")
        ('model.layers.3.self_attn.q_proj.bias', 'lm_head.weight', None)
        >>> hf_name("blk.1.ffn_up_exps.weight")
        'model.layers.1.mlp.experts.gate_up_proj'
        >>> hf_name("blk.0.ffn_norm.weight", "gemma3")
        'model.layers.0.pre_feedforward_layernorm.weight'
    """
    stem, _, suffix = name.rpartition(".")
    if stem in _TOP:
        return f"{_TOP[stem]}.{suffix}"
    parts = stem.split(".")
    if len(parts) != 3 or parts[0] != "blk" or not parts[1].isdigit():
        return None
    layer = _layer_map(arch)
    if parts[2] in layer:
        return f"model.layers.{parts[1]}.{layer[parts[2]]}.{suffix}"
    if parts[2] in EXPERTS and suffix == "weight":
        return f"model.layers.{parts[1]}.mlp.experts.{EXPERTS[parts[2]]}"
    return None


def gguf_name(name: str, arch: str = "llama") -> str:
    """The llama.cpp name of a HuggingFace tensor name (`hf_name` inverted).

    Example:
        >>> gguf_name("model.layers.0.mlp.down_proj.weight")
        'blk.0.ffn_down.weight'
    """
    stem, _, suffix = name.rpartition(".")
    for short, long in _TOP.items():
        if stem == long:
            return f"{short}.{suffix}"
    _, _, layer, *rest = stem.split(".")
    short = {v: k for k, v in _layer_map(arch).items()}[".".join(rest)]
    return f"blk.{layer}.{short}.{suffix}"


def permute_rows(weight: np.ndarray, heads: int, *, inverse: bool = False) -> np.ndarray:
    """llama.cpp's q/k row order for Llama (``inverse``: back to HuggingFace's).

    HuggingFace rotates the two halves of each head; llama.cpp rotates adjacent pairs, so
    its converter interleaves each head's rows. ``heads`` is the number of q (or kv) heads.

    Example:
        >>> permute_rows(np.arange(8), 1).tolist()
        [0, 4, 1, 5, 2, 6, 3, 7]
        >>> permute_rows(permute_rows(np.arange(8), 2), 2, inverse=True).tolist()
        [0, 1, 2, 3, 4, 5, 6, 7]
    """
    half = weight.shape[0] // heads // 2
    split = (heads, half, 2) if inverse else (heads, 2, half)
    return weight.reshape(*split, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def read_fields(reader: Any) -> dict[str, Any]:
    """``{key: value}`` of a `gguf.GGUFReader`'s metadata (arrays as lists)."""
    return {key: field.contents() for key, field in reader.fields.items()}


def _key(fields: Mapping[str, Any], key: str, where: str, default: Any = None) -> Any:
    value = fields.get(key, default)
    if value is None:
        raise ValueError(f"{where}: the metadata key {key!r} is missing.")
    if isinstance(value, list):  # some files give one value per layer
        if len(set(value)) != 1:
            raise ValueError(f"{where}: {key!r} differs between layers ({value}); not supported.")
        value = value[0]
    return value


def _float32(value: Any) -> float:
    """A float32 field as the shortest decimal that rounds to it (1e-05, not 9.99...e-06)."""
    return float(str(np.float32(value)))


def _llama3(config: LlamaConfig, factors: np.ndarray, where: str) -> LlamaConfig:
    """The config with the llama3 rope scaling whose factors llama.cpp stored, if Meta's."""
    plain = rope_frequencies(config)
    scaling: dict[str, float | str] = {"rope_type": "llama3", "factor": float(factors.max())}
    scaling.update(META_LLAMA3)
    candidate = dataclasses.replace(config, rope_scaling=scaling)
    if factors.shape == plain.shape and np.allclose(
        rope_frequencies(candidate), plain / factors, rtol=1e-4
    ):
        return candidate
    raise ValueError(
        f"{where}: tensor 'rope_freqs.weight' holds rope factors that are not Llama 3's "
        f"(low 1, high 4, original context 8192); such rope scaling is not supported."
    )


def config_from_gguf(
    fields: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]], *, where: str = "GGUF"
) -> LlamaConfig:
    """The `LlamaConfig` of a GGUF file's metadata and tensor shapes (numpy order).

    Args:
        fields: the metadata (`read_fields`).
        shapes: ``{tensor name: shape}``, rows first (``token_embd.weight``: (vocab, hidden)).
        where: the file, for messages.

    Returns:
        The config (float32, unscanned); the vocabulary size is ``token_embd``'s rows.

    Raises:
        ValueError: an unsupported architecture or rope scaling, or a missing key (named).
    """
    arch = fields.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise ValueError(
            f"{where}: general.architecture {arch!r} is not supported; supported: "
            f"{', '.join(ARCHITECTURES)}."
        )
    key = lambda name, default=None: _key(fields, f"{arch}.{name}", where, default)
    scaling = fields.get(f"{arch}.rope.scaling.type", "none")
    if scaling != "none" and not (arch == "gemma3" and scaling == "linear"):
        raise ValueError(f"{where}: {arch}.rope.scaling.type {scaling!r} is not supported.")
    if "token_embd.weight" not in shapes:
        raise ValueError(f"{where}: no tensor 'token_embd.weight'.")
    heads, hidden = key("attention.head_count"), key("embedding_length")
    head_dim = key("attention.key_length", hidden // heads)
    rotary = fields.get(f"{arch}.rope.dimension_count", head_dim)
    if rotary != head_dim:
        raise ValueError(
            f"{where}: {arch}.rope.dimension_count {rotary} != head size {head_dim} "
            "(partial rotary) is not supported."
        )
    experts: dict[str, Any] = {}
    if arch == "qwen3moe":
        gate = shapes.get("blk.0.ffn_gate_exps.weight")
        moe_i = key("expert_feed_forward_length", gate[1] if gate else None)
        experts = dict(
            num_experts=int(key("expert_count")),
            num_experts_per_tok=int(key("expert_used_count")),
            moe_intermediate_size=int(moe_i),
            norm_topk_prob=bool(fields.get(f"{arch}.expert_weights_norm", True)),
        )
    try:
        return LlamaConfig(
            vocab_size=int(shapes["token_embd.weight"][0]),
            hidden_size=int(hidden),
            intermediate_size=int(key("feed_forward_length", experts.get("moe_intermediate_size"))),
            num_layers=int(key("block_count")),
            num_heads=int(heads),
            num_kv_heads=int(key("attention.head_count_kv", heads)),
            head_dim=int(head_dim),
            max_seq_len=int(key("context_length", 2048)),
            rope_theta=_float32(key("rope.freq_base", 10000.0)),
            rms_norm_eps=_float32(key("attention.layer_norm_rms_epsilon", 1e-5)),
            attention_bias=arch == "qwen2",
            tie_embeddings="output.weight" not in shapes,
            qk_norm=arch in QK_NORM,
            **experts,
            **(_gemma3_fields(fields, int(head_dim), where) if arch == "gemma3" else {}),
        )
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from err


def _gemma3_fields(fields: Mapping[str, Any], head_dim: int, where: str) -> dict[str, Any]:
    """The Gemma 3 `LlamaConfig` fields of a ``gemma3`` file, as llama.cpp runs it."""
    key = lambda name, default=None: _key(fields, f"gemma3.{name}", where, default)
    layers, hidden = int(key("block_count")), int(key("embedding_length"))
    window = int(key("attention.sliding_window", 0)) or None
    pattern = fields.get("gemma3.attention.sliding_window_pattern", GEMMA3_PATTERN)
    if isinstance(pattern, list):  # llama.cpp's per-layer form: True = sliding window
        if len(pattern) != layers:
            raise ValueError(
                f"{where}: gemma3.attention.sliding_window_pattern has "
                f"{len(pattern)} entries for {layers} layers."
            )
        global_layers = tuple(i for i, local in enumerate(pattern) if not local)
    else:
        global_layers = tuple(i for i in range(layers) if (i + 1) % int(pattern) == 0)
    scaling = None
    if fields.get("gemma3.rope.scaling.type", "none") == "linear":
        scaling = {"rope_type": "linear", "factor": _float32(key("rope.scaling.factor"))}
    # llama.cpp's attention scale: 1/sqrt(head_dim), 1/sqrt(hidden / heads) for the 27B.
    heads = int(key("attention.head_count"))
    scalar = hidden // heads if layers == 62 else head_dim
    return dict(
        family="gemma3",
        sliding_window=window,
        global_layers=global_layers if window else (),
        rope_scaling=scaling,
        rope_local_theta=_float32(key("rope.freq_base_swa", GEMMA3_LOCAL_THETA))
        if window
        else None,
        query_pre_attn_scalar=scalar,
    )


def _dequantized(gguf: Any, tensor: Any, dtype: Any, where: str) -> np.ndarray:
    kind = tensor.tensor_type.name
    if kind not in TENSOR_TYPES:
        raise ValueError(
            f"{where}: tensor {tensor.name!r} has type {kind}; supported: "
            f"{', '.join(TENSOR_TYPES)}."
        )
    values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    return np.asarray(values, np.float32).astype(jnp.dtype(dtype))


class _Lazy(Mapping[str, np.ndarray]):
    """``{HF name: array}`` whose arrays are made when read (`from_hf_state` reads each once);
    an HF name made of several GGUF tensors (gate and up experts) joins them on axis 1."""

    def __init__(self, names: dict[str, list[str]], read: Any) -> None:
        self._names, self._read = names, read

    def __getitem__(self, key: str) -> np.ndarray:
        parts = [self._read(name) for name in self._names[key]]
        return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)

    def __contains__(self, key: object) -> bool:  # without reading the tensor
        return key in self._names

    def __iter__(self) -> Any:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def from_gguf(
    path: str | os.PathLike, *, dtype: Any = "float32", scan_layers: bool = False
) -> tuple[LlamaConfig, dict[str, Any]]:
    """Loads a Llama-family (``llama``, ``qwen2``, ``qwen3``, ``qwen3moe``, ``gemma3``) GGUF file.

    Args:
        path: the ``.gguf`` file.
        dtype: dtype of the returned params, also the config's compute dtype.
        scan_layers: return the layers stacked for ``LlamaConfig.scan_layers``.

    Returns:
        ``(config, {"params": params})`` ready for ``Llama(config).apply``.

    Raises:
        ValueError: the file is missing or not GGUF, its architecture, rope scaling or a
            tensor type is unsupported, or tensors are missing or unexpected (named).
    """
    file = pathlib.Path(path)
    if not file.is_file():
        raise ValueError(f"{file}: no such GGUF file.")
    gguf = gguf_module()
    try:
        reader = gguf.GGUFReader(file)
    except (ValueError, OSError) as err:
        raise ValueError(f"{file}: not a readable GGUF file ({err}).") from err
    tensors = {t.name: t for t in reader.tensors}
    shapes = {name: tuple(int(n) for n in reversed(t.shape)) for name, t in tensors.items()}
    config = config_from_gguf(read_fields(reader), shapes, where=str(file))
    if "rope_freqs.weight" in tensors:
        factors = _dequantized(gguf, tensors.pop("rope_freqs.weight"), "float32", str(file))
        config = _llama3(config, factors.reshape(-1), str(file))
    arch = reader.fields["general.architecture"].contents()
    unknown = sorted(name for name in tensors if hf_name(name, arch) is None)
    if unknown:
        raise ValueError(f"{file}: tensors of no Llama-family layer: [{listing(unknown)}].")
    heads = {"attn_q": config.num_heads, "attn_k": config.num_kv_heads}

    def read(name: str) -> np.ndarray:
        if arch == "gemma3" and name.endswith("norm.weight"):  # stored as 1 + w
            return (_dequantized(gguf, tensors[name], "float32", str(file)) - 1.0).astype(
                jnp.dtype(dtype)
            )
        array = _dequantized(gguf, tensors[name], dtype, str(file))
        kind = name.split(".")[-2]
        if arch == "llama" and kind in heads:
            return permute_rows(array, heads[kind], inverse=True)
        return array

    # Dequantized when read, one tensor at a time: besides the memory-mapped file, loading
    # holds the params built so far and the one tensor being converted.
    names: dict[str, list[str]] = {}
    for name in sorted(tensors, key=lambda n: "ffn_up_exps" in n):  # gate before up
        names.setdefault(str(hf_name(name, arch)), []).append(name)
    state = _Lazy(names, read)
    config = dataclasses.replace(config, dtype=dtype, param_dtype=dtype, scan_layers=scan_layers)
    params = from_hf_state(config, state, dtype=dtype, scan_layers=scan_layers, source=str(file))
    return config, {"params": params}
