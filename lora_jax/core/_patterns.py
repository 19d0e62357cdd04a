"""Patterns of a `LoraConfig`: validating target specs and ``{regex: value}`` overrides,
and matching them against parameter paths."""

from __future__ import annotations

import difflib
import inspect
import re
from collections.abc import Callable, Mapping
from typing import Any

from lora_jax.core._presets import PRESET_FNS, PRESETS

__all__ = ["freeze_spec", "freeze_pattern", "pairs", "pattern_hits", "matching"]


def freeze_spec(spec: Any, field: str) -> Any:
    """Validates a target spec and makes it hashable (lists become tuples)."""
    if spec is None:
        return spec
    if callable(spec):
        _check_callable(spec, field)
        return spec
    patterns = (spec,) if isinstance(spec, str) else tuple(spec)
    if not patterns:
        raise ValueError(f"`{field}` is an empty list; give at least one pattern.")
    for pattern in patterns:
        if not isinstance(pattern, str):
            raise TypeError(
                f"`{field}` entries must be regex strings; found {pattern!r} "
                f"of type {type(pattern).__name__}."
            )
        if pattern in PRESET_FNS:
            continue
        near = difflib.get_close_matches(pattern, list(PRESETS), n=1, cutoff=0.75)
        if near or re.fullmatch(r"[a-z]+(-[a-z]+)+", pattern):
            raise ValueError(
                f"`{field}`: unknown preset {pattern!r}; presets are "
                f"{', '.join(repr(p) for p in PRESETS)}. A regex must match the whole path."
            )
        _compile(pattern, f"`{field}` pattern")
    return spec if isinstance(spec, str) else patterns


def _compile(pattern: str, what: str) -> None:
    try:
        re.compile(pattern)
    except re.error as err:
        raise ValueError(f"{what} {pattern!r} is not a valid regex: {err}.") from err


def _check_callable(fn: Callable[..., Any], field: str) -> None:
    """A callable spec must take ``(path, leaf)``; say so now, not deep inside `split`."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return
    try:
        sig.bind("params/kernel", None)
    except TypeError as err:
        name = getattr(fn, "__name__", "callable")
        raise TypeError(
            f"`{field}` callable must take two arguments, (path, leaf), and return a bool; "
            f"found {name}{sig}. Example: {field}=lambda path, leaf: path.endswith('/kernel')."
        ) from err


def pairs(pattern: Any) -> tuple[tuple[str, Any], ...]:
    """``{regex: value}`` (or pairs already) as a tuple of ``(regex, value)`` pairs."""
    return tuple(pattern.items()) if isinstance(pattern, Mapping) else tuple(pattern)


def freeze_pattern(
    pattern: Any, field: str, valid: Callable[[Any], bool], expected: str
) -> tuple[tuple[str, Any], ...]:
    """Validates ``{regex: value}`` overrides (each value passes `valid`, else a ValueError
    saying it must be `expected`) and freezes them to a tuple of pairs."""
    is_pair = lambda p: isinstance(p, (list, tuple)) and len(p) == 2 and isinstance(p[0], str)
    if isinstance(pattern, Mapping) and all(isinstance(k, str) for k in pattern):
        items = tuple(pattern.items())
    elif isinstance(pattern, (list, tuple)) and all(is_pair(p) for p in pattern):
        items = tuple((p[0], p[1]) for p in pattern)
    else:
        raise TypeError(f"`{field}` must be a mapping {{regex: value}}; found {pattern!r}.")
    for key, value in items:
        _compile(key, f"`{field}` key")
        if not valid(value):
            raise ValueError(f"`{field}[{key!r}]` must be {expected}; found {value!r}.")
    return items


def pattern_hits(key: str, path: str) -> bool:
    """PEFT-style pattern match: the whole path, or a trailing run of module names."""
    if re.fullmatch(key, path):
        return True
    module = path.rsplit("/", 1)[0]
    return bool(re.fullmatch(rf"(?:.*/)?(?:{key})", module))


def matching(spec: Any, path: str, leaf: Any, kind: str) -> tuple[str, ...]:
    """The patterns of a frozen target spec (or ``"<callable>"``) that select `path`."""
    if callable(spec):
        return ("<callable>",) if spec(path, leaf) else ()
    patterns = (spec,) if isinstance(spec, str) else spec
    hits = []
    for pattern in patterns:
        preset = PRESET_FNS.get(pattern)
        if preset(path, kind) if preset else re.fullmatch(pattern, path):
            hits.append(pattern)
    return tuple(hits)
