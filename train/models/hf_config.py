"""HuggingFace ``config.json`` <-> `LlamaConfig`, for transformers 4 and 5 layouts.

Transformers 5 keeps ``rope_theta`` and the scaling inside ``rope_parameters``; older files
have top-level ``rope_theta`` and ``rope_scaling``. Both are read; both are written.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from train.models.config import LlamaConfig
from train.models.gemma3_config import GEMMA3, gemma3_fields, gemma3_to_hf

__all__ = ["SUPPORTED_ARCHITECTURES", "config_from_hf", "config_to_hf"]

SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "Qwen3MoeForCausalLM",
    GEMMA3,
)
_MODEL_TYPES = dict(
    zip(
        ("llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "gemma3_text"),
        SUPPORTED_ARCHITECTURES,
        strict=True,
    )
)
_QWEN3 = ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM")
_REQUIRED = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
)
_ROPE_KEYS = ("rope_theta", "rope_type", "type", "partial_rotary_factor")


def _architecture(hf: Mapping[str, Any], where: str) -> str:
    archs = hf.get("architectures") or []
    arch = archs[0] if archs else _MODEL_TYPES.get(hf.get("model_type", ""), hf.get("model_type"))
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"{where}: architecture {arch!r} is not supported; supported: "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}."
        )
    return arch


def _rope(hf: Mapping[str, Any], where: str) -> tuple[float, dict[str, Any]]:
    """(theta, scaling) from legacy ``rope_scaling`` or transformers 5 ``rope_parameters``."""
    params = dict(hf.get("rope_scaling") or hf.get("rope_parameters") or {})
    fallback = (hf.get("rope_parameters") or {}).get("rope_theta", 10000.0)
    theta = params.get("rope_theta", hf.get("rope_theta", fallback))
    if params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ValueError(f"{where}: partial_rotary_factor != 1 is not supported.")
    scaling = {k: v for k, v in params.items() if k not in _ROPE_KEYS}
    scaling["rope_type"] = params.get("rope_type", params.get("type", "default"))
    if scaling["rope_type"] == "llama3":
        original = hf.get("original_max_position_embeddings", hf.get("max_position_embeddings"))
        scaling.setdefault("original_max_position_embeddings", original)
    return theta, scaling


def _qwen2_window(hf: Mapping[str, Any], where: str) -> int | None:
    if not hf.get("use_sliding_window"):
        return None
    n = hf["num_hidden_layers"]
    first = hf.get("max_window_layers", 28)
    kinds = hf.get("layer_types") or [
        "sliding_attention" if i >= first else "full_attention" for i in range(n)
    ]
    sliding = sum(kind == "sliding_attention" for kind in kinds)
    if 0 < sliding < n:
        raise ValueError(
            f"{where}: a sliding window on {sliding} of {n} layers (layer_types / "
            "max_window_layers) is not supported; only all or none."
        )
    return hf.get("sliding_window", 4096) if sliding else None


def _moe_window(hf: Mapping[str, Any]) -> int | None:
    """Qwen3-MoE: one window for every layer when ``use_sliding_window``."""
    return hf.get("sliding_window", 4096) if hf.get("use_sliding_window") else None


def _experts(hf: Mapping[str, Any], arch: str, where: str) -> dict[str, Any]:
    """The `LlamaConfig` mixture-of-experts fields of a Qwen3-MoE ``config.json``."""
    if arch != "Qwen3MoeForCausalLM":
        return {}
    experts = hf.get("num_experts", hf.get("num_local_experts"))
    missing = [k for k in ("moe_intermediate_size", "num_experts_per_tok") if k not in hf]
    if experts is None or missing:
        missing += [] if experts is not None else ["num_experts"]
        raise ValueError(f"{where}: missing keys {missing} (Qwen3MoeForCausalLM).")
    if hf.get("shared_expert_intermediate_size"):
        raise ValueError(f"{where}: a shared expert (Qwen2-MoE style) is not supported.")
    return dict(
        num_experts=experts,
        num_experts_per_tok=hf["num_experts_per_tok"],
        moe_intermediate_size=hf["moe_intermediate_size"],
        norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
        decoder_sparse_step=hf.get("decoder_sparse_step", 1),
        mlp_only_layers=tuple(hf.get("mlp_only_layers") or ()),
    )


def config_from_hf(hf: Mapping[str, Any], *, path: str | os.PathLike | None = None) -> LlamaConfig:
    """The `LlamaConfig` of a HuggingFace ``config.json`` (transformers 4 or 5 layout).

    Args:
        hf: the parsed ``config.json``.
        path: where it was read from, for error messages.

    Returns:
        The config (float32, unscanned; `from_pretrained` sets those).

    Raises:
        ValueError: unsupported architecture, activation, biases or rope type, missing keys,
            or invalid values; the message names `path`.

    Example:
        >>> from train.models import config_from_hf
        >>> c = config_from_hf({"architectures": ["LlamaForCausalLM"], "vocab_size": 16,
        ...     "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1,
        ...     "num_attention_heads": 2, "num_key_value_heads": 1})
        >>> c.num_kv_heads, c.head_dim
        (1, 4)
    """
    where = f"config.json at {path}" if path is not None else "config.json"
    if not isinstance(hf, Mapping):
        raise ValueError(f"{where}: expected a JSON object; found {type(hf).__name__}.")
    arch = _architecture(hf, where)
    missing = [k for k in _REQUIRED if k not in hf]
    if missing:
        raise ValueError(f"{where}: missing keys {missing}.")
    gemma = gemma3_fields(hf, where) if arch == GEMMA3 else {}
    if (not gemma and hf.get("hidden_act", "silu") != "silu") or hf.get("mlp_bias"):
        raise ValueError(f"{where}: only a bias-free SiLU MLP is supported.")
    if arch in ("LlamaForCausalLM", *_QWEN3) and hf.get("attention_bias"):
        raise ValueError(f"{where}: attention_bias=true (a bias on o_proj) is not supported.")
    theta, scaling = _rope(hf, where)
    windows = {
        "MistralForCausalLM": lambda: hf.get("sliding_window", 4096),
        "Qwen2ForCausalLM": lambda: _qwen2_window(hf, where),
        "Qwen3ForCausalLM": lambda: _qwen2_window(hf, where),
        "Qwen3MoeForCausalLM": lambda: _moe_window(hf),
    }
    try:
        fields = dict(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=hf["num_attention_heads"],
            num_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
            head_dim=hf.get("head_dim"),
            max_seq_len=hf.get("max_position_embeddings", 2048),
            rope_theta=float(theta),
            rope_scaling=scaling,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            attention_bias=arch == "Qwen2ForCausalLM",
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            sliding_window=windows.get(arch, lambda: None)(),
            qk_norm=arch in _QWEN3,
            **_experts(hf, arch, where),
        )
        return LlamaConfig(**{**fields, **gemma})
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from err


def config_to_hf(config: LlamaConfig) -> dict[str, Any]:
    """A ``config.json`` dict for `config` that ``transformers`` (4 or 5) loads.

    ``family="gemma3"`` makes it ``Gemma3ForCausalLM``; experts ``Qwen3MoeForCausalLM``, else
    ``qk_norm`` ``Qwen3ForCausalLM``, else
    ``attention_bias`` ``Qwen2ForCausalLM``, else a sliding window ``MistralForCausalLM``,
    else ``LlamaForCausalLM``.

    Args:
        config: the model config.

    Returns:
        The JSON-able dict (``dtype`` is ``config.param_dtype``).

    Raises:
        ValueError: no HF architecture has this combination (experts without ``qk_norm``,
            ``qk_norm`` with ``attention_bias``).

    Example:
        >>> from train.models import PRESETS, config_to_hf
        >>> config_to_hf(PRESETS["tiny"])["architectures"]
        ['LlamaForCausalLM']
    """
    arch = GEMMA3 if config.family == "gemma3" else _arch_of(config)
    if arch is None and config.attention_bias:
        arch = "Qwen2ForCausalLM"
    elif arch is None:
        arch = "MistralForCausalLM" if config.sliding_window else "LlamaForCausalLM"
    scaling = dict(config.rope_scaling or {"rope_type": "default"})
    if "original_max_position_embeddings" in scaling:
        scaling["original_max_position_embeddings"] = int(
            scaling["original_max_position_embeddings"]
        )
    out: dict[str, Any] = {
        "architectures": [arch],
        "model_type": {a: t for t, a in _MODEL_TYPES.items()}[arch],
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_seq_len,
        "rms_norm_eps": config.rms_norm_eps,
        "tie_word_embeddings": config.tie_embeddings,
        "rope_theta": config.rope_theta,
        "rope_scaling": dict(scaling) if config.rope_scaling else None,
        "rope_parameters": {**scaling, "rope_theta": config.rope_theta},
        "dtype": config.param_dtype,
        "torch_dtype": config.param_dtype,
    }
    if arch == GEMMA3:
        return gemma3_to_hf(config, out)
    if arch == "LlamaForCausalLM":
        out.update(attention_bias=False, mlp_bias=False)
    elif arch == "MistralForCausalLM":
        out.update(sliding_window=config.sliding_window)
    elif arch == "Qwen3MoeForCausalLM":
        out.update(
            attention_bias=False,
            use_sliding_window=config.sliding_window is not None,
            sliding_window=config.sliding_window,
            num_experts=config.num_experts,
            num_experts_per_tok=config.num_experts_per_tok,
            moe_intermediate_size=config.moe_intermediate_size,
            norm_topk_prob=config.norm_topk_prob,
            decoder_sparse_step=config.decoder_sparse_step,
            mlp_only_layers=list(config.mlp_only_layers),
        )
    else:
        window = config.sliding_window
        out.update(
            use_sliding_window=window is not None,
            sliding_window=window,
            max_window_layers=0 if window else config.num_layers,
        )
        if arch == "Qwen3ForCausalLM":
            out.update(attention_bias=False)
    return out


def _arch_of(config: LlamaConfig) -> str | None:
    """The Qwen3 architecture of `config`, None for the others; refuses what none has."""
    if config.num_experts and not config.qk_norm:
        raise ValueError(
            "config_to_hf: routed experts without qk_norm match no supported HF architecture "
            "(Qwen3MoeForCausalLM has q/k norms)."
        )
    if config.qk_norm and config.attention_bias:
        raise ValueError(
            "config_to_hf: qk_norm with attention_bias is not supported (Qwen3's "
            "attention_bias also puts a bias on o_proj, which Llama does not have)."
        )
    if config.num_experts:
        return "Qwen3MoeForCausalLM"
    return "Qwen3ForCausalLM" if config.qk_norm else None
