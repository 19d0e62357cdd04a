"""Stacked projections (`LoraConfig.slices`): one adapter per slice of a kernel that holds
several projections along an axis of its own (k and v; gate and up), checked against dense
NumPy references, the merged weights and every tool downstream of `split`."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import as_f64, perturb

import lora_jax as lj

D, H, K, F = 6, 3, 4, 5


class KV(nn.Module):
    """k and v in one kernel (2, d, heads, head_dim): the slice axis leads."""

    @nn.compact
    def __call__(self, x):
        kv = self.param("kv", nn.initializers.normal(0.3), (2, D, H, K))
        k, v = jnp.einsum("bsd,cdhk->cbshk", x, kv)
        return jnp.tanh(k) * v


class GateUp(nn.Module):
    """gate and up in one kernel (d, 2, ffn): the slice axis is in the middle."""

    @nn.compact
    def __call__(self, x):
        w = self.param("gate_up", nn.initializers.normal(0.3), (D, 2, F))
        h = jnp.einsum("bsd,dcf->bscf", x, w)
        return jax.nn.silu(h[..., 0, :]) * h[..., 1, :]


# A raw parameter's module path is "params", so a key names the whole path (a regex)
# rather than a trailing module name ("kv" alone would match a `.../kv/kernel`).
CASES = {"kv": (KV(), "params/kv", 0), "gate_up": (GateUp(), "params/gate_up", 1)}
KEYS = {"kv": "params/kv", "gate_up": ".*/gate_up"}


def _setup(name, rank=2, **kw):
    model, path, axis = CASES[name]
    x = jax.random.normal(jax.random.key(0), (2, 3, D))
    variables = model.init(jax.random.key(1), x)
    layouts = lj.infer_layouts(model.apply, variables, x)
    kw.setdefault("slices", {KEYS[name]: axis})
    config = lj.LoraConfig(rank=rank, alpha=3.0, targets=path, **kw)
    frozen, lora = lj.split(variables, config, key=jax.random.key(2), layouts=layouts)
    return model, x, variables, frozen, perturb(lora, jax.random.key(3)), layouts


def _weights(lora):
    (w,) = jax.tree.leaves(lora, is_leaf=lambda t: isinstance(t, lj.LoraWeights))
    return w


def _dense_reference(name, kernel, w):
    """The merged kernel in float64: slice c gets ``s * a[c] @ b[c]``, the rest unchanged."""
    kernel, a, b = as_f64(kernel), as_f64(w.a), as_f64(w.b)
    out = kernel.copy()
    for c in range(2):
        d = w.scale * a[c] @ b[c].reshape(b.shape[1], -1)
        if name == "kv":
            out[c] += d.reshape(D, H, K)
        else:
            out[:, c, :] += d
    return out


@pytest.mark.parametrize(
    ("slices", "error", "message"),
    [
        ({"(kv": 0}, ValueError, r"`slices` key '\(kv' is not a valid regex"),
        ({"kv": True}, ValueError, r"`slices\['kv'\]` must be an int axis; found True"),
        ({"kv": 1.0}, ValueError, r"`slices\['kv'\]` must be an int axis; found 1.0"),
        ("kv", TypeError, r"`slices` must be a mapping \{regex: value\}; found 'kv'"),
        ([("kv", 0, 1)], TypeError, r"`slices` must be a mapping"),
    ],
)
def test_config_validation(slices, error, message):
    with pytest.raises(error, match=message):
        lj.LoraConfig(targets=".*", slices=slices)


def test_config_is_frozen_and_axis_lookup():
    config = lj.LoraConfig(targets=".*", slices={"attn/kv": 0, "mlp/.*": -2, "kv": 3})
    assert config.slices == (("attn/kv", 0), ("mlp/.*", -2), ("kv", 3))
    assert hash(config) == hash(lj.LoraConfig(targets=".*", slices=list(config.slices)))
    assert config.slice_axis_for("params/layer_0/attn/kv/kernel", 4) == 0  # first key wins
    assert config.slice_axis_for("params/mlp/gate_up/kernel", 3) == 1  # -2 of 3 axes
    assert config.slice_axis_for("params/attn/query/kernel", 3) is None
    with pytest.raises(ValueError, match=r"params/x/kv/kernel: `slices\['kv'\]` is axis 3.*ndim=3"):
        lj.LoraConfig(targets=".*", slices={"kv": 3}).slice_axis_for("params/x/kv/kernel", 3)


def test_layout_sliced():
    kv = lj.Layout("einsum", in_axes=(1,), out_axes=(0, 2, 3))
    assert kv.sliced(2) == lj.Layout("einsum", (1,), (0, 3), (2,))
    both = kv.sliced(2).sliced(0)
    assert both == lj.Layout("einsum", (1,), (3,), (0, 2))
    with pytest.raises(ValueError, match=r"axis 2 is already a stack axis of Layout.*one adapter"):
        both.sliced(2)
    with pytest.raises(ValueError, match=r"axis 1 is the only input axis of Layout.*contract"):
        kv.sliced(1)
    with pytest.raises(ValueError, match=r"axis 3 is the only output axis of Layout.*produce"):
        both.sliced(3)
    with pytest.raises(ValueError, match=r"axis 4 is out of range for Layout.*ndim=4"):
        kv.sliced(4)


@pytest.mark.parametrize(
    ("name", "a_shape", "b_shape", "layout"),
    [
        ("kv", (2, D, 2), (2, 2, H, K), lj.Layout("einsum", (1,), (2, 3), (0,))),
        ("gate_up", (2, D, 2), (2, 2, F), lj.Layout("einsum", (0,), (2,), (1,))),
    ],
)
def test_split_gives_one_adapter_per_slice(name, a_shape, b_shape, layout):
    *_, lora, layouts = _setup(name)
    _, path, axis = CASES[name]
    assert axis in layouts[path].out_axes  # one adapter for the whole kernel, without slices
    w = _weights(lora)
    assert (w.a.shape, w.b.shape, w.layout) == (a_shape, b_shape, layout)
    assert w.scale == 1.5


@pytest.mark.parametrize("name", list(CASES))
def test_merge_and_unmerge_against_dense_reference(name):
    _, _, variables, frozen, lora, _ = _setup(name)
    _, path, _ = CASES[name]
    leaf = path.split("/")[1]
    kernel = variables["params"][leaf]
    merged = lj.merge(frozen, lora)["params"][leaf]
    want = _dense_reference(name, kernel, _weights(lora))
    np.testing.assert_allclose(as_f64(merged), want, rtol=1e-5, atol=1e-6)
    assert not np.allclose(as_f64(merged), as_f64(kernel), atol=1e-3)
    back = lj.unmerge(lj.merge(frozen, lora), lora)["params"][leaf]
    np.testing.assert_allclose(as_f64(back), as_f64(kernel), atol=1e-6)


@pytest.mark.parametrize("name", list(CASES))
def test_save_load_summary_pad_rank_and_optax(name, tmp_path):
    _, _, _, frozen, lora, _ = _setup(name)
    w = _weights(lora)
    lj.save_adapter(tmp_path / "adapter", lora)
    loaded = _weights(lj.load_adapter(tmp_path / "adapter", frozen=frozen))
    assert (loaded.layout, loaded.scale) == (w.layout, w.scale)
    np.testing.assert_array_equal(loaded.a, w.a)
    np.testing.assert_array_equal(loaded.b, w.b)

    kernel = jax.tree.leaves(frozen)[0].shape
    (row,) = lj.summary(frozen, lora).rows
    assert row[1:5] == (kernel, w.a.shape, w.b.shape, 2)
    assert lj.summary(lora).rows[0][1] == kernel  # kernel shape from the layout alone
    assert lj.summary(frozen, lora).trainable == w.a.size + w.b.size

    padded = lj.multi.pad_rank(lora, 4)
    assert _weights(padded).a.shape == (*w.a.shape[:-1], 4)
    np.testing.assert_allclose(
        as_f64(jax.tree.leaves(lj.merge(frozen, padded))[0]),
        as_f64(jax.tree.leaves(lj.merge(frozen, lora))[0]),
        atol=1e-6,
    )

    tx = lj.optim.adapters_only(optax.adam(1e-3))
    state = tx.init({"frozen": frozen, "lora": lora})
    assert sum(x.size for x in jax.tree.leaves(state)) == 2 * (w.a.size + w.b.size) + 1


def test_pissa_with_slices_keeps_the_kernel():
    kernel = jax.random.normal(jax.random.key(0), (D, 2, F))
    config = lj.LoraConfig(rank=2, targets=".*", slices={".*/gate_up": 1}, init="pissa")
    layouts = {"params/gate_up": lj.Layout("einsum", (0,), (1, 2))}
    frozen, lora = lj.split(
        {"params": {"gate_up": kernel}}, config, key=jax.random.key(1), layouts=layouts
    )
    merged = lj.merge(frozen, lora)["params"]["gate_up"]
    np.testing.assert_allclose(as_f64(merged), as_f64(kernel), atol=1e-5)
    residual = as_f64(frozen["params"]["gate_up"])
    for c in range(2):  # the top 2 singular directions of each slice went to the adapter
        assert np.linalg.matrix_rank(residual[:, c, :], tol=1e-4) == min(D, F) - 2


def test_rank_is_per_slice():
    _setup("gate_up", rank=6, slices={})  # one adapter for (6, 2·5): rank 6 fits
    with pytest.raises(ValueError, match=r"params/gate_up: rank 6 .* at most rank 5"):
        _setup("gate_up", rank=6)


def test_split_errors_name_path_axis_and_layout():
    with pytest.raises(ValueError, match=r"`slices` key 'nope' matches none of the 1 targets"):
        _setup("kv", slices={"nope": 0})
    with pytest.raises(
        ValueError, match=r"params/kv: `slices` gives axis 1 is the only input axis of Layout"
    ):
        _setup("kv", slices={".*kv": 1})
    with pytest.raises(ValueError, match=r"params/kv: `slices\['.\*kv'\]` is axis -5.*ndim=4"):
        _setup("kv", slices={".*kv": -5})
    with pytest.raises(ValueError, match=r"params/w: `slices` gives axis 0 is the only input"):
        lj.split(
            {"params": {"w": jnp.ones((4, 3))}},
            lj.LoraConfig(targets=".*", slices={"params/w": 0}),
            key=jax.random.key(0),
        )


@pytest.mark.parametrize("name", list(CASES))
def test_lora_apply_and_grads_equal_the_merged_path(name):
    model, x, _, frozen, lora, _ = _setup(name)
    got = lj.lora_apply(model.apply)(frozen, lora, x)
    want = model.apply(lj.merge(frozen, lora), x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)

    factored = lambda lo: jnp.sum(lj.lora_apply(model.apply)(frozen, lo, x) ** 2)
    merged = lambda lo: jnp.sum(model.apply(lj.merge(frozen, lo), x) ** 2)
    g_f, g_m = jax.grad(factored)(lora), jax.grad(merged)(lora)
    for f, m in zip(jax.tree.leaves(g_f), jax.tree.leaves(g_m), strict=True):
        np.testing.assert_allclose(f, m, rtol=1e-4, atol=1e-5)


class StockLayers(nn.Module):
    """The same two kernels in Flax's stock layers (`nn.Einsum`, `nn.DenseGeneral`)."""

    @nn.compact
    def __call__(self, x):
        k, v = nn.Einsum((2, D, H, K), "bsd,cdhk->cbshk", use_bias=False, name="kv")(x)
        h = nn.DenseGeneral((2, F), name="gate_up")(x)
        attn = jnp.einsum("bshk,bshk->bs", jnp.tanh(k), v)[..., None]
        return attn + jax.nn.silu(h[..., 0, :]) * h[..., 1, :]


def test_stock_linen_layers_with_slices():
    model = StockLayers()
    x = jax.random.normal(jax.random.key(0), (2, 3, D))
    variables = model.init(jax.random.key(1), x)
    layouts = lj.infer_layouts(model.apply, variables, x)
    config = lj.LoraConfig(rank=2, targets=".*/kernel", slices={"kv": 0, "gate_up": 1})
    frozen, lora = lj.split(variables, config, key=jax.random.key(2), layouts=layouts)
    lora = perturb(lora, jax.random.key(3))
    routes = lj.routes(model.apply, frozen, lora, x)
    assert routes == {p: "factored (dot_general)" for p in routes}, routes
    got = lj.lora_apply(model.apply)(frozen, lora, x)
    np.testing.assert_allclose(got, model.apply(lj.merge(frozen, lora), x), rtol=1e-5, atol=1e-5)
