"""PEFT interop: our adapters as HuggingFace PEFT LoRA folders, and PEFT folders as ours.

A PEFT LoRA adapter is a folder with ``adapter_config.json`` and
``adapter_model.safetensors``; its tensors are keyed by PyTorch module names
(``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``), never by Flax paths.
`export_peft` writes one from ``(lora, config)``; `import_peft` reads one onto a Flax base.
A `ModuleMap` says how a Flax kernel path becomes PyTorch module names, one `ModuleRule`
per kind of kernel:

- the name: ``ModuleRule(r"params/layers_(\\d+)/mlp/(\\w+)/kernel",
  r"model.layers.\\1.mlp.\\2")``: the pattern must match the whole path; the template takes
  its groups (``\\1``, ``\\g<name>``) and ``{0}``, ``{1}``... for the indices along the
  kernel's stack axes, so a scanned ``params/layers/mlp/up_proj/kernel`` of shape
  ``(layers, in, out)`` becomes ``model.layers.{0}.mlp.up_proj``, one module per layer;
- the transpose: a Flax kernel is ``(in, out)``, a PyTorch Linear weight ``(out, in)``;
  ``lora_A.weight`` is ``a.T`` ``(r, in)`` and ``lora_B.weight`` is ``b.T`` ``(out, r)``;
- multi-axis kernels are flattened row-major in the layout's axis order: a DenseGeneral
  q kernel ``(d_model, heads, head_dim)`` is the Linear ``(heads*head_dim, d_model)``,
  head-major, and an output kernel ``(heads, head_dim, d_model)`` the Linear
  ``(d_model, heads*head_dim)``;
- a fused kernel is split along its (flattened) output by giving several templates, e.g.
  ``ModuleRule("params/attn/qkv/kernel", ("attn.q", "attn.k", "attn.v"), sizes=(64, 16, 16))``:
  every part gets the same A and its own slice of B. On import the parts must carry
  identical A's (as our export writes them); a part absent from the file gets B = 0;
- embeddings (`nn.Embed` tables, ``(vocab, dim)``) become PEFT's ``lora_embedding_A``
  ``(r, vocab)`` and ``lora_embedding_B`` ``(dim, r)``.

The app's Llama-family models have built-in maps (``train.models.peft_map.module_map``);
the `ModuleMap` example maps a Flax `nn.MultiHeadDotProductAttention` onto a PyTorch
module with ``q_proj``/``k_proj``/``v_proj``/``out_proj`` Linears.

Scales translate exactly: PEFT multiplies by ``lora_alpha / r`` (``/ sqrt(r)`` with
``use_rslora``), as `LoraConfig` does. The export lists every module by its full name in
``target_modules`` and writes a module's rank or alpha to ``rank_pattern``/``alpha_pattern``
(as an escaped full name) when it differs from the config's default; the import resolves
PEFT's patterns with PEFT's own rule (``(.*\\.)?(key)$``, first key wins) and comes back
with exact paths. What PEFT's format cannot say is an error, never a silent difference: a
PiSSA adapter (its base is a residual), a conv kernel, a kernel with no rule; on import,
DoRA, bias training, ``modules_to_save`` and other PEFT variants, and every key that PEFT
would load with only a warning (no ``base_model.model.`` prefix, a module the base lacks).

``safetensors`` is needed (``pip install safetensors``); PyTorch and PEFT are not.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import re
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from lora_jax.core import _paths
from lora_jax.core._config import LoraConfig
from lora_jax.core._layout import Layout
from lora_jax.core._weights import kernel_shape
from lora_jax.peft._module_map import ModuleMap, _listing, _Slot
from lora_jax.core._weights import LoraWeights, check_fits, flatten_lora

__all__ = ["export_peft", "import_peft", "CONFIG_FILE", "WEIGHTS_FILE"]

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."
_KEY = re.compile(
    r"(?P<module>.+)\.(?P<suffix>lora_A\.weight|lora_B\.weight|lora_embedding_A|lora_embedding_B"
    r"|base_layer\.weight)"
)
_SUFFIX = {
    ("linear", "A"): "lora_A.weight",
    ("linear", "B"): "lora_B.weight",
    ("embedding", "A"): "lora_embedding_A",
    ("embedding", "B"): "lora_embedding_B",
}
_FACTOR = {suffix: kind_factor for kind_factor, suffix in _SUFFIX.items()}
# PEFT inits that subtract the initial adapter from the base weights.
_RESIDUAL_INITS = ("pissa", "olora", "corda", "lora_ga")
# PEFT config entries that change the forward pass in ways a plain LoRA cannot express.
_VARIANTS = (
    "use_dora",
    "lora_bias",
    "use_qalora",
    "modules_to_save",
    "layer_replication",
    "target_parameters",
    "trainable_token_indices",
    "alora_invocation_tokens",
    "arrow_config",
    "use_bdlora",
    "kasa_config",
    "velora_config",
    "monteclora_config",
)


def _safetensors() -> Any:
    try:
        import safetensors
        import safetensors.numpy
    except ImportError as err:
        raise ImportError(
            "PEFT interop reads and writes safetensors files: pip install safetensors "
            "(or pip install 'lora_jax[interop]')."
        ) from err
    return safetensors


def _matrix(x: Any, slot: _Slot, factor: str) -> np.ndarray:
    """The PyTorch tensor of one factor: A ``(r, in)``, B ``(out_part, r)``."""
    m = np.asarray(x)[slot.index]
    if factor == "A":
        return np.ascontiguousarray(m.reshape(-1, m.shape[-1]).T)
    return np.ascontiguousarray(m.reshape(m.shape[0], -1)[:, slot.start : slot.stop].T)


def _number(x: float) -> float | int:
    return int(x) if float(x).is_integer() else float(x)


def _peft_config(
    config: LoraConfig,
    ranks: dict[str, int],
    alphas: dict[str, float],
    base_model_name_or_path: str | None,
    task_type: str | None,
) -> dict[str, Any]:
    exact = lambda name: re.escape(name)
    return {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "r": int(config.rank),
        "lora_alpha": _number(config.alpha),
        "lora_dropout": float(config.dropout),
        "use_rslora": bool(config.use_rslora),
        "target_modules": sorted(ranks),
        "exclude_modules": None,
        "rank_pattern": {exact(n): r for n, r in ranks.items() if r != config.rank},
        "alpha_pattern": {exact(n): _number(a) for n, a in alphas.items() if a != config.alpha},
        "bias": "none",
        "fan_in_fan_out": False,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "init_lora_weights": True,
        "use_dora": False,
        "inference_mode": True,
    }


def _export_tensors(
    adapters: dict[str, LoraWeights], config: LoraConfig, module_map: ModuleMap
) -> tuple[dict[str, np.ndarray], dict[str, int], dict[str, float]]:
    tensors: dict[str, np.ndarray] = {}
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    owner: dict[str, str] = {}
    unmapped = []
    for path, w in adapters.items():
        reason = module_map._unsupported(path)
        if reason is not None:
            raise ValueError(f"{path}: cannot be exported for PEFT: {reason}")
        slots = module_map._slots(path, kernel_shape(w), w.layout)
        if slots is None:
            unmapped.append(path)
            continue
        for name, slot in slots.items():
            if name in owner:
                raise ValueError(
                    f"`module_map` sends both {owner[name]} and {path} to module {name!r}."
                )
            owner[name] = path
            for factor, x in (("A", w.a), ("B", w.b)):
                tensors[f"{PREFIX}{name}.{_SUFFIX[slot.kind, factor]}"] = _matrix(x, slot, factor)
            ranks[name], alphas[name] = w.rank, config.alpha_for(path)
    if unmapped:
        patterns = [r.pattern for r in module_map.rules]
        raise ValueError(
            f"`module_map` has no rule for these adapted paths:{_listing(unmapped)}\n"
            f"its rule patterns (each must match a whole path):{_listing(patterns)}"
        )
    return tensors, ranks, alphas


def _replace_file(dest: pathlib.Path, write: Any) -> None:
    tmp = dest.with_name(f".{dest.name}.tmp")
    write(tmp)
    os.replace(tmp, dest)


def _verify(folder: pathlib.Path, tensors: dict[str, np.ndarray], record: dict) -> None:
    """Reads the files back: every tensor there, with the same dtype, shape and bytes."""
    st = _safetensors()
    with st.safe_open(str(folder / WEIGHTS_FILE), framework="np") as f:
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
        f"{what}:{_listing(keys)}"
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


def export_peft(
    path: str | os.PathLike,
    lora: Any,
    config: LoraConfig,
    *,
    module_map: ModuleMap,
    base_model_name_or_path: str | None = None,
    task_type: str | None = "CAUSAL_LM",
) -> None:
    """Writes the adapters as a PEFT LoRA folder that ``peft.PeftModel.from_pretrained`` loads.

    Writes ``adapter_config.json`` and ``adapter_model.safetensors`` (header metadata
    ``{"format": "pt"}``; keys ``base_model.model.<module>.lora_A.weight`` ``(r, in)`` and
    ``.lora_B.weight`` ``(out, r)``, for embeddings ``.lora_embedding_A`` ``(r, vocab)`` and
    ``.lora_embedding_B`` ``(dim, r)``), each through a temporary file, then reads both back
    and checks every tensor landed with its name, dtype, shape and bytes. Other files in the
    folder are left alone. The adapters keep their dtype.

    Args:
        path: the folder (created if missing).
        lora: the adapters (from `lora_jax.split` or `import_peft`, possibly trained).
        config: the config they were made with (scales, dropout, patterns).
        module_map: how Flax paths become PyTorch module names (`ModuleMap`).
        base_model_name_or_path: stored in the config for PEFT (the base's hub name or
            folder); None leaves it empty, and the base model is then passed by hand.
        task_type: PEFT's task type (``"CAUSAL_LM"``, ...); None for a plain ``PeftModel``.

    Raises:
        ValueError: something PEFT's format cannot express: an adapted path with no rule
            (listed, with the rules), an `unsupported` path, two paths sent to one module,
            a conv kernel, or a PiSSA adapter (its frozen base is a residual, so the
            adapter alone does not describe the change; use a merged export instead).
        ImportError: ``safetensors`` is not installed.
        OSError: the files read back differ from what was written.

    Example:
        >>> import pathlib, tempfile, jax, jax.numpy as jnp, lora_jax as lj
        >>> params = {"params": {"fc": {"kernel": jnp.ones((4, 3))}}}
        >>> config = lj.LoraConfig(rank=2, targets=".*/kernel")
        >>> frozen, lora = lj.split(params, config, key=jax.random.key(0))
        >>> folder = pathlib.Path(tempfile.mkdtemp())
        >>> lj.export_peft(folder, lora, config, task_type=None,
        ...                module_map=lj.ModuleMap((lj.ModuleRule("params/fc/kernel", "fc"),)))
        >>> sorted(p.name for p in folder.iterdir())
        ['adapter_config.json', 'adapter_model.safetensors']
    """
    if config.init == "pissa":
        raise ValueError(
            "a PiSSA adapter cannot be exported for PEFT: its frozen base is the residual "
            "W - s·a0@b0, so the adapter alone does not describe the change to the original "
            "weights. Export merged weights instead."
        )
    st = _safetensors()
    tensors, ranks, alphas = _export_tensors(flatten_lora(lora), config, module_map)
    record = _peft_config(config, ranks, alphas, base_model_name_or_path, task_type)
    folder = pathlib.Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    _replace_file(
        folder / WEIGHTS_FILE,
        lambda tmp: st.numpy.save_file(tensors, str(tmp), metadata={"format": "pt"}),
    )
    _replace_file(
        folder / CONFIG_FILE, lambda tmp: tmp.write_text(json.dumps(record, indent=2) + "\n")
    )
    _verify(folder, tensors, record)


def _read_files(folder: pathlib.Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (folder / name).is_file():
            raise ValueError(f"{folder}: no {name}; a PEFT LoRA adapter folder holds both files.")
    try:
        record = json.loads((folder / CONFIG_FILE).read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{folder / CONFIG_FILE}: not valid JSON ({err}).") from err
    if not isinstance(record, dict) or record.get("peft_type") != "LORA":
        found = record.get("peft_type") if isinstance(record, dict) else record
        raise ValueError(f"{folder / CONFIG_FILE}: peft_type must be 'LORA'; found {found!r}.")
    used = [k for k in _VARIANTS if record.get(k)]
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
    return record, dict(_safetensors().numpy.load_file(str(folder / WEIGHTS_FILE)))


def _universe(
    flat: dict[str, Any], module_map: ModuleMap, layouts: Mapping[str, Layout]
) -> tuple[dict[str, _Slot], list[str]]:
    """Every module the map makes of the base's kernels, and the unsupported paths."""
    modules: dict[str, _Slot] = {}
    unsupported = []
    for path, leaf in flat.items():
        shape = tuple(getattr(leaf, "shape", ()))
        if len(shape) < 2 or not jnp.issubdtype(getattr(leaf, "dtype", int), jnp.floating):
            continue
        reason = module_map._unsupported(path)
        if reason is not None:
            unsupported.append(f"{path}: {reason}")
            continue
        modules.update(module_map._slots(path, shape, layouts.get(path)) or {})
    return modules, unsupported


def _targeted(record: Mapping[str, Any], name: str) -> bool:
    """PEFT's `target_modules` / `exclude_modules` rule (without layers_to_transform)."""

    def hits(spec: Any) -> bool:
        if isinstance(spec, str):
            return spec.lower() == "all-linear" or re.fullmatch(spec, name) is not None
        return name in spec or any(name.endswith(f".{s}") for s in spec)

    exclude, target = record.get("exclude_modules"), record.get("target_modules")
    if exclude and hits(exclude):
        return False
    return target is None or hits(target)


def _pattern_value(patterns: Mapping[str, Any], name: str, default: Any) -> Any:
    """PEFT's `get_pattern_key`: the first key matching ``(.*\\.)?(key)$`` wins."""
    key = next((k for k in patterns if re.match(rf"(.*\.)?({k})$", name)), None)
    return default if key is None else patterns[key]


def _group(
    tensors: Mapping[str, np.ndarray], modules: Mapping[str, _Slot], unsupported: list[str]
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
    parts = [f"{titles[k]}:{_listing(keys)}" for k, keys in bad.items() if keys]
    if bad["module"]:
        name = _KEY.fullmatch(bad["module"][0].removeprefix(PREFIX))
        word = name["module"] if name else bad["module"][0]
        near = _paths.close_matches(word, modules, 3)
        parts.append(f"modules of the base closest to {word!r}:{_listing(near)}")
    if unsupported:
        parts.append(f"kernels `module_map` marks unsupported:{_listing(unsupported)}")
    return (
        "the adapter has keys PEFT would load with only a warning (leaving those adapters "
        "at zero) or not at all; nothing was imported.\n" + "\n".join(parts)
    )


def _torch_weight(slot: _Slot, kernel: Any) -> np.ndarray:
    """The PyTorch weight of one module: ``(out, in)`` for a Linear, ``(vocab, dim)`` else."""
    _, ins, outs = slot.layout.sizes(slot.shape)
    m = np.transpose(np.asarray(kernel), slot.layout.perm)[slot.index]
    m = m.reshape(math.prod(ins), math.prod(outs))[:, slot.start : slot.stop]
    return m if slot.kind == "embedding" else m.T


def _check_bases(bases: dict[str, np.ndarray], modules: Mapping[str, _Slot], flat: dict) -> None:
    """PEFT saves the base weights of targeted embeddings (``save_embedding_layers``) and
    loads them over the base; a LoRA import can only accept them when they are the base."""
    differ = []
    for name, found in bases.items():
        slot = modules[name]
        want = _torch_weight(slot, flat[slot.path])
        if found.shape != want.shape or not np.array_equal(found.astype(want.dtype), want):
            differ.append(name)
    if differ:
        raise ValueError(
            "the adapter carries full base weights (PEFT's save_embedding_layers, e.g. after "
            f"resizing the vocabulary) that differ from `frozen` for:{_listing(differ)}\n"
            "a LoRA adapter cannot express them; load the base they belong to."
        )


def _module_factors(
    record: Mapping[str, Any], groups: dict[str, dict[str, np.ndarray]], modules: dict
) -> dict[str, tuple[np.ndarray, np.ndarray, int, float]]:
    """``{module: (A, B, r, alpha)}`` with r and alpha resolved as PEFT resolves them."""
    r0, alpha0 = record.get("r", 8), record.get("lora_alpha", 8)
    ranks, alphas = record.get("rank_pattern") or {}, record.get("alpha_pattern") or {}
    out, problems = {}, []
    for name, pair in groups.items():
        slot = modules[name]
        if set(pair) != {"A", "B"}:
            problems.append(f"{name}: only {sorted(pair)} in the file")
            continue
        if not _targeted(record, name):
            problems.append(f"{name}: not selected by target_modules/exclude_modules")
            continue
        r = int(_pattern_value(ranks, name, r0))
        alpha = float(_pattern_value(alphas, name, alpha0))
        n_in = math.prod(slot.layout.sizes(slot.shape)[1])
        want = ((r, n_in), (slot.stop - slot.start, r))
        found = (pair["A"].shape, pair["B"].shape)
        if found != want:
            problems.append(f"{name}: A, B have shapes {found}; r={r} and the base need {want}")
            continue
        out[name] = (pair["A"], pair["B"], r, alpha)
    if problems:
        raise ValueError(
            "the adapter does not fit its config or the base (PEFT would not load it as "
            f"written):{_listing(problems)}"
        )
    return out


def _assemble(
    factors: dict[str, tuple[np.ndarray, np.ndarray, int, float]], modules: dict[str, _Slot]
) -> dict[str, tuple[LoraWeights, int, float]]:
    """One `LoraWeights` per Flax kernel from its modules (unstacked layers, fused parts)."""
    by_path: dict[str, list[str]] = {}
    for name in factors:
        by_path.setdefault(modules[name].path, []).append(name)
    out = {}
    for path, names in by_path.items():
        settings = {factors[n][2:] for n in names}
        if len(settings) > 1:
            found = ", ".join(f"{n}: r={factors[n][2]}, alpha={factors[n][3]}" for n in names)
            raise ValueError(
                f"{path} is one Flax kernel, so its modules need one rank and alpha; found {found}."
            )
        ((r, alpha),) = settings
        first = modules[names[0]]
        stack, ins, outs = first.layout.sizes(first.shape)
        a = np.zeros((*stack, math.prod(ins), r), np.float32)
        b = np.zeros((*stack, r, math.prod(outs)), np.float32)
        seen: dict[tuple[int, ...], str] = {}
        for name in names:
            slot, (A, B) = modules[name], factors[name][:2]
            other = seen.setdefault(slot.index, name)
            if other != name and not np.array_equal(factors[other][0], A):
                raise ValueError(
                    f"{path} is one fused Flax kernel, so its modules must share one A; "
                    f"{other} and {name} have different lora_A weights."
                )
            a[slot.index] = A.T
            b[slot.index][:, slot.start : slot.stop] = B.T
        a, b = a.reshape(*stack, *ins, r), b.reshape(*stack, r, *outs)
        out[path] = (LoraWeights(jnp.asarray(a), jnp.asarray(b), first.layout), r, alpha)
    return out


def _config(
    record: Mapping[str, Any], found: dict[str, tuple[LoraWeights, int, float]]
) -> LoraConfig:
    r0, alpha0 = int(record.get("r", 8)), float(record.get("lora_alpha", 8))
    return LoraConfig(
        targets=[re.escape(p) for p in found],
        rank=r0,
        alpha=alpha0,
        dropout=float(record.get("lora_dropout") or 0.0),
        use_rslora=bool(record.get("use_rslora", False)),
        rank_pattern={re.escape(p): r for p, (_, r, _) in found.items() if r != r0},
        alpha_pattern={re.escape(p): a for p, (_, _, a) in found.items() if a != alpha0},
    )


def import_peft(
    path: str | os.PathLike,
    frozen: Any,
    *,
    module_map: ModuleMap,
    layouts: Mapping[str, Layout] | None = None,
) -> tuple[dict[str, Any], LoraConfig]:
    """Reads a PEFT LoRA folder onto a Flax base: ``(lora, config)`` for `lora_apply`.

    Every tensor key must be ``base_model.model.<module>.<lora_A.weight | lora_B.weight |
    lora_embedding_A | lora_embedding_B>`` for a module that `module_map` makes of a kernel
    of `frozen`, with the shapes PEFT's config gives it (``rank_pattern``/``alpha_pattern``
    resolved with PEFT's own rule). Stacked layers are stacked back, the modules of a fused
    kernel joined (they must share A; a missing part gets B = 0). Base weights PEFT saved
    beside targeted embeddings are accepted only when equal to `frozen`'s. The adapters
    come back as float32, as PEFT loads them.

    Args:
        path: the adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``).
        frozen: the Flax base (variables); gives the paths and shapes.
        module_map: how Flax paths become PyTorch module names (`ModuleMap`).
        layouts: ``{path: Layout}`` from `lora_jax.infer_layouts`, as for `lora_jax.split`;
            needed for kernels with more than 2 axes (scanned layers, DenseGeneral), and
            for embeddings to come back with an ``embed`` layout.

    Returns:
        ``(lora, config)``: nested adapters like `lora_jax.split` makes, and a `LoraConfig`
        whose targets (and rank/alpha patterns, where they differ from PEFT's ``r`` and
        ``lora_alpha``) are the exact paths loaded.

    Raises:
        ValueError: a file is missing or not a PEFT LoRA; the config uses DoRA, bias
            training, ``modules_to_save``, a residual init (PiSSA, OLoRA, CorDA, LoRA-GA)
            or another variant; keys lack the
            ``base_model.model.`` prefix or name no module of the base (all listed); shapes
            that do not fit the config or the base; the modules of one Flax kernel with
            different ranks, alphas or (fused) A's; saved base weights that differ.
        ImportError: ``safetensors`` is not installed.

    Example:
        >>> import pathlib, tempfile, jax, jax.numpy as jnp, lora_jax as lj
        >>> params = {"params": {"fc": {"kernel": jnp.ones((4, 3))}}}
        >>> config = lj.LoraConfig(rank=2, alpha=4.0, targets=".*/kernel")
        >>> frozen, lora = lj.split(params, config, key=jax.random.key(0))
        >>> fc_map = lj.ModuleMap((lj.ModuleRule("params/fc/kernel", "fc"),))
        >>> folder = pathlib.Path(tempfile.mkdtemp())
        >>> lj.export_peft(folder, lora, config, module_map=fc_map, task_type=None)
        >>> back, back_config = lj.import_peft(folder, frozen, module_map=fc_map)
        >>> bool((back["params"]["fc"]["kernel"].a == lora["params"]["fc"]["kernel"].a).all())
        True
        >>> back_config.targets, back_config.scale_for("params/fc/kernel")
        (('params/fc/kernel',), 2.0)
    """
    record, tensors = _read_files(pathlib.Path(path))
    flat = _paths.flatten(frozen)
    modules, unsupported = _universe(flat, module_map, layouts or {})
    groups, bases = _group(tensors, modules, unsupported)
    _check_bases(bases, modules, flat)
    found = _assemble(_module_factors(record, groups, modules), modules)
    adapters = {p: w for p, (w, _, _) in found.items()}
    check_fits(flat, adapters)
    return _paths.nest(adapters), _config(record, found)
