"""Factored LoRA wherever a contraction uses an adapted kernel, in any JAX code.

`rewrite` traces a function of a params tree to a jaxpr and evaluates it again with an
interpreter that follows each adapted kernel through casts, copies and transposes (a
`View`: which kernel axis each axis of the value is). Where the kernel meets a
``dot_general`` (``@``, ``jnp.dot``, ``jnp.einsum``...) the equation runs unchanged on the
base kernel and ``s·((x·a)·b)`` is added, contracted from the dimension numbers; a row
``gather`` of a 2-D table (an embedding lookup) adds ``s·a[ids]@b``. It descends into
``jit``, ``scan`` (a kernel scanned over its stack axis gets its adapter sliced the same
way), ``remat``, ``cond`` and ``while``. Any other use (an elementwise op, a reshape, a
custom_jvp/custom_vjp function) gets the merged kernel ``W + s·a@b`` for that use alone,
and the reason is recorded. Framework-free: it sees only the traced program, so custom
Flax modules and plain functions are served alike, and the model's code is untouched.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.extend.core import Literal

from lora_jax.core._contract import low_rank_dot
from lora_jax.core._layout import Layout
from lora_jax.core._weights import LoraWeights, scaled_delta

__all__ = ["CALLS", "PASS", "REMAT", "Current", "Interpreter", "View"]

# Primitives by what the rewrite does with a kernel flowing into them: follow it (one operand,
# same value up to dtype), descend into the sub-program of a call, or of a remat.
PASS = ("convert_element_type", "copy", "copy_p", "reduce_precision", "optimization_barrier")
CALLS = ("jit", "pjit", "closed_call", "core_call")
REMAT = ("remat2", "checkpoint", "remat")


@dataclasses.dataclass(frozen=True)
class View:
    """How a traced value relates to an adapted kernel: ``axes[i]`` is the kernel axis
    that axis i of the value is (after transposes); the value may be cast."""

    path: str
    axes: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Current:
    """An adapter as one scope sees it: under `scan`, its kernel and factors are sliced
    along the scanned stack axis, and the layout renumbered."""

    a: Any
    b: Any
    layout: Layout
    scale: Any

    def delta(self, view: View, dtype: Any) -> jax.Array:
        w = LoraWeights(self.a, self.b, self.layout, scale=self.scale)
        return jnp.transpose(scaled_delta(w, self.scale, jnp.float32), view.axes).astype(dtype)


def _without_axis(layout: Layout, k: int) -> Layout:
    drop = lambda axes: tuple(x - (x > k) for x in axes if x != k)
    return Layout(layout.kind, drop(layout.in_axes), drop(layout.out_axes), drop(layout.stack_axes))


class Interpreter:
    """Evaluates a jaxpr with `View`s on the values that are (views of) adapted kernels.

    `routes` collects, per kernel path, how each use was served: ``"factored (...)"`` or
    ``"merged (...)"``.
    """

    def __init__(self, routes: dict[str, set[str]]):
        self.routes = routes

    def note(self, path: str, how: str) -> None:
        self.routes.setdefault(path, set()).add(how)

    # -- the evaluation loop -------------------------------------------------------------
    def run(self, jaxpr: Any, consts: list, args: list, views: list, adapters: dict) -> list:
        env: dict[Any, Any] = {}
        seen: dict[Any, View] = {}

        def read(v: Any) -> Any:
            return v.val if isinstance(v, Literal) else env[v]

        for var, val in zip(jaxpr.constvars, consts, strict=True):
            env[var] = val
        for var, val, view in zip(jaxpr.invars, args, views, strict=True):
            env[var] = val
            if view is not None:
                seen[var] = view
        for eqn in jaxpr.eqns:
            invals = [read(v) for v in eqn.invars]
            inviews = [None if isinstance(v, Literal) else seen.get(v) for v in eqn.invars]
            if any(inviews):
                outs, outviews = self.adapted_eqn(eqn, invals, inviews, adapters)
            else:
                with eqn.ctx.manager:
                    outs = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(eqn.params))
                outs = outs if eqn.primitive.multiple_results else [outs]
                outviews = [None] * len(outs)
            for var, val, view in zip(eqn.outvars, outs, outviews, strict=True):
                env[var] = val
                if view is not None:
                    seen[var] = view
        results = []
        for v in jaxpr.outvars:
            view = None if isinstance(v, Literal) else seen.get(v)
            val = read(v)
            results.append(val if view is None else self.merged(val, view, adapters, "output"))
        return results

    def merged(self, value: Any, view: View, adapters: dict, why: str) -> Any:
        self.note(view.path, f"merged (used by {why})")
        return value + adapters[view.path].delta(view, value.dtype)

    def bind_merged(self, eqn: Any, invals: list, inviews: list, adapters: dict) -> tuple:
        name = eqn.primitive.name
        vals = [
            v if w is None else self.merged(v, w, adapters, name)
            for v, w in zip(invals, inviews, strict=True)
        ]
        outs = eqn.primitive.bind(*vals, **eqn.primitive.get_bind_params(eqn.params))
        outs = outs if eqn.primitive.multiple_results else [outs]
        return outs, [None] * len(outs)

    def adapted_eqn(self, eqn: Any, invals: list, inviews: list, adapters: dict) -> tuple:
        name = eqn.primitive.name
        if name in PASS and len(invals) == 1:
            out = eqn.primitive.bind(*invals, **eqn.params)
            return [out], [inviews[0]]
        if name == "transpose":
            view = inviews[0]
            out = eqn.primitive.bind(*invals, **eqn.params)
            return [out], [View(view.path, tuple(view.axes[p] for p in eqn.params["permutation"]))]
        if name == "dot_general":
            out = self.dot_general(eqn, invals, inviews, adapters)
            if out is not None:
                return [out], [None]
        if name == "gather":
            out = self.gather(eqn, invals, inviews, adapters)
            if out is not None:
                return [out], [None]
        if name in CALLS:
            closed = eqn.params["jaxpr"]
            return self.run(closed.jaxpr, closed.consts, invals, inviews, adapters), [None] * len(
                eqn.outvars
            )
        if name in REMAT:
            return self.remat(eqn, invals, inviews, adapters), [None] * len(eqn.outvars)
        if name == "scan":
            return self.scan(eqn, invals, inviews, adapters), [None] * len(eqn.outvars)
        if name == "cond":
            return self.cond(eqn, invals, inviews, adapters), [None] * len(eqn.outvars)
        if name == "while":
            return self.while_loop(eqn, invals, inviews, adapters), [None] * len(eqn.outvars)
        return self.bind_merged(eqn, invals, inviews, adapters)

    # -- contractions --------------------------------------------------------------------
    def dot_general(self, eqn: Any, invals: list, inviews: list, adapters: dict) -> Any:
        if inviews[0] is not None and inviews[1] is not None:
            return None
        side = 0 if inviews[0] is not None else 1
        view, x = inviews[side], invals[1 - side]
        (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
        kc, xc = (lc, rc) if side == 0 else (rc, lc)
        kb, xb = (lb, rb) if side == 0 else (rb, lb)
        cur = adapters[view.path]
        term = low_rank_dot(x, cur, view, tuple(kc), tuple(xc), tuple(kb), tuple(xb), side)
        if term is None:
            return None
        base = eqn.primitive.bind(*invals, **eqn.params)
        self.note(view.path, "factored (dot_general)")
        return base + term.astype(base.dtype)

    def gather(self, eqn: Any, invals: list, inviews: list, adapters: dict) -> Any:
        view = inviews[0]
        if view is None or any(v is not None for v in inviews[1:]):
            return None
        cur = adapters[view.path]
        dn = eqn.params["dimension_numbers"]
        table = invals[0]
        lay = cur.layout
        plain = view.axes == (0, 1) and lay.in_axes == (0,) and lay.out_axes == (1,)
        row = (
            dn.collapsed_slice_dims == (0,)
            and dn.start_index_map == (0,)
            and not dn.operand_batching_dims
            and tuple(eqn.params["slice_sizes"]) == (1, table.shape[1])
            and dn.offset_dims == (eqn.outvars[0].aval.ndim - 1,)
        )
        if not (plain and row and not lay.stack_axes):
            return None
        r = cur.a.shape[-1]
        params = dict(eqn.params, slice_sizes=(1, r))
        h = eqn.primitive.bind(cur.a.astype(table.dtype), invals[1], **params)
        base = eqn.primitive.bind(*invals, **eqn.params)
        self.note(view.path, "factored (gather)")
        low = (h * jnp.asarray(cur.scale, h.dtype)) @ cur.b.astype(h.dtype)
        return base + low.astype(base.dtype)

    # -- control flow --------------------------------------------------------------------
    def remat(self, eqn: Any, invals: list, inviews: list, adapters: dict) -> list:
        jaxpr = eqn.params["jaxpr"]
        fn = lambda *vals: self.run(jaxpr, [], list(vals), inviews, adapters)
        wrapped = jax.checkpoint(
            fn, prevent_cse=eqn.params["prevent_cse"], policy=eqn.params["policy"]
        )
        return list(wrapped(*invals))

    def cond(self, eqn: Any, invals: list, inviews: list, adapters: dict) -> list:
        index, ops, views = invals[0], invals[1:], inviews[1:]
        branches = [
            (lambda *vals, c=c: self.run(c.jaxpr, c.consts, list(vals), views, adapters))
            for c in eqn.params["branches"]
        ]
        return list(lax.switch(index, branches, *ops))

    def while_loop(self, eqn: Any, invals: list, inviews: list, adapters: dict) -> list:
        p = eqn.params
        nc, nb = p["cond_nconsts"], p["body_nconsts"]
        cc, bc, init = invals[:nc], invals[nc : nc + nb], invals[nc + nb :]
        cv, bv, iv = inviews[:nc], inviews[nc : nc + nb], inviews[nc + nb :]
        init = [
            v if w is None else self.merged(v, w, adapters, "a while loop carry")
            for v, w in zip(init, iv, strict=True)
        ]
        none = [None] * len(init)
        cj, bj = p["cond_jaxpr"], p["body_jaxpr"]
        cond_fn = lambda c: self.run(cj.jaxpr, cj.consts, cc + list(c), cv + none, adapters)[0]
        body_fn = lambda c: tuple(self.run(bj.jaxpr, bj.consts, bc + list(c), bv + none, adapters))
        return list(lax.while_loop(cond_fn, body_fn, tuple(init)))

    def scan(self, eqn: Any, invals: list, inviews: list, adapters: dict) -> list:
        p = eqn.params
        n_consts, n_carry = p["num_consts"], p["num_carry"]
        consts, carry, xs = (
            invals[:n_consts],
            invals[n_consts : n_consts + n_carry],
            invals[n_consts + n_carry :],
        )
        cviews, carry_views, xviews = (
            inviews[:n_consts],
            inviews[n_consts : n_consts + n_carry],
            inviews[n_consts + n_carry :],
        )
        carry = [
            v if w is None else self.merged(v, w, adapters, "a scan carry")
            for v, w in zip(carry, carry_views, strict=True)
        ]
        sliced: dict[str, Any] = {}
        extra: dict[str, Any] = {}
        body_views: list[View | None] = []
        for view in xviews:
            if view is None:
                body_views.append(None)
                continue
            cur = adapters[view.path]
            k = view.axes[0]
            if k not in cur.layout.stack_axes:
                body_views.append(None)
                continue
            pos = cur.layout.stack_axes.index(k)
            extra[view.path] = (cur.a, cur.b, pos)
            sliced[view.path] = (_without_axis(cur.layout, k), cur.scale)
            body_views.append(View(view.path, tuple(a - (a > k) for a in view.axes[1:])))
        xs = [
            self.merged(x, w, adapters, "a scan over a non-stack axis")
            if w is not None and v is None
            else x
            for x, w, v in zip(xs, xviews, body_views, strict=True)
        ]
        paths = sorted(extra)
        factors = [
            (jnp.moveaxis(extra[q][0], extra[q][2], 0), jnp.moveaxis(extra[q][1], extra[q][2], 0))
            for q in paths
        ]
        closed = p["jaxpr"]

        def body(c, step):
            x_vals, fac = step
            inner = dict(adapters)
            for q, (a, b) in zip(paths, fac, strict=True):
                layout, scale = sliced[q]
                inner[q] = Current(a, b, layout, scale)
            vals = list(consts) + list(c) + list(x_vals)
            views = list(cviews) + [None] * len(c) + body_views
            out = self.run(closed.jaxpr, closed.consts, vals, views, inner)
            return tuple(out[:n_carry]), tuple(out[n_carry:])

        final, ys = lax.scan(
            body,
            tuple(carry),
            (tuple(xs), tuple(factors)),
            length=p["length"],
            reverse=p["reverse"],
            unroll=p["unroll"],
        )
        return list(final) + list(ys)
