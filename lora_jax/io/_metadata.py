"""Self-describing adapter metadata: the config, every adapter's layout, a base fingerprint.

Stored as JSON beside the arrays, so a checkpoint restores with no flags and refuses a base
whose targeted paths or shapes differ.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

import jax.numpy as jnp

from lora_jax.core._config import LoraConfig
from lora_jax.core._layout import Layout
from lora_jax.core._weights import LoraWeights, flatten_lora

FORMAT = "lora_jax.adapter"
FORMAT_VERSION = 1
LIBRARY_VERSION = "0.1.0"


def fingerprint(kernels: dict[str, tuple[int, ...]]) -> str:
    """A short hash of the targeted parameter paths and their shapes."""
    text = json.dumps(sorted((p, list(s)) for p, s in kernels.items()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _spec_json(spec: Any, adapters: dict[str, LoraWeights]) -> Any:
    if spec is None or isinstance(spec, str):
        return spec
    if callable(spec):  # a callable is not data: store what it selected, as exact patterns
        return [re.escape(p) for p in adapters]
    return list(spec)


def config_to_json(config: LoraConfig, adapters: dict[str, LoraWeights]) -> dict[str, Any]:
    """The config as JSON; a callable `targets` becomes the exact paths it selected."""
    return {
        "targets": _spec_json(config.targets, adapters),
        "exclude": None if callable(config.exclude) else _spec_json(config.exclude, adapters),
        "rank": int(config.rank),
        "alpha": float(config.alpha),
        "dropout": float(config.dropout),
        "use_rslora": bool(config.use_rslora),
        "rank_pattern": dict(config.rank_pattern),
        "alpha_pattern": dict(config.alpha_pattern),
        "init": config.init,
        "dtype": jnp.dtype(config.dtype).name,
    }


def config_from_json(data: dict[str, Any]) -> LoraConfig:
    """Inverse of `config_to_json`."""
    return LoraConfig(**{**data, "dtype": jnp.dtype(data["dtype"])})


def describe(lora: Any, config: LoraConfig) -> dict[str, Any]:
    """The full metadata record of an adapter tree."""
    adapters = flatten_lora(lora)
    kernels = {p: kernel_shape(w) for p, w in adapters.items()}
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "library_version": LIBRARY_VERSION,
        "config": config_to_json(config, adapters),
        "fingerprint": fingerprint(kernels),
        "adapters": {
            p: {
                "kind": w.layout.kind,
                "in_axes": list(w.layout.in_axes),
                "out_axes": list(w.layout.out_axes),
                "stack_axes": list(w.layout.stack_axes),
                "rank": w.rank,
                "kernel_shape": list(kernels[p]),
                "a_shape": list(w.a.shape),
                "b_shape": list(w.b.shape),
                "dtype": jnp.dtype(w.a.dtype).name,
            }
            for p, w in adapters.items()
        },
    }


def check_record(record: Any, where: str) -> None:
    """A ValueError when a metadata record is not ours or from an unknown format version."""
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise ValueError(f"{where} is not a lora_jax adapter metadata file.")
    version = record.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(
            f"{where} has format_version {version!r}; this lora_jax (version "
            f"{LIBRARY_VERSION}) reads format_version {FORMAT_VERSION}. Upgrade lora_jax."
        )


def layout_of(entry: dict[str, Any]) -> Layout:
    return Layout(
        entry["kind"], tuple(entry["in_axes"]), tuple(entry["out_axes"]), tuple(entry["stack_axes"])
    )


def check_base(record: dict[str, Any], frozen_flat: dict[str, Any]) -> None:
    """A ValueError listing every targeted path that is missing from, or shaped differently in,
    the base."""
    problems = []
    for path, entry in record["adapters"].items():
        want = tuple(entry["kernel_shape"])
        if path not in frozen_flat:
            problems.append(f"{path}: missing from the base (expected shape {want})")
            continue
        found = tuple(getattr(frozen_flat[path], "shape", ()))
        if found != want:
            problems.append(f"{path}: expected shape {want}, found {found}")
    if problems:
        raise ValueError(
            "this adapter was trained on a different base (fingerprint "
            f"{record['fingerprint']}):\n  " + "\n  ".join(problems)
        )


def check_config(record: dict[str, Any], config: LoraConfig) -> None:
    """A ValueError when an explicitly given config disagrees with the stored ranks."""
    for path, entry in record["adapters"].items():
        want = config.rank_for(path)
        if entry["rank"] != want:
            raise ValueError(
                f"{path}: the checkpoint has rank {entry['rank']} but the given config says "
                f"rank {want}. Load without `config=` to use the stored one."
            )
