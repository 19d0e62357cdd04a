"""Parameter paths: the `/`-joined names that configs match and adapters are keyed by.

Flax NNX `Variable`s (the leaves of an ``nnx.State``) count as leaves holding their value:
``nnx.split(model)[1]`` flattens to ``{"layers/0/kernel": array}``, like a params dict. A
packed (quantized) kernel is one leaf too (`lora_jax.core._packed`).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping
from typing import Any

import jax
from flax import nnx
from jax.tree_util import DictKey, FlattenedIndexKey, GetAttrKey, SequenceKey

from lora_jax.core._packed import is_packed


def key_name(entry: Any) -> str:
    """Returns the name of one key-path entry (`params`, `0`, `kernel`)."""
    if isinstance(entry, DictKey):
        return str(entry.key)
    if isinstance(entry, GetAttrKey):
        return entry.name
    if isinstance(entry, SequenceKey):
        return str(entry.idx)
    if isinstance(entry, FlattenedIndexKey):
        return str(entry.key)
    return str(entry).strip(".[]'\"")


def path_str(keypath: tuple[Any, ...]) -> str:
    """Joins a JAX key path into `params/layers_0/attn/query/kernel`."""
    return "/".join(key_name(k) for k in keypath)


def _is_variable(x: Any) -> bool:
    """A leaf for paths: an NNX variable, or a packed (quantized) kernel."""
    return isinstance(x, nnx.Variable) or is_packed(x)


def flatten(tree: Any, is_leaf: Callable[[Any], bool] | None = None) -> dict[str, Any]:
    """Returns `{path: leaf}` for every leaf of `tree`, in tree order (NNX variables
    give their value)."""
    test = _is_variable if is_leaf is None else lambda x: _is_variable(x) or is_leaf(x)
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=test)
    return {path_str(kp): x.get_value() if isinstance(x, nnx.Variable) else x for kp, x in flat}


def replace(tree: Any, new_leaves: Mapping[str, Any]) -> Any:
    """Returns `tree` with the leaves at the given paths replaced; others kept as they are
    (an NNX variable keeps its type and metadata around the new value)."""
    if not new_leaves:
        return tree

    def swap(kp: tuple, leaf: Any) -> Any:
        new = new_leaves.get(path_str(kp), leaf)
        if new is leaf:
            return leaf
        return leaf.replace(new) if isinstance(leaf, nnx.Variable) else new

    return jax.tree_util.tree_map_with_path(swap, tree, is_leaf=_is_variable)


def nest(flat: Mapping[str, Any]) -> dict[str, Any]:
    """Builds nested dicts from `{"a/b/c": x}`: `{"a": {"b": {"c": x}}}`."""
    out: dict[str, Any] = {}
    for path, value in flat.items():
        *parents, last = path.split("/")
        node = out
        for name in parents:
            node = node.setdefault(name, {})
        node[last] = value
    return out


def close_matches(word: str, paths: list[str], n: int = 5) -> list[str]:
    """The paths most similar to `word`, for error messages."""
    hits = difflib.get_close_matches(word, paths, n=n, cutoff=0.0)
    return hits or paths[:n]
