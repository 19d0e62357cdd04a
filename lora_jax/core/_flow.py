"""Control flow in the contraction rewrite: `remat`, `scan`, `cond` and `while` re-run
with the interpreter inside, so a kernel used in a loop body or a rematerialised block is
still served factored (a kernel scanned over its stack axis gets its factors sliced the
same way). Functions of the `Interpreter` (`lora_jax.core._rewrite`) and one equation."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from lora_jax.core._packed import is_packed, packed_or_pending, unpack
from lora_jax.core._views import View, without_axis

__all__ = ["cond", "remat", "scan", "while_loop"]


def remat(interp: Any, eqn: Any, invals: list, inviews: list, adapters: dict) -> list:
    jaxpr = eqn.params["jaxpr"]
    fn = lambda *vals: interp.run(jaxpr, [], list(vals), inviews, adapters)
    wrapped = jax.checkpoint(fn, prevent_cse=eqn.params["prevent_cse"], policy=eqn.params["policy"])
    return list(wrapped(*invals))


def cond(interp: Any, eqn: Any, invals: list, inviews: list, adapters: dict) -> list:
    index, ops, views = invals[0], invals[1:], inviews[1:]
    branches = [
        (lambda *vals, c=c: interp.run(c.jaxpr, c.consts, list(vals), views, adapters))
        for c in eqn.params["branches"]
    ]
    return list(lax.switch(index, branches, *ops))


def while_loop(interp: Any, eqn: Any, invals: list, inviews: list, adapters: dict) -> list:
    p = eqn.params
    nc, nb = p["cond_nconsts"], p["body_nconsts"]
    cc, bc, init = invals[:nc], invals[nc : nc + nb], invals[nc + nb :]
    cv, bv, iv = inviews[:nc], inviews[nc : nc + nb], inviews[nc + nb :]
    init = [
        v if w is None else interp.merged(v, w, adapters, "a while loop carry")
        for v, w in zip(init, iv, strict=True)
    ]
    none = [None] * len(init)
    cj, bj = p["cond_jaxpr"], p["body_jaxpr"]
    key = interp.scope_key()

    def cond_fn(c: tuple) -> Any:
        return interp.run(cj.jaxpr, cj.consts, cc + list(c[0]), cv + none, adapters)[0]

    def body_fn(c: tuple) -> tuple:
        vals, k = c
        step, k = (None, None) if k is None else tuple(jax.random.split(k))
        with interp.keyed(step):
            out = interp.run(bj.jaxpr, bj.consts, bc + list(vals), bv + none, adapters)
        return tuple(out), k

    final, _ = lax.while_loop(cond_fn, body_fn, (tuple(init), key))
    return list(final)


def scan(interp: Any, eqn: Any, invals: list, inviews: list, adapters: dict) -> list:
    p = eqn.params
    n_consts, n_carry = p["num_consts"], p["num_carry"]
    consts, carry = invals[:n_consts], invals[n_consts : n_consts + n_carry]
    xs = invals[n_consts + n_carry :]
    cviews, carry_views = inviews[:n_consts], inviews[n_consts : n_consts + n_carry]
    xviews = inviews[n_consts + n_carry :]
    carry = [
        v if w is None else interp.merged(v, w, adapters, "a scan carry")
        for v, w in zip(carry, carry_views, strict=True)
    ]
    sliced: dict[str, Any] = {}
    factors: dict[str, tuple] = {}
    body_views: list[View | None] = []
    for view in xviews:
        cur = None if view is None else adapters[view.path]
        if cur is None or view.axes[0] not in cur.layout.stack_axes:
            body_views.append(None)
            continue
        k = view.axes[0]
        pos = cur.layout.stack_axes.index(k)
        front = lambda x, pos=pos: None if x is None else jnp.moveaxis(x, pos, 0)
        factors[view.path] = tuple(front(x) for x in (cur.a, cur.b, cur.magnitude, cur.bias))
        sliced[view.path] = dataclasses.replace(cur, layout=without_axis(cur.layout, k))
        body_views.append(View(view.path, tuple(a - (a > k) for a in view.axes[1:])))
    xs = [
        interp.merged(x, w, adapters, "a scan over a non-stack axis")
        if w is not None and v is None
        else x
        for x, w, v in zip(xs, xviews, body_views, strict=True)
    ]
    xs, rebuilds = _scannable(xs)
    paths = sorted(factors)
    key = interp.scope_key()
    keys = None if key is None else jax.random.split(key, p["length"])
    closed = p["jaxpr"]

    def body(c: tuple, step: tuple) -> tuple:
        x_vals, fac, k = step
        x_vals = [x if r is None else r(x) for x, r in zip(x_vals, rebuilds, strict=True)]
        inner = dict(adapters)
        for q, (a, b, m, bias) in zip(paths, fac, strict=True):
            inner[q] = dataclasses.replace(sliced[q], a=a, b=b, magnitude=m, bias=bias)
        vals = list(consts) + list(c) + list(x_vals)
        views = list(cviews) + [None] * len(c) + body_views
        with interp.keyed(k):
            out = interp.run(closed.jaxpr, closed.consts, vals, views, inner)
        return tuple(out[:n_carry]), tuple(out[n_carry:])

    final, ys = lax.scan(  # type: ignore[var-annotated]
        body,
        tuple(carry),
        (tuple(xs), tuple(factors[q] for q in paths), keys),
        length=p["length"],
        reverse=p["reverse"],
        unroll=p["unroll"],
    )
    return list(final) + list(ys)


def _scannable(xs: list) -> tuple[list, list]:
    """A scan's inputs with each packed kernel as the arrays it is stored in (sliced per
    iteration like any input, rebuilt in the body), so a scanned layer unpacks only its
    own slice; a kernel that cannot be sliced so is unpacked before the loop."""
    out, rebuilds = [], []
    for x in xs:
        found = x.scan_parts() if is_packed(x) else None
        if found is not None:
            out.append(found[0])
            rebuilds.append(found[1])
        else:
            out.append(unpack(x) if packed_or_pending(x) else x)
            rebuilds.append(None)
    return out, rebuilds
