"""Layouts learned from use: a walk of the traced program (no values, no FLOPs) that
records, for every float kernel, the layout its contractions imply, and how many
operations read it (the linen and NNX planners compare that with their layers' calls)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from jax.extend.core import Literal

from lora_jax.core._layout import Layout
from lora_jax.core._rewrite import CALLS, CUSTOM, PASS, REMAT
from lora_jax.core._views import groups_of

__all__ = ["learn"]


def learn(
    jaxpr: Any, kernels: Mapping[Any, tuple[str, tuple[int, ...]]]
) -> tuple[dict[str, Layout], dict[str, int]]:
    """``(layouts, uses)`` of the kernels read by `jaxpr`.

    Args:
        jaxpr: the program (a ``Jaxpr``).
        kernels: ``{input variable: (path, kernel shape)}``.

    Returns:
        ``{path: Layout}`` (contracted axes in, batch/group/scanned/indexed axes stacked,
        the rest out; a row gather of a 2-D table is an ``"embed"``) and ``{path: number of
        operations that read it}``.
    """
    uses = _Uses({path: shape for path, shape in kernels.values()})
    uses.walk(
        jaxpr, {v: _Seen(p, tuple((i,) for i in range(len(s)))) for v, (p, s) in kernels.items()}
    )
    return uses.layouts, uses.uses


@dataclasses.dataclass(frozen=True)
class _Seen:
    """A value read from a kernel, for layout learning: the kernel axes each axis stands
    for (one, or several after a reshape merged them)."""

    path: str
    axes: tuple[tuple[int, ...], ...]


class _Uses:
    """Walks a jaxpr (no values) and records, per kernel, the layout its contractions
    imply: contracted axes are inputs, batch and group axes and scanned axes are stack
    axes, the rest outputs; a row gather of a 2-D table is an embedding. A value's axes
    map to groups of kernel axes (a reshape merges or splits them)."""

    def __init__(self, sizes: dict[str, tuple[int, ...]]) -> None:
        self.layouts: dict[str, Layout] = {}
        self.stacked: dict[str, set[int]] = {}
        self.uses: dict[str, int] = {}  # equations that read each kernel (not casts, calls)
        self.sizes = sizes

    def record(self, path: str, kind: str, ins: set, outs: set, stack: set) -> None:
        stack = stack | self.stacked.get(path, set())
        if ins & outs or (ins | outs) & stack:
            return
        try:
            layout = Layout(kind, tuple(sorted(ins)), tuple(sorted(outs)), tuple(sorted(stack)))
        except ValueError:
            return
        if path not in self.layouts or layout.kind == "embed":  # a row gather wins
            self.layouts[path] = layout

    def walk(self, jaxpr: Any, views: Mapping[Any, _Seen]) -> None:
        seen = dict(views)
        for eqn in jaxpr.eqns:
            inv = [None if isinstance(v, Literal) else seen.get(v) for v in eqn.invars]
            if any(inv):
                for var, view in zip(eqn.outvars, self.eqn(eqn, inv), strict=False):
                    if view is not None:
                        seen[var] = view

    def sub(self, jaxpr: Any, views: list) -> None:
        self.walk(jaxpr, {v: w for v, w in zip(jaxpr.invars, views, strict=True) if w})

    def eqn(self, eqn: Any, inv: list) -> list:
        name, p = eqn.primitive.name, eqn.params
        follow = name in PASS and len(inv) == 1
        flow = name in CALLS or name in REMAT or name in CUSTOM or name in ("cond", "while", "scan")
        views = ("transpose", "reshape", "squeeze", "slice", "dynamic_slice")
        if not follow and name not in views and not flow:
            for path in {v.path for v in inv if v is not None}:
                self.uses[path] = self.uses.get(path, 0) + 1
        if follow or (name in ("slice", "dynamic_slice") and inv[0] is not None):
            return [inv[0]]  # a cut keeps the kernel axes (indexing stacked layers)
        if name == "transpose":
            return [_Seen(inv[0].path, tuple(inv[0].axes[i] for i in p["permutation"]))]
        if name == "squeeze":  # w[i]: the indexed axis holds one kernel per index
            gone = [inv[0].axes[d] for d in p["dimensions"]]
            big = {k for g in gone for k in g if self.sizes[inv[0].path][k] > 1}
            self.stacked.setdefault(inv[0].path, set()).update(big)
            keep = [a for d, a in enumerate(inv[0].axes) if d not in p["dimensions"]]
            return [_Seen(inv[0].path, tuple(keep))]
        if name == "reshape":
            return [_regrouped(inv[0], eqn)]
        if name == "dot_general":
            (lc, rc), (lb, rb) = p["dimension_numbers"]
            for view, kc, kb in ((inv[0], lc, lb), (inv[1], rc, rb)):
                if view is not None:
                    self.roles(view, "einsum", kc, kb)
        elif name == "ragged_dot_general" and inv[1] is not None:
            dn = p["ragged_dot_dimension_numbers"]
            (_, rc), (_, rb) = dn.dot_dimension_numbers
            self.roles(inv[1], "einsum", rc, tuple(rb) + tuple(dn.rhs_group_dimensions))
        elif name == "conv_general_dilated" and inv[1] is not None:
            out = p["dimension_numbers"].rhs_spec[0]
            self.roles(inv[1], "conv", [i for i in range(len(inv[1].axes)) if i != out], ())
        elif name == "gather" and inv[0] is not None and inv[0].axes == ((0,), (1,)):
            dn = p["dimension_numbers"]
            if dn.collapsed_slice_dims == (0,) and dn.start_index_map == (0,):
                self.record(inv[0].path, "embed", {0}, {1}, set())
        elif name in CALLS or name in CUSTOM:
            closed = p.get("jaxpr") or p.get("call_jaxpr") or p.get("fun_jaxpr")
            self.sub(closed.jaxpr, inv)
        elif name in REMAT:
            self.sub(p["jaxpr"], inv)
        elif name == "cond":
            for branch in p["branches"]:
                self.sub(branch.jaxpr, inv[1:])
        elif name == "while":
            nc, nb = p["cond_nconsts"], p["body_nconsts"]
            rest = [None] * (len(inv) - nc - nb)
            self.sub(p["cond_jaxpr"].jaxpr, inv[:nc] + rest)
            self.sub(p["body_jaxpr"].jaxpr, inv[nc : nc + nb] + rest)
        elif name == "scan":
            n = p["num_consts"] + p["num_carry"]
            body = list(inv[: p["num_consts"]]) + [None] * p["num_carry"]
            for view in inv[n:]:
                if view is not None and len(view.axes[0]) == 1:
                    self.stacked.setdefault(view.path, set()).update(view.axes[0])
                body.append(None if view is None else _Seen(view.path, view.axes[1:]))
            self.sub(p["jaxpr"].jaxpr, body)
        return [None] * len(eqn.outvars)

    def roles(self, view: _Seen, kind: str, contracted: Any, batch: Any) -> None:
        """Records the layout of a contraction: `contracted` and `batch` axes of the value."""
        pick = lambda idx: {k for i in idx for k in view.axes[i]}
        free = [i for i in range(len(view.axes)) if i not in contracted and i not in batch]
        self.record(view.path, kind, pick(contracted), pick(free), pick(batch))


def _regrouped(view: _Seen, eqn: Any) -> _Seen | None:
    """The view of a reshaped kernel value: each new axis stands for the kernel axes of the
    run of old axes it was merged or split from."""
    old = tuple(eqn.invars[0].aval.shape)
    groups = groups_of(old, tuple(eqn.params["new_sizes"]))
    if groups is None or eqn.params.get("dimensions") is not None:
        return None
    axes: list[tuple[int, ...]] = [()] * len(eqn.params["new_sizes"])
    for olds, news in groups:
        kernel = tuple(sorted({k for i in olds for k in view.axes[i]}))
        for j in news:
            axes[j] = kernel
    return _Seen(view.path, tuple(axes))
