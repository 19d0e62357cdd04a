"""The name mapping between Flax params and HuggingFace tensors, with shape checks.

``layers_0/self_attn/q_proj/kernel`` (in, out) is ``model.layers.0.self_attn.q_proj.weight``
(out, in); RMSNorm ``scale`` and the embedding are ``weight``; scanned ``layers/...`` params
are unstacked on the way out and stacked on the way in. Qwen3-MoE's expert kernels
``layers_0/mlp/experts/gate_up_proj`` ``(E, hidden, 2 * moe_i)`` and ``.../down_proj``
``(E, moe_i, hidden)`` are HF's per-expert Linears ``model.layers.0.mlp.experts.{e}.
{gate,up,down}_proj.weight`` (what transformers 5 saves and the Hub holds), gathered one
expert at a time into one buffer (a ``state_dict()``'s fused ``experts.gate_up_proj``
``(E, 2 * moe_i, hidden)`` is read too); the router ``layers_0/mlp/gate`` is ``mlp.gate.weight``.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from train.models.config import LlamaConfig
from train.models.llama import Llama

__all__ = ["from_hf_state", "to_hf_state"]


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        out.update(_flatten(value, path + "/") if isinstance(value, Mapping) else {path: value})
    return out


def _unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for path, value in flat.items():
        *parents, leaf = path.split("/")
        node = out
        for name in parents:
            node = node.setdefault(name, {})
        node[leaf] = value
    return out


@functools.lru_cache(maxsize=8)
def _param_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """``{path: shape}`` of the unscanned params, by abstract init (no FLOPs)."""
    model = Llama(dataclasses.replace(config, scan_layers=False))
    ids = jnp.zeros((1, 1), jnp.int32)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), ids))["params"]
    return {path: tuple(leaf.shape) for path, leaf in _flatten(shapes).items()}


_EXPERTS = re.compile(r"layers_(\d+)/mlp/experts/(gate_up_proj|down_proj)")
_PARTS = {"gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}


def _expert_names(path: str, shape: tuple[int, ...]) -> list[tuple[str, tuple[int, ...]]]:
    """``[(HF name, HF shape)]`` of the per-expert Linears behind an expert kernel path, in
    the order `_read` fills them (expert-major; gate before up); [] for other paths."""
    found = _EXPERTS.fullmatch(path)
    if found is None:
        return []
    layer, param = found.groups()
    experts, d_in, d_out = shape
    parts = _PARTS[param]
    width = d_out // len(parts)
    return [
        (f"model.layers.{layer}.mlp.experts.{e}.{part}.weight", (width, d_in))
        for e in range(experts)
        for part in parts
    ]


def _fused_name(path: str, state: Mapping[str, Any]) -> str | None:
    """transformers 5's in-memory name of an expert kernel (``model.layers.0.mlp.experts.
    gate_up_proj``, ``(E, out, in)``) when `state` holds it (a ``state_dict()``); else None."""
    found = _EXPERTS.fullmatch(path)
    name = found and "model." + path.replace("layers_", "layers.").replace("/", ".")
    return name if name and name in state else None


def _hf_names(path: str, shape: tuple[int, ...], state: Mapping[str, Any]) -> list[str]:
    """Every HF tensor name a Flax param is made of."""
    fused = _fused_name(path, state)
    if fused:
        return [fused]
    experts = _expert_names(path, shape)
    return [n for n, _ in experts] if experts else [_hf_name(path)[0]]


def _hf_name(path: str) -> tuple[str, bool]:
    """(HF tensor name, transposed?) of an unscanned Flax param path (not an expert kernel)."""
    if path == "lm_head/kernel":
        return "lm_head.weight", True
    if re.fullmatch(r"layers_\d+/mlp/gate", path):  # the Qwen3-MoE router (hidden, experts)
        return "model." + path.replace("layers_", "layers.").replace("/", ".") + ".weight", True
    *modules, leaf = path.split("/")
    if modules[0].startswith("layers_"):
        modules = ["layers", modules[0].removeprefix("layers_"), *modules[1:]]
    return ".".join(["model", *modules, "bias" if leaf == "bias" else "weight"]), leaf == "kernel"


def listing(names: list[str], limit: int = 12) -> str:
    more = f" ... ({len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def from_hf_state(
    config: LlamaConfig,
    state: Mapping[str, np.ndarray],
    *,
    dtype: Any = "float32",
    scan_layers: bool = False,
    source: str = "state",
) -> dict[str, Any]:
    """Flax params from HuggingFace tensors (``model.layers.0.mlp.up_proj.weight`` ...).

    Args:
        config: the architecture.
        state: ``{HF name: array}``; rotary ``inv_freq`` buffers and, when tied,
            ``lm_head.weight`` are ignored.
        dtype: dtype of the returned arrays.
        scan_layers: stack the layers under ``layers/`` (leading layer axis).
        source: what `state` was read from, for error messages.

    Returns:
        The ``params`` collection (wrap it as ``{"params": ...}`` for ``model.apply``).

    Raises:
        ValueError: tensors are missing or unexpected (listed), or have the wrong shape.

    Example:
        >>> from train.models import PRESETS, from_hf_state, to_hf_state
        >>> import dataclasses, jax, jax.numpy as jnp
        >>> from train.models import Llama
        >>> c = dataclasses.replace(PRESETS["tiny"], num_layers=1)
        >>> params = Llama(c).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]
        >>> back = from_hf_state(c, to_hf_state(c, params), scan_layers=True)
        >>> back["layers"]["mlp"]["up_proj"]["kernel"].shape
        (1, 128, 384)
    """
    expected = _param_shapes(config)
    names = {n for path, shape in expected.items() for n in _hf_names(path, shape, state)}
    ignored = {n for n in state if n.endswith("rotary_emb.inv_freq")}
    ignored |= {"lm_head.weight"} if config.tie_embeddings else set()
    missing = sorted(n for n in names if n not in state)
    unexpected = sorted(set(state) - names - ignored)
    if missing or unexpected:
        raise ValueError(
            f"{source}: the tensors do not match config.json; missing: [{listing(missing)}]; "
            f"unexpected: [{listing(unexpected)}]. Check that config.json goes with these weights."
        )
    flat = {
        path: jnp.asarray(_read(path, shape, state, source), dtype=dtype)
        for path, shape in expected.items()
    }
    if scan_layers:
        flat = _stack_layers(flat, config.num_layers)
    return _unflatten(flat)


def _checked(state: Mapping[str, np.ndarray], name: str, want: tuple, source: str) -> np.ndarray:
    array = state[name]
    if tuple(array.shape) != want:
        raise ValueError(
            f"{source}: tensor {name!r} has shape {tuple(array.shape)}; the config expects {want}."
        )
    return array


def _read(path: str, shape: tuple[int, ...], state: Mapping[str, np.ndarray], source: str) -> Any:
    """The Flax-layout array of `path` from HF tensors; expert kernels are filled one expert
    at a time into one new buffer (the only copy beyond the memory-mapped file)."""
    fused = _fused_name(path, state)
    if fused:
        return _checked(state, fused, (shape[0], shape[2], shape[1]), source).transpose(0, 2, 1)
    experts = _expert_names(path, shape)
    if not experts:
        name, transposed = _hf_name(path)
        array = _checked(state, name, shape[::-1] if transposed else shape, source)
        return array.T if transposed else array
    parts = len(experts) // shape[0]
    out = np.empty(shape, state[experts[0][0]].dtype)
    for i, (name, want) in enumerate(experts):
        e, j = divmod(i, parts)
        out[e, :, j * want[0] : (j + 1) * want[0]] = _checked(state, name, want, source).T
    return out


def _write(path: str, array: np.ndarray) -> dict[str, np.ndarray]:
    """The HF tensors of one Flax param: one, or each expert's Linears of an expert kernel."""
    experts = _expert_names(path, array.shape)
    if not experts:
        name, transposed = _hf_name(path)
        return {name: array.T if transposed else array}
    parts = len(experts) // array.shape[0]
    out = {}
    for i, (name, want) in enumerate(experts):
        e, j = divmod(i, parts)
        out[name] = array[e, :, j * want[0] : (j + 1) * want[0]].T
    return out


def _stack_layers(flat: dict[str, Any], n: int) -> dict[str, Any]:
    out = {p: v for p, v in flat.items() if not p.startswith("layers_")}
    for path in [p for p in flat if p.startswith("layers_0/")]:
        rest = path.removeprefix("layers_0/")
        out[f"layers/{rest}"] = jnp.stack([flat[f"layers_{i}/{rest}"] for i in range(n)])
    return out


def to_hf_state(config: LlamaConfig, params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """HuggingFace tensors from Flax params (scanned or not), in the params' dtype.

    Args:
        config: the architecture.
        params: the ``params`` collection, or a variables dict holding it under ``"params"``.

    Returns:
        ``{HF name: NumPy array}``; linear weights are ``(out, in)``.

    Raises:
        ValueError: params are missing, unexpected or of the wrong shape for `config`.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from train.models import Llama, PRESETS, to_hf_state
        >>> c = PRESETS["tiny"]
        >>> v = Llama(c).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
        >>> to_hf_state(c, v)["model.layers.0.self_attn.k_proj.weight"].shape
        (64, 128)
    """
    if set(params) == {"params"}:
        params = params["params"]
    flat = _flatten(params)
    for path in [p for p in flat if p.startswith("layers/")]:
        stacked = flat.pop(path)
        for i in range(stacked.shape[0]):
            flat[f"layers_{i}/{path.removeprefix('layers/')}"] = stacked[i]
    expected = _param_shapes(config)
    missing, unexpected = sorted(set(expected) - set(flat)), sorted(set(flat) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"params do not match the config: missing [{listing(missing)}]; "
            f"unexpected [{listing(unexpected)}]."
        )
    out = {}
    for path, shape in expected.items():
        if tuple(flat[path].shape) != shape:
            raise ValueError(f"params/{path}: expected shape {shape}; found {flat[path].shape}.")
        out.update(_write(path, np.asarray(flat[path])))
    return out
