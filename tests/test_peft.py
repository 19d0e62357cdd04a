"""PEFT interop, proven against PEFT itself: our exports load in `peft.PeftModel` on
PyTorch-CPU with the same logits, PEFT's adapters import here with the same logits, and
every way the two formats could silently disagree is an error."""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import safetensors
from hf_models import random_model, require_interop

import lora_jax as lj
from train.models import Llama, from_pretrained
from train.models.export import export_merged
from train.models.peft_map import module_map

torch, transformers = require_interop()
peft = pytest.importorskip("peft")
st = pytest.importorskip("safetensors.numpy")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

SIZES = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)
RNG = np.random.default_rng(0)
INPUTS = [RNG.integers(0, SIZES["vocab_size"], (3, 11)) for _ in range(3)]
TOL = 1e-4
MEASURED: dict[str, float] = {}  # max |logit difference| per check, printed with -s


def _hf_base(kind: str) -> transformers.PreTrainedModel:
    """A tiny random transformers model (float32, eager), every weight drawn."""
    config = getattr(transformers, kind)(**SIZES, attn_implementation="eager")
    return random_model(config)


@pytest.fixture(scope="module", params=["LlamaConfig", "MistralConfig", "Qwen2Config"])
def base(request, tmp_path_factory):
    """The HF folder of a tiny model and its unrolled Flax load with layouts."""
    folder = tmp_path_factory.mktemp(request.param)
    _hf_base(request.param).save_pretrained(folder)
    return _flax_base(folder, scan=False)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama")
    _hf_base("LlamaConfig").save_pretrained(folder)
    return folder


def _flax_base(folder: pathlib.Path, scan: bool):
    config, variables = from_pretrained(folder, scan_layers=scan)
    layouts = lj.infer_layouts(Llama(config).apply, variables, jnp.asarray(INPUTS[0]))
    return folder, config, variables, layouts


def _torch(folder: pathlib.Path):
    load = transformers.AutoModelForCausalLM.from_pretrained
    return load(folder, dtype=torch.float32, attn_implementation="eager").eval()


def _peft_logits(folder: pathlib.Path, adapter: pathlib.Path) -> list[np.ndarray]:
    model = peft.PeftModel.from_pretrained(_torch(folder), adapter).eval()
    with torch.no_grad():
        return [model(torch.from_numpy(ids)).logits.numpy() for ids in INPUTS]


def _fast(config, fn):
    """`fn` jitted for a scanned model (eager nn.scan is slow); eager otherwise, where the
    compiled ops are shared by every test."""
    return jax.jit(fn) if config.scan_layers else fn


def _our_logits(config, frozen, lora) -> list[np.ndarray]:
    apply = _fast(config, lj.lora_apply(Llama(config).apply))
    return [np.asarray(apply(frozen, lora, jnp.asarray(ids))) for ids in INPUTS]


def _max_diff(xs: list[np.ndarray], ys: list[np.ndarray]) -> float:
    return max(float(np.abs(x - y).max()) for x, y in zip(xs, ys, strict=True))


def _assert_same(name: str, ours: list[np.ndarray], theirs: list[np.ndarray], base=None) -> None:
    """Within TOL of each other; and, given the base's logits, visibly far from them (so the
    adapters really were loaded on both sides)."""
    diff = _max_diff(ours, theirs)
    MEASURED[name] = diff
    moved = "" if base is None else f" (adapter moves them by {_max_diff(ours, base):.2f})"
    print(f"\n{name}: max |logit diff| = {diff:.2e}{moved}")
    assert diff <= TOL, f"{name}: max abs logit difference {diff} > {TOL}"
    assert base is None or _max_diff(ours, base) > 1e-2, f"{name}: the adapter changes nothing"


def _base_logits(config, variables) -> list[np.ndarray]:
    apply = _fast(config, Llama(config).apply)
    return [np.asarray(apply(variables, jnp.asarray(ids))) for ids in INPUTS]


def _perturbed(lora, seed: int):
    """Random non-zero a and b (so every adapter visibly changes the logits)."""
    leaves, treedef = jax.tree_util.tree_flatten(lora)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    new = [0.2 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys, strict=True)]
    return jax.tree_util.tree_unflatten(treedef, new)


def _train(config, frozen, lora, steps: int = 4):
    """A few real Adam steps of next-token loss on random tokens: B moves off zero."""
    apply = lj.lora_apply(Llama(config).apply)

    def loss_fn(frozen, lora, ids, key):
        logits = apply(frozen, lora, ids[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()

    tx = optax.adam(3e-2)
    step = lj.make_train_step(loss_fn, tx)
    state = lj.TrainState.create(lora, tx, key=jax.random.key(1))
    ids = jnp.asarray(RNG.integers(0, SIZES["vocab_size"], (4, 12)))
    for _ in range(steps):
        state, _ = step(state, frozen, ids)
    return state.lora


# ---------------------------------------------------------------------------- both ways


@pytest.mark.slow
def test_trained_export_loads_in_peft_with_same_logits(base, tmp_path):
    folder, config, variables, layouts = base
    lora_config = lj.LoraConfig(rank=4, alpha=8, targets="all-linear")
    frozen, lora = lj.split(variables, lora_config, key=jax.random.key(0), layouts=layouts)
    lora = _train(config, frozen, lora)
    assert all(bool(jnp.any(w.b != 0)) for w in jax.tree.leaves(lora, is_leaf=_is_w))
    lj.peft.export_adapter(tmp_path, lora, module_map=module_map(config))
    record = json.loads((tmp_path / "adapter_config.json").read_text())
    assert record["r"] == 4 and record["lora_alpha"] == 8 and len(record["target_modules"]) == 14
    assert record["rank_pattern"] == {} and record["alpha_pattern"] == {}
    ours = _our_logits(config, frozen, lora)
    theirs = _peft_logits(folder, tmp_path)
    _assert_same(f"export {folder.name}", ours, theirs, _base_logits(config, variables))


def test_peft_adapter_imports_with_same_logits(base, tmp_path):
    folder, config, variables, layouts = base
    hf = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    peft.get_peft_model(_torch(folder), hf).save_pretrained(tmp_path)
    lora = lj.peft.import_adapter(
        tmp_path, variables, module_map=module_map(config), layouts=layouts
    )
    assert len(jax.tree.leaves(lora, is_leaf=_is_w)) == 14
    assert all(w.rank == 4 and w.scale == 2.0 and w.dropout == 0.0 for w in _flat(lora).values())
    ours = _our_logits(config, variables, lora)
    theirs = _peft_logits(folder, tmp_path)
    _assert_same(f"import {folder.name}", ours, theirs, _base_logits(config, variables))


def _is_w(x):
    return isinstance(x, lj.LoraWeights)


def test_round_trip_needs_no_config(llama, tmp_path):
    """split -> export_adapter -> PEFT, and import_adapter back: no config after `split`."""
    folder, config, variables, layouts = _flax_base(llama, False)
    lora_config = lj.LoraConfig(
        rank=8, alpha=16, targets="all-linear", rank_pattern={"layers_1/self_attn/k_proj": 4}
    )
    frozen, lora = lj.split(variables, lora_config, key=jax.random.key(0), layouts=layouts)
    lora = _perturbed(lora, 5)
    del lora_config  # nothing below sees it
    lj.peft.export_adapter(tmp_path, lora, module_map=module_map(config))
    record = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (record["r"], record["lora_alpha"], record["use_rslora"]) == (8, 16, False)
    assert record["rank_pattern"] == {r"model\.layers\.1\.self_attn\.k_proj": 4}
    assert record["alpha_pattern"] == {} and record["lora_dropout"] == 0.0
    ours = _our_logits(config, frozen, lora)
    _assert_same(
        "no-config export", ours, _peft_logits(folder, tmp_path), _base_logits(config, variables)
    )
    back = lj.peft.import_adapter(tmp_path, frozen, module_map=module_map(config), layouts=layouts)
    k_proj = "params/layers_1/self_attn/k_proj/kernel"
    for path, w in _flat(back).items():
        assert w.scale == (16 / 4 if path == k_proj else 16 / 8), path
        assert w.rank == (4 if path == k_proj else 8), path
    assert _flat(back).keys() == _flat(lora).keys()
    again = _our_logits(config, frozen, back)
    for x, y in zip(again, ours, strict=True):
        np.testing.assert_array_equal(x, y)


def test_rslora_adapter_imports_with_scale_alpha_over_sqrt_r(llama, tmp_path):
    folder, config, variables, layouts = _flax_base(llama, False)
    hf = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        use_rslora=True,
        target_modules=["q_proj", "v_proj"],
        rank_pattern={r"layers\.0\.self_attn\.v_proj": 2},
        init_lora_weights=False,
    )
    peft.get_peft_model(_torch(llama), hf).save_pretrained(tmp_path / "theirs")
    lora = lj.peft.import_adapter(
        tmp_path / "theirs", variables, module_map=module_map(config), layouts=layouts
    )
    v0 = "params/layers_0/self_attn/v_proj/kernel"
    assert len(_flat(lora)) == 4
    for path, w in _flat(lora).items():
        assert w.scale == (8 / math.sqrt(2) if path == v0 else 8 / math.sqrt(4)), path
    theirs = _peft_logits(folder, tmp_path / "theirs")
    base = _base_logits(config, variables)
    _assert_same("import rslora", _our_logits(config, variables, lora), theirs, base)
    # written back as the plain LoRA of the same scales (alpha = scale * r)
    lj.peft.export_adapter(tmp_path / "ours", lora, module_map=module_map(config))
    record = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert record["use_rslora"] is False and record["lora_alpha"] == 16
    (key, alpha), *more = record["alpha_pattern"].items()
    assert not more and key == r"model\.layers\.0\.self_attn\.v_proj"
    assert alpha / 2 == 8 / math.sqrt(2)  # PEFT's scale alpha / r is exactly ours
    _assert_same("re-export rslora", theirs, _peft_logits(folder, tmp_path / "ours"), base)


def test_export_takes_the_most_common_settings_and_import_casts(tmp_path):
    layout = lj.Layout("matrix", (0,), (1,))
    w = lambda r, scale, dropout: lj.LoraWeights(
        jnp.ones((4, r)), jnp.ones((r, 3)), layout, scale=scale, dropout=dropout
    )
    lora = {"a": w(2, 2.0, 0.1), "b": w(2, 2.0, 0.1), "c": w(4, 0.25, 0.0)}
    frozen = {k: jnp.zeros((4, 3)) for k in lora}
    mm = lj.peft.ModuleMap((lj.peft.ModuleRule(r"(\w)", r"m.\1"),))
    lj.peft.export_adapter(tmp_path, lora, module_map=mm, task_type=None)
    record = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (record["r"], record["lora_alpha"], record["lora_dropout"]) == (2, 4, 0.1)
    assert record["rank_pattern"] == {r"m\.c": 4} and record["alpha_pattern"] == {r"m\.c": 1}
    back = lj.peft.import_adapter(tmp_path, frozen, module_map=mm, dtype=jnp.bfloat16)
    assert {k: (v.scale, v.dropout, v.a.dtype) for k, v in back.items()} == {
        "a": (2.0, 0.1, jnp.bfloat16),
        "b": (2.0, 0.1, jnp.bfloat16),
        "c": (0.25, 0.1, jnp.bfloat16),  # PEFT has one dropout per adapter
    }
    with pytest.raises(TypeError, match="`dtype` must be a floating dtype"):
        lj.peft.import_adapter(tmp_path, frozen, module_map=mm, dtype=jnp.int32)


# Each case: our config, PEFT's config, and whether the base is loaded scanned.
CASES = {
    "rslora": (
        dict(rank=4, alpha=8, targets="all-linear", use_rslora=True),
        dict(r=4, lora_alpha=8, target_modules="all-linear", use_rslora=True),
        False,
    ),
    "patterns": (
        dict(
            rank=4,
            alpha=8,
            targets="all-linear",
            rank_pattern={"q_proj": 2, "layers_1/mlp/down_proj": 6},
            alpha_pattern={"v_proj": 3.0, "o_proj": 5.0},
        ),
        dict(
            r=4,
            lora_alpha=8,
            target_modules="all-linear",
            rank_pattern={"q_proj": 2, r"layers\.1\.mlp\.down_proj": 6},
            alpha_pattern={"v_proj": 3, "o_proj": 5},
        ),
        False,
    ),
    "q-v-only": (
        dict(rank=4, alpha=16, targets=r".*/(q_proj|v_proj)/kernel"),
        dict(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
        False,
    ),
    "embedding-and-head": (
        dict(rank=4, alpha=8, targets=[".*/embed_tokens/embedding", ".*/(lm_head|k_proj)/kernel"]),
        dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "lm_head", "k_proj"]),
        False,
    ),
    "scanned": (
        dict(rank=4, alpha=8, targets="all-linear", dropout=0.1),
        dict(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.1),
        True,
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_variants_both_ways(case, llama, tmp_path):
    ours_kw, peft_kw, scan = CASES[case]
    folder, config, variables, layouts = _flax_base(llama, scan)
    base = _base_logits(config, variables)
    # ours -> PEFT
    lora_config = lj.LoraConfig(**ours_kw)
    frozen, lora = lj.split(variables, lora_config, key=jax.random.key(0), layouts=layouts)
    lora = _perturbed(lora, 1)
    lj.peft.export_adapter(tmp_path / "ours", lora, module_map=module_map(config))
    ours = _our_logits(config, frozen, lora)
    _assert_same(f"export {case}", ours, _peft_logits(folder, tmp_path / "ours"), base)
    # PEFT -> ours
    hf = peft.LoraConfig(**peft_kw, init_lora_weights=False)
    peft.get_peft_model(_torch(folder), hf).save_pretrained(tmp_path / "theirs")
    lora2 = lj.peft.import_adapter(
        tmp_path / "theirs", variables, module_map=module_map(config), layouts=layouts
    )
    assert {p: w.rank for p, w in _flat(lora2).items()} == {
        p: w.rank for p, w in _flat(lora).items()
    }
    for path, w in _flat(lora).items():  # PEFT's scale (alpha/r or alpha/sqrt(r)) is ours
        assert _flat(lora2)[path].scale == w.scale, path
        assert _flat(lora2)[path].dropout == w.dropout == lora_config.dropout, path
    ours = _our_logits(config, variables, lora2)
    _assert_same(f"import {case}", ours, _peft_logits(folder, tmp_path / "theirs"), base)


def _flat(lora):
    return {
        "/".join(str(k.key) for k in kp): w
        for kp, w in jax.tree_util.tree_flatten_with_path(lora, is_leaf=_is_w)[0]
    }


def test_export_records_patterns_as_exact_module_names(llama, tmp_path):
    _, config, variables, layouts = _flax_base(llama, False)
    lora_config = lj.LoraConfig(**CASES["patterns"][0])
    _, lora = lj.split(variables, lora_config, key=jax.random.key(0), layouts=layouts)
    lj.peft.export_adapter(tmp_path, lora, module_map=module_map(config), task_type=None)
    record = json.loads((tmp_path / "adapter_config.json").read_text())
    assert record["rank_pattern"] == {
        r"model\.layers\.0\.self_attn\.q_proj": 2,
        r"model\.layers\.1\.self_attn\.q_proj": 2,
        r"model\.layers\.1\.mlp\.down_proj": 6,
    }
    assert record["alpha_pattern"] == {
        rf"model\.layers\.{i}\.self_attn\.{m}": a
        for i in range(2)
        for m, a in (("v_proj", 3), ("o_proj", 5))
    }
    assert record["task_type"] is None and record["use_dora"] is False
    with st.safe_open(str(tmp_path / "adapter_model.safetensors"), "np") as f:
        assert f.metadata()["format"] == "pt"  # and our digests (PEFT ignores them)
        a = f.get_tensor("base_model.model.model.layers.1.mlp.down_proj.lora_A.weight")
        b = f.get_tensor("base_model.model.model.layers.1.mlp.down_proj.lora_B.weight")
    assert a.shape == (6, 96) and b.shape == (64, 6)


@pytest.mark.slow
def test_export_merged_loads_in_transformers(llama, tmp_path):
    _, config, variables, layouts = _flax_base(llama, True)
    lora_config = lj.LoraConfig(rank=4, alpha=8, targets="all-linear")
    frozen, lora = lj.split(variables, lora_config, key=jax.random.key(0), layouts=layouts)
    lora = _perturbed(lora, 2)
    out = export_merged(tmp_path / "merged", config, frozen, lora)
    ours = _base_logits(config, lj.merge(frozen, lora))
    with torch.no_grad():
        model = _torch(out)
        theirs = [model(torch.from_numpy(ids)).logits.numpy() for ids in INPUTS]
    _assert_same("export_merged", ours, theirs, _base_logits(config, variables))


# ------------------------------------------------------------------- a user-written map


class Fused(nn.Module):
    """A fused q/k/v Dense (GQA widths) and a heads-shaped DenseGeneral pair."""

    @nn.compact
    def __call__(self, x):
        qkv = nn.Dense(32, name="qkv")(x)
        h = nn.DenseGeneral((2, 8), name="heads")(x)
        o = nn.DenseGeneral(16, axis=(-2, -1), name="out")(h)
        return jnp.concatenate([qkv, o], axis=-1)


class TorchFused(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = (torch.nn.Linear(16, n) for n in (16, 8, 8))
        self.heads, self.out = torch.nn.Linear(16, 16), torch.nn.Linear(16, 16)

    def forward(self, x):
        return torch.cat([self.q(x), self.k(x), self.v(x), self.out(self.heads(x))], dim=-1)


FUSED_MAP = lj.peft.ModuleMap(
    (
        lj.peft.ModuleRule("params/qkv/kernel", ("q", "k", "v"), sizes=(16, 8, 8)),
        lj.peft.ModuleRule(r"params/(heads|out)/kernel", r"\1"),
    )
)


@pytest.fixture(scope="module")
def fused():
    model = Fused()
    x = jax.random.normal(jax.random.key(0), (2, 5, 16))
    variables = model.init(jax.random.key(1), x)
    layouts = lj.infer_layouts(model.apply, variables, x)
    p = jax.tree.map(np.asarray, variables["params"])
    torch_model = TorchFused()
    weights = {
        "q": p["qkv"]["kernel"][:, :16].T,
        "k": p["qkv"]["kernel"][:, 16:24].T,
        "v": p["qkv"]["kernel"][:, 24:].T,
        "heads": p["heads"]["kernel"].reshape(16, 16).T,
        "out": p["out"]["kernel"].reshape(16, 16).T,
    }
    biases = {"q": p["qkv"]["bias"][:16], "k": p["qkv"]["bias"][16:24]}
    biases |= {"v": p["qkv"]["bias"][24:], "heads": p["heads"]["bias"].reshape(16)}
    biases |= {"out": p["out"]["bias"]}
    with torch.no_grad():
        for name, w in weights.items():
            getattr(torch_model, name).weight.copy_(torch.from_numpy(np.ascontiguousarray(w)))
            getattr(torch_model, name).bias.copy_(torch.from_numpy(biases[name]))
    with torch.no_grad():
        same = torch_model(torch.from_numpy(np.asarray(x))).numpy()
    np.testing.assert_allclose(same, np.asarray(model.apply(variables, x)), atol=1e-5)
    return model, variables, layouts, x, torch_model


def _torch_out(torch_model, adapter, x):
    wrapped = peft.PeftModel.from_pretrained(_copy(torch_model), adapter).eval()
    with torch.no_grad():
        return [wrapped(torch.from_numpy(np.asarray(x))).numpy()]


def _copy(torch_model):
    fresh = TorchFused()
    fresh.load_state_dict(torch_model.state_dict())
    return fresh.eval()


def test_user_map_fused_and_multi_axis_kernels_match_peft(fused, tmp_path):
    model, variables, layouts, x, torch_model = fused
    lora_config = lj.LoraConfig(rank=3, alpha=6, targets=".*/kernel")
    frozen, lora = lj.split(variables, lora_config, key=jax.random.key(2), layouts=layouts)
    lora = _perturbed(lora, 3)
    lj.peft.export_adapter(tmp_path, lora, module_map=FUSED_MAP, task_type=None)
    with st.safe_open(str(tmp_path / "adapter_model.safetensors"), "np") as f:
        a = {m: f.get_tensor(f"base_model.model.{m}.lora_A.weight") for m in "qkv"}
        assert f.get_tensor("base_model.model.k.lora_B.weight").shape == (8, 3)
    assert np.array_equal(a["q"], a["k"]) and np.array_equal(a["q"], a["v"])
    ours = [np.asarray(lj.lora_apply(model.apply)(frozen, lora, x))]
    _assert_same("user map export", ours, _torch_out(torch_model, tmp_path, x))
    back = lj.peft.import_adapter(tmp_path, frozen, module_map=FUSED_MAP, layouts=layouts)
    for path, w in _flat(lora).items():
        assert _flat(back)[path].scale == w.scale == 2.0
        np.testing.assert_array_equal(np.asarray(_flat(back)[path].a), np.asarray(w.a))
        np.testing.assert_array_equal(np.asarray(_flat(back)[path].b), np.asarray(w.b))
        assert _flat(back)[path].layout == w.layout


def test_user_map_import_from_peft_and_fused_guard(fused, tmp_path):
    model, variables, layouts, x, torch_model = fused
    # separate q/k/v adapters trained in PyTorch have different A's: no fused equivalent
    hf = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q", "v"], init_lora_weights=False)
    peft.get_peft_model(_copy(torch_model), hf).save_pretrained(tmp_path / "qv")
    with pytest.raises(ValueError, match=r"must share one A;.* q and v have different lora_A"):
        lj.peft.import_adapter(tmp_path / "qv", variables, module_map=FUSED_MAP, layouts=layouts)
    # the multi-axis kernels alone import and match
    hf = peft.LoraConfig(
        r=2, lora_alpha=4, target_modules=["heads", "out"], init_lora_weights=False
    )
    peft.get_peft_model(_copy(torch_model), hf).save_pretrained(tmp_path / "ho")
    lora = lj.peft.import_adapter(tmp_path / "ho", variables, module_map=FUSED_MAP, layouts=layouts)
    assert _flat(lora)["params/heads/kernel"].b.shape == (2, 2, 8)
    assert _flat(lora)["params/out/kernel"].a.shape == (2, 8, 2)
    ours = [np.asarray(lj.lora_apply(model.apply)(variables, lora, x))]
    _assert_same("user map import", ours, _torch_out(torch_model, tmp_path / "ho", x))


# ------------------------------------------------------------------------------ guards


@pytest.fixture
def exported(llama, tmp_path):
    """An exported q/v adapter of the unrolled Llama: (folder, config, variables, layouts)."""
    _, config, variables, layouts = _flax_base(llama, False)
    lora_config = lj.LoraConfig(**CASES["q-v-only"][0])
    _, lora = lj.split(variables, lora_config, key=jax.random.key(0), layouts=layouts)
    lj.peft.export_adapter(tmp_path, _perturbed(lora, 4), module_map=module_map(config))
    return tmp_path, config, variables, layouts


def _rewrite(folder: pathlib.Path, rename) -> None:
    path = str(folder / "adapter_model.safetensors")
    tensors = st.load_file(path)
    st.save_file({rename(k): v for k, v in tensors.items()}, path, metadata={"format": "pt"})


def test_import_rejects_keys_without_prefix(exported):
    folder, config, variables, layouts = exported
    _rewrite(folder, lambda k: k.removeprefix("base_model.model.") if ".0." in k else k)
    with pytest.raises(ValueError, match=r"without the 'base_model\.model\.' prefix") as err:
        lj.peft.import_adapter(folder, variables, module_map=module_map(config), layouts=layouts)
    assert "model.layers.0.self_attn.q_proj.lora_A.weight" in str(err.value)
    assert "nothing was imported" in str(err.value)


@pytest.mark.parametrize("damage", ["truncate", "header"])
def test_import_names_a_damaged_weights_file(exported, damage):
    folder, config, variables, layouts = exported
    path = folder / "adapter_model.safetensors"
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    else:
        path.write_bytes(data[:8] + b"\x00" * 16 + data[24:])  # the JSON header's start
    with pytest.raises(ValueError, match=r"cannot read .*adapter_model\.safetensors.*damaged"):
        lj.peft.import_adapter(folder, variables, module_map=module_map(config), layouts=layouts)


def test_import_refuses_flipped_bytes_in_an_exported_file(exported):
    """Safetensors keeps no checksum: flipped data bytes load as wrong numbers. Our exports
    record each tensor's digest in the header metadata (PEFT ignores it), checked on import."""
    folder, config, variables, layouts = exported
    path = folder / "adapter_model.safetensors"
    with safetensors.safe_open(str(path), framework="np") as f:
        assert f.metadata()["format"] == "pt" and "lora_jax.sha256" in f.metadata()
    kw = dict(module_map=module_map(config), layouts=layouts)
    good = lj.peft.import_adapter(folder, variables, **kw)
    data = bytearray(path.read_bytes())
    data[-64:] = bytes(b ^ 0x5A for b in data[-64:])  # the last tensor's data
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"adapter_model\.safetensors: tensor 'base_model\.model"):
        lj.peft.import_adapter(folder, variables, **kw)
    wrong = lj.peft.import_adapter(folder, variables, verify=False, **kw)
    pairs = zip(jax.tree.leaves(good), jax.tree.leaves(wrong), strict=True)
    assert not all(np.array_equal(x, y) for x, y in pairs)  # unchecked: wrong numbers


def test_import_rejects_keys_naming_no_module(exported):
    folder, config, variables, layouts = exported
    _rewrite(folder, lambda k: k.replace("layers.1.", "layers.7."))
    with pytest.raises(ValueError, match="naming no module of the base") as err:
        lj.peft.import_adapter(folder, variables, module_map=module_map(config), layouts=layouts)
    assert "base_model.model.model.layers.7.self_attn.v_proj.lora_B.weight" in str(err.value)
    assert "model.layers.1.self_attn" in str(err.value)  # the closest real modules


def test_import_rejects_what_peft_config_would_not_load(exported):
    folder, config, variables, layouts = exported
    load = lambda: lj.peft.import_adapter(
        folder, variables, module_map=module_map(config), layouts=layouts
    )
    path = folder / "adapter_config.json"
    record = json.loads(path.read_text())
    path.write_text(json.dumps({**record, "target_modules": ["q_proj"]}))
    with pytest.raises(ValueError, match="v_proj: not selected by target_modules"):
        load()
    path.write_text(json.dumps({**record, "r": 8}))
    with pytest.raises(ValueError, match=r"r=8 and the base need"):
        load()
    path.write_text(json.dumps({**record, "use_qalora": True, "modules_to_save": ["lm_head"]}))
    with pytest.raises(ValueError, match="use_qalora, modules_to_save"):
        load()
    path.write_text(json.dumps({**record, "init_lora_weights": "pissa_niter_4"}))
    with pytest.raises(ValueError, match=r"init_lora_weights='pissa_niter_4' .*residual base"):
        load()
    path.write_text(json.dumps({**record, "peft_type": "IA3"}))
    with pytest.raises(ValueError, match="peft_type must be 'LORA'"):
        load()


def test_import_onto_scanned_pads_ranks_that_differ_by_layer(llama, tmp_path):
    """PEFT's rank_pattern/alpha_pattern give layer 0 another r and alpha than layer 1; on
    a scanned base both are one stacked kernel: padded to the largest r, the other
    layer's alpha / r folded into its b, logits equal to real PEFT's."""
    _, config, variables, layouts = _flax_base(llama, True)
    layer0 = r"layers\.0\.self_attn\.q_proj"
    hf = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj"],
        rank_pattern={layer0: 2},
        alpha_pattern={layer0: 6},
        init_lora_weights=False,  # random B: the adapter moves the logits
    )
    peft.get_peft_model(_torch(llama), hf).save_pretrained(tmp_path)
    mm = module_map(config)
    lora = lj.peft.import_adapter(tmp_path, variables, module_map=mm, layouts=layouts)
    (w,) = jax.tree.leaves(lora, is_leaf=lambda x: isinstance(x, lj.LoraWeights))
    assert w.rank == 4 and w.a.shape[0] == 2  # one stacked adapter, two layers
    np.testing.assert_array_equal(np.asarray(w.a[0, ..., 2:]), 0.0)  # layer 0 padded
    base = _base_logits(config, variables)
    ours = _our_logits(config, variables, lora)
    _assert_same("import, ranks padded per layer", ours, _peft_logits(llama, tmp_path), base)
    with pytest.raises(ValueError, match=r"pass layouts=lj\.infer_layouts"):
        lj.peft.import_adapter(tmp_path, variables, module_map=mm)


def test_import_rejects_changed_embedding_base_weights(llama, tmp_path):
    _, config, variables, layouts = _flax_base(llama, False)
    hf = peft.LoraConfig(r=4, target_modules=["embed_tokens"], init_lora_weights=False)
    model = peft.get_peft_model(_torch(llama), hf)
    model.save_pretrained(tmp_path)  # saves the embedding's base weight beside the adapter
    assert "embed_tokens.base_layer.weight" in " ".join(
        st.load_file(str(tmp_path / "adapter_model.safetensors"))
    )
    lj.peft.import_adapter(tmp_path, variables, module_map=module_map(config), layouts=layouts)
    changed = jax.tree.map(lambda x: x, variables)
    changed["params"]["embed_tokens"]["embedding"] = (
        variables["params"]["embed_tokens"]["embedding"].at[0, 0].add(1.0)
    )
    with pytest.raises(ValueError, match=r"full base weights .* differ from `frozen`"):
        lj.peft.import_adapter(tmp_path, changed, module_map=module_map(config), layouts=layouts)


def test_export_checks_what_it_wrote(monkeypatch, llama, tmp_path):
    _, config, variables, layouts = _flax_base(llama, False)
    lora_config = lj.LoraConfig(**CASES["q-v-only"][0])
    _, lora = lj.split(variables, lora_config, key=jax.random.key(0), layouts=layouts)
    real = st.save_file
    lost = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"

    def lossy(tensors, filename, metadata=None):
        real({k: v for k, v in tensors.items() if k != lost}, filename, metadata=metadata)

    monkeypatch.setattr(st, "save_file", lossy)
    with pytest.raises(OSError, match=rf"missing:\s+{lost.replace('.', '[.]')}"):
        lj.peft.export_adapter(tmp_path, lora, module_map=module_map(config))


def test_export_refuses_what_peft_cannot_express(llama, tmp_path):
    _, config, variables, layouts = _flax_base(llama, False)
    mm = module_map(config)
    pissa = lj.LoraConfig(rank=2, targets=".*/q_proj/kernel", init="pissa")
    _, lora = lj.split(variables, pissa, key=jax.random.key(0), layouts=layouts)
    refused = r"residual init \(PiSSA, OLoRA\) cannot be exported(.|\n)*layers_0"
    with pytest.raises(ValueError, match=refused):
        lj.peft.export_adapter(tmp_path, lora, module_map=mm)
    plain = dataclasses.replace(pissa, init="normal")
    _, lora = lj.split(variables, plain, key=jax.random.key(0), layouts=layouts)
    partial = lj.peft.ModuleMap(mm.rules[2:])
    with pytest.raises(ValueError, match=r"no rule for these adapted paths:\s+params/layers_0"):
        lj.peft.export_adapter(tmp_path, lora, module_map=partial)
    clash = lj.peft.ModuleMap(
        (lj.peft.ModuleRule(r"params/layers_\d+/self_attn/q_proj/kernel", "q"),)
    )
    with pytest.raises(ValueError, match=r"sends both params/layers_0/.* and params/layers_1"):
        lj.peft.export_adapter(tmp_path, lora, module_map=clash)
    stacked = lj.multi.stack_adapters([lora, lora])
    with pytest.raises(ValueError, match=r"stacked adapters(.|\n)*unstack_adapter"):
        lj.peft.export_adapter(tmp_path, stacked, module_map=mm)
    with pytest.raises(ValueError, match="`lora` holds no adapters"):
        lj.peft.export_adapter(tmp_path, {}, module_map=mm)
    tied = module_map(dataclasses.replace(config, tie_embeddings=True))
    emb = lj.LoraConfig(rank=2, targets=".*/embedding")
    _, lora = lj.split(variables, emb, key=jax.random.key(0), layouts=layouts)
    with pytest.raises(ValueError, match="also the output head"):
        lj.peft.export_adapter(tmp_path, lora, module_map=tied)
    assert not (tmp_path / "adapter_config.json").exists()


def test_export_refuses_conv_and_bad_templates(tmp_path):
    conv = nn.Conv(4, (3, 3))
    x = jnp.ones((1, 5, 5, 2))
    variables = conv.init(jax.random.key(0), x)
    layouts = lj.infer_layouts(conv.apply, variables, x)
    config = lj.LoraConfig(rank=2, targets=".*/kernel")
    _, lora = lj.split(variables, config, key=jax.random.key(0), layouts=layouts)
    mm = lj.peft.ModuleMap((lj.peft.ModuleRule("params/kernel", "conv"),))
    with pytest.raises(ValueError, match="conv kernels are not supported"):
        lj.peft.export_adapter(tmp_path, lora, module_map=mm)
    scanned = lj.Layout("dense", (1,), (2,), stack_axes=(0,))
    flat = lj.peft.ModuleMap((lj.peft.ModuleRule("params/layers/fc/kernel", "layers.fc"),))
    with pytest.raises(ValueError, match=r"needs exactly \['0'\]"):
        flat.modules_for("params/layers/fc/kernel", (3, 4, 4), scanned)
    with pytest.raises(ValueError, match="sum to 7"):
        rule = lj.peft.ModuleRule("w", ("a", "b"), sizes=(3, 4))
        lj.peft.ModuleMap((rule,)).modules_for("w", (4, 8))
    with pytest.raises(ValueError, match="`sizes` must be 2 positive ints"):
        lj.peft.ModuleRule("w", ("a", "b"), sizes=(8,))
