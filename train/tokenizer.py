"""Tokenizers for the training app: a byte-level one with no files, and Hugging Face ones.

Both follow the small `Tokenizer` protocol: `encode` adds no special tokens (the data
pipeline adds BOS/EOS itself), `decode` drops special ids and never fails on bytes that are
not valid UTF-8. `load_tokenizer` turns a command-line spec into one of them.
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
import tempfile
from collections.abc import Iterable, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np
import tokenizers

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILES = ("tokenizer_config.json", "config.json", "generation_config.json")


@runtime_checkable
class Tokenizer(Protocol):
    """What the data pipeline and the sampler need from a tokenizer.

    Example:
        >>> isinstance(ByteTokenizer(), Tokenizer)
        True
    """

    @property
    def name(self) -> str:
        """A spec that `load_tokenizer` accepts again (stored in metadata)."""
        ...

    @property
    def vocab_size(self) -> int:
        """Number of token ids, special ones included."""
        ...

    @property
    def bos_id(self) -> int | None:
        """The begin-of-sequence id, or None when the tokenizer has none."""
        ...

    @property
    def eos_id(self) -> int:
        """The end-of-sequence id (appended after every document)."""
        ...

    def encode(self, text: str) -> np.ndarray:
        """Token ids of `text`, int32 of shape ``(n,)``, no special tokens added."""
        ...

    def decode(self, ids: Iterable[int] | np.ndarray) -> str:
        """Text of `ids`, special ids skipped, invalid UTF-8 replaced."""
        ...


def _as_ids(ids: Iterable[int] | np.ndarray, vocab_size: int) -> np.ndarray:
    """`ids` as a 1-D int64 array, checked to lie in ``[0, vocab_size)``."""
    arr = np.asarray(ids if isinstance(ids, np.ndarray) else list(ids), dtype=np.int64)
    if arr.ndim != 1:
        raise ValueError(f"decode expects a 1-D sequence of ids; got shape {arr.shape}")
    bad = arr[(arr < 0) | (arr >= vocab_size)]
    if bad.size:
        raise ValueError(f"token id {int(bad[0])} is outside the vocabulary [0, {vocab_size})")
    return arr


class ByteTokenizer:
    """UTF-8 bytes as tokens: ids 0..255 are bytes, 256 is BOS, 257 is EOS (vocab 258).

    Example:
        >>> tok = ByteTokenizer()
        >>> tok.encode("hé").tolist()
        [104, 195, 169]
        >>> tok.decode([256, 104, 195, 169, 257])
        'hé'
    """

    name = "byte"
    vocab_size = 258
    bos_id = 256
    eos_id = 257

    def encode(self, text: str) -> np.ndarray:
        """The UTF-8 bytes of `text` as int32 ids, shape ``(len(text.encode()),)``.

        Args:
            text: Any string.

        Returns:
            The ids, int32.

        Example:
            >>> ByteTokenizer().encode("ab").tolist()
            [97, 98]
        """
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        """`encode` applied to each of `texts`.

        Args:
            texts: Strings to encode.

        Returns:
            One int32 array per string.

        Example:
            >>> [a.tolist() for a in ByteTokenizer().encode_batch(["a", ""])]
            [[97], []]
        """
        return [self.encode(text) for text in texts]

    def decode(self, ids: Iterable[int] | np.ndarray) -> str:
        """The text of byte ids; BOS/EOS are skipped, invalid UTF-8 becomes U+FFFD.

        Args:
            ids: Token ids in ``[0, 258)``.

        Returns:
            The decoded string.

        Raises:
            ValueError: If an id is outside the vocabulary or `ids` is not 1-D.

        Example:
            >>> ByteTokenizer().decode([104, 105, 255])
            'hi\\ufffd'
        """
        arr = _as_ids(ids, self.vocab_size)
        return arr[arr < 256].astype(np.uint8).tobytes().decode("utf-8", errors="replace")


def _read_json(path: pathlib.Path) -> dict[str, Any]:
    """The JSON object in `path`, or {} when the file does not exist."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def _special_id(tok: tokenizers.Tokenizer, folder: pathlib.Path, kind: str) -> int | None:
    """The `kind` ("bos" or "eos") id from the first config file beside the tokenizer naming one.

    `tokenizer_config.json` names the token (``"eos_token": "</s>"`` or ``{"content": ...}``);
    `config.json` and `generation_config.json` give ``"eos_token_id"`` (an int or a list,
    whose first entry is used).
    """
    for file in CONFIG_FILES:
        path = folder / file
        data = _read_json(path)
        if file == "tokenizer_config.json":
            token = data.get(f"{kind}_token")
            token = token.get("content") if isinstance(token, dict) else token
            if token is None:
                continue
            token_id = tok.token_to_id(str(token))
            if token_id is None:
                raise ValueError(f"{path}: {kind}_token {token!r} is not in the vocabulary")
            return int(token_id)
        value = data.get(f"{kind}_token_id")
        value = value[0] if isinstance(value, list) and value else value
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


class HFTokenizer:
    """A Hugging Face ``tokenizer.json``, with BOS/EOS read from the config files beside it.

    Args:
        path: The ``tokenizer.json`` file, or the folder that holds it.
        bos_id: Overrides the BOS id found in the config files.
        eos_id: Overrides the EOS id found in the config files.

    Raises:
        ValueError: If the file cannot be loaded, or no EOS id is given or found in
            ``tokenizer_config.json``, ``config.json`` or ``generation_config.json``.

    Example:
        >>> tok = HFTokenizer(_example_file(), eos_id=1)  # a 3-word vocabulary
        >>> tok.eos_id, tok.bos_id, tok.vocab_size
        (1, None, 3)
    """

    def __init__(
        self, path: str | os.PathLike[str], *, bos_id: int | None = None, eos_id: int | None = None
    ) -> None:
        file = pathlib.Path(path)
        file = file / TOKENIZER_FILE if file.is_dir() else file
        try:
            self._tok = tokenizers.Tokenizer.from_file(str(file))
        except Exception as err:
            raise ValueError(
                f"{file}: cannot load as a Hugging Face tokenizer.json ({err})"
            ) from err
        folder = file.parent
        self.name = str(file)
        self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))
        self.bos_id = bos_id if bos_id is not None else _special_id(self._tok, folder, "bos")
        found_eos = eos_id if eos_id is not None else _special_id(self._tok, folder, "eos")
        if found_eos is None:
            looked = ", ".join(str(folder / f) for f in CONFIG_FILES)
            raise ValueError(
                f"{file}: no EOS token found; looked for eos_token / eos_token_id in {looked}. "
                "Add one of these files or pass eos_id."
            )
        self.eos_id: int = found_eos

    @classmethod
    def from_backend(
        cls, backend: tokenizers.Tokenizer, *, name: str, bos_id: int | None, eos_id: int
    ) -> HFTokenizer:
        """An `HFTokenizer` around a `tokenizers.Tokenizer` built in memory (from a GGUF file).

        Args:
            backend: the tokenizer.
            name: the spec `load_tokenizer` rebuilds it from (e.g. the ``.gguf`` path).
            bos_id: the begin-of-sequence id, or None.
            eos_id: the end-of-sequence id.

        Returns:
            The tokenizer.
        """
        tok = cls.__new__(cls)
        tok._tok, tok.name = backend, name
        tok.vocab_size = int(backend.get_vocab_size(with_added_tokens=True))
        tok.bos_id, tok.eos_id = bos_id, eos_id
        return tok

    @property
    def backend(self) -> tokenizers.Tokenizer:
        """The underlying `tokenizers.Tokenizer` (GGUF export reads its vocabulary)."""
        return self._tok

    def encode(self, text: str) -> np.ndarray:
        """Token ids of `text`, int32 of shape ``(n,)``, no special tokens added.

        Args:
            text: Any string.

        Returns:
            The ids.

        Example:
            >>> HFTokenizer(_example_file(), eos_id=1).encode("hi yo").tolist()
            [0, 2]
        """
        ids = self._tok.encode(text, add_special_tokens=False).ids
        return np.asarray(ids, dtype=np.int32)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        """`encode` of many texts at once, in parallel (much faster for many documents).

        Args:
            texts: Strings to encode.

        Returns:
            One int32 array per string.

        Example:
            >>> tok = HFTokenizer(_example_file(), eos_id=1)
            >>> [a.tolist() for a in tok.encode_batch(["hi", "yo hi"])]
            [[0], [2, 0]]
        """
        encodings = self._tok.encode_batch_fast(list(texts), add_special_tokens=False)
        return [np.asarray(e.ids, dtype=np.int32) for e in encodings]

    def decode(self, ids: Iterable[int] | np.ndarray) -> str:
        """The text of `ids`, special tokens skipped.

        Args:
            ids: Token ids in ``[0, vocab_size)``.

        Returns:
            The decoded string.

        Raises:
            ValueError: If an id is outside the vocabulary or `ids` is not 1-D.

        Example:
            >>> HFTokenizer(_example_file(), eos_id=1).decode([0, 1, 2])
            'hi yo'
        """
        arr = _as_ids(ids, self.vocab_size)
        return str(self._tok.decode(arr.tolist(), skip_special_tokens=True))


@functools.cache
def _example_file() -> pathlib.Path:
    """A throwaway word-level tokenizer.json ({"hi": 0, "</s>": 1, "yo": 2}) for the examples."""
    folder = pathlib.Path(tempfile.mkdtemp(prefix="tokenizer-example-"))
    model = tokenizers.models.WordLevel({"hi": 0, "</s>": 1, "yo": 2}, unk_token="hi")
    tok = tokenizers.Tokenizer(model)
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.decoder = tokenizers.decoders.WordPiece()
    tok.add_special_tokens(["</s>"])
    tok.save(str(folder / TOKENIZER_FILE))
    return folder / TOKENIZER_FILE


def encode_texts(tokenizer: Tokenizer, texts: Sequence[str]) -> list[np.ndarray]:
    """Encode many texts, through the tokenizer's `encode_batch` when it has one.

    Args:
        tokenizer: Any `Tokenizer`.
        texts: Strings to encode.

    Returns:
        One int32 array per string, no special tokens added.

    Example:
        >>> [a.tolist() for a in encode_texts(ByteTokenizer(), ["a", "bc"])]
        [[97], [98, 99]]
    """
    batch = getattr(tokenizer, "encode_batch", None)
    if callable(batch):
        return list(batch(texts))
    return [tokenizer.encode(text) for text in texts]


def load_tokenizer(spec: str | os.PathLike[str]) -> Tokenizer:
    """The tokenizer named by `spec`.

    Args:
        spec: ``"byte"`` for `ByteTokenizer`; a folder holding a ``tokenizer.json``, the
            path of a ``tokenizer.json``, or a ``.gguf`` model file, for `HFTokenizer`.

    Returns:
        The tokenizer.

    Raises:
        TypeError: If `spec` is not a string or path.
        ValueError: If `spec` is none of the above, or the tokenizer cannot be loaded.

    Example:
        >>> load_tokenizer("byte").vocab_size
        258
    """
    if not isinstance(spec, str | os.PathLike):
        raise TypeError(f"tokenizer spec must be a string or path; got {type(spec).__name__}")
    if isinstance(spec, str) and spec == "byte":
        return ByteTokenizer()
    path = pathlib.Path(spec)
    if path.is_file() and path.suffix == ".gguf":  # the vocabulary stored in a GGUF model
        from train.gguf_tokenizer import load_gguf_tokenizer

        return load_gguf_tokenizer(path)
    if (path.is_dir() and (path / TOKENIZER_FILE).is_file()) or path.is_file():
        return HFTokenizer(path)
    found = "a folder without tokenizer.json" if path.is_dir() else "nothing at that path"
    raise ValueError(
        f"tokenizer {str(spec)!r}: expected 'byte', a folder containing {TOKENIZER_FILE}, "
        f"or the path of a {TOKENIZER_FILE} file; found {found}"
    )
