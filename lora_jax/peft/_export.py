"""`export_adapter`: our adapters as a HuggingFace PEFT LoRA folder.

Each adapter carries its scale, so the folder's config comes from the adapters alone:
r is the adapter's rank and ``lora_alpha = scale * r`` (``use_rslora`` false, so PEFT's
``lora_alpha / r`` is our scale); the most common r / alpha are the global ``r`` /
``lora_alpha``, the rest go to ``rank_pattern`` / ``alpha_pattern`` by exact module name.
"""

from __future__ import annotations

import json
import os
import pathlib
import typing
from typing import Any

import numpy as np

from lora_jax.core._weights import LoraWeights, flatten_lora, kernel_shape
from lora_jax.peft._config import CONFIG_FILE, export_record, peft_alpha
from lora_jax.peft._module_map import ModuleMap
from lora_jax.peft._slots import Slot, file_names, listing, module_slots, unsupported_reason
from lora_jax.peft._tensors import (
    PREFIX,
    SUFFIX,
    WEIGHTS_FILE,
    file_metadata,
    safetensors,
    torch_factors,
)
from lora_jax.peft._tokens import TOKENS_KEY, export_tokens
from lora_jax.peft._vectors import export_flags, vector_tensors

__all__ = ["export_adapter"]


def _check_exportable(adapters: dict[str, LoraWeights]) -> None:
    """ValueErrors for an empty tree, stacked adapters and PiSSA adapters."""
    if not adapters:
        raise ValueError("`lora` holds no adapters; there is nothing to export.")
    stacked = [p for p, w in adapters.items() if isinstance(w.scale, tuple)]
    if stacked:
        raise ValueError(
            f"`lora` holds stacked adapters (one scale per adapter) at:{listing(stacked)}\n"
            "a PEFT folder holds one adapter; pick one with lj.multi.unstack_adapter."
        )
    pissa = [p for p, w in adapters.items() if w.residual_norm is not None]
    if pissa:
        raise ValueError(
            "an adapter made with a residual init (PiSSA, OLoRA) cannot be exported for PEFT: "
            "its frozen base is the residual W - s·a0@b0, so the adapter alone does not "
            "describe the change to the original weights. Export merged weights instead. "
            f"Such adapters at:{listing(pissa)}"
        )


def _export_slots(
    adapters: dict[str, LoraWeights], module_map: ModuleMap
) -> dict[str, tuple[Slot, LoraWeights]]:
    """``{module (or parameter) name: (Slot, its adapter)}``; ValueErrors for paths with no
    rule, `unsupported` paths and two paths sent to one module."""
    out: dict[str, tuple[Slot, LoraWeights]] = {}
    unmapped = []
    for path, w in adapters.items():
        reason = unsupported_reason(module_map, path)
        if reason is not None:
            raise ValueError(f"{path}: cannot be exported for PEFT: {reason}")
        slots = module_slots(module_map, path, kernel_shape(w), w.layout)
        if slots is None:
            unmapped.append(path)
            continue
        for name, slot in slots.items():
            if name in out:
                raise ValueError(
                    f"`module_map` sends both {out[name][0].path} and {path} to module {name!r}."
                )
            out[name] = (slot, w)
    if unmapped:
        patterns = [r.pattern for r in module_map.rules]
        raise ValueError(
            f"`module_map` has no rule for these adapted paths:{listing(unmapped)}\n"
            f"its rule patterns (each must match a whole path):{listing(patterns)}"
        )
    return out


def _export_tensors(
    slots: dict[str, tuple[Slot, LoraWeights]],
) -> tuple[dict[str, np.ndarray], dict[str, tuple[int, float | int]]]:
    """The tensors by key, and ``{module: (r, lora_alpha)}``."""
    stems = file_names({name: slot for name, (slot, _) in slots.items()})
    tensors: dict[str, np.ndarray] = {}
    settings: dict[str, tuple[int, float | int]] = {}
    for name, (slot, w) in slots.items():
        for factor, x in zip("AB", torch_factors(w.a, w.b, slot), strict=True):
            tensors[f"{PREFIX}{stems[name]}.{SUFFIX[slot.kind, factor]}"] = x
        settings[name] = (w.rank, peft_alpha(typing.cast(float, w.scale), w.rank))
    return tensors, settings


def _check_parameter_dropout(slots: dict[str, tuple[Slot, LoraWeights]], dropout: float) -> None:
    """PEFT's ParamWrapper refuses ``lora_dropout != 0``, and a folder has one rate."""
    params = {s.path: w.dropout for s, w in slots.values() if s.kind == "parameter"}
    if not params or (dropout == 0 and not any(params.values())):
        return
    rates = [f"{p}: dropout {d}" for p, d in params.items()]
    raise ValueError(
        "PEFT's ParamWrapper (target_parameters, for the 'parameter' rules) does not work "
        f"with lora_dropout != 0, and this export would write lora_dropout={dropout} for "
        f"one folder; expert adapters:{listing(rates)}\nexport adapters with dropout=0.0 "
        "(dataclasses.replace(w, dropout=0.0); dropout only acts in training)."
    )


def _replace_file(dest: pathlib.Path, write: Any) -> None:
    tmp = dest.with_name(f".{dest.name}.tmp")
    write(tmp)
    os.replace(tmp, dest)


def _verify(folder: pathlib.Path, tensors: dict[str, np.ndarray], record: dict) -> None:
    """Reads the files back: every tensor there, with the same dtype, shape and bytes."""
    with safetensors().safe_open(str(folder / WEIGHTS_FILE), framework="np") as f:
        meta = f.metadata() or {}
        found = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (a safe_open handle)
    missing = sorted(set(tensors) - set(found))
    extra = sorted(set(found) - set(tensors))
    differ = sorted(
        k
        for k in set(tensors) & set(found)
        if found[k].dtype != tensors[k].dtype
        or found[k].shape != tensors[k].shape
        or found[k].tobytes() != tensors[k].tobytes()
    )
    problems = [
        f"{what}:{listing(keys)}"
        for what, keys in (("missing", missing), ("unexpected", extra), ("different", differ))
        if keys
    ]
    if meta.get("format") != "pt":
        problems.append(f"header metadata {meta!r} lacks format 'pt'")
    if json.loads((folder / CONFIG_FILE).read_text()) != record:
        problems.append(f"{CONFIG_FILE} does not read back as written")
    if problems:
        raise OSError(
            f"{folder}: the files read back do not hold what was exported; " + "; ".join(problems)
        )


def export_adapter(
    path: str | os.PathLike,
    lora: Any,
    *,
    module_map: ModuleMap,
    base_model_name_or_path: str | None = None,
    task_type: str | None = "CAUSAL_LM",
    tokens: Any = None,
) -> None:
    """Writes the adapters as a PEFT LoRA folder that ``peft.PeftModel.from_pretrained`` loads.

    No config is needed: each adapter carries its scale. A module's r is its adapter's
    rank and its ``lora_alpha`` is ``scale * r`` with ``use_rslora`` false, so PEFT's
    ``lora_alpha / r`` is exactly our scale (an rsLoRA adapter is written as the plain
    LoRA of the same scale). The most common r and alpha become the global ``r`` and
    ``lora_alpha``; a module that differs is listed in ``rank_pattern`` /
    ``alpha_pattern`` by its escaped full name. PEFT has one ``lora_dropout`` per
    adapter: when our adapters' dropout rates differ, the most common rate is written.

    Writes ``adapter_config.json`` and ``adapter_model.safetensors`` (header metadata
    ``{"format": "pt"}`` and ``"lora_jax.sha256"``, the digest of every tensor, which
    `import_adapter` checks and PEFT ignores; keys
    ``base_model.model.<module>.lora_A.weight`` ``(r, in)`` and ``.lora_B.weight``
    ``(out, r)``, for embeddings ``.lora_embedding_A`` ``(r, vocab)`` and
    ``.lora_embedding_B`` ``(dim, r)``; an expert stack of a ``"parameter"`` rule is listed
    in ``target_parameters`` and saved as PEFT's nested ``ParamWrapper`` s save it,
    ``lora_A.weight`` ``(E*r, in)`` and ``lora_B.weight`` ``(out, r*E)``, under its module's
    name plus one ``.base_layer`` per later-registered parameter of that module; DoRA
    adapters with ``use_dora: true`` and ``<module>.lora_magnitude_vector`` ``(out,)``,
    lora_bias ones with ``lora_bias: true`` and ``<module>.lora_B.bias`` ``(out,)``, a
    zero bias for an adapter without one), each
    through a temporary file, then reads both back
    and checks every tensor landed with its name, dtype, shape and bytes. Other files in the
    folder are left alone. The adapters keep their dtype.

    Args:
        path: the folder (created if missing).
        lora: the adapters (from `lora_jax.split`, `lora_jax.nnx.lora_state` or
            `import_adapter`, possibly trained).
        module_map: how Flax paths become PyTorch module names (`ModuleMap`).
        base_model_name_or_path: stored in the config for PEFT (the base's hub name or
            folder); None leaves it empty, and the base model is then passed by hand.
        task_type: PEFT's task type (``"CAUSAL_LM"``, ...); None for a plain ``PeftModel``.
        tokens: trainable token rows (`lora_jax.tokens.select`), written as PEFT's
            ``trainable_token_indices`` ``{module: indices}`` and
            ``<module>.token_adapter.trainable_tokens_delta`` ``(n, dim)``; None for none.

    Raises:
        ValueError: something PEFT's format cannot express: an empty `lora`, an adapted
            path with no rule (listed, with the rules), an `unsupported` path, two paths
            sent to one module, a conv kernel, stacked adapters, a PiSSA adapter (its
            frozen base is a residual, so the adapter alone does not describe the change;
            export merged weights instead), a `ModuleRule` ``names`` whose length is not its
            axis's size, expert adapters with dropout (PEFT's ``ParamWrapper`` refuses
            ``lora_dropout``), several parameters of one module without
            ``parameter_order``, DoRA on some adapters only (PEFT has one ``use_dora``
            per config), an adapter with both a magnitude and a bias, lora_bias beside an
            Embedding adapter, or DoRA / lora_bias with a ``"parameter"`` rule; token
            rows with no rule, on the wrong axis for their module, or on a path that also
            has an adapter.
        TypeError: `lora` holds something other than `LoraWeights` (`tokens`: `TokenRows`).
        ImportError: ``safetensors`` is not installed.
        OSError: the files read back differ from what was written.

    Example:
        >>> import json, pathlib, tempfile, jax, jax.numpy as jnp, lora_jax as lj
        >>> params = {"params": {"fc": {"kernel": jnp.ones((4, 3))},
        ...                      "fc2": {"kernel": jnp.ones((3, 3))}}}
        >>> config = lj.LoraConfig(rank=2, alpha=4.0, targets=".*/kernel",
        ...                        rank_pattern={"fc2": 1})
        >>> frozen, lora = lj.split(params, config, key=jax.random.key(0))
        >>> fc_map = lj.peft.ModuleMap((lj.peft.ModuleRule(r"params/(\\w+)/kernel", r"\\1"),))
        >>> folder = pathlib.Path(tempfile.mkdtemp())
        >>> lj.peft.export_adapter(folder, lora, module_map=fc_map, task_type=None)
        >>> record = json.loads((folder / lj.peft.CONFIG_FILE).read_text())
        >>> record["r"], record["lora_alpha"], record["rank_pattern"], record["alpha_pattern"]
        (2, 4, {'fc2': 1}, {})
    """
    adapters = flatten_lora(lora)
    _check_exportable(adapters)
    slots = _export_slots(adapters, module_map)
    flags = export_flags(slots)  # use_dora, lora_bias
    tensors, settings = _export_tensors(slots)
    tensors.update(vector_tensors(slots, flags))
    dropouts = [w.dropout for w in adapters.values()]
    params = [name for name, (slot, _) in slots.items() if slot.kind == "parameter"]
    record = export_record(settings, dropouts, base_model_name_or_path, task_type, params)
    record.update(flags)
    _check_parameter_dropout(slots, record["lora_dropout"])
    if tokens is not None:
        record[TOKENS_KEY], token_tensors = export_tokens(tokens, adapters, module_map)
        tensors.update(token_tensors)
    st = safetensors()
    folder = pathlib.Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    _replace_file(
        folder / WEIGHTS_FILE,
        lambda tmp: st.numpy.save_file(tensors, str(tmp), metadata=file_metadata(tensors)),
    )
    _replace_file(
        folder / CONFIG_FILE, lambda tmp: tmp.write_text(json.dumps(record, indent=2) + "\n")
    )
    _verify(folder, tensors, record)
