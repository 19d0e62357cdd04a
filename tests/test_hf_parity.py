"""Logit parity with HuggingFace transformers (PyTorch, CPU, eager attention), both ways:
transformers checkpoints load in `from_pretrained`, ours load in `AutoModelForCausalLM`."""

from __future__ import annotations

import functools
import json
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hf_models import random_model, require_interop

from train.models import Llama, LlamaConfig, from_pretrained, save_pretrained

torch, transformers = require_interop()

SIZES = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)
LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}
HF_CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", {"rope_theta": 500.0}),
    "llama-tied-llama3": ("LlamaConfig", {"tie_word_embeddings": True, "rope_scaling": {**LLAMA3}}),
    "mistral-window": ("MistralConfig", {"sliding_window": 5}),
    "qwen2-bias": ("Qwen2Config", {"rms_norm_eps": 1e-5}),
    "qwen2-window-tied": (
        "Qwen2Config",
        {
            "use_sliding_window": True,
            "sliding_window": 4,
            "max_window_layers": 0,
            "tie_word_embeddings": True,
        },
    ),
}
IDS = np.random.default_rng(0).integers(0, SIZES["vocab_size"], (3, 17))


def hf_model(kind: str, **kw):
    """A tiny random transformers model; every weight drawn (norms near 1, biases non-zero)."""
    config = getattr(transformers, kind)(**SIZES, **kw, attn_implementation="eager")
    return random_model(config)


def hf_logits(model, ids=IDS) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(ids)).logits.float().numpy()


@functools.partial(jax.jit, static_argnums=0)
def ours(config: LlamaConfig, variables, ids):
    return Llama(config).apply(variables, ids)


def assert_close(ours_logits, ref, tol):
    diff = np.abs(np.asarray(ours_logits, np.float32) - ref).max()
    assert diff <= tol, f"max abs diff {diff} > {tol} (logits up to {np.abs(ref).max():.2f})"


@pytest.mark.parametrize("case", sorted(HF_CASES))
def test_transformers_checkpoint_loads_with_same_logits(tmp_path, case):
    kind, kw = HF_CASES[case]
    model = hf_model(kind, **kw)
    model.save_pretrained(tmp_path)
    ref = hf_logits(model)
    config, variables = from_pretrained(tmp_path)
    assert config.tie_embeddings == bool(kw.get("tie_word_embeddings", False))
    assert config.attention_bias == (kind == "Qwen2Config")
    assert_close(ours(config, variables, jnp.asarray(IDS)), ref, 1e-4)
    scan_config, scanned = from_pretrained(tmp_path, scan_layers=True)
    assert_close(ours(scan_config, scanned, jnp.asarray(IDS)), ref, 1e-4)


def test_sliding_window_is_shorter_than_input():
    assert HF_CASES["mistral-window"][1]["sliding_window"] < IDS.shape[1]


def test_sharded_checkpoint(tmp_path):
    model = hf_model("LlamaConfig")
    model.save_pretrained(tmp_path, max_shard_size="40KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert not (tmp_path / "model.safetensors").exists()
    config, variables = from_pretrained(tmp_path)
    assert_close(ours(config, variables, jnp.asarray(IDS)), hf_logits(model), 1e-4)


def test_bfloat16_checkpoint(tmp_path):
    hf_model("LlamaConfig", rope_scaling={**LLAMA3}).to(torch.bfloat16).save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    load = transformers.AutoModelForCausalLM.from_pretrained
    # float32 compute on the bf16 weights: the same numbers as torch with upcast weights
    config, variables = from_pretrained(tmp_path)
    ref = hf_logits(load(tmp_path, dtype=torch.float32, attn_implementation="eager").eval())
    assert_close(ours(config, variables, jnp.asarray(IDS)), ref, 1e-4)
    # bfloat16 compute on both sides: bf16 rounding differs, so a loose bound
    config, variables = from_pretrained(tmp_path, dtype="bfloat16")
    assert variables["params"]["norm"]["scale"].dtype == jnp.bfloat16
    ref = hf_logits(load(tmp_path, dtype=torch.bfloat16, attn_implementation="eager").eval())
    assert_close(ours(config, variables, jnp.asarray(IDS)), ref, 0.05 * np.abs(ref).max())


OUR_CASES: dict[str, dict[str, Any]] = {
    "llama-llama3": dict(rope_scaling=LLAMA3, rope_theta=500.0),
    "mistral-window": dict(sliding_window=4),
    "qwen2-bias-tied": dict(attention_bias=True, tie_embeddings=True),
    "scanned": dict(scan_layers=True, head_dim=8),
}


@pytest.mark.parametrize("case", sorted(OUR_CASES))
def test_our_checkpoint_loads_in_transformers(tmp_path, case):
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        max_seq_len=64,
        **OUR_CASES[case],
    )
    shapes = jax.eval_shape(Llama(config).init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
    rng = np.random.default_rng(1)
    variables = jax.tree_util.tree_map_with_path(
        lambda path, leaf: jnp.asarray(
            0.15 * rng.standard_normal(leaf.shape) + (path[-1].key == "scale"), jnp.float32
        ),
        shapes,
    )
    save_pretrained(tmp_path, config, variables)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager")
    assert (
        type(model).__name__
        == json.loads((tmp_path / "config.json").read_text())["architectures"][0]
    )
    assert_close(ours(config, variables, jnp.asarray(IDS)), hf_logits(model.eval()), 1e-4)
