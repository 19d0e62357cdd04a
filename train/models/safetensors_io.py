"""Reading and writing safetensors files with NumPy only (bfloat16 through `ml_dtypes`).

The format: an 8-byte little-endian header length, a JSON header ``{name: {"dtype",
"shape", "data_offsets"}, "__metadata__": {...}}``, then the raw little-endian buffer.
Reading memory-maps the file, so a tensor is only read when it is used.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import struct
from collections.abc import Mapping
from typing import Any

import ml_dtypes
import numpy as np

__all__ = ["read_safetensors", "write_safetensors"]

_DTYPES: dict[str, Any] = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}
_CODES = {np.dtype(t): code for code, t in _DTYPES.items()}


def _corrupt(path: pathlib.Path, why: str) -> ValueError:
    return ValueError(
        f"{path}: not a valid safetensors file ({why}); the file is corrupt or truncated, "
        "download or save it again."
    )


def _header(path: pathlib.Path, size: int) -> tuple[dict, int]:
    if size < 8:
        raise _corrupt(path, f"{size} bytes, shorter than the 8-byte header length")
    with path.open("rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > size - 8:
            raise _corrupt(path, f"header length {n} exceeds the file size {size}")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise _corrupt(path, f"the header is not JSON: {err}") from err
    if not isinstance(header, dict):
        raise _corrupt(path, "the header is not a JSON object")
    return header, 8 + n


def _entry(
    path: pathlib.Path, name: str, info: Any, buffer_len: int
) -> tuple[Any, tuple, int, int]:
    try:
        code, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
    except (TypeError, KeyError, ValueError) as err:
        raise _corrupt(path, f"bad header entry for {name!r}: {info!r}") from err
    if code not in _DTYPES:
        raise ValueError(f"{path}: tensor {name!r} has dtype {code!r}; supported: {list(_DTYPES)}.")
    nbytes = math.prod(shape) * np.dtype(_DTYPES[code]).itemsize
    if not (0 <= begin <= end <= buffer_len) or end - begin != nbytes:
        raise _corrupt(
            path,
            f"tensor {name!r} {code}{list(shape)} needs {nbytes} bytes but its data_offsets "
            f"are [{begin}, {end}] in a {buffer_len}-byte buffer",
        )
    return _DTYPES[code], shape, begin, end


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads every tensor of a safetensors file as a (memory-mapped, read-only) NumPy array.

    Args:
        path: the ``.safetensors`` file.

    Returns:
        ``{name: array}``; bfloat16 tensors have dtype ``ml_dtypes.bfloat16``.

    Raises:
        ValueError: the file is missing, its header is corrupt, or a tensor's dtype is not
            supported.

    Example:
        >>> import tempfile, numpy as np
        >>> f = tempfile.mkdtemp() + "/t.safetensors"
        >>> write_safetensors(f, {"w": np.ones((2, 3), np.float16)})
        >>> read_safetensors(f)["w"].shape
        (2, 3)
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file.")
    size = path.stat().st_size
    header, start = _header(path, size)
    buffer_len = size - start
    buffer = (
        np.memmap(path, np.uint8, mode="r", offset=start) if buffer_len else np.zeros(0, np.uint8)
    )
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype, shape, begin, end = _entry(path, name, info, buffer_len)
        out[name] = np.asarray(buffer[begin:end]).view(dtype).reshape(shape)
    return out


def write_safetensors(
    path: str | os.PathLike,
    tensors: Mapping[str, np.ndarray],
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Writes tensors to a safetensors file (flushed and fsynced before returning).

    Args:
        path: the file to write (overwritten).
        tensors: ``{name: array}``, written C-contiguous in native (little-endian) order.
        metadata: optional ``{str: str}`` stored as ``__metadata__`` (e.g. ``{"format": "pt"}``).

    Raises:
        ValueError: a tensor's dtype has no safetensors code.

    Example:
        >>> import tempfile, numpy as np
        >>> f = tempfile.mkdtemp() + "/t.safetensors"
        >>> write_safetensors(f, {"b": np.zeros(4, np.float32)}, {"format": "pt"})
        >>> read_safetensors(f)["b"].dtype
        dtype('float32')
    """
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    arrays, offset = [], 0
    for name in sorted(tensors):
        arr = np.ascontiguousarray(tensors[name])
        if arr.dtype not in _CODES:
            raise ValueError(f"tensor {name!r}: dtype {arr.dtype} has no safetensors code.")
        header[name] = {
            "dtype": _CODES[arr.dtype],
            "shape": list(arr.shape),
            "data_offsets": [offset, offset + arr.nbytes],
        }
        arrays.append(arr)
        offset += arr.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    with pathlib.Path(path).open("wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for arr in arrays:
            f.write(arr.tobytes())
        f.flush()
        os.fsync(f.fileno())
