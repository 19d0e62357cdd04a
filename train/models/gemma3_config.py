"""Gemma 3's ``config.json`` (``Gemma3ForCausalLM``, ``gemma3_text``) <-> `LlamaConfig` fields.

Gemma 3 interleaves local layers (a sliding window, rotary base ``rope_local_base_freq``) with
global ones (``rope_theta`` and the rope scaling, linear on the larger models), chosen by
``layer_types`` or, in older files, ``sliding_window_pattern`` (every n-th layer global).
Transformers 5 keeps both rotary settings in ``rope_parameters`` keyed by layer type; older
files have ``rope_theta``, ``rope_local_base_freq`` and ``rope_scaling``. Both are read and
written. `train.models.hf_config` dispatches here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from train.models.config import LlamaConfig

__all__ = ["GEMMA3", "gemma3_fields", "gemma3_to_hf"]

GEMMA3 = "Gemma3ForCausalLM"
_KINDS = ("sliding_attention", "full_attention")
_ACTIVATION = "gelu_pytorch_tanh"


def _layer_types(hf: Mapping[str, Any], where: str) -> list[str]:
    n = hf["num_hidden_layers"]
    pattern = hf.get("sliding_window_pattern", hf.get("_sliding_window_pattern", 6))
    types = hf.get("layer_types") or [
        "sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n)
    ]
    unknown = sorted(set(types) - set(_KINDS))
    if len(types) != n or unknown:
        raise ValueError(
            f"{where}: layer_types must list {n} of {list(_KINDS)}; found {len(types)} "
            f"entries, unknown {unknown}."
        )
    return list(types)


def _rope(hf: Mapping[str, Any], where: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(global, local) rotary parameters, each ``{"rope_type", "rope_theta", ...}``."""
    params = hf.get("rope_parameters") or {}
    if "full_attention" in params or "sliding_attention" in params:
        full = dict(params.get("full_attention") or {})
        local = dict(params.get("sliding_attention") or {})
    else:
        full = dict(hf.get("rope_scaling") or {})
        local = {"rope_theta": hf.get("rope_local_base_freq", 10000.0)}
    full.setdefault("rope_theta", hf.get("rope_theta", 1_000_000.0))
    local.setdefault("rope_theta", hf.get("rope_local_base_freq", 10000.0))
    for p in (full, local):
        p["rope_type"] = p.pop("type", p.get("rope_type", "default"))
        if p.pop("partial_rotary_factor", 1.0) != 1.0:
            raise ValueError(f"{where}: partial_rotary_factor != 1 is not supported.")
    if local != full and local["rope_type"] != "default":
        raise ValueError(
            f"{where}: rope scaling {local['rope_type']!r} on the sliding-window layers is not "
            "supported (Gemma 3 scales only the global layers)."
        )
    return full, local


def gemma3_fields(hf: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The `LlamaConfig` keyword arguments a Gemma 3 ``config.json`` sets beyond Llama's.

    Args:
        hf: the parsed ``config.json`` (``Gemma3ForCausalLM`` / ``gemma3_text``).
        where: the file, for error messages.

    Returns:
        ``{field: value}``, overriding the Llama reading of `hf`.

    Raises:
        ValueError: an activation other than ``gelu_pytorch_tanh``, attention biases,
            bidirectional attention, ``attn_logit_softcapping`` (which transformers ignores),
            bad ``layer_types`` or rope scaling on the local layers.
    """
    act = hf.get("hidden_activation", hf.get("hidden_act")) or _ACTIVATION
    if act != _ACTIVATION:
        raise ValueError(f"{where}: Gemma 3 with hidden_activation {act!r} is not supported.")
    for key in ("attention_bias", "use_bidirectional_attention"):
        if hf.get(key):
            raise ValueError(f"{where}: Gemma 3 with {key}=true is not supported.")
    if hf.get("attn_logit_softcapping") is not None:
        raise ValueError(
            f"{where}: attn_logit_softcapping is not supported: transformers' Gemma3Attention "
            "never applies it (Gemma 3 replaced it by the q/k norms), so its meaning is unclear."
        )
    types = _layer_types(hf, where)
    full, local = _rope(hf, where)
    window = hf.get("sliding_window", 4096)
    return dict(
        family="gemma3",
        qk_norm=True,
        head_dim=hf.get("head_dim", 256),
        max_seq_len=hf.get("max_position_embeddings", 131_072),
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
        sliding_window=window,
        global_layers=tuple(i for i, t in enumerate(types) if t == "full_attention")
        if window
        else (),
        rope_theta=float(full.pop("rope_theta")),
        rope_scaling=full,
        rope_local_theta=None if local == full else float(local["rope_theta"]),
        query_pre_attn_scalar=hf.get("query_pre_attn_scalar", 256),
        final_logit_softcapping=hf.get("final_logit_softcapping"),
    )


def gemma3_to_hf(config: LlamaConfig, out: Mapping[str, Any]) -> dict[str, Any]:
    """A ``Gemma3ForCausalLM`` ``config.json`` from `config` and the common keys in `out`.

    Args:
        config: a ``family="gemma3"`` config.
        out: the keys every family writes (sizes, eps, dtype).

    Returns:
        The JSON-able dict, with both the transformers 5 and the older rope keys.
    """
    scaling = dict(config.rope_scaling or {"rope_type": "default"})
    full = {**scaling, "rope_theta": config.rope_theta}
    local_theta = config.rope_local_theta
    local = full if local_theta is None else {"rope_type": "default", "rope_theta": local_theta}
    types = [_KINDS[not config.is_local_layer(i)] for i in range(config.num_layers)]
    hf = {k: v for k, v in out.items() if k != "hidden_act"}
    hf.update(
        architectures=[GEMMA3],
        model_type="gemma3_text",
        hidden_activation=_ACTIVATION,
        attention_bias=False,
        use_bidirectional_attention=False,
        sliding_window=config.sliding_window,
        layer_types=types,
        query_pre_attn_scalar=config.query_pre_attn_scalar or config.head_dim,
        attn_logit_softcapping=None,
        final_logit_softcapping=config.final_logit_softcapping,
        rope_parameters={"full_attention": full, "sliding_attention": dict(local)},
        rope_theta=config.rope_theta,
        rope_local_base_freq=local["rope_theta"],
        rope_scaling=dict(scaling) if config.rope_scaling else None,
    )
    return hf
