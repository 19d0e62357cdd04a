"""Factored LoRA wherever a contraction uses an adapted kernel, in any JAX code.

`rewrite` (`lora_jax.core._use`) traces a function of a params tree to a jaxpr and the
`Interpreter` evaluates it again, following each adapted kernel through casts, copies,
transposes and reshapes (a `View`). Where the kernel meets a ``dot_general`` (``@``,
``jnp.dot``, ``jnp.einsum``...), a ``ragged_dot_general`` (grouped matmul over experts) or
a ``conv_general_dilated``, the equation runs unchanged on the base kernel and
``s·((dropout(x)·a)·b)`` is added, contracted from the dimension numbers (either operand;
stack axes batched or free); a row ``gather`` of a 2-D table (an embedding lookup) adds
``s·a[ids]@b``. It descends into ``jit``, ``scan``, ``remat``, ``cond``, ``while``
(`lora_jax.core._flow`) and the primal program of ``custom_jvp``/``custom_vjp`` functions.
Any other use (an elementwise op, a reshape that mixes inputs with outputs) gets the
merged kernel ``W + s·a@b`` for that use alone, and the reason is recorded. It sees only
the traced program, so custom Flax modules and plain functions are served alike, and the
model's code is untouched.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
from jax.extend.core import Literal

from lora_jax.core._contract import low_rank_conv, low_rank_dot, low_rank_ragged
from lora_jax.core._decomposed import decomposed_conv, decomposed_dot, finish
from lora_jax.core._flow import cond, remat, scan, while_loop
from lora_jax.core._packed import computed, follow, packed_or_pending, unpack
from lora_jax.core._views import Current, View, reshaped, sliced

__all__ = ["CALLS", "CUSTOM", "PASS", "REMAT", "Current", "Interpreter", "View"]

# Primitives by what the rewrite does with a kernel flowing into them: follow it (one operand,
# same value up to dtype), descend into the sub-program of a call, of a remat, or of a
# custom-derivative function (its primal program: the custom rule is for the base alone).
PASS = ("convert_element_type", "copy", "copy_p", "reduce_precision", "optimization_barrier")
CALLS = ("jit", "pjit", "closed_call", "core_call")
REMAT = ("remat2", "checkpoint", "remat")
CUSTOM = ("custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr")
FLOWS = ("scan", "cond", "while")


class Interpreter:
    """Evaluates a jaxpr with `View`s on the values that are (views of) adapted kernels.

    `routes` collects, per adapter path, how each use was served: ``"factored (...)"`` or
    ``"merged (...)"``. `key` is the LoRA dropout stream (None: no dropout).
    """

    def __init__(self, routes: dict[str, set[str]], key: Any = None):
        self.routes = routes
        self.key = key
        self.uses = 0

    def note(self, cur: Current, how: str) -> None:
        self.routes.setdefault(cur.origin, set()).add(how)

    # -- dropout keys --------------------------------------------------------------------
    def scope_key(self) -> Any:
        """A fresh key for a sub-scope (a loop's iterations), or None without dropout."""
        if self.key is None:
            return None
        self.uses += 1
        return jax.random.fold_in(self.key, self.uses)

    @contextlib.contextmanager
    def keyed(self, key: Any) -> Iterator[None]:
        outer, self.key = self.key, key
        try:
            yield
        finally:
            self.key = outer

    def dropped(self, x: Any, cur: Current) -> Any:
        """Inverted LoRA dropout on the low-rank path's input."""
        if cur.rate <= 0.0 or self.key is None or not jnp.issubdtype(x.dtype, jnp.floating):
            return x
        keep = jax.random.bernoulli(self.scope_key(), 1.0 - cur.rate, x.shape)
        return jnp.where(keep, x / (1.0 - cur.rate), jnp.zeros_like(x))

    # -- the evaluation loop -------------------------------------------------------------
    def run(
        self,
        jaxpr: Any,
        consts: list,
        args: list,
        views: list,
        adapters: dict,
        boundary: bool = True,
    ) -> list:
        """The jaxpr's outputs; a packed kernel among them is unpacked at a `boundary` (a
        loop body, a branch, the function's result), passed on as it is otherwise."""
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
            if any(inviews) or any(packed_or_pending(v) for v in invals):
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
            if view is not None:
                val = self.merged(val, view, adapters, "output")
            elif boundary and packed_or_pending(val):
                val = unpack(val)
            results.append(val)
        return results

    def merged(self, value: Any, view: View, adapters: dict, why: str) -> Any:
        cur = adapters[view.path]
        self.note(cur, f"merged (used by {why})")
        return cur.merged(unpack(value), view, why)

    def bind(self, eqn: Any, invals: list) -> Any:
        """The equation on these values: a shape equation on a packed kernel keeps it packed
        (`follow`); any other use unpacks it there, under `jax.checkpoint` (`computed`)."""
        lazy = follow(eqn, invals)
        if lazy is not None:
            return [lazy] if eqn.primitive.multiple_results else lazy
        params = eqn.primitive.get_bind_params(eqn.params)
        bind = lambda *vals: eqn.primitive.bind(*vals, **params)
        return computed(bind, invals, eqn.primitive.name)

    def bind_merged(self, eqn: Any, invals: list, inviews: list, adapters: dict) -> tuple:
        name = eqn.primitive.name
        vals = [
            v if w is None else self.merged(v, w, adapters, name)
            for v, w in zip(invals, inviews, strict=True)
        ]
        outs = self.bind(eqn, vals)
        outs = outs if eqn.primitive.multiple_results else [outs]
        return outs, [None] * len(outs)

    def adapted_eqn(self, eqn: Any, invals: list, inviews: list, adapters: dict) -> tuple:
        name = eqn.primitive.name
        view = inviews[0]
        if not any(inviews):  # a packed kernel without an adapter
            if name in CALLS or name in CUSTOM or name in REMAT or name in FLOWS:
                return self.descend(eqn, invals, inviews, adapters), [None] * len(eqn.outvars)
            return self.bind_merged(eqn, invals, inviews, adapters)
        if name in PASS and len(invals) == 1:
            return [self.bind(eqn, invals)], [view]
        if name == "transpose":
            out = self.bind(eqn, invals)
            return [out], [View(view.path, tuple(view.axes[p] for p in eqn.params["permutation"]))]
        if name in ("reshape", "squeeze") and len(invals) == 1 and view is not None:
            found = self.reshape(eqn, invals[0], view, adapters)
            if found is not None:
                return found
        if name in ("slice", "dynamic_slice") and view is not None and not any(inviews[1:]):
            starts = invals[1:] if name == "dynamic_slice" else None
            cut = sliced(adapters[view.path], view, invals[0].shape, eqn.params, starts)
            if cut is not None:
                return self.derived(eqn, invals, view, cut, adapters)
        contraction = {
            "dot_general": self.dot_general,
            "gather": self.gather,
            "ragged_dot_general": self.ragged_dot,
            "conv_general_dilated": self.conv,
        }.get(name)
        if contraction is not None:
            out = contraction(eqn, invals, inviews, adapters)
            if out is not None:
                return [out], [None]
        if name in CALLS or name in CUSTOM or name in REMAT or name in FLOWS:
            return self.descend(eqn, invals, inviews, adapters), [None] * len(eqn.outvars)
        return self.bind_merged(eqn, invals, inviews, adapters)

    def descend(self, eqn: Any, invals: list, inviews: list, adapters: dict) -> list:
        """A call, a custom-derivative function or control flow, run with the interpreter
        inside."""
        name = eqn.primitive.name
        if name in CALLS or name in CUSTOM:
            p = eqn.params
            closed = p.get("jaxpr") or p.get("call_jaxpr") or p["fun_jaxpr"]
            outs = self.run(closed.jaxpr, closed.consts, invals, inviews, adapters, False)
            if name in CUSTOM:
                for path in {v.path for v in inviews if v is not None}:
                    self.note(
                        adapters[path], f"inside {name} (differentiated by JAX, not its rule)"
                    )
            return outs
        flow = {"remat": remat, "scan": scan, "cond": cond, "while": while_loop}
        return flow["remat" if name in REMAT else name](self, eqn, invals, inviews, adapters)

    # -- views -----------------------------------------------------------------------------
    def reshape(self, eqn: Any, value: Any, view: View, adapters: dict) -> tuple | None:
        if eqn.primitive.name == "reshape" and eqn.params.get("dimensions") is not None:
            return None
        old, new = tuple(value.shape), tuple(eqn.outvars[0].aval.shape)
        cur = reshaped(adapters[view.path], view, old, new)
        if cur is None:
            return None
        return self.derived(eqn, [value], View(view.path, tuple(range(len(new)))), cur, adapters)

    def derived(self, eqn: Any, invals: list, view: View, cur: Current, adapters: dict) -> tuple:
        """The equation's value, viewing a kernel-shaped value with its own adapter `cur`
        (the factors reshaped or cut as the kernel was), axes as `view` numbers them."""
        key = f"{view.path.split('#')[0]}#{len(adapters)}"
        adapters[key] = cur
        out = self.bind(eqn, invals)
        return [out], [View(key, view.axes)]

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
        dims = tuple(kc), tuple(xc), tuple(kb), tuple(xb)
        if cur.magnitude is not None or cur.bias is not None:
            return decomposed_dot(self, eqn, invals, side, cur, view, dims)
        x = self.dropped(x, cur)
        term = low_rank_dot(x, cur, view, *dims, side)
        return self.added(eqn, invals, cur, term, "dot_general")

    def added(self, eqn: Any, invals: list, cur: Current, term: Any, how: str) -> Any:
        if term is None:
            return None
        base = self.bind(eqn, invals)
        self.note(cur, f"factored ({how})")
        return base + term.astype(base.dtype)

    def ragged_dot(self, eqn: Any, invals: list, inviews: list, adapters: dict) -> Any:
        if inviews[0] is not None or inviews[1] is None or inviews[2] is not None:
            return None
        cur = adapters[inviews[1].path]
        if cur.magnitude is not None or cur.bias is not None:
            return None  # merged (DoRA) or refused (lora_bias): PEFT has neither for experts
        x = self.dropped(invals[0], cur)
        term = low_rank_ragged(x, cur, inviews[1], invals[2], eqn.params)
        return self.added(eqn, invals, cur, term, "ragged_dot")

    def conv(self, eqn: Any, invals: list, inviews: list, adapters: dict) -> Any:
        if inviews[0] is not None or inviews[1] is None:
            return None
        cur = adapters[inviews[1].path]
        if cur.magnitude is not None or cur.bias is not None:
            return decomposed_conv(self, eqn, invals, cur, inviews[1])
        x = self.dropped(invals[0], cur)
        term = low_rank_conv(x, cur, inviews[1], eqn.params)
        return self.added(eqn, invals, cur, term, "conv")

    def gather(self, eqn: Any, invals: list, inviews: list, adapters: dict) -> Any:
        view = inviews[0]
        if view is None or any(v is not None for v in inviews[1:]):
            return None
        cur = adapters[view.path]
        dn = eqn.params["dimension_numbers"]
        table, ids = invals
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
        if cur.mixed:
            rows = _per_example(cur, ids)
            h = cur.a.astype(table.dtype)[rows, ids[..., 0]]
            h = h * cur.gains.astype(h.dtype).reshape(-1, *([1] * (h.ndim - 1)))
            b = jnp.take(cur.b, cur.rows, axis=0).astype(h.dtype)
            low = jnp.einsum("e...r,ero->e...o", h, b)
            return self.added(eqn, invals, cur, low, "gather")
        r = cur.a.shape[-1]
        params = dict(eqn.params, slice_sizes=(1, r))
        h = eqn.primitive.bind(cur.a.astype(table.dtype), ids, **params)
        low = (h * jnp.asarray(cur.scale, h.dtype)) @ cur.b.astype(h.dtype)
        kernel = (table, view)
        return finish(self, eqn, invals, 1, ids, cur, low, lambda v: v, kernel, "gather")


def _per_example(cur: Current, ids: Any) -> Any:
    """A mixed batch's adapter per example, shaped to index alongside `ids` (examples
    first)."""
    n = cur.rows.shape[0]
    if ids.ndim < 2 or ids.shape[0] != n:
        raise ValueError(
            f"{cur.origin}: a row lookup reads this table with ids of shape "
            f"{tuple(ids.shape[:-1])}, but a mixed batch needs the example axis ({n} "
            f"examples) first."
        )
    return cur.rows.reshape(n, *([1] * (ids.ndim - 2)))
