"""DoRA and lora_bias adapters exchanged with HuggingFace PEFT, proven against PEFT itself on
PyTorch-CPU: our exports load in `peft.PeftModel` with the same logits, PEFT's DoRA /
lora_bias adapters import here with the same logits (scanned bases too, with ranks and
alphas that differ by layer), an export imports back exactly, and what one PEFT config
cannot hold is an error.

PEFT's keys: ``<module>.lora_magnitude_vector`` ``(out,)`` (DoRA, Linear and Embedding) and
``<module>.lora_B.bias`` ``(out,)`` (lora_bias), beside ``lora_A`` / ``lora_B``."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import test_peft as tp

import lora_jax as lj
from train.models import Llama
from train.models.peft_map import module_map

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
st = pytest.importorskip("safetensors.numpy")

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

TOL = 1e-4  # the bound on |logit difference|
MEASURED: dict[str, float] = {}  # max |logit difference| per check, printed with -s
PREFIX = "base_model.model."
fused = tp.fused  # the fused q/k/v + DenseGeneral model of test_peft, and its PyTorch twin

# PEFT rank / alpha patterns that give layer 0 and layer 1 of one scanned kernel different
# r and alpha: padded to one r, the other layer's scale folded into b (and the lora_bias).
LAYER_PATTERNS = dict(
    rank_pattern={r"layers\.0\.self_attn\.q_proj": 2, r"layers\.1\.mlp\.up_proj": 6},
    alpha_pattern={r"layers\.0\.self_attn\.q_proj": 6, r"layers\.1\.mlp\.up_proj": 3},
)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama_dora")
    tp._hf_base("LlamaConfig").save_pretrained(folder)
    return folder


def _check(name: str, ours, theirs, base=None) -> None:
    """Within TOL; and, given the base's outputs, visibly far from them."""
    diff = tp._max_diff(ours, theirs)
    MEASURED[name] = diff
    print(f"\n{name}: max |logit diff| = {diff:.2e}")
    assert diff <= TOL, f"{name}: max abs logit difference {diff} > {TOL}"
    assert base is None or tp._max_diff(ours, base) > 1e-2, f"{name}: the adapter changes nothing"


def _our_logits(config, frozen, lora) -> list[np.ndarray]:
    """Jitted always: DoRA's weight norm in eager mode is many small compiled ops."""
    apply = jax.jit(lj.lora_apply(Llama(config).apply))
    return [np.asarray(apply(frozen, lora, jnp.asarray(ids))) for ids in tp.INPUTS]


def _trained_like(lora, seed: int):
    """Random a and b, the magnitude moved by ~20% and a random bias: a trained adapter
    (NumPy draws: eager JAX draws compile once per shape)."""
    rng = np.random.default_rng(seed)
    draw = lambda x, scale: jnp.asarray(scale * rng.standard_normal(x.shape), x.dtype)
    leaves, treedef = jax.tree_util.tree_flatten(lora, is_leaf=tp._is_w)
    new = []
    for w in leaves:
        change = dict(a=draw(w.a, 0.2), b=draw(w.b, 0.2))
        if w.magnitude is not None:
            change["magnitude"] = w.magnitude * (1.0 + draw(w.magnitude, 0.2))
        if w.bias is not None:
            change["bias"] = draw(w.bias, 0.2)
        new.append(w.replace(**change))
    return jax.tree_util.tree_unflatten(treedef, new)


def _peft_trained(model):
    """PEFT's model with its DoRA magnitudes moved by ~20% and random lora_B biases."""
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1.0 + 0.2 * torch.randn_like(p))
            elif ".lora_B." in name and name.endswith(".bias"):
                p.copy_(0.2 * torch.randn_like(p))
    return model


def _tensors(folder) -> dict[str, np.ndarray]:
    return st.load_file(str(folder / "adapter_model.safetensors"))


def _assert_equal_trees(x, y) -> None:
    assert jax.tree.structure(x, is_leaf=tp._is_w) == jax.tree.structure(y, is_leaf=tp._is_w)
    for u, v in zip(jax.tree.leaves(x), jax.tree.leaves(y), strict=True):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


def _both_ways(name, llama, tmp_path, scan, ours_kw, peft_kw, *, train=False):
    """ours -> PEFT (same logits; the export imports back exactly) and PEFT -> ours; with
    `train`, a few real Adam steps first (every magnitude / bias moves)."""
    folder, config, variables, layouts = tp._flax_base(llama, scan)
    base = tp._base_logits(config, variables)
    mm = module_map(config)
    lora_config = lj.LoraConfig(rank=4, alpha=8, **ours_kw)
    frozen, lora = lj.split(variables, lora_config, key=jax.random.key(0), layouts=layouts)
    start = _trained_like(lora, 1)
    lora = tp._train(config, frozen, start) if train else start
    for w, w0 in zip(tp._flat(lora).values(), tp._flat(start).values(), strict=True):
        v, v0 = (w.magnitude, w0.magnitude) if w.bias is None else (w.bias, w0.bias)
        assert train != bool(np.array_equal(v, v0))
    out = tmp_path / "ours"
    lj.peft.export_adapter(out, lora, module_map=mm)
    ours = _our_logits(config, frozen, lora)
    _check(f"export {name}{' scanned' if scan else ''}", ours, tp._peft_logits(folder, out), base)
    back = lj.peft.import_adapter(out, frozen, module_map=mm, layouts=layouts)
    _assert_equal_trees(back, lora)
    theirs = tmp_path / "theirs"
    hf = peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **peft_kw)
    _peft_trained(peft.get_peft_model(tp._torch(folder), hf)).save_pretrained(theirs)
    lora2 = lj.peft.import_adapter(theirs, variables, module_map=mm, layouts=layouts)
    assert tp._flat(lora2).keys() == tp._flat(lora).keys()
    ours = _our_logits(config, variables, lora2)
    _check(
        f"import {name}{' scanned' if scan else ''}", ours, tp._peft_logits(folder, theirs), base
    )
    return out, lora2


# ---------------------------------------------------------------------------- both ways


@pytest.mark.slow
@pytest.mark.parametrize("scan", [False, True], ids=["unscanned", "scanned"])
def test_dora_all_linear_both_ways(scan, llama, tmp_path):
    patterns = LAYER_PATTERNS if scan else {}
    out, lora2 = _both_ways(
        "dora all-linear",
        llama,
        tmp_path,
        scan,
        dict(targets="all-linear", use_dora=True),
        dict(target_modules="all-linear", use_dora=True, **patterns),
        train=not scan,  # real Adam steps unscanned: magnitudes and b moved by training
    )
    record = json.loads((out / "adapter_config.json").read_text())
    assert record["use_dora"] is True and record["lora_bias"] is False
    tensors = _tensors(out)
    key = f"{PREFIX}model.layers.1.self_attn.k_proj.lora_magnitude_vector"
    assert tensors[key].shape == (32,)  # k_proj: (kv_heads * head_dim,)
    assert sum(k.endswith(".lora_magnitude_vector") for k in tensors) == 14
    for w in tp._flat(lora2).values():  # (*stack, *out): b's shape without the rank axis
        n = len(w.layout.stack_axes)
        assert w.magnitude is not None and w.magnitude.shape == w.b.shape[:n] + w.b.shape[n + 1 :]
    if scan:  # one stacked q_proj: layer 0 has r=2 (padded to 4) and its own scale
        q = tp._flat(lora2)["params/layers/self_attn/q_proj/kernel"]
        assert q.rank == 4 and q.magnitude.shape == (2, 64)
        np.testing.assert_array_equal(np.asarray(q.a[0, :, 2:]), 0.0)


@pytest.mark.slow
def test_dora_embedding_both_ways(llama, tmp_path):
    out, _ = _both_ways(
        "dora embedding",
        llama,
        tmp_path,
        False,
        dict(targets=[".*/embed_tokens/embedding", ".*/(v_proj|lm_head)/kernel"], use_dora=True),
        dict(target_modules=["embed_tokens", "v_proj", "lm_head"], use_dora=True),
    )
    tensors = _tensors(out)
    # PEFT's Embedding DoRA: the norm over the vocabulary, one magnitude per embedding feature
    assert tensors[f"{PREFIX}model.embed_tokens.lora_magnitude_vector"].shape == (64,)
    assert tensors[f"{PREFIX}model.embed_tokens.lora_embedding_A"].shape == (4, 128)
    assert tensors[f"{PREFIX}lm_head.lora_magnitude_vector"].shape == (128,)


@pytest.mark.slow
@pytest.mark.parametrize("scan", [False, True], ids=["unscanned", "scanned"])
def test_lora_bias_both_ways(scan, llama, tmp_path):
    patterns = LAYER_PATTERNS if scan else {}
    out, lora2 = _both_ways(
        "lora_bias",
        llama,
        tmp_path,
        scan,
        dict(targets="all-linear", lora_bias=True),
        dict(target_modules="all-linear", lora_bias=True, **patterns),
    )
    record = json.loads((out / "adapter_config.json").read_text())
    assert record["lora_bias"] is True and record["use_dora"] is False
    tensors = _tensors(out)
    assert tensors[f"{PREFIX}model.layers.0.mlp.down_proj.lora_B.bias"].shape == (64,)
    assert sum(k.endswith(".lora_B.bias") for k in tensors) == 14
    assert not any("magnitude" in k for k in tensors)
    assert all(w.bias is not None and w.magnitude is None for w in tp._flat(lora2).values())


# --------------------------------------------------------- fused, per-slice, missing parts


def _fused_map_case(fused, kind: str):
    model, variables, layouts, x, torch_model = fused
    extra = {"use_dora": True} if kind == "dora" else {"lora_bias": True}
    lora_config = lj.LoraConfig(rank=3, alpha=6, targets=".*/kernel", **extra)
    frozen, lora = lj.split(variables, lora_config, key=jax.random.key(2), layouts=layouts)
    lora = _trained_like(lora, 4)
    return model, frozen, layouts, x, torch_model, lora


@pytest.mark.parametrize("kind", ["dora", "lora_bias"])
def test_fused_and_multi_axis_kernels_split_their_vectors(kind, fused, tmp_path):
    """The fused q/k/v kernel's magnitude / bias is sliced like b (q 16, k 8, v 8); the
    DenseGeneral heads kernel's is flattened head-major; PEFT's outputs are ours."""
    model, frozen, layouts, x, torch_model, lora = _fused_map_case(fused, kind)
    lj.peft.export_adapter(tmp_path, lora, module_map=tp.FUSED_MAP, task_type=None)
    suffix = "lora_magnitude_vector" if kind == "dora" else "lora_B.bias"
    field = "magnitude" if kind == "dora" else "bias"
    tensors = _tensors(tmp_path)
    vector = np.asarray(getattr(lora["params"]["qkv"]["kernel"], field))
    np.testing.assert_array_equal(tensors[f"{PREFIX}k.{suffix}"], vector[16:24])
    heads = np.asarray(getattr(lora["params"]["heads"]["kernel"], field))  # (2, 8)
    np.testing.assert_array_equal(tensors[f"{PREFIX}heads.{suffix}"], heads.reshape(16))
    ours = [np.asarray(lj.lora_apply(model.apply)(frozen, lora, x))]
    _check(f"user map export {kind}", ours, tp._torch_out(torch_model, tmp_path, x))
    back = lj.peft.import_adapter(tmp_path, frozen, module_map=tp.FUSED_MAP, layouts=layouts)
    _assert_equal_trees(back, lora)


@pytest.mark.parametrize("kind", ["dora", "lora_bias"])
def test_fused_part_missing_from_the_file_keeps_the_base(kind, fused, tmp_path):
    """A PEFT adapter of q and v only, on our fused q/k/v kernel: k gets b = 0, a zero bias
    and (DoRA) the magnitude ``‖W_k‖``, so k's output is the base's, as in PEFT."""
    model, frozen, layouts, x, torch_model, lora = _fused_map_case(fused, kind)
    lj.peft.export_adapter(tmp_path, lora, module_map=tp.FUSED_MAP, task_type=None)
    tensors = {k: v for k, v in _tensors(tmp_path).items() if not k.startswith(f"{PREFIX}k.")}
    st.save_file(tensors, str(tmp_path / "adapter_model.safetensors"), metadata={"format": "pt"})
    config_path = tmp_path / "adapter_config.json"
    record = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**record, "target_modules": ["q", "v", "heads", "out"]}))
    back = lj.peft.import_adapter(tmp_path, frozen, module_map=tp.FUSED_MAP, layouts=layouts)
    qkv = back["params"]["qkv"]["kernel"]
    np.testing.assert_array_equal(np.asarray(qkv.b[:, 16:24]), 0.0)
    ours = [np.asarray(lj.lora_apply(model.apply)(frozen, back, x))]
    _check(f"user map import, k missing, {kind}", ours, tp._torch_out(torch_model, tmp_path, x))


def test_per_slice_adapters_export_one_vector_per_module(tmp_path):
    """One DoRA adapter per slice of a k/v kernel ``(2, d, heads, head_dim)`` (the k/v axis a
    stack axis): k_proj and v_proj each get their slice's magnitude, and back exactly."""
    layout = lj.Layout("einsum", (1,), (2, 3), stack_axes=(0,))
    keys = jax.random.split(jax.random.key(0), 3)
    w = lj.LoraWeights(
        jax.random.normal(keys[0], (2, 12, 2)),
        jax.random.normal(keys[1], (2, 2, 3, 4)),
        layout,
        scale=2.0,
        magnitude=1.0 + jax.random.uniform(keys[2], (2, 3, 4)),
    )
    kv = lj.peft.ModuleRule("kv", "attn.{0}", names={0: ("k_proj", "v_proj")})
    kv_map = lj.peft.ModuleMap((kv,))
    lj.peft.export_adapter(tmp_path, {"kv": w}, module_map=kv_map, task_type=None)
    tensors = _tensors(tmp_path)
    for i, name in enumerate(("k_proj", "v_proj")):
        got = tensors[f"{PREFIX}attn.{name}.lora_magnitude_vector"]
        np.testing.assert_array_equal(got, np.asarray(w.magnitude[i]).reshape(12))
    frozen = {"kv": jnp.ones((2, 12, 3, 4))}
    back = lj.peft.import_adapter(tmp_path, frozen, module_map=kv_map, layouts={"kv": layout})
    _assert_equal_trees(back, {"kv": w})


# ------------------------------------------------------------------------------ guards


def _fc(**vectors) -> lj.LoraWeights:
    layout = lj.Layout("matrix", (0,), (1,))
    return lj.LoraWeights(jnp.ones((4, 2)), jnp.ones((2, 3)), layout, scale=2.0, **vectors)


FC_MAP = lj.peft.ModuleMap((lj.peft.ModuleRule(r"(\w+)", r"m.\1"),))


def test_export_refuses_what_one_peft_config_cannot_hold(tmp_path):
    ones = jnp.ones((3,))
    export = lambda lora, mm=FC_MAP: lj.peft.export_adapter(tmp_path, lora, module_map=mm)
    with pytest.raises(ValueError, match=r"one use_dora for every module(.|\n)*plain LoRA:\s+fc2"):
        export({"fc": _fc(magnitude=ones), "fc2": _fc()})
    with pytest.raises(ValueError, match=r"refuses lora_bias with use_dora(.|\n)*\s+fc"):
        export({"fc": _fc(magnitude=ones, bias=ones)})
    emb = lj.LoraWeights(jnp.ones((5, 2)), jnp.ones((2, 3)), lj.Layout("embed", (0,), (1,)))
    with pytest.raises(ValueError, match=r"no lora_bias for Embedding(.|\n)*embedding adapters"):
        export({"fc": _fc(bias=ones), "emb": emb})
    experts = lj.peft.ModuleRule("moe", "m.experts.gate_up", kind="parameter")
    moe_map = lj.peft.ModuleMap((experts, *FC_MAP.rules))
    layout = lj.Layout("einsum", (1,), (2,), stack_axes=(0,))
    moe = lj.LoraWeights(jnp.ones((4, 8, 2)), jnp.ones((4, 2, 6)), layout)
    with pytest.raises(ValueError, match=r"no lora_bias for target_parameters(.|\n)*\s+moe"):
        export({"fc": _fc(bias=ones), "moe": moe}, moe_map)
    for field, flag in (("magnitude", "use_dora"), ("bias", "lora_bias")):
        vector = {field: jnp.ones((4, 6))}
        with pytest.raises(ValueError, match=rf"no {flag} for target_parameters(.|\n)*moe"):
            export({"moe": dataclasses.replace(moe, **vector)}, moe_map)
    assert not (tmp_path / "adapter_config.json").exists()
    # a mix of adapters with and without lora_bias: a zero bias is the same output
    export({"fc": _fc(bias=ones), "fc2": _fc()})
    np.testing.assert_array_equal(_tensors(tmp_path)[f"{PREFIX}m.fc2.lora_B.bias"], 0.0)


@pytest.fixture
def exported_dora(tmp_path):
    lora = {"fc": _fc(magnitude=jnp.arange(1.0, 4.0)), "gc": _fc(magnitude=jnp.ones((3,)))}
    lj.peft.export_adapter(tmp_path, lora, module_map=FC_MAP, task_type=None)
    frozen = {k: jnp.ones((4, 3)) for k in lora}
    return tmp_path, frozen


def _edit(folder, config=None, drop=None, add=None) -> None:
    if config:
        path = folder / "adapter_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **config}))
    tensors = {k: v for k, v in _tensors(folder).items() if drop is None or drop not in k}
    tensors |= add or {}
    st.save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})


def test_import_refuses_vectors_that_do_not_fit(exported_dora):
    folder, frozen = exported_dora
    load = lambda: lj.peft.import_adapter(folder, frozen, module_map=FC_MAP)
    np.testing.assert_array_equal(load()["fc"].magnitude, [1.0, 2.0, 3.0])
    _edit(folder, add={f"{PREFIX}m.gc.lora_magnitude_vector": np.ones(4, np.float32)})
    with pytest.raises(ValueError, match=r"m\.gc: lora_magnitude_vector has shape \(4,\)"):
        load()
    _edit(folder, drop="gc.lora_magnitude")
    with pytest.raises(ValueError, match=r"m\.gc: no lora_magnitude_vector in the file"):
        load()
    _edit(folder, config={"use_dora": False})
    with pytest.raises(ValueError, match=r"m\.fc: a lora_magnitude_vector in the file, though"):
        load()
    _edit(folder, drop="magnitude", config={"lora_bias": True})
    with pytest.raises(ValueError, match=r"m\.fc: no lora_B\.bias in the file"):
        load()
    _edit(folder, config={"lora_bias": True, "use_dora": True})
    with pytest.raises(ValueError, match="PEFT would not load use_dora together with lora_bias"):
        load()
    _edit(folder, config={"lora_bias": False, "target_parameters": ["experts.w"]})
    with pytest.raises(ValueError, match="use_dora with target_parameters"):
        load()


def test_import_refuses_lora_bias_on_an_embedding(tmp_path):
    emb = lj.Layout("embed", (0,), (1,))
    lora = {"emb": lj.LoraWeights(jnp.ones((5, 2)), jnp.ones((2, 3)), emb)}
    lj.peft.export_adapter(tmp_path, lora, module_map=FC_MAP, task_type=None)
    _edit(tmp_path, config={"lora_bias": True}, add={f"{PREFIX}m.emb.lora_B.bias": np.ones(3)})
    with pytest.raises(ValueError, match=r"m\.emb: lora_bias on an Embedding"):
        lj.peft.import_adapter(
            tmp_path, {"emb": jnp.ones((5, 3))}, module_map=FC_MAP, layouts={"emb": emb}
        )
