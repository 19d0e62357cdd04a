"""The base model of a run: the built-in tiny model (pretrained once, cached), a folder
written by ``python -m train pretrain``, or a local HuggingFace checkpoint folder.

A base folder of ours holds ``base.json`` (model config, tokenizer, how it was trained)
and ``params/`` (an orbax checkpoint). It is written to a temporary folder and renamed,
so an interrupted pretraining never leaves a half-written base behind.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import shutil
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

import lora_jax as lj
from train.models import Llama, LlamaConfig, from_hf_state, to_hf_state
from train.models.gguf_in import from_gguf
from train.models.hf import from_pretrained
from train.settings import UserError
from train.tokenizer import Tokenizer, load_tokenizer

__all__ = [
    "BASE_FILE",
    "Base",
    "QuantInfo",
    "builtin_folder",
    "cast",
    "layouts_of",
    "load_base",
    "save_base",
]

BASE_FILE = "base.json"
FORMAT = "lora_jax-train-base/1"


@dataclasses.dataclass(frozen=True)
class QuantInfo:
    """How a base was quantized (``--quantize``; `train.quantized.quantize_base`).

    Attributes:
        format: ``"int8"``, ``"int4"`` or ``"nf4"``.
        group_size: weights per scale (4-bit formats).
        float_bytes: the float base's bytes (every array).
        quantized_bytes: the quantized base's bytes (codes and scales of the quantized
            kernels, plus the float rest: embeddings, norms).
        cached: read from the cache (True) or quantized by this run (False).
        folder: the cache folder.
    """

    format: str
    group_size: int
    float_bytes: int
    quantized_bytes: int
    cached: bool
    folder: str


@dataclasses.dataclass(frozen=True)
class Base:
    """A loaded base model.

    Attributes:
        config: the model's architecture.
        variables: ``{"params": ...}`` in the requested dtype.
        tokenizer: its tokenizer.
        source: where it came from (a folder), for messages and metadata.
        info: what its folder says about how it was made (may be empty).
        quant: how its kernels were quantized; None for a float base.
    """

    config: LlamaConfig
    variables: Any
    tokenizer: Tokenizer
    source: str
    info: dict[str, Any]
    quant: QuantInfo | None = None


def cast(variables: Any, dtype: str) -> Any:
    """Casts every floating leaf to `dtype` (``"float32"`` or ``"bfloat16"``).

    Example:
        >>> import jax.numpy as jnp
        >>> cast({"w": jnp.ones(2)}, "bfloat16")["w"].dtype
        dtype(bfloat16)
    """
    dt = jnp.dtype(dtype)
    return jax.tree.map(
        lambda x: x.astype(dt) if jnp.issubdtype(x.dtype, jnp.floating) else x, variables
    )


def save_base(
    path: str | os.PathLike,
    config: LlamaConfig,
    variables: Any,
    *,
    tokenizer: str,
    info: dict[str, Any],
) -> pathlib.Path:
    """Writes a base folder atomically (a temporary sibling, then a rename).

    Args:
        path: the folder to create; an existing one is replaced only after the new one
            is complete.
        config: the model config.
        variables: ``{"params": ...}``.
        tokenizer: the tokenizer spec (``"byte"`` or a path), as `load_tokenizer` takes.
        info: how it was trained (steps, data, losses), stored as JSON.

    Returns:
        The folder.
    """
    final = pathlib.Path(path).absolute()
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(tmp / "params", variables)
        ckpt.wait_until_finished()
    record = {"format": FORMAT, "model": config.to_dict(), "tokenizer": tokenizer, "info": info}
    (tmp / BASE_FILE).write_text(json.dumps(record, indent=2) + "\n")
    if final.exists():
        old = final.with_name(final.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old)
    else:
        tmp.rename(final)
    return final


def _load_ours(folder: pathlib.Path, dtype: str) -> tuple[LlamaConfig, Any, str, dict]:
    try:
        record = json.loads((folder / BASE_FILE).read_text())
        config = LlamaConfig.from_dict(record["model"])
    except (ValueError, KeyError, TypeError) as err:
        raise UserError(f"{folder / BASE_FILE} is damaged ({err}); pretrain it again.") from None
    if record.get("format") != FORMAT:
        raise UserError(f"{folder / BASE_FILE}: format {record.get('format')!r}, not {FORMAT!r}.")
    try:
        with ocp.StandardCheckpointer() as ckpt:
            # Every process reads the whole base onto its own first device.
            device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
            target = jax.tree.map(
                lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                ckpt.metadata(folder / "params").item_metadata,
            )
            variables = ckpt.restore(folder / "params", target)
    except Exception as err:
        raise UserError(f"cannot read the weights in {folder / 'params'}: {err}") from None
    return config, cast(variables, dtype), record["tokenizer"], record.get("info", {})


def layouts_of(config: LlamaConfig, variables: Any, seq_len: int) -> Any:
    """``{path: lj.Layout}`` of every kernel a contraction of the model uses (what
    `lj.split` and `lj.quant.quantize` take), read from an abstract call."""
    ids = jax.ShapeDtypeStruct((1, min(seq_len, 8)), jnp.int32)
    return lj.infer_layouts(Llama(config).apply, variables, ids)


def builtin_folder(cache_dir: str | os.PathLike, recipe: dict[str, Any]) -> pathlib.Path:
    """The cache folder of the built-in base for a pretraining recipe (a hash of it).

    Example:
        >>> builtin_folder("/tmp/c", {"steps": 1}).name.startswith("tiny-")
        True
    """
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:10]
    return pathlib.Path(cache_dir).expanduser().absolute() / f"tiny-{digest}"


def _relayout(config: LlamaConfig, variables: Any, dtype: str, scan: bool) -> tuple:
    """The same weights with the layers scanned (or not) and the compute dtype set."""
    new = dataclasses.replace(config, dtype=dtype, param_dtype=dtype, scan_layers=scan)
    if scan != config.scan_layers:
        state = to_hf_state(config, variables)
        variables = {"params": from_hf_state(new, state, dtype=dtype, scan_layers=scan)}
    return new, variables


def load_base(
    spec: str | os.PathLike,
    *,
    dtype: str = "float32",
    tokenizer: str = "auto",
    scan_layers: bool = False,
) -> Base:
    """Loads a base folder of ours, a local HuggingFace checkpoint folder or a GGUF file.

    Args:
        spec: the folder (``config.json`` + safetensors, or ``base.json`` + ``params/``), or
            a Llama-family ``.gguf`` file (`train.models.gguf_in`).
        dtype: ``"float32"`` or ``"bfloat16"`` for the weights.
        tokenizer: ``"auto"`` (the folder's own: ``tokenizer.json`` or what ``base.json``
            names; a GGUF file's stored vocabulary), ``"byte"``, or a path to a ``tokenizer.json``.
        scan_layers: run the layers as one `nn.scan` (faster compiles for deep models).

    Returns:
        The `Base`.

    Raises:
        UserError: a missing folder, or one that is neither kind, or damaged files.
    """
    folder = pathlib.Path(spec).expanduser()
    if folder.is_file() and folder.suffix == ".gguf":  # a llama.cpp file: train.models.gguf_in
        try:
            config, variables = from_gguf(folder, dtype=dtype, scan_layers=scan_layers)
        except ValueError as err:
            raise UserError(str(err)) from None
        tok_spec, info = str(folder), dict[str, Any]()
    elif not folder.is_dir():
        raise UserError(
            f"base model folder {folder} does not exist. Give `--base` a local HuggingFace "
            "checkpoint folder (config.json + model.safetensors), a .gguf file, a folder "
            "written by `python -m train pretrain`, or `tiny` for the built-in model."
        )
    elif (folder / BASE_FILE).exists():
        config, variables, tok_spec, info = _load_ours(folder, dtype)
    elif (folder / "config.json").exists():
        try:
            config, variables = from_pretrained(folder, dtype=dtype, scan_layers=scan_layers)
        except ValueError as err:
            raise UserError(str(err)) from None
        tok_spec, info = str(folder), {}
    else:
        raise UserError(
            f"{folder} is not a model folder: it has neither config.json (HuggingFace) nor "
            f"{BASE_FILE} (written by `python -m train pretrain`)."
        )
    config, variables = _relayout(config, variables, dtype, scan_layers)
    tok = load_tokenizer(tok_spec if tokenizer == "auto" else tokenizer)
    if tok.vocab_size > config.vocab_size:
        raise UserError(
            f"tokenizer {tok.name} has {tok.vocab_size} ids but the model in {folder} has "
            f"only {config.vocab_size} embeddings; pass the model's own tokenizer."
        )
    return Base(config, variables, tok, str(folder.absolute()), info)
