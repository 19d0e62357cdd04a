"""`LoraConfig`: the static description of an adapter (what to target, rank, scale, init)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from lora_jax.core._patterns import freeze_pattern, freeze_spec, matching, pairs, pattern_hits
from lora_jax.core._presets import PRESETS

__all__ = ["LoraConfig", "PRESETS", "INITS", "DROPOUT_RNG"]

TargetSpec = str | Sequence[str] | Callable[[str, Any], bool]

# The rng stream LoRA dropout draws from (linen ``rngs=``, NNX ``nnx.Rngs``).
DROPOUT_RNG = "lora_dropout"

INITS = ("normal", "kaiming_uniform", "gaussian", "pissa", "olora")


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


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
            as PEFT's ``"gaussian"``, B = 0), ``"pissa"`` (A, B from the top-r singular
            vectors of W; the frozen base becomes the residual) or ``"olora"`` (PEFT's
            OLoRA: from the QR decomposition of W as PEFT's ``(out, in)`` weight, A the
            first r rows of R, B the first r columns of Q, not divided by the scale; the
            frozen base becomes the residual ``W - s·B·A``).
        dtype: dtype of the adapter weights (float32 by default, also for a bf16 base).
        slices: ``{regex: axis}``, keys matched like `rank_pattern`: kernels whose path matches
            hold several projections along `axis` (k and v; gate and up): each slice gets its
            own adapter, as PEFT has for separate modules. Without it one adapter spans the
            whole kernel (the axis is an output axis). A negative axis counts from the end.
        use_dora: DoRA (weight-decomposed LoRA, PEFT's ``use_dora``): each adapter also
            trains a magnitude per output feature (`LoraWeights.magnitude`, initialised to
            ``‖W + s·a@b‖``, the norm over the input axes, so training starts at the base);
            the layer computes ``m / ‖W + s·a@b‖ · (W x + s·(x a) b)`` with the norm held
            constant in the backward pass. With LoRA dropout running, as PEFT:
            ``W x + (m/‖·‖ - 1)·W x' + m/‖·‖·s·(x' a) b`` for the dropped input x'.
        lora_bias: PEFT's ``lora_bias``: the up-projection also trains a bias
            (`LoraWeights.bias`, zeros at init), so the low-rank path is
            ``s·((x a) b + bias)``. As in PEFT, not with DoRA or a residual init.

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
    slices: Mapping[str, int] | tuple[tuple[str, int], ...] = ()
    use_dora: bool = False
    lora_bias: bool = False

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
        for name in ("use_dora", "lora_bias"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"`{name}` must be a bool; found {getattr(self, name)!r}.")
        if self.lora_bias and self.use_dora:
            raise ValueError(
                "`lora_bias=True` does not combine with `use_dora=True` (as in PEFT): the DoRA "
                "norm is of the kernel, which a bias is not part of. Choose one."
            )
        if self.lora_bias and self.init in ("pissa", "olora"):
            raise ValueError(
                f"`lora_bias=True` needs an init that keeps the base (as in PEFT); found "
                f"init={self.init!r}."
            )
        try:
            dtype = jnp.dtype(self.dtype)
        except TypeError as err:
            raise TypeError(f"`dtype` must be a JAX dtype; found {self.dtype!r}.") from err
        if not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(f"`dtype` must be a floating dtype; found {dtype}.")
        set_ = object.__setattr__
        set_(self, "targets", freeze_spec(self.targets, "targets"))
        set_(self, "exclude", freeze_spec(self.exclude, "exclude"))
        ranks = freeze_pattern(
            self.rank_pattern, "rank_pattern", lambda r: _is_int(r) and r >= 1, "an integer >= 1"
        )
        alphas = freeze_pattern(
            self.alpha_pattern, "alpha_pattern", lambda a: _is_number(a) and a > 0, "a number > 0"
        )
        slices = freeze_pattern(self.slices, "slices", _is_int, "an int axis")
        set_(self, "rank_pattern", ranks)
        set_(self, "alpha_pattern", alphas)
        set_(self, "slices", slices)

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
        return matching(self.targets, path, leaf, kind)

    def is_excluded(self, path: str, leaf: Any, kind: str = "matrix") -> bool:
        """Whether `exclude` removes `path` from the targets.

        Args:
            path: the `/`-joined parameter path.
            leaf: the parameter.
            kind: the layout kind of the leaf.

        Returns:
            True when an `exclude` pattern or callable selects the path.
        """
        return self.exclude is not None and bool(matching(self.exclude, path, leaf, kind))

    def rank_for(self, path: str) -> int:
        """The rank for `path`: the first matching `rank_pattern` entry, else `rank`.

        Args:
            path: the `/`-joined parameter path.

        Returns:
            The rank.
        """
        hit = (int(r) for k, r in pairs(self.rank_pattern) if pattern_hits(k, path))
        return next(hit, self.rank)

    def alpha_for(self, path: str) -> float:
        """The alpha for `path`: the first matching `alpha_pattern` entry, else `alpha`.

        Args:
            path: the `/`-joined parameter path.

        Returns:
            The alpha.
        """
        hit = (float(a) for k, a in pairs(self.alpha_pattern) if pattern_hits(k, path))
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

    def slice_axis_for(self, path: str, ndim: int) -> int | None:
        """The kernel axis whose slices get one adapter each: the first matching `slices` key.

        Args:
            path: the `/`-joined parameter path.
            ndim: the number of axes of the kernel at `path`.

        Returns:
            The axis in ``0..ndim-1`` (a negative one counted from the end), or None when no
            `slices` key matches `path`.

        Raises:
            ValueError: the axis is out of range for a kernel with `ndim` axes.
        """
        hit = ((k, int(a)) for k, a in pairs(self.slices) if pattern_hits(k, path))
        key, axis = next(hit, (None, None))
        if key is None or axis is None:
            return None
        if not -ndim <= axis < ndim:
            raise ValueError(
                f"{path}: `slices[{key!r}]` is axis {axis}, out of range for its kernel "
                f"with ndim={ndim} (axes 0..{ndim - 1}, or -{ndim}..-1 from the end)."
            )
        return axis % ndim


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
    """``(field, key)`` for each `rank_pattern` / `alpha_pattern` / `slices` key selecting none of
    `targets` (a key that matches nothing would be silently ignored)."""
    unused = []
    for field in ("rank_pattern", "alpha_pattern", "slices"):
        for key, _ in pairs(getattr(config, field)):
            if not any(pattern_hits(key, path) for path in targets):
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
            matching((p,), path, leaf, kinds.get(path, "matrix")) for path, leaf in leaves.items()
        )
    ]
