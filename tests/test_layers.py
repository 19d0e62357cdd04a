"""Each layer kind, factored, against a float64 NumPy reference of W x + s·B(A x)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import as_f64, perturb

import lora_jax as lj

RTOL, ATOL = 1e-5, 1e-5


def _setup(model, x, targets, rank=2, alpha=3.0, **kw):
    variables = model.init(jax.random.key(0), x, **kw)
    layouts = lj.infer_layouts(model.apply, variables, x, **kw)
    config = lj.LoraConfig(rank=rank, alpha=alpha, targets=targets)
    frozen, lora = lj.split(variables, config, key=jax.random.key(1), layouts=layouts)
    lora = perturb(lora, jax.random.key(2), 0.3)
    apply = lj.lora_apply(model.apply)
    return config, frozen, lora, apply


def _ab(lora, *path):
    node = lora["params"]
    for name in path:
        node = node[name]
    return as_f64(node.a), as_f64(node.b)


def test_dense_matches_numpy():
    x = jax.random.normal(jax.random.key(9), (2, 5, 6))
    _, frozen, lora, apply = _setup(nn.Dense(4), x, ".*/kernel")
    w, bias = as_f64(frozen["params"]["kernel"]), as_f64(frozen["params"]["bias"])
    a, b = _ab(lora, "kernel")
    ref = as_f64(x) @ w + bias + 1.5 * (as_f64(x) @ a) @ b
    np.testing.assert_allclose(apply(frozen, lora, x), ref, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize(
    ("axis", "features", "eq"),
    [
        (-1, (3, 4), "btd,dhk->bthk"),
        ((-2, -1), 5, "bthk,hko->bto"),
        ((1,), (2, 3), "btd,tho->bdho"),
    ],
)
def test_dense_general_matches_numpy(axis, features, eq):
    shape = (2, 3, 4) if eq.startswith("bthk") else (2, 3, 6)
    x = jax.random.normal(jax.random.key(9), shape if eq != "bthk,hko->bto" else (2, 3, 2, 4))
    model = nn.DenseGeneral(features, axis=axis, use_bias=False)
    _, frozen, lora, apply = _setup(model, x, ".*/kernel")
    w = as_f64(frozen["params"]["kernel"])
    a, b = _ab(lora, "kernel")
    dw = 1.5 * np.tensordot(a, b, axes=1)
    ref = np.einsum(eq, as_f64(x), w + dw)
    np.testing.assert_allclose(apply(frozen, lora, x), ref, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize(
    ("eq", "shape", "x_shape"),
    [
        ("btd,dhk->bthk", (6, 2, 3), (2, 4, 6)),
        ("bd,hd->bh", (5, 6), (3, 6)),  # kernel axes in (out, in) order
        ("bthk,hkd->btd", (2, 3, 4), (2, 5, 2, 3)),
    ],
)
def test_einsum_matches_numpy(eq, shape, x_shape):
    x = jax.random.normal(jax.random.key(9), x_shape)
    model = nn.Einsum(shape, eq, use_bias=False)
    _, frozen, lora, apply = _setup(model, x, ".*/kernel")
    layout = lora["params"]["kernel"].layout
    a, b = _ab(lora, "kernel")
    dw = np.transpose(1.5 * np.tensordot(a, b, axes=1), np.argsort(layout.perm))
    ref = np.einsum(eq, as_f64(x), as_f64(frozen["params"]["kernel"]) + dw)
    np.testing.assert_allclose(apply(frozen, lora, x), ref, rtol=RTOL, atol=ATOL)


class _Tied(nn.Module):
    @nn.compact
    def __call__(self, ids):
        embed = nn.Embed(11, 6)
        return embed.attend(jnp.tanh(embed(ids)))


def test_embed_lookup_and_attend_match_numpy():
    ids = jnp.array([[1, 4, 10], [0, 2, 2]])
    _, frozen, lora, apply = _setup(_Tied(), ids, ".*/embedding")
    table = as_f64(frozen["params"]["Embed_0"]["embedding"])
    a, b = _ab(lora, "Embed_0", "embedding")
    merged = table + 1.5 * a @ b
    ref = np.tanh(merged[np.asarray(ids)]) @ merged.T
    np.testing.assert_allclose(apply(frozen, lora, ids), ref, rtol=RTOL, atol=ATOL)


def test_conv_matches_numpy():
    x = jax.random.normal(jax.random.key(9), (2, 7, 4))
    _, frozen, lora, apply = _setup(nn.Conv(5, (3,), use_bias=False), x, ".*/kernel")
    a, b = _ab(lora, "kernel")
    k = as_f64(frozen["params"]["kernel"]) + 1.5 * np.tensordot(a, b, axes=1)  # (3, 4, 5)
    xp = np.pad(as_f64(x), ((0, 0), (1, 1), (0, 0)))
    ref = sum(xp[:, i : i + 7] @ k[i] for i in range(3))
    np.testing.assert_allclose(apply(frozen, lora, x), ref, rtol=RTOL, atol=ATOL)


class _ScanBody(nn.Module):
    @nn.compact
    def __call__(self, c, _):
        return jnp.tanh(nn.Dense(6, name="fc")(c)), None


class _Stack(nn.Module):
    @nn.compact
    def __call__(self, x):
        scan = nn.scan(
            _ScanBody, variable_axes={"params": 0}, split_rngs={"params": True}, length=3
        )
        return scan(name="layers")(x, None)[0]


def test_scanned_layers_carry_stack_axis_and_match_numpy():
    x = jax.random.normal(jax.random.key(9), (4, 6))
    _, frozen, lora, apply = _setup(_Stack(), x, ".*/kernel")
    w = lora["params"]["layers"]["fc"]["kernel"]
    assert w.a.shape == (3, 6, 2) and w.b.shape == (3, 2, 6)
    kernel = frozen["params"]["layers"]["fc"]["kernel"]
    assert kernel.shape == (3, 6, 6)  # one base, never copied per adapter
    a, b = _ab(lora, "layers", "fc", "kernel")
    h = as_f64(x)
    for i in range(3):
        ki = as_f64(kernel[i]) + 1.5 * a[i] @ b[i]
        h = np.tanh(h @ ki + as_f64(frozen["params"]["layers"]["fc"]["bias"][i]))
    np.testing.assert_allclose(apply(frozen, lora, x), h, rtol=RTOL, atol=ATOL)


def test_every_kind_is_factored_in_tiny(tiny, tiny_lora):
    model, _, ids, _ = tiny
    _, frozen, lora = tiny_lora
    routes = lj.routes(model.apply, frozen, lora, ids)
    assert routes["params/gate"] == "factored (dot_general)"  # a raw param: the rewrite
    kinds = {r for p, r in routes.items() if p != "params/gate"}
    assert kinds == {
        "factored (DenseGeneral)",
        "factored (Dense)",
        "factored (Einsum)",
        "factored (Conv)",
        "factored (Embed)",
    }
