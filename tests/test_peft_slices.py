"""Stacked projections and PEFT: a k/v kernel ``(2, d, heads, head_dim)`` (or with the k/v
axis elsewhere) against a PyTorch module with separate ``k_proj`` / ``v_proj`` Linears.

One adapter per slice (the k/v axis a stack axis) exports as two PEFT modules, each with
its own A and B (`ModuleRule` ``names``); one adapter for the whole kernel (the axis an
output axis) as a fused pair sharing A. Both load in real `peft.PeftModel` with the
outputs of our merged kernel (a NumPy reference), and import back unchanged."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import perturb

import lora_jax as lj

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
st = pytest.importorskip("safetensors.numpy")

torch.set_num_threads(1)
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

D, HEADS, HEAD_DIM = 12, 3, 4
TOL = 3e-6
# the k/v axis first, or between d and the heads (stack axes need not lead)
KERNELS = {
    "leading": ((2, D, HEADS, HEAD_DIM), "sd,cdhk->cshk", 0),
    "middle": ((D, 2, HEADS, HEAD_DIM), "sd,dchk->cshk", 1),
}
NAMES = ("k_proj", "v_proj")


def _per_slice(case: str) -> lj.Layout:
    """One adapter per k/v slice: the k/v axis is a stack axis."""
    c = KERNELS[case][2]
    d, heads, head_dim = (1, 2, 3) if c == 0 else (0, 2, 3)
    return lj.Layout("einsum", (d,), (heads, head_dim), stack_axes=(c,))


def _whole(case: str) -> lj.Layout:
    """One adapter for the kernel: the k/v axis is an output axis (slowest-varying)."""
    c = KERNELS[case][2]
    return lj.Layout("einsum", (1 - c,), (c, 2, 3))


class TorchKV(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.k_proj = torch.nn.Linear(D, HEADS * HEAD_DIM, bias=False)
        self.v_proj = torch.nn.Linear(D, HEADS * HEAD_DIM, bias=False)

    def forward(self, x):
        return torch.stack([self.k_proj(x), self.v_proj(x)]).reshape(2, -1, HEADS, HEAD_DIM)


def _torch_model(kernel: np.ndarray, case: str) -> TorchKV:
    """The PyTorch module whose k_proj / v_proj weights are the kernel's slices."""
    c = KERNELS[case][2]
    model = TorchKV().eval()
    with torch.no_grad():
        for i, name in enumerate(NAMES):
            w = np.take(kernel, i, axis=c).reshape(D, HEADS * HEAD_DIM).T
            getattr(model, name).weight.copy_(torch.from_numpy(np.ascontiguousarray(w)))
    return model


X = np.random.default_rng(0).standard_normal((5, D)).astype(np.float32)


def _ours(case: str, kernel) -> np.ndarray:
    """Our k/v output: the einsum of the kernel, in NumPy float64."""
    return np.einsum(KERNELS[case][1], X.astype(np.float64), np.asarray(kernel, np.float64))


def _peft_out(case: str, kernel: np.ndarray, folder) -> np.ndarray:
    model = peft.PeftModel.from_pretrained(_torch_model(kernel, case), folder).eval()
    with torch.no_grad():
        return model(torch.from_numpy(X)).numpy()


@pytest.fixture(params=sorted(KERNELS))
def case(request):
    shape = KERNELS[request.param][0]
    kernel = np.random.default_rng(1).standard_normal(shape).astype(np.float32) * 0.3
    np.testing.assert_allclose(  # the PyTorch module is the kernel
        _torch_model(kernel, request.param)(torch.from_numpy(X)).detach().numpy(),
        _ours(request.param, kernel),
        atol=TOL,
    )
    return request.param, {"params": {"attn": {"kv": jnp.asarray(kernel)}}}


def _lora(variables, layout: lj.Layout, seed: int):
    config = lj.LoraConfig(rank=2, alpha=3.0, targets="params/attn/kv")
    layouts = {"params/attn/kv": layout}
    frozen, lora = lj.split(variables, config, key=jax.random.key(seed), layouts=layouts)
    return frozen, perturb(lora, jax.random.key(seed + 1), scale=0.3)


SLICE_MAP = lj.peft.ModuleMap((lj.peft.ModuleRule("params/attn/kv", "{0}", names={0: NAMES}),))
FUSED_MAP = lj.peft.ModuleMap((lj.peft.ModuleRule("params/attn/kv", NAMES),))


def _assert_same(ours, theirs, base):
    diff = float(np.abs(ours - theirs).max())
    moved = np.abs(ours - base).max()
    print(f"\nmax |ours - PEFT| = {diff:.2e} (the adapter moves outputs by {moved:.2f})")
    assert diff <= TOL, f"max abs difference {diff} > {TOL}"
    assert np.abs(ours - base).max() > 1e-2, "the adapter changes nothing"


def _tensors(folder) -> dict[str, np.ndarray]:
    return st.load_file(str(folder / "adapter_model.safetensors"))


def test_per_slice_adapters_export_as_separate_modules(case, tmp_path):
    name, variables = case
    frozen, lora = _lora(variables, _per_slice(name), seed=2)
    w = lora["params"]["attn"]["kv"]
    assert w.a.shape == (2, D, 2) and w.b.shape == (2, 2, HEADS, HEAD_DIM)
    lj.peft.export_adapter(tmp_path, lora, module_map=SLICE_MAP, task_type=None)
    record = json.loads((tmp_path / "adapter_config.json").read_text())
    assert record["target_modules"] == list(NAMES)
    assert (record["r"], record["lora_alpha"]) == (2, 3)
    tensors = _tensors(tmp_path)
    a_k, a_v = (tensors[f"base_model.model.{m}.lora_A.weight"] for m in NAMES)
    np.testing.assert_array_equal(a_k, np.asarray(w.a[0]).T)  # each slice its own A
    np.testing.assert_array_equal(a_v, np.asarray(w.a[1]).T)
    assert tensors["base_model.model.v_proj.lora_B.weight"].shape == (HEADS * HEAD_DIM, 2)
    merged = lj.merge(frozen, lora)["params"]["attn"]["kv"]
    theirs = _peft_out(name, np.asarray(frozen["params"]["attn"]["kv"]), tmp_path)
    _assert_same(_ours(name, merged), theirs, _ours(name, frozen["params"]["attn"]["kv"]))
    layouts = {"params/attn/kv": _per_slice(name)}
    back = lj.peft.import_adapter(tmp_path, frozen, module_map=SLICE_MAP, layouts=layouts)
    got = back["params"]["attn"]["kv"]
    assert (got.layout, got.scale, got.rank) == (w.layout, w.scale, w.rank) == (w.layout, 1.5, 2)
    np.testing.assert_array_equal(np.asarray(got.a), np.asarray(w.a))
    np.testing.assert_array_equal(np.asarray(got.b), np.asarray(w.b))


def test_whole_kernel_adapter_exports_as_fused_modules(case, tmp_path):
    name, variables = case
    frozen, lora = _lora(variables, _whole(name), seed=4)
    w = lora["params"]["attn"]["kv"]
    assert w.a.shape == (D, 2) and w.b.shape == (2, 2, HEADS, HEAD_DIM)
    lj.peft.export_adapter(tmp_path, lora, module_map=FUSED_MAP, task_type=None)
    tensors = _tensors(tmp_path)
    a_k, a_v = (tensors[f"base_model.model.{m}.lora_A.weight"] for m in NAMES)
    np.testing.assert_array_equal(a_k, a_v)  # one A for the kernel, its slice of B each
    b_v = tensors["base_model.model.v_proj.lora_B.weight"]
    np.testing.assert_array_equal(b_v, np.asarray(w.b[:, 1]).reshape(2, -1).T)
    merged = lj.merge(frozen, lora)["params"]["attn"]["kv"]
    theirs = _peft_out(name, np.asarray(frozen["params"]["attn"]["kv"]), tmp_path)
    _assert_same(_ours(name, merged), theirs, _ours(name, frozen["params"]["attn"]["kv"]))
    layouts = {"params/attn/kv": _whole(name)}
    back = lj.peft.import_adapter(tmp_path, frozen, module_map=FUSED_MAP, layouts=layouts)
    got = back["params"]["attn"]["kv"]
    assert (got.layout, got.scale) == (w.layout, w.scale)
    np.testing.assert_array_equal(np.asarray(got.a), np.asarray(w.a))
    np.testing.assert_array_equal(np.asarray(got.b), np.asarray(w.b))


def test_peft_k_and_v_adapters_import_per_slice(case, tmp_path):
    """Adapters PEFT trains on separate k_proj / v_proj (different A's) are per-slice
    adapters here; only the fused map refuses them."""
    name, variables = case
    kernel = np.asarray(variables["params"]["attn"]["kv"])
    hf = peft.LoraConfig(r=3, lora_alpha=6, target_modules=list(NAMES), init_lora_weights=False)
    peft.get_peft_model(_torch_model(kernel, name), hf).save_pretrained(tmp_path)
    layouts = {"params/attn/kv": _per_slice(name)}
    lora = lj.peft.import_adapter(tmp_path, variables, module_map=SLICE_MAP, layouts=layouts)
    w = lora["params"]["attn"]["kv"]
    assert (w.rank, w.scale, w.layout) == (3, 2.0, _per_slice(name))
    merged = lj.merge(variables, lora)["params"]["attn"]["kv"]
    _assert_same(_ours(name, merged), _peft_out(name, kernel, tmp_path), _ours(name, kernel))
    whole = {"params/attn/kv": _whole(name)}
    with pytest.raises(ValueError, match="must share one A"):
        lj.peft.import_adapter(tmp_path, variables, module_map=FUSED_MAP, layouts=whole)
    # only k_proj adapted: the v slice comes back with zero factors
    hf = peft.LoraConfig(r=3, lora_alpha=6, target_modules=["k_proj"], init_lora_weights=False)
    peft.get_peft_model(_torch_model(kernel, name), hf).save_pretrained(tmp_path / "k")
    lora = lj.peft.import_adapter(tmp_path / "k", variables, module_map=SLICE_MAP, layouts=layouts)
    w = lora["params"]["attn"]["kv"]
    assert not np.any(np.asarray(w.a[1])) and np.any(np.asarray(w.a[0]))
    merged = lj.merge(variables, lora)["params"]["attn"]["kv"]
    _assert_same(_ours(name, merged), _peft_out(name, kernel, tmp_path / "k"), _ours(name, kernel))


def test_names_with_scanned_layers():
    rule = lj.peft.ModuleRule(
        "params/layers/attn/kv", "model.layers.{0}.self_attn.{1}", names={1: NAMES}
    )
    layout = lj.Layout("einsum", (2,), (3, 4), stack_axes=(0, 1))  # (layers, 2, d, h, k)
    assert lj.peft.ModuleMap((rule,)).modules_for(
        "params/layers/attn/kv", (2, 2, 8, 2, 4), layout
    ) == [
        "model.layers.0.self_attn.k_proj",
        "model.layers.0.self_attn.v_proj",
        "model.layers.1.self_attn.k_proj",
        "model.layers.1.self_attn.v_proj",
    ]


def test_names_errors():
    layout = lj.Layout("einsum", (1,), (2, 3), stack_axes=(0,))
    three = lj.peft.ModuleMap((lj.peft.ModuleRule("kv", "{0}", names={0: ("q", "k", "v")}),))
    with pytest.raises(
        ValueError,
        match=r"kv: ModuleRule `names\[0\]` has 3 names .* stack axis 0 "
        r"\(kernel axis 0\) has size 2",
    ):
        three.modules_for("kv", (2, 8, 2, 4), layout)
    beyond = lj.peft.ModuleMap((lj.peft.ModuleRule("kv", "{0}", names={1: NAMES}),))
    with pytest.raises(
        ValueError, match="kv: ModuleRule `names` has placeholder 1, but the kernel has 1"
    ):
        beyond.modules_for("kv", (2, 8, 2, 4), layout)
    for bad in ({0: "kv"}, {0: ("k", "k")}, {-1: NAMES}, {0: ()}, {0: ("k", "")}):
        with pytest.raises(ValueError, match="`names` must map placeholder numbers"):
            lj.peft.ModuleRule("kv", "{0}", names=bad)
    # the placeholder is still needed
    no_field = lj.peft.ModuleMap((lj.peft.ModuleRule("kv", "kv", names={0: NAMES}),))
    with pytest.raises(ValueError, match=r"needs exactly \['0'\]"):
        no_field.modules_for("kv", (2, 8, 2, 4), layout)
