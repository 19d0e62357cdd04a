"""Self-describing adapter metadata: every adapter's layout, rank, scale, dropout and dtype.

Stored as JSON beside the arrays, so a saved adapter or checkpoint restores with no config
(each `LoraWeights` gets back its own scale, dropout, layout and residual norm), and refuses
a base whose targeted paths or shapes differ (a fingerprint of the base's kernels). The
config an adapter was made with may be recorded too, for information only: nothing reads
it back.

    >>> import jax, jax.numpy as jnp, lora_jax as lj
    >>> from lora_jax.io._metadata import describe
    >>> config = lj.LoraConfig(rank=2, alpha=16.0, targets="w")
    >>> _, lora = lj.split({"w": jnp.ones((4, 3))}, config, key=jax.random.key(0))
    >>> entry = describe(lora)["adapters"]["w"]
    >>> entry["rank"], entry["scale"], entry["kernel_shape"]
    (2, 8.0, [4, 3])
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

from lora_jax.core._config import LoraConfig
from lora_jax.core._layout import Layout
from lora_jax.core._paths import nest
from lora_jax.core._weights import LoraWeights, flatten_lora, kernel_shape

FORMAT = "lora_jax.adapter"
FORMAT_VERSION = 2
LIBRARY_VERSION = "0.2.0"
# The arrays of one adapter, by the name they are stored under (the last two when present).
EXTRAS = ("a", "b", "magnitude", "bias")


def fingerprint(kernels: Mapping[str, tuple[int, ...]]) -> str:
    """A short hash of the targeted parameter paths and their shapes."""
    text = json.dumps(sorted((p, list(s)) for p, s in kernels.items()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _spec_json(spec: Any, adapters: Mapping[str, LoraWeights]) -> Any:
    if spec is None or isinstance(spec, str):
        return spec
    if callable(spec):  # a callable is not data: store what it selected, as exact patterns
        return [re.escape(p) for p in adapters]
    return list(spec)


def config_to_json(config: LoraConfig, adapters: Mapping[str, LoraWeights]) -> dict[str, Any]:
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
        "slices": dict(config.slices),
        "init": config.init,
        "dtype": jnp.dtype(config.dtype).name,
        "use_dora": config.use_dora,
        "lora_bias": config.lora_bias,
    }


def _scale_json(scale: float | tuple[float, ...]) -> float | list[float]:
    return list(scale) if isinstance(scale, tuple) else scale


def describe_one(w: LoraWeights) -> dict[str, Any]:
    """The metadata entry of one adapter: layout, shapes, rank, scale, dropout, dtypes."""
    return {
        "kind": w.layout.kind,
        "in_axes": list(w.layout.in_axes),
        "out_axes": list(w.layout.out_axes),
        "stack_axes": list(w.layout.stack_axes),
        "kernel_shape": list(kernel_shape(w)),
        "rank": w.rank,
        "scale": _scale_json(w.scale),
        "dropout": w.dropout,
        "residual_norm": w.residual_norm,
        "a_shape": list(w.a.shape),
        "b_shape": list(w.b.shape),
        "dtype": jnp.dtype(w.a.dtype).name,
        "b_dtype": jnp.dtype(w.b.dtype).name,
        **{
            f"{name}_{what}": None if v is None else fn(v)
            for name, v in (("magnitude", w.magnitude), ("bias", w.bias))
            for what, fn in (("shape", lambda x: list(x.shape)), ("dtype", _dtype_name))
        },
    }


def _dtype_name(x: Any) -> str:
    return jnp.dtype(x.dtype).name


def describe(lora: Any, config: LoraConfig | None = None) -> dict[str, Any]:
    """The full metadata record of an adapter tree (`config`, if given, for information)."""
    adapters = flatten_lora(lora)
    entries = {p: describe_one(w) for p, w in adapters.items()}
    kernels = {p: tuple(e["kernel_shape"]) for p, e in entries.items()}
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "library_version": LIBRARY_VERSION,
        "fingerprint": fingerprint(kernels),
        "config": None if config is None else config_to_json(config, adapters),
        "adapters": entries,
    }


def check_record(record: Any, where: str) -> None:
    """A ValueError when a metadata record is not ours or from another format version."""
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise ValueError(f"{where} is not a lora_jax adapter metadata file.")
    version = record.get("format_version")
    if version == 1:
        raise ValueError(
            f"{where} has format_version 1 (lora_jax 0.1), which records no per-adapter "
            f"scales; this lora_jax ({LIBRARY_VERSION}) reads format_version {FORMAT_VERSION}. "
            f"Load it with lora_jax 0.1 and re-save it with this version (give the adapters "
            f"their scale with `w.replace(scale=alpha / rank)`)."
        )
    if version != FORMAT_VERSION:
        raise ValueError(
            f"{where} has format_version {version!r}; this lora_jax (version "
            f"{LIBRARY_VERSION}) reads format_version {FORMAT_VERSION}. Upgrade lora_jax."
        )


def layout_of(entry: Mapping[str, Any]) -> Layout:
    """The `Layout` an entry records."""
    return Layout(
        entry["kind"], tuple(entry["in_axes"]), tuple(entry["out_axes"]), tuple(entry["stack_axes"])
    )


def scale_of(entry: Mapping[str, Any]) -> float | tuple[float, ...]:
    """The scale an entry records (a tuple for stacked adapters)."""
    scale = entry["scale"]
    return tuple(float(s) for s in scale) if isinstance(scale, list) else float(scale)


def weights_from_record(record: Mapping[str, Any], arrays: Mapping[str, Any]) -> dict[str, Any]:
    """Rebuilds the adapter tree: each `LoraWeights` with its stored metadata.

    Args:
        record: a metadata record (from `describe` or a file).
        arrays: ``{"<path>/a": a, "<path>/b": b}`` for every adapter of the record.

    Returns:
        The nested adapter tree.

    Raises:
        ValueError: an array is missing or not shaped as the record says.
    """
    adapters = {}
    for path, entry in record["adapters"].items():
        a, b = arrays.get(f"{path}/a"), arrays.get(f"{path}/b")
        if a is None or b is None:
            raise ValueError(f"{path}: the stored arrays lack this adapter's a or b.")
        if tuple(a.shape) != tuple(entry["a_shape"]) or tuple(b.shape) != tuple(entry["b_shape"]):
            raise ValueError(
                f"{path}: stored arrays a={tuple(a.shape)}, b={tuple(b.shape)} do not have the "
                f"shapes the metadata records (a={tuple(entry['a_shape'])}, "
                f"b={tuple(entry['b_shape'])})."
            )
        extras = {}
        for name in ("magnitude", "bias"):
            want = entry.get(f"{name}_shape")
            if want is None:
                continue
            v = arrays.get(f"{path}/{name}")
            if v is None or tuple(v.shape) != tuple(want):
                found = "nothing" if v is None else f"shape {tuple(v.shape)}"
                raise ValueError(
                    f"{path}: the metadata records a {name} of shape {tuple(want)}; the "
                    f"stored arrays hold {found}."
                )
            extras[name] = v
        adapters[path] = LoraWeights(
            a,
            b,
            layout_of(entry),
            scale=scale_of(entry),
            dropout=float(entry["dropout"]),
            residual_norm=entry["residual_norm"],
            **extras,
        )
    return nest(adapters)


def check_base(record: Mapping[str, Any], frozen_flat: Mapping[str, Any]) -> None:
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


_HINT = (
    "The checkpoint is the truth: build the target from lj.load_adapter or from the same "
    "lj.split that made the saved adapters."
)


def _norms_differ(stored: float | None, found: float | None) -> bool:
    if stored is None or found is None:
        return stored is not found
    return not math.isclose(stored, found, rel_tol=1e-6)


def check_target(record: Mapping[str, Any], adapters: Mapping[str, LoraWeights]) -> None:
    """A ValueError when target adapters differ from the stored ones in paths, layouts,
    ranks, scales, dropout rates or residual norms (naming the path and both values)."""
    stored = record["adapters"]
    missing, extra = sorted(set(stored) - set(adapters)), sorted(set(adapters) - set(stored))
    if missing or extra:
        raise ValueError(
            f"the target's adapters are not the checkpoint's: missing from the target "
            f"{missing}, not in the checkpoint {extra}. {_HINT}"
        )
    for path, w in adapters.items():
        entry = stored[path]
        pairs = [
            ("layout", layout_of(entry), w.layout),
            ("rank", entry["rank"], w.rank),
            ("scale", scale_of(entry), w.scale),
            ("dropout", float(entry["dropout"]), w.dropout),
        ]
        for name, want, found in pairs:
            if want != found:
                raise ValueError(
                    f"{path}: the checkpoint has {name} {want!r} but the target has {name} "
                    f"{found!r}. {_HINT}"
                )
        for name in ("magnitude", "bias"):
            has = entry.get(f"{name}_shape") is not None
            if has != (getattr(w, name) is not None):
                where, other = ("checkpoint", "target") if has else ("target", "checkpoint")
                raise ValueError(
                    f"{path}: the {where} has a {name} (DoRA / lora_bias) but the {other} "
                    f"has none. {_HINT}"
                )
        if _norms_differ(entry["residual_norm"], w.residual_norm):
            raise ValueError(
                f"{path}: the checkpoint has residual_norm {entry['residual_norm']!r} but the "
                f"target has residual_norm {w.residual_norm!r}. {_HINT}"
            )
