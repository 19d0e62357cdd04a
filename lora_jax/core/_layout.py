"""Kernel layouts: which axes of a parameter are inputs, outputs or stacked layers.

A 2-D kernel needs nothing but its shape. For more axes the model has to tell
(`lora_jax.infer_layouts`), or the user writes a `Layout` by hand.
"""

from __future__ import annotations

import dataclasses
import math

__all__ = ["Layout"]

KINDS = ("matrix", "dense", "einsum", "embed", "conv")


@dataclasses.dataclass(frozen=True)
class Layout:
    """How an adapter's factors map onto a kernel's axes.

    The adapter of a kernel is ``a`` of shape ``(*stack, *in, rank)`` and ``b`` of shape
    ``(*stack, rank, *out)``, where ``stack``, ``in`` and ``out`` are the sizes of the
    kernel's `stack_axes`, `in_axes` and `out_axes` (in that order). The update of the
    kernel is ``scale * a @ b``, moved back to the kernel's axis order.

    Attributes:
        kind: the Flax layer that uses the kernel: ``"dense"`` (`nn.Dense`,
            `nn.DenseGeneral`), ``"einsum"``, ``"embed"``, ``"conv"``, or ``"matrix"``
            when unknown (a 2-D leaf seen without `infer_layouts`).
        in_axes: kernel axes contracted with the layer input (for a conv, the window
            axes and the input-feature axis; for an embedding table, the vocabulary).
        out_axes: kernel axes that appear in the layer output.
        stack_axes: leading axes added by `nn.scan`/`nn.vmap` (one kernel per layer).

    Example:
        >>> import lora_jax as lj
        >>> q = lj.Layout("dense", in_axes=(0,), out_axes=(1, 2))  # (d_model, heads, head_dim)
        >>> q.factor_shapes((512, 8, 64), rank=4)
        ((512, 4), (4, 8, 64))
    """

    kind: str
    in_axes: tuple[int, ...]
    out_axes: tuple[int, ...]
    stack_axes: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"Layout `kind` must be one of {KINDS}; found {self.kind!r}.")
        axes = self.stack_axes + self.in_axes + self.out_axes
        if sorted(axes) != list(range(len(axes))) or not self.in_axes or not self.out_axes:
            raise ValueError(
                f"Layout axes must split 0..ndim-1 into non-empty in/out axes; found "
                f"stack={self.stack_axes}, in={self.in_axes}, out={self.out_axes}."
            )

    @property
    def ndim(self) -> int:
        """Number of kernel axes."""
        return len(self.stack_axes) + len(self.in_axes) + len(self.out_axes)

    @property
    def perm(self) -> tuple[int, ...]:
        """Kernel axes in factor order: ``(*stack, *in, *out)``."""
        return self.stack_axes + self.in_axes + self.out_axes

    def sizes(self, shape: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
        """Splits a kernel shape into its (stack, in, out) sizes.

        Args:
            shape: the kernel's shape.

        Returns:
            Three tuples of sizes: stack, in, out.
        """
        pick = lambda axes: tuple(shape[i] for i in axes)
        return pick(self.stack_axes), pick(self.in_axes), pick(self.out_axes)

    def factor_shapes(self, shape: tuple[int, ...], rank: int) -> tuple[tuple[int, ...], ...]:
        """The shapes of ``a`` and ``b`` for a kernel of `shape`.

        Args:
            shape: the kernel's shape.
            rank: the adapter rank.

        Returns:
            ``((*stack, *in, rank), (*stack, rank, *out))``.
        """
        stack, ins, outs = self.sizes(shape)
        return (*stack, *ins, rank), (*stack, rank, *outs)

    def max_rank(self, shape: tuple[int, ...]) -> int:
        """The largest useful rank: the smaller of the flattened input and output sizes.

        Args:
            shape: the kernel's shape.

        Returns:
            ``min(prod(in sizes), prod(out sizes))``.
        """
        _, ins, outs = self.sizes(shape)
        return min(math.prod(ins), math.prod(outs))

    def sliced(self, axis: int) -> Layout:
        """This layout with kernel `axis` moved from the in or out axes to the stack axes:
        one adapter per index along it (stacked projections: k and v, gate and up).

        Args:
            axis: a kernel axis in ``0..ndim-1``.

        Returns:
            The new `Layout`, same kind, stack axes sorted.

        Raises:
            ValueError: `axis` is out of range, already a stack axis, or the only input or
                only output axis (nothing would be left to contract or produce).

        Example:
            >>> import lora_jax as lj
            >>> kv = lj.Layout("einsum", in_axes=(1,), out_axes=(0, 2, 3))  # (2, d, h, k)
            >>> kv.sliced(0)
            Layout(kind='einsum', in_axes=(1,), out_axes=(2, 3), stack_axes=(0,))
        """
        if axis in self.stack_axes:
            raise ValueError(
                f"axis {axis} is already a stack axis of {self}: the kernel already has one "
                f"adapter per index along it."
            )
        for role, axes in (("input", self.in_axes), ("output", self.out_axes)):
            if axes == (axis,):
                raise ValueError(
                    f"axis {axis} is the only {role} axis of {self}; slicing it would leave "
                    f"nothing to {'contract' if role == 'input' else 'produce'}."
                )
        if axis not in self.perm:
            raise ValueError(f"axis {axis} is out of range for {self} (ndim={self.ndim}).")
        drop = lambda axes: tuple(a for a in axes if a != axis)
        stack = tuple(sorted((*self.stack_axes, axis)))
        return Layout(self.kind, drop(self.in_axes), drop(self.out_axes), stack)

    def restack(self, n_stack: int) -> Layout:
        """This layout with `n_stack` leading stack axes added (for a scanned kernel).

        Args:
            n_stack: how many leading axes to add.

        Returns:
            The shifted `Layout`.
        """
        shift = lambda axes: tuple(a + n_stack for a in axes)
        stack = tuple(range(n_stack)) + shift(self.stack_axes)
        return Layout(self.kind, shift(self.in_axes), shift(self.out_axes), stack)


def matrix_layout(ndim: int) -> Layout | None:
    """The default layout of a leaf seen without `infer_layouts`: only 2-D is unambiguous."""
    return Layout("matrix", (0,), (1,)) if ndim == 2 else None
