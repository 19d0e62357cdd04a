"""QLoRA in the app: ``--quantize int8|int4|nf4`` stores the frozen base quantized.

`quantize_base` replaces exactly the kernels a contraction uses (the layouts `lj.split`
gets; embeddings and norms stay float) by `lj.quant.QuantizedKernel`s, and caches the
result with orbax next to the built-in base (``<cache-dir>/quantized/``), so quantization
runs once per base, format and group size:

- the folder is named by a digest of the base's content fingerprint (every leaf's path,
  shape, dtype and a sample of its values, as `lj.save_adapter` fingerprints a base),
  the format and the group size;
- it is written under a temporary name and renamed, so an interrupted write leaves
  nothing that would be read;
- ``quantized.json`` records each quantized kernel's static fields and array shapes (to
  rebuild the pytree as an abstract restore target) and a SHA-256 digest of every array:
  a damaged cache is quantized again and rewritten, never used.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import shutil
from typing import Any, TextIO

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

import lora_jax as lj
from train.base import Base, QuantInfo, layouts_of
from train.settings import Settings, UserError

__all__ = [
    "CACHE_FORMAT",
    "RECORD_FILE",
    "flat_leaves",
    "quantize_base",
    "read_cache",
]

CACHE_FORMAT = "lora_jax-train-quantized/1"
RECORD_FILE = "quantized.json"
PARAMS = "params"


def _path(keypath: Any) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in keypath)


def flat_leaves(tree: Any) -> dict[str, Any]:
    """``{"a/b/kernel": leaf}``, a `QuantizedKernel` being one leaf."""
    pairs = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lj.quant.is_quantized)[0]
    return {_path(kp): leaf for kp, leaf in pairs}


def _fingerprint(variables: Any) -> dict[str, Any]:
    """Every leaf's shape, dtype and a digest of 4096 of its values (cheap at any size)."""
    return {
        path: [list(x.shape), jnp.dtype(x.dtype).name, lj.io.base_sample(x)]
        for path, x in flat_leaves(variables).items()
    }


def cache_folder(
    cache_dir: str | os.PathLike, variables: Any, fmt: str, group: int
) -> pathlib.Path:
    """The cache folder of `variables` quantized as `fmt` with groups of `group`.

    Example:
        >>> import jax.numpy as jnp
        >>> cache_folder("/tmp/c", {"w": jnp.ones((4, 4))}, "nf4", 64).parent.name
        'quantized'
    """
    group = 0 if fmt == "int8" else group  # int8 has one scale per output channel
    key = {"format": CACHE_FORMAT, "quantize": fmt, "group": group, "base": _fingerprint(variables)}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    name = f"{fmt}-g{group}-{digest}" if group else f"{fmt}-{digest}"
    return pathlib.Path(cache_dir).expanduser().absolute() / "quantized" / name


_ARRAY_FIELDS = ("codes", "scales", "scale_codes", "scale_scales", "scale_offset")


def _describe(q: lj.quant.QuantizedKernel) -> dict[str, Any]:
    """The static fields of a quantized kernel and the shape and dtype of each array."""
    static, arrays = {}, {}
    for field in dataclasses.fields(q):
        value = getattr(q, field.name)
        if field.name in _ARRAY_FIELDS:
            arrays[field.name] = (
                None
                if value is None
                else {"shape": list(value.shape), "dtype": jnp.dtype(value.dtype).name}
            )
        else:
            static[field.name] = list(value) if isinstance(value, tuple) else value
    return {"static": static, "arrays": arrays}


def _abstract_kernel(entry: dict[str, Any], sharding: Any) -> lj.quant.QuantizedKernel:
    static: dict[str, Any] = {
        k: tuple(v) if isinstance(v, list) else v for k, v in entry["static"].items()
    }
    arrays: dict[str, Any] = {
        name: None
        if spec is None
        else jax.ShapeDtypeStruct(tuple(spec["shape"]), spec["dtype"], sharding=sharding)
        for name, spec in entry["arrays"].items()
    }
    return lj.quant.QuantizedKernel(**arrays, **static)


def _target(variables: Any, kernels: dict[str, Any]) -> Any:
    """The abstract quantized tree: the float base's structure with each recorded kernel a
    `QuantizedKernel` of `jax.ShapeDtypeStruct`s, on this process's first device."""
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

    def leaf(keypath: Any, x: Any) -> Any:
        entry = kernels.get(_path(keypath))
        if entry is not None:
            return _abstract_kernel(entry, device)
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device)

    return jax.tree_util.tree_map_with_path(leaf, variables)


def read_cache(folder: pathlib.Path, variables: Any) -> Any:
    """The cached quantized base, checked against its digests (raises on any problem)."""
    record = json.loads((folder / RECORD_FILE).read_text())
    if record.get("format") != CACHE_FORMAT:
        raise ValueError(f"format {record.get('format')!r}, not {CACHE_FORMAT!r}")
    target = _target(variables, record["kernels"])
    with ocp.StandardCheckpointer() as ckpt:
        tree = ckpt.restore(folder / PARAMS, target)
    lj.io.verify_tree_digests(record["digests"], tree, str(folder))
    missing = set(record["kernels"]) - {
        p for p, x in flat_leaves(tree).items() if lj.quant.is_quantized(x)
    }
    if missing:
        raise ValueError(f"kernels not restored quantized: {sorted(missing)[:3]}")
    return tree


def _write(folder: pathlib.Path, tree: Any, fmt: str, group: int) -> None:
    """Saves the quantized base under a temporary name, then renames it to `folder`."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    kernels = {p: _describe(x) for p, x in flat_leaves(tree).items() if lj.quant.is_quantized(x)}
    record = {
        "format": CACHE_FORMAT,
        "quantize": fmt,
        "group_size": group,
        "kernels": kernels,
        "digests": lj.io.tree_digests(tree),
    }
    try:
        with ocp.StandardCheckpointer() as ckpt:
            ckpt.save(tmp / PARAMS, tree)
            ckpt.wait_until_finished()
        (tmp / RECORD_FILE).write_text(json.dumps(record, indent=1) + "\n")
        if folder.exists():  # another run wrote it meanwhile: theirs is as good
            shutil.rmtree(tmp)
        else:
            os.rename(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _user_error(err: ValueError, s: Settings) -> UserError:
    """The library's group-size error in the app's words (which flag to change)."""
    text = (
        str(err)
        .replace("group_size=", "--quantize-group ")
        .replace("format='int8'", "--quantize int8")
    )
    return UserError(
        f"--quantize {s.quantize} --quantize-group {s.quantize_group} does not fit this base: "
        f"{text} Change --quantize-group (it must divide every kernel's input size)."
    )


def _quantize(s: Settings, base: Base) -> Any:
    layouts = layouts_of(base.config, base.variables, s.seq_len)
    try:
        return lj.quant.quantize(
            base.variables, s.quantize, group_size=s.quantize_group, layouts=layouts
        )
    except ValueError as err:
        raise _user_error(err, s) from None


def quantize_base(s: Settings, base: Base, out: TextIO | None) -> Base:
    """The base with its contraction kernels quantized as ``s.quantize`` (cached).

    Args:
        s: the run settings (``quantize``, ``quantize_group``, ``cache_dir``, ``seq_len``).
        base: the float base.
        out: where to say that the cache was damaged (None: silent).

    Returns:
        `base` with quantized variables and `Base.quant` filled in; `base` itself when
        ``s.quantize`` is ``"none"``.

    Raises:
        UserError: the group size does not fit a kernel (names ``--quantize-group``).
    """
    if s.quantize == "none":
        return base
    float_bytes = lj.quant.nbytes(base.variables)
    folder = cache_folder(s.cache_dir, base.variables, s.quantize, s.quantize_group)
    tree, cached = None, False
    if folder.is_dir():
        try:
            tree, cached = read_cache(folder, base.variables), True
        except Exception as err:  # orbax/tensorstore raise many types for damaged files
            if out is not None:
                print(
                    f"The quantized base in {folder} is damaged ({err}); quantizing again.",
                    file=out,
                )
            shutil.rmtree(folder, ignore_errors=True)
    if tree is None:
        tree = _quantize(s, base)
        if jax.process_count() == 1:  # several processes each quantize their own copy
            _write(folder, tree, s.quantize, s.quantize_group)
    info = QuantInfo(
        format=s.quantize,
        group_size=s.quantize_group,
        float_bytes=float_bytes,
        quantized_bytes=lj.quant.nbytes(tree),
        cached=cached,
        folder=str(folder),
    )
    return dataclasses.replace(base, variables=tree, quant=info)
