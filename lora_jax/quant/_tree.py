"""Quantizing the frozen base of a model: choose its kernels in a params tree, replace each
by a `QuantizedKernel`, and measure what that saved and cost."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from lora_jax.core._layout import Layout
from lora_jax.core._paths import close_matches, flatten, replace
from lora_jax.core._patterns import freeze_spec, matching
from lora_jax.quant._formats import FORMATS, group_problem
from lora_jax.quant._kernel import QuantizedKernel, dequantize, is_quantized, quantize_kernel

__all__ = ["dequantize_tree", "errors", "nbytes", "quantize"]  # and `grouped_axis` for loftq

Spec = str | list[str] | tuple[str, ...] | Callable[[str, Any], bool] | None

_quantize_jit = jax.jit(quantize_kernel, static_argnames=("format", "axis", "group_size", "double"))


def _kind(layouts: Mapping[str, Layout] | None, path: str) -> str:
    layout = (layouts or {}).get(path)
    return layout.kind if layout is not None else "matrix"


# Leaf names that are never a contraction's kernel, whatever their number of axes (the
# scales and biases of scanned norms and layers are 2-D).
NOT_KERNELS = ("bias", "scale", "embedding")


def _is_kernel(leaf: Any) -> bool:
    """A float leaf with at least 2 axes that is not quantized yet."""
    if is_quantized(leaf):
        return False
    dtype = getattr(leaf, "dtype", None)
    return dtype is not None and len(leaf.shape) >= 2 and jnp.issubdtype(dtype, jnp.floating)


def _check_target(path: str, leaf: Any, why: str) -> None:
    """An explicitly targeted leaf must be a float array with at least 2 axes."""
    if is_quantized(leaf):
        raise ValueError(
            f"{why} selects {path!r}, which is already quantized ({leaf!r}); quantized "
            f"kernels are left as they are: narrow the pattern, or call "
            f"lj.quant.dequantize_tree first to re-quantize."
        )
    if getattr(leaf, "shape", None) is None or getattr(leaf, "dtype", None) is None:
        raise TypeError(f"{why} selects {path!r}, which is a {type(leaf).__name__}, not an array.")
    if len(leaf.shape) < 2:
        raise ValueError(
            f"{why} selects {path!r} of shape {tuple(leaf.shape)}; only kernels with at least "
            f"2 axes are quantized (norm scales and biases stay float). Narrow the pattern."
        )
    if not jnp.issubdtype(leaf.dtype, jnp.floating):
        raise TypeError(
            f"{why} selects {path!r} of dtype {leaf.dtype}; only float kernels can be quantized."
        )


def _unmatched(field: str, pattern: str, paths: list[str]) -> ValueError:
    near = "\n  ".join(close_matches(pattern, paths))
    return ValueError(
        f"`{field}` pattern {pattern!r} matches no parameter (patterns must match the whole "
        f"`/`-joined path). Closest paths:\n  {near}"
    )


def _patterns(spec: Any) -> tuple[str, ...]:
    if spec is None or callable(spec):
        return ()
    return (spec,) if isinstance(spec, str) else tuple(spec)


def _select(
    flat: dict[str, Any], targets: Any, exclude: Any, layouts: Mapping[str, Layout] | None
) -> list[str]:
    """The paths to quantize, in tree order."""
    chosen: list[str] = []
    used: set[str] = set()
    excluded: set[str] = set()
    for path, leaf in flat.items():
        kind = _kind(layouts, path)
        if targets is None:
            hits: tuple[str, ...] = ()
            if layouts is None:  # a scanned norm scale or bias is 2-D too: not a kernel
                picked = _is_kernel(leaf) and path.rsplit("/", 1)[-1] not in NOT_KERNELS
            else:
                picked = _is_kernel(leaf) and path in layouts and kind != "embed"
        else:
            hits = matching(targets, path, leaf, kind)
            used.update(hits)
            picked = bool(hits)
        drop = matching(exclude, path, leaf, kind) if exclude is not None else ()
        excluded.update(drop)
        if picked and not drop:
            if hits:
                _check_target(path, leaf, f"`targets` pattern {hits[0]!r}")
            chosen.append(path)
    for field, spec, seen in (("targets", targets, used), ("exclude", exclude, excluded)):
        for pattern in _patterns(spec):
            if pattern not in seen:
                raise _unmatched(field, pattern, list(flat))
    if not chosen:
        done = [p for p, x in flat.items() if is_quantized(x)]
        if done:
            raise ValueError(
                f"quantize: the tree is already quantized ({len(done)} QuantizedKernel(s), "
                f"first at {done[0]!r}) and no float kernel is left to choose; call "
                f"lj.quant.dequantize_tree first to re-quantize."
            )
        raise ValueError(f"quantize: no kernel selected among {len(flat)} leaves.")
    return chosen


def grouped_axis(path: str, leaf: Any, layouts: Mapping[str, Layout] | None) -> int:
    """The grouped axis: the layout's last input axis, else ndim - 2 (``in`` of a Dense)."""
    layout = (layouts or {}).get(path)
    if layout is None:
        return len(leaf.shape) - 2
    if layout.ndim != len(leaf.shape):
        raise ValueError(f"{path}: layout {layout} does not fit shape {tuple(leaf.shape)}.")
    return layout.in_axes[-1]


def _largest_fit(size: int, format: str, group_size: int) -> int | None:
    step = 1 if format == "int8" else 2
    fits = [d for d in range(step, min(size, max(group_size, 1)) + 1, step) if size % d == 0]
    return fits[-1] if fits else None


def _check_group(path: str, shape: tuple[int, ...], axis: int, fmt: str, group_size: int) -> None:
    problem = group_problem(shape[axis], fmt, group_size)
    if problem is None:
        return
    fit = _largest_fit(shape[axis], fmt, group_size)
    hint = f"group_size={fit}" if fit else "format='int8'"
    raise ValueError(
        f"quantize: {path!r} has shape {shape}, grouped along axis {axis} of size "
        f"{shape[axis]}: {problem}. Use {hint}, or leave this kernel float with `targets` "
        f"or `exclude`."
    )


def quantize(
    tree: Any,
    format: str = "nf4",
    *,
    group_size: int = 64,
    double: bool = False,
    targets: Spec = None,
    layouts: Mapping[str, Layout] | None = None,
    exclude: Spec = None,
) -> Any:
    """Replaces chosen kernels of a params tree by `QuantizedKernel`s (the frozen base).

    Args:
        tree: a params pytree: nested dicts (linen variables), a ``FrozenDict``, or an NNX
            ``State``. Paths are the `/`-joined keys, e.g. ``params/fc1/kernel``.
        format: ``"nf4"`` (the default, as QLoRA), ``"int4"`` or ``"int8"``.
        group_size: elements per scale along the grouped axis (4-bit formats; int8 has one
            scale per output channel).
        double: also quantize the scales (QLoRA's double quantization).
        targets: which leaves: a regex matched against the whole path (`re.fullmatch`), a
            list of them, a callable ``(path, leaf) -> bool`` or a preset name, as
            `lora_jax.LoraConfig.targets`. None: with `layouts` (recommended: exactly the
            kernels a contraction uses), every path there whose layout is not an
            embedding; without, every float leaf with at least 2 axes not named
            ``bias``, ``scale`` or ``embedding`` (Flax's names for biases, norm scales and
            embedding tables, 2-D in a scanned stack). Kernels already quantized are
            skipped (a partly quantized tree, e.g. after `lora_jax.quant.loftq`, gets the
            rest quantized); a pattern that selects one is an error.
        layouts: ``{path: Layout}`` from `lora_jax.infer_layouts`: the grouped axis of a
            kernel is its layout's last input axis (``ndim - 2`` without a layout).
        exclude: leaves left float, in the same forms as `targets`.

    Returns:
        A tree of the same structure with each chosen kernel a `QuantizedKernel`.

    Raises:
        ValueError: unknown `format`; no float kernel is left (the tree is already
            quantized); a `targets` pattern selects an already quantized kernel; a
            `targets` or `exclude` pattern matches nothing; a target is 1-D; a group size
            does not fit a kernel's grouped axis (the path, axis and size are named);
            nothing selected.
        TypeError: a target is not a float array.

    Example:
        >>> import jax.numpy as jnp, lora_jax as lj
        >>> params = {"fc": {"kernel": jnp.ones((128, 8)), "bias": jnp.ones(8)}}
        >>> q = lj.quant.quantize(params)
        >>> q["fc"]["kernel"], q["fc"]["bias"].shape
        (QuantizedKernel(nf4, shape=(128, 8), float32, axis=0, group_size=64), (8,))
    """
    if format not in FORMATS:
        raise ValueError(f"quantize: unknown format {format!r}; formats are {FORMATS}.")
    flat = flatten(tree, is_leaf=is_quantized)
    targets = freeze_spec(targets, "targets")
    exclude = freeze_spec(exclude, "exclude")
    chosen = _select(flat, targets, exclude, layouts)
    axes = {path: grouped_axis(path, flat[path], layouts) for path in chosen}
    for path, axis in axes.items():
        _check_group(path, tuple(flat[path].shape), axis, format, group_size)
    new = {
        path: _quantize_jit(flat[path], format, axis=axis, group_size=group_size, double=double)
        for path, axis in axes.items()
    }
    return replace(tree, new)


def _leaf(x: Any) -> bool:
    return isinstance(x, (nnx.Variable, QuantizedKernel))


def dequantize_tree(tree: Any) -> Any:
    """Every `QuantizedKernel` of a tree back to a float array (others kept as they are).

    Args:
        tree: a pytree holding `QuantizedKernel`s (an NNX ``State`` too).

    Returns:
        The same structure with float arrays in place of the quantized kernels.

    Example:
        >>> import jax.numpy as jnp, lora_jax as lj
        >>> q = lj.quant.quantize({"w": jnp.zeros((64, 4))}, "int4", group_size=32)
        >>> lj.quant.dequantize_tree(q)["w"].shape
        (64, 4)
    """

    def back(x: Any) -> Any:
        if isinstance(x, nnx.Variable):
            value = x.get_value()
            return x.replace(dequantize(value)) if is_quantized(value) else x
        return dequantize(x) if is_quantized(x) else x

    return jax.tree_util.tree_map(back, tree, is_leaf=_leaf)


def nbytes(tree: Any) -> int:
    """All array bytes of a tree, each `QuantizedKernel` counted by its child arrays.

    Args:
        tree: any pytree of arrays (or `jax.ShapeDtypeStruct`s).

    Returns:
        The total, in bytes.

    Example:
        >>> import jax.numpy as jnp, lora_jax as lj
        >>> params = {"kernel": jnp.ones((4096, 4096)), "bias": jnp.ones(4096)}
        >>> lj.quant.nbytes(params), lj.quant.nbytes(lj.quant.quantize(params, "nf4"))
        (67125248, 9453568)
    """
    leaves = jax.tree_util.tree_leaves(tree)
    return sum(
        math.prod(x.shape) * jnp.dtype(x.dtype).itemsize
        for x in leaves
        if hasattr(x, "shape") and hasattr(x, "dtype")
    )


def errors(tree_float: Any, tree_quantized: Any) -> dict[str, dict[str, float]]:
    """The error quantization introduced in each kernel.

    Args:
        tree_float: the tree before `quantize`.
        tree_quantized: the tree after it.

    Returns:
        ``{path: {"max_abs": max |w - dequantize(q)|, "max_rel": max_abs / max |w|}}`` for
        each `QuantizedKernel`, in tree order (``max_rel`` is 0 for an all-zero kernel).

    Raises:
        ValueError: a quantized path is missing from `tree_float` or has another shape.

    Example:
        >>> import jax, lora_jax as lj
        >>> params = {"w": jax.random.normal(jax.random.key(0), (256, 64))}
        >>> err = lj.quant.errors(params, lj.quant.quantize(params, "int8"))
        >>> err["w"]["max_rel"] < 1 / 254
        True
    """
    floats = flatten(tree_float, is_leaf=is_quantized)
    out = {}
    for path, q in flatten(tree_quantized, is_leaf=is_quantized).items():
        if not is_quantized(q):
            continue
        w = floats.get(path)
        if w is None or tuple(getattr(w, "shape", ())) != q.shape:
            found = "nothing" if w is None else f"shape {tuple(getattr(w, 'shape', ()))}"
            raise ValueError(
                f"errors: {path!r} is quantized with shape {q.shape}, but `tree_float` has "
                f"{found} there."
            )
        w32 = jnp.asarray(w, jnp.float32)
        max_abs = float(jnp.max(jnp.abs(w32 - dequantize(q).astype(jnp.float32))))
        peak = float(jnp.max(jnp.abs(w32)))
        out[path] = {"max_abs": max_abs, "max_rel": max_abs / peak if peak > 0 else 0.0}
    return out
