"""Token rows (`lora_jax.tokens.TokenRows`) in PEFT's files, both ways.

PEFT's ``LoraConfig(trainable_token_indices=...)`` wraps a module in a
``TrainableTokensWrapper`` whose ``token_adapter`` replaces rows of the module's weight:
``W' = W.index_copy(0, indices, trainable_tokens_delta)`` (despite the name, the delta holds
the new rows, not a difference). The config holds a list (the input embedding's indices)
or ``{module name: indices}``, a name matching every module whose full name ends with it;
the tensors are ``base_model.model.<module>.token_adapter.trainable_tokens_delta``
``(n, dim)``, rows in the order of the indices. A head tied to the embedding shares its
adapter and saves nothing. An Embedding's weight is our table, so its rows are our axis 0;
a Linear's weight ``(vocab, dim)`` is the Dense kernel transposed, so its rows are our
axis 1. Module names come from the `ModuleMap` (its ``unsupported`` reasons are about LoRA,
not rows, and do not apply).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from lora_jax.core._layout import Layout
from lora_jax.core._packed import is_packed
from lora_jax.core._paths import close_matches, nest
from lora_jax.peft._module_map import ModuleMap
from lora_jax.peft._slots import Slot, listing, module_slots
from lora_jax.peft._tensors import PREFIX
from lora_jax.tokens._rows import TokenRows, flat_rows

__all__ = ["TOKENS_KEY", "export_tokens", "split_tokens", "import_tokens"]

TOKENS_KEY = "trainable_token_indices"
DELTA = ".token_adapter.trainable_tokens_delta"
_AXIS = {"embedding": 0, "linear": 1}  # the axis of our kernel that PEFT's weight rows are
_BOTH = (
    "has both a LoRA adapter and token rows; PEFT's token adapter replaces rows of the base "
    "weight and bypasses a LoRA on the same module, so the two cannot be exchanged together"
)


def _one_module(module_map: ModuleMap, path: str, shape: tuple[int, ...], layout: Any) -> Any:
    """``(name, Slot)`` of the one module the map makes of the 2-D table at `path`; None when
    no rule matches or the rule makes several modules (a fused kernel) or a parameter."""
    slots = module_slots(module_map, path, shape, layout)
    if not slots or len(slots) != 1:
        return None
    ((name, slot),) = slots.items()
    return (name, slot) if slot.kind in _AXIS else None


def export_tokens(
    rows: Any, lora_paths: Any, module_map: ModuleMap
) -> tuple[dict[str, list[int]], dict[str, np.ndarray]]:
    """The config entry ``{module: indices}`` and the tensors of the rows, by PEFT key."""
    entry: dict[str, list[int]] = {}
    tensors: dict[str, np.ndarray] = {}
    flat = flat_rows(rows, "tokens")
    if not flat:
        raise ValueError("`tokens` holds no TokenRows; pass None to export no token rows.")
    for path, r in flat.items():
        if path in lora_paths:
            raise ValueError(f"{path} {_BOTH}.")
        dim, n = int(np.shape(r.values)[1]), max(r.indices) + 1
        found = _one_module(module_map, path, (n, dim) if r.axis == 0 else (dim, n), None)
        if found is None:
            raise ValueError(
                f"`module_map` has no rule making one Embedding or Linear of {path} (token "
                f"rows); its rule patterns:{listing([x.pattern for x in module_map.rules])}"
            )
        name, slot = found
        if _AXIS[slot.kind] != r.axis:
            raise ValueError(
                f"{path}: token rows along axis {r.axis}, but `module_map` makes it the "
                f"{slot.kind} {name}, whose PEFT weight rows are our axis {_AXIS[slot.kind]} "
                "(an Embedding's table: axis 0, kind='embedding'; a Linear's (vocab, dim) "
                "weight: the Dense kernel's axis 1)."
            )
        if name in entry:
            raise ValueError(f"`module_map` sends two token tables to module {name!r}.")
        entry[name] = list(r.indices)
        tensors[f"{PREFIX}{name}{DELTA}"] = np.ascontiguousarray(np.asarray(r.values))
    return dict(sorted(entry.items())), tensors


def split_tokens(
    record: Mapping[str, Any], tensors: Mapping[str, np.ndarray], wanted: bool
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The LoRA tensors and the token tensors; a ValueError when the folder has token rows
    and `wanted` is false (they are never dropped silently)."""
    rows = {k: v for k, v in tensors.items() if k.endswith(DELTA)}
    rest = {k: v for k, v in tensors.items() if k not in rows}
    if (record.get(TOKENS_KEY) or rows) and not wanted:
        raise ValueError(
            f"the adapter has trainable token rows ({TOKENS_KEY}: {record.get(TOKENS_KEY)!r}, "
            f"{len(rows)} tensors); pass tokens=True to import_adapter to get (lora, rows)."
        )
    if rows and not record.get(TOKENS_KEY):
        raise ValueError(
            f"the adapter has token tensors but no {TOKENS_KEY} in its config:{listing(list(rows))}"
        )
    return rest, rows


def _universe(flat: dict[str, Any], module_map: ModuleMap, layouts: Mapping[str, Layout]) -> dict:
    """``{module name: (path, Slot)}`` for every 2-D float table the map makes one module of."""
    out = {}
    for path, leaf in flat.items():
        shape = tuple(getattr(leaf, "shape", ()))
        floating = jnp.issubdtype(getattr(leaf, "dtype", int), jnp.floating)
        if is_packed(leaf) or len(shape) != 2 or not floating:
            continue
        found = _one_module(module_map, path, shape, layouts.get(path))
        if found is not None:
            out[found[0]] = (path, found[1])
    return out


def _entries(spec: Any, universe: dict[str, tuple[str, Slot]]) -> dict[str, Any]:
    """The config's ``{name: indices}``; a list is the input embedding's, as PEFT reads it."""
    if isinstance(spec, Mapping):
        return dict(spec)
    embeds = [n for n, (_, s) in universe.items() if s.kind == "embedding"]
    if len(embeds) != 1:
        embeds = [n for n in universe if n.endswith("embed_tokens")]
    if len(embeds) != 1:
        raise ValueError(
            f"{TOKENS_KEY} is a list (the input embedding's rows), but `module_map` makes "
            f"{len(embeds)} candidate Embeddings of the base:{listing(embeds or ['(none)'])}"
        )
    return {embeds[0]: spec}


def _rows_of(
    name: str, path: str, slot: Slot, values: np.ndarray, idx: Any, table: Any, dtype: Any
) -> TokenRows:
    """The rows of one module, checked to fit its table."""
    rows = TokenRows(jnp.asarray(values, dtype), idx, _AXIS[slot.kind])
    shape = tuple(table.shape)
    vocab, dim = shape[rows.axis], shape[1 - rows.axis]
    if values.shape != (len(rows.indices), dim) or max(rows.indices) >= vocab:
        raise ValueError(
            f"{name}{DELTA}: {len(rows.indices)} rows {list(rows.indices)} of shape "
            f"{values.shape} do not fit {path} {shape} along axis {rows.axis}."
        )
    return rows


def import_tokens(
    record: Mapping[str, Any],
    tensors: dict[str, np.ndarray],
    frozen_flat: dict[str, Any],
    module_map: ModuleMap,
    layouts: Mapping[str, Layout],
    dtype: Any,
    lora_paths: Any,
) -> dict[str, Any]:
    """The folder's token rows as ``{path: TokenRows}`` (nested) on the base."""
    spec = record.get(TOKENS_KEY)
    if not spec:
        return {}
    universe = _universe(frozen_flat, module_map, layouts)
    entries = _entries(spec, universe)
    left, out = dict(tensors), {}
    for key, idx in entries.items():
        names = [n for n in universe if n.endswith(key)]  # PEFT's rule: plain `endswith`
        if not names:
            _check_tied(key, idx, entries, universe, tensors)
            continue
        for name in names:
            path, slot = universe[name]
            values = left.pop(f"{PREFIX}{name}{DELTA}", None)
            if values is None:
                raise ValueError(
                    f"{TOKENS_KEY} names {key!r} ({name} here) but the file has no rows for "
                    f"it: PEFT saves none for a head tied to the embedding, so the base it "
                    f"was trained on ties them; {path} is a separate table in this base."
                )
            if path in lora_paths:
                raise ValueError(f"{path} {_BOTH}.")
            out[path] = _rows_of(name, path, slot, values, idx, frozen_flat[path], dtype)
    if left:
        raise ValueError(f"token tensors naming no module of {TOKENS_KEY}:{listing(sorted(left))}")
    return nest(out)


def _check_tied(
    key: str, idx: Any, entries: dict, universe: dict, tensors: Mapping[str, np.ndarray]
) -> None:
    """An entry naming no module of the base is PEFT's tied head only when the file saved no
    rows for it and it has an embedding entry's indices (PEFT ties it to those rows)."""
    saved = [k for k in tensors if k.removesuffix(DELTA).endswith(key)]
    embeds = {n for n, (_, slot) in universe.items() if slot.kind == "embedding"}
    same = [k for k, v in entries.items() if v == idx and any(n.endswith(k) for n in embeds)]
    if saved or not same:
        near = close_matches(key, list(universe), 3)
        raise ValueError(
            f"{TOKENS_KEY} names {key!r}, which matches no module `module_map` makes of the "
            f"base's tables (and is not a head tied to the embedding's rows); closest:"
            f"{listing(near or ['(none)'])}"
        )
