"""`LoraConfig`: the static description of an adapter (what to target, rank, scale, init)."""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from lora_jax.core._presets import PRESET_FNS, PRESETS

__all__ = ["LoraConfig", "PRESETS", "INITS", "DROPOUT_RNG"]

TargetSpec = str | Sequence[str] | Callable[[str, Any], bool]

# The rng stream LoRA dropout draws from (linen ``rngs=``, NNX ``nnx.Rngs``).
DROPOUT_RNG = "lora_dropout"

INITS = ("normal", "kaiming_uniform", "gaussian", "pissa")


def _freeze_spec(spec: Any, field: str) -> Any:
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
        try:
            re.compile(pattern)
        except re.error as err:
            raise ValueError(f"`{field}` pattern {pattern!r} is not a valid regex: {err}.") from err
    return spec if isinstance(spec, str) else patterns


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


def _pairs(pattern: Any) -> tuple[tuple[str, Any], ...]:
    return tuple(pattern.items()) if isinstance(pattern, Mapping) else tuple(pattern)


def _freeze_pattern(pattern: Any, field: str, kind: type) -> tuple[tuple[str, Any], ...]:
    items = _pairs(pattern)
    for key, value in items:
        try:
            re.compile(key)
        except re.error as err:
            raise ValueError(f"`{field}` key {key!r} is not a valid regex: {err}.") from err
        if kind is int and (not isinstance(value, (int, np.integer)) or value < 1):
            raise ValueError(f"`{field}[{key!r}]` must be an integer >= 1; found {value!r}.")
        if kind is float and (not isinstance(value, (int, float)) or value <= 0):
            raise ValueError(f"`{field}[{key!r}]` must be a number > 0; found {value!r}.")
    return items


def _pattern_hits(key: str, path: str) -> bool:
    """PEFT-style pattern match: the whole path, or a trailing run of module names."""
    if re.fullmatch(key, path):
        return True
    module = path.rsplit("/", 1)[0]
    return bool(re.fullmatch(rf"(?:.*/)?(?:{key})", module))


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoraConfig:
    """What to adapt and how: static, hashable, safe to close over under `jax.jit`.

    Paths are `/`-joined keys of the variables tree, e.g.
    ``params/layers_0/attn/query/kernel``.

    Attributes:
        targets: which leaves get an adapter. A regex matched against the whole path
            (`re.fullmatch`), a list of them (a leaf matching any; each must match
            something), a callable ``(path, leaf) -> bool``, or a preset name:
            ``"attention"`` or ``"all-linear"`` (see `PRESETS`).
        rank: rank r of every adapter, unless `rank_pattern` says otherwise.
        alpha: scale numerator: the low-rank path is multiplied by ``alpha / rank``
            (``alpha / sqrt(rank)`` with `use_rslora`).
        exclude: leaves never adapted, in the same forms as `targets`.
        dropout: dropout rate on the low-rank path's input, in [0, 1). Stored on each
            adapter (`LoraWeights.dropout`); it runs when the call is given the
            ``"lora_dropout"`` rng (see `lora_jax.lora_apply`).
        use_rslora: rank-stabilised scaling, ``alpha / sqrt(rank)``.
        rank_pattern: ``{regex: rank}`` overrides, as in PEFT. A key matches a path when it
            matches the whole path or a trailing run of its module names (``attn/query``
            matches ``params/layers_0/attn/query/kernel``); the first matching key wins.
            Stored as a tuple of pairs so the config stays hashable.
        alpha_pattern: ``{regex: alpha}`` overrides, matched like `rank_pattern`.
        init: ``"normal"`` (A ~ N(0, 0.02²), B = 0; the default), ``"kaiming_uniform"``
            (PEFT's default: A ~ U(±1/sqrt(fan_in)), B = 0), ``"gaussian"`` (A ~ N(0, 1/r²)
            as PEFT's ``"gaussian"``, B = 0) or ``"pissa"`` (A, B from the top-r singular
            vectors of W; the frozen base becomes the residual).
        dtype: dtype of the adapter weights (float32 by default, also for a bf16 base).

    Example:
        >>> import lora_jax as lj
        >>> config = lj.LoraConfig(rank=4, alpha=8.0, targets=r".*/(query|value)/kernel")
        >>> config.scale_for("params/attn/query/kernel")
        2.0
    """

    targets: TargetSpec
    rank: int = 8
    alpha: float = 8.0
    exclude: TargetSpec | None = None
    dropout: float = 0.0
    use_rslora: bool = False
    rank_pattern: Mapping[str, int] | tuple[tuple[str, int], ...] = ()
    alpha_pattern: Mapping[str, float] | tuple[tuple[str, float], ...] = ()
    init: str = "normal"
    dtype: Any = jnp.float32

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, (int, np.integer)):
            raise TypeError(f"`rank` must be an int; found {self.rank!r}.")
        if self.rank < 1:
            raise ValueError(f"`rank` must be >= 1; found {self.rank}.")
        if not isinstance(self.alpha, (int, float)) or not self.alpha > 0:
            raise ValueError(f"`alpha` must be a number > 0; found {self.alpha!r}.")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"`dropout` must be in [0, 1); found {self.dropout!r}.")
        if self.init not in INITS:
            raise ValueError(f"`init` must be one of {INITS}; found {self.init!r}.")
        try:
            dtype = jnp.dtype(self.dtype)
        except TypeError as err:
            raise TypeError(f"`dtype` must be a JAX dtype; found {self.dtype!r}.") from err
        if not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(f"`dtype` must be a floating dtype; found {dtype}.")
        set_ = object.__setattr__
        set_(self, "targets", _freeze_spec(self.targets, "targets"))
        set_(self, "exclude", _freeze_spec(self.exclude, "exclude"))
        set_(self, "rank_pattern", _freeze_pattern(self.rank_pattern, "rank_pattern", int))
        set_(self, "alpha_pattern", _freeze_pattern(self.alpha_pattern, "alpha_pattern", float))

    def patterns(self) -> tuple[str, ...]:
        """The target regexes and preset names, or `()` when `targets` is a callable."""
        if callable(self.targets):
            return ()
        return (self.targets,) if isinstance(self.targets, str) else tuple(self.targets)

    def matched_by(self, path: str, leaf: Any, kind: str = "matrix") -> tuple[str, ...]:
        """The target patterns (or ``"<callable>"``) that select `path`, ignoring `exclude`.

        Args:
            path: the `/`-joined parameter path.
            leaf: the parameter (an array or anything with ``shape``).
            kind: the layout kind of the leaf (``"dense"``, ``"einsum"``, ``"embed"``,
                ``"conv"`` or ``"matrix"`` when unknown); presets use it.

        Returns:
            The patterns that match; empty when none do.
        """
        return _matching(self.targets, path, leaf, kind)

    def is_excluded(self, path: str, leaf: Any, kind: str = "matrix") -> bool:
        """Whether `exclude` removes `path` from the targets.

        Args:
            path: the `/`-joined parameter path.
            leaf: the parameter.
            kind: the layout kind of the leaf.

        Returns:
            True when an `exclude` pattern or callable selects the path.
        """
        return self.exclude is not None and bool(_matching(self.exclude, path, leaf, kind))

    def rank_for(self, path: str) -> int:
        """The rank for `path`: the first matching `rank_pattern` entry, else `rank`.

        Args:
            path: the `/`-joined parameter path.

        Returns:
            The rank.
        """
        hit = (int(r) for k, r in _pairs(self.rank_pattern) if _pattern_hits(k, path))
        return next(hit, self.rank)

    def alpha_for(self, path: str) -> float:
        """The alpha for `path`: the first matching `alpha_pattern` entry, else `alpha`.

        Args:
            path: the `/`-joined parameter path.

        Returns:
            The alpha.
        """
        hit = (float(a) for k, a in _pairs(self.alpha_pattern) if _pattern_hits(k, path))
        return next(hit, float(self.alpha))

    def scale_for(self, path: str, rank: int | None = None) -> float:
        """The multiplier s of the low-rank path at `path`.

        Args:
            path: the `/`-joined parameter path.
            rank: the adapter's rank; defaults to `rank_for(path)`.

        Returns:
            ``alpha / rank``, or ``alpha / sqrt(rank)`` with `use_rslora`.
        """
        r = self.rank_for(path) if rank is None else rank
        denom = math.sqrt(r) if self.use_rslora else r
        return self.alpha_for(path) / denom


def _matching(spec: Any, path: str, leaf: Any, kind: str) -> tuple[str, ...]:
    if callable(spec):
        return ("<callable>",) if spec(path, leaf) else ()
    patterns = (spec,) if isinstance(spec, str) else spec
    hits = []
    for pattern in patterns:
        preset = PRESET_FNS.get(pattern)
        if preset(path, kind) if preset else re.fullmatch(pattern, path):
            hits.append(pattern)
    return tuple(hits)


def require_config(config: Any, where: str) -> LoraConfig:
    """`config` itself, or a TypeError naming `where` when it is not a `LoraConfig`."""
    if not isinstance(config, LoraConfig):
        hint = (
            f" A preset name goes in `targets`: lj.LoraConfig(targets={config!r})."
            if isinstance(config, str)
            else ""
        )
        raise TypeError(
            f"{where}: `config` must be a lj.LoraConfig; found {type(config).__name__} "
            f"{config!r}.{hint}"
        )
    return config


def unused_pattern_keys(config: LoraConfig, targets: Sequence[str]) -> list[tuple[str, str]]:
    """``(field, key)`` for each `rank_pattern` / `alpha_pattern` key that selects none of
    `targets` (a key that matches nothing would be silently ignored)."""
    unused = []
    for field in ("rank_pattern", "alpha_pattern"):
        for key, _ in _pairs(getattr(config, field)):
            if not any(_pattern_hits(key, path) for path in targets):
                unused.append((field, key))
    return unused


def unused_excludes(
    config: LoraConfig, leaves: Mapping[str, Any], kinds: Mapping[str, str]
) -> list[str]:
    """The `exclude` patterns (not callables) that match no parameter at all."""
    if config.exclude is None or callable(config.exclude):
        return []
    patterns = (config.exclude,) if isinstance(config.exclude, str) else config.exclude
    return [
        p
        for p in patterns
        if not any(
            _matching((p,), path, leaf, kinds.get(path, "matrix")) for path, leaf in leaves.items()
        )
    ]
