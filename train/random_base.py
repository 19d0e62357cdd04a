"""Random-weight HuggingFace folders of real model sizes, for smoke runs without a download.

``python -m train.random_base gemma3-270m DIR`` writes ``DIR/config.json`` and
``DIR/model.safetensors`` (random weights, Gemma 3 270M's shapes) that ``python -m train
finetune --base DIR --tokenizer byte`` and ``transformers`` load; the README's smoke run
uses it to measure what a LoRA fine-tune of that size costs on a CPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from train.models import Llama, LlamaConfig, num_params, save_pretrained

__all__ = ["RANDOM_PRESETS", "main", "write_random_base"]

_GEMMA3_270M = LlamaConfig(
    # google/gemma-3-270m's config.json: 5 local (window 512, base 1e4) : 1 global (1e6)
    vocab_size=262_144,
    hidden_size=640,
    intermediate_size=2048,
    num_layers=18,
    num_heads=4,
    num_kv_heads=1,
    head_dim=256,
    max_seq_len=32_768,
    rope_theta=1_000_000.0,
    rope_local_theta=10_000.0,
    rms_norm_eps=1e-6,
    tie_embeddings=True,
    sliding_window=512,
    global_layers=(5, 11, 17),
    qk_norm=True,
    family="gemma3",
    query_pre_attn_scalar=256,
)
RANDOM_PRESETS: dict[str, LlamaConfig] = {
    "gemma3-270m": _GEMMA3_270M,
    # The same layer pattern at test size (the code path of the smoke run, in seconds).
    "gemma3-tiny": dataclasses.replace(
        _GEMMA3_270M,
        vocab_size=300,
        hidden_size=32,
        intermediate_size=64,
        num_layers=6,
        num_heads=2,
        head_dim=16,
        max_seq_len=128,
        sliding_window=8,
        global_layers=(5,),
        query_pre_attn_scalar=16,
    ),
}


def write_random_base(
    path: str | os.PathLike, config: LlamaConfig, *, key: jax.Array
) -> pathlib.Path:
    """Writes a HuggingFace folder of `config` with the model's random initial weights.

    Args:
        path: the folder to create.
        config: the architecture.
        key: PRNG key of the initialisation.

    Returns:
        The folder.

    Example:
        >>> import tempfile, jax
        >>> from train.models import from_pretrained
        >>> folder = write_random_base(tempfile.mkdtemp() + "/g",
        ...     RANDOM_PRESETS["gemma3-tiny"], key=jax.random.key(0))
        >>> from_pretrained(folder)[0].global_layers
        (5,)
    """
    variables = Llama(config).init(key, jnp.zeros((1, 1), jnp.int32))
    return save_pretrained(path, config, variables, dtype=config.param_dtype)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m train.random_base PRESET DIR``: writes the folder and says its size."""
    parser = argparse.ArgumentParser(prog="python -m train.random_base", description=__doc__)
    parser.add_argument("preset", choices=sorted(RANDOM_PRESETS))
    parser.add_argument("out", help="the folder to write")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    config = RANDOM_PRESETS[args.preset]
    shapes = jax.eval_shape(Llama(config).init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
    folder = write_random_base(args.out, config, key=jax.random.key(args.seed))
    print(f"wrote {folder}: {args.preset}, {num_params(shapes):,} parameters (random)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
