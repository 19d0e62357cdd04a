"""LoftQ (Li et al., 2023): quantize each adapted kernel and start its adapter at the
low-rank part of what quantization lost, so ``dequantize(Q) + s·a@b`` is closer to the
float kernel than ``dequantize(Q)`` alone (where plain QLoRA starts, with B = 0)."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from lora_jax.core._config import LoraConfig, require_config
from lora_jax.core._dora import weight_norm
from lora_jax.core._init import path_key
from lora_jax.core._layout import Layout
from lora_jax.core._paths import flatten, nest, replace
from lora_jax.core._split import BASE_KEEPING_INITS, select_targets, split
from lora_jax.core._weights import LoraWeights, flatten_lora, scaled_delta, to_matrix
from lora_jax.quant._formats import FORMATS
from lora_jax.quant._kernel import QuantizedKernel, dequantize, is_quantized, quantize_kernel
from lora_jax.quant._tree import grouped_axis

__all__ = ["loftq"]

# Residual matrices whose smaller side is at most this get a full SVD; larger ones a
# randomized one (a full SVD of 4096 x 4096 takes about a minute on two CPU cores).
EXACT_SVD_MAX = 512
OVERSAMPLE = 16  # extra columns of the randomized range finder
POWER_ITERS = 4  # subspace (power) iterations of the randomized range finder

_HIGHEST = jax.lax.Precision.HIGHEST


def _orth(y: jax.Array) -> jax.Array:
    """Orthonormal columns spanning those of a tall `y`, from the eigenvectors of its small
    Gram matrix, twice for accuracy (on CPU a QR is slow and a lot slower on a busy
    machine); directions below 1e-3 of the largest come out as zero columns."""
    for _ in range(2):
        e, v = jnp.linalg.eigh(jnp.matmul(y.T, y, precision=_HIGHEST))
        keep = e > 1e-6 * e[-1]
        y = jnp.matmul(y, v * jnp.where(keep, jax.lax.rsqrt(jnp.where(keep, e, 1.0)), 0.0))
    return y


def _randomized_svd(x: jax.Array, rank: int, key: jax.Array) -> tuple[jax.Array, ...]:
    """The top-`rank` SVD of a matrix by randomized subspace iteration (Halko, Martinsson
    and Tropp 2011, Algorithms 4.4 and 5.1)."""
    rows, cols = x.shape
    k = min(rank + OVERSAMPLE, rows, cols)
    mm = functools.partial(jnp.matmul, precision=_HIGHEST)
    xt = jnp.array(x.T)  # a row-major copy: products with it are faster than with x.T
    y = _orth(mm(x, jax.random.normal(key, (cols, k), x.dtype)))
    for _ in range(POWER_ITERS):
        y = _orth(mm(x, _orth(mm(xt, y))))
    u, sv, vh = jnp.linalg.svd(mm(xt, y).T, full_matrices=False)
    return mm(y, u[:, :rank]), sv[:rank], vh[:rank]


def _top_svd(x: jax.Array, rank: int, key: jax.Array, exact: bool) -> tuple[jax.Array, ...]:
    """``(u, sv, vh)`` of shapes ``(n, rows, rank)``, ``(n, rank)``, ``(n, rank, cols)``
    for ``x`` of shape ``(n, rows, cols)``, one slice at a time (`lax.map`: a batched QR
    is many times slower than a loop of single ones on CPU)."""

    def one(m: jax.Array) -> tuple[jax.Array, ...]:
        if not exact and min(m.shape) > EXACT_SVD_MAX:
            return _randomized_svd(m, rank, key)
        u, sv, vh = jnp.linalg.svd(m, full_matrices=False)
        return u[:, :rank], sv[:rank], vh[:rank]

    return jax.lax.map(one, x)


@functools.partial(
    jax.jit,
    static_argnames=(
        "layout",
        "rank",
        "scale",
        "format",
        "axis",
        "group_size",
        "double",
        "iters",
        "exact",
    ),
)
def _loftq_kernel(
    w: jax.Array,
    key: jax.Array,
    *,
    layout: Layout,
    rank: int,
    scale: float,
    format: str,
    axis: int,
    group_size: int,
    double: bool,
    iters: int,
    exact: bool,
) -> tuple[QuantizedKernel, jax.Array, jax.Array]:
    """Q, a, b of one kernel: each iteration quantizes ``W - s·a@b`` and refits a, b to the
    top-`rank` SVD of ``W - dequantize(Q)`` (per stack slice), singular values split
    evenly between the factors and divided by the scale."""
    w32 = w.astype(jnp.float32)
    target = to_matrix(w32, layout)
    a_shape, b_shape = layout.factor_shapes(tuple(w.shape), rank)
    res = w32
    for _ in range(iters):
        q = quantize_kernel(res, format, axis=axis, group_size=group_size, double=double)
        u, sv, vh = _top_svd(target - to_matrix(dequantize(q), layout), rank, key, exact)
        root = jnp.sqrt(sv / scale)
        a = (u * root[:, None, :]).reshape(a_shape)
        b = (root[:, :, None] * vh).reshape(b_shape)
        res = w32 - scaled_delta(LoraWeights(a, b, layout, scale=scale), scale, jnp.float32)
    return q.astype(w.dtype), a, b


def _check(
    variables: Any, config: LoraConfig, format: str, iters: Any, layouts: Any
) -> dict[str, Layout]:
    """The targets, or a ValueError for what LoftQ cannot start from."""
    if format not in FORMATS:
        raise ValueError(f"loftq: unknown format {format!r}; formats are {FORMATS}.")
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
        raise ValueError(f"loftq: `iters` must be an int >= 1; found {iters!r}.")
    targets = select_targets(variables, config, layouts)
    if config.init not in BASE_KEEPING_INITS:
        raise ValueError(
            f"loftq: {next(iter(targets))}: init={config.init!r} is a residual init; LoftQ is "
            f"its own init (it sets a, b and the base): use the default init."
        )
    flat = flatten(variables)
    for path in targets:
        if is_quantized(flat[path]):
            raise ValueError(
                f"loftq: {path} is already quantized; LoftQ quantizes the float kernel "
                f"itself: pass the float base."
            )
    return targets


def loftq(
    variables: Any,
    config: LoraConfig,
    format: str = "nf4",
    *,
    key: jax.Array,
    layouts: Mapping[str, Layout] | None = None,
    group_size: int = 64,
    double: bool = False,
    iters: int = 1,
    exact_svd: bool = False,
) -> tuple[Any, dict[str, Any]]:
    """Splits a float params tree into a quantized base and LoftQ-initialised adapters.

    Like `lora_jax.split` (same targets, ranks, scales and layouts), but each adapted
    kernel W becomes a `QuantizedKernel` Q and its adapter starts at the top-r SVD of what
    quantization lost, per stack slice::

        res = W
        repeat iters times:
            Q = quantize_kernel(res)               # grouped axis as lj.quant.quantize picks it
            U S Vᵀ = top-r SVD of W - dequantize(Q)
            a = U √S / √s,  b = √S Vᵀ / √s         # s = the adapter's scale
            res = W - s·a@b

    so ``dequantize(Q) + s·a@b`` is the best rank-r correction of Q. PEFT writes a and b
    without dividing by s, which is exact only for ``alpha == r``; dividing makes any
    alpha (and rsLoRA) give the same ``s·a@b``. Each kernel is done in float32 under
    `jax.jit`; residuals whose smaller side is above 512 get a randomized SVD (4 subspace
    iterations, 16 extra columns, keyed by `key` and the path; it removed 93-97% of the
    error the exact top-r SVD removes on 1024 x 640 and 2048 x 2048 residuals) instead of a
    full one (55 s for 4096 x 4096 on two CPU cores); ``exact_svd=True`` computes the full
    SVD as PEFT does.
    Kernels that are not adapted stay float: quantize them afterwards with
    ``lj.quant.quantize(frozen, ...)``, which skips the quantized ones.

    Args:
        variables: the float params pytree (what ``model.apply`` takes).
        config: which kernels to adapt and how; its `init` must keep the base (the
            default): LoftQ replaces the factors.
        format: ``"nf4"`` (the default, as PEFT's ``loftq_bits=4``), ``"int4"`` or
            ``"int8"``.
        key: PRNG key (passed to `lora_jax.split`; the randomized SVD folds in the path).
        layouts: ``{path: Layout}`` from `lora_jax.infer_layouts`, needed for kernels with
            more than 2 axes; it also picks the grouped axis, as in `lora_jax.quant.quantize`.
        group_size: elements per scale along the grouped axis (4-bit formats).
        double: also quantize the scales (QLoRA's double quantization).
        iters: alternating steps (PEFT's ``loftq_iter``, default 1).
        exact_svd: always the full SVD (slow for large kernels on a CPU).

    Returns:
        ``(frozen, lora)``: `variables` with each adapted kernel a `QuantizedKernel`, and
        the adapters (`LoraWeights`, as from `lora_jax.split`).

    Raises:
        ValueError: unknown `format`; `iters` < 1; `config.init` rewrites the base
            (``"pissa"``); a target is already quantized or not a float kernel; a group
            size does not fit a kernel's grouped axis (each names the path); and whatever
            `lora_jax.split` raises.

    Example:
        >>> import jax, lora_jax as lj
        >>> w = jax.random.normal(jax.random.key(0), (128, 64))
        >>> config = lj.LoraConfig(rank=8, alpha=16.0, targets="fc/kernel")
        >>> frozen, lora = lj.quant.loftq({"fc": {"kernel": w}}, config, key=jax.random.key(1))
        >>> plain = lj.quant.dequantize(lj.quant.quantize_kernel(w, "nf4", axis=0))
        >>> loft = lj.merge(frozen, lora)["fc"]["kernel"]
        >>> bool(jax.numpy.linalg.norm(w - loft) < jax.numpy.linalg.norm(w - plain))
        True
    """
    config = require_config(config, "loftq")
    targets = _check(variables, config, format, iters, layouts)
    flat = flatten(variables)
    axes = {p: grouped_axis(p, flat[p], layouts) for p in targets}
    for path, axis in axes.items():
        try:
            jax.eval_shape(
                functools.partial(
                    quantize_kernel, format=format, axis=axis, group_size=group_size, double=double
                ),
                flat[path],
            )
        except ValueError as err:
            raise ValueError(f"loftq: {path}: {err}") from None
    frozen, lora = split(variables, config, key=key, layouts=layouts)
    adapters = flatten_lora(lora)
    bases, factors = {}, {}
    for path, weights in adapters.items():
        q, a, b = _loftq_kernel(
            flat[path],
            path_key(key, path + "/loftq"),
            layout=weights.layout,
            rank=weights.rank,
            scale=weights.scale,
            format=format,
            axis=axes[path],
            group_size=group_size,
            double=double,
            iters=iters,
            exact=exact_svd,
        )
        bases[path] = q
        new = dataclasses.replace(weights, a=a.astype(weights.a.dtype), b=b.astype(weights.b.dtype))
        if new.magnitude is not None:  # DoRA: start at Q + s·a@b, the model LoftQ starts from
            norm = weight_norm(q.dequantize(), new.a, new.b, new.layout, float(new.scale))  # type: ignore[arg-type]
            new = dataclasses.replace(new, magnitude=norm.astype(new.magnitude.dtype))
        factors[path] = new
    return replace(frozen, bases), nest(factors)
