"""Qwen3 dense and Qwen3-MoE, proven against transformers and PEFT on PyTorch-CPU.

Small random checkpoints written here by transformers load with the same float32 logits
(<= 1e-4) and ours load back in transformers; KV-cache greedy sampling equals the no-cache
path; PEFT adapters go both ways, the experts' as ``target_parameters``; and
``python -m train finetune --base <tiny Qwen3 folder>`` runs end to end. The measured
differences print with ``-s``."""

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
from helpers import perturb
from hf_models import random_model, require_interop
from test_cli_hf import train_tokenizer
from test_sampling import Forward, greedy_without_cache

import lora_jax as lj
from train.cli import main
from train.models import (
    Llama,
    LlamaConfig,
    config_from_hf,
    config_to_hf,
    from_hf_state,
    from_pretrained,
    init_cache,
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
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,  # not hidden_size // heads: Qwen3's explicit head_dim
    max_position_embeddings=64,
)
MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16)
CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "qwen3": ("Qwen3Config", {"rms_norm_eps": 1e-5}),
    "qwen3-tied": ("Qwen3Config", {"tie_word_embeddings": True}),
    "qwen3-window": (
        "Qwen3Config",
        {"use_sliding_window": True, "sliding_window": 5, "max_window_layers": 0},
    ),
    "moe-norm": ("Qwen3MoeConfig", {**MOE, "norm_topk_prob": True}),
    "moe-raw-mixed": ("Qwen3MoeConfig", {**MOE, "norm_topk_prob": False, "mlp_only_layers": [1]}),
}
IDS = np.random.default_rng(0).integers(0, SIZES["vocab_size"], (3, 13))
TOL = 1e-4
MEASURED: dict[str, float] = {}


def hf_model(kind: str, **kw):
    """A tiny random transformers model; every weight drawn (norms near 1)."""
    config = getattr(transformers, kind)(**SIZES, **kw, attn_implementation="eager")
    return random_model(config)


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
    kind, kw = CASES[request.param]
    model = hf_model(kind, **kw)
    folder = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(folder)
    return request.param, folder, model, torch_logits(model)


# ------------------------------------------------------------------- transformers parity


def test_transformers_checkpoint_loads_with_same_logits(checkpoint):
    case, folder, _, ref = checkpoint
    config, variables = from_pretrained(folder)
    assert config.qk_norm and config.head_dim == 16
    assert config.num_experts == (4 if case.startswith("moe") else 0)
    assert config.tie_embeddings == (case == "qwen3-tied")
    check(f"load {case}", logits(config, variables), ref)
    if case != "moe-raw-mixed":  # mixed dense / sparse layers cannot scan
        scan_config, scanned = from_pretrained(folder, scan_layers=True)
        check(f"load {case} scanned", logits(scan_config, scanned), ref)


def test_our_checkpoint_loads_in_transformers(checkpoint, tmp_path):
    """save_pretrained (what `export --merged-out` writes) of the loaded model: transformers
    builds the same architecture and computes the same logits; the config round-trips."""
    case, folder, _, _ = checkpoint
    config, variables = from_pretrained(folder)
    assert config_from_hf(config_to_hf(config)) == config
    save_pretrained(tmp_path, config, variables)
    written = json.loads((tmp_path / "config.json").read_text())
    want = "Qwen3MoeForCausalLM" if case.startswith("moe") else "Qwen3ForCausalLM"
    assert written["architectures"] == [want]
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager")
    assert type(model).__name__ == want
    check(f"save {case}", logits(config, variables), torch_logits(model.eval()))


@pytest.mark.parametrize("case", ["qwen3", "moe-norm"])
def test_greedy_with_cache_equals_no_cache(case):
    kind, kw = CASES[case]
    hf = hf_model(kind, **kw)
    config = config_from_hf(hf.config.to_dict())
    state = {k: v.numpy() for k, v in hf.state_dict().items()}
    variables = {"params": from_hf_state(config, state)}
    prompt = IDS[:2, :5].astype(np.int32)
    want, gap = greedy_without_cache(config, variables, prompt, 6)
    assert gap > 1e-4
    cache = init_cache(config, 2, 11)
    got = generate(
        Forward(config),
        variables,
        jnp.asarray(prompt),
        cache,
        max_new_tokens=6,
        key=jax.random.key(0),
    )
    assert got == want


# ------------------------------------------------------------------------------- config


def test_config_errors():
    base = {**SIZES, "architectures": ["Qwen3ForCausalLM"]}
    with pytest.raises(ValueError, match=r"attention_bias=true .* not supported"):
        config_from_hf({**base, "attention_bias": True})
    partial = {**base, "use_sliding_window": True, "max_window_layers": 1}
    with pytest.raises(ValueError, match="sliding window on 1 of 2 layers"):
        config_from_hf(partial)
    moe = {**SIZES, "architectures": ["Qwen3MoeForCausalLM"], "num_experts": 4}
    with pytest.raises(ValueError, match=r"missing keys \['moe_intermediate_size'"):
        config_from_hf(moe)
    config = config_from_hf({**moe, **MOE, "mlp_only_layers": [0]})
    assert config.mlp_only_layers == (0,) and not config.is_sparse_layer(0)
    with pytest.raises(ValueError, match="scan_layers needs every layer alike"):
        dataclasses.replace(config, scan_layers=True)
    with pytest.raises(ValueError, match=r"num_experts_per_tok \(5\) exceeds num_experts \(4\)"):
        dataclasses.replace(config, num_experts_per_tok=5)
    with pytest.raises(ValueError, match=r"mlp_only_layers must be in \[0, 2\)"):
        dataclasses.replace(config, mlp_only_layers=(2,))
    with pytest.raises(ValueError, match="experts without qk_norm"):
        config_to_hf(dataclasses.replace(config, qk_norm=False))
    with pytest.raises(ValueError, match="qk_norm with attention_bias"):
        config_to_hf(dataclasses.replace(config, num_experts=0, attention_bias=True))
    assert LlamaConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


# --------------------------------------------------------------------------------- PEFT


def _is_w(x):
    return isinstance(x, lj.LoraWeights)


def _flat(lora) -> dict[str, lj.LoraWeights]:
    leaves = jax.tree_util.tree_flatten_with_path(lora, is_leaf=_is_w)[0]
    return {"/".join(str(k.key) for k in kp): w for kp, w in leaves}


def _peft_logits(folder: pathlib.Path, adapter: pathlib.Path) -> np.ndarray:
    base = transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager")
    return torch_logits(peft.PeftModel.from_pretrained(base, adapter).eval())


def _ours(config, frozen, lora) -> np.ndarray:
    return np.asarray(jax.jit(lj.lora_apply(Llama(config).apply))(frozen, lora, IDS))


EXPERT_TARGETS = r".*/(self_attn/\w+/kernel|experts/\w+)"
PEFT_CASES = {
    # case: (checkpoint, our targets, PEFT's target_modules, PEFT's target_parameters)
    "qwen3": ("qwen3", "all-linear", "all-linear", None),
    "qwen3-tied": ("qwen3-tied", "all-linear", "all-linear", None),
    "moe-experts": (
        "moe-raw-mixed",
        EXPERT_TARGETS,
        ["q_proj", "k_proj", "v_proj", "o_proj"],
        ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
    ),
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, pathlib.Path]:
    out = {}
    for case in {c for c, *_ in PEFT_CASES.values()}:
        kind, kw = CASES[case]
        out[case] = tmp_path_factory.mktemp(f"peft-{case}")
        hf_model(kind, **kw).save_pretrained(out[case])
    return out


@pytest.mark.parametrize("case", sorted(PEFT_CASES))
def test_peft_both_ways(case, folders, tmp_path):
    name, ours_targets, peft_modules, peft_params = PEFT_CASES[case]
    folder = folders[name]
    config, variables = from_pretrained(folder)
    layouts = lj.infer_layouts(Llama(config).apply, variables, jnp.asarray(IDS))
    base = logits(config, variables)
    # ours -> PEFT
    lora_config = lj.LoraConfig(rank=2, alpha=3.0, targets=ours_targets)
    frozen, lora = lj.split(variables, lora_config, key=jax.random.key(0), layouts=layouts)
    lora = perturb(lora, jax.random.key(1), scale=0.3)
    if peft_params:
        routes = lj.routes(Llama(config).apply, frozen, lora, jnp.asarray(IDS))
        routed = {p: r for p, r in routes.items() if "/experts/" in p}
        assert sorted(routed) == [
            f"params/layers_0/mlp/experts/{n}" for n in ("down_proj", "gate_up_proj")
        ]
        assert set(routed.values()) == {"factored (ragged_dot)"}
    lj.peft.export_adapter(tmp_path / "ours", lora, module_map=module_map(config))
    record = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    experts = [f"model.layers.0.mlp.experts.{n}" for n in ("down_proj", "gate_up_proj")]
    assert (record.get("target_parameters") or []) == (experts if peft_params else [])
    ours = _ours(config, frozen, lora)
    assert np.abs(ours - base).max() > 1e-2
    check(f"PEFT export {case}", ours, _peft_logits(folder, tmp_path / "ours"))
    # PEFT -> ours
    hf = peft.LoraConfig(
        r=2,
        lora_alpha=4,
        target_modules=peft_modules,
        target_parameters=peft_params,
        init_lora_weights=False,
    )
    torch_base = transformers.AutoModelForCausalLM.from_pretrained(
        folder, attn_implementation="eager"
    )
    peft.get_peft_model(torch_base, hf).save_pretrained(tmp_path / "theirs")
    back = lj.peft.import_adapter(
        tmp_path / "theirs", variables, module_map=module_map(config), layouts=layouts
    )
    assert sorted(_flat(back)) == sorted(_flat(lora))
    theirs = _peft_logits(folder, tmp_path / "theirs")
    check(f"PEFT import {case}", _ours(config, variables, back), theirs)


@pytest.mark.parametrize(
    ("targets", "match"),
    [(r".*/mlp/gate", "Qwen3MoeTopKRouter"), (r".*/mlp/up_proj/kernel", "rewrites target_modules")],
)
def test_what_peft_cannot_load_is_refused(folders, tmp_path, targets, match):
    """The router (not an nn.Linear) and, on a MoE model, a dense MLP layer's kernels
    (PEFT renames them to the experts' parameters) are export errors."""
    config, variables = from_pretrained(folders["moe-raw-mixed"])
    layouts = lj.infer_layouts(Llama(config).apply, variables, jnp.asarray(IDS))
    cfg = lj.LoraConfig(rank=2, targets=targets)
    _, lora = lj.split(variables, cfg, key=jax.random.key(0), layouts=layouts)
    with pytest.raises(ValueError, match=match):
        lj.peft.export_adapter(tmp_path, lora, module_map=module_map(config))


# ---------------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def cli_folder(tmp_path_factory) -> pathlib.Path:
    """A tiny Qwen3-MoE HF folder (config.json + safetensors + tokenizer.json)."""
    folder = tmp_path_factory.mktemp("cli") / "tiny-qwen3-moe"
    folder.mkdir()
    tok = train_tokenizer(folder)
    sizes = {**SIZES, "vocab_size": tok.get_vocab_size(), "max_position_embeddings": 128}
    config = transformers.Qwen3MoeConfig(**sizes, **MOE, attn_implementation="eager")
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return folder


@pytest.mark.slow
def test_finetune_and_export_qwen3_moe(cli_folder, tmp_path):
    run = tmp_path / "run"
    code = tmp_path / "code"
    code.mkdir()
    for name in ("textwrap.py", "shlex.py"):
        shutil.copy(pathlib.Path(sysconfig.get_paths()["stdlib"]) / name, code / name)
    argv = ["finetune", "--base", str(cli_folder), "--data", str(code), "--run-dir", str(run)]
    argv += ["--steps", "4", "--seq-len", "32", "--batch-size", "4", "--no-progress"]
    argv += ["--eval-batches", "1", "--max-new-tokens", "4", "--lr", "1e-2"]
    argv += ["--targets", EXPERT_TARGETS]
    assert main(argv) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert np.isfinite(summary["lora_eval_loss"])
    assert summary["lora_eval_loss"] < summary["base_eval_loss"]
    peft_out = tmp_path / "peft"
    argv = ["export", "--base", str(cli_folder), "--run-dir", str(run)]
    assert main([*argv, "--peft-out", str(peft_out)]) == 0
    record = json.loads((peft_out / "adapter_config.json").read_text())
    assert len(record["target_parameters"]) == 4  # 2 layers x (gate_up_proj, down_proj)
    config, variables = from_pretrained(cli_folder)
    lora = lj.load_adapter(run / "adapter")
    ids = IDS % config.vocab_size
    ours = np.asarray(jax.jit(lj.lora_apply(Llama(config).apply))(variables, lora, ids))
    check("CLI PEFT export", ours, torch_logits_peft(cli_folder, peft_out, ids))
    merged = tmp_path / "merged"
    assert main([*argv, "--merged-out", str(merged)]) == 0
    model = transformers.AutoModelForCausalLM.from_pretrained(merged, attn_implementation="eager")
    check("CLI merged export", ours, torch_logits(model.eval(), ids))


def torch_logits_peft(folder: pathlib.Path, adapter: pathlib.Path, ids) -> np.ndarray:
    base = transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager")
    return torch_logits(peft.PeftModel.from_pretrained(base, adapter).eval(), ids)
