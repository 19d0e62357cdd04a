"""``adapter_model.safetensors``: PEFT's tensor keys and shapes, and our factors as them.

Keys are ``base_model.model.<module>.<suffix>``; a Linear's ``lora_A.weight`` is ``a.T``
``(r, in)`` and ``lora_B.weight`` is ``b.T`` ``(out, r)``; an Embedding's
``lora_embedding_A`` is ``(r, vocab)`` and ``lora_embedding_B`` ``(dim, r)``. Multi-axis
kernels are flattened row-major in the layout's axis order, fused ones sliced along their
flattened output (see `lora_jax.peft.ModuleMap`). DoRA's ``lora_magnitude_vector`` and
lora_bias's ``lora_B.bias`` ``(out,)`` sit beside them (`lora_jax.peft._vectors`).

An expert stack (PEFT's ``target_parameters``, `ParamWrapper` in
``peft/tuners/lora/layer.py``) keeps one rank-r pair per expert e in two Linears:
``lora_A.weight`` ``(E*r, in)`` holds ``a_e.T`` in rows ``e*r .. e*r+r`` (expert-major),
``lora_B.weight`` ``(out, r*E)`` holds ``b_e.T`` in columns ``k*E + e`` (rank-major,
`get_delta_weight` reshapes it to ``(out, r, E)``); the update of expert e is
``lora_alpha / r * B_e @ A_e``. With `Slot.swap` PEFT's in/out are our out/in.
"""

from __future__ import annotations

import json
import math
import pathlib
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from lora_jax.core._paths import close_matches
from lora_jax.io._digest import digest
from lora_jax.peft._slots import Slot, listing

__all__ = [
    "WEIGHTS_FILE",
    "PREFIX",
    "SUFFIX",
    "VECTOR_SUFFIX",
    "safetensors",
    "torch_factors",
    "flax_blocks",
    "torch_shapes",
    "read_tensors",
    "file_metadata",
    "group_tensors",
    "torch_weight",
]

WEIGHTS_FILE = "adapter_model.safetensors"
# The header metadata key of the SHA-256 digests of every tensor (our exports record them;
# PEFT and the serving engines ignore extra metadata).
DIGESTS = "lora_jax.sha256"
PREFIX = "base_model.model."
_KEY = re.compile(
    r"(?P<module>.+)\.(?P<suffix>lora_A\.weight|lora_B\.weight|lora_embedding_A|lora_embedding_B"
    r"|lora_magnitude_vector|lora_B\.bias|base_layer\.weight)"
)
# ``{LoraWeights field: key suffix}`` of the vectors of one value per output feature: DoRA's
# magnitude (any module kind) and lora_bias (``lora_B``'s bias); see `lora_jax.peft._vectors`.
VECTOR_SUFFIX = {"magnitude": "lora_magnitude_vector", "bias": "lora_B.bias"}
_VECTOR = {suffix: field for field, suffix in VECTOR_SUFFIX.items()}
SUFFIX = {
    ("linear", "A"): "lora_A.weight",
    ("linear", "B"): "lora_B.weight",
    ("embedding", "A"): "lora_embedding_A",
    ("embedding", "B"): "lora_embedding_B",
}
_FACTOR = {suffix: kind_factor for kind_factor, suffix in SUFFIX.items()}
SUFFIX |= {("parameter", "A"): "lora_A.weight", ("parameter", "B"): "lora_B.weight"}


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


def torch_factors(a: Any, b: Any, slot: Slot) -> tuple[np.ndarray, np.ndarray]:
    """PEFT's ``(lora_A, lora_B)`` of one slot: ``(r, in)`` and ``(out_part, r)``; for a
    parameter ``(E*r, in)`` and ``(out, r*E)`` (in and out swapped with `Slot.swap`)."""
    a_blk, b_blk = np.asarray(a)[slot.index], np.asarray(b)[slot.index]
    if slot.kind != "parameter":
        r = a_blk.shape[-1]
        A, B = a_blk.reshape(-1, r).T, b_blk.reshape(r, -1)[:, slot.start : slot.stop].T
        return np.ascontiguousarray(A), np.ascontiguousarray(B)
    n, r = slot.experts, a_blk.shape[-1]
    a3, b3 = a_blk.reshape(n, -1, r), b_blk.reshape(n, r, -1)  # (E, in, r), (E, r, out)
    lhs, rhs = (b3.transpose(0, 2, 1), a3.transpose(0, 2, 1)) if slot.swap else (a3, b3)
    A = lhs.transpose(0, 2, 1).reshape(n * r, -1)  # row e*r + k: lhs[e, :, k]
    B = rhs.transpose(2, 1, 0).reshape(rhs.shape[2], r * n)  # column k*E + e: rhs[e, k]
    return np.ascontiguousarray(A), np.ascontiguousarray(B)


def flax_blocks(A: np.ndarray, B: np.ndarray, slot: Slot) -> tuple[np.ndarray, np.ndarray]:
    """The inverse of `torch_factors`: ``a[slot.index]`` ``(..., in, r)`` and the slot's
    part of ``b[slot.index]`` ``(..., r, out_part)``, inputs and outputs flattened."""
    if slot.kind != "parameter":
        return A.T, B.T
    n = slot.experts
    r = A.shape[0] // n
    lhs = A.reshape(n, r, -1).transpose(0, 2, 1)  # (E, in, r) in PEFT's terms
    rhs = B.reshape(B.shape[0], r, n).transpose(2, 1, 0)  # (E, r, out)
    if slot.swap:
        return rhs.transpose(0, 2, 1), lhs.transpose(0, 2, 1)
    return lhs, rhs


def torch_shapes(slot: Slot, r: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """The shapes of ``lora_A`` and ``lora_B`` that PEFT gives the slot's module at rank r."""
    n_in = math.prod(slot.layout.sizes(slot.shape)[1])
    n_out = slot.stop - slot.start
    if slot.kind != "parameter":
        return (r, n_in), (n_out, r)
    p_in, p_out = (n_out, n_in) if slot.swap else (n_in, n_out)
    return (slot.experts * r, p_in), (p_out, r * slot.experts)


def file_metadata(tensors: Mapping[str, np.ndarray]) -> dict[str, str]:
    """The safetensors header metadata of an export: PEFT's ``format`` and our digests."""
    digests = {k: digest(v) for k, v in sorted(tensors.items())}
    return {"format": "pt", DIGESTS: json.dumps(digests, separators=(",", ":"))}


def read_tensors(folder: pathlib.Path, verify: bool = True) -> dict[str, np.ndarray]:
    """Every tensor of the folder's weights file, by key. A damaged or truncated file is a
    ValueError naming it; safetensors keeps no checksum of the data, so a file we exported
    (digests in its header metadata) is also checked tensor by tensor with `verify`."""
    where = folder / WEIGHTS_FILE
    st = safetensors()
    try:
        with st.safe_open(str(where), framework="np") as f:
            meta = f.metadata() or {}
        tensors = dict(st.numpy.load_file(str(where)))
    except FileNotFoundError:
        raise
    except Exception as err:  # safetensors raises its own error types for bad headers/sizes
        raise ValueError(f"cannot read {where}: {err} (the file is damaged or truncated).") from err
    if verify and DIGESTS in meta:
        recorded = json.loads(meta[DIGESTS])
        for key, want in recorded.items():
            got = digest(tensors[key]) if key in tensors else "missing"
            if got != want:
                raise ValueError(
                    f"{where}: tensor {key!r} does not match what was exported (the file is "
                    f"damaged): digest {got}, recorded {want}. Export or copy it again."
                )
    return tensors


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
        elif hit["suffix"] in _VECTOR:  # checked against the config by `_vectors`
            groups.setdefault(hit["module"], {})[_VECTOR[hit["suffix"]]] = tensors[key]
        elif _FACTOR[hit["suffix"]][0] != _file_kind(modules[hit["module"]].kind):
            bad["kind"].append(f"{key} (the module is {modules[hit['module']].kind})")
        else:
            groups.setdefault(hit["module"], {})[_FACTOR[hit["suffix"]][1]] = tensors[key]
    if any(bad.values()):
        raise ValueError(_unmatched_message(bad, list(modules), unsupported))
    if not groups:
        raise ValueError("the adapter holds no LoRA tensors.")
    return groups, bases


def _file_kind(kind: str) -> str:
    """The tensor names a slot's kind is saved with: a parameter's are a Linear's."""
    return "linear" if kind == "parameter" else kind


def _unmatched_message(
    bad: dict[str, list[str]], modules: list[str], unsupported: list[str]
) -> str:
    titles = {
        "prefix": f"keys without the {PREFIX!r} prefix",
        "unknown": "keys that are not LoRA tensors (another PEFT method? full weights?)",
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
