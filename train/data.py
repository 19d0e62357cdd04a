"""Training data: tokenize documents, pack them into fixed windows, batch them with grain.

The documents come from `train.sources` (files, folders, JSONL, and two corpora every
CPython carries). `pack_documents` concatenates the tokenized documents into windows of
``seq_len + 1`` tokens with a loss weight per token; `make_loader` serves shuffled,
sharded, resumable training batches; `eval_batches` serves every window once, in order.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import zlib
from collections.abc import Iterable, Iterator
from typing import Any

import grain
import numpy as np

from train.sources import Corpus, Document
from train.tokenizer import Tokenizer, encode_texts

__all__ = [
    "Loader",
    "Packed",
    "data_summary",
    "eval_batches",
    "make_loader",
    "pack_documents",
    "shuffled_order",
]

Batch = dict[str, np.ndarray]
PathLike = str | os.PathLike[str]
STATE_KEYS = ("seed", "global_batch_size", "num_windows", "seq_len", "tokens_crc32")


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
