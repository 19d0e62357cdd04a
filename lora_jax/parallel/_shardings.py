"""Mesh shardings of a LoRA run: the batch over the data axes, the base replicated or
FSDP-sharded, and each adapter (and its optimizer slots) following its base kernel."""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lora_jax.core._packed import is_packed
from lora_jax.core._paths import flatten, path_str
from lora_jax.core._weights import LoraWeights, flatten_lora

__all__ = ["MeshShardings", "mesh_shardings"]

_is_lora = lambda x: isinstance(x, LoraWeights)


class MeshShardings(NamedTuple):
    """Shardings of a LoRA training run on a mesh (pytrees of `NamedSharding`).

    Attributes:
        frozen: for the frozen base.
        lora: for the adapters (each follows its base weight; rank axis replicated).
        batch: for a batch leaf (leading axis over the data axes).
        replicated: for scalars and everything small.

    Example:
        >>> import jax, jax.numpy as jnp, lora_jax as lj
        >>> from jax.sharding import Mesh
        >>> mesh = Mesh(jax.devices()[:1], ("data",))
        >>> params = {"w": jnp.ones((4, 3))}
        >>> config = lj.LoraConfig(rank=2, targets="w")
        >>> frozen, lora = lj.split(params, config, key=jax.random.key(0))
        >>> lj.parallel.mesh_shardings(mesh, frozen, lora).lora["w"].b.spec
        P(None, None)
    """

    frozen: Any
    lora: Any
    batch: NamedSharding
    replicated: NamedSharding


def _fsdp_spec(
    shape: tuple[int, ...], size: int, axis: str, min_size: int, keep: tuple[int, ...] = ()
) -> PartitionSpec:
    """Shards the largest dimension divisible by `size` (not one of `keep`); small or
    indivisible leaves stay whole."""
    if int(np.prod(shape)) < min_size:
        return PartitionSpec()
    candidates = [i for i, d in enumerate(shape) if d % size == 0 and i not in keep]
    if not candidates:
        return PartitionSpec()
    best = max(candidates, key=lambda i: shape[i])
    return PartitionSpec(*(axis if i == best else None for i in range(len(shape))))


def _adapter_specs(spec: PartitionSpec, w: LoraWeights) -> tuple[PartitionSpec, ...]:
    """Moves a kernel's sharded axes onto a (stack, in, r), b (stack, r, out) and a
    per-output vector (stack, out); k stacked adapters keep their axis (after the stack
    axes, `lora_jax.multi.stack_adapters`) whole."""
    full = tuple(spec) + (None,) * (w.layout.ndim - len(spec))
    lay = w.layout
    stack = tuple(full[i] for i in lay.stack_axes)
    out = tuple(full[i] for i in lay.out_axes)
    k = (None,) if isinstance(w.scale, tuple) else ()
    a = (*stack, *k, *(full[i] for i in lay.in_axes), None)
    b = (*stack, *k, None, *out)
    return PartitionSpec(*a), PartitionSpec(*b), PartitionSpec(*stack, *out)


def mesh_shardings(
    mesh: Mesh,
    frozen: Any,
    lora: Any,
    *,
    data_axis: str | tuple[str, ...] = "data",
    fsdp_axis: str | None = None,
    fsdp_min_size: int = 2**12,
) -> MeshShardings:
    """Shardings for the frozen base, the adapters and the batch on `mesh`.

    Args:
        mesh: a `jax.sharding.Mesh`.
        frozen: the frozen base (arrays or `jax.ShapeDtypeStruct`).
        lora: the adapters.
        data_axis: mesh axis (or axes) the batch is split over.
        fsdp_axis: mesh axis to shard the base over (largest divisible dimension of each
            leaf of at least `fsdp_min_size` elements); None keeps the base replicated. The
            batch is split over this axis too.
        fsdp_min_size: leaves smaller than this stay replicated.

    Returns:
        A `MeshShardings`.

    Raises:
        ValueError: an axis is not in the mesh.

    Example:
        >>> import jax, jax.numpy as jnp, lora_jax as lj
        >>> from jax.sharding import Mesh
        >>> mesh = Mesh(jax.devices()[:1], ("data",))
        >>> params = {"params": {"fc": {"kernel": jnp.ones((4, 3))}}}
        >>> config = lj.LoraConfig(rank=2, targets=".*/kernel")
        >>> frozen, lora = lj.split(params, config, key=jax.random.key(0))
        >>> lj.parallel.mesh_shardings(mesh, frozen, lora).batch.spec
        P('data',)
    """
    batch_axes = check_axes(mesh, data_axis, fsdp_axis)
    named = lambda spec: NamedSharding(mesh, spec)

    def kernel_spec(x: Any) -> PartitionSpec:
        if not fsdp_axis:
            return PartitionSpec()
        # a quantized kernel is sharded along its float axes, never the grouped one
        keep = (x.axis,) if is_packed(x) else ()
        shape = tuple(x.shape) if is_packed(x) else tuple(np.shape(x))
        return _fsdp_spec(shape, mesh.shape[fsdp_axis], fsdp_axis, fsdp_min_size, keep)

    spec_by_path = {p: kernel_spec(x) for p, x in flatten(frozen).items()}
    frozen_specs = jax.tree.map(
        lambda x: x.with_specs(kernel_spec(x)) if is_packed(x) else kernel_spec(x),
        frozen,
        is_leaf=is_packed,
    )
    lora_specs = {}
    for path, w in flatten_lora(lora).items():
        a, b, out = _adapter_specs(spec_by_path.get(path, PartitionSpec()), w)
        per_out = named(out)  # magnitude, bias: b without r
        lora_specs[path] = dataclasses.replace(
            w,
            a=named(a),
            b=named(b),
            magnitude=None if w.magnitude is None else per_out,
            bias=None if w.bias is None else per_out,
        )
    return MeshShardings(
        frozen=jax.tree.map(named, frozen_specs, is_leaf=lambda x: isinstance(x, PartitionSpec)),
        lora=jax.tree_util.tree_map_with_path(
            lambda kp, w: lora_specs[path_str(kp)], lora, is_leaf=_is_lora
        ),
        batch=named(PartitionSpec(batch_axes if len(batch_axes) > 1 else batch_axes[0])),
        replicated=named(PartitionSpec()),
    )


def check_axes(
    mesh: Mesh, data_axis: str | tuple[str, ...], fsdp_axis: str | None
) -> tuple[str, ...]:
    """The mesh axes a batch is split over; a ValueError for an axis the mesh lacks."""
    data = (data_axis,) if isinstance(data_axis, str) else tuple(data_axis)
    axes = (*data, *((fsdp_axis,) if fsdp_axis else ()))
    for name in axes:
        if name not in mesh.axis_names:
            raise ValueError(f"mesh has no axis {name!r}; its axes are {mesh.axis_names}.")
    return axes


def state_shardings(state: Any, sh: MeshShardings) -> Any:
    """Shardings for a training state: every subtree shaped like ``state.lora`` (the
    adapters, and the optimizer's slots for them) takes the adapters' shardings; every other
    leaf (step, rng, counters) is replicated."""
    lora_def: Any = jax.tree.structure(state.lora)
    is_lora_like = lambda node: lora_def == jax.tree.structure(node)
    return jax.tree.map(
        lambda node: sh.lora if is_lora_like(node) else sh.replicated, state, is_leaf=is_lora_like
    )
