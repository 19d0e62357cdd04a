"""The Flax linen layers whose low-rank path lora_jax computes factored.

`site` reads an intercepted layer call (module, method, input) and picks its entry of the
kernel table (`lora_jax.core._kernels`): `nn.Dense`, `nn.DenseGeneral` (no batch dims),
`nn.Einsum`, `nn.Embed` (lookup and ``attend``) and `nn.Conv` (no groups or mask). A
subclass that overrides the call is not supported (its computation is unknown); anything
else returns None and is served by the merged path.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn

from lora_jax.core._kernels import LowRank, conv_of, dense, einsum, embed

__all__ = ["Site", "site", "kernel_path"]


@dataclasses.dataclass(frozen=True)
class Site:
    """One intercepted layer call: the kernel's parameter name, its input's argument name
    and the kernel-table entry."""

    param: str
    input_name: str
    low_rank: LowRank


def _inherits(module: nn.Module, cls: type, method: str) -> bool:
    """True when `module` is a `cls` whose `method` is `cls`'s own (not overridden)."""
    return isinstance(module, cls) and getattr(type(module), method) is getattr(cls, method)


def _input(args: tuple, kwargs: dict, name: str) -> Any:
    return args[0] if args else kwargs.get(name)


def _tup(v: Any) -> tuple:
    return tuple(v) if isinstance(v, (tuple, list)) else (v,)


def _dense_general(module: Any, x: Any) -> Site | None:
    if module.batch_dims:
        return None
    axis = tuple(sorted(ax % x.ndim for ax in _tup(module.axis)))
    return Site("kernel", "inputs", dense(axis, len(_tup(module.features))))


def _conv(module: Any, x: Any) -> Site | None:
    if module.feature_group_count != 1 or module.mask is not None:
        return None
    size = module.kernel_size
    window = (size,) if isinstance(size, int) else tuple(size)
    entry = conv_of(module, window)
    if x.ndim == len(window) + 1:  # Flax's unbatched conv input: no example axis
        entry = dataclasses.replace(entry, mixed=None)
    return Site("kernel", "inputs", entry)


def site(module: nn.Module, method: str, args: tuple, kwargs: dict) -> Site | None:
    """The factored description of this layer call, or None if it is not supported."""
    if method == "__call__":
        if _inherits(module, nn.Dense, method):
            x = _input(args, kwargs, "inputs")
            return Site("kernel", "inputs", dense((x.ndim - 1,), 1))
        if _inherits(module, nn.DenseGeneral, method):
            return _dense_general(module, _input(args, kwargs, "inputs"))
        if _inherits(module, nn.Einsum, method):
            eq = args[1] if len(args) > 1 else kwargs.get("einsum_str")
            entry = einsum(eq or module.einsum_str)
            return None if entry is None else Site("kernel", "inputs", entry)
        if _inherits(module, nn.Conv, method):
            return _conv(module, _input(args, kwargs, "inputs"))
    if _inherits(module, nn.Embed, method) and method in ("__call__", "attend"):
        if method == "__call__":
            return Site("embedding", "inputs", embed("lookup"))
        return Site("embedding", "query", embed("attend"))
    return None


def kernel_path(module: nn.Module, param: str) -> str:
    """The variables path of a module's parameter: ``params/<module path>/<param>``."""
    return "/".join(("params", *module.path, param))
