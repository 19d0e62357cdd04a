"""`LoraWeights`: the (a, b) pair of one adapted kernel with its scale and layout, and the
dense update it stands for."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from lora_jax.core._layout import Layout
from lora_jax.core._paths import close_matches, flatten

__all__ = ["LoraWeights", "delta"]  # and helpers for the package: see each docstring


@struct.dataclass
class LoraWeights:
    """The low-rank factors of one kernel, with everything needed to use them.

    A pytree node whose children are ``a`` and ``b`` (and, when present, ``magnitude`` and
    ``bias``): `jax.jit`, `jax.grad` and optax see those arrays and nothing else. The rest
    is static metadata, set once where the adapter is made (`lora_jax.split`,
    `lora_jax.nnx.add_lora`, `lora_jax.peft.import_adapter`) and carried everywhere after,
    so no function past `split` takes a config and a scale cannot disagree with the
    adapter it belongs to. Changing metadata changes the pytree structure (a new compile),
    never a traced value.

    Attributes:
        a: down-projection, shape ``(*stack, *in, rank)``.
        b: up-projection, shape ``(*stack, rank, *out)``; zeros at init.
        layout: which kernel axes `a` and `b` stand for (see `Layout`).
        scale: the multiplier s of the low-rank path: ``alpha / rank``, or
            ``alpha / sqrt(rank)`` with rsLoRA. For k adapters stacked by
            `lora_jax.multi.stack_adapters`, a tuple of k scales.
        dropout: LoRA dropout rate on the low-rank path's input, in [0, 1). It runs when the
            call is given the ``"lora_dropout"`` rng (see `lora_jax.lora_apply`).
        residual_norm: for an adapter whose base kernel was changed at creation (PiSSA:
            the base keeps ``W - s·a@b``), the Frobenius norm of that residual kernel, so
            applying the adapter to the original weights is caught (within 1% relative);
            None for adapters of an unchanged base.
        magnitude: DoRA's trainable magnitude, shape ``(*stack, *out)``: the layer's output
            is ``magnitude / ‖W + s·a@b‖ · (W x + s·(x a) b)`` per output feature, the norm
            taken over the input axes and treated as a constant in the backward pass (see
            `lora_jax.LoraConfig.use_dora`); None for plain LoRA.
        bias: PEFT's ``lora_bias``: a trainable bias of the up-projection, shape
            ``(*stack, *out)``, added as ``s·bias`` to the low-rank path; None without.

    Example:
        >>> import jax.numpy as jnp, lora_jax as lj
        >>> layout = lj.Layout("matrix", (0,), (1,))
        >>> w = lj.LoraWeights(jnp.ones((4, 2)), jnp.zeros((2, 3)), layout, scale=2.0)
        >>> w.rank, w.scale
        (2, 2.0)
    """

    a: Any
    b: Any
    layout: Layout = struct.field(pytree_node=False)
    scale: float | tuple[float, ...] = struct.field(pytree_node=False, default=1.0)
    dropout: float = struct.field(pytree_node=False, default=0.0)
    residual_norm: float | None = struct.field(pytree_node=False, default=None)
    magnitude: Any = None
    bias: Any = None

    def __post_init__(self) -> None:
        if not isinstance(self.layout, Layout):
            raise TypeError(
                f"LoraWeights `layout` must be a lj.Layout; found {type(self.layout).__name__}."
            )
        scales = self.scale if isinstance(self.scale, tuple) else (self.scale,)
        for s in scales:
            if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s):
                raise TypeError(
                    f"LoraWeights `scale` must be a finite float (or a tuple of them for "
                    f"stacked adapters); found {self.scale!r}."
                )
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoraWeights `dropout` must be in [0, 1); found {self.dropout!r}.")
        object.__setattr__(
            self,
            "scale",
            tuple(float(s) for s in scales) if isinstance(self.scale, tuple) else float(self.scale),
        )
        object.__setattr__(self, "dropout", float(self.dropout))

    @property
    def rank(self) -> int:
        """The adapter rank r (last axis of `a`)."""
        return int(self.a.shape[-1])


def delta(weights: LoraWeights, dtype: Any = None) -> jax.Array:
    """The dense kernel update ``weights.scale * a @ b``, in the kernel's own axis order.

    Only merge/unmerge and the merged path use this; training computes the product
    factored and never forms it.

    Args:
        weights: the adapter of one kernel (not a stacked one).
        dtype: dtype of the result; defaults to the adapters' dtype.

    Returns:
        An array with the kernel's shape.

    Raises:
        TypeError: `weights` holds k stacked adapters (a tuple of scales).

    Example:
        >>> import jax.numpy as jnp, lora_jax as lj
        >>> layout = lj.Layout("matrix", (0,), (1,))
        >>> w = lj.LoraWeights(jnp.ones((4, 1)), jnp.ones((1, 3)), layout, scale=0.5)
        >>> lj.core.delta(w).shape
        (4, 3)
    """
    if isinstance(weights.scale, tuple):
        raise TypeError(
            "delta takes one adapter; this LoraWeights stacks "
            f"{len(weights.scale)} (pick one with lj.multi.unstack_adapter)."
        )
    return scaled_delta(weights, weights.scale, dtype)


def scaled_delta(weights: LoraWeights, scale: float, dtype: Any = None) -> jax.Array:
    """``scale * a @ b`` in the kernel's axis order, for an explicit multiplier."""
    layout, a, b = weights.layout, weights.a, weights.b
    n_stack = len(layout.stack_axes)
    stack, ins, outs = a.shape[:n_stack], a.shape[n_stack:-1], b.shape[n_stack + 1 :]
    r = a.shape[-1]
    a3 = a.reshape(math.prod(stack), math.prod(ins), r)
    b3 = b.reshape(math.prod(stack), r, math.prod(outs))
    d = jnp.matmul(a3, b3, precision=jax.lax.Precision.HIGHEST) * scale
    d = d.reshape(*stack, *ins, *outs)
    inverse = [0] * layout.ndim
    for pos, axis in enumerate(layout.perm):
        inverse[axis] = pos
    d = jnp.transpose(d, inverse) if list(layout.perm) != list(range(layout.ndim)) else d
    return d.astype(dtype or a.dtype)


def kernel_shape(w: LoraWeights) -> tuple[int, ...]:
    """The shape of the base kernel an adapter belongs to (from a, b and the layout), also
    for k stacked adapters (an adapter axis after the stack axes, a tuple of k scales)."""
    lay = w.layout
    a_shape, b_shape = tuple(w.a.shape), tuple(w.b.shape)
    n_stack = len(lay.stack_axes)
    if isinstance(w.scale, tuple):  # drop the adapter axis
        a_shape = a_shape[:n_stack] + a_shape[n_stack + 1 :]
        b_shape = b_shape[:n_stack] + b_shape[n_stack + 1 :]
    sizes = dict(zip(lay.stack_axes, a_shape, strict=False))
    sizes.update(zip(lay.in_axes, a_shape[n_stack:-1], strict=False))
    sizes.update(zip(lay.out_axes, b_shape[n_stack + 1 :], strict=False))
    return tuple(int(sizes[i]) for i in range(lay.ndim))


def to_matrix(kernel: jax.Array, layout: Layout) -> jax.Array:
    """Views a kernel as ``(prod(stack), prod(in), prod(out))`` in factor order."""
    stack, ins, outs = layout.sizes(kernel.shape)
    moved = jnp.transpose(kernel, layout.perm)
    return moved.reshape(math.prod(stack), math.prod(ins), math.prod(outs))


def flatten_lora(lora: Any) -> dict[str, LoraWeights]:
    """`{path: LoraWeights}` for a lora tree; a TypeError for anything else in it."""
    flat = flatten(lora, is_leaf=lambda x: isinstance(x, LoraWeights))
    for path, leaf in flat.items():
        if not isinstance(leaf, LoraWeights):
            raise TypeError(
                f"`lora` must hold only LoraWeights (from lora_jax.split); found "
                f"{type(leaf).__name__} at {path!r}."
            )
    return flat


def flatten_loras(loras: Any) -> list[dict[str, LoraWeights]]:
    """`flatten_lora` of each adapter in a sequence; errors name the index (`loras[i]`)."""
    flats = []
    for i, lora in enumerate(loras):
        try:
            flats.append(flatten_lora(lora))
        except TypeError as err:
            raise TypeError(f"`loras[{i}]`: {err}") from None
    return flats


def check_fits(
    frozen_flat: dict[str, Any], adapters: dict[str, LoraWeights], *, residuals: bool = True
) -> None:
    """Raises a ValueError naming the path when an adapter does not fit its base kernel
    (and, with `residuals`, when a PiSSA adapter meets a kernel that is not its residual)."""
    paths = list(frozen_flat)
    for path, w in adapters.items():
        if path not in frozen_flat:
            near = ", ".join(close_matches(path, paths, 3))
            raise ValueError(
                f"`lora` has an adapter for {path!r}, which is not a parameter of `frozen`. "
                f"Closest parameters: {near}."
            )
        shape = tuple(getattr(frozen_flat[path], "shape", ()))
        if len(shape) != w.layout.ndim:
            raise ValueError(
                f"{path}: the adapter's layout is for a {w.layout.ndim}-D kernel but the "
                f"frozen parameter has shape {shape}."
            )
        want_a, want_b = w.layout.factor_shapes(shape, w.rank)
        if tuple(w.a.shape) != want_a or tuple(w.b.shape) != want_b:
            raise ValueError(
                f"{path}: adapter shapes a={tuple(w.a.shape)}, b={tuple(w.b.shape)} do not "
                f"fit the frozen kernel {shape}; expected a={want_a}, b={want_b}."
            )
        n = len(w.layout.stack_axes)
        want_v = want_b[:n] + want_b[n + 1 :]
        for name in ("magnitude", "bias"):
            v = getattr(w, name)
            if v is not None and tuple(getattr(v, "shape", ())) != want_v:
                raise ValueError(
                    f"{path}: the adapter's {name} has shape {tuple(getattr(v, 'shape', ()))}; "
                    f"the kernel {shape} needs one value per output feature, {want_v}."
                )
    if residuals:
        check_residuals(frozen_flat, adapters)


def is_concrete(x: Any) -> bool:
    """True for an array whose values can be read now (not a tracer inside jit/grad)."""
    return not isinstance(x, jax.core.Tracer) and hasattr(x, "shape")


def check_residuals(frozen_flat: dict[str, Any], adapters: dict[str, LoraWeights]) -> None:
    """Raises a ValueError when an adapter made with a changed base (PiSSA) meets a kernel
    whose norm is not the residual's: the original weights given instead of the `frozen`
    that `split` returned. Only concrete kernels are checked (values under `jit` are not
    known); `lora_apply` on concrete inputs, `merge` and the training step's first call
    check them."""
    for path, w in adapters.items():
        kernel = frozen_flat.get(path)
        if w.residual_norm is None or kernel is None or not is_concrete(kernel):
            continue
        found = float(np.linalg.norm(np.asarray(kernel, np.float64).ravel()))
        want = w.residual_norm
        if abs(found - want) > 1e-2 * max(want, 1e-12):
            raise ValueError(
                f"{path}: this adapter was made with a residual init (init='pissa' or "
                f"'olora'), so its base is the residual "
                f"kernel W - s·a@b (norm {want:.6g}) that lj.split returned as `frozen`; the "
                f"kernel given has norm {found:.6g}. Pass the `frozen` from lj.split (or "
                f"lj.merge(frozen, lora) for plain weights), not the original variables."
            )


def _drop_axis(x: Any, axis: int) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(x.shape[:axis] + x.shape[axis + 1 :], x.dtype)


def unstacked_shapes(frozen_flat: dict[str, Any], stacked: Any) -> tuple[int, dict[str, Any]]:
    """The number k of stacked adapters, and ``{path: LoraWeights}`` of one adapter's shapes.

    Checks that every ``a`` and ``b`` has one adapter axis of the same size after its
    stack axes, and that the adapters fit `frozen` (`check_fits`).
    """
    flat = flatten_lora(stacked)
    sizes: dict[int, str] = {}
    views = {}
    for path, w in flat.items():
        layout = w.layout
        n_stack = len(layout.stack_axes)
        want_a, want_b = (n_stack + len(axes) + 2 for axes in (layout.in_axes, layout.out_axes))
        if w.a.ndim != want_a or w.b.ndim != want_b:
            raise ValueError(
                f"{path}: `stacked` must hold adapters from lj.multi.stack_adapters (an "
                f"adapter axis after the {n_stack} stack axes, so a has {want_a} axes and b "
                f"{want_b}); "
                f"found a={tuple(w.a.shape)}, b={tuple(w.b.shape)}."
            )
        k, kb = w.a.shape[n_stack], w.b.shape[n_stack]
        if k != kb:
            raise ValueError(f"{path}: a stacks {k} adapters but b stacks {kb}.")
        if sizes and k not in sizes:
            first_k, first_path = next(iter(sizes.items()))
            raise ValueError(
                f"{path}: {k} stacked adapters, but {first_k} at {first_path!r}; every a and b "
                f"must stack the same adapters."
            )
        sizes.setdefault(k, path)
        views[path] = LoraWeights(_drop_axis(w.a, n_stack), _drop_axis(w.b, n_stack), layout)
    check_fits(frozen_flat, views)
    return next(iter(sizes), 0), views
