"""DoRA's magnitude and ``lora_bias`` in PEFT's format: vectors of one value per output
feature, beside a module's ``lora_A`` / ``lora_B``.

PEFT saves DoRA's magnitude (``use_dora``, `DoraLinearLayer.weight`) as
``<module>.lora_magnitude_vector`` ``(out,)``, for a Linear the norm over the input of its
``(out, in)`` weight, for an Embedding over the vocabulary per embedding feature; and
``lora_bias`` (the bias of ``lora_B``, an ``nn.Linear(r, out, bias=True)``, scaled by s
with the rest of the low-rank path) as ``<module>.lora_B.bias`` ``(out,)``. Ours are
``(*stack, *out)`` (`LoraWeights.magnitude`, `LoraWeights.bias`): they are flattened,
unstacked and split as b's output is. One config has one ``use_dora`` and one
``lora_bias``; PEFT refuses lora_bias with DoRA, on Embeddings and on
``target_parameters``, and DoRA on ``target_parameters``.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from lora_jax.core._dora import out_shape, weight_norm
from lora_jax.core._weights import LoraWeights
from lora_jax.peft._slots import Slot, file_names, listing
from lora_jax.peft._tensors import PREFIX, VECTOR_SUFFIX

__all__ = [
    "export_flags",
    "vector_tensors",
    "config_problems",
    "vector_problems",
    "with_vectors",
]

_FLAG = {"magnitude": "use_dora", "bias": "lora_bias"}


def export_flags(slots: Mapping[str, tuple[Slot, LoraWeights]]) -> dict[str, bool]:
    """``{"use_dora": .., "lora_bias": ..}`` of an export; a ValueError for what one PEFT
    config cannot hold: DoRA on some adapters only, DoRA with lora_bias, lora_bias with an
    Embedding, either with an expert (``"parameter"``) rule."""
    kinds = {s.path: s.kind for s, _ in slots.values()}
    has = {
        f: sorted({s.path for s, w in slots.values() if getattr(w, f) is not None}) for f in _FLAG
    }
    plain = sorted(set(kinds) - set(has["magnitude"]))
    if has["magnitude"] and plain:
        raise ValueError(
            "PEFT's config has one use_dora for every module, but only some adapters are DoRA "
            f"(have a magnitude); DoRA:{listing(has['magnitude'])}\nplain LoRA:{listing(plain)}"
            "\nexport them as two folders (two adapters), or train all with use_dora=True."
        )
    if has["magnitude"] and has["bias"]:
        raise ValueError(
            "PEFT refuses lora_bias with use_dora; these adapters have both a magnitude and a "
            f"bias:{listing(sorted(set(has['magnitude']) & set(has['bias'])))}"
        )
    refused = [("bias", "embedding", "Embedding layers")]
    refused += [(f, "parameter", "target_parameters (expert kernels)") for f in _FLAG]
    for field, kind, where in refused:
        odd = sorted(p for p, k in kinds.items() if k == kind)
        if has[field] and odd:
            raise ValueError(
                f"PEFT has no {_FLAG[field]} for {where}, and its config holds one "
                f"{_FLAG[field]} for every module: the adapters with a {field} "
                f"(at:{listing(has[field])}\n) cannot be exported in one folder with these "
                f"{kind} adapters:{listing(odd)}\nexport them as two folders."
            )
    return {_FLAG[f]: bool(has[f]) for f in _FLAG}


def vector_tensors(
    slots: Mapping[str, tuple[Slot, LoraWeights]], flags: Mapping[str, bool]
) -> dict[str, np.ndarray]:
    """PEFT's ``lora_magnitude_vector`` / ``lora_B.bias`` tensors of each slot, ``(out_part,)``;
    with lora_bias, a zero bias (of b's dtype) for an adapter without one: the same output."""
    stems = file_names({name: slot for name, (slot, _) in slots.items()})
    out = {}
    for name, (slot, w) in slots.items():
        for field, suffix in VECTOR_SUFFIX.items():
            if not flags[_FLAG[field]]:
                continue
            v = getattr(w, field)
            v = np.zeros(out_shape(w.b.shape, w.layout), w.b.dtype) if v is None else v
            v = np.asarray(v)
            part = v[slot.index].reshape(-1)[slot.start : slot.stop]
            out[f"{PREFIX}{stems[name]}.{suffix}"] = np.ascontiguousarray(part)
    return out


def config_problems(record: Mapping[str, Any]) -> list[str]:
    """What PEFT refuses in a config's use of DoRA / lora_bias (for `read_config`)."""
    used = [_FLAG[f] for f in _FLAG if record.get(_FLAG[f])]
    problems = []
    if len(used) == 2:
        problems.append("use_dora together with lora_bias")
    if used and record.get("target_parameters"):
        problems.append(
            f"{' or '.join(used)} with target_parameters (its ParamWrapper refuses them)"
        )
    return problems


def vector_problems(
    record: Mapping[str, Any], name: str, slot: Slot, found: Mapping[str, np.ndarray]
) -> list[str]:
    """Why a module's magnitude / bias tensors do not fit the config or the base (PEFT would
    load a missing one with only a warning, and ignore an unexpected one)."""
    problems = []
    n_out = slot.stop - slot.start
    if record.get("lora_bias") and slot.kind == "embedding":
        problems.append(f"{name}: lora_bias on an Embedding (PEFT refuses it)")
    for field, suffix in VECTOR_SUFFIX.items():
        want, v = bool(record.get(_FLAG[field])), found.get(field)
        if want and v is None:
            problems.append(f"{name}: no {suffix} in the file, though {_FLAG[field]} is true")
        elif not want and v is not None:
            problems.append(f"{name}: a {suffix} in the file, though {_FLAG[field]} is false")
        elif v is not None and v.shape != (n_out,):
            problems.append(f"{name}: {suffix} has shape {v.shape}; the base needs ({n_out},)")
    return problems


def with_vectors(
    adapters: dict[str, LoraWeights],
    groups: Mapping[str, Mapping[str, np.ndarray]],
    modules: Mapping[str, Slot],
    scales: Mapping[str, float],
    flat: Mapping[str, Any],
    dtype: Any,
) -> dict[str, LoraWeights]:
    """The adapters with the magnitudes / biases the file's modules carry (`groups`).

    A bias is scaled by s, so where `import_adapter` kept another scale than a module's
    own (layers of a scanned kernel) it is multiplied by ``s_module / s_kept``, as b is.
    Where a kernel has no module in the file (a fused part, a layer) the bias is zero and
    the magnitude the norm of ``W + s·a@b`` there (b is zero), so the output is the base's.
    """
    out = dict(adapters)
    for path, w in adapters.items():
        names = [n for n in groups if modules[n].path == path]
        stack = w.a.shape[: len(w.layout.stack_axes)]
        n_out = math.prod(w.b.shape[len(stack) + 1 :])
        new: dict[str, Any] = {}
        for field in VECTOR_SUFFIX:
            if not any(field in groups[n] for n in names):
                continue
            v = np.zeros((*stack, n_out), np.float32)
            if field == "magnitude" and len(names) < _slot_count(modules, path):
                norm = weight_norm(flat[path], w.a, w.b, w.layout, typing.cast(float, w.scale))
                v = np.array(norm, np.float32).reshape(v.shape)
            for n in names:
                s = modules[n]
                factor = scales[n] / typing.cast(float, w.scale) if field == "bias" else 1.0
                v[s.index][..., s.start : s.stop] = groups[n][field] * factor
            new[field] = jnp.asarray(v.reshape(*stack, *w.b.shape[len(stack) + 1 :]), dtype)
        out[path] = dataclasses.replace(w, **new) if new else w
    return out


def _slot_count(modules: Mapping[str, Slot], path: str) -> int:
    return sum(1 for s in modules.values() if s.path == path)
