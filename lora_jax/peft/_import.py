"""`import_adapter`: a HuggingFace PEFT LoRA folder as our adapters on a Flax base.

Every key must name a module that the `ModuleMap` makes of a kernel of the base, with the
shapes PEFT's config gives it; stacked layers are stacked back and the parts of a fused
kernel joined. Each adapter comes back with the scale PEFT computes for its modules and
the config's ``lora_dropout``, so nothing after the import needs a config.
"""

from __future__ import annotations

import math
import os
import pathlib
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from lora_jax.core._layout import Layout
from lora_jax.core._paths import flatten, nest
from lora_jax.core._weights import LoraWeights, check_fits
from lora_jax.peft._config import (
    CONFIG_FILE,
    module_settings,
    read_config,
    targeted,
    targeted_parameter,
)
from lora_jax.peft._module_map import ModuleMap
from lora_jax.peft._slots import Slot, file_names, listing, module_slots, unsupported_reason
from lora_jax.peft._tensors import (
    WEIGHTS_FILE,
    flax_blocks,
    group_tensors,
    read_tensors,
    torch_shapes,
    torch_weight,
)
from lora_jax.peft._tokens import TOKENS_KEY, import_tokens, split_tokens
from lora_jax.peft._vectors import vector_problems, with_vectors

__all__ = ["import_adapter"]

# ``{module: (A, B, r, alpha, scale)}``, r / alpha / scale as PEFT resolves them.
_Factors = dict[str, tuple[np.ndarray, np.ndarray, int, float, float]]


def _universe(
    flat: dict[str, Any], module_map: ModuleMap, layouts: Mapping[str, Layout]
) -> tuple[dict[str, Slot], list[str]]:
    """Every module the map makes of the base's kernels, and the unsupported paths."""
    modules: dict[str, Slot] = {}
    unsupported = []
    for path, leaf in flat.items():
        shape = tuple(getattr(leaf, "shape", ()))
        if len(shape) < 2 or not jnp.issubdtype(getattr(leaf, "dtype", int), jnp.floating):
            continue
        reason = unsupported_reason(module_map, path)
        if reason is not None:
            unsupported.append(f"{path}: {reason}")
            continue
        modules.update(module_slots(module_map, path, shape, layouts.get(path)) or {})
    return modules, unsupported


def _file_groups(
    record: Mapping[str, Any],
    tensors: Mapping[str, np.ndarray],
    modules: dict[str, Slot],
    unsupported: list[str],
) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, np.ndarray]]:
    """`group_tensors` by module (or parameter) name, reading a parameter's tensors under
    the key PEFT nests it at for the config's ``target_parameters``."""
    chosen = {
        n: s for n, s in modules.items() if s.kind != "parameter" or targeted_parameter(record, n)
    }
    stems = file_names(chosen)
    names = {stem: name for name, stem in stems.items()}
    by_stem = {stems[n]: s for n, s in chosen.items()}
    groups, bases = group_tensors(tensors, by_stem, unsupported)
    return {names[k]: g for k, g in groups.items()}, {names[k]: b for k, b in bases.items()}


def _check_bases(bases: dict[str, np.ndarray], modules: Mapping[str, Slot], flat: dict) -> None:
    """PEFT saves the base weights of targeted embeddings (``save_embedding_layers``) and
    loads them over the base; a LoRA import can only accept them when they are the base."""
    differ = []
    for name, found in bases.items():
        slot = modules[name]
        want = torch_weight(slot, flat[slot.path])
        if found.shape != want.shape or not np.array_equal(found.astype(want.dtype), want):
            differ.append(name)
    if differ:
        raise ValueError(
            "the adapter carries full base weights (PEFT's save_embedding_layers, e.g. after "
            f"resizing the vocabulary) that differ from `frozen` for:{listing(differ)}\n"
            "a LoRA adapter cannot express them; load the base they belong to."
        )


def _module_factors(
    record: Mapping[str, Any], groups: dict[str, dict[str, np.ndarray]], modules: dict
) -> _Factors:
    """Each module's factors with its r, alpha and scale, checked against the base."""
    out, problems = {}, []
    for name, pair in groups.items():
        slot = modules[name]
        if not {"A", "B"} <= set(pair):
            problems.append(f"{name}: only {sorted(pair)} in the file")
            continue
        if slot.kind != "parameter" and not targeted(record, name):
            problems.append(f"{name}: not selected by target_modules/exclude_modules")
            continue
        r, alpha, scale = module_settings(record, name)
        want = torch_shapes(slot, r)
        found = (pair["A"].shape, pair["B"].shape)
        if found != want:
            problems.append(f"{name}: A, B have shapes {found}; r={r} and the base need {want}")
            continue
        vectors = vector_problems(record, name, slot, pair)
        if vectors:
            problems.extend(vectors)
            continue
        out[name] = (pair["A"], pair["B"], r, alpha, scale)
    if problems:
        raise ValueError(
            "the adapter does not fit its config or the base (PEFT would not load it as "
            f"written):{listing(problems)}"
        )
    return out


def _assemble(
    factors: _Factors, modules: dict[str, Slot], dropout: float, dtype: Any
) -> dict[str, LoraWeights]:
    """One `LoraWeights` per Flax kernel from its modules (unstacked layers, fused parts).

    Layers of a scanned kernel whose r differs (PEFT's ``rank_pattern``) are padded with
    zeros to the largest r, and one scale is kept (the most common): another layer's
    ``alpha / r`` is folded into its b, so every layer's update ``s·a@b`` is PEFT's. The
    outputs are PEFT's; training such an adapter trains its padded rows too."""
    by_path: dict[str, list[str]] = {}
    for name in factors:
        by_path.setdefault(modules[name].path, []).append(name)
    out = {}
    for path, names in by_path.items():
        _check_fused(path, names, factors, modules)
        r = max(factors[n][2] for n in names)  # ranks that differ by layer: padded to r
        scales = [factors[n][4] for n in names]
        scale = max(set(scales), key=scales.count)  # the most common; the rest folded into b
        first = modules[names[0]]
        stack, ins, outs = first.layout.sizes(first.shape)
        a = np.zeros((*stack, math.prod(ins), r), np.float32)
        b = np.zeros((*stack, r, math.prod(outs)), np.float32)
        seen: dict[tuple[int, ...], str] = {}
        for name in names:
            slot, (A, B), rank = modules[name], factors[name][:2], factors[name][2]
            other = seen.setdefault(slot.index, name)
            if other != name and not np.array_equal(factors[other][0], A):
                raise ValueError(
                    f"{path} is one fused Flax kernel, so its modules must share one A; "
                    f"{other} and {name} have different lora_A weights."
                )
            block_a, block_b = flax_blocks(A, B, slot)
            a[slot.index][..., :rank] = block_a
            b[slot.index][..., :rank, slot.start : slot.stop] = block_b * (factors[name][4] / scale)
        a, b = a.reshape(*stack, *ins, r), b.reshape(*stack, r, *outs)
        arrays = jnp.asarray(a, dtype), jnp.asarray(b, dtype)
        out[path] = LoraWeights(*arrays, first.layout, scale=scale, dropout=dropout)
    return out


def _check_fused(path: str, names: list[str], factors: _Factors, modules: dict) -> None:
    """The modules fused into one kernel slice (one A: q, k, v of one layer) need one rank
    and alpha; slices of a stack (scanned layers) may differ: they are padded."""
    by_index: dict[tuple[int, ...], list[str]] = {}
    for n in names:
        by_index.setdefault(modules[n].index, []).append(n)
    for group in by_index.values():
        if len({factors[n][2:] for n in group}) > 1:
            found = ", ".join(f"{n}: r={factors[n][2]}, alpha={factors[n][3]}" for n in group)
            raise ValueError(
                f"{path} is one fused Flax kernel, so the modules fused into it need one "
                f"rank and alpha; found {found}."
            )


def _float_dtype(dtype: Any) -> Any:
    try:
        found = jnp.dtype(dtype)
    except TypeError as err:
        raise TypeError(f"`dtype` must be a JAX floating dtype; found {dtype!r}.") from err
    if not jnp.issubdtype(found, jnp.floating):
        raise TypeError(f"`dtype` must be a floating dtype; found {found}.")
    return found


def import_adapter(
    path: str | os.PathLike,
    frozen: Any,
    *,
    module_map: ModuleMap,
    layouts: Mapping[str, Layout] | None = None,
    dtype: Any = jnp.float32,
    verify: bool = True,
    tokens: bool = False,
) -> Any:
    """Reads a PEFT LoRA folder onto a Flax base: adapters ready for `lora_jax.lora_apply`.

    Every tensor key must be ``base_model.model.<module>.<lora_A.weight | lora_B.weight |
    lora_embedding_A | lora_embedding_B>`` (and ``lora_magnitude_vector`` with
    ``use_dora``, ``lora_B.bias`` with ``lora_bias``, one for every module) for a module
    that `module_map` makes of a kernel of `frozen`, with the shapes PEFT's config gives
    it (``rank_pattern``/``alpha_pattern`` resolved with PEFT's own rule); the experts of
    a ``"parameter"`` rule are read from the keys PEFT's nested ``ParamWrapper`` s save
    for the config's ``target_parameters``.
    Stacked layers and per-slice modules are stacked back, the modules of a fused kernel
    joined (they must share A, r and alpha; a missing part gets B = 0). Base weights
    PEFT saved beside targeted embeddings are accepted only when equal to `frozen`'s.

    Each adapter carries the scale PEFT computes for its modules, ``lora_alpha / r``
    (``lora_alpha / sqrt(r)`` with ``use_rslora``), and ``dropout = lora_dropout``; DoRA
    magnitudes and lora_B biases come back as `LoraWeights.magnitude` / `LoraWeights.bias`
    (a bias times ``s_module / s_kept`` where a scanned kernel keeps another layer's
    scale; where a kernel has no module in the file, a zero bias and the magnitude
    ``‖W + s·a@b‖``, the base's output).

    Args:
        path: the adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``).
        frozen: the Flax base (variables, or an NNX state); gives the paths and shapes.
        module_map: how Flax paths become PyTorch module names (`ModuleMap`).
        layouts: ``{path: Layout}`` from `lora_jax.infer_layouts`, as for `lora_jax.split`;
            needed for kernels with more than 2 axes (scanned layers, DenseGeneral), and
            for embeddings to come back with an ``embed`` layout.
        dtype: dtype of the adapter weights; float32 (as PEFT loads them) by default.
        verify: check each tensor against the SHA-256 digest `export_adapter` records in
            the file's header metadata (files PEFT wrote have none: not checked).
        tokens: also read PEFT's ``trainable_token_indices`` rows (`lora_jax.tokens`),
            in `dtype`; without it a folder that has them is an error.

    Returns:
        Nested adapters (`LoraWeights` leaves) like `lora_jax.split` makes, one per kernel
        the file adapts; with `tokens`, ``(lora, rows)``, rows ``{path: TokenRows}``.

    Raises:
        ValueError: a file is missing or not a PEFT LoRA; the config uses training of the
            base's biases, ``modules_to_save``, a residual init (PiSSA, OLoRA, CorDA,
            LoRA-GA) or another variant, DoRA with lora_bias (or either with
            ``target_parameters``: PEFT refuses both), a ``lora_dropout`` outside [0, 1)
            (or any, with ``target_parameters``, which PEFT refuses to load); keys lack
            the ``base_model.model.`` prefix or name no module of the base (all listed);
            shapes that do not fit the config or the base; a magnitude or lora_B bias
            missing or unexpected for the config's ``use_dora`` / ``lora_bias``, or
            lora_bias on an Embedding (PEFT refuses it); modules fused into one kernel
            slice with different ranks, alphas or A's (layers of a scanned kernel may
            differ: they are padded to the largest rank); saved base weights that differ;
            a damaged weights file (unreadable, or a tensor whose digest differs); token
            rows without `tokens`, or that name no table of the base or do not fit it.
        TypeError: `dtype` is not a floating dtype.
        ImportError: ``safetensors`` is not installed.

    Example:
        >>> import pathlib, tempfile, jax, jax.numpy as jnp, lora_jax as lj
        >>> params = {"params": {"fc": {"kernel": jnp.ones((4, 3))}}}
        >>> config = lj.LoraConfig(rank=2, alpha=4.0, targets=".*/kernel")
        >>> frozen, lora = lj.split(params, config, key=jax.random.key(0))
        >>> fc_map = lj.peft.ModuleMap((lj.peft.ModuleRule("params/fc/kernel", "fc"),))
        >>> folder = pathlib.Path(tempfile.mkdtemp())
        >>> lj.peft.export_adapter(folder, lora, module_map=fc_map, task_type=None)
        >>> back = lj.peft.import_adapter(folder, frozen, module_map=fc_map)
        >>> w = back["params"]["fc"]["kernel"]
        >>> bool((w.a == lora["params"]["fc"]["kernel"].a).all()), w.scale, w.rank
        (True, 2.0, 2)
    """
    dtype = _float_dtype(dtype)
    folder = pathlib.Path(path)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (folder / name).is_file():
            raise ValueError(f"{folder}: no {name}; a PEFT LoRA adapter folder holds both files.")
    record = read_config(folder, allowed=(TOKENS_KEY,))
    tensors, token_tensors = split_tokens(record, read_tensors(folder, verify), tokens)
    flat = flatten(frozen)
    modules, unsupported = _universe(flat, module_map, layouts or {})
    groups, bases = _file_groups(record, tensors, modules, unsupported)
    _check_bases(bases, modules, flat)
    factors = _module_factors(record, groups, modules)
    dropout = float(record.get("lora_dropout") or 0.0)
    adapters = _assemble(factors, modules, dropout, dtype)
    scales = {name: f[4] for name, f in factors.items()}
    adapters = with_vectors(adapters, groups, modules, scales, flat, dtype)
    check_fits(flat, adapters)
    if not tokens:
        return nest(adapters)
    rows = import_tokens(record, token_tensors, flat, module_map, layouts or {}, dtype, adapters)
    return nest(adapters), rows
