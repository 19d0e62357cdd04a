"""LoftQ initialisation (`lj.quant.loftq`) and merging into a quantized base
(`lj.quant.merge`), checked against a float64 NumPy reference of the algorithm written
here (the quantizer itself is `lj.quant.quantize_kernel`, which test_quant.py checks code
by code); and residual inits refused on a quantized base (`lj.split`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from models import ScannedMlp

import lora_jax as lj
from lora_jax.quant import dequantize, quantize_kernel

RNG_SEED = 0


def low_rank_plus_noise(shape, seed=RNG_SEED, r0=8):
    """W = a rank-`r0` matrix (entries ~0.1) plus N(0, 0.02²) noise, per leading slice."""
    rng = np.random.default_rng(seed)
    *stack, m, n = shape
    lo = rng.normal(size=(*stack, m, r0)) @ rng.normal(size=(*stack, r0, n)) / np.sqrt(r0)
    return (0.1 * lo + rng.normal(0.0, 0.02, size=shape)).astype(np.float32)


def ref_loftq(w, fmt, *, rank, scale, iters, axis, group, double=False):
    """The LoftQ algorithm in float64 for a kernel ``(*stack, in, out)``: the quantized
    kernel of the last step and its dense update ``s·a@b``, SVD per stack slice."""
    w = np.asarray(w, np.float64)
    res = w
    for _ in range(iters):
        q = quantize_kernel(
            jnp.asarray(res, jnp.float32), fmt, axis=axis, group_size=group, double=double
        )
        resid = (w - np.asarray(dequantize(q), np.float64)).reshape(-1, *w.shape[-2:])
        updates = []
        for r in resid:
            u, sv, vt = np.linalg.svd(r, full_matrices=False)
            a = u[:, :rank] * np.sqrt(sv[:rank] / scale)
            b = np.sqrt(sv[:rank] / scale)[:, None] * vt[:rank]
            updates.append(scale * a @ b)
        update = np.stack(updates).reshape(w.shape)
        res = w - update
    return q, update


def update_of(weights):
    """``s·a@b`` of a `LoraWeights` whose layout is ``(*stack, in, out)`` in order."""
    a = np.asarray(weights.a, np.float64)
    b = np.asarray(weights.b, np.float64)
    return weights.scale * np.einsum("...ir,...ro->...io", a, b)


def frob(x):
    return float(np.linalg.norm(np.asarray(x, np.float64).ravel()))


def _loftq_one(w, fmt="nf4", *, rank, alpha=None, iters=1, group=32, **kw):
    config = lj.LoraConfig(rank=rank, alpha=alpha or float(rank), targets="w")
    frozen, lora = lj.quant.loftq(
        {"w": jnp.asarray(w)},
        config,
        fmt,
        key=jax.random.key(0),
        group_size=group,
        iters=iters,
        **kw,
    )
    return frozen["w"], lora["w"]


# ------------------------------------------------------------------------ the algorithm
@pytest.mark.parametrize(
    ("fmt", "rank", "iters", "double"),
    [("nf4", 4, 1, False), ("int4", 16, 1, True), ("int8", 8, 1, False), ("nf4", 8, 3, False)],
)
def test_matches_the_numpy_reference(fmt, rank, iters, double):
    w = low_rank_plus_noise((128, 96))
    q, weights = _loftq_one(w, fmt, rank=rank, alpha=3.0 * rank, iters=iters, double=double)
    ref_q, ref_update = ref_loftq(
        w, fmt, rank=rank, scale=3.0, iters=iters, axis=0, group=32, double=double
    )
    assert lj.quant.is_quantized(q) and q.format == fmt and q.double == double
    assert weights.a.shape == (128, rank) and weights.b.shape == (rank, 96)
    got = update_of(weights)
    np.testing.assert_allclose(got, ref_update, atol=2e-4 * np.abs(ref_update).max())
    codes, ref_codes = np.asarray(q.codes), np.asarray(ref_q.codes)
    if iters == 1:  # the same input to the quantizer: the same codes
        np.testing.assert_array_equal(codes, ref_codes)
    else:  # float32 against float64 residuals: a code may flip at a rounding boundary
        assert np.mean(codes != ref_codes) < 1e-3
    # the base is what the adapter was fitted against
    resid = w.astype(np.float64) - np.asarray(dequantize(q), np.float64)
    assert frob(resid - got) < frob(resid)


@pytest.mark.parametrize("fmt", ["nf4", "int4"])
@pytest.mark.parametrize("rank", [4, 16])
def test_reconstruction_beats_plain_quantization(fmt, rank):
    """||W - (deq(Q) + s·a@b)|| against plain QLoRA's ||W - deq(quantize(W))|| (B = 0 at
    init): LoftQ removes the top-r part of the quantization error (measured: 5% of the
    error at rank 4, 19% at rank 16); 5 alternating steps remove more than 1."""
    w = low_rank_plus_noise((256, 128))
    plain = frob(w - np.asarray(dequantize(quantize_kernel(w, fmt, axis=0, group_size=32))))
    found = {}
    for iters in (1, 5):
        q, weights = _loftq_one(w, fmt, rank=rank, alpha=16.0, iters=iters)
        found[iters] = frob(w - (np.asarray(dequantize(q), np.float64) + update_of(weights)))
    margin = {4: 0.97, 16: 0.85}[rank]
    assert found[1] < margin * plain, (found, plain)
    assert found[5] <= found[1], found


def test_the_scale_is_divided_out():
    """alpha != rank gives the same ``s·a@b`` (and base) as alpha == rank; the factors
    themselves are 1/sqrt(s) of those at scale 1 (PEFT's factors are right at s = 1 only)."""
    w = low_rank_plus_noise((96, 64))
    q1, one = _loftq_one(w, rank=8, alpha=8.0, iters=2)
    q4, four = _loftq_one(w, rank=8, alpha=32.0, iters=2)
    assert (one.scale, four.scale) == (1.0, 4.0)
    np.testing.assert_allclose(update_of(four), update_of(one), atol=1e-5)
    np.testing.assert_array_equal(np.asarray(q4.codes), np.asarray(q1.codes))
    np.testing.assert_allclose(np.abs(four.a) * 2.0, np.abs(one.a), rtol=1e-4, atol=1e-6)


def test_large_kernels_use_a_randomized_svd_close_to_the_exact_one():
    """Above 512 on the smaller side the SVD is randomized: its correction removes nearly
    as much error as the exact top-r SVD (float64 NumPy) does."""
    w = low_rank_plus_noise((1024, 640))
    q, weights = _loftq_one(w, rank=8, group=64)
    deq = np.asarray(dequantize(q), np.float64)
    resid = w - deq
    sv = np.linalg.svd(resid, compute_uv=False)
    best = float(np.sqrt(np.sum(sv[8:] ** 2)))
    found = frob(resid - update_of(weights))
    assert best <= found + 1e-6
    assert frob(resid) - found >= 0.8 * (frob(resid) - best), (frob(resid), found, best)
    q, weights = _loftq_one(np.zeros_like(w), rank=8, group=64)  # R = 0: no NaN, no update
    assert np.all(update_of(weights) == 0) and np.all(np.asarray(dequantize(q)) == 0)


def test_exact_svd_is_the_best_rank_r_correction():
    """``exact_svd=True`` above the threshold: the full SVD, so the correction is the best
    rank-r one (Eckart-Young, float64 NumPy), where the randomized one is only close."""
    w = low_rank_plus_noise((640, 560))
    q, weights = _loftq_one(w, rank=8, group=64, exact_svd=True)
    resid = w - np.asarray(dequantize(q), np.float64)
    best = float(np.sqrt(np.sum(np.linalg.svd(resid, compute_uv=False)[8:] ** 2)))
    assert abs(frob(resid - update_of(weights)) - best) <= 1e-4 * best


# ------------------------------------------------------------------------------ models
def test_an_mlp_at_init_is_closer_to_the_float_model(mlp):
    model, variables, x = mlp
    config = lj.LoraConfig(rank=2, alpha=4.0, targets=".*/kernel")
    frozen, lora = lj.quant.loftq(variables, config, key=jax.random.key(1), group_size=8)
    assert lj.quant.is_quantized(frozen["params"]["fc1"]["kernel"])
    assert frozen["params"]["fc1"]["bias"] is variables["params"]["fc1"]["bias"]
    plain_q = lj.quant.quantize(variables, group_size=8)
    plain_f, plain_lora = lj.split(plain_q, config, key=jax.random.key(1))
    apply = lj.lora_apply(model.apply)
    want = np.asarray(model.apply(variables, x), np.float64)
    err_loftq = frob(apply(frozen, lora, x) - want)
    err_plain = frob(apply(plain_f, plain_lora, x) - want)
    assert err_loftq < 0.8 * err_plain, (err_loftq, err_plain)


def test_only_adapted_kernels_are_quantized_and_quantize_does_the_rest(mlp):
    _, variables, _ = mlp
    config = lj.LoraConfig(rank=2, targets=".*/fc1/kernel")
    frozen, _ = lj.quant.loftq(variables, config, key=jax.random.key(1), group_size=8)
    assert lj.quant.is_quantized(frozen["params"]["fc1"]["kernel"])
    assert frozen["params"]["fc2"]["kernel"] is variables["params"]["fc2"]["kernel"]
    full = lj.quant.quantize(frozen, group_size=8)
    assert full["params"]["fc1"]["kernel"] is frozen["params"]["fc1"]["kernel"]
    assert lj.quant.is_quantized(full["params"]["fc2"]["kernel"])


def test_scanned_kernels_are_done_per_layer():
    model, x = ScannedMlp(), jax.random.normal(jax.random.key(0), (4, 24))
    variables = model.init(jax.random.key(1), x)
    path = ("params", "layers", "up", "kernel")
    w = low_rank_plus_noise((3, 24, 40), seed=3)
    variables["params"]["layers"]["up"]["kernel"] = jnp.asarray(w)
    layouts = lj.infer_layouts(model.apply, variables, x)
    assert layouts["/".join(path)].stack_axes == (0,)
    config = lj.LoraConfig(rank=4, alpha=8.0, targets=".*kernel")
    frozen, lora = lj.quant.loftq(
        variables, config, "int4", key=jax.random.key(2), layouts=layouts, group_size=8, iters=2
    )
    q, weights = (
        frozen["params"]["layers"]["up"]["kernel"],
        lora["params"]["layers"]["up"]["kernel"],
    )
    assert q.shape == (3, 24, 40) and q.axis == 1  # the layout's input axis
    assert weights.a.shape == (3, 24, 4) and weights.b.shape == (3, 4, 40)
    ref_q, ref_update = ref_loftq(w, "int4", rank=4, scale=2.0, iters=2, axis=1, group=8)
    got = update_of(weights)
    np.testing.assert_allclose(got, ref_update, atol=2e-4 * np.abs(ref_update).max())
    assert np.mean(np.asarray(q.codes) != np.asarray(ref_q.codes)) < 1e-3
    for layer in range(3):  # each layer's slice gets its own SVD: rank 4 each, not in total
        assert np.linalg.matrix_rank(got[layer], tol=1e-6) == 4
    want = np.asarray(model.apply(variables, x), np.float64)
    err_loftq = frob(lj.lora_apply(model.apply)(frozen, lora, x) - want)
    err_plain = frob(
        model.apply(
            lj.quant.dequantize_tree(
                lj.quant.quantize(variables, "int4", group_size=8, layouts=layouts)
            ),
            x,
        )
        - want
    )
    assert err_loftq < err_plain


def test_a_kernel_grouped_on_its_first_axis():
    """A (d, heads, head_dim) kernel: grouped along its input axis 0 (not ndim - 2), its
    adapter spans the flattened (d, heads * head_dim) matrix."""
    w = low_rank_plus_noise((32, 32)).reshape(32, 4, 8)
    layouts = {"w": lj.Layout("dense", in_axes=(0,), out_axes=(1, 2))}
    config = lj.LoraConfig(rank=4, alpha=4.0, targets="w")
    frozen, lora = lj.quant.loftq(
        {"w": jnp.asarray(w)},
        config,
        "nf4",
        key=jax.random.key(0),
        layouts=layouts,
        group_size=16,
        iters=2,
    )
    q, weights = frozen["w"], lora["w"]
    assert q.axis == 0 and weights.b.shape == (4, 4, 8)
    ref_q, ref_update = ref_loftq(
        w.reshape(32, 32), "nf4", rank=4, scale=1.0, iters=2, axis=0, group=16
    )
    got = np.asarray(weights.a, np.float64) @ np.asarray(weights.b, np.float64).reshape(4, 32)
    np.testing.assert_allclose(got, ref_update, atol=2e-4 * np.abs(ref_update).max())
    codes = np.asarray(q.codes).reshape(ref_q.codes.shape)  # (16, 4, 8): packed along axis 0
    assert np.mean(codes != np.asarray(ref_q.codes)) < 1e-3


# -------------------------------------------------------------------------------- merge
def _merge_case():
    rng = np.random.default_rng(5)
    params = {
        "a": {"kernel": jnp.asarray(low_rank_plus_noise((64, 32), seed=6))},
        "b": {"kernel": jnp.asarray(rng.normal(size=(32, 16)).astype(np.float32))},
        "c": {"kernel": jnp.asarray(rng.normal(size=(16, 8)).astype(np.float32))},
        "d": {
            "kernel": jnp.asarray(rng.normal(size=(64, 8)).astype(np.float32)),
            "bias": jnp.ones(8),
        },
    }
    config = lj.LoraConfig(rank=4, alpha=8.0, targets=r"(a|b|c)/kernel")
    frozen, lora = lj.quant.loftq(params, config, key=jax.random.key(0), group_size=16, double=True)
    frozen["b"]["kernel"] = quantize_kernel(params["b"]["kernel"], "int8", axis=0)
    frozen["c"]["kernel"] = params["c"]["kernel"]  # adapted, but left float
    frozen["d"]["kernel"] = quantize_kernel(params["d"]["kernel"], "int4", axis=0, group_size=8)
    lora = jax.tree.map(lambda x: x + 0.01, lora)  # trained: not the LoftQ start any more
    return frozen, lora


def _numpy_merge(kernel, weights):
    base = dequantize(kernel) if lj.quant.is_quantized(kernel) else kernel
    return np.asarray(base, np.float64) + update_of(weights)


def test_merge_is_the_float_merge_without_requantize():
    frozen, lora = _merge_case()
    merged = lj.quant.merge(frozen, lora)
    assert isinstance(merged, lj.quant.Merged) and merged.errors == {}
    for name in "abc":
        got = merged.params[name]["kernel"]
        assert not lj.quant.is_quantized(got) and got.dtype == jnp.float32
        want = _numpy_merge(frozen[name]["kernel"], lora[name]["kernel"])
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert merged.params["d"]["kernel"] is frozen["d"]["kernel"]
    assert merged.params["d"]["bias"] is frozen["d"]["bias"]


def test_merge_requantizes_each_quantized_kernel_in_its_own_format():
    frozen, lora = _merge_case()
    params, errors = lj.quant.merge(frozen, lora, requantize=True)
    assert list(errors) == ["a/kernel", "b/kernel"]  # c was float, d has no adapter
    static = ("format", "shape", "dtype", "axis", "group_size", "double")
    for name in "ab":
        old, new = frozen[name]["kernel"], params[name]["kernel"]
        assert lj.quant.is_quantized(new)
        assert [getattr(new, f) for f in static] == [getattr(old, f) for f in static]
        want = _numpy_merge(old, lora[name]["kernel"])
        gap = np.abs(np.asarray(dequantize(new), np.float64) - want).max()
        assert errors[f"{name}/kernel"]["max_abs"] == pytest.approx(gap, rel=1e-4, abs=1e-6)
        assert errors[f"{name}/kernel"]["max_rel"] == pytest.approx(
            gap / np.abs(want).max(), rel=1e-4, abs=1e-6
        )
        assert 0 < errors[f"{name}/kernel"]["max_rel"] < 0.2
    assert not lj.quant.is_quantized(params["c"]["kernel"])
    assert params["d"]["kernel"] is frozen["d"]["kernel"]
    assert params["d"]["bias"] is frozen["d"]["bias"]


# ------------------------------------------------------------------------------- errors
def test_loftq_errors_name_the_path():
    params = {
        "fc": {"kernel": jnp.asarray(low_rank_plus_noise((96, 32)))},
        "ids": {"kernel": jnp.ones((8, 8), jnp.int32)},
    }
    key = jax.random.key(0)
    config = lj.LoraConfig(rank=2, targets="fc/kernel")
    with pytest.raises(ValueError, match=r"fc/kernel.*does not divide the grouped axis of size 96"):
        lj.quant.loftq(params, config, key=key, group_size=64)
    with pytest.raises(ValueError, match=r"`iters` must be an int >= 1; found 0"):
        lj.quant.loftq(params, config, key=key, group_size=32, iters=0)
    with pytest.raises(ValueError, match="unknown format 'fp4'"):
        lj.quant.loftq(params, config, "fp4", key=key)
    pissa = lj.LoraConfig(rank=2, targets="fc/kernel", init="pissa")
    with pytest.raises(ValueError, match=r"fc/kernel: init='pissa' is a residual init"):
        lj.quant.loftq(params, pissa, key=key, group_size=32)
    with pytest.raises(ValueError, match=r"'ids/kernel' of dtype int32"):
        lj.quant.loftq(params, lj.LoraConfig(rank=2, targets="ids/kernel"), key=key)
    done = lj.quant.quantize(params, group_size=32, targets="fc/kernel")
    with pytest.raises(ValueError, match=r"fc/kernel is already quantized"):
        lj.quant.loftq(done, config, key=key, group_size=32)


@pytest.mark.parametrize("init", ["pissa"])
def test_split_refuses_a_residual_init_on_a_quantized_base(init):
    params = {"fc": {"kernel": jnp.asarray(low_rank_plus_noise((64, 32)))}}
    q = lj.quant.quantize(params, group_size=32)
    config = lj.LoraConfig(rank=2, targets="fc/kernel", init=init)
    with pytest.raises(
        ValueError, match=r"fc/kernel is quantized: a residual init rewrites the base kernel.*loftq"
    ):
        lj.split(q, config, key=jax.random.key(0))
    frozen, _ = lj.split(params, config, key=jax.random.key(0))  # the float base: fine
    assert not lj.quant.is_quantized(frozen["fc"]["kernel"])
    for keeps in ("normal", "kaiming_uniform", "gaussian"):
        kept, _ = lj.split(
            q, lj.LoraConfig(rank=2, targets="fc/kernel", init=keeps), key=jax.random.key(0)
        )
        assert kept["fc"]["kernel"] is q["fc"]["kernel"]
