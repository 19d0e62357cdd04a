"""``adapter_config.json``: PEFT's LoRA config, written from our adapters and read into them.

PEFT multiplies a module's low-rank path by ``lora_alpha / r`` (``lora_alpha / sqrt(r)``
with ``use_rslora``), r and alpha per module from ``rank_pattern`` / ``alpha_pattern``
(regex keys matched as ``(.*\\.)?(key)$``, first key wins) or else the global ``r`` and
``lora_alpha``. Our adapters carry their scale, so the export derives alpha from it
(``scale * r``, ``use_rslora`` false) and the import computes the scale PEFT would.
"""

from __future__ import annotations

import collections
import json
import math
import pathlib
import re
from collections.abc import Iterable, Mapping
from typing import Any

from lora_jax.peft._vectors import config_problems

__all__ = [
    "CONFIG_FILE",
    "peft_alpha",
    "export_record",
    "read_config",
    "targeted",
    "targeted_parameter",
    "module_settings",
]

CONFIG_FILE = "adapter_config.json"
# PEFT inits that subtract the initial adapter from the base weights.
_RESIDUAL_INITS = ("pissa", "olora", "corda", "lora_ga")
# PEFT config entries that change the forward pass in ways our adapters cannot express
# (``use_dora`` and ``lora_bias`` they can: `lora_jax.peft._vectors`).
_VARIANTS = (
    "use_qalora",
    "modules_to_save",
    "layer_replication",
    "trainable_token_indices",
    "alora_invocation_tokens",
    "arrow_config",
    "use_bdlora",
    "kasa_config",
    "velora_config",
    "monteclora_config",
)


def _number(x: float) -> float | int:
    return int(x) if float(x).is_integer() else float(x)


def peft_alpha(scale: float, rank: int) -> float | int:
    """PEFT's ``lora_alpha`` for an adapter of this scale and rank (``use_rslora`` false):
    ``scale * rank``, written with the fewest digits whose ``alpha / rank`` is `scale`
    exactly (as PEFT computes it), so ``16/8 * 8`` is written ``16``."""
    alpha = scale * rank
    for digits in (6, 9, 12, 15, 17):
        short = float(f"{alpha:.{digits}g}")
        if short / rank == scale:
            return _number(short)
    return _number(alpha)


def _most_common(values: Iterable[Any]) -> Any:
    """The most frequent value; among equally frequent ones, the first seen."""
    return collections.Counter(values).most_common(1)[0][0]


def export_record(
    settings: Mapping[str, tuple[int, float | int]],
    dropouts: list[float],
    base_model_name_or_path: str | None,
    task_type: str | None,
    parameters: Iterable[str] = (),
) -> dict[str, Any]:
    """The config of an export: ``settings`` is ``{module name: (r, lora_alpha)}``, the
    names in `parameters` being ``nn.Parameter`` s (PEFT's ``target_parameters``).

    The global ``r`` / ``lora_alpha`` / ``lora_dropout`` are the most common values; a
    module whose r or alpha differs gets an entry in ``rank_pattern`` / ``alpha_pattern``
    keyed by its escaped full name, which PEFT's ``(.*\\.)?(key)$`` rule matches for that
    module alone (a full name never ends another module's name at a dot boundary); PEFT
    matches a parameter's patterns against its full name the same way.
    """
    names = sorted(settings)
    params = sorted(set(parameters))
    r0 = _most_common(settings[n][0] for n in names)
    alpha0 = _most_common(settings[n][1] for n in names)
    return {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "r": int(r0),
        "lora_alpha": alpha0,
        "lora_dropout": float(_most_common(dropouts)),
        "use_rslora": False,
        "target_modules": [n for n in names if n not in params],
        "target_parameters": params or None,
        "exclude_modules": None,
        "rank_pattern": {re.escape(n): settings[n][0] for n in names if settings[n][0] != r0},
        "alpha_pattern": {re.escape(n): settings[n][1] for n in names if settings[n][1] != alpha0},
        "bias": "none",
        "fan_in_fan_out": False,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "init_lora_weights": True,
        "use_dora": False,
        "lora_bias": False,
        "inference_mode": True,
    }


def read_config(folder: pathlib.Path, allowed: Iterable[str] = ()) -> dict[str, Any]:
    """The folder's config, checked to be a plain PEFT LoRA (a ValueError otherwise); the
    `allowed` variants are left to the caller (``trainable_token_indices``: `_tokens`)."""
    try:
        record = json.loads((folder / CONFIG_FILE).read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{folder / CONFIG_FILE}: not valid JSON ({err}).") from err
    if not isinstance(record, dict) or record.get("peft_type") != "LORA":
        found = record.get("peft_type") if isinstance(record, dict) else record
        raise ValueError(f"{folder / CONFIG_FILE}: peft_type must be 'LORA'; found {found!r}.")
    used = [k for k in _VARIANTS if record.get(k) and k not in set(allowed)]
    if record.get("bias", "none") != "none":
        used.append(f"bias={record['bias']!r}")
    init = str(record.get("init_lora_weights", True)).lower()
    if init.startswith(_RESIDUAL_INITS):
        used.append(
            f"init_lora_weights={record['init_lora_weights']!r} (trained on a residual base; "
            "convert it to a plain LoRA with PEFT's path_initial_model_for_weight_conversion)"
        )
    if used:
        raise ValueError(
            f"{folder / CONFIG_FILE}: uses PEFT features a plain LoRA cannot express: "
            f"{', '.join(used)}."
        )
    refused = config_problems(record)
    if refused:
        raise ValueError(f"{folder / CONFIG_FILE}: PEFT would not load {'; '.join(refused)}.")
    dropout = record.get("lora_dropout") or 0.0
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise ValueError(
            f"{folder / CONFIG_FILE}: lora_dropout must be a number in [0, 1); found {dropout!r}."
        )
    params = record.get("target_parameters") or []
    if isinstance(params, str) or not all(isinstance(p, str) for p in params):
        raise ValueError(
            f"{folder / CONFIG_FILE}: target_parameters must be a list of names; found {params!r}."
        )
    if params and dropout:
        raise ValueError(
            f"{folder / CONFIG_FILE}: target_parameters with lora_dropout={dropout}; PEFT's "
            "ParamWrapper refuses lora_dropout != 0, so PEFT would not load this adapter."
        )
    return record


def targeted(record: Mapping[str, Any], name: str) -> bool:
    """PEFT's `target_modules` / `exclude_modules` rule (without layers_to_transform)."""

    def hits(spec: Any) -> bool:
        if isinstance(spec, str):
            return spec.lower() == "all-linear" or re.fullmatch(spec, name) is not None
        return name in spec or any(name.endswith(f".{s}") for s in spec)

    exclude, target = record.get("exclude_modules"), record.get("target_modules")
    if exclude and hits(exclude):
        return False
    return target is None or hits(target)


def targeted_parameter(record: Mapping[str, Any], name: str) -> bool:
    """PEFT's `target_parameters` rule: a full parameter name equal to an entry or ending in
    ``"." + entry`` (``_inject_parameters``; `exclude_modules` is not consulted)."""
    params = record.get("target_parameters") or []
    return name in params or any(name.endswith(f".{p}") for p in params)


def _pattern_value(patterns: Mapping[str, Any], name: str, default: Any) -> Any:
    """PEFT's `get_pattern_key`: the first key matching ``(.*\\.)?(key)$`` wins."""
    key = next((k for k in patterns if re.match(rf"(.*\.)?({k})$", name)), None)
    return default if key is None else patterns[key]


def module_settings(record: Mapping[str, Any], name: str) -> tuple[int, float, float]:
    """``(r, lora_alpha, scale)`` of one module, resolved and computed as PEFT does."""
    r0, alpha0 = record.get("r", 8), record.get("lora_alpha", 8)
    r = int(_pattern_value(record.get("rank_pattern") or {}, name, r0))
    alpha = float(_pattern_value(record.get("alpha_pattern") or {}, name, alpha0))
    if r < 1:
        raise ValueError(f"{CONFIG_FILE}: module {name} gets r={r}; PEFT needs r >= 1.")
    scale = alpha / math.sqrt(r) if record.get("use_rslora", False) else alpha / r
    return r, alpha, scale
