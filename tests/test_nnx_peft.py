"""PEFT interop for Flax NNX, proven against PEFT itself: the adapters of an NNX model
(embedding, fused q/k/v Linear, multi-axis LinearGeneral) export to a folder that
`peft.PeftModel` loads on PyTorch-CPU with the same outputs, and PEFT's adapters import
onto the NNX model (stateful `add_lora` and pure `lora_apply`) with the same outputs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import lora_jax as lj

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

torch.set_num_threads(1)
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

TOL = 1e-4
IDS = np.random.default_rng(0).integers(0, 20, (3, 7))
MAP = lj.peft.ModuleMap(
    (
        lj.peft.ModuleRule("emb/embedding", "emb"),
        lj.peft.ModuleRule("qkv/kernel", ("q", "k", "v"), sizes=(16, 8, 8)),
        lj.peft.ModuleRule(r"(heads|out)/kernel", r"\1"),
    )
)


class NnxNet(nnx.Module):
    """An embedding, a fused q/k/v Linear (GQA widths) and a heads-shaped LinearGeneral pair."""

    def __init__(self, *, rngs: nnx.Rngs):
        self.emb = nnx.Embed(20, 16, rngs=rngs)
        self.qkv = nnx.Linear(16, 32, rngs=rngs)
        self.heads = nnx.LinearGeneral(16, (2, 8), rngs=rngs)
        self.out = nnx.LinearGeneral((2, 8), 16, axis=(-2, -1), rngs=rngs)

    def __call__(self, ids):
        x = self.emb(ids)
        return jnp.concatenate([self.qkv(x), self.out(self.heads(x))], axis=-1)


class TorchNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(20, 16)
        self.q, self.k, self.v = (torch.nn.Linear(16, n) for n in (16, 8, 8))
        self.heads, self.out = torch.nn.Linear(16, 16), torch.nn.Linear(16, 16)

    def forward(self, ids):
        x = self.emb(ids)
        return torch.cat([self.q(x), self.k(x), self.v(x), self.out(self.heads(x))], dim=-1)


def _fresh() -> NnxNet:
    """The same base weights every call (deterministic rngs)."""
    return NnxNet(rngs=nnx.Rngs(params=jax.random.key(1), default=0))


@pytest.fixture(scope="module")
def nets():
    """The NNX base's outputs and its PyTorch twin, holding the same weights."""
    model = _fresh()
    p = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    kernel, bias = p["qkv"]["kernel"], p["qkv"]["bias"]
    weights = {
        "emb": p["emb"]["embedding"],
        "q": kernel[:, :16].T,
        "k": kernel[:, 16:24].T,
        "v": kernel[:, 24:].T,
        "heads": p["heads"]["kernel"].reshape(16, 16).T,
        "out": p["out"]["kernel"].reshape(16, 16).T,
    }
    biases = {"q": bias[:16], "k": bias[16:24], "v": bias[24:]}
    biases |= {"heads": p["heads"]["bias"].reshape(16), "out": p["out"]["bias"]}
    torch_model = TorchNet()
    with torch.no_grad():
        for name, w in weights.items():
            getattr(torch_model, name).weight.copy_(torch.from_numpy(np.ascontiguousarray(w)))
        for name, b in biases.items():
            getattr(torch_model, name).bias.copy_(torch.from_numpy(np.ascontiguousarray(b)))
    base = np.asarray(model(jnp.asarray(IDS)))
    np.testing.assert_allclose(_run_torch(torch_model), base, atol=1e-5)
    return base, torch_model


def _copy(torch_model) -> TorchNet:
    fresh = TorchNet()
    fresh.load_state_dict(torch_model.state_dict())
    return fresh.eval()


def _run_torch(torch_model) -> np.ndarray:
    with torch.no_grad():
        return torch_model.eval()(torch.from_numpy(IDS)).numpy()


def _assert_same(name: str, ours, theirs, base) -> None:
    """Within TOL of PEFT's outputs, and visibly far from the base's (adapters were live)."""
    ours, theirs = np.asarray(ours), np.asarray(theirs)
    diff, moved = float(np.abs(ours - theirs).max()), float(np.abs(ours - base).max())
    print(f"\n{name}: max |out diff| = {diff:.2e} (adapter moves them by {moved:.2f})")
    assert diff <= TOL, f"{name}: max abs difference {diff} > {TOL}"
    assert moved > 1e-2, f"{name}: the adapter changes nothing"


def _flat(lora) -> dict:
    is_w = lambda x: isinstance(x, lj.LoraWeights)
    leaves = jax.tree_util.tree_flatten_with_path(lora, is_leaf=is_w)[0]
    return {"/".join(str(k.key) for k in kp): w for kp, w in leaves}


def _perturbed(lora, seed: int):
    """Random non-zero a and b (so every adapter visibly changes the outputs)."""
    leaves, treedef = jax.tree_util.tree_flatten(lora)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    new = [0.2 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys, strict=True)]
    return jax.tree_util.tree_unflatten(treedef, new)


def test_nnx_export_loads_in_peft_with_same_outputs(nets, tmp_path):
    base, torch_model = nets
    model = _fresh()
    layouts = lj.infer_layouts(model)
    config = lj.LoraConfig(rank=3, alpha=6, targets=[".*/kernel", "emb/embedding"])
    lj.nnx.add_lora(model, config, key=jax.random.key(2))
    perturbed = _perturbed(lj.nnx.lora_state(model)[1], 3)
    lj.nnx.add_lora(lj.nnx.remove_lora(model), lora=perturbed)
    frozen, lora = lj.nnx.lora_state(model)
    assert set(_flat(lora)) == {"emb/embedding", "qkv/kernel", "heads/kernel", "out/kernel"}
    lj.peft.export_adapter(tmp_path, lora, module_map=MAP, task_type=None)
    wrapped = peft.PeftModel.from_pretrained(_copy(torch_model), tmp_path)
    _assert_same("nnx export", model(jnp.asarray(IDS)), _run_torch(wrapped), base)
    back = lj.peft.import_adapter(tmp_path, frozen, module_map=MAP, layouts=layouts)
    assert set(_flat(back)) == set(_flat(lora))
    for path, w in _flat(lora).items():
        got = _flat(back)[path]
        assert got.scale == w.scale == 2.0
        np.testing.assert_array_equal(np.asarray(got.a), np.asarray(w.a))
        np.testing.assert_array_equal(np.asarray(got.b), np.asarray(w.b))
        assert got.layout == w.layout == layouts[path]


def test_nnx_import_from_peft_with_same_outputs(nets, tmp_path):
    base, torch_model = nets
    hf = peft.LoraConfig(
        r=2, lora_alpha=4, target_modules=["emb", "heads", "out"], init_lora_weights=False
    )
    torch.manual_seed(0)
    theirs = peft.get_peft_model(_copy(torch_model), hf)
    # PEFT's init_lora_weights=False draws both embedding factors from randn (A is not 0)
    for name, t in theirs.state_dict().items():
        if "lora_" in name:
            assert t.abs().max() > 1e-2, f"{name} is zero: the check would be vacuous"
    theirs.save_pretrained(tmp_path)
    expected = _run_torch(peft.PeftModel.from_pretrained(_copy(torch_model), tmp_path))
    model = _fresh()
    frozen = nnx.state(model, nnx.Param)
    layouts = lj.infer_layouts(model)
    lora = lj.peft.import_adapter(tmp_path, frozen, module_map=MAP, layouts=layouts)
    flat = _flat(lora)
    assert all(w.scale == 2.0 for w in flat.values())
    assert set(flat) == {"emb/embedding", "heads/kernel", "out/kernel"}
    assert flat["heads/kernel"].b.shape == (2, 2, 8) and flat["out/kernel"].a.shape == (2, 8, 2)
    for path, w in flat.items():  # each part moves the outputs on its own
        assert w.layout == layouts[path]
        alone = {k: v if k == path else v.replace(b=0 * v.b) for k, v in flat.items()}
        alone = {k.split("/")[0]: {k.split("/")[1]: v} for k, v in alone.items()}
        graphdef, state = nnx.split(_fresh())
        out = lj.lora_apply(graphdef)(state, alone, jnp.asarray(IDS))
        moved = float(np.abs(np.asarray(out) - base).max())
        print(f"\nnnx import, {path} alone moves the outputs by {moved:.2f}")
        assert moved > 1e-2, f"{path} changes nothing"
    graphdef, state = nnx.split(model)
    pure = lj.lora_apply(graphdef)(state, lora, jnp.asarray(IDS))
    _assert_same("nnx import, pure", pure, expected, base)
    lj.nnx.add_lora(model, lora=lora)
    _assert_same("nnx import, add_lora", model(jnp.asarray(IDS)), expected, base)
