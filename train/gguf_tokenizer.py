"""The tokenizer a GGUF file stores (``tokenizer.ggml.*``) <-> the app's tokenizers.

A GGUF file has no ``tokenizer.json``: it lists the tokens, the BPE merges, each token's
type and the BOS/EOS ids. `load_gguf_tokenizer` rebuilds a byte-level BPE tokenizer
(``tokenizer.ggml.model = "gpt2"``, as Llama 3, Qwen2 and SmolLM files use) the way
transformers' GGUF loader does; `gguf_vocab_fields` writes the base's tokenizer (byte-level
BPE, or the built-in byte tokenizer) back as those fields.

SentencePiece-style vocabularies (``tokenizer.ggml.model = "llama"``, as Gemma and Llama 2
files store them: tokens, scores, token types, BOS/EOS/UNK/PAD ids) are rebuilt with
transformers' own GGUF tokenizer builders (a byte-fallback BPE ``tokenizers`` backend;
Gemma's for the ``gemma*`` architectures), so they encode as ``AutoTokenizer.from_pretrained(
..., gguf_file=...)`` does; that needs ``pip install transformers``. A byte-fallback BPE
``tokenizer.json`` (Gemma's kind) is written back as such a vocabulary, its merges included
(llama.cpp ranks by the scores, ``-rank`` of the merge that makes each token).
"""

from __future__ import annotations

import functools
import importlib
import json
import os
import pathlib
from typing import Any

import tokenizers

from train.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer

__all__ = ["load_gguf_tokenizer", "gguf_vocab_fields", "tokenizer_from_fields"]

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6  # llama.cpp's
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


def _transformers_builder(name: str) -> tuple[dict[str, Any], Any]:
    """transformers' (GGUF key -> tokenizer dict key, ``convert_gguf_tokenizer``)."""
    # transformers 5 keeps them in integrations/gguf; transformers 4 in integrations/ggml.
    for where in ("gguf.gguf_tokenizer_mapping", "ggml"):
        try:
            module = importlib.import_module(f"transformers.integrations.{where}")
            return module.GGUF_TOKENIZER_MAPPING["tokenizer"], module.convert_gguf_tokenizer
        except (ImportError, AttributeError):
            continue
    raise ValueError(
        f"{name}: a SentencePiece GGUF vocabulary (tokenizer.ggml.model 'llama') is rebuilt "
        "with transformers' GGUF tokenizer converters: pip install transformers (or pass "
        "--tokenizer path/to/tokenizer.json)."
    )


def _sentencepiece(fields: dict[str, Any], name: str) -> HFTokenizer:
    """The tokenizer of a ``"llama"`` (SentencePiece) vocabulary, built by transformers."""
    mapping, convert = _transformers_builder(name)
    tokens = fields.get("tokenizer.ggml.tokens")
    eos = fields.get("tokenizer.ggml.eos_token_id")
    if not tokens or eos is None:
        missing = "tokenizer.ggml.tokens" if not tokens else "tokenizer.ggml.eos_token_id"
        raise ValueError(f"{name}: the metadata key {missing!r} is missing.")
    if not fields.get("tokenizer.ggml.scores") and not fields.get("tokenizer.ggml.merges"):
        raise ValueError(f"{name}: the metadata key 'tokenizer.ggml.scores' is missing.")
    spec = {
        short: fields[f"tokenizer.{key}"]
        for key, short in mapping.items()
        if f"tokenizer.{key}" in fields
    }
    arch = str(fields.get("general.architecture", "llama"))
    try:
        backend, _ = convert(arch, spec)
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{name}: transformers cannot build its tokenizer ({err}).") from err
    # transformers' tokenizer classes add their default specials (Gemma's ``<mask>``) when the
    # file lacks them: ids past the file's vocabulary, which no embedding row has. Dropped.
    spec_json = json.loads(backend.to_str())
    added = spec_json.get("added_tokens") or []
    if any(entry["id"] >= len(tokens) for entry in added):
        spec_json["added_tokens"] = [entry for entry in added if entry["id"] < len(tokens)]
        backend = tokenizers.Tokenizer.from_str(json.dumps(spec_json))
    bos = fields.get("tokenizer.ggml.bos_token_id")
    return HFTokenizer.from_backend(backend, name=name, bos_id=bos, eos_id=int(eos))


def tokenizer_from_fields(fields: dict[str, Any], *, name: str) -> HFTokenizer:
    """The tokenizer of a GGUF file's ``tokenizer.ggml.*`` metadata.

    Byte-level BPE (``"gpt2"``) is rebuilt here; SentencePiece (``"llama"``) by transformers'
    GGUF tokenizer builders (`_sentencepiece`).

    Args:
        fields: the metadata (`train.models.gguf_in.read_fields`).
        name: the file, for messages and as the tokenizer's spec.

    Returns:
        The tokenizer; control tokens are special, user-defined ones are matched whole.

    Raises:
        ValueError: no vocabulary, a tokenizer model other than ``"gpt2"`` / ``"llama"``, an
            unknown ``tokenizer.ggml.pre``, no EOS id (each names the field), or a
            SentencePiece vocabulary without transformers installed.
    """
    model = fields.get("tokenizer.ggml.model")
    if model == "llama":
        return _sentencepiece(fields, name)
    if model != "gpt2":
        raise ValueError(
            f"{name}: tokenizer.ggml.model {model!r} is not supported; only byte-level BPE "
            "('gpt2') and SentencePiece ('llama'). Pass --tokenizer path/to/tokenizer.json."
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


def _sentencepiece_fields(tok: HFTokenizer, spec: dict[str, Any]) -> dict[str, Any]:
    """The ``"llama"`` (SentencePiece) fields of a byte-fallback BPE ``tokenizer.json``."""
    model = spec["model"]
    tokens = [f"[PAD{i}]" for i in range(tok.vocab_size)]
    types = [UNUSED] * tok.vocab_size
    scores = [0.0] * tok.vocab_size
    for token, i in model["vocab"].items():
        tokens[i] = token
        is_byte = len(token) == 6 and token.startswith("<0x") and token.endswith(">")
        types[i] = BYTE if is_byte else UNUSED if token == f"[PAD{i}]" else NORMAL
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    for rank, merge in enumerate(merges):
        made = model["vocab"].get(merge.replace(" ", "", 1))
        if made is not None:
            scores[made] = -float(rank + 1)
    unk = model.get("unk_token")
    if unk in model["vocab"]:
        types[model["vocab"][unk]] = UNKNOWN
    for entry in spec.get("added_tokens") or []:
        tokens[entry["id"]] = entry["content"]
        types[entry["id"]] = CONTROL if entry.get("special") else USER_DEFINED
    if unk in model["vocab"]:
        types[model["vocab"][unk]] = UNKNOWN
    text = json.dumps([spec.get("normalizer"), spec.get("pre_tokenizer")])
    fields: dict[str, Any] = {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.pre": "default",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": scores,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.add_space_prefix": "Prepend" in text
        or '"prepend_scheme": "first"' in text
        or '"prepend_scheme": "always"' in text,
    }
    if unk in model["vocab"]:
        fields["tokenizer.ggml.unknown_token_id"] = model["vocab"][unk]
    vocab = tok.backend.get_vocab(with_added_tokens=True)
    if "<pad>" in vocab:
        fields["tokenizer.ggml.padding_token_id"] = vocab["<pad>"]
    return fields


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
    unused, as llama.cpp's converter writes them. A byte-fallback BPE (SentencePiece-style,
    Gemma's) becomes a ``"llama"`` vocabulary with scores, byte pieces typed as bytes.

    Args:
        tokenizer: a byte-level or byte-fallback BPE `HFTokenizer`, or the `ByteTokenizer`.
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
    sentencepiece: dict[str, Any] = {}
    if isinstance(tokenizer, HFTokenizer):
        spec = json.loads(tokenizer.backend.to_str())
        model = spec.get("model") or {}
        if model.get("type") == "BPE" and model.get("byte_fallback"):
            sentencepiece = _sentencepiece_fields(tokenizer, spec)
    if sentencepiece:
        tokens, types = sentencepiece["tokenizer.ggml.tokens"], []
    elif isinstance(tokenizer, ByteTokenizer):
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
    if sentencepiece:
        fields = dict(sentencepiece)
        fields["tokenizer.ggml.tokens"] = tokens + [f"[PAD{i}]" for i in pad]
        fields["tokenizer.ggml.scores"] = sentencepiece["tokenizer.ggml.scores"] + [0.0] * len(pad)
        fields["tokenizer.ggml.token_type"] = sentencepiece["tokenizer.ggml.token_type"] + [
            UNUSED
        ] * len(pad)
        fields["tokenizer.ggml.eos_token_id"] = tokenizer.eos_id
        fields["tokenizer.ggml.add_bos_token"] = tokenizer.bos_id is not None
        if tokenizer.bos_id is not None:
            fields["tokenizer.ggml.bos_token_id"] = tokenizer.bos_id
        return fields
    fields = {
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
