"""Where training text comes from: files, folders, JSONL, and two corpora every CPython carries.

Text files (any extension; binary or non-UTF-8 files are skipped and counted), folders of
them (recursive, sorted, hidden entries skipped), JSONL files (``{"text": ...}`` or
``{"prompt": ..., "completion": ...}`` per line), `pydoc_topics` (English prose) and
`stdlib_code_files` (the standard library's Python source, tests excluded, with a
deterministic held-out split).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import sysconfig
import zlib
from collections.abc import Iterable
from typing import Any

__all__ = [
    "ACCEPTED",
    "Corpus",
    "Document",
    "load_corpus",
    "load_documents",
    "pydoc_topics",
    "stdlib_code_files",
]

PathLike = str | os.PathLike[str]
ACCEPTED = "a UTF-8 text file, a .jsonl file, or a folder of them"
JSONL_SHAPE = 'a JSON object with a "text" string, or "prompt" and "completion" strings'
EXCLUDED_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages"})
EVAL_BUCKETS = 20  # a stdlib file is held out for eval when crc32(relative path) % 20 == 0


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
