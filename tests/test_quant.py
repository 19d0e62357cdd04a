"""`lj.quant`: int8 / int4 / NF4 kernels checked code by code against a float64 NumPy
reference written here (the NF4 table typed out from the QLoRA paper), their error bounds,
nibble packing, double quantization, memory, pytree / jit / orbax / mesh behaviour, and the
tree-level selection with its errors."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from flax.core import freeze
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import lora_jax as lj
from lora_jax.quant import QuantizedKernel, dequantize, quantize, quantize_kernel

# QLoRA (Dettmers et al., 2023), Appendix E: the NormalFloat4 data type.
NF4_PAPER = np.array(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ]
)
NF4_HALF_GAP = np.diff(NF4_PAPER).max() / 2
LEVELS = {"int8": 127, "int4": 7}
FORMATS = ("int8", "int4", "nf4")


# ---------------------------------------------------------------- NumPy reference (float64)
def ref_quantize(w, fmt, axis, group_size):
    """``(codes, scales, dequantized, ambiguous)`` in the kernel's layout. int4 codes are
    signed (-7..7), nf4 codes are table indices. `ambiguous` marks elements within float32
    rounding of a rounding tie (there float32 and float64 may pick either neighbour)."""
    x = np.moveaxis(np.asarray(w, np.float64), axis, -1)
    n = x.shape[-1]
    g = n if fmt == "int8" else group_size
    grouped = x.reshape(*x.shape[:-1], n // g, g)
    absmax = np.abs(grouped).max(axis=-1, keepdims=True)
    scale = absmax if fmt == "nf4" else absmax / LEVELS.get(fmt, 1)
    unit = np.divide(grouped, scale, out=np.zeros_like(grouped), where=scale > 0)
    if fmt == "nf4":
        dist = np.abs(unit[..., None] - NF4_PAPER)
        codes = dist.argmin(axis=-1)
        two = np.sort(dist, axis=-1)[..., :2]
        ambiguous = two[..., 1] - two[..., 0] < 1e-6
        values = NF4_PAPER[codes]
    else:
        codes = np.clip(np.round(unit), -LEVELS[fmt], LEVELS[fmt]).astype(np.int64)
        ambiguous = np.abs(np.abs(unit) % 1 - 0.5) < 1e-4
        values = codes
    back = lambda a: np.moveaxis(a.reshape(x.shape), -1, axis)
    scales = np.moveaxis(scale[..., 0], -1, axis)
    return back(codes), scales, back(values * scale), back(ambiguous)


def unpack(q):
    """The library's codes, unpacked here (int4 made signed)."""
    c = np.asarray(q.codes)
    if q.format == "int8":
        return c.astype(np.int64)
    assert c.dtype == np.uint8
    c = np.moveaxis(c, q.axis, -1).astype(np.int64)
    out = np.empty((*c.shape[:-1], 2 * c.shape[-1]), np.int64)
    out[..., 0::2] = c & 0xF
    out[..., 1::2] = c >> 4
    out = np.moveaxis(out, -1, q.axis)
    return out - 8 if q.format == "int4" else out


def ref_double(scales):
    """QLoRA double quantization with linear int8 blocks of 256: ``(codes, steps, offset)``."""
    offset = scales.mean()
    flat = (scales - offset).reshape(-1)
    blocks = -(-flat.size // 256)
    padded = np.zeros(blocks * 256)
    padded[: flat.size] = flat
    padded = padded.reshape(blocks, 256)
    steps = np.abs(padded).max(axis=1) / 127
    unit = np.divide(padded, steps[:, None], out=np.zeros_like(padded), where=steps[:, None] > 0)
    return np.round(unit).reshape(-1)[: flat.size], steps, offset, unit.reshape(-1)[: flat.size]


def weights(key, shape, dtype=jnp.float32):
    """N(0, 0.02) with a few outliers (what trained kernels look like)."""
    k1, k2 = jax.random.split(jax.random.key(key))
    w = 0.02 * jax.random.normal(k1, shape)
    w = jnp.where(jax.random.uniform(k2, shape) < 0.002, 10 * w, w)
    return w.astype(dtype)


def check_against_ref(w, q, fmt, axis, group_size):
    codes_ref, scales_ref, deq_ref, amb = ref_quantize(
        np.asarray(w, np.float32), fmt, axis, group_size
    )
    codes = unpack(q)
    assert codes.shape == codes_ref.shape
    assert amb.mean() < 1e-3, "the reference marked too much as a tie to compare"
    np.testing.assert_array_equal(codes[~amb], codes_ref[~amb])
    assert np.all(np.abs(codes - codes_ref)[amb] <= 1)
    np.testing.assert_allclose(np.asarray(q.scales), scales_ref, rtol=1e-6)
    deq = np.asarray(dequantize(q).astype(jnp.float32), np.float64)
    np.testing.assert_allclose(deq[~amb], deq_ref[~amb], rtol=2e-6, atol=0)
    return deq


def check_bound(w, q, fmt, deq, slack=0.0):
    """|w - deq| <= scale/2 (int8, int4) or absmax * max NF4 gap / 2 (nf4), per group."""
    rep = np.repeat(np.asarray(q.scales, np.float64), q.group_size, axis=q.axis)
    half = rep / 2 if fmt != "nf4" else rep * NF4_HALF_GAP
    err = np.abs(np.asarray(w, np.float64) - deq)
    assert np.all(err <= half * (1 + 1e-4) + slack), float((err - half).max())
    return err


# ------------------------------------------------------------------- one kernel, each format
@pytest.mark.parametrize("fmt", FORMATS)
def test_codes_scales_and_values_match_the_numpy_reference(fmt):
    w = weights(0, (256, 96))
    q = quantize_kernel(w, fmt, group_size=64)
    assert (q.format, q.shape, q.dtype, q.axis, q.double) == (fmt, (256, 96), "float32", 0, False)
    assert q.group_size == (256 if fmt == "int8" else 64)
    deq = check_against_ref(w, q, fmt, 0, 64)
    err = check_bound(w, q, fmt, deq)
    assert err.max() > 0  # the bound is tested on a real error, not a lossless kernel


@pytest.mark.parametrize("fmt", FORMATS)
def test_layout_of_codes_and_scales(fmt):
    q = quantize_kernel(weights(1, (128, 40)), fmt, group_size=32)
    codes = {
        "int8": ((128, 40), np.int8),
        "int4": ((64, 40), np.uint8),
        "nf4": ((64, 40), np.uint8),
    }
    assert (q.codes.shape, q.codes.dtype) == codes[fmt]
    assert q.scales.shape == ((1, 40) if fmt == "int8" else (4, 40))
    assert q.scales.dtype == jnp.float32
    assert q.ndim == 2 and q.scale_codes is None and q.scale_offset is None
    c = unpack(q)
    assert c.min() >= (-127 if fmt == "int8" else -7 if fmt == "int4" else 0)
    assert c.max() <= (127 if fmt == "int8" else 7 if fmt == "int4" else 15)
    assert "QuantizedKernel(" in repr(q) and len(repr(q)) < 120


def test_nibbles_are_packed_even_low_odd_high():
    # int4, one group per column: even rows code to +7 (nibble 15), odd rows to -7 (1).
    w = jnp.tile(jnp.array([[1.0], [-1.0]]), (4, 3))  # (8, 3)
    q = quantize_kernel(w, "int4", group_size=8)
    np.testing.assert_array_equal(np.asarray(q.codes), np.full((4, 3), 15 | 1 << 4, np.uint8))
    # every NF4 value once, shuffled: the codes are the permutation, packed in pairs
    perm = np.random.default_rng(0).permutation(16)
    w = jnp.asarray(NF4_PAPER[perm], jnp.float32)[:, None] * jnp.array([1.0, 0.5])
    q = quantize_kernel(w, "nf4", group_size=16)
    want = (perm[0::2] | perm[1::2] << 4).astype(np.uint8)
    np.testing.assert_array_equal(np.asarray(q.codes), np.stack([want, want], axis=1))
    np.testing.assert_array_equal(unpack(q)[:, 0], perm)
    np.testing.assert_array_equal(dequantize(q), w)


def test_nf4_ties_take_the_lower_index():
    mid = (NF4_PAPER[8] + NF4_PAPER[9]) / 2  # between 0.0796 and 0.1609
    w = jnp.array([[1.0], [np.float32(mid)]])
    code = unpack(quantize_kernel(w, "nf4", group_size=2))[1, 0]
    assert code in (8, 9)  # float32 rounding may move the midpoint by an ulp
    exact = jnp.array([[1.0], [0.5]])  # not a tie: nearest is 0.4407 (index 12)
    assert unpack(quantize_kernel(exact, "nf4", group_size=2))[1, 0] == 12


@pytest.mark.parametrize("fmt", FORMATS)
def test_all_zero_groups_dequantize_to_zero(fmt):
    w = np.array(weights(2, (128, 8)))
    w[:64, 3] = 0.0  # one zero group (nf4/int4, g=64)
    w[:, 5] = 0.0  # a zero column: an int8 group
    for double in (False, True):
        q = quantize_kernel(jnp.asarray(w), fmt, group_size=64, double=double)
        deq = np.asarray(dequantize(q))
        assert np.isfinite(deq).all()
        assert np.all(deq[:, 5] == 0)
        if fmt != "int8":
            assert np.all(deq[:64, 3] == 0)
        if not double:
            assert np.asarray(q.scales)[0 if fmt == "int8" else 1, 5] == 0


# --------------------------------------------------------------------- double quantization
def _decoded_scales(q):
    codes = np.asarray(q.scale_codes, np.float64)
    steps = np.repeat(np.asarray(q.scale_scales, np.float64), 256)[: codes.size]
    shape = list(q.shape)
    shape[q.axis] //= q.group_size
    return (codes * steps + float(q.scale_offset)).reshape(shape), steps.reshape(shape)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("shape", [(512, 256), (384, 100)])  # 2048 scales; 600 (padded)
def test_double_quantization_matches_reference_and_bound(fmt, shape):
    w = weights(3, shape)
    single = quantize_kernel(w, fmt, group_size=64)
    q = quantize_kernel(w, fmt, group_size=64, double=True)
    assert q.scales is None and q.double
    assert q.scale_codes.dtype == jnp.int8 and q.scale_codes.shape == (single.scales.size,)
    assert q.scale_scales.dtype == jnp.float32 and q.scale_offset.shape == ()
    assert q.scale_scales.shape == (-(-single.scales.size // 256),)
    s = np.asarray(single.scales, np.float64)
    codes_ref, steps_ref, offset_ref, unit = ref_double(s)
    amb = np.abs(np.abs(unit) % 1 - 0.5) < 1e-4
    assert amb.mean() < 1e-2
    codes = np.asarray(q.scale_codes, np.int64)
    np.testing.assert_array_equal(codes[~amb], codes_ref[~amb])
    assert np.abs(codes).max() <= 127
    np.testing.assert_allclose(np.asarray(q.scale_scales), steps_ref, rtol=1e-5)
    np.testing.assert_allclose(float(q.scale_offset), offset_ref, rtol=1e-6)
    # reconstructed scales: within half a step (block absmax / 254) of the originals
    rebuilt, steps = _decoded_scales(q)
    bound = steps / 2 * (1 + 1e-4) + 1e-7 * s.max()
    assert np.all(np.abs(rebuilt - s) <= bound)
    assert np.abs(rebuilt - s).max() > 0
    # the dequantized kernel moves by at most |code value| * that bound
    deq1 = np.asarray(dequantize(single), np.float64)
    deq2 = np.asarray(dequantize(q), np.float64)
    top = {"int8": 127, "int4": 7, "nf4": 1}[fmt]
    rep = np.repeat(bound, q.group_size, axis=0)
    assert np.all(np.abs(deq2 - deq1) <= top * rep + 1e-7)
    err1 = np.abs(np.asarray(w, np.float64) - deq1)
    assert np.all(np.abs(np.asarray(w, np.float64) - deq2) <= err1 + top * rep + 1e-7)


# --------------------------------------------------------------------------------- memory
def test_nbytes_of_a_4096_square_kernel():
    w = weights(4, (4096, 4096))
    n = 4096 * 4096
    assert lj.quant.nbytes(w) == 4 * n
    q8 = quantize_kernel(w, "int8")
    assert q8.nbytes == n + 4096 * 4 == lj.quant.nbytes(q8)
    assert q8.nbytes / (4 * n) <= 0.27
    for fmt in ("int4", "nf4"):
        q = quantize_kernel(w, fmt, group_size=64)
        assert q.nbytes == n // 2 + (n // 64) * 4 == lj.quant.nbytes({"k": q})
        assert q.nbytes / (4 * n) <= 0.16
    dq = quantize_kernel(w, "nf4", group_size=64, double=True)
    assert dq.nbytes == n // 2 + n // 64 + 4 * (n // 64 // 256) + 4
    assert round(8 * dq.nbytes / n, 3) == 4.127  # bits per parameter, as the QLoRA paper
    abstract = jax.eval_shape(lambda x: quantize_kernel(x, "nf4", double=True), w)
    assert abstract.nbytes == dq.nbytes


# ------------------------------------------------------------- axes, stacks, dtypes, traces
def test_stacked_three_axis_kernel_groups_the_in_axis():
    w = weights(5, (3, 128, 24))  # (layers, in, out)
    for fmt in FORMATS:
        q = quantize_kernel(w, fmt, group_size=32)
        assert q.axis == 1 and q.scales.shape == ((3, 1, 24) if fmt == "int8" else (3, 4, 24))
        check_bound(w, q, fmt, check_against_ref(w, q, fmt, 1, 32))


@pytest.mark.parametrize("axis", [0, 1, 2, 3])
def test_any_axis_of_a_four_axis_kernel(axis):
    w = weights(6, (8, 16, 12, 20))
    for fmt in FORMATS:
        q = quantize_kernel(w, fmt, axis=axis - 4, group_size=4)
        assert q.axis == axis
        check_bound(w, q, fmt, check_against_ref(w, q, fmt, axis, 4))


def test_bfloat16_kernels_dequantize_to_bfloat16():
    w = weights(7, (128, 32), jnp.bfloat16)
    for fmt in FORMATS:
        q = quantize_kernel(w, fmt, group_size=64)
        assert q.dtype == "bfloat16"
        out = dequantize(q)
        assert out.dtype == jnp.bfloat16
        ref = ref_quantize(np.asarray(w.astype(jnp.float32)), fmt, 0, 64)[2]
        want = np.asarray(jnp.asarray(ref, jnp.float32).astype(jnp.bfloat16).astype(jnp.float32))
        close = np.isclose(np.asarray(out.astype(jnp.float32)), want, rtol=1e-2, atol=0)
        assert close.mean() > 0.999


def test_jit_of_quantize_and_dequantize_equals_eager():
    w = weights(8, (256, 64))
    jq = jax.jit(quantize_kernel, static_argnames=("format", "axis", "group_size", "double"))
    for fmt in FORMATS:
        for double in (False, True):
            eager = quantize_kernel(w, fmt, group_size=32, double=double)
            jitted = jq(w, fmt, group_size=32, double=double)
            assert repr(jitted) == repr(eager)
            np.testing.assert_array_equal(jitted.codes, eager.codes)
            floats = ("scales", "scale_scales", "scale_offset")
            for name in floats:  # XLA may sum the mean of the scales in another order
                a, b = getattr(eager, name), getattr(jitted, name)
                assert (a is None) == (b is None)
                if a is not None:
                    np.testing.assert_allclose(b, a, rtol=1e-6)
            if double:
                diff = np.asarray(jitted.scale_codes, int) - np.asarray(eager.scale_codes, int)
                assert np.abs(diff).max() <= 1 and (diff != 0).mean() < 0.01
            # with `double`, XLA may fuse ``code * step + offset`` into one rounding
            tol = 1e-6 if double else 0.0
            np.testing.assert_allclose(jax.jit(dequantize)(eager), dequantize(eager), rtol=tol)


def test_pytree_structure_and_static_metadata():
    q = quantize_kernel(weights(9, (64, 16)), "nf4", group_size=32)
    leaves, treedef = jax.tree.flatten(q)
    assert len(leaves) == 2 and leaves[0] is q.codes and leaves[1] is q.scales
    assert treedef.num_leaves == 2  # one node; its None children are empty subtrees
    dq = quantize_kernel(weights(9, (64, 16)), "nf4", group_size=32, double=True)
    assert len(jax.tree.leaves(dq)) == 4
    same = jax.tree.map(lambda x: x, {"k": q})["k"]
    assert isinstance(same, QuantizedKernel) and repr(same) == repr(q)
    through = jax.jit(lambda t: t)(q)
    assert (through.format, through.shape, through.axis, through.group_size) == (
        "nf4",
        (64, 16),
        0,
        32,
    )
    assert jax.tree.structure(q) != jax.tree.structure(
        quantize_kernel(weights(9, (64, 16)), "int4", group_size=32)
    )
    assert lj.quant.is_quantized(q) and not lj.quant.is_quantized(q.codes)


def test_orbax_round_trip_is_bit_exact(tmp_path):
    tree = {
        "params": {
            "fc": {
                "kernel": quantize_kernel(
                    weights(10, (128, 32)), "nf4", group_size=64, double=True
                ),
                "bias": jnp.ones(32),
            },
            "out": {"kernel": quantize_kernel(weights(11, (32, 8)), "int8")},
            "mix": {"kernel": quantize_kernel(weights(12, (2, 64, 8)), "int4", group_size=16)},
        }
    }
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(tmp_path / "ckpt", tree)
        ckptr.wait_until_finished()
    with ocp.StandardCheckpointer() as ckptr:
        restored = ckptr.restore(tmp_path / "ckpt", jax.eval_shape(lambda: tree))
    assert jax.tree.structure(restored) == jax.tree.structure(tree)
    for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(restored), strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for name in ("fc", "out", "mix"):
        got, want = restored["params"][name]["kernel"], tree["params"][name]["kernel"]
        np.testing.assert_array_equal(dequantize(got), dequantize(want))


# ----------------------------------------------------------------------- trees and selection
def _params():
    return {
        "params": {
            "dense": {"kernel": weights(13, (128, 32)), "bias": jnp.ones(32)},
            "norm": {"scale": jnp.ones(32)},
            "head": {"kernel": weights(14, (32, 8))},
        },
        "table": jnp.arange(16, dtype=jnp.int32).reshape(4, 4),
    }


def test_default_selection_without_layouts():
    params = _params()
    q = quantize(params, "nf4", group_size=32)
    assert lj.quant.is_quantized(q["params"]["dense"]["kernel"])
    assert lj.quant.is_quantized(q["params"]["head"]["kernel"])
    for untouched in (("params", "dense", "bias"), ("params", "norm", "scale"), ("table",)):
        got, want = q, params
        for k in untouched:
            got, want = got[k], want[k]
        assert got is want
    w = params["params"]["dense"]["kernel"]
    check_against_ref(w, q["params"]["dense"]["kernel"], "nf4", 0, 32)
    back = lj.quant.dequantize_tree(q)
    assert jax.tree.structure(back) == jax.tree.structure(params)
    np.testing.assert_array_equal(
        back["params"]["dense"]["kernel"], dequantize(q["params"]["dense"]["kernel"])
    )
    before, after = lj.quant.nbytes(params), lj.quant.nbytes(q)
    assert before == 4 * (128 * 32 + 32 + 32 + 32 * 8) + 4 * 16
    assert after == 64 * 32 + 4 * 32 * 4 + 16 * 8 + 1 * 8 * 4 + 4 * (32 + 32) + 4 * 16


def test_default_selection_with_layouts_skips_embeddings(tiny):
    _, variables, _, layouts = tiny
    q = quantize(variables, "int4", group_size=8, layouts=layouts)
    leaves = jax.tree_util.tree_flatten_with_path(q, is_leaf=lj.quant.is_quantized)[0]
    by_path = {"/".join(k.key for k in kp): x for kp, x in leaves}
    quantized = {p for p, x in by_path.items() if lj.quant.is_quantized(x)}
    assert quantized == {p for p, lay in layouts.items() if lay.kind != "embed"}
    assert "params/embed/embedding" not in quantized
    expect_axis = {
        "params/blocks/attn/query/kernel": 1,  # (layers, d, heads, head_dim)
        "params/blocks/attn/out/kernel": 2,  # (layers, heads, head_dim, d): last in-axis
        "params/conv/kernel": 1,  # (window, in, out)
        "params/mix/kernel": 0,  # (d, heads, k)
    }
    for path, axis in expect_axis.items():
        qk = by_path[path]
        assert qk.axis == axis == layouts[path].in_axes[-1]
        w = _get(variables, path)
        check_bound(w, qk, "int4", check_against_ref(w, qk, "int4", axis, 8))


def _get(tree, path):
    for k in path.split("/"):
        tree = tree[k]
    return tree


def test_targets_regex_callable_and_exclude():
    params = _params()
    q = quantize(params, "int8", targets=r".*/dense/kernel")
    assert lj.quant.is_quantized(q["params"]["dense"]["kernel"])
    assert q["params"]["head"]["kernel"] is params["params"]["head"]["kernel"]
    q = quantize(params, "int8", targets=lambda path, leaf: path.startswith("params/head"))
    assert lj.quant.is_quantized(q["params"]["head"]["kernel"])
    assert not lj.quant.is_quantized(q["params"]["dense"]["kernel"])
    q = quantize(params, "nf4", group_size=32, exclude=r".*/head/.*")
    assert lj.quant.is_quantized(q["params"]["dense"]["kernel"])
    assert not lj.quant.is_quantized(q["params"]["head"]["kernel"])


def test_a_partly_quantized_tree_gets_the_rest_quantized():
    """Default selection skips kernels already quantized (as `lj.quant.loftq` leaves the
    unadapted ones float) and quantizes the float ones; a pattern naming a quantized kernel
    is an error, and a tree with no float kernel left is refused."""
    params = _params()
    part = quantize(params, "int8", targets=r".*/dense/kernel")
    done = part["params"]["dense"]["kernel"]
    for layouts in (
        None,
        {
            "params/dense/kernel": lj.Layout("dense", (0,), (1,)),
            "params/head/kernel": lj.Layout("dense", (0,), (1,)),
        },
    ):
        full = quantize(part, "nf4", group_size=32, layouts=layouts)
        assert full["params"]["dense"]["kernel"] is done  # left as it was: int8, not nf4
        head = full["params"]["head"]["kernel"]
        assert lj.quant.is_quantized(head) and head.format == "nf4"
        check_against_ref(params["params"]["head"]["kernel"], head, "nf4", 0, 32)
        assert full["params"]["dense"]["bias"] is params["params"]["dense"]["bias"]
    with pytest.raises(ValueError, match=r"already quantized.*'params/dense/kernel'"):
        quantize(full)
    with pytest.raises(
        ValueError,
        match=r"`targets` pattern '\.\*/kernel' selects 'params/dense/kernel', "
        r"which is already quantized",
    ):
        quantize(part, "nf4", group_size=32, targets=".*/kernel")
    with pytest.raises(ValueError, match=r"selects 'params/dense/kernel', which is already"):
        quantize(part, "nf4", group_size=32, targets=lambda path, leaf: "dense/kernel" in path)


def test_frozen_dict_and_nnx_state():
    frozen = freeze(_params())
    q = quantize(frozen, "nf4", group_size=32)
    assert type(q) is type(frozen) and lj.quant.is_quantized(q["params"]["dense"]["kernel"])
    model = nnx.Linear(64, 16, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    qstate = quantize(state, "int4", group_size=32)
    assert lj.quant.is_quantized(qstate["kernel"].get_value())
    assert not lj.quant.is_quantized(qstate["bias"].get_value())
    back = lj.quant.dequantize_tree(qstate)
    w = state["kernel"].get_value()
    check_bound(
        w, qstate["kernel"].get_value(), "int4", np.asarray(back["kernel"].get_value(), np.float64)
    )
    x = jnp.ones((2, 64))
    got = nnx.merge(graphdef, back)(x)
    want = x @ back["kernel"].get_value() + state["bias"].get_value()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_errors_report_measured_error():
    params = _params()
    q = quantize(params, "int4", group_size=32)
    err = lj.quant.errors(params, q)
    assert list(err) == ["params/dense/kernel", "params/head/kernel"]
    for path, rep in err.items():
        w = np.asarray(_get(params, path), np.float64)
        deq = np.asarray(dequantize(_get(q, path)), np.float64)
        assert rep["max_abs"] == pytest.approx(np.abs(w - deq).max(), rel=1e-6)
        assert rep["max_rel"] == pytest.approx(np.abs(w - deq).max() / np.abs(w).max(), rel=1e-6)
        assert 0 < rep["max_rel"] <= 1 / 14 * (1 + 1e-4)  # scale / 2 over absmax, int4


# -------------------------------------------------------------------------------- errors
def test_kernel_errors():
    w = jnp.ones((96, 8))
    with pytest.raises(
        ValueError, match=r"does not divide.*size 96.*\[2, 4, 6, 8, 12, 16, 24, 32, 48, 96\]"
    ):
        quantize_kernel(w, "nf4", group_size=64)
    with pytest.raises(ValueError, match="is odd"):
        quantize_kernel(w, "int4", group_size=3)
    with pytest.raises(TypeError, match=r"float array.*int32"):
        quantize_kernel(jnp.ones((8, 8), jnp.int32), "nf4")
    with pytest.raises(ValueError, match=re.escape("formats are ('int8', 'int4', 'nf4')")):
        quantize_kernel(w, "fp4")
    with pytest.raises(ValueError, match="at least 1 axis"):
        quantize_kernel(jnp.float32(1.0), "int8", axis=0)
    with pytest.raises(ValueError, match="out of range"):
        quantize_kernel(jnp.ones(8), "int8")
    with pytest.raises(ValueError, match="no even group size divides 9"):
        quantize_kernel(jnp.ones((9, 2)), "nf4", group_size=2)
    with pytest.raises(TypeError, match="QuantizedKernel"):
        dequantize(w)


def test_tree_errors_name_the_path():
    params = _params()
    with pytest.raises(
        ValueError, match=r"(?s)'\.\*/dens/kernel' matches no parameter.*params/dense/kernel"
    ):
        quantize(params, targets=r".*/dens/kernel")
    with pytest.raises(ValueError, match=r"`exclude` pattern 'nothing' matches no parameter"):
        quantize(params, group_size=32, exclude="nothing")
    with pytest.raises(TypeError, match=r"'table' of dtype int32"):
        quantize(params, "int8", targets="table")
    with pytest.raises(ValueError, match=r"'params/dense/bias' of shape \(32,\)"):
        quantize(params, "int8", targets=r".*/dense/.*")
    q = quantize(params, group_size=32)
    with pytest.raises(ValueError, match=r"already quantized.*'params/dense/kernel'"):
        quantize(q)
    with pytest.raises(
        ValueError,
        match=r"'params/head/kernel' has shape \(32, 8\), grouped along axis 0 of size 32"
        r".*group_size=32.*`exclude`",
    ):
        quantize(params, "nf4", group_size=64)
    with pytest.raises(ValueError, match="unknown format"):
        quantize(params, "nf3")
    with pytest.raises(ValueError, match=r"'params/dense/kernel' is quantized.*nothing"):
        lj.quant.errors({}, q)


# ------------------------------------------------------------------------------- sharding
@pytest.mark.skipif(jax.device_count() < 4, reason="needs 4 (simulated) devices")
@pytest.mark.parametrize("fmt", FORMATS)
def test_sharded_along_the_out_axis(fmt):
    mesh = Mesh(np.array(jax.devices()[:4]), ("x",))
    w = weights(15, (128, 64))
    q = quantize_kernel(w, fmt, group_size=32)
    sharded = jax.device_put(q, NamedSharding(mesh, PartitionSpec(None, "x")))
    assert sharded.codes.addressable_shards[0].data.shape == (q.codes.shape[0], 16)
    assert sharded.scales.addressable_shards[0].data.shape == (q.scales.shape[0], 16)
    out = jax.jit(dequantize)(sharded)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(dequantize(q)))
    stacked = quantize_kernel(weights(16, (2, 64, 32)), fmt, group_size=16)
    spec = NamedSharding(mesh, PartitionSpec(None, None, "x"))
    out = jax.jit(dequantize)(jax.device_put(stacked, spec))
    np.testing.assert_array_equal(np.asarray(out), np.asarray(dequantize(stacked)))
