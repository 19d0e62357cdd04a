"""From settings to data: the built-in corpora, held-out splits, batches and prompts.

``--data`` takes files, folders, ``.jsonl`` files and two built-ins that every CPython
installation carries: ``stdlib`` (the standard library's Python code, tests excluded,
held-out files for eval) and ``pydoc`` (the English prose of ``pydoc_data.topics``, every
20th topic held out). User data without ``--eval-data`` gives every 20th packed window to
evaluation.
"""

from __future__ import annotations

import pathlib
import shutil
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np

from train.base import Base
from train.data import Packed, eval_batches, make_loader, pack_documents
from train.settings import Settings, UserError
from train.sources import Document, load_documents, pydoc_topics, stdlib_code_files
from train.tokenizer import Tokenizer, load_tokenizer

__all__ = [
    "BUILTINS",
    "batches",
    "check_seq_len",
    "copy_tokenizer_files",
    "documents",
    "encode_prompt",
    "eval_sets",
    "load_splits",
    "tokenizer_for",
]

BUILTINS = ("stdlib", "pydoc")
HOLDOUT = 20  # every 20th topic / window goes to evaluation
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
)


def documents(specs: tuple[str, ...], split: str) -> list[Document]:
    """The documents of `specs` for ``split`` (``"train"`` or ``"eval"``) of the built-ins.

    Files and folders are read whole whatever the split (the caller splits them).

    Example:
        >>> len(documents(("pydoc",), "eval")) < len(documents(("pydoc",), "train"))
        True
    """
    docs: list[Document] = []
    paths = [p for p in specs if p not in BUILTINS]
    if "stdlib" in specs:
        docs += load_documents(stdlib_code_files(split))
    if "pydoc" in specs:
        topics = pydoc_topics()
        keep = [t for i, t in enumerate(topics) if (i % HOLDOUT == 0) == (split == "eval")]
        docs += [Document(t, source="pydoc") for t in keep]
    if paths:
        docs += load_documents(paths)
    return docs


def _subset(packed: Packed, rows: np.ndarray) -> Packed:
    return Packed(
        tokens=packed.tokens[rows],
        weights=packed.weights[rows],
        num_documents=packed.num_documents,
        num_tokens=int(rows.size * packed.seq_len),
    )


def load_splits(s: Settings, tokenizer: Tokenizer) -> tuple[Packed, Packed]:
    """Packed training and evaluation windows for the run.

    Raises:
        UserError: data with no usable text, or too little for one window.
    """
    try:
        train = pack_documents(documents(s.data, "train"), tokenizer, seq_len=s.seq_len)
        if s.eval_data:
            ev = pack_documents(documents(s.eval_data, "eval"), tokenizer, seq_len=s.seq_len)
        elif all(d in BUILTINS for d in s.data):
            ev = pack_documents(documents(s.data, "eval"), tokenizer, seq_len=s.seq_len)
        else:
            held = np.arange(train.num_windows) % HOLDOUT == HOLDOUT - 1
            if not held.any():
                raise UserError(
                    f"--data {' '.join(s.data)} packs into {train.num_windows} windows of "
                    f"{s.seq_len} tokens: too few to hold out evaluation; pass --eval-data."
                )
            train, ev = _subset(train, np.flatnonzero(~held)), _subset(train, np.flatnonzero(held))
    except ValueError as err:
        raise UserError(str(err)) from None
    if train.num_windows < s.batch_size:
        raise UserError(
            f"--data gives {train.num_windows} training windows of {s.seq_len} tokens, fewer "
            f"than --batch-size {s.batch_size}; add data or lower --batch-size / --seq-len."
        )
    return train, ev


def eval_sets(s: Settings, packed: Packed) -> list[dict[str, np.ndarray]]:
    """Fixed evaluation batches: up to ``eval_batches * batch_size`` windows spread evenly
    over the held-out data (so one evaluation sees all of it, not its first files)."""
    n = min(packed.num_windows, s.eval_batches * s.batch_size)
    rows = np.unique(np.linspace(0, packed.num_windows - 1, n).round().astype(int))
    return list(eval_batches(_subset(packed, rows), batch_size=s.batch_size))


def batches(s: Settings, packed: Packed) -> Iterator[dict[str, np.ndarray]]:
    """Endless shuffled training batches of the whole global batch (one process)."""
    return make_loader(packed, batch_size=s.batch_size, seed=s.seed)


def tokenizer_for(s: Settings, *, default: str) -> Tokenizer:
    """The tokenizer ``--tokenizer`` names (`default` for ``auto``)."""
    return load_tokenizer(default if s.tokenizer == "auto" else s.tokenizer)


def encode_prompt(tokenizer: Tokenizer, prompt: str) -> jax.Array:
    """``(1, len)`` ids of `prompt`, after BOS when the tokenizer has one (as in training).

    Example:
        >>> from train.tokenizer import ByteTokenizer
        >>> encode_prompt(ByteTokenizer(), "hi").tolist()
        [[256, 104, 105]]
    """
    ids = [int(i) for i in tokenizer.encode(prompt)]
    if tokenizer.bos_id is not None:
        ids = [tokenizer.bos_id, *ids]
    if not ids:
        raise UserError("--prompt is empty and the tokenizer has no BOS token to start from.")
    return jax.numpy.asarray([ids], jax.numpy.int32)


def check_seq_len(s: Settings, base: Base) -> None:
    """``--seq-len`` must fit the model's positions."""
    if s.seq_len > base.config.max_seq_len:
        raise UserError(
            f"--seq-len {s.seq_len} is longer than the {base.config.max_seq_len} positions the "
            f"model in {base.source} supports; lower --seq-len."
        )


def copy_tokenizer_files(base: Base, folder: pathlib.Path) -> list[str]:
    """Copies the base's tokenizer files (HF bases) next to exported weights."""
    copied: list[str] = []
    src = pathlib.Path(base.source)
    for name in TOKENIZER_FILES:
        if (src / name).exists():
            shutil.copy(src / name, folder / name)
            copied.append(name)
    return copied


def describe(packed: Packed) -> dict[str, Any]:
    """Counts for messages: windows and tokens."""
    return {"windows": packed.num_windows, "tokens": packed.num_tokens}
