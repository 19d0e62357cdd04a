"""What the contraction rewrite knows about a traced value that is (a view of) an adapted
kernel: `View` (which kernel axis each of its axes is) and `Current` (the adapter as one
scope sees it), and how a reshape of the kernel carries its adapter along (`reshaped`)."""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from lora_jax.core._dora import dora_kernel
from lora_jax.core._layout import Layout
from lora_jax.core._weights import LoraWeights, scaled_delta

__all__ = ["Current", "View", "groups_of", "reshaped", "sliced", "without_axis"]


@dataclasses.dataclass(frozen=True)
class View:
    """How a traced value relates to an adapted kernel: ``axes[i]`` is the kernel axis
    that axis i of the value is (after transposes); the value may be cast. `path` keys the
    scope's `Current` (a reshaped kernel gets one of its own)."""

    path: str
    axes: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Current:
    """An adapter as one scope sees it: under `scan` its factors are sliced along the
    scanned stack axis and the layout renumbered; after a reshape they are reshaped.

    Attributes:
        a: ``(*stack, [k,] *in, r)``; the ``k`` axis only in a mixed batch.
        b: ``(*stack, [k,] r, *out)``.
        layout: the kernel's layout in this scope.
        scale: the multiplier (1.0 in a mixed batch: `gains` carry it).
        origin: the adapter's path, for `routes`.
        rate: LoRA dropout rate on the low-rank path's input.
        rows: a mixed batch's adapter per example (``(n,)`` ints), or None.
        gains: a mixed batch's multiplier per example (``(n,)``: its adapter's scale, 0
            for the plain base, NaN for a bad id), or None.
        magnitude: DoRA's magnitude ``(*stack, *out)``, cut and reshaped as `b` is; or None.
        bias: ``lora_bias`` ``(*stack, *out)``, likewise; or None.
    """

    a: Any
    b: Any
    layout: Layout
    scale: Any
    origin: str
    rate: float = 0.0
    rows: Any = None
    gains: Any = None
    magnitude: Any = None
    bias: Any = None

    @property
    def mixed(self) -> bool:
        return self.rows is not None

    def with_b(self, fn: Any, **changes: Any) -> Current:
        """This adapter with `fn` applied to `b` and, given a rank axis of size 1, to the
        vectors of one value per output feature (magnitude, bias): they follow b's cuts,
        transposes and reshapes."""
        pos = len(self.layout.stack_axes)
        per = lambda v: None if v is None else jnp.squeeze(fn(jnp.expand_dims(v, pos)), pos)
        return dataclasses.replace(
            self, b=fn(self.b), magnitude=per(self.magnitude), bias=per(self.bias), **changes
        )

    def factors(self) -> tuple[Any, Any]:
        """``(a, b)`` with a mixed batch's adapter axis gathered to one per example."""
        if not self.mixed:
            return self.a, self.b
        n = len(self.layout.stack_axes)
        return jnp.take(self.a, self.rows, axis=n), jnp.take(self.b, self.rows, axis=n)

    def merged(self, value: Any, view: View, why: str) -> jax.Array:
        """`value` (the kernel as `view` sees it) with the adapter folded in: ``W + s·a@b``,
        or DoRA's ``m / ‖W + s·a@b‖ · (W + s·a@b)``."""
        if self.mixed:
            raise ValueError(
                f"{self.origin}: a mixed batch needs every use of an adapted kernel factored "
                f"(one adapter per example); this use would need the merged kernel. Exclude "
                f"the target, or run each adapter with lj.lora_apply."
            )
        if self.bias is not None:
            raise ValueError(
                f"{self.origin}: an adapter with lora_bias needs every use of its kernel to be "
                f"a contraction lj factors (the bias is added to the contraction's output); "
                f"this kernel is used by {why}. Train it without lora_bias."
            )
        if self.magnitude is not None:
            inverse = [view.axes.index(k) for k in range(len(view.axes))]
            kernel = jnp.transpose(value, inverse)
            new = dora_kernel(kernel, self.a, self.b, self.layout, self.scale, self.magnitude)
            return jnp.transpose(new, view.axes).astype(value.dtype)
        w = LoraWeights(self.a, self.b, self.layout, scale=1.0)
        d = jnp.transpose(scaled_delta(w, self.scale, jnp.float32), view.axes)
        return value + d.astype(value.dtype)


def without_axis(layout: Layout, k: int) -> Layout:
    """`layout` with kernel axis `k` (a stack axis) removed and the others renumbered."""
    drop = lambda axes: tuple(x - (x > k) for x in axes if x != k)
    return Layout(layout.kind, drop(layout.in_axes), drop(layout.out_axes), drop(layout.stack_axes))


def groups_of(old: tuple[int, ...], new: tuple[int, ...]) -> list[tuple[range, range]] | None:
    """Runs of old and new axes with equal sizes products (what a reshape merges/splits)."""
    out, i, j = [], 0, 0
    while i < len(old) or j < len(new):
        i0, j0 = i, j
        p, q = (old[i] if i < len(old) else 1), (new[j] if j < len(new) else 1)
        i, j = i + 1, j + 1
        while p != q:
            if p < q and i < len(old):
                p, i = p * old[i], i + 1
            elif q < p and j < len(new):
                q, j = q * new[j], j + 1
            else:
                return None
        out.append((range(i0, min(i, len(old))), range(j0, min(j, len(new)))))
    return out


def reshaped(
    cur: Current, view: View, old: tuple[int, ...], new: tuple[int, ...]
) -> Current | None:
    """The adapter of ``value.reshape(new)`` for a value viewing `cur`'s kernel, when the
    reshape only merges or splits axes of one role (inputs, outputs, or stacked): its
    factors reshaped the same way, laid out in the new value's axis order. None otherwise."""
    lay = cur.layout
    role = {k: "s" for k in lay.stack_axes} | {k: "i" for k in lay.in_axes}
    role |= {k: "o" for k in lay.out_axes}
    groups = groups_of(old, new)
    if groups is None or math.prod(old) == 0:
        return None
    roles: dict[int, str] = {}
    for olds, news in groups:
        found = {role[view.axes[i]] for i in olds if old[i] != 1}
        if len(found) > 1 or (not found and len(news) and any(new[j] != 1 for j in news)):
            return None
        r = found.pop() if found else "o"
        roles.update({j: r for j in news})
    pick = lambda r: tuple(j for j in range(len(new)) if roles[j] == r)
    stack, ins, outs = pick("s"), pick("i"), pick("o")
    if not ins or not outs:
        return None
    # The factors in the value's axis order, then reshaped per role.
    in_v = [view.axes[i] for i in range(len(old)) if role[view.axes[i]] == "i"]
    out_v = [view.axes[i] for i in range(len(old)) if role[view.axes[i]] == "o"]
    st_v = [view.axes[i] for i in range(len(old)) if role[view.axes[i]] == "s"]
    n_s, lead = len(lay.stack_axes), (1 if cur.mixed else 0)
    a_perm = [lay.stack_axes.index(k) for k in st_v]
    a_perm += list(range(n_s, n_s + lead)) + [n_s + lead + lay.in_axes.index(k) for k in in_v]
    b_perm = [lay.stack_axes.index(k) for k in st_v] + list(range(n_s, n_s + lead + 1))
    b_perm += [n_s + lead + 1 + lay.out_axes.index(k) for k in out_v]
    a = jnp.transpose(cur.a, [*a_perm, cur.a.ndim - 1])
    k_axes = tuple(cur.a.shape[n_s : n_s + lead])
    sizes = lambda axes: tuple(new[j] for j in axes)
    a = a.reshape(*sizes(stack), *k_axes, *sizes(ins), cur.a.shape[-1])
    layout = Layout("einsum", ins, outs, stack)
    shape_b = lambda b: jnp.transpose(b, b_perm).reshape(
        *sizes(stack), *k_axes, b.shape[n_s + lead], *sizes(outs)
    )
    return cur.with_b(shape_b, a=a, layout=layout)


def sliced(cur: Current, view: View, shape: tuple[int, ...], params: dict, starts: Any) -> Any:
    """The adapter of a ``slice`` (`starts` None) or ``dynamic_slice`` (`starts` the traced
    start indices) of a value viewing `cur`'s kernel, when only stack axes are cut: the
    factors cut the same way along those axes (one adapter per kept index). None when an
    input or output axis is cut (the use is then merged)."""
    lay = cur.layout
    for i, size in enumerate(shape):
        if starts is None:
            lo, hi = params["start_indices"][i], params["limit_indices"][i]
            step = int((params["strides"] or (1,) * len(shape))[i])
            if (lo, hi, step) == (0, size, 1):
                continue
        elif params["slice_sizes"][i] == size:
            continue  # a full-size dynamic slice starts at 0 (the start is clamped)
        if view.axes[i] not in lay.stack_axes:
            return None
        pos = lay.stack_axes.index(view.axes[i])
        if starts is None:
            cut = functools.partial(lax.slice_in_dim, start_index=lo, limit_index=hi, stride=step)
        else:
            cut = functools.partial(
                lax.dynamic_slice_in_dim, start_index=starts[i], slice_size=params["slice_sizes"][i]
            )
        cur = cur.with_b(lambda x, cut=cut, pos=pos: cut(x, axis=pos), a=cut(cur.a, axis=pos))
    return cur
