"""GGUF in and out, checked against transformers' own GGUF loading (PyTorch, CPU, eager).

In: tiny random Llama / Qwen2 / Qwen3 / Qwen3-MoE files are written here with the `gguf`
writer the way llama.cpp's converter writes them (its tensor names from
`gguf.get_tensor_name_map`, only Llama's q/k rows permuted, Qwen3-MoE's experts as 3-D
``ffn_{gate,up,down}_exps`` and its router ``ffn_gate_inp`` in F32), in F32, F16, BF16, Q8_0 and
the K types. transformers 5's GGUF loader ignores ``qwen3.attention.key_length`` (head_dim
stays Qwen3Config's 128) and ``qwen3moe.expert_feed_forward_length`` (moe_intermediate_size
stays 768), so the Qwen3 cases use those sizes. The `gguf` writer cannot quantize
Q4_K / Q5_K / Q6_K, so those tensors are random blocks of the right layout (small f16 scales,
random codes): the same bytes are dequantized by both readers. Out: a tiny run fine-tuned on a
GGUF base is exported with ``export --gguf-out`` and read back by both.
"""

from __future__ import annotations

import json
import pathlib
import shutil
import sysconfig

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tokenizers
from hf_models import random_model, require_interop

import lora_jax as lj
from train.cli import main
from train.gguf_tokenizer import byte_chars, gguf_vocab_fields, load_gguf_tokenizer
from train.models import Llama
from train.models.gguf_in import from_gguf
from train.tokenizer import ByteTokenizer, HFTokenizer

gguf = pytest.importorskip("gguf")
torch, transformers = require_interop()

Q = gguf.GGMLQuantizationType
STDLIB = pathlib.Path(sysconfig.get_paths()["stdlib"])
SMALL = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2)
WIDE = dict(hidden_size=256, intermediate_size=256, num_attention_heads=4, num_key_value_heads=1)
QWEN3 = {**SMALL, "head_dim": 128}  # transformers' GGUF loader keeps Qwen3Config's 128
# transformers' GGUF loader keeps Qwen3MoeConfig's moe_intermediate_size (768) and sets
# norm_topk_prob=True, as llama.cpp computes qwen3moe.
MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=768, norm_topk_prob=True)
ARCH = {"LlamaConfig": "llama", "Qwen2Config": "qwen2", "Qwen3Config": "qwen3"}
ARCH["Qwen3MoeConfig"] = "qwen3moe"
# name -> (transformers config class, sizes, {tensor kind: GGUF type} (others F32), extra)
CASES = {
    "llama-f32": ("LlamaConfig", SMALL, {}, {"rope_theta": 500.0}),
    "llama-f16-tied": ("LlamaConfig", SMALL, {"2d": Q.F16}, {"tie_word_embeddings": True}),
    "llama-bf16": ("LlamaConfig", SMALL, {"2d": Q.BF16}, {}),
    "llama-q8_0": ("LlamaConfig", SMALL, {"2d": Q.Q8_0}, {}),
    "qwen2-q8_0": ("Qwen2Config", SMALL, {"2d": Q.Q8_0}, {"rms_norm_eps": 1e-5}),
    "qwen3-f16": ("Qwen3Config", QWEN3, {"2d": Q.F16}, {"rms_norm_eps": 1e-5}),
    "qwen3-bf16-tied": ("Qwen3Config", QWEN3, {"2d": Q.BF16}, {"tie_word_embeddings": True}),
    "qwen3moe-f32": ("Qwen3MoeConfig", SMALL, {}, MOE),
    "qwen3moe-q8_0": ("Qwen3MoeConfig", SMALL, {"2d": Q.Q8_0, "exps": Q.Q8_0}, MOE),
    "llama-k-quants": (
        "LlamaConfig",
        WIDE,
        {"attn": Q.Q4_K, "ffn": Q.Q5_K, "output": Q.Q6_K, "token_embd": Q.Q4_K},
        {},
    ),
}
IDS = np.random.default_rng(0).integers(0, 200, (2, 13))
# (scale byte offsets and values, bytes per block) of random K blocks with sane magnitudes.
K_BLOCKS = {
    Q.Q4_K: ([(0, 2e-4), (2, 2e-4)], 144),
    Q.Q5_K: ([(0, 1e-4), (2, 1e-4)], 176),
    Q.Q6_K: ([(208, 3e-5)], 210),
}


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's ``convert_hf_to_gguf.py`` LlamaModel.permute, verbatim."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def random_k_blocks(kind, shape, rng) -> np.ndarray:
    offsets, size = K_BLOCKS[kind]
    rows, cols = shape
    blocks = rng.integers(0, 256, (rows * cols // 256, size), dtype=np.uint8)
    for offset, scale in offsets:
        blocks[:, offset : offset + 2] = np.array([scale], np.float16).view(np.uint8)
    return blocks.reshape(rows, cols // 256 * size)


def byte_vocab(vocab_size: int) -> dict:
    """The byte tokenizer's vocabulary (ids 0..255 bytes, 256 <s>, 257 </s>), padded."""
    return gguf_vocab_fields(ByteTokenizer(), vocab_size)


def converter_tensors(model, names):
    """``(GGUF name, float32 array)`` of the HF tensors; transformers 5's fused experts
    ``gate_up_proj`` (E, 2 * moe_i, hidden) split into llama.cpp's gate and up stacks."""
    for hf, tensor in model.state_dict().items():
        if hf == "lm_head.weight" and model.config.tie_word_embeddings:
            continue
        w = tensor.float().numpy()
        stem, suffix = hf.rsplit(".", 1)
        if suffix == "gate_up_proj":
            gate, up = np.split(w, 2, axis=1)
            yield f"{names.get_name(stem + '.gate_proj')}.weight", gate
            yield f"{names.get_name(stem + '.up_proj')}.weight", up
        elif suffix == "down_proj":
            yield f"{names.get_name(hf)}.weight", w
        else:
            yield f"{names.get_name(stem)}.{suffix}", w


def add_fields(writer, fields: dict) -> None:
    """Writes tokenizer fields with the gguf writer's typed adders."""
    for key, value in fields.items():
        if isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        else:
            writer.add_array(key, value)


def write_gguf(path, model, arch: str, types: dict, vocab: dict) -> None:
    """`model`'s tensors as llama.cpp's converter writes them (types per tensor kind)."""
    config = model.config
    writer = gguf.GGUFWriter(path, arch)
    writer.add_name("tiny")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    if arch == "llama":
        writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    if arch in ("qwen3", "qwen3moe"):  # llama.cpp's converter: head_dim is in the hparams
        head_dim = getattr(config, "head_dim", None) or (
            config.hidden_size // config.num_attention_heads
        )
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if arch == "qwen3moe":
        writer.add_expert_count(config.num_experts)
        writer.add_expert_used_count(config.num_experts_per_tok)
        writer.add_expert_feed_forward_length(config.moe_intermediate_size)
    add_fields(writer, vocab)
    names = gguf.get_tensor_name_map({v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[arch], 8)
    rng = np.random.default_rng(1)
    for name, w in converter_tensors(model, names):
        if arch == "llama" and ".attn_q." in name:
            w = llama_cpp_permute(w, config.num_attention_heads)
        if arch == "llama" and ".attn_k." in name:
            w = llama_cpp_permute(w, config.num_key_value_heads)
        kind = (
            next((types[k] for k in types if k in name), types.get("2d"))
            if w.ndim == 2 and "ffn_gate_inp" not in name  # the router stays F32
            else types.get("exps")
            if w.ndim == 3
            else None
        )
        if kind in K_BLOCKS:
            writer.add_tensor(name, random_k_blocks(kind, w.shape, rng), raw_dtype=kind)
        elif kind in (Q.BF16, Q.Q8_0, Q.Q4_0):
            writer.add_tensor(name, gguf.quants.quantize(w, kind), raw_dtype=kind)
        else:
            writer.add_tensor(name, w.astype(np.float16 if kind == Q.F16 else np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def hf_model(kind: str, sizes: dict, vocab_size: int, **kw):
    config = getattr(transformers, kind)(
        vocab_size=vocab_size,
        num_hidden_layers=2,
        max_position_embeddings=64,
        **sizes,
        **kw,
        attn_implementation="eager",
    )
    return random_model(config)


def transformers_logits(folder, file, ids=IDS) -> np.ndarray:
    model = transformers.AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=file, attn_implementation="eager"
    ).eval()
    with torch.no_grad():
        return model(torch.from_numpy(ids)).logits.float().numpy()


def our_logits(path, ids=IDS, **kw) -> np.ndarray:
    config, variables = from_gguf(path, **kw)
    return np.asarray(jax.jit(Llama(config).apply)(variables, jnp.asarray(ids)), np.float32)


@pytest.mark.parametrize("case", sorted(CASES))
def test_gguf_loads_with_transformers_logits(tmp_path, case):
    kind, sizes, types, kw = CASES[case]
    arch = ARCH[kind]
    model = hf_model(kind, sizes, 258, **kw)
    write_gguf(tmp_path / "m.gguf", model, arch, types, byte_vocab(258))
    ref = transformers_logits(tmp_path, "m.gguf")
    got = our_logits(tmp_path / "m.gguf")
    diff = float(np.abs(got - ref).max())
    print(f"{case}: max |ours - transformers| = {diff:.2e} (logits up to {np.abs(ref).max():.2f})")
    assert diff <= 1e-4
    if not types:  # float32 file: transformers' load is the model it was written from
        with torch.no_grad():
            source = model(torch.from_numpy(IDS)).logits.float().numpy()
        assert float(np.abs(ref - source).max()) <= 1e-4
    config, _ = from_gguf(tmp_path / "m.gguf")
    assert config.tie_embeddings == bool(kw.get("tie_word_embeddings", False))
    assert config.attention_bias == (arch == "qwen2")
    assert config.qk_norm == arch.startswith("qwen3")
    if arch == "qwen3moe":
        want = (MOE["num_experts"], MOE["num_experts_per_tok"], MOE["moe_intermediate_size"])
        assert (config.num_experts, config.num_experts_per_tok) == want[:2]
        assert config.moe_intermediate_size == want[2] and config.norm_topk_prob
    if case in ("llama-q8_0", "qwen3moe-q8_0"):  # scanned layers: the same numbers
        np.testing.assert_allclose(
            our_logits(tmp_path / "m.gguf", scan_layers=True), got, atol=1e-5
        )


# f16: the bound; q8_0 (reported): 5% of the largest logit.
@pytest.mark.parametrize(
    ("case", "gguf_type", "tol"),
    [("qwen3-f16", "f16", 1e-2), ("qwen3moe-f32", "f16", 1e-2), ("qwen3moe-f32", "q8_0", 0.05)],
)
def test_save_gguf_qwen3_reads_back(tmp_path, case, gguf_type, tol):
    """Qwen3 / Qwen3-MoE out: read back by transformers and by us, config unchanged."""
    import dataclasses

    from train.models.gguf_out import save_gguf

    kind, sizes, _, kw = CASES[case]
    arch = ARCH[kind]
    write_gguf(tmp_path / "in.gguf", hf_model(kind, sizes, 258, **kw), arch, {}, byte_vocab(258))
    config, variables = from_gguf(tmp_path / "in.gguf", scan_layers=True)
    want = our_logits(tmp_path / "in.gguf")
    out = tmp_path / "out" / "m.gguf"
    save_gguf(out, config, variables, vocab=byte_vocab(258), gguf_type=gguf_type)
    reader = gguf.GGUFReader(out)
    assert reader.fields["general.architecture"].contents() == arch
    types = {t.name.split(".")[-2]: t.tensor_type for t in reader.tensors}
    assert types["attn_q_norm"] == Q.F32 and types["attn_k_norm"] == Q.F32
    if arch == "qwen3moe":
        assert types["ffn_gate_inp"] == Q.F32 and "ffn_up" not in types
        wanted = Q.F16 if gguf_type == "f16" else Q.Q8_0
        assert {types[f"ffn_{p}_exps"] for p in ("gate", "up", "down")} == {wanted}
        shapes = {t.name: tuple(reversed(t.shape.tolist())) for t in reader.tensors}
        assert shapes["blk.1.ffn_up_exps.weight"] == (4, 768, 64)
        assert shapes["blk.1.ffn_down_exps.weight"] == (4, 64, 768)
    back, _ = from_gguf(out)
    assert back == dataclasses.replace(config, scan_layers=False)
    theirs = transformers_logits(out.parent, out.name)
    ours = our_logits(out)
    diffs = (float(np.abs(theirs - want).max()), float(np.abs(ours - want).max()))
    print(
        f"{case} out {gguf_type}: max |transformers - model| = {diffs[0]:.2e}, ours {diffs[1]:.2e}"
    )
    scale = 1.0 if gguf_type == "f16" else float(np.abs(want).max())
    assert max(diffs) <= tol * scale
    np.testing.assert_allclose(ours, theirs, atol=1e-4)  # both readers agree on the file
    if arch == "qwen3moe":  # what llama.cpp's qwen3moe cannot run is refused
        for bad in ({"norm_topk_prob": False}, {"mlp_only_layers": (1,)}):
            with pytest.raises(ValueError, match=r"llama.cpp's qwen3moe runs every layer sparse"):
                save_gguf(
                    tmp_path / "bad.gguf",
                    dataclasses.replace(config, scan_layers=False, **bad),
                    from_gguf(out)[1],
                    vocab=byte_vocab(258),
                )


def test_unsupported_architecture_and_type_are_named(tmp_path):
    writer = gguf.GGUFWriter(tmp_path / "g.gguf", "gemma")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    for step in ("write_header_to_file", "write_kv_data_to_file", "write_tensors_to_file", "close"):
        getattr(writer, step)()
    with pytest.raises(ValueError, match=r"general.architecture 'gemma' is not supported"):
        from_gguf(tmp_path / "g.gguf")
    model = hf_model("LlamaConfig", SMALL, 258)
    write_gguf(tmp_path / "q.gguf", model, "llama", {"ffn_up": Q.Q4_0}, byte_vocab(258))
    with pytest.raises(ValueError, match=r"tensor 'blk.0.ffn_up.weight' has type Q4_0"):
        from_gguf(tmp_path / "q.gguf")
    with pytest.raises(ValueError, match=r"no such GGUF file"):
        from_gguf(tmp_path / "absent.gguf")


def train_tokenizer(split: str | None) -> tokenizers.Tokenizer:
    """A byte-level BPE (~300 ids, ``<s>`` / ``</s>``); `split` a regex before the bytes."""
    lines = (STDLIB / "string.py").read_text(encoding="utf-8").splitlines()
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    byte_level = tokenizers.pre_tokenizers.ByteLevel
    tok.pre_tokenizer = (
        byte_level(add_prefix_space=False)
        if split is None
        else tokenizers.pre_tokenizers.Sequence(
            [
                tokenizers.pre_tokenizers.Split(tokenizers.Regex(split), behavior="isolated"),
                byte_level(add_prefix_space=False, use_regex=False),
            ]
        )
    )
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=byte_level.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(lines, trainer=trainer)
    return tok


TEXTS = ["def f(x):\n    return x + 1\n", "héllo  wörld 12345 </s> it's", "\t\n  ", "<s>a</s>b"]


@pytest.mark.parametrize("pre", ["gpt2", "llama-bpe", "qwen2"])
def test_tokenizer_round_trip_matches_transformers(tmp_path, pre):
    from train.gguf_tokenizer import SPLITS

    tok = HFTokenizer.from_backend(train_tokenizer(SPLITS[pre]), name="t", bos_id=0, eos_id=1)
    fields = gguf_vocab_fields(tok, 320)
    assert fields["tokenizer.ggml.pre"] == pre
    assert fields["tokenizer.ggml.tokens"][-1] == "[PAD319]"
    write_gguf(tmp_path / "t.gguf", hf_model("LlamaConfig", SMALL, 320), "llama", {}, fields)
    ours = load_gguf_tokenizer(tmp_path / "t.gguf")
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="t.gguf")
    assert (ours.bos_id, ours.eos_id) == (0, 1)
    for text in TEXTS:
        ids = ours.encode(text).tolist()
        assert ids == tok.encode(text).tolist()  # the same tokenizer as before the round trip
        assert ids == theirs.encode(text, add_special_tokens=False)
        assert ours.decode(ids) == tok.decode(ids)


def test_byte_tokenizer_as_gguf_vocabulary():
    fields = byte_vocab(300)
    assert fields["tokenizer.ggml.tokens"][:256] == list(byte_chars())
    assert fields["tokenizer.ggml.merges"] == [] and fields["tokenizer.ggml.eos_token_id"] == 257
    from train.gguf_tokenizer import tokenizer_from_fields

    tok = tokenizer_from_fields(fields, name="bytes")
    assert tok.encode("hé!").tolist() == list("hé!".encode())
    with pytest.raises(ValueError, match=r"tokenizer.ggml.model 't5' is not supported"):
        tokenizer_from_fields({**fields, "tokenizer.ggml.model": "t5"}, name="sp")


# --- the app: finetune on a GGUF base, export --gguf-out ---------------------------------


@pytest.fixture(scope="module")
def gguf_base(tmp_path_factory) -> pathlib.Path:
    folder = tmp_path_factory.mktemp("gguf")
    bpe = HFTokenizer.from_backend(train_tokenizer(None), name="t", bos_id=0, eos_id=1)
    model = hf_model("LlamaConfig", SMALL, 320)
    write_gguf(folder / "base.gguf", model, "llama", {"2d": Q.F16}, gguf_vocab_fields(bpe, 320))
    return folder / "base.gguf"


@pytest.fixture(scope="module")
def run_dir(gguf_base, tmp_path_factory) -> pathlib.Path:
    code = tmp_path_factory.mktemp("code")
    for name in ("textwrap.py", "shlex.py", "fnmatch.py"):
        shutil.copy(STDLIB / name, code / name)
    run = tmp_path_factory.mktemp("run")
    argv = ["finetune", "--base", str(gguf_base), "--data", str(code), "--run-dir", str(run)]
    argv += ["--steps", "4", "--seq-len", "32", "--batch-size", "4", "--no-progress"]
    argv += ["--eval-batches", "1", "--max-new-tokens", "4", "--lr", "1e-2", "--log-every", "2"]
    assert main(argv) == 0
    return run


@pytest.mark.slow
def test_finetune_on_gguf_base(run_dir, gguf_base, tmp_path, capsys):
    summary = json.loads((run_dir / "summary.json").read_text())
    assert np.isfinite(summary["base_eval_loss"]) and np.isfinite(summary["lora_eval_loss"])
    assert summary["lora_eval_loss"] < summary["base_eval_loss"]
    assert json.loads((run_dir / "run.json").read_text())["base"] == str(gguf_base)
    argv = ["export", "--run-dir", str(run_dir), "--lora-out", str(tmp_path / "a")]
    assert main([*argv, "--gguf-type", "q8_0"]) == 2
    assert "--gguf-type q8_0 needs --gguf-out FILE" in capsys.readouterr().err


@pytest.mark.slow
# f16: the bound; q8_0 (8 bits per weight, reported): 5% of the largest logit.
@pytest.mark.parametrize(("gguf_type", "tol"), [("f16", 1e-2), ("q8_0", 0.05)])
def test_export_gguf_reads_back(run_dir, gguf_base, tmp_path, capsys, gguf_type, tol):
    out = tmp_path / "merged.gguf"
    argv = ["export", "--run-dir", str(run_dir), "--gguf-out", str(out), "--gguf-type", gguf_type]
    assert main(argv) == 0
    assert f"wrote the GGUF ({gguf_type}) to {out}" in capsys.readouterr().out
    reader = gguf.GGUFReader(out)
    assert reader.fields["general.architecture"].contents() == "llama"
    wanted = Q.F16 if gguf_type == "f16" else Q.Q8_0
    assert {t.tensor_type for t in reader.tensors if len(t.shape) == 2} == {wanted}
    ids = np.random.default_rng(2).integers(0, 320, (2, 15))
    config, variables = from_gguf(gguf_base)
    lora = lj.load_adapter(run_dir / "adapter")
    merged = np.asarray(lj.lora_apply(Llama(config).apply)(variables, lora, jnp.asarray(ids)))
    base = np.asarray(Llama(config).apply(variables, jnp.asarray(ids)))
    assert np.abs(merged - base).max() > 1e-3  # the adapters moved the model
    theirs = transformers_logits(tmp_path, out.name, ids)
    back = our_logits(out, ids)
    diffs = (float(np.abs(theirs - merged).max()), float(np.abs(back - merged).max()))
    scale = 1.0 if gguf_type == "f16" else float(np.abs(merged).max())
    print(f"{gguf_type}: max |transformers - merged| = {diffs[0]:.2e}, ours {diffs[1]:.2e}")
    assert max(diffs) <= tol * scale
    np.testing.assert_allclose(back, theirs, atol=1e-4)  # both readers agree on the file
    assert load_gguf_tokenizer(out).encode(TEXTS[0]).tolist() == (
        load_gguf_tokenizer(gguf_base).encode(TEXTS[0]).tolist()
    )


def test_save_gguf_round_trip_with_llama3_rope(tmp_path):
    """llama.cpp keeps Llama 3 rope scaling as `rope_freqs.weight`; Meta's is read back."""
    from train.models import LlamaConfig
    from train.models.gguf_in import META_LLAMA3
    from train.models.gguf_out import save_gguf

    scaling = {"rope_type": "llama3", "factor": 32.0, **META_LLAMA3}
    config = LlamaConfig(
        vocab_size=258,
        hidden_size=64,
        intermediate_size=96,
        num_layers=1,
        num_heads=2,
        num_kv_heads=1,
        rope_theta=500000.0,
        rope_scaling=scaling,
        max_seq_len=131072,
    )
    variables = Llama(config).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
    save_gguf(tmp_path / "m.gguf", config, variables, vocab=byte_vocab(258), gguf_type="f16")
    back, loaded = from_gguf(tmp_path / "m.gguf")
    assert back == config
    ids = jnp.asarray(IDS)
    want = Llama(config).apply(variables, ids)
    np.testing.assert_allclose(Llama(back).apply(loaded, ids), want, atol=1e-2)
    odd = LlamaConfig(**{**config.to_dict(), "rope_scaling": {**scaling, "high_freq_factor": 2.0}})
    save_gguf(tmp_path / "odd.gguf", odd, variables, vocab=byte_vocab(258))
    with pytest.raises(ValueError, match=r"'rope_freqs.weight' holds rope factors that are not"):
        from_gguf(tmp_path / "odd.gguf")
    window = LlamaConfig(**{**config.to_dict(), "sliding_window": 8})
    with pytest.raises(ValueError, match=r"a sliding window \(8\) has no GGUF key"):
        save_gguf(tmp_path / "w.gguf", window, variables, vocab=byte_vocab(258))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf", "odd.gguf"]  # no tmp left


# --- Gemma 3: llama.cpp's gemma3 (norms stored as 1 + w), SentencePiece vocabulary -------------

# llama.cpp runs every 6th layer global with local rotary base 10000 and scales attention by
# head_dim ** -0.5; transformers' GGUF loader keeps Gemma3TextConfig's defaults (pattern 6,
# local base 10000, query_pre_attn_scalar 256), so the tiny models use head_dim 256.
GEMMA3 = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=6,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=256,
    query_pre_attn_scalar=256,
    sliding_window=4,  # the 13-token inputs are longer than the window
    max_position_embeddings=64,
)
GEMMA3_CASES = {"gemma3-f32": {}, "gemma3-f16-tied": {"2d": Q.F16}, "gemma3-q8_0": {"2d": Q.Q8_0}}


@pytest.fixture(scope="module")
def gemma_tok(tmp_path_factory) -> HFTokenizer:
    """A Gemma-style byte-fallback BPE ``tokenizer.json`` (``<pad>``/``<eos>``/``<bos>``/
    ``<unk>`` at ids 0-3, ``<0xNN>`` byte pieces), as tests/test_gemma3.py makes it."""
    from test_gemma3 import gemma_style_tokenizer

    folder = tmp_path_factory.mktemp("gemma_tok")
    gemma_style_tokenizer(folder)
    return HFTokenizer(folder / "tokenizer.json")


def gemma3_model(vocab_size: int, tied: bool):
    config = transformers.Gemma3TextConfig(
        vocab_size=vocab_size, tie_word_embeddings=tied, **GEMMA3, attn_implementation="eager"
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for p in model.parameters():  # Gemma's norms scale by 1 + w: all drawn around 0
            p.copy_(0.15 * torch.randn_like(p))
    return model


def write_gemma3_gguf(path, model, types: dict, vocab: dict) -> None:
    """`model` as llama.cpp's converter writes gemma3: its hyperparameters, norms + 1 in F32."""
    config = model.config
    writer = gguf.GGUFWriter(path, "gemma3")
    writer.add_name("tiny gemma3")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_rope_freq_base(config.rope_parameters["full_attention"]["rope_theta"])
    writer.add_sliding_window(config.sliding_window)
    add_fields(writer, vocab)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GEMMA3, config.num_hidden_layers)
    for name, w in converter_tensors(model, names):
        kind = types.get("2d") if w.ndim == 2 else None
        if name.endswith("norm.weight"):
            w = w + 1.0
        if kind == Q.Q8_0:
            writer.add_tensor(name, gguf.quants.quantize(w, kind), raw_dtype=kind)
        else:
            writer.add_tensor(name, w.astype(np.float16 if kind == Q.F16 else np.float32))
    for step in ("write_header_to_file", "write_kv_data_to_file", "write_tensors_to_file", "close"):
        getattr(writer, step)()


def gemma3_vocab(tok: HFTokenizer) -> tuple[int, dict]:
    vocab_size = tok.vocab_size + 4  # a padded embedding, as Gemma's
    return vocab_size, gguf_vocab_fields(tok, vocab_size)


@pytest.mark.parametrize("case", sorted(GEMMA3_CASES))
def test_gemma3_gguf_loads_with_transformers_logits(tmp_path, gemma_tok, case):
    types = GEMMA3_CASES[case]
    vocab_size, vocab = gemma3_vocab(gemma_tok)
    model = gemma3_model(vocab_size, tied="tied" in case)
    write_gemma3_gguf(tmp_path / "m.gguf", model, types, vocab)
    ids = IDS % vocab_size
    ref = transformers_logits(tmp_path, "m.gguf", ids)
    got = our_logits(tmp_path / "m.gguf", ids)
    diff = float(np.abs(got - ref).max())
    print(f"{case}: max |ours - transformers| = {diff:.2e} (logits up to {np.abs(ref).max():.2f})")
    assert diff <= 1e-4
    if not types:  # float32: transformers' load is the model it was written from
        with torch.no_grad():
            source = model(torch.from_numpy(ids)).logits.float().numpy()
        assert float(np.abs(got - source).max()) <= 1e-4
    config, _ = from_gguf(tmp_path / "m.gguf")
    assert config.family == "gemma3" and config.qk_norm and config.sliding_window == 4
    assert config.global_layers == (5,) and config.rope_local_theta == 10000.0
    assert config.query_pre_attn_scalar == 256 and config.tie_embeddings == ("tied" in case)
    if case == "gemma3-q8_0":  # scanned layers: the same numbers
        np.testing.assert_allclose(
            our_logits(tmp_path / "m.gguf", ids, scan_layers=True), got, atol=1e-5
        )


def test_gemma3_save_gguf_f16_reads_back(tmp_path, gemma_tok):
    import dataclasses

    from train.models.gguf_out import save_gguf

    vocab_size, vocab = gemma3_vocab(gemma_tok)
    write_gemma3_gguf(tmp_path / "in.gguf", gemma3_model(vocab_size, False), {}, vocab)
    config, variables = from_gguf(tmp_path / "in.gguf", scan_layers=True)
    ids = IDS % vocab_size
    want = our_logits(tmp_path / "in.gguf", ids)
    out = tmp_path / "out" / "m.gguf"
    save_gguf(out, config, variables, vocab=vocab, gguf_type="f16")
    reader = gguf.GGUFReader(out)
    assert reader.fields["general.architecture"].contents() == "gemma3"
    assert reader.fields["gemma3.attention.sliding_window"].contents() == 4
    types = {t.name.split(".")[-2]: t.tensor_type for t in reader.tensors}
    assert {types[k] for k in ("post_attention_norm", "ffn_norm", "post_ffw_norm")} == {Q.F32}
    back, _ = from_gguf(out)
    assert back == dataclasses.replace(config, scan_layers=False)
    theirs = transformers_logits(out.parent, out.name, ids)
    ours = our_logits(out, ids)
    diffs = (float(np.abs(theirs - want).max()), float(np.abs(ours - want).max()))
    print(f"gemma3 out f16: max |transformers - model| = {diffs[0]:.2e}, ours {diffs[1]:.2e}")
    assert max(diffs) <= 1e-2
    np.testing.assert_allclose(ours, theirs, atol=1e-4)  # both readers agree on the file
    # what llama.cpp's gemma3 would run differently is refused
    plain = dataclasses.replace(config, scan_layers=False)
    for bad, what in (
        ({"global_layers": (1, 3, 5)}, "global layers"),
        ({"rope_local_theta": 500.0}, "local rotary base"),
        ({"query_pre_attn_scalar": 24.0}, "query_pre_attn_scalar"),
        ({"final_logit_softcapping": 30.0}, "final_logit_softcapping"),
    ):
        with pytest.raises(ValueError, match=rf"llama.cpp's gemma3 would run .*{what}"):
            save_gguf(
                tmp_path / "bad.gguf", dataclasses.replace(plain, **bad), variables, vocab=vocab
            )
    assert not (tmp_path / "bad.gguf").exists()


def test_gemma3_linear_rope_round_trip(tmp_path, gemma_tok):
    """Linear rope scaling (Gemma 3 4B and up) is written as llama.cpp's rope.scaling keys."""
    from train.models import LlamaConfig
    from train.models.gguf_out import save_gguf

    vocab_size, vocab = gemma3_vocab(gemma_tok)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_layers=6,
        num_heads=2,
        num_kv_heads=1,
        head_dim=32,
        family="gemma3",
        qk_norm=True,
        tie_embeddings=True,
        sliding_window=4,
        global_layers=(5,),
        rope_theta=1_000_000.0,
        rope_local_theta=10000.0,
        rope_scaling={"rope_type": "linear", "factor": 8.0},
        query_pre_attn_scalar=32,
        max_seq_len=64,
    )
    variables = jax.jit(Llama(config).init)(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
    save_gguf(tmp_path / "m.gguf", config, variables, vocab=vocab, gguf_type="f16")
    back, loaded = from_gguf(tmp_path / "m.gguf")
    assert back == config
    ids = jnp.asarray(IDS % vocab_size)
    want = jax.jit(Llama(config).apply)(variables, ids)
    np.testing.assert_allclose(jax.jit(Llama(back).apply)(loaded, ids), want, atol=1e-2)


GEMMA_TEXTS = [*TEXTS, "def wrap(text): ☃ é", "  two  spaces\n\tand a tab"]


def test_gemma3_sentencepiece_tokenizer_round_trip(tmp_path, gemma_tok):
    """tokenizer.json -> GGUF ("llama" vocabulary) -> ours and transformers' GGUF tokenizer."""
    vocab_size, vocab = gemma3_vocab(gemma_tok)
    assert vocab["tokenizer.ggml.model"] == "llama"
    assert len(vocab["tokenizer.ggml.scores"]) == vocab_size
    types = vocab["tokenizer.ggml.token_type"]
    assert types[:4] == [3, 3, 3, 2] and types[gemma_tok.backend.token_to_id("<0x41>")] == 6
    assert (vocab["tokenizer.ggml.unknown_token_id"], vocab["tokenizer.ggml.padding_token_id"]) == (
        3,
        0,
    )
    write_gemma3_gguf(tmp_path / "t.gguf", gemma3_model(vocab_size, True), {}, vocab)
    ours = load_gguf_tokenizer(tmp_path / "t.gguf")
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="t.gguf")
    assert (ours.bos_id, ours.eos_id) == (gemma_tok.bos_id, gemma_tok.eos_id) == (2, 1)
    for text in GEMMA_TEXTS:
        ids = ours.encode(text).tolist()
        assert ids == theirs.encode(text, add_special_tokens=False), text
        assert ids == gemma_tok.encode(text).tolist(), text  # as before the round trip
        assert ours.decode(ids) == gemma_tok.decode(ids) == text
    again = gguf_vocab_fields(ours, vocab_size)  # and back out: the same vocabulary
    for key in ("tokens", "token_type", "bos_token_id", "eos_token_id", "unknown_token_id"):
        assert again[f"tokenizer.ggml.{key}"] == vocab[f"tokenizer.ggml.{key}"], key


def test_sentencepiece_without_transformers_says_what_to_install(monkeypatch, gemma_tok):
    import sys

    from train.gguf_tokenizer import tokenizer_from_fields

    _, vocab = gemma3_vocab(gemma_tok)
    for module in (
        "transformers.integrations.gguf.gguf_tokenizer_mapping",
        "transformers.integrations.ggml",
    ):
        monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(ValueError, match=r"pip install transformers"):
        tokenizer_from_fields(vocab, name="sp.gguf")
