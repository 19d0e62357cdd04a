"""The app on a HuggingFace checkpoint folder, end to end and offline: a tiny BPE tokenizer
and a tiny random ``LlamaForCausalLM`` saved by ``transformers`` are fine-tuned with
``python -m train finetune``, exported merged with ``export``, and loaded back in
``transformers`` with the adapted model's logits."""

from __future__ import annotations

import dataclasses
import json
import pathlib
import shutil
import sysconfig

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tokenizers
from hf_models import require_interop

import lora_jax as lj
from train.cli import main
from train.models import Llama, LlamaConfig, from_pretrained, init_cache
from train.sampling import generate
from train.tokenizer import HFTokenizer

torch, transformers = require_interop()

STDLIB = pathlib.Path(sysconfig.get_paths()["stdlib"])
TOKENIZER_TEXT = ("string.py", "glob.py", "keyword.py")  # what the tokenizer learns from
CODE = ("textwrap.py", "shlex.py", "fnmatch.py", "colorsys.py", "bisect.py")  # fine-tuning data
MAX_POSITIONS = 256


def train_tokenizer(folder: pathlib.Path) -> tokenizers.Tokenizer:
    """A byte-level BPE tokenizer (~300 ids) with ``<s>`` / ``</s>``, saved as a HF model
    folder saves it: ``tokenizer.json`` and a ``tokenizer_config.json`` naming them."""
    lines = []
    for name in TOKENIZER_TEXT:
        lines += (STDLIB / name).read_text(encoding="utf-8").splitlines()
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(lines[:600], trainer=trainer)
    tok.save(str(folder / "tokenizer.json"))
    config = {"bos_token": "<s>", "eos_token": "</s>", "model_max_length": MAX_POSITIONS}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return tok


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory) -> pathlib.Path:
    """A real-format HF checkpoint folder: safetensors weights, config and tokenizer."""
    folder = tmp_path_factory.mktemp("hf") / "tiny-llama"
    folder.mkdir()
    tok = train_tokenizer(folder)
    config = transformers.LlamaConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=MAX_POSITIONS,
        bos_token_id=tok.token_to_id("<s>"),
        eos_token_id=tok.token_to_id("</s>"),
        attn_implementation="eager",
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).to(torch.float32).eval()
    model.save_pretrained(folder, safe_serialization=True)
    assert (folder / "model.safetensors").is_file()
    return folder


@pytest.fixture(scope="module")
def code_dir(tmp_path_factory) -> pathlib.Path:
    folder = tmp_path_factory.mktemp("code")
    for name in CODE:
        shutil.copy(STDLIB / name, folder / name)
    return folder


@dataclasses.dataclass(frozen=True)
class Forward:
    """``forward(params, ids, cache)`` of the base model, for `generate`."""

    config: LlamaConfig

    def __call__(self, params, ids, cache):
        return Llama(self.config).apply(params, ids, cache=cache)


def finetune(hf_folder, code_dir, run_dir, *extra: str) -> int:
    return main(
        [
            "finetune",
            "--base",
            str(hf_folder),
            "--data",
            str(code_dir),
            "--run-dir",
            str(run_dir),
            "--steps",
            "6",
            "--seq-len",
            "32",
            "--batch-size",
            "8",
            "--no-progress",
            "--eval-batches",
            "2",
            "--max-new-tokens",
            "8",
            "--lr",
            "1e-2",
            "--log-every",
            "2",
            *extra,
        ]
    )


@pytest.fixture(scope="module")
def run_dir(hf_folder, code_dir, tmp_path_factory) -> pathlib.Path:
    folder = tmp_path_factory.mktemp("run")
    assert finetune(hf_folder, code_dir, folder) == 0
    return folder


def test_tokenizer_folder_is_read_as_hf(hf_folder):
    tok = HFTokenizer(hf_folder)
    assert 280 <= tok.vocab_size <= 300
    assert (tok.bos_id, tok.eos_id) == (0, 1)  # the special tokens come first
    text = "def f(x):\n    return x + 1\n"
    assert tok.decode(tok.encode(text)) == text
    assert len(tok.encode(text)) < len(text.encode())  # merges were learned


@pytest.mark.slow
def test_finetune_on_hf_checkpoint(run_dir, hf_folder):
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["lora_eval_loss"] < summary["base_eval_loss"]
    assert np.isfinite(summary["base_eval_loss"])
    samples = summary["samples"]
    assert set(samples) == {"base", "adapted"}
    assert all(isinstance(text, str) for text in samples.values())
    assert (run_dir / "adapter" / lj.io.METADATA_FILE).is_file()
    # The base's sample again, from the settings' defaults (prompt "def ", temperature 0.8,
    # top-k 40, seed 0): the prompt starts with the HF tokenizer's BOS, the text is its decode.
    tok = HFTokenizer(hf_folder)
    config, variables = from_pretrained(hf_folder)
    prompt = jnp.asarray([[tok.bos_id, *tok.encode("def ")]], jnp.int32)
    cache = init_cache(config, 1, prompt.shape[1] + 8)
    ids = generate(
        Forward(config),
        variables,
        prompt,
        cache,
        max_new_tokens=8,
        key=jax.random.key(0),
        temperature=0.8,
        top_k=40,
        eos_id=tok.eos_id,
    )[0]
    assert samples["base"] == tok.decode(ids)


@pytest.mark.slow
def test_export_merged_loads_in_transformers(run_dir, hf_folder, tmp_path, capsys):
    out = tmp_path / "merged"
    argv = ["export", "--base", str(hf_folder), "--run-dir", str(run_dir), "--merged-out", str(out)]
    assert main(argv) == 0
    assert f"wrote the merged weights to {out}" in capsys.readouterr().out
    assert (out / "tokenizer.json").read_bytes() == (hf_folder / "tokenizer.json").read_bytes()
    assert (out / "tokenizer_config.json").is_file()
    model = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager")
    assert type(model).__name__ == "LlamaForCausalLM"
    ids = np.random.default_rng(0).integers(0, model.config.vocab_size, (3, 19))
    with torch.no_grad():
        theirs = model.eval()(torch.from_numpy(ids)).logits.float().numpy()

    config, variables = from_pretrained(hf_folder)
    lora = lj.load_adapter(run_dir / "adapter")
    apply = jax.jit(lj.lora_apply(Llama(config).apply))
    ours = np.asarray(apply(variables, lora, jnp.asarray(ids)))
    base = np.asarray(jax.jit(Llama(config).apply)(variables, jnp.asarray(ids)))
    assert np.abs(ours - base).max() > 1e-3  # the adapters moved the model
    np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=0)


@pytest.mark.slow
def test_export_peft_loads_in_peft(run_dir, hf_folder, tmp_path):
    """`export --peft-out` writes what peft.PeftModel loads, with our logits."""
    peft = pytest.importorskip("peft")
    out = tmp_path / "peft"
    argv = ["export", "--base", str(hf_folder), "--run-dir", str(run_dir), "--peft-out", str(out)]
    assert main(argv) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    base_model = transformers.AutoModelForCausalLM.from_pretrained(
        hf_folder, attn_implementation="eager"
    )
    model = peft.PeftModel.from_pretrained(base_model, out).eval()
    ids = np.random.default_rng(1).integers(0, base_model.config.vocab_size, (2, 17))
    with torch.no_grad():
        theirs = model(torch.from_numpy(ids)).logits.float().numpy()
    config, variables = from_pretrained(hf_folder)
    lora = lj.load_adapter(run_dir / "adapter")
    ours = np.asarray(lj.lora_apply(Llama(config).apply)(variables, lora, ids))
    np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=0)


def test_seq_len_longer_than_the_model_is_one_line_error(hf_folder, code_dir, tmp_path, capsys):
    assert finetune(hf_folder, code_dir, tmp_path / "run", "--seq-len", "1024") == 2
    captured = capsys.readouterr()
    err = captured.err
    assert err.count("\n") == 1 and err.startswith("error: ")
    assert "--seq-len 1024" in err and str(MAX_POSITIONS) in err
    assert "Traceback" not in err + captured.out
    assert not (tmp_path / "run").exists()  # nothing was written
