"""``sample`` with a batch of prompts, each with its own adapter.

``sample --adapter NAME=DIR ... --prompt P ...`` continues the prompts in one compiled call
with the KV cache (`lj.multi.lora_apply_mixed`; ``base``: no adapter). Prompts of different
lengths are not padded: the batch prefills the shortest, then advances one position a
step, each row reading its own prompt until it ends.
"""

from __future__ import annotations

import dataclasses
import pathlib
import re
from functools import partial
from typing import Any, TextIO

import jax
import jax.numpy as jnp
import numpy as np

import lora_jax as lj
from train import corpora
from train.base import Base
from train.models import Llama, init_cache
from train.sampling import pick
from train.settings import Settings, UserError

__all__ = [
    "ADAPTERS",
    "BASE",
    "Row",
    "adapter_entry",
    "check_lengths",
    "generate_rows",
    "sample_mixed",
    "wants_mixed_sample",
]

ADAPTERS = "adapters"  # <run-dir>/adapters/<NAME>/: one adapter per task
BASE = "base"  # `sample --adapter base`: the plain base
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


@dataclasses.dataclass(frozen=True)
class Row:
    name: str  # the adapter's name (BASE: none)
    prompt: str
    adapter: int  # index into the stacked adapters; -1: the plain base


def adapter_entry(text: str) -> tuple[str, str | None]:
    """``(name, folder)`` of an ``--adapter`` value: ``NAME=DIR``, ``DIR`` (named after
    its folder) or ``base`` (the plain base: no folder).

    Example:
        >>> adapter_entry("code=runs/x/adapters/code"), adapter_entry("runs/y/adapter")
        (('code', 'runs/x/adapters/code'), ('adapter', 'runs/y/adapter'))
    """
    if text == BASE:
        return BASE, None
    name, sep, folder = text.partition("=")
    if sep and folder and NAME.fullmatch(name):
        return name, folder
    return pathlib.Path(text).name or text, text


def wants_mixed_sample(s: Settings) -> bool:
    """Whether ``sample`` runs a batch of prompts with their own adapters: several
    ``--adapter`` or ``--prompt``, a ``NAME=DIR`` or ``base`` entry, or a multi-task run
    (``adapters/``, no ``adapter/``) without ``--adapter``."""
    if len(s.adapter) > 1 or len(s.prompt) > 1:
        return True
    if s.adapter:
        return s.adapter[0] == BASE or adapter_entry(s.adapter[0])[1] != s.adapter[0]
    run = pathlib.Path(s.run_dir)
    return (run / ADAPTERS).is_dir() and not (run / "adapter").is_dir()


def _entries(s: Settings) -> list[tuple[str, str | None]]:
    if s.adapter:
        entries = [adapter_entry(a) for a in s.adapter]
    else:  # a multi-task run: the base, then every task's adapter
        folders = sorted(p for p in (pathlib.Path(s.run_dir) / ADAPTERS).iterdir() if p.is_dir())
        entries = [(BASE, None)] + [(p.name, str(p)) for p in folders]
    seen: set[str] = set()
    for name, _ in entries:
        if name in seen:
            raise UserError(
                f"--adapter: the name {name!r} is given twice; name each one, NAME=DIR."
            )
        seen.add(name)
    return entries


def _load_stacked(base: Base, folders: list[str]) -> Any:
    """The adapters in `folders`, padded to the largest rank and stacked."""
    loras = []
    for folder in folders:
        if not (pathlib.Path(folder) / lj.io.METADATA_FILE).exists():
            raise UserError(f"--adapter {folder}: no adapter there (no {lj.io.METADATA_FILE}).")
        try:
            loras.append(lj.load_adapter(folder, frozen=base.variables, strict=True))
        except ValueError as err:
            raise UserError(f"--adapter {folder}: {err}") from None
    rank = max(w.rank for lora in loras for w in jax.tree.leaves(lora, is_leaf=_is_weights))
    try:
        return lj.multi.stack_adapters([lj.multi.pad_rank(lora, rank) for lora in loras])
    except ValueError as err:
        raise UserError(f"--adapter: these adapters cannot run in one batch: {err}") from None


def _is_weights(x: Any) -> bool:
    return isinstance(x, lj.LoraWeights)


def sample_mixed(s: Settings, base: Base, out: TextIO) -> list[dict[str, str]]:
    """``python -m train sample`` with several adapters or prompts: pairs the ``--prompt``
    texts with the ``--adapter`` entries (one each, one prompt for every adapter, or one
    adapter for every prompt), runs them as one batch and prints a block per row.

    Raises:
        UserError: counts that do not pair, a name given twice, a folder with no adapter,
            or adapters that cannot be stacked (other targets).
    """
    entries = _entries(s)
    prompts, n = list(s.prompt), len(entries)
    if len(prompts) == 1:
        prompts *= n
    elif n == 1:
        entries *= len(prompts)
    elif len(prompts) != n:
        raise UserError(
            f"{len(prompts)} --prompt texts and {n} --adapter entries: give one prompt per "
            "adapter, one prompt for every adapter, or one adapter for every prompt."
        )
    folders = list(dict.fromkeys(f for _, f in entries if f is not None))
    stacked = _load_stacked(base, folders) if folders else None
    rows = [
        Row(name, p, -1 if f is None else folders.index(f))
        for (name, f), p in zip(entries, prompts, strict=True)
    ]
    check_lengths(s, base, rows)
    found = []
    for row, text in generate_rows(s, base, stacked, rows):
        print(f"--- {row.name}:", file=out)
        print(row.prompt + text, file=out)
        found.append({"adapter": row.name, "prompt": row.prompt, "text": text})
    return found


def check_lengths(s: Settings, base: Base, rows: list[Row]) -> list[list[int]]:
    ids = [corpora.encode_prompt(base.tokenizer, r.prompt)[0].tolist() for r in rows]
    longest = max(map(len, ids))
    if longest + s.max_new_tokens > base.config.max_seq_len:
        raise UserError(
            f"the longest --prompt ({longest} tokens) + --max-new-tokens {s.max_new_tokens} "
            f"exceed the model's {base.config.max_seq_len} positions; lower --max-new-tokens."
        )
    return ids


@dataclasses.dataclass(frozen=True)
class _MixedForward:
    """``forward((frozen, stacked, ids), tokens, cache)``: each row with its adapter; the
    logits keep the tokenizer's ids only."""

    apply: Any
    vocab: int

    def __call__(self, params: Any, tokens: jax.Array, cache: Any) -> Any:
        frozen, stacked, ids = params
        if stacked is None:
            logits, cache = self.apply(frozen, tokens, cache=cache)
        else:
            logits, cache = self.apply(frozen, stacked, ids, tokens, cache=cache)
        return logits[..., : self.vocab], cache


@partial(jax.jit, static_argnames=("forward", "shortest", "max_new_tokens", "temperature", "top_k"))
def _generate_rows(forward, params, tokens, lengths, cache, key, *, shortest, max_new_tokens,
                   temperature, top_k):  # fmt: skip
    """Prefills the `shortest` prompt length, then one position a step: a row still inside
    its prompt takes its next prompt token, a row past it the picked one."""
    logits, cache = forward(params, tokens[:, :shortest], cache)
    logits = logits[:, -1]
    padded = jnp.pad(tokens, ((0, 0), (0, max_new_tokens)))
    positions = jnp.arange(shortest, tokens.shape[1] + max_new_tokens)

    def step(carry, x):
        logits, cache = carry
        t, k = x
        picked = pick(logits, key=k, temperature=temperature, top_k=top_k)
        token = jnp.where(t < lengths, padded[:, t], picked)
        logits, cache = forward(params, token[:, None], cache)
        return (logits[:, -1], cache), token

    keys = jax.random.split(key, positions.shape[0])
    _, out = jax.lax.scan(step, (logits, cache), (positions, keys))
    return out.T


def generate_rows(s: Settings, base: Base, stacked: Any, rows: list[Row]) -> list[tuple[Row, str]]:
    """Continues every row's prompt with its adapter (index into `stacked`; -1 the base)
    in one compiled call with the KV cache; prompts may differ in length. Greedy rows equal
    sampling each prompt alone with its adapter."""
    ids = check_lengths(s, base, rows)
    lengths = np.array([len(i) for i in ids], np.int32)
    tokens = np.zeros((len(ids), lengths.max()), np.int32)
    for r, prompt in enumerate(ids):
        tokens[r, : len(prompt)] = prompt
    model = Llama(base.config)
    if stacked is None:
        forward = _MixedForward(model.apply, base.tokenizer.vocab_size)
    else:
        mixed = lj.multi.lora_apply_mixed(model.apply, deterministic=True)
        forward = _MixedForward(mixed, base.tokenizer.vocab_size)
    adapter_ids = jnp.asarray([r.adapter for r in rows], jnp.int32)
    cache = init_cache(
        base.config, len(ids), int(lengths.max()) + s.max_new_tokens, dtype=jnp.dtype(s.dtype)
    )
    out = np.asarray(
        _generate_rows(
            forward,
            (base.variables, stacked, adapter_ids),
            jnp.asarray(tokens),
            jnp.asarray(lengths),
            cache,
            jax.random.key(s.seed),
            shortest=int(lengths.min()),
            max_new_tokens=s.max_new_tokens,
            temperature=float(s.temperature),
            top_k=s.top_k,
        )
    )
    found = []
    for r, row in enumerate(rows):
        start = int(lengths[r] - lengths.min())
        new = out[r, start : start + s.max_new_tokens].tolist()
        eos = base.tokenizer.eos_id
        if eos is not None and eos in new:
            new = new[: new.index(eos) + 1]
        found.append((row, base.tokenizer.decode(new)))
    return found
