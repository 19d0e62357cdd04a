"""Local HuggingFace checkpoints: ``config.json`` + safetensors <-> (`LlamaConfig`, variables).

`from_pretrained` reads ``LlamaForCausalLM`` (also SmolLM/SmolLM2), ``MistralForCausalLM``,
``Qwen2ForCausalLM``, ``Qwen3ForCausalLM`` or ``Qwen3MoeForCausalLM`` weights (one file or
sharded; float32, float16 or bfloat16);
`save_pretrained` writes a folder ``transformers`` loads. The config conversion lives in
`train.models.hf_config`, the tensor name mapping in `train.models.hf_state`; both are
re-exported here.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil
import uuid
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from train.models.config import LlamaConfig
from train.models.hf_config import SUPPORTED_ARCHITECTURES, config_from_hf, config_to_hf
from train.models.hf_state import from_hf_state, listing, to_hf_state
from train.models.safetensors_io import read_safetensors, write_safetensors

__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "config_from_hf",
    "config_to_hf",
    "from_hf_state",
    "from_pretrained",
    "save_pretrained",
    "to_hf_state",
]


def _read_json(path: pathlib.Path) -> Any:
    if not path.is_file():
        raise ValueError(f"{path}: no such file; a HuggingFace model folder needs {path.name}.")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err}); download or save it again.") from err


def _read_sharded(folder: pathlib.Path, index_path: pathlib.Path) -> dict[str, np.ndarray]:
    weight_map = _read_json(index_path).get("weight_map")
    if not isinstance(weight_map, dict):
        raise ValueError(f"{index_path}: no 'weight_map' object; download or save it again.")
    shards = sorted(set(weight_map.values()))
    absent = [s for s in shards if not (folder / s).is_file()]
    if absent:
        raise ValueError(f"{index_path}: lists shards missing from {folder}: {absent}.")
    state: dict[str, np.ndarray] = {}
    for shard in shards:
        state.update(read_safetensors(folder / shard))
    lost = sorted(name for name in weight_map if name not in state)
    if lost:
        raise ValueError(f"{index_path}: lists tensors no shard holds: [{listing(lost)}].")
    return state


def _read_state(folder: pathlib.Path) -> dict[str, np.ndarray]:
    single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
    if single.is_file():
        return read_safetensors(single)
    if index.is_file():
        return _read_sharded(folder, index)
    raise ValueError(
        f"{folder}: no weights; expected model.safetensors or model.safetensors.index.json "
        "(PyTorch .bin checkpoints are not read: re-save them with safe_serialization=True)."
    )


def from_pretrained(
    path: str | os.PathLike, *, dtype: Any = "float32", scan_layers: bool = False
) -> tuple[LlamaConfig, dict[str, Any]]:
    """Loads a local HuggingFace folder (``config.json`` + safetensors, possibly sharded).

    Args:
        path: the folder (e.g. a ``huggingface-cli download`` snapshot).
        dtype: dtype of the returned params, also the config's compute dtype.
        scan_layers: return the layers stacked for ``LlamaConfig.scan_layers``.

    Returns:
        ``(config, {"params": params})`` ready for ``Llama(config).apply``.

    Raises:
        ValueError: the folder, ``config.json``, the weights or a listed shard is missing;
            a file is corrupt; the architecture is unsupported; tensors are missing,
            unexpected or of the wrong shape. Each message names the file.

    Example:
        >>> import tempfile, jax, jax.numpy as jnp
        >>> from train.models import Llama, PRESETS, from_pretrained, save_pretrained
        >>> c = PRESETS["tiny"]
        >>> v = Llama(c).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
        >>> folder = save_pretrained(tempfile.mkdtemp() + "/tiny", c, v)
        >>> config, loaded = from_pretrained(folder, dtype="bfloat16")
        >>> config.dtype, loaded["params"]["norm"]["scale"].dtype
        ('bfloat16', dtype(bfloat16))
    """
    folder = pathlib.Path(path)
    if not folder.is_dir():
        raise ValueError(
            f"{folder}: no such folder; give a local HuggingFace model folder holding "
            "config.json and model.safetensors."
        )
    config_path = folder / "config.json"
    config = config_from_hf(_read_json(config_path), path=config_path)
    config = dataclasses.replace(config, dtype=dtype, param_dtype=dtype, scan_layers=scan_layers)
    state = _read_state(folder)
    params = from_hf_state(config, state, dtype=dtype, scan_layers=scan_layers, source=str(folder))
    return config, {"params": params}


def _storage_dtype(dtype: Any) -> str:
    try:
        name = jnp.dtype(dtype).name
    except TypeError:
        name = None
    if name not in ("float32", "bfloat16", "float16"):
        raise ValueError(
            f"save_pretrained: `dtype` must be float32, bfloat16 or float16; found {dtype!r}."
        )
    return name


def save_pretrained(
    path: str | os.PathLike,
    config: LlamaConfig,
    variables: Mapping[str, Any],
    *,
    dtype: Any = "float32",
) -> pathlib.Path:
    """Writes ``config.json`` and ``model.safetensors`` that ``transformers`` loads.

    Everything is written to a temporary sibling folder first, then renamed into place (a
    new folder appears whole; in an existing folder the two files are replaced one by one
    and any other file is left alone), so a crash never leaves a half-written file.

    Args:
        path: the folder to create or update.
        config: the architecture.
        variables: ``{"params": ...}`` (scanned or not) or the params collection.
        dtype: dtype of the stored tensors (``"float32"``, ``"bfloat16"``, ``"float16"``).

    Returns:
        The folder.

    Raises:
        ValueError: `path` is a file, `dtype` is not a float dtype, or `variables` does
            not fit `config`.

    Example:
        >>> import tempfile, jax, jax.numpy as jnp
        >>> from train.models import Llama, PRESETS, save_pretrained
        >>> v = Llama(PRESETS["tiny"]).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
        >>> folder = save_pretrained(tempfile.mkdtemp() + "/m", PRESETS["tiny"], v)
        >>> sorted(p.name for p in folder.iterdir())
        ['config.json', 'model.safetensors']
    """
    folder = pathlib.Path(path)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{folder}: exists and is not a folder.")
    store = _storage_dtype(dtype)
    state = {k: v.astype(store) for k, v in to_hf_state(config, variables).items()}
    hf = {**config_to_hf(config), "dtype": store, "torch_dtype": store}
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{folder.name}.{uuid.uuid4().hex[:8]}.tmp"
    tmp.mkdir()
    try:
        write_safetensors(tmp / "model.safetensors", state, {"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(hf, indent=2) + "\n", encoding="utf-8")
        if not folder.exists():
            os.replace(tmp, folder)
        else:
            for name in ("model.safetensors", "config.json"):
                os.replace(tmp / name, folder / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder
