"""Gemma 3 text models, proven against transformers and PEFT on PyTorch-CPU.

Small random ``Gemma3ForCausalLM`` checkpoints written here by transformers load with the same
float32 logits (<= 1e-4, unrolled and scanned) on sequences longer than the sliding window,
and ours load back in transformers; KV-cache greedy sampling (base and LoRA) equals the
no-cache path and transformers' own ``generate`` past the window; PEFT adapters go both ways;
and ``python -m train finetune --base <tiny Gemma 3 folder>`` runs end to end with a
SentencePiece-style (byte-fallback BPE) ``tokenizer.json``. The measured differences print
with ``-s``."""

from __future__ import annotations

import dataclasses
import json
import pathlib
import shutil
import sysconfig
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tokenizers
from helpers import perturb
from hf_models import random_model, require_interop
from test_sampling import Forward

import lora_jax as lj
from train import random_base
from train.cli import main
from train.models import (
    Llama,
    LlamaConfig,
    config_from_hf,
    config_to_hf,
    from_pretrained,
    init_cache,
    rope_frequencies,
    save_pretrained,
)
from train.models.peft_map import module_map
from train.sampling import generate

torch, transformers = require_interop()
peft = pytest.importorskip("peft")
pytestmark = pytest.mark.filterwarnings(
    "ignore::UserWarning", "ignore::FutureWarning", "ignore::RuntimeWarning"
)

SIZES = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=64,
    sliding_window=4,  # the 13-token inputs are longer than the window
)
CASES: dict[str, dict[str, Any]] = {
    # tied head, local : global = 1 : 1, query_pre_attn_scalar != head_dim
    "gemma3": {"sliding_window_pattern": 2, "query_pre_attn_scalar": 24},
    # untied head, 2 : 1, linear rope scaling on global layers, final-logit soft-capping
    "gemma3-linear": {
        "sliding_window_pattern": 3,
        "tie_word_embeddings": False,
        "rope_scaling": {"rope_type": "linear", "factor": 4.0},
        "rope_local_base_freq": 500.0,
        "final_logit_softcapping": 3.0,
    },
}
IDS = np.random.default_rng(0).integers(0, SIZES["vocab_size"], (3, 13))
TOL = 1e-4
MEASURED: dict[str, float] = {}


def hf_model(case: str):
    """A tiny random transformers model; every weight drawn (Gemma's norms scale by 1 + w)."""
    config = transformers.Gemma3TextConfig(**SIZES, **CASES[case], attn_implementation="eager")
    return random_model(config, norm_offset=False)


def torch_logits(model, ids=IDS) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(np.asarray(ids))).logits.float().numpy()


def check(name: str, ours: Any, ref: np.ndarray, tol: float = TOL) -> None:
    diff = float(np.abs(np.asarray(ours, np.float32) - ref).max())
    MEASURED[name] = diff
    print(f"\n{name}: max |logit diff| = {diff:.2e} (logits up to {np.abs(ref).max():.2f})")
    assert diff <= tol, f"{name}: max abs diff {diff} > {tol}"


def logits(config: LlamaConfig, variables, ids=IDS) -> np.ndarray:
    return np.asarray(jax.jit(Llama(config).apply)(variables, jnp.asarray(ids)))


@pytest.fixture(scope="module", params=sorted(CASES))
def checkpoint(request, tmp_path_factory):
    """``(case, folder, torch model, its logits)`` of each transformers-written case."""
    model = hf_model(request.param)
    folder = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(folder)
    return request.param, folder, model, torch_logits(model)


# ------------------------------------------------------------------- transformers parity


def test_transformers_checkpoint_loads_with_same_logits(checkpoint):
    case, folder, _, ref = checkpoint
    config, variables = from_pretrained(folder)
    assert config.family == "gemma3" and config.qk_norm and config.sliding_window == 4
    assert config.global_layers == ((1, 3) if case == "gemma3" else (2,))
    assert config.tie_embeddings == (case == "gemma3")
    check(f"load {case}", logits(config, variables), ref)
    scan_config, scanned = from_pretrained(folder, scan_layers=True)  # mixed kinds scan too
    check(f"load {case} scanned", logits(scan_config, scanned), ref)


def test_our_checkpoint_loads_in_transformers(checkpoint, tmp_path):
    """save_pretrained (what `export --merged-out` writes): transformers builds the same
    architecture and computes the same logits; the config round-trips."""
    case, folder, _, _ = checkpoint
    config, variables = from_pretrained(folder)
    assert config_from_hf(config_to_hf(config)) == config
    save_pretrained(tmp_path, config, variables)
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["architectures"] == ["Gemma3ForCausalLM"]
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager")
    assert type(model).__name__ == "Gemma3ForCausalLM"
    assert model.config.layer_types == hf_model(case).config.layer_types
    check(f"save {case}", logits(config, variables), torch_logits(model.eval()))


def _greedy_without_cache(forward, params, prompt: np.ndarray, new: int):
    """The reference: the full forward, no cache, argmax appended each step (a fixed-size
    buffer, one compilation; a causal model never lets earlier positions see the filler)."""
    batch, length = prompt.shape
    ids = np.full((batch, length + new), SIZES["vocab_size"] - 1, np.int32)
    ids[:, :length] = prompt
    run = jax.jit(forward)
    for t in range(length - 1, length + new - 1):
        ids[:, t + 1] = np.asarray(run(params, jnp.asarray(ids)))[:, t].argmax(-1)
    return ids[:, length:].tolist()


@pytest.mark.parametrize(("case", "scan"), [("gemma3", False), ("gemma3-linear", True)])
def test_greedy_with_cache_equals_no_cache_past_the_window(case, scan, tmp_path):
    """5 prompt + 8 new tokens > window 4: the local layers' cached keys are masked to the
    window. Base and LoRA; the base also equals transformers' greedy ``generate``."""
    model = hf_model(case)
    model.save_pretrained(tmp_path)
    config, variables = from_pretrained(tmp_path, scan_layers=scan)
    prompt, new = IDS[:2, :5].astype(np.int32), 8
    want = _greedy_without_cache(Llama(config).apply, variables, prompt, new)
    got = generate(
        Forward(config),
        variables,
        jnp.asarray(prompt),
        init_cache(config, 2, prompt.shape[1] + new),
        max_new_tokens=new,
        key=jax.random.key(0),
    )
    assert got == want
    with torch.no_grad():
        theirs = model.generate(
            torch.from_numpy(prompt).long(), max_new_tokens=new, do_sample=False
        )
    assert theirs[:, prompt.shape[1] :].tolist() == want
    layouts = lj.infer_layouts(Llama(config).apply, variables, jnp.asarray(prompt))
    lora_config = lj.LoraConfig(rank=2, targets="all-linear")
    frozen, lora = lj.split(variables, lora_config, key=jax.random.key(0), layouts=layouts)
    lora = perturb(lora, jax.random.key(1), scale=0.3)
    apply = lj.lora_apply(Llama(config).apply)
    want = _greedy_without_cache(lambda p, ids: apply(p[0], p[1], ids), (frozen, lora), prompt, new)
    cache = init_cache(config, 2, prompt.shape[1] + new)
    got = generate(
        Forward(config, lora=True),
        (frozen, lora),
        jnp.asarray(prompt),
        cache,
        max_new_tokens=new,
        key=jax.random.key(0),
    )
    assert got == want


# ------------------------------------------------------------------------------- config


def test_legacy_config_keys_read_the_same():
    """A transformers 4 ``config.json`` (``rope_theta``, ``rope_local_base_freq``,
    ``rope_scaling``, ``sliding_window_pattern``) gives the same config as transformers 5's."""
    legacy = {**SIZES, "architectures": ["Gemma3ForCausalLM"], "rope_theta": 1e6}
    legacy |= {"rope_local_base_freq": 500.0, "sliding_window_pattern": 3}
    legacy |= {"rope_scaling": {"rope_type": "linear", "factor": 4.0}}
    legacy |= {"tie_word_embeddings": False, "final_logit_softcapping": 3.0}
    new = hf_model("gemma3-linear").config.to_dict()
    assert config_from_hf(legacy) == config_from_hf(new)
    c = config_from_hf(new)
    local, full = rope_frequencies(c, local=True), rope_frequencies(c)
    np.testing.assert_allclose(local[1], 500.0 ** (-2 / 16), rtol=1e-6)
    np.testing.assert_allclose(full[1], 1e6 ** (-2 / 16) / 4.0, rtol=1e-6)


def test_config_errors():
    base = {**SIZES, "architectures": ["Gemma3ForCausalLM"]}
    with pytest.raises(ValueError, match="hidden_activation 'gelu' is not supported"):
        config_from_hf({**base, "hidden_activation": "gelu"})
    with pytest.raises(ValueError, match="use_bidirectional_attention=true is not supported"):
        config_from_hf({**base, "use_bidirectional_attention": True})
    with pytest.raises(ValueError, match="attn_logit_softcapping is not supported"):
        config_from_hf({**base, "attn_logit_softcapping": 50.0})
    with pytest.raises(ValueError, match=r"layer_types must list 4 of"):
        config_from_hf({**base, "layer_types": ["sliding_attention"] * 3})
    local_scaled = {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}
    rope = {"sliding_attention": local_scaled, "full_attention": {"rope_theta": 1e6}}
    with pytest.raises(ValueError, match="rope scaling 'linear' on the sliding-window layers"):
        config_from_hf({**base, "rope_parameters": rope})
    config = config_from_hf(base)
    assert config.global_layers == () and config.tie_embeddings  # pattern 6 > 4 layers
    with pytest.raises(ValueError, match="Gemma 3 fields; set family='gemma3'"):
        dataclasses.replace(config, family="llama")
    with pytest.raises(ValueError, match=r"needs qk_norm=True"):
        dataclasses.replace(config, qk_norm=False)
    with pytest.raises(ValueError, match=r"global_layers must be in \[0, 4\)"):
        dataclasses.replace(config, global_layers=(4,))
    with pytest.raises(ValueError, match="family must be one of"):
        dataclasses.replace(config, family="gemma2")
    assert LlamaConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


# --------------------------------------------------------------------------------- PEFT


def _is_w(x):
    return isinstance(x, lj.LoraWeights)


def _flat(lora) -> dict[str, lj.LoraWeights]:
    leaves = jax.tree_util.tree_flatten_with_path(lora, is_leaf=_is_w)[0]
    return {"/".join(str(k.key) for k in kp): w for kp, w in leaves}


def _peft_logits(folder: pathlib.Path, adapter: pathlib.Path, ids=IDS) -> np.ndarray:
    base = transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager")
    return torch_logits(peft.PeftModel.from_pretrained(base, adapter).eval(), ids)


_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PEFT_CASES = {
    # checkpoint: (our targets, PEFT's target_modules)
    "gemma3": ("all-linear", "all-linear"),
    # untied: the scaled embedding (PEFT scales its delta too) and the head
    "gemma3-linear": ([".*/kernel", ".*/embedding"], [*_LINEAR, "embed_tokens", "lm_head"]),
}


@pytest.mark.parametrize("case", sorted(PEFT_CASES))
def test_peft_both_ways(case, tmp_path):
    ours_targets, peft_modules = PEFT_CASES[case]
    folder = tmp_path / "base"
    hf_model(case).save_pretrained(folder)
    config, variables = from_pretrained(folder)
    layouts = lj.infer_layouts(Llama(config).apply, variables, jnp.asarray(IDS))
    base = logits(config, variables)
    # ours -> PEFT
    lora_config = lj.LoraConfig(rank=2, alpha=3.0, targets=ours_targets)
    frozen, lora = lj.split(variables, lora_config, key=jax.random.key(0), layouts=layouts)
    lora = perturb(lora, jax.random.key(1), scale=0.3)
    lj.peft.export_adapter(tmp_path / "ours", lora, module_map=module_map(config))
    ours = np.asarray(jax.jit(lj.lora_apply(Llama(config).apply))(frozen, lora, IDS))
    assert np.abs(ours - base).max() > 1e-2
    check(f"PEFT export {case}", ours, _peft_logits(folder, tmp_path / "ours"))
    # PEFT -> ours
    hf = peft.LoraConfig(r=2, lora_alpha=4, target_modules=peft_modules, init_lora_weights=False)
    torch_base = transformers.AutoModelForCausalLM.from_pretrained(
        folder, attn_implementation="eager"
    )
    peft.get_peft_model(torch_base, hf).save_pretrained(tmp_path / "theirs")
    back = lj.peft.import_adapter(
        tmp_path / "theirs", variables, module_map=module_map(config), layouts=layouts
    )
    assert sorted(_flat(back)) == sorted(_flat(lora))
    theirs = _peft_logits(folder, tmp_path / "theirs")
    mine = np.asarray(jax.jit(lj.lora_apply(Llama(config).apply))(variables, back, IDS))
    check(f"PEFT import {case}", mine, theirs)


def test_random_base_folder_is_a_gemma3_transformers_loads(tmp_path, capsys):
    """The smoke run's base maker (`train.random_base`) at test size: same layer pattern as
    Gemma 3 270M; transformers computes the same logits from the folder."""
    assert random_base.main(["gemma3-tiny", str(tmp_path / "g")]) == 0
    assert "parameters (random)" in capsys.readouterr().out
    config, variables = from_pretrained(tmp_path / "g")
    assert config == random_base.RANDOM_PRESETS["gemma3-tiny"]
    model = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "g", attn_implementation="eager"
    )
    assert model.config.layer_types == ["sliding_attention"] * 5 + ["full_attention"]
    check("random base", logits(config, variables), torch_logits(model.eval()))
    big = random_base.RANDOM_PRESETS["gemma3-270m"]
    assert config_from_hf(config_to_hf(big)) == big
    config, variables = from_pretrained(tmp_path / "g")
    assert config == dataclasses.replace(random_base.RANDOM_PRESETS["gemma3-tiny"])
    model = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "g", attn_implementation="eager"
    )
    assert model.config.layer_types == ["sliding_attention"] * 5 + ["full_attention"]
    check("random base", logits(config, variables), torch_logits(model.eval()))
    big = random_base.RANDOM_PRESETS["gemma3-270m"]
    assert config_from_hf(config_to_hf(big)) == big


# ---------------------------------------------------------------------------------- CLI


def gemma_style_tokenizer(folder: pathlib.Path) -> tokenizers.Tokenizer:
    """A SentencePiece-style BPE like Gemma's ``tokenizer.json`` (spaces as ``▁``, byte
    fallback ``<0xNN>`` pieces, ``<pad>``/``<eos>``/``<bos>``/``<unk>`` at ids 0-3)."""
    text = (pathlib.Path(sysconfig.get_paths()["stdlib"]) / "textwrap.py").read_text()
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.normalizer = tokenizers.normalizers.Replace(" ", "▁")
    tok.decoder = tokenizers.decoders.Sequence(
        [
            tokenizers.decoders.Replace("▁", " "),
            tokenizers.decoders.ByteFallback(),
            tokenizers.decoders.Fuse(),
        ]
    )
    specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=300, special_tokens=specials, show_progress=False
    )
    tok.train_from_iterator(text.splitlines()[:400], trainer=trainer)
    spec = json.loads(tok.to_str())
    for i in range(256):
        spec["model"]["vocab"].setdefault(f"<0x{i:02X}>", len(spec["model"]["vocab"]))
    tok = tokenizers.Tokenizer.from_str(json.dumps(spec))
    tok.save(str(folder / "tokenizer.json"))
    config = {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return tok


@pytest.fixture(scope="module")
def cli_folder(tmp_path_factory) -> pathlib.Path:
    """A tiny Gemma 3 HF folder (config.json + safetensors + tokenizer.json) made as the
    smoke run makes its 270M base (`train.random_base`), with 44 more embeddings than the
    tokenizer has ids (as Gemma's padded vocabulary has)."""
    folder = tmp_path_factory.mktemp("cli") / "tiny-gemma3"
    folder.mkdir()
    tok = gemma_style_tokenizer(folder)
    config = random_base.RANDOM_PRESETS["gemma3-tiny"]
    config = dataclasses.replace(config, vocab_size=tok.get_vocab_size() + 44)
    random_base.write_random_base(folder, config, key=jax.random.key(0))
    return folder


def test_gemma_style_tokenizer_loads(cli_folder):
    from train.tokenizer import load_tokenizer

    tok = load_tokenizer(str(cli_folder))
    text = "def wrap(text): ☃ é"  # ☃ and é are not in the trained vocabulary: byte fallback
    assert tok.decode(tok.encode(text)) == text
    assert (tok.bos_id, tok.eos_id) == (2, 1)


@pytest.mark.slow
def test_finetune_and_export_gemma3(cli_folder, tmp_path, capsys):
    run = tmp_path / "run"
    code = tmp_path / "code"
    code.mkdir()
    for name in ("textwrap.py", "shlex.py"):
        shutil.copy(pathlib.Path(sysconfig.get_paths()["stdlib"]) / name, code / name)
    argv = ["finetune", "--base", str(cli_folder), "--data", str(code), "--run-dir", str(run)]
    argv += ["--steps", "4", "--seq-len", "32", "--batch-size", "4", "--no-progress"]
    argv += ["--eval-batches", "1", "--max-new-tokens", "12", "--lr", "1e-2", "--log-every", "2"]
    assert main([*argv, "--scan-layers"]) == 0
    out = capsys.readouterr().out
    assert "Tokens/s" in out and "Peak memory" in out  # what the smoke run reports
    summary = json.loads((run / "summary.json").read_text())
    assert np.isfinite(summary["lora_eval_loss"])
    assert summary["lora_eval_loss"] < summary["base_eval_loss"]
    assert summary["tokens_per_s"] > 0 and summary["peak_rss_bytes"] > 2**20
    peft_out = tmp_path / "peft"
    argv = ["export", "--base", str(cli_folder), "--run-dir", str(run)]
    assert main([*argv, "--peft-out", str(peft_out)]) == 0
    config, variables = from_pretrained(cli_folder, scan_layers=True)  # as trained
    lora = lj.load_adapter(run / "adapter")
    ids = IDS % config.vocab_size
    ours = np.asarray(jax.jit(lj.lora_apply(Llama(config).apply))(variables, lora, ids))
    check("CLI PEFT export", ours, _peft_logits(cli_folder, peft_out, ids))
