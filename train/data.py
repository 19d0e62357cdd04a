"""Training data: read text sources, tokenize, pack into fixed windows, batch with grain.

Sources are text files, folders of them, JSONL files (``{"text": ...}`` or
``{"prompt": ..., "completion": ...}`` per line) and two corpora every CPython carries
(`pydoc_topics`, `stdlib_code_files`). `pack_documents` concatenates the tokenized documents
into windows of ``seq_len + 1`` tokens with a loss weight per token; `make_loader` serves
shuffled, sharded, resumable training batches; `eval_batches` serves every window once, in order.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import sys
import sysconfig
import zlib
from collections.abc import Iterable, Iterator
from typing import Any

import grain
import numpy as np

from train.tokenizer import Tokenizer, encode_texts

Batch = dict[str, np.ndarray]
PathLike = str | os.PathLike[str]
ACCEPTED = "a UTF-8 text file, a .jsonl file, or a folder of them"
JSONL_SHAPE = 'a JSON object with a "text" string, or "prompt" and "completion" strings'
EXCLUDED_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages"})
EVAL_BUCKETS = 20  # a stdlib file is held out for eval when crc32(relative path) % 20 == 0
STATE_KEYS = ("seed", "global_batch_size", "num_windows", "seq_len", "tokens_crc32")


@dataclasses.dataclass(frozen=True)
class Document:
    """One document: `text` is trained on; `prompt`, when set, comes before it with no loss.

    Attributes:
        text: The text, or the completion when `prompt` is set (loss weight 1).
        prompt: Context before `text` (loss weight 0); empty for plain text.
        source: Where it came from (a file path), for messages.

    Example:
        >>> Document("Paris.", prompt="Capital of France? ").prompt
        'Capital of France? '
    """

    text: str
    prompt: str = ""
    source: str = ""


@dataclasses.dataclass(frozen=True)
class Corpus:
    """The documents read from some sources, the files they came from, and the files skipped.

    Attributes:
        documents: In file order (a JSONL file gives one per line).
        files: The files that gave documents.
        skipped: The files that gave none: empty, unreadable, or not UTF-8 text (binary).

    Example:
        >>> Corpus(documents=(Document("hi"),), files=("a.txt",), skipped=()).files
        ('a.txt',)
    """

    documents: tuple[Document, ...]
    files: tuple[str, ...]
    skipped: tuple[str, ...]


def _read_text(path: pathlib.Path) -> str | None:
    """The text of `path`, or None when it is unreadable, empty or not UTF-8 text."""
    try:
        data = path.read_bytes()
        text = data.decode("utf-8-sig")
    except (OSError, UnicodeDecodeError):
        return None
    return text if text.strip() and "\x00" not in text else None


def _jsonl_document(line: str, path: pathlib.Path, lineno: int) -> Document:
    """The document on one JSONL line."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(
            f"{path}:{lineno}: invalid JSON ({err.msg}); expected {JSONL_SHAPE}"
        ) from err
    if isinstance(obj, dict):
        kinds = {key: type(value) for key, value in obj.items()}
        if kinds.get("text") is str and not {"prompt", "completion"} & kinds.keys():
            return Document(obj["text"], source=str(path))
        if kinds.get("prompt") is str and kinds.get("completion") is str and "text" not in kinds:
            return Document(obj["completion"], prompt=obj["prompt"], source=str(path))
        found: Any = {key: kind.__name__ for key, kind in kinds.items()}
    else:
        found = type(obj).__name__
    raise ValueError(f"{path}:{lineno}: expected {JSONL_SHAPE}; found {found}")


def _read_jsonl(path: pathlib.Path) -> list[Document]:
    """The documents of a JSONL file, one per non-blank line."""
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: a .jsonl file must be UTF-8 text ({err.reason})") from err
    lines = enumerate(text.split("\n"), start=1)
    return [_jsonl_document(line, path, n) for n, line in lines if line.strip()]


def _files_under(root: pathlib.Path) -> list[pathlib.Path]:
    """Every file under `root`, recursively, hidden ones excluded, in sorted path order."""
    files = []
    for folder, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        files += [pathlib.Path(folder, f) for f in filenames if not f.startswith(".")]
    return sorted(files, key=lambda p: p.relative_to(root).parts)


def _expand(paths: PathLike | Iterable[PathLike]) -> list[pathlib.Path]:
    """The files named by `paths` (folders expanded), checking that each path exists."""
    entries = [paths] if isinstance(paths, str | os.PathLike) else list(paths)
    files: list[pathlib.Path] = []
    for entry in entries:
        path = pathlib.Path(entry)
        if path.is_dir():
            files += _files_under(path)
        elif path.is_file():
            files.append(path)
        else:
            raise ValueError(f"data source {str(entry)!r} does not exist; expected {ACCEPTED}")
    return files


def load_corpus(paths: PathLike | Iterable[PathLike]) -> Corpus:
    """Read text files, ``.jsonl`` files and folders (recursive, sorted) into documents.

    A text file is one document. Each line of a ``.jsonl`` file is ``{"text": ...}`` or
    ``{"prompt": ..., "completion": ...}`` (loss on the completion only). Files that are empty,
    unreadable or not UTF-8 text (binary) are skipped and listed in `Corpus.skipped`; so are
    hidden files and folders (names starting with a dot) inside folders.

    Args:
        paths: One path or several.

    Returns:
        The documents in order, with the files used and skipped.

    Raises:
        ValueError: If a path does not exist, a JSONL line is malformed (file and line named),
            or no source holds any usable text.

    Example:
        >>> import tempfile
        >>> folder = pathlib.Path(tempfile.mkdtemp())
        >>> _ = (folder / "a.txt").write_text("hello")
        >>> _ = (folder / "b.bin").write_bytes(bytes([0, 255]))
        >>> corpus = load_corpus(folder)
        >>> corpus.documents[0].text, len(corpus.skipped)
        ('hello', 1)
    """
    documents: list[Document] = []
    used: list[str] = []
    skipped: list[str] = []
    for file in _expand(paths):
        if file.suffix.lower() == ".jsonl":
            docs = _read_jsonl(file)
        else:
            text = _read_text(file)
            docs = [] if text is None else [Document(text, source=str(file))]
        (used if docs else skipped).append(str(file))
        documents += docs
    if not documents:
        names = [paths] if isinstance(paths, str | os.PathLike) else list(paths)
        raise ValueError(
            f"no usable text in {[str(n) for n in names]} ({len(skipped)} file(s) found, all "
            f"empty, unreadable or not UTF-8 text); expected {ACCEPTED}"
        )
    return Corpus(tuple(documents), tuple(used), tuple(skipped))


def load_documents(paths: PathLike | Iterable[PathLike]) -> list[Document]:
    """The documents of `load_corpus` (see there for the accepted sources and errors).

    Args:
        paths: One path or several.

    Returns:
        The documents in order.

    Example:
        >>> import tempfile
        >>> file = pathlib.Path(tempfile.mkdtemp()) / "qa.jsonl"
        >>> _ = file.write_text('{"prompt": "1+1=", "completion": "2"}')
        >>> load_documents(file)[0].text
        '2'
    """
    return list(load_corpus(paths).documents)


def pydoc_topics() -> list[str]:
    """The English prose of Python's help topics (``pydoc_data``, about 460 KB), in key order.

    Returns:
        One document per topic.

    Example:
        >>> len(pydoc_topics()) > 50
        True
    """
    from pydoc_data.topics import topics

    return [topics[key] for key in sorted(topics)]


def stdlib_code_files(split: str) -> list[pathlib.Path]:
    """The standard library's own Python files (no tests, no site-packages), split train/eval.

    A file is in ``"eval"`` when ``crc32(path relative to the stdlib) % 20 == 0`` (about 5%),
    else in ``"train"``, so the split is the same on every run and machine with that Python.

    Args:
        split: ``"train"`` or ``"eval"``.

    Returns:
        Readable ``*.py`` files in sorted order, excluding folders named ``test``, ``tests``,
        ``idle_test``, ``site-packages`` and files named ``test_*``.

    Raises:
        ValueError: If `split` is not ``"train"`` or ``"eval"``.

    Example:
        >>> len(stdlib_code_files("eval")) > 10
        True
    """
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval'; got {split!r}")
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    files = []
    for folder, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in EXCLUDED_DIRS]
        for name in filenames:
            path = pathlib.Path(folder, name)
            if name.endswith(".py") and not name.startswith("test_") and os.access(path, os.R_OK):
                held_out = zlib.crc32(path.relative_to(root).as_posix().encode()) % EVAL_BUCKETS
                if (held_out == 0) == (split == "eval"):
                    files.append(path)
    return sorted(files, key=lambda p: p.relative_to(root).parts)


@dataclasses.dataclass(frozen=True, eq=False)
class Packed:
    """Documents packed into windows; window ``k`` is ``stream[k*seq_len : (k+1)*seq_len + 1]``.

    Consecutive windows share one token, so every token but the first is a target exactly
    once. ``weights[k, t]`` is the loss weight of predicting ``tokens[k, t]``: 1 for text,
    completions and their EOS, 0 for prompts and BOS.

    Example:
        >>> from train.tokenizer import ByteTokenizer
        >>> pack_documents(["abc"], ByteTokenizer(), seq_len=2).tokens.tolist()
        [[256, 97, 98], [98, 99, 257]]
    """

    tokens: np.ndarray  # (num_windows, seq_len + 1) int32
    weights: np.ndarray  # (num_windows, seq_len + 1) float32
    num_documents: int
    num_tokens: int  # all tokens of the stream, including the dropped tail

    @property
    def seq_len(self) -> int:
        """Tokens per example (the window length minus one)."""
        return int(self.tokens.shape[1]) - 1

    @property
    def num_windows(self) -> int:
        """Number of windows (examples)."""
        return int(self.tokens.shape[0])


def _as_document(doc: Document | str, index: int) -> Document:
    if isinstance(doc, Document):
        return doc
    if isinstance(doc, str):
        return Document(doc)
    raise TypeError(f"docs[{index}]: expected a str or Document, found {type(doc).__name__}")


def _describe(docs: list[Document]) -> str:
    """E.g. "3 documents from a.txt, b.jsonl" for error messages."""
    sources = list(dict.fromkeys(d.source for d in docs if d.source))
    more = f" and {len(sources) - 3} more" if len(sources) > 3 else ""
    where = f" from {', '.join(sources[:3])}{more}" if sources else ""
    return f"{len(docs)} document(s){where}"


def _token_stream(docs: list[Document], tokenizer: Tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """All documents as one stream ``[BOS] prompt text EOS ...`` and its loss weights."""
    prompts = encode_texts(tokenizer, [d.prompt for d in docs])
    texts = encode_texts(tokenizer, [d.text for d in docs])
    bos = np.array([] if tokenizer.bos_id is None else [tokenizer.bos_id], np.int32)
    eos = np.array([tokenizer.eos_id], np.int32)
    pieces = [piece for p, t in zip(prompts, texts, strict=True) for piece in (bos, p, t, eos)]
    lengths = np.fromiter(map(len, pieces), np.int64, count=len(pieces))
    weight_of_piece = np.tile(np.array([0, 0, 1, 1], np.float32), len(docs))
    tokens = np.concatenate(pieces).astype(np.int32, copy=False) if pieces else eos[:0]
    return tokens, np.repeat(weight_of_piece, lengths)


def pack_documents(docs: Iterable[Document | str], tokenizer: Tokenizer, *, seq_len: int) -> Packed:
    """Tokenize documents, join them (``[BOS] prompt text EOS``) and cut fixed windows.

    Window ``k`` is ``stream[k*seq_len : k*seq_len + seq_len + 1]``; the last partial window
    is dropped (`Packed.num_tokens` still counts it). Strings are documents with no prompt.

    Args:
        docs: Documents or strings.
        tokenizer: Encodes the text; gives BOS (if any) and EOS.
        seq_len: Tokens per example; windows hold ``seq_len + 1``.

    Returns:
        The packed windows and their loss weights.

    Raises:
        TypeError: If a document is not a str or Document.
        ValueError: If `seq_len` is not a positive int, the tokenizer gives ids outside its
            vocabulary, or the documents give fewer than ``seq_len + 1`` tokens.

    Example:
        >>> from train.tokenizer import ByteTokenizer
        >>> packed = pack_documents([Document("b", prompt="a")], ByteTokenizer(), seq_len=3)
        >>> packed.tokens.tolist(), packed.weights.tolist()
        ([[256, 97, 98, 257]], [[0.0, 0.0, 1.0, 1.0]])
    """
    _check_count("seq_len", seq_len)
    documents = [_as_document(doc, i) for i, doc in enumerate(docs)]
    tokens, weights = _token_stream(documents, tokenizer)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= tokenizer.vocab_size):
        raise ValueError(
            f"tokenizer {tokenizer.name!r} produced ids in [{tokens.min()}, {tokens.max()}], "
            f"outside its vocabulary [0, {tokenizer.vocab_size})"
        )
    if tokens.size < seq_len + 1:
        raise ValueError(
            f"{_describe(documents)} give {tokens.size} tokens, fewer than one window of "
            f"seq_len + 1 = {seq_len + 1}; add text or lower seq_len"
        )
    windows = np.lib.stride_tricks.sliding_window_view(tokens, seq_len + 1)[::seq_len]
    window_weights = np.lib.stride_tricks.sliding_window_view(weights, seq_len + 1)[::seq_len]
    return Packed(
        tokens=np.ascontiguousarray(windows),
        weights=np.ascontiguousarray(window_weights),
        num_documents=len(documents),
        num_tokens=int(tokens.size),
    )


def data_summary(packed: Packed, corpus: Corpus | None = None) -> dict[str, int]:
    """Counts for display: documents, tokens, windows, trained and dropped tokens, files.

    Args:
        packed: The packed data.
        corpus: Adds ``files`` and ``skipped_files`` when given.

    Returns:
        A dict of counts.

    Example:
        >>> from train.tokenizer import ByteTokenizer
        >>> data_summary(pack_documents(["abcd"], ByteTokenizer(), seq_len=2))
        {'documents': 1, 'tokens': 6, 'windows': 2, 'seq_len': 2, 'trained_tokens': 4,
         'dropped_tokens': 1}
    """
    summary = {
        "documents": packed.num_documents,
        "tokens": packed.num_tokens,
        "windows": packed.num_windows,
        "seq_len": packed.seq_len,
        "trained_tokens": int(np.count_nonzero(packed.weights[:, 1:])),
        "dropped_tokens": max(0, packed.num_tokens - packed.num_windows * packed.seq_len - 1),
    }
    if corpus is not None:
        summary |= {"files": len(corpus.files), "skipped_files": len(corpus.skipped)}
    return summary


def _check_count(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int; got {value!r}")


def _batch(tokens: np.ndarray, weights: np.ndarray) -> Batch:
    """Windows ``(B, seq_len + 1)`` as ``inputs`` / ``targets`` / ``weights`` ``(B, seq_len)``."""
    return {
        "inputs": np.ascontiguousarray(tokens[:, :-1]),
        "targets": np.ascontiguousarray(tokens[:, 1:]),
        "weights": np.ascontiguousarray(weights[:, 1:]),
    }


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer: a bijective hash of uint64 values."""
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def shuffled_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """A permutation of ``range(n)`` drawn from ``(seed, epoch)``, the same on every machine.

    Integer hashing and a sort only, so it does not depend on NumPy's random streams.

    Args:
        seed: Any int.
        epoch: The epoch number (each epoch is shuffled differently).
        n: Length of the permutation.

    Returns:
        int64 array of shape ``(n,)``.

    Example:
        >>> sorted(shuffled_order(0, 0, 5).tolist())
        [0, 1, 2, 3, 4]
    """
    key = _mix(_mix(np.array([seed % 2**64], np.uint64)) ^ np.array([epoch], np.uint64))
    return np.argsort(_mix(np.arange(n, dtype=np.uint64) ^ key), kind="stable")


class Loader:
    """Shuffled training batches for one process (built by `make_loader`).

    Args:
        packed: From `pack_documents`.
        batch_size: Windows per batch on this process.
        seed: Seeds the shuffle.
        shard_index: This process's index.
        shard_count: Number of processes.
        num_epochs: Stop after this many epochs; None repeats forever.

    Raises:
        TypeError: If `seed` is not an int.
        ValueError: As `make_loader`.

    Example:
        >>> from train.tokenizer import ByteTokenizer
        >>> packed = pack_documents(["some text"] * 4, ByteTokenizer(), seq_len=4)
        >>> loader = Loader(packed, batch_size=2, seed=0)
        >>> next(loader)["inputs"].shape, loader.step
        ((2, 4), 1)
    """

    def __init__(
        self,
        packed: Packed,
        *,
        batch_size: int,
        seed: int,
        shard_index: int = 0,
        shard_count: int = 1,
        num_epochs: int | None = None,
    ) -> None:
        for name, value in (("batch_size", batch_size), ("shard_count", shard_count)):
            _check_count(name, value)
        if num_epochs is not None:
            _check_count("num_epochs", num_epochs)
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise TypeError(f"seed must be an int; got {type(seed).__name__}")
        if not isinstance(shard_index, int) or not 0 <= shard_index < shard_count:
            raise ValueError(f"shard_index must be in [0, {shard_count}); got {shard_index!r}")
        global_batch = batch_size * shard_count
        if global_batch > packed.num_windows:
            raise ValueError(
                f"global batch size {global_batch} (batch_size={batch_size} x shard_count="
                f"{shard_count}) exceeds the {packed.num_windows} packed windows; use a "
                "smaller batch_size, a smaller seq_len or more data"
            )
        self._packed, self._batch_size, self._seed = packed, batch_size, seed
        self._global_batch, self._step = global_batch, 0
        self._tokens_crc32 = zlib.crc32(np.ascontiguousarray(packed.tokens).data)  # 20 ms: 12 MB
        self._orders: dict[int, np.ndarray] = {}
        positions = packed.num_windows * num_epochs if num_epochs else sys.maxsize
        steps = positions // global_batch
        self.num_batches = steps if num_epochs else None
        # Element s of this range is the s-th run of `batch_size` positions of the global
        # shuffled stream; process k takes runs k, k + S, ..., so global batch j is the
        # concatenation of the processes' j-th batches in process order.
        runs = grain.MapDataset.range(steps * shard_count)[shard_index::shard_count]
        options = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
        self._iterator = runs.map(self._run).to_iter_dataset(options).__iter__()

    def _order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            if len(self._orders) > 1:
                del self._orders[min(self._orders)]
            self._orders[epoch] = shuffled_order(self._seed, epoch, self._packed.num_windows)
        return self._orders[epoch]

    def _run(self, run: int) -> Batch:
        """Positions ``[run * batch_size, (run + 1) * batch_size)`` of the shuffled stream."""
        epoch, offset = divmod(run * self._batch_size, self._packed.num_windows)
        rows = self._order(epoch)[offset : offset + self._batch_size]
        if len(rows) < self._batch_size:  # the run crosses into the next epoch
            rows = np.concatenate([rows, self._order(epoch + 1)[: self._batch_size - len(rows)]])
        return _batch(self._packed.tokens[rows], self._packed.weights[rows])

    def __iter__(self) -> Loader:
        return self

    def __next__(self) -> Batch:
        batch = next(self._iterator)
        self._step += 1
        return batch

    @property
    def step(self) -> int:
        """Batches served so far (the same on every process)."""
        return self._step

    @property
    def epoch(self) -> float:
        """Epochs served so far, e.g. 1.5 when half-way through the second."""
        return self._step * self._global_batch / self._packed.num_windows

    def _fingerprint(self) -> dict[str, int]:
        packed = self._packed
        values = (self._seed, self._global_batch, packed.num_windows, packed.seq_len)
        return dict(zip(STATE_KEYS, (*values, self._tokens_crc32), strict=True))

    def get_state(self) -> dict[str, Any]:
        """The position, as a JSON-serializable dict (the same on every process).

        Returns:
            A dict for `set_state`.

        Example:
            >>> from train.tokenizer import ByteTokenizer
            >>> packed = pack_documents(["some text"] * 4, ByteTokenizer(), seq_len=4)
            >>> Loader(packed, batch_size=2, seed=0).get_state()["step"]
            0
        """
        return {"step": self._step, "grain": self._iterator.get_state()} | self._fingerprint()

    def set_state(self, state: dict[str, Any]) -> None:
        """Continue from a `get_state` result: the next batches are those that followed it.

        The state must come from the same packed data, seed and global batch size (the
        split of that batch across processes may differ).

        Args:
            state: A dict from `get_state` (possibly through ``json.dumps`` / ``json.loads``).

        Raises:
            TypeError: If `state` is not a dict.
            ValueError: If keys are missing or it belongs to other data, seed or batch size.

        Example:
            >>> from train.tokenizer import ByteTokenizer
            >>> packed = pack_documents(["some text"] * 4, ByteTokenizer(), seq_len=4)
            >>> loader = Loader(packed, batch_size=2, seed=0)
            >>> loader.set_state(Loader(packed, batch_size=2, seed=0).get_state())
        """
        if not isinstance(state, dict):
            raise TypeError(f"loader state must be a dict; got {type(state).__name__}")
        missing = [key for key in ("step", "grain", *STATE_KEYS) if key not in state]
        if missing:
            raise ValueError(f"loader state lacks {missing}; expected a Loader.get_state() dict")
        for key, expected in self._fingerprint().items():
            if state[key] != expected:
                raise ValueError(
                    f"loader state has {key}={state[key]!r} but this loader has {expected!r}; "
                    "a state resumes only the same data, seed and global batch size"
                )
        self._iterator.set_state(state["grain"])
        self._step = int(state["step"])


def make_loader(
    packed: Packed,
    *,
    batch_size: int,
    seed: int,
    shard_index: int = 0,
    shard_count: int = 1,
    num_epochs: int | None = None,
) -> Loader:
    """Shuffled, sharded, resumable training batches over packed windows (built on grain).

    Every epoch visits each window once in an order drawn from ``(seed, epoch)``; batches
    run across epoch boundaries. The global batch has ``batch_size * shard_count`` windows;
    process `shard_index` gets rows ``[shard_index * batch_size, (shard_index + 1) *
    batch_size)`` of it, so concatenating the processes' batches in order gives the batch
    of a single process with the global batch size.

    Args:
        packed: From `pack_documents`.
        batch_size: Windows per batch on this process.
        seed: Seeds the shuffle.
        shard_index: This process's index.
        shard_count: Number of processes.
        num_epochs: Stop after this many epochs (a final partial batch is dropped); None
            repeats forever.

    Returns:
        An iterator of ``{"inputs", "targets": int32, "weights": float32}``, each
        ``(batch_size, seq_len)``, with `get_state` / `set_state`.

    Raises:
        ValueError: If a count is not positive, `shard_index` is out of range, or the global
            batch is larger than the number of windows.

    Example:
        >>> from train.tokenizer import ByteTokenizer
        >>> packed = pack_documents(["some text"] * 4, ByteTokenizer(), seq_len=4)
        >>> loader = make_loader(packed, batch_size=2, seed=0, num_epochs=1)
        >>> len(list(loader)) == packed.num_windows // 2
        True
    """
    return Loader(
        packed,
        batch_size=batch_size,
        seed=seed,
        shard_index=shard_index,
        shard_count=shard_count,
        num_epochs=num_epochs,
    )


def eval_batches(
    packed: Packed, *, batch_size: int, max_batches: int | None = None
) -> Iterator[Batch]:
    """Every window once, in order; the last batch is padded with zero-weight rows.

    Args:
        packed: From `pack_documents`.
        batch_size: Windows per batch.
        max_batches: Stop after this many batches (None: all).

    Returns:
        An iterator of batches with the keys of `make_loader`'s.

    Raises:
        ValueError: If `batch_size` or `max_batches` is not a positive int.

    Example:
        >>> from train.tokenizer import ByteTokenizer
        >>> packed = pack_documents(["abcdefg"], ByteTokenizer(), seq_len=2)
        >>> [float(b["weights"].sum()) for b in eval_batches(packed, batch_size=3)]
        [6.0, 2.0]
    """
    _check_count("batch_size", batch_size)
    if max_batches is not None:
        _check_count("max_batches", max_batches)
    count = -(-packed.num_windows // batch_size)
    count = count if max_batches is None else min(count, max_batches)
    return (_eval_batch(packed, i * batch_size, batch_size) for i in range(count))


def _eval_batch(packed: Packed, start: int, size: int) -> Batch:
    tokens = packed.tokens[start : start + size]
    weights = packed.weights[start : start + size]
    pad = ((0, size - len(tokens)), (0, 0))
    return _batch(np.pad(tokens, pad), np.pad(weights, pad))
