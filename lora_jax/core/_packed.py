"""Packed kernels: base kernels stored in another form (a quantized kernel) and unpacked to
float only where the program uses them.

A packed value is any object whose class sets ``lora_jax_packed = True`` and gives
``shape``, ``dtype``, ``ndim``, ``dequantize()`` (the float kernel), ``astype(dtype)`` (the
same storage, unpacked to `dtype`), ``slice_axis(axis, start, size)`` and
``squeeze(axes)`` (the stored form cut or squeezed along an axis it is not grouped on, or
None), and ``scan_parts()`` (``(parts, rebuild)``: arrays with the leading axis first, and
the function that makes the packed value of one slice of them; or None), ``describe()``
(how it is stored, as JSON) and ``with_specs(spec)`` (a `PartitionSpec` per stored array
for a kernel sharded as `spec`). The framework code never imports the quantization
module: this protocol is the whole contract.

`Pending` is a packed kernel with shape operations queued on it (a transpose, a reshape):
the contraction rewrite carries it until an operation computes with it, then unpacks it
there (`computed`): once that operation's other operands exist, and again in the backward
pass when its cotangent arrives, so the float kernel is neither unpacked early nor kept.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = [
    "Pending",
    "computed",
    "follow",
    "has_packed",
    "is_packed",
    "packed_or_pending",
    "unpack",
    "unpack_tree",
]


def is_packed(x: Any) -> bool:
    """Whether `x` is a packed kernel (see the module docstring)."""
    return getattr(type(x), "lora_jax_packed", False) is True


def has_packed(tree: Any) -> bool:
    """Whether any leaf of `tree` is a packed kernel (then the whole call goes through the
    contraction rewrite, which unpacks each kernel where it is used)."""
    return any(is_packed(x) for x in jax.tree.leaves(tree, is_leaf=is_packed))


def unpack(x: Any) -> Any:
    """The float value of a packed kernel or a `Pending` one; anything else as it is."""
    if isinstance(x, Pending):
        return x.value()
    return x.dequantize() if is_packed(x) else x


def unpack_tree(tree: Any) -> Any:
    """`tree` with every packed kernel replaced by its float value (the merged fallback)."""
    return jax.tree.map(unpack, tree, is_leaf=is_packed)


class _Op:
    """A queued equation, compared by identity (pytree metadata must be hashable)."""

    __slots__ = ("eqn",)

    def __init__(self, eqn: Any):
        self.eqn = eqn

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Op) and other.eqn is self.eqn

    def __hash__(self) -> int:
        return id(self.eqn)


@jax.tree_util.register_pytree_node_class
class Pending:
    """A packed kernel with unary shape equations queued on it (each with its extra
    operands, such as a dynamic slice's start indices)."""

    def __init__(self, packed: Any, ops: tuple = (), operands: tuple = ()):
        self.packed, self.ops, self.operands = packed, ops, operands

    def tree_flatten(self) -> tuple:
        return (self.packed, self.operands), self.ops

    @classmethod
    def tree_unflatten(cls, ops: tuple, children: tuple) -> Pending:
        return cls(children[0], ops, tuple(children[1]))

    def then(self, eqn: Any, extra: list) -> Pending:
        return Pending(self.packed, (*self.ops, _Op(eqn)), (*self.operands, *extra))

    def value(self) -> Any:
        """The float value: unpacked, then every queued equation applied."""
        w, k = self.packed.dequantize(), 0
        for op in self.ops:
            n = len(op.eqn.invars) - 1
            params = op.eqn.primitive.get_bind_params(op.eqn.params)
            w = op.eqn.primitive.bind(w, *self.operands[k : k + n], **params)
            k += n
        return w


def packed_or_pending(x: Any) -> bool:
    """Whether `x` is a packed kernel, possibly with shape equations queued on it."""
    return is_packed(x) or isinstance(x, Pending)


# Unary shape equations a packed kernel follows without being unpacked.
_LAZY = (
    "convert_element_type",
    "copy",
    "copy_p",
    "transpose",
    "reshape",
    "squeeze",
    "slice",
    "dynamic_slice",
    "expand_dims",
    "broadcast_in_dim",
)


def _cut(x: Any, eqn: Any, invals: list) -> Any:
    """A slice of a packed kernel in its stored form, or None (a strided slice, a cut
    along the axis it is grouped on)."""
    shape = tuple(x.shape)
    if eqn.primitive.name == "slice":
        if eqn.params.get("strides") is not None:
            return None
        starts = eqn.params["start_indices"]
        sizes = [hi - lo for lo, hi in zip(starts, eqn.params["limit_indices"], strict=True)]
    else:
        starts, sizes = invals[1:], list(eqn.params["slice_sizes"])
    for axis, (start, size) in enumerate(zip(starts, sizes, strict=True)):
        if size != shape[axis]:
            x = x.slice_axis(axis, start, size)
            if x is None:
                return None
    return x


def follow(eqn: Any, invals: list) -> Any:
    """The result of a shape equation on a packed kernel, still packed (cast, squeezed or
    cut in its stored form where it can be, else with the equation queued), or None when
    the equation computes with the kernel."""
    x = invals[0]
    name = eqn.primitive.name
    if name not in _LAZY or not packed_or_pending(x):
        return None
    if any(packed_or_pending(v) for v in invals[1:]):
        return None
    if is_packed(x):
        found = None
        if name == "convert_element_type":
            found = x.astype(eqn.params["new_dtype"])
        elif name in ("copy", "copy_p"):
            found = x
        elif name == "squeeze":
            found = x.squeeze(tuple(eqn.params["dimensions"]))
        elif name in ("slice", "dynamic_slice"):
            found = _cut(x, eqn, invals)
        if found is not None:
            return found
    pending = x if isinstance(x, Pending) else Pending(x)
    return pending.then(eqn, list(invals[1:]))


# Primitives linear in their other operands once the packed kernel is fixed: their
# backward pass needs only the kernel, not the (activation-sized) other operands.
LINEAR = ("dot_general", "conv_general_dilated")


def _tie(p: list, o: Any) -> list:
    """`p` made to depend on a value of `o` (an activation or a cotangent): a zero taken
    from one of its elements (0 if that element is not finite) is added to each array of
    `p`. XLA's CPU pipeline drops
    optimization barriers before it schedules, and would then unpack every layer's kernel
    at the start of the step and keep them; a data dependence it cannot drop keeps each
    unpack next to its use (measured: 8 unrolled 1024 x 1024 nf4 layers, 33 MiB of
    temporaries without, 5 MiB with, whatever the number of layers)."""
    leaves = [x for x in jax.tree.leaves(o) if jnp.issubdtype(x.dtype, jnp.inexact)]
    if not leaves:
        return p
    first = jnp.ravel(leaves[0])[:1].sum()
    zero = jnp.where(jnp.isfinite(first), first * 0, 0).astype(jnp.float32)
    return jax.tree.map(lambda x: x + zero.astype(x.dtype), p)


def _zero_cotangent(x: Any) -> Any:
    if jnp.issubdtype(x.dtype, jnp.inexact):
        return jnp.zeros_like(x)
    return np.zeros(np.shape(x), jax.dtypes.float0)


def computed(bind: Callable[..., Any], invals: list, name: str = "") -> Any:
    """``bind(*values)`` with packed operands unpacked there and nowhere else.

    The unpacking waits for the equation's other operands (`_tie`, and an optimization
    barrier), so XLA cannot unpack every layer's kernel at the start of the step; the backward pass
    unpacks it again when the cotangent arrives (a custom VJP), so the float kernel is
    never kept from the forward pass. For a contraction (`LINEAR`) the backward pass needs
    only the kernel; otherwise the other operands are kept and differentiated through.
    """
    where = [packed_or_pending(v) for v in invals]
    if not any(where):
        return bind(*invals)
    packed = [v for v, w in zip(invals, where, strict=True) if w]
    others = [v for v, w in zip(invals, where, strict=True) if not w]
    shapes = [jax.ShapeDtypeStruct(np.shape(v), v.dtype) for v in others]
    linear = name in LINEAR and all(jnp.issubdtype(s.dtype, jnp.inexact) for s in shapes)

    def value(kernels: list, rest: list) -> Any:
        k, r = iter(kernels), iter(rest)
        return bind(*(next(k) if w else next(r) for w in where))

    @jax.custom_vjp
    def use(p: list, o: list) -> Any:
        p, o = lax.optimization_barrier((_tie(p, o), o))
        return value([unpack(v) for v in p], o)

    def fwd(p: list, o: list) -> tuple:
        return use(p, o), (p, None if linear else o)

    def bwd(res: tuple, g: Any) -> tuple:
        p, o = res
        p, g = lax.optimization_barrier((_tie(p, g), g))  # unpack when the cotangent is here
        kernels = [unpack(v) for v in p]
        if linear:
            grads = jax.linear_transpose(lambda *o_: value(kernels, list(o_)), *shapes)(g)
        else:
            grads = jax.vjp(lambda *o_: value(kernels, list(o_)), *o)[1](g)
        return jax.tree.map(_zero_cotangent, p), list(grads)

    use.defvjp(fwd, bwd)
    return use(packed, others)
