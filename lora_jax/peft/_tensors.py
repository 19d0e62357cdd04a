"""``adapter_model.safetensors``: PEFT's tensor keys and shapes, and our factors as them.

Keys are ``base_model.model.<module>.<suffix>``; a Linear's ``lora_A.weight`` is ``a.T``
``(r, in)`` and ``lora_B.weight`` is ``b.T`` ``(out, r)``; an Embedding's
``lora_embedding_A`` is ``(r, vocab)`` and ``lora_embedding_B`` ``(dim, r)``. Multi-axis
kernels are flattened row-major in the layout's axis order, fused ones sliced along their
flattened output (see `lora_jax.peft.ModuleMap`).
"""

from __future__ import annotations

import math
import pathlib
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from lora_jax.core._paths import close_matches
from lora_jax.peft._module_map import Slot, listing

__all__ = [
    "WEIGHTS_FILE",
    "PREFIX",
    "SUFFIX",
    "safetensors",
    "torch_factor",
    "read_tensors",
    "group_tensors",
    "torch_weight",
]

WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."
_KEY = re.compile(
    r"(?P<module>.+)\.(?P<suffix>lora_A\.weight|lora_B\.weight|lora_embedding_A|lora_embedding_B"
    r"|base_layer\.weight)"
)
SUFFIX = {
    ("linear", "A"): "lora_A.weight",
    ("linear", "B"): "lora_B.weight",
    ("embedding", "A"): "lora_embedding_A",
    ("embedding", "B"): "lora_embedding_B",
}
_FACTOR = {suffix: kind_factor for kind_factor, suffix in SUFFIX.items()}


def safetensors() -> Any:
    """The `safetensors` package, or an ImportError saying how to install it."""
    try:
        import safetensors
        import safetensors.numpy
    except ImportError as err:
        raise ImportError(
            "PEFT interop reads and writes safetensors files: pip install safetensors "
            "(or pip install 'lora_jax[interop]')."
        ) from err
    return safetensors


def torch_factor(x: Any, slot: Slot, factor: str) -> np.ndarray:
    """The PyTorch tensor of one factor: A ``(r, in)``, B ``(out_part, r)``."""
    m = np.asarray(x)[slot.index]
    if factor == "A":
        return np.ascontiguousarray(m.reshape(-1, m.shape[-1]).T)
    return np.ascontiguousarray(m.reshape(m.shape[0], -1)[:, slot.start : slot.stop].T)


def read_tensors(folder: pathlib.Path) -> dict[str, np.ndarray]:
    """Every tensor of the folder's weights file, by key."""
    return dict(safetensors().numpy.load_file(str(folder / WEIGHTS_FILE)))


def group_tensors(
    tensors: Mapping[str, np.ndarray], modules: Mapping[str, Slot], unsupported: list[str]
) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, np.ndarray]]:
    """``{module: {"A": .., "B": ..}}`` and ``{module: base weight}``; a ValueError listing
    every key PEFT would load with only a warning (or not at all)."""
    groups: dict[str, dict[str, np.ndarray]] = {}
    bases: dict[str, np.ndarray] = {}
    bad: dict[str, list[str]] = {"prefix": [], "unknown": [], "module": [], "kind": []}
    for key in sorted(tensors):
        hit = _KEY.fullmatch(key.removeprefix(PREFIX))
        if not key.startswith(PREFIX):
            bad["prefix"].append(key)
        elif hit is None:
            bad["unknown"].append(key)
        elif hit["module"] not in modules:
            bad["module"].append(key)
        elif hit["suffix"] == "base_layer.weight":
            bases[hit["module"]] = tensors[key]
        elif _FACTOR[hit["suffix"]][0] != modules[hit["module"]].kind:
            bad["kind"].append(f"{key} (the module is {modules[hit['module']].kind})")
        else:
            groups.setdefault(hit["module"], {})[_FACTOR[hit["suffix"]][1]] = tensors[key]
    if any(bad.values()):
        raise ValueError(_unmatched_message(bad, list(modules), unsupported))
    if not groups:
        raise ValueError("the adapter holds no LoRA tensors.")
    return groups, bases


def _unmatched_message(
    bad: dict[str, list[str]], modules: list[str], unsupported: list[str]
) -> str:
    titles = {
        "prefix": f"keys without the {PREFIX!r} prefix",
        "unknown": "keys that are not LoRA A/B tensors (DoRA, biases, full weights?)",
        "module": "keys naming no module of the base (through `module_map`)",
        "kind": "keys of the wrong kind for their module (lora_A vs lora_embedding_A)",
    }
    parts = [f"{titles[k]}:{listing(keys)}" for k, keys in bad.items() if keys]
    if bad["module"]:
        name = _KEY.fullmatch(bad["module"][0].removeprefix(PREFIX))
        word = name["module"] if name else bad["module"][0]
        near = close_matches(word, modules, 3)
        parts.append(f"modules of the base closest to {word!r}:{listing(near)}")
    if unsupported:
        parts.append(f"kernels `module_map` marks unsupported:{listing(unsupported)}")
    return (
        "the adapter has keys PEFT would load with only a warning (leaving those adapters "
        "at zero) or not at all; nothing was imported.\n" + "\n".join(parts)
    )


def torch_weight(slot: Slot, kernel: Any) -> np.ndarray:
    """The PyTorch weight of one module: ``(out, in)`` for a Linear, ``(vocab, dim)`` else."""
    _, ins, outs = slot.layout.sizes(slot.shape)
    m = np.transpose(np.asarray(kernel), slot.layout.perm)[slot.index]
    m = m.reshape(math.prod(ins), math.prod(outs))[:, slot.start : slot.stop]
    return m if slot.kind == "embedding" else m.T
