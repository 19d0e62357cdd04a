"""`TokenRows`: new values for chosen rows of an embedding table (or of an output head),
PEFT's ``trainable_token_indices``; `select` makes them, `apply` puts them in.

Only the rows are trainable: `apply` writes them into a copy of the frozen table behind
`jax.lax.stop_gradient`, so a gradient reaches ``values`` exactly (the transpose of the
scatter gathers the cotangent's rows) and never the table; optax sees ``(n, dim)`` arrays.
"""

from __future__ import annotations

import collections
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from lora_jax.core._packed import is_packed
from lora_jax.core._paths import close_matches, flatten, nest, replace

__all__ = ["TokenRows", "apply", "select"]

# The table axis a leaf's rows lie along, by the leaf's name: nn.Embed's ``embedding``
# ``(vocab, dim)``, nn.Dense's ``kernel`` ``(dim, vocab)``.
_AXIS_BY_NAME = {"embedding": 0, "kernel": 1}


@struct.dataclass
class TokenRows:
    """New values for some rows of one 2-D table: a pytree whose only child is ``values``.

    Row ``indices[i]`` of the table (a column, for ``axis=1``) becomes ``values[i]``; the
    other rows stay frozen. ``indices`` and ``axis`` are static metadata (a new compile when
    they change), so `jax.grad` and optax see ``values`` alone: optimizer state is
    ``n * dim`` per moment, not ``vocab * dim``.

    Attributes:
        values: the rows, ``(n, dim)``, in the order of ``indices``.
        indices: the table indices (token ids) they replace: distinct ints >= 0, the
            caller's order kept.
        axis: the table axis the indices index: 0 for an embedding table ``(vocab, dim)``,
            1 for a Flax Dense head kernel ``(dim, vocab)``.

    Example:
        >>> import jax.numpy as jnp, lora_jax as lj
        >>> rows = lj.tokens.TokenRows(jnp.zeros((2, 4)), indices=[5, 1], axis=0)
        >>> rows.indices, rows.values.shape
        ((5, 1), (2, 4))
    """

    values: Any
    indices: tuple[int, ...] = struct.field(pytree_node=False)
    axis: int = struct.field(pytree_node=False, default=0)

    def __post_init__(self) -> None:
        object.__setattr__(self, "indices", _checked_indices(self.indices, "TokenRows"))
        if self.axis not in (0, 1) or isinstance(self.axis, bool):
            raise ValueError(
                f"TokenRows `axis` must be 0 (an embedding table (vocab, dim)) or 1 (a Dense "
                f"head kernel (dim, vocab)); found {self.axis!r}."
            )
        object.__setattr__(self, "axis", int(self.axis))


def _checked_indices(indices: Any, where: str) -> tuple[int, ...]:
    """`indices` as a tuple of distinct ints >= 0; a ValueError naming `where` otherwise."""
    if isinstance(indices, str | bytes) or not isinstance(indices, Sequence | np.ndarray):
        raise ValueError(f"{where}: token indices must be a list of ints; found {indices!r}.")
    found = list(indices.tolist() if isinstance(indices, np.ndarray) else indices)
    bad = [i for i in found if isinstance(i, bool) or not isinstance(i, int | np.integer)]
    if bad or not found:
        what = f"non-integers {bad}" if bad else "an empty list"
        raise ValueError(f"{where}: token indices must be a non-empty list of ints; found {what}.")
    negative = [int(i) for i in found if i < 0]
    if negative:
        raise ValueError(f"{where}: token indices must be >= 0; found {negative}.")
    twice = sorted(i for i, n in collections.Counter(int(i) for i in found).items() if n > 1)
    if twice:
        raise ValueError(f"{where}: token indices must be distinct; repeated: {twice}.")
    return tuple(int(i) for i in found)


def _leaf(flat: Mapping[str, Any], path: str) -> Any:
    if path not in flat:
        near = ", ".join(close_matches(path, list(flat), 3))
        raise ValueError(f"{path!r} is not a parameter of the tree; closest: {near}.")
    return flat[path]


def _table(flat: Mapping[str, Any], path: str, axis: int) -> tuple[int, int]:
    """``(vocab, dim)`` of the 2-D float table at `path` read along `axis`; a ValueError
    naming the path and what was found otherwise."""
    leaf = _leaf(flat, path)
    if is_packed(leaf):
        raise ValueError(
            f"{path}: a quantized kernel ({type(leaf).__name__}, lj.quant) cannot take token "
            "rows (not supported); keep it float: lj.quant.quantize leaves embedding tables "
            "float by default, and exclude= keeps an untied head float."
        )
    shape = tuple(getattr(leaf, "shape", ()))
    if len(shape) != 2 or not jnp.issubdtype(getattr(leaf, "dtype", int), jnp.floating):
        raise ValueError(
            f"{path}: token rows need a 2-D float table ((vocab, dim) or a Dense kernel "
            f"(dim, vocab)); found shape {shape}, dtype {getattr(leaf, 'dtype', None)}."
        )
    return shape[axis], shape[1 - axis]


def _check_range(path: str, indices: tuple[int, ...], vocab: int, axis: int) -> None:
    out = [i for i in indices if i >= vocab]
    if out:
        raise ValueError(
            f"{path}: token indices {out} are out of range for axis {axis} of size {vocab}."
        )


def _axis_of(path: str, axis: int | None) -> int:
    if axis is not None:
        if axis not in (0, 1) or isinstance(axis, bool):
            raise ValueError(f"`axis` must be 0, 1 or None; found {axis!r}.")
        return axis
    name = path.rsplit("/", 1)[-1]
    if name not in _AXIS_BY_NAME:
        raise ValueError(
            f"{path}: which axis holds the tokens cannot be told from the name {name!r} "
            "('embedding': axis 0, 'kernel': axis 1); pass axis=0 or axis=1."
        )
    return _AXIS_BY_NAME[name]


def select(
    params: Any,
    indices: Mapping[str, Sequence[int]],
    *,
    axis: int | None = None,
    dtype: Any = None,
) -> dict[str, Any]:
    """Trainable rows of the given tables, starting at their current values.

    Args:
        params: the (frozen) variables or an NNX state holding the tables.
        indices: ``{path: token indices}``, paths `/`-joined as everywhere in lora_jax
            (``"params/embed_tokens/embedding"``); the order of each list is kept.
        axis: the axis the indices index, for every path; None takes 0 for a leaf named
            ``embedding`` (``nn.Embed``, ``(vocab, dim)``) and 1 for one named ``kernel``
            (``nn.Dense`` head, ``(dim, vocab)``). A tied head reads the embedding table,
            so it needs no rows of its own; an untied head is its own path.
        dtype: dtype of the values; None keeps the table's (as PEFT does). A float32
            copy of a bfloat16 table's rows keeps small updates; `apply` casts back.

    Returns:
        ``{path: TokenRows}`` nested like the lora trees (``{"params": {...}}``), each
        ``values`` ``(n, dim)`` a copy of the table's rows.

    Raises:
        ValueError: a path that is not in `params` (with the closest ones), an empty or
            repeated index list, an index out of range or negative, a leaf that is not a
            2-D float table, a quantized kernel (`lj.quant`, not supported), or a leaf
            name that does not tell the axis when `axis` is None.

    Example:
        >>> import jax.numpy as jnp, lora_jax as lj
        >>> params = {"params": {"embed": {"embedding": jnp.arange(12.0).reshape(6, 2)}}}
        >>> rows = lj.tokens.select(params, {"params/embed/embedding": [4, 1]})
        >>> rows["params"]["embed"]["embedding"].values.tolist()
        [[8.0, 9.0], [2.0, 3.0]]
    """
    if not isinstance(indices, Mapping) or not indices:
        raise ValueError(f"`indices` must be a non-empty {{path: [ints]}} dict; found {indices!r}.")
    flat = flatten(params)
    out = {}
    for path, wanted in indices.items():
        _leaf(flat, path)
        ax = _axis_of(path, axis)
        vocab, _ = _table(flat, path, ax)
        idx = _checked_indices(wanted, path)
        _check_range(path, idx, vocab, ax)
        table = jnp.asarray(flat[path])
        values = jnp.take(table, jnp.asarray(idx), axis=ax)
        values = values if ax == 0 else values.T
        out[path] = TokenRows(values.astype(table.dtype if dtype is None else dtype), idx, ax)
    return nest(out)


def _put(table: Any, rows: TokenRows) -> jax.Array:
    """The table with the rows written in; no gradient reaches the table."""
    base = jax.lax.stop_gradient(jnp.asarray(table))
    values = jnp.asarray(rows.values).astype(base.dtype)
    idx = np.asarray(rows.indices)
    if rows.axis == 0:
        return base.at[idx].set(values, unique_indices=True)
    return base.at[:, idx].set(values.T, unique_indices=True)


def flat_rows(rows: Any, name: str = "rows") -> dict[str, TokenRows]:
    """``{path: TokenRows}`` of a rows tree; a TypeError naming the argument `name` for
    anything else in it."""
    flat = flatten(rows, is_leaf=lambda x: isinstance(x, TokenRows))
    bad = {p: type(x).__name__ for p, x in flat.items() if not isinstance(x, TokenRows)}
    if bad:
        raise TypeError(f"`{name}` must hold only TokenRows (from lj.tokens.select); found {bad}.")
    return flat


def apply(frozen: Any, rows: Any) -> Any:
    """`frozen` with the rows written into their tables: for training and for merging.

    A pure function, for use inside `jax.jit` and `jax.grad`:
    ``model.apply(lj.tokens.apply(frozen, rows), x)``, or with adapters
    ``lj.lora_apply(model.apply)(lj.tokens.apply(frozen, rows), lora, x)``. The table is
    read through `jax.lax.stop_gradient`, so no gradient is ever requested for it, and the
    gradient with respect to ``values`` is exact: the scatter's transpose gathers the rows
    of the table's cotangent. That cotangent is still formed once, ``(vocab, dim)``, by the
    model's own lookup or head (PEFT's ``index_copy`` does the same); the optimizer state is
    the rows' alone. Outside training the same call merges the rows for serving or export.

    Args:
        frozen: the base variables (or NNX state); left unchanged.
        rows: ``{path: TokenRows}`` as `select` makes them (possibly trained).

    Returns:
        A tree like `frozen` whose tables have the rows (cast to the table's dtype); other
        leaves are the same objects.

    Raises:
        ValueError: a path of `rows` that is not in `frozen`, not a 2-D float table, a
            quantized kernel, or whose shape does not take the rows (index out of range,
            ``values`` not ``(n, dim)``).
        TypeError: `rows` holds something other than `TokenRows`.

    Example:
        >>> import jax, jax.numpy as jnp, lora_jax as lj
        >>> params = {"params": {"embed": {"embedding": jnp.zeros((5, 2))}}}
        >>> rows = lj.tokens.select(params, {"params/embed/embedding": [3]})
        >>> lookup = lambda p, ids: p["params"]["embed"]["embedding"][ids]
        >>> loss = lambda rows: lookup(lj.tokens.apply(params, rows), jnp.array([3, 3, 0])).sum()
        >>> jax.grad(loss)(rows)["params"]["embed"]["embedding"].values.tolist()
        [[2.0, 2.0]]
    """
    chosen = flat_rows(rows)
    flat = flatten(frozen)
    new = {}
    for path, r in chosen.items():
        vocab, dim = _table(flat, path, r.axis)
        _check_range(path, r.indices, vocab, r.axis)
        want = (len(r.indices), dim)
        if tuple(jnp.shape(r.values)) != want:
            raise ValueError(
                f"{path}: TokenRows values must have shape (n, dim) = {want} for "
                f"{len(r.indices)} indices along axis {r.axis} of a table of shape "
                f"{tuple(flat[path].shape)}; found {tuple(jnp.shape(r.values))}."
            )
        new[path] = _put(flat[path], r)
    return replace(frozen, new)
