"""The tokenizer a GGUF file stores (``tokenizer.ggml.*``) <-> the app's tokenizers.

A GGUF file has no ``tokenizer.json``: it lists the tokens, the BPE merges, each token's
type and the BOS/EOS ids. `load_gguf_tokenizer` rebuilds a byte-level BPE tokenizer
(``tokenizer.ggml.model = "gpt2"``, as Llama 3, Qwen2 and SmolLM files use) the way
transformers' GGUF loader does; `gguf_vocab_fields` writes the base's tokenizer (byte-level
BPE, or the built-in byte tokenizer) back as those fields. SentencePiece vocabularies
(``"llama"``) are refused: pass ``--tokenizer path/to/tokenizer.json`` for those.
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
from typing import Any

import tokenizers

from train.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer

__all__ = ["load_gguf_tokenizer", "gguf_vocab_fields", "tokenizer_from_fields"]

NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5  # llama.cpp's token types
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# ``tokenizer.ggml.pre`` -> the split regex before the byte mapping (None: GPT-2's own).
SPLITS: dict[str, str | None] = {
    "gpt2": None,
    "default": None,
    "llama-bpe": _LLAMA3_SPLIT,
    "llama3": _LLAMA3_SPLIT,
    "llama-v3": _LLAMA3_SPLIT,
    "smaug-bpe": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT,
    "deepseek-r1-qwen": _QWEN2_SPLIT,
}
_PRE_OF_SPLIT = {None: "gpt2", _LLAMA3_SPLIT: "llama-bpe", _QWEN2_SPLIT: "qwen2"}


@functools.cache
def byte_chars() -> tuple[str, ...]:
    """GPT-2's printable spelling of each byte 0..255 (byte-level BPE's alphabet).

    Example:
        >>> byte_chars()[ord("a")], byte_chars()[ord(" ")]
        ('a', 'Ġ')
    """
    kept = [*range(33, 127), *range(161, 173), *range(174, 256)]
    spare = iter(range(256, 512))
    return tuple(chr(b) if b in kept else chr(next(spare)) for b in range(256))


def _pre_tokenizer(pre: str, where: str) -> Any:
    if pre not in SPLITS:
        raise ValueError(
            f"{where}: tokenizer.ggml.pre {pre!r} is not supported (supported: "
            f"{', '.join(SPLITS)}); pass --tokenizer path/to/tokenizer.json."
        )
    split = SPLITS[pre]
    if split is None:
        return tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    return tokenizers.pre_tokenizers.Sequence(
        [
            tokenizers.pre_tokenizers.Split(tokenizers.Regex(split), behavior="isolated"),
            tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def tokenizer_from_fields(fields: dict[str, Any], *, name: str) -> HFTokenizer:
    """The byte-level BPE tokenizer of a GGUF file's ``tokenizer.ggml.*`` metadata.

    Args:
        fields: the metadata (`train.models.gguf_in.read_fields`).
        name: the file, for messages and as the tokenizer's spec.

    Returns:
        The tokenizer; control tokens are special, user-defined ones are matched whole.

    Raises:
        ValueError: no vocabulary, a tokenizer model other than ``"gpt2"``, an unknown
            ``tokenizer.ggml.pre``, or no EOS id (each names the field).
    """
    model = fields.get("tokenizer.ggml.model")
    if model != "gpt2":
        raise ValueError(
            f"{name}: tokenizer.ggml.model {model!r} is not supported; only byte-level BPE "
            "('gpt2'). Pass --tokenizer path/to/tokenizer.json."
        )
    tokens = fields.get("tokenizer.ggml.tokens")
    eos = fields.get("tokenizer.ggml.eos_token_id")
    if not tokens or eos is None:
        missing = "tokenizer.ggml.tokens" if not tokens else "tokenizer.ggml.eos_token_id"
        raise ValueError(f"{name}: the metadata key {missing!r} is missing.")
    alphabet = set(byte_chars())
    spelled = [
        t if set(t) <= alphabet else "".join(byte_chars()[b] for b in t.encode()) for t in tokens
    ]
    merges = [tuple(m.split(" ", 1)) for m in fields.get("tokenizer.ggml.merges") or []]
    bpe = tokenizers.models.BPE(
        vocab={t: i for i, t in enumerate(spelled)}, merges=merges, fuse_unk=False
    )
    backend = tokenizers.Tokenizer(bpe)
    backend.pre_tokenizer = _pre_tokenizer(fields.get("tokenizer.ggml.pre", "gpt2"), name)
    backend.decoder = tokenizers.decoders.ByteLevel()
    types = fields.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    added = tokenizers.AddedToken
    backend.add_special_tokens(
        [
            added(t, normalized=False, special=True)
            for t, kind in zip(tokens, types, strict=True)
            if kind == CONTROL and set(t) <= alphabet
        ]
    )
    backend.add_tokens(
        [
            added(t, normalized=False, special=False)
            for t, s, kind in zip(tokens, spelled, types, strict=True)
            if kind == USER_DEFINED and t == s
        ]
    )
    bos = fields.get("tokenizer.ggml.bos_token_id")
    return HFTokenizer.from_backend(backend, name=name, bos_id=bos, eos_id=int(eos))


def load_gguf_tokenizer(path: str | os.PathLike) -> HFTokenizer:
    """The tokenizer stored in the GGUF file `path` (see `tokenizer_from_fields`).

    Raises:
        ValueError: the file is unreadable or its tokenizer unsupported.
    """
    from train.models.gguf_in import gguf_module, read_fields

    try:
        reader = gguf_module().GGUFReader(path)
    except (ValueError, OSError) as err:
        raise ValueError(f"{path}: not a readable GGUF file ({err}).") from err
    return tokenizer_from_fields(read_fields(reader), name=str(pathlib.Path(path)))


def _pre_of(pre: dict[str, Any] | None, name: str) -> str:
    """``tokenizer.ggml.pre`` of a ``tokenizer.json`` pre-tokenizer (byte-level only)."""
    kind = (pre or {}).get("type")
    if kind == "ByteLevel" and pre and pre.get("use_regex", True):
        return "gpt2"
    steps = (pre or {}).get("pretokenizers") or []
    if kind == "Sequence" and [s.get("type") for s in steps] == ["Split", "ByteLevel"]:
        regex = steps[0].get("pattern", {}).get("Regex")
        if regex in _PRE_OF_SPLIT and not steps[1].get("use_regex", True):
            return _PRE_OF_SPLIT[regex]
    raise ValueError(
        f"tokenizer {name}: GGUF export writes byte-level BPE tokenizers with GPT-2's, "
        f"Llama 3's or Qwen2's split; this pre-tokenizer is not one: {json.dumps(pre)[:200]}."
    )


def _hf_fields(tok: HFTokenizer) -> tuple[str, list[str], list[int], list[str]]:
    """(pre, tokens, token types, merges) of a byte-level BPE ``tokenizer.json``."""
    spec = json.loads(tok.backend.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or (spec.get("decoder") or {}).get("type") != "ByteLevel":
        raise ValueError(
            f"tokenizer {tok.name}: GGUF export writes byte-level BPE tokenizers; this one is "
            f"{model.get('type')} with a {(spec.get('decoder') or {}).get('type')} decoder."
        )
    pre = _pre_of(spec.get("pre_tokenizer"), tok.name)
    tokens = [f"[PAD{i}]" for i in range(tok.vocab_size)]
    types = [UNUSED] * tok.vocab_size
    for token, i in model["vocab"].items():
        tokens[i], types[i] = token, NORMAL
    for entry in spec.get("added_tokens") or []:
        tokens[entry["id"]] = entry["content"]
        types[entry["id"]] = CONTROL if entry.get("special") else USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    return pre, tokens, types, merges


def gguf_vocab_fields(tokenizer: Tokenizer, vocab_size: int) -> dict[str, Any]:
    """The ``tokenizer.ggml.*`` metadata of the base's tokenizer, for a model of `vocab_size`.

    Ids the tokenizer lacks (a padded embedding) become ``[PAD{id}]`` tokens of type
    unused, as llama.cpp's converter writes them.

    Args:
        tokenizer: a byte-level BPE `HFTokenizer` or the `ByteTokenizer`.
        vocab_size: the model's embedding rows (>= the tokenizer's ids).

    Returns:
        ``{key: value}`` (ids as ints, lists of str / int).

    Raises:
        ValueError: the tokenizer is neither, or has more ids than the model.

    Example:
        >>> f = gguf_vocab_fields(ByteTokenizer(), 258)
        >>> f["tokenizer.ggml.tokens"][97], f["tokenizer.ggml.tokens"][256:]
        ('a', ['<s>', '</s>'])
    """
    if isinstance(tokenizer, ByteTokenizer):
        pre, merges = "gpt2", list[str]()
        tokens = [*byte_chars(), "<s>", "</s>"]
        types = [NORMAL] * 256 + [CONTROL, CONTROL]
    elif isinstance(tokenizer, HFTokenizer):
        pre, tokens, types, merges = _hf_fields(tokenizer)
    else:
        raise ValueError(f"tokenizer {tokenizer.name}: GGUF export needs a byte-level tokenizer.")
    if len(tokens) > vocab_size:
        raise ValueError(
            f"tokenizer {tokenizer.name} has {len(tokens)} ids; the model only {vocab_size}."
        )
    pad = range(len(tokens), vocab_size)
    fields: dict[str, Any] = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": tokens + [f"[PAD{i}]" for i in pad],
        "tokenizer.ggml.token_type": types + [UNUSED] * len(pad),
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.eos_token_id": tokenizer.eos_id,
        "tokenizer.ggml.add_bos_token": tokenizer.bos_id is not None,
    }
    if tokenizer.bos_id is not None:
        fields["tokenizer.ggml.bos_token_id"] = tokenizer.bos_id
    return fields
