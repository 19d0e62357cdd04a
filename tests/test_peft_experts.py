"""Expert adapters and PEFT's ``target_parameters``, proven against PEFT itself.

Our expert kernel ``(E, in, out)`` (layout: stack (0,) experts, in (1,), out (2,)) has an
independent pair ``a_e (in, r)``, ``b_e (r, out)`` per expert. PEFT's `ParamWrapper`
(``peft/tuners/lora/layer.py``) holds the same thing for a 3-D ``nn.Parameter``:
``lora_A.weight (E*r, in)``, expert-major rows, and ``lora_B.weight (out, r*E)``,
rank-major columns. These tests export to and import from real PEFT on real transformers
expert modules (Qwen3Moe, GptOss, Llama4) and compare the effective weight update, the
experts' outputs (a `jax.lax.ragged_dot` reference) and whole-model logits."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import perturb

import lora_jax as lj

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
st = pytest.importorskip("safetensors.numpy")

torch.set_num_threads(1)
transformers.logging.set_verbosity_error()
pytestmark = pytest.mark.filterwarnings(
    "ignore::UserWarning", "ignore::FutureWarning", "ignore::RuntimeWarning"
)

E, H, MOE_I, LAYERS = 4, 16, 8, 2
TOL = 3e-6
ORDER = ("gate_up_proj", "down_proj")  # Qwen3MoeExperts registers them in this order
EXPERTS = lj.Layout("einsum", (1,), (2,), stack_axes=(0,))
SCANNED = lj.Layout("einsum", (2,), (3,), stack_axes=(0, 1))


def _rule(flax: str, torch_name: str, scan: bool, **kw) -> lj.peft.ModuleRule:
    if scan:
        return lj.peft.ModuleRule(
            f"params/layers/{flax}", f"model.layers.{{0}}.mlp.experts.{torch_name}", **kw
        )
    return lj.peft.ModuleRule(
        rf"params/layers_(\d+)/{flax}", rf"model.layers.\1.mlp.experts.{torch_name}", **kw
    )


def qwen_map(scan: bool) -> lj.peft.ModuleMap:
    kw = dict(kind="parameter", parameter_order=ORDER)
    return lj.peft.ModuleMap(
        (_rule("gate_up", "gate_up_proj", scan, **kw), _rule("down", "down_proj", scan, **kw))
    )


@pytest.fixture(scope="module")
def qwen():
    """A tiny random Qwen3Moe (every weight drawn) and its expert kernels as Flax arrays
    ``(E, in, out)``: unrolled (``layers_i``) and scanned (``layers``, ``(L, E, in, out)``)."""
    config = transformers.Qwen3MoeConfig(
        vocab_size=64,
        hidden_size=H,
        intermediate_size=32,
        moe_intermediate_size=MOE_I,
        num_hidden_layers=LAYERS,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        num_experts=E,
        num_experts_per_tok=2,
        max_position_embeddings=32,
        attn_implementation="eager",
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(0.15 * torch.randn_like(p) + (1.0 if name.endswith("norm.weight") else 0.0))
    state = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    kernel = lambda i, n: jnp.asarray(state[f"model.layers.{i}.mlp.experts.{n}"].transpose(0, 2, 1))
    layers = {
        f"layers_{i}": {"gate_up": kernel(i, ORDER[0]), "down": kernel(i, ORDER[1])}
        for i in range(LAYERS)
    }
    scanned = {
        n: jnp.stack([layers[f"layers_{i}"][n] for i in range(LAYERS)]) for n in ("gate_up", "down")
    }
    return config, state, {"params": layers}, {"params": {"layers": scanned}}


def _flat(tree):
    """``{path: leaf}`` with `LoraWeights` as leaves."""
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_w)[0]
    return {"/".join(str(k.key) for k in kp): x for kp, x in leaves}


def _is_w(x):
    return isinstance(x, lj.LoraWeights)


def _layouts(variables, layout):
    return {path: layout for path in _flat(variables)}


def _split(variables, layout, seed, **kw):
    config = lj.LoraConfig(rank=2, alpha=3.0, targets="params/.*", **kw)
    layouts = _layouts(variables, layout)
    frozen, lora = lj.split(variables, config, key=jax.random.key(seed), layouts=layouts)
    return frozen, perturb(lora, jax.random.key(seed + 1), scale=0.3), layouts


def _torch_deltas(frozen, lora, scan: bool) -> dict[str, np.ndarray]:
    """Our update of each torch expert parameter ``(E, out, in)``, from the merged kernels."""
    merged = lj.merge(frozen, lora)["params"]
    base = frozen["params"]
    out = {}
    for i in range(LAYERS):
        for flax, name in (("gate_up", ORDER[0]), ("down", ORDER[1])):
            if scan:
                d = np.asarray(merged["layers"][flax][i] - base["layers"][flax][i])
            else:
                d = np.asarray(merged[f"layers_{i}"][flax] - base[f"layers_{i}"][flax])
            out[f"model.layers.{i}.mlp.experts.{name}"] = d.transpose(0, 2, 1)
    return out


def _hf(config, state):
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in state.items()})
    return model


def _wrappers(model):
    """``{full parameter name: its ParamWrapper}`` in a PeftModel."""
    out = {}
    for name, module in model.named_modules():
        if type(module).__name__ == "ParamWrapper":
            owner = name.removeprefix("base_model.model.").split(".base_layer")[0]
            out[f"{owner}.{module.parameter_name}"] = module
    return out


IDS = torch.from_numpy(np.random.default_rng(0).integers(0, 64, (2, 9)))


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
def test_expert_adapters_export_as_peft_target_parameters(qwen, scan, tmp_path):
    config, state, layers, scanned = qwen
    variables = scanned if scan else layers
    layout = SCANNED if scan else EXPERTS
    pattern = {} if scan else {"params/layers_1/down": 3}
    frozen, lora, layouts = _split(variables, layout, 2, rank_pattern=pattern)
    lj.peft.export_adapter(tmp_path, lora, module_map=qwen_map(scan))
    record = json.loads((tmp_path / "adapter_config.json").read_text())
    names = [f"model.layers.{i}.mlp.experts.{n}" for i in range(LAYERS) for n in sorted(ORDER)]
    assert record["target_modules"] == [] and record["target_parameters"] == names
    # the keys and shapes PEFT itself saves for these parameters and ranks
    ranks = {} if scan else {r"model\.layers\.1\.mlp\.experts\.down_proj": 3}
    assert record["rank_pattern"] == ranks
    hf = peft.LoraConfig(
        r=2, lora_alpha=3, target_modules=[], target_parameters=names, rank_pattern=ranks
    )
    peft.get_peft_model(_hf(config, state), hf).save_pretrained(tmp_path / "peft")
    theirs = st.load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    ours = st.load_file(str(tmp_path / "adapter_model.safetensors"))
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    assert "base_model.model.model.layers.0.mlp.experts.base_layer.lora_A.weight" in ours  # gate_up
    # loaded in PEFT: every parameter's update is ours
    model = peft.PeftModel.from_pretrained(_hf(config, state), tmp_path).eval()
    deltas = _torch_deltas(frozen, lora, scan)
    wrappers = _wrappers(model)
    assert sorted(wrappers) == names
    for name, wrapper in wrappers.items():
        found = wrapper.get_delta_weight("default").detach().numpy()
        np.testing.assert_allclose(found, deltas[name], atol=TOL, err_msg=name)
        assert np.abs(deltas[name]).max() > 0.1
    # the model's logits with PEFT's adapter are those of the base with our merged weights
    merged = {k: v + deltas.get(k, 0) for k, v in state.items()}
    with torch.no_grad():
        peft_logits = model(IDS).logits.numpy()
        ours_logits = _hf(config, merged)(IDS).logits.numpy()
        base_logits = _hf(config, state)(IDS).logits.numpy()
    diff = np.abs(peft_logits - ours_logits).max()
    print(f"\nlogits: max |PEFT - ours merged| = {diff:.2e}")
    assert diff <= TOL
    assert np.abs(peft_logits - base_logits).max() > 1e-2
    # and back: the same factors, scales and layouts
    back = lj.peft.import_adapter(tmp_path, frozen, module_map=qwen_map(scan), layouts=layouts)
    flat, flat_back = _flat(lora), _flat(back)
    assert flat.keys() == flat_back.keys()
    for path, w in flat.items():
        got = flat_back[path]
        assert (got.layout, got.scale, got.rank) == (w.layout, w.scale, w.rank), path
        np.testing.assert_array_equal(np.asarray(got.a), np.asarray(w.a))
        np.testing.assert_array_equal(np.asarray(got.b), np.asarray(w.b))


def test_peft_made_expert_adapter_imports_exactly(qwen, tmp_path):
    config, state, layers, _ = qwen
    names = [f"model.layers.{i}.mlp.experts.{n}" for i in range(LAYERS) for n in ORDER]
    hf = peft.LoraConfig(
        r=3,
        lora_alpha=5,
        use_rslora=True,
        target_modules=[],
        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
        init_lora_weights=False,
    )
    model = peft.get_peft_model(_hf(config, state), hf)
    model.save_pretrained(tmp_path / "theirs")
    layouts = _layouts(layers, EXPERTS)
    lora = lj.peft.import_adapter(
        tmp_path / "theirs", layers, module_map=qwen_map(False), layouts=layouts
    )
    assert all(w.rank == 3 and w.scale == 5 / np.sqrt(3) for w in _flat(lora).values())
    deltas = _torch_deltas(layers, lora, scan=False)
    for name, wrapper in _wrappers(model).items():
        found = wrapper.get_delta_weight("default").detach().numpy()
        np.testing.assert_allclose(deltas[name], found, atol=TOL, err_msg=name)
    assert sorted(deltas) == sorted(names)
    # written back: the same tensors, bit for bit (as the plain LoRA of the same scale)
    lj.peft.export_adapter(tmp_path / "ours", lora, module_map=qwen_map(False))
    theirs = st.load_file(str(tmp_path / "theirs" / "adapter_model.safetensors"))
    ours = st.load_file(str(tmp_path / "ours" / "adapter_model.safetensors"))
    assert ours.keys() == theirs.keys()
    for key, x in theirs.items():
        np.testing.assert_array_equal(ours[key], x, err_msg=key)


# ------------------------------------------------- the expert modules of transformers


def _experts(kind: str):
    """A maker of a holder of a transformers expert module (random weights, `state`), the
    Flax view ``(E, in, out)`` of its two kernels, its parameter order and whether PEFT's
    lora_A side is our output."""
    if kind == "qwen3_moe":
        config = transformers.Qwen3MoeConfig(hidden_size=H, moe_intermediate_size=6, num_experts=E)
        cls = transformers.models.qwen3_moe.modeling_qwen3_moe.Qwen3MoeExperts
        to_flax, order, swap = (lambda w: w.transpose(0, 2, 1)), ORDER, False  # (E, out, in)
    elif kind == "gpt_oss":
        config = transformers.GptOssConfig(hidden_size=H, intermediate_size=6, num_local_experts=E)
        cls = transformers.models.gpt_oss.modeling_gpt_oss.GptOssExperts
        order = ("gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias")
        to_flax, swap = (lambda w: w), False  # (E, in, out) with is_transposed
    else:
        config = transformers.Llama4TextConfig(
            hidden_size=H, intermediate_size=6, num_local_experts=E
        )
        cls = transformers.models.llama4.modeling_llama4.Llama4TextExperts
        to_flax, order, swap = (lambda w: w), ORDER, True  # (E, in, out), no is_transposed
    config._experts_implementation = "eager"

    def make(state):
        holder = torch.nn.Module()
        holder.experts = cls(config)
        holder.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})
        return holder.eval()

    shapes = {k: tuple(v.shape) for k, v in cls(config).state_dict().items()}
    rng = np.random.default_rng(1)
    state = {
        f"experts.{k}": (0.3 * rng.standard_normal(s)).astype(np.float32) for k, s in shapes.items()
    }
    flax = {n: jnp.asarray(to_flax(state[f"experts.{n}_proj"])) for n in ("gate_up", "down")}
    return make, state, {"params": flax}, to_flax, order, swap


def _run(holder, inputs):
    with torch.no_grad():
        return holder.experts(*inputs).numpy()


def _inputs(kind: str):
    rng = np.random.default_rng(2)
    x = torch.from_numpy(rng.standard_normal((10, H)).astype(np.float32))
    if kind == "llama4":  # tokens already grouped per expert: (E * tokens, H)
        return (torch.from_numpy(rng.standard_normal((E * 3, H)).astype(np.float32)),)
    idx = torch.from_numpy(np.stack([rng.permutation(E)[:2] for _ in range(10)]))
    weights = torch.from_numpy(rng.random((10, 2)).astype(np.float32))
    return x, idx, weights


def _ragged_reference(x, idx, weights, gate_up, down):
    """Qwen3Moe's experts in JAX: tokens sorted by expert through `lax.ragged_dot`."""
    x, idx, weights = (jnp.asarray(t.numpy()) for t in (x, idx, weights))
    flat = idx.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    token = jnp.repeat(jnp.arange(x.shape[0]), idx.shape[1])[order]
    sizes = jnp.bincount(flat, length=gate_up.shape[0]).astype(jnp.int32)
    dot = lambda a, w: jax.lax.ragged_dot(a, w, sizes, precision=jax.lax.Precision.HIGHEST)
    gate, up = jnp.split(dot(x[token], gate_up), 2, axis=-1)
    y = dot(jax.nn.silu(gate) * up, down) * weights.reshape(-1)[order][:, None]
    return np.asarray(jnp.zeros_like(x).at[token].add(y))


def _expert_map(order, swap) -> lj.peft.ModuleMap:
    kw = dict(kind="parameter", parameter_order=order, swap_factors=swap)
    return lj.peft.ModuleMap(
        tuple(
            lj.peft.ModuleRule(f"params/{n}", f"experts.{n}_proj", **kw)
            for n in ("gate_up", "down")
        )
    )


@pytest.mark.parametrize("kind", ["qwen3_moe", "gpt_oss", "llama4"])
def test_transformers_expert_modules_match(kind, tmp_path):
    make, state, variables, to_flax, order, swap = _experts(kind)
    frozen, lora, layouts = _split(variables, EXPERTS, 5)
    lj.peft.export_adapter(tmp_path, lora, module_map=_expert_map(order, swap), task_type=None)
    model = peft.PeftModel.from_pretrained(make(state), tmp_path).eval()
    merged = lj.merge(frozen, lora)["params"]
    ours = {f"experts.{n}_proj": to_flax(np.asarray(merged[n])) for n in ("gate_up", "down")}
    for name, wrapper in _wrappers(model).items():
        found = wrapper.get_delta_weight("default").detach().numpy()
        np.testing.assert_allclose(found, ours[name] - state[name], atol=TOL, err_msg=name)
    assert sorted(_wrappers(model)) == sorted(ours)
    inputs = _inputs(kind)
    theirs = _run(model.base_model.model, inputs)
    _assert_close(theirs, _run(make(state | ours), inputs), _run(make(state), inputs))
    if kind == "qwen3_moe":
        _assert_close(theirs, _ragged_reference(*inputs, merged["gate_up"], merged["down"]), None)
    back = lj.peft.import_adapter(
        tmp_path, frozen, module_map=_expert_map(order, swap), layouts=layouts
    )
    for path, w in _flat(lora).items():
        np.testing.assert_array_equal(np.asarray(_flat(back)[path].a), np.asarray(w.a))
        np.testing.assert_array_equal(np.asarray(_flat(back)[path].b), np.asarray(w.b))


def test_the_swap_is_what_peft_reads(tmp_path):
    """Llama4's experts without `swap_factors`: PEFT expects other shapes and refuses."""
    make, state, variables, _, order, _ = _experts("llama4")
    _, lora, _ = _split(variables, EXPERTS, 5)
    lj.peft.export_adapter(tmp_path, lora, module_map=_expert_map(order, False), task_type=None)
    with pytest.raises(RuntimeError, match="size mismatch"):
        peft.PeftModel.from_pretrained(make(state), tmp_path)


def _assert_close(theirs, ours, base):
    diff = float(np.abs(theirs - ours).max())
    print(f"\nmax |PEFT - ours| = {diff:.2e}")
    assert diff <= TOL, f"max abs difference {diff}"
    assert base is None or np.abs(theirs - base).max() > 1e-2, "the adapter changes nothing"


# ------------------------------------------------------------------------------ guards


def test_export_guards(tmp_path):
    make, state, variables, _, order, _ = _experts("qwen3_moe")
    frozen, lora, _ = _split(variables, EXPERTS, 5)
    w = lora["params"]["down"]
    dropped = {"params": {**lora["params"], "down": w.replace(dropout=0.1)}}
    with pytest.raises(
        ValueError, match=r"ParamWrapper .* lora_dropout != 0(.|\n)*params/down: dropout 0.1"
    ):
        lj.peft.export_adapter(tmp_path, dropped, module_map=_expert_map(order, False))
    unordered = _expert_map(None, False)
    with pytest.raises(
        ValueError, match=r"module experts gets LoRA on several parameters .*parameter_order"
    ):
        lj.peft.export_adapter(tmp_path, lora, module_map=unordered)
    gate_up, down = _expert_map(order, False).rules
    mixed = lj.peft.ModuleMap((gate_up, dataclasses.replace(down, parameter_order=order[::-1])))
    with pytest.raises(ValueError, match="parameters of experts give different `parameter_order`s"):
        lj.peft.export_adapter(tmp_path, lora, module_map=mixed)
    # one parameter of a module needs no order: it is saved under the module's name
    alone = {"params": {"down": w}}
    lj.peft.export_adapter(tmp_path, alone, module_map=unordered, task_type=None)
    keys = st.load_file(str(tmp_path / "adapter_model.safetensors"))
    assert sorted(keys) == [
        "base_model.model.experts.lora_A.weight",
        "base_model.model.experts.lora_B.weight",
    ]
    model = peft.PeftModel.from_pretrained(make(state), tmp_path)
    found = _wrappers(model)["experts.down_proj"].get_delta_weight("default").detach().numpy()
    want = np.asarray(lj.merge(frozen, alone)["params"]["down"] - frozen["params"]["down"])
    np.testing.assert_allclose(found, want.transpose(0, 2, 1), atol=TOL)
    no_experts = lj.peft.ModuleMap(
        (lj.peft.ModuleRule("params/down", "experts.down_proj", kind="parameter"),)
    )
    with pytest.raises(ValueError, match=r"params/down: a 'parameter' rule needs an experts axis"):
        no_experts.modules_for("params/down", (6, 16))
    bare = lj.peft.ModuleMap((lj.peft.ModuleRule("params/down", "down_proj", kind="parameter"),))
    with pytest.raises(ValueError, match=r"names `<module>.<parameter>`; found 'down_proj'"):
        bare.modules_for("params/down", (4, 6, 16), EXPERTS)
    other = lj.peft.ModuleMap(
        (lj.peft.ModuleRule("params/down", "e.down", kind="parameter", parameter_order=("up",)),)
    )
    with pytest.raises(
        ValueError, match=r"parameter 'down' .* not in the rule's `parameter_order`"
    ):
        other.modules_for("params/down", (4, 6, 16), EXPERTS)


def test_rule_guards():
    with pytest.raises(ValueError, match=r"names one nn\.Parameter"):
        lj.peft.ModuleRule("w", ("e.a", "e.b"), kind="parameter")
    with pytest.raises(ValueError, match="are for kind 'parameter'"):
        lj.peft.ModuleRule("w", "fc", swap_factors=True)
    with pytest.raises(ValueError, match="are for kind 'parameter'"):
        lj.peft.ModuleRule("w", "fc", parameter_order=("a",))
    with pytest.raises(ValueError, match="`parameter_order` must be distinct parameter names"):
        lj.peft.ModuleRule("w", "e.a", kind="parameter", parameter_order=("a", "a"))
    with pytest.raises(ValueError, match="`kind` must be one of"):
        lj.peft.ModuleRule("w", "e.a", kind="param")


def test_import_guards(qwen, tmp_path):
    config, state, layers, _ = qwen
    hf = peft.LoraConfig(r=2, target_modules=[], target_parameters=["mlp.experts.down_proj"])
    peft.get_peft_model(_hf(config, state), hf).save_pretrained(tmp_path)
    layouts = _layouts(layers, EXPERTS)
    lora = lj.peft.import_adapter(tmp_path, layers, module_map=qwen_map(False), layouts=layouts)
    assert sorted(_flat(lora)) == ["params/layers_0/down", "params/layers_1/down"]
    # a map of one Linear per expert (transformers 4's Mixtral): the keys name no module
    linear = lj.peft.ModuleMap(
        (lj.peft.ModuleRule(r"params/layers_(\d+)/(\w+)", r"model.layers.\1.mlp.experts.{0}.\2"),)
    )
    with pytest.raises(ValueError, match=r"naming no module(.|\n)*layers\.0\.mlp\.experts\.lora_A"):
        lj.peft.import_adapter(tmp_path, layers, module_map=linear, layouts=layouts)
    path = tmp_path / "adapter_config.json"
    record = json.loads(path.read_text())
    path.write_text(json.dumps({**record, "lora_dropout": 0.1}))
    with pytest.raises(
        ValueError, match=r"target_parameters with lora_dropout=0.1; PEFT's ParamWrapper"
    ):
        lj.peft.import_adapter(tmp_path, layers, module_map=qwen_map(False), layouts=layouts)
    path.write_text(json.dumps({**record, "target_parameters": "down_proj"}))
    with pytest.raises(ValueError, match="target_parameters must be a list"):
        lj.peft.import_adapter(tmp_path, layers, module_map=qwen_map(False), layouts=layouts)
    # targeting both parameters nests the keys: a map must give the order
    hf = peft.LoraConfig(r=2, target_modules=[], target_parameters=list(ORDER))
    peft.get_peft_model(_hf(config, state), hf).save_pretrained(tmp_path / "both")
    unordered = lj.peft.ModuleMap(
        tuple(dataclasses.replace(r, parameter_order=None) for r in qwen_map(False).rules)
    )
    with pytest.raises(ValueError, match="parameter_order"):
        lj.peft.import_adapter(tmp_path / "both", layers, module_map=unordered, layouts=layouts)
