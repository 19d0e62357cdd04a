"""Many adapters on one base: swap without retracing, pad, stack and unstack, mixed batches,
combine, merge several. No config past `split`: every adapter carries its own scale."""

from __future__ import annotations

import math
import re

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import as_f64, perturb

import lora_jax as lj

TARGETS = [".*/kernel", ".*/embedding"]  # every Tiny layer but the raw `gate` (merged path)


def _adapters(tiny, ranks, alpha=8.0, seed=0, rslora=False, dropout=0.0):
    """One trained-looking adapter per rank (and per alpha, when `alpha` is a list)."""
    _, variables, _, layouts = tiny
    alphas = alpha if isinstance(alpha, list) else [alpha] * len(ranks)
    out = []
    for i, (rank, a) in enumerate(zip(ranks, alphas, strict=True)):
        config = lj.LoraConfig(
            rank=rank, alpha=a, targets=TARGETS, use_rslora=rslora, dropout=dropout
        )
        _, lora = lj.split(variables, config, key=jax.random.key(seed + i), layouts=layouts)
        out.append(perturb(lora, jax.random.key(100 + seed + i), 0.2))
    return out


def _batch(model, n=6):
    return jax.random.randint(jax.random.key(7), (n, 6), 0, model.vocab)


def _close(got, want, tol=1e-5):
    want = as_f64(want)
    np.testing.assert_allclose(as_f64(got), want, rtol=0, atol=tol * (1.0 + np.abs(want).max()))


def _same(got, want):
    """Bit for bit: same structure, metadata (scales, layouts) and array values."""
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert g.dtype == w.dtype
        np.testing.assert_array_equal(g, w)


def _is_weights(x):
    return isinstance(x, lj.LoraWeights)


def _query(lora):
    return lora["params"]["blocks"]["attn"]["query"]["kernel"]


# --- swap and pad -------------------------------------------------------------------------


def test_swapping_adapters_and_padded_ranks_never_retrace(tiny):
    model, variables, _, _ = tiny
    ids = _batch(model)
    a0, a1, a2, small = _adapters(tiny, [4, 4, 4, 2])
    apply = lj.lora_apply(model.apply)
    fwd = jax.jit(chex.assert_max_traces(lambda lora: apply(variables, lora, ids), n=1))
    padded = lj.multi.pad_rank(small, 4, scale=_query(a0).scale)  # one scale: one structure
    outs = [fwd(lora) for lora in (a0, a1, a2, padded, a0)]
    np.testing.assert_array_equal(outs[0], outs[4])
    assert not np.allclose(outs[0], outs[1])


PADS = [(4, 8, 8.0, False), (3, 8, 6.0, False), (2, 8, 8.0, True), (3, 5, 8.0, True)]


@pytest.mark.parametrize(("rank", "new_rank", "alpha", "rslora"), PADS)
def test_pad_rank_keeps_factors_scale_and_outputs(tiny, rank, new_rank, alpha, rslora):
    """Zeros only and the scale kept: pad_rank rounds nothing, so the outputs and merged
    weights are bit for bit the original's wherever XLA reduces the longer rank axis in the
    same order (rank 4 -> 8 here); otherwise they differ only by that reduction order."""
    model, variables, _, _ = tiny
    ids = _batch(model)
    [lora] = _adapters(tiny, [rank], alpha=alpha, rslora=rslora)
    padded = lj.multi.pad_rank(lora, new_rank)
    for path, w in _flat(padded).items():
        old = _flat(lora)[path]
        n = len(w.layout.stack_axes)
        assert w.rank == new_rank and w.scale == old.scale and w.layout == old.layout
        np.testing.assert_array_equal(w.a[..., :rank], old.a)
        assert not np.asarray(w.a[..., rank:]).any()
        np.testing.assert_array_equal(jnp.moveaxis(w.b, n, 0)[:rank], jnp.moveaxis(old.b, n, 0))
        assert not np.asarray(jnp.moveaxis(w.b, n, 0)[rank:]).any()
    assert _query(padded).scale == (alpha / math.sqrt(rank) if rslora else alpha / rank)
    apply = jax.jit(lj.lora_apply(model.apply))
    want, got = apply(variables, lora, ids), apply(variables, padded, ids)
    assert np.abs(as_f64(want) - as_f64(model.apply(variables, ids))).max() > 0.1
    merged, merged_want = lj.merge(variables, padded), lj.merge(variables, lora)
    if (rank, new_rank) == (4, 8):
        np.testing.assert_array_equal(got, want)
        _same(merged, merged_want)
    _close(got, want, 1e-6)
    for g, m in zip(jax.tree.leaves(merged), jax.tree.leaves(merged_want), strict=True):
        _close(g, m, 1e-6)


@pytest.mark.parametrize(("rank", "new_rank", "alpha", "rslora"), PADS)
def test_pad_rank_with_a_new_scale_keeps_outputs(tiny, rank, new_rank, alpha, rslora):
    """With `scale=`, b absorbs old/new scale: the outputs agree up to rounding."""
    model, variables, _, _ = tiny
    ids = _batch(model)
    [lora] = _adapters(tiny, [rank], alpha=alpha, rslora=rslora)
    new_scale = alpha / math.sqrt(new_rank) if rslora else alpha / new_rank
    padded = lj.multi.pad_rank(lora, new_rank, scale=new_scale)
    assert all(w.scale == new_scale for w in jax.tree.leaves(padded, is_leaf=_is_weights))
    apply = jax.jit(lj.lora_apply(model.apply))
    _close(apply(variables, padded, ids), apply(variables, lora, ids), 1e-6)
    merged = lj.merge(variables, padded)
    for g, m in zip(
        jax.tree.leaves(merged), jax.tree.leaves(lj.merge(variables, lora)), strict=True
    ):
        _close(g, m, 1e-6)


def test_pad_rank_onto_another_alpha(tiny):
    model, variables, _, _ = tiny
    ids = _batch(model)
    [lora] = _adapters(tiny, [2], alpha=3.0)
    padded = lj.multi.pad_rank(lora, 8, scale=16.0 / 8)
    want = lj.lora_apply(model.apply)(variables, lora, ids)
    _close(lj.lora_apply(model.apply)(variables, padded, ids), want, 1e-6)


def test_pad_rank_errors(tiny):
    [lora] = _adapters(tiny, [4])
    hint = re.escape("lj.multi.combine_adapters([lora], [1.0], combination_type='svd', rank=2)")
    with pytest.raises(
        ValueError, match=r"params/blocks/attn/key/kernel: cannot pad to rank 2.*rank 4.*" + hint
    ):
        lj.multi.pad_rank(lora, 2)
    lowered = lj.multi.combine_adapters([lora], [1.0], combination_type="svd", rank=2)
    assert _query(lowered).rank == 2
    # Every Tiny kernel allows at most rank 16 (dim 16), as lj.split refuses rank 17.
    with pytest.raises(
        ValueError, match=r"params/blocks/attn/key/kernel: cannot pad to rank 17.*at most rank 16"
    ):
        lj.multi.pad_rank(lora, 17)
    assert _query(lj.multi.pad_rank(lora, 16)).rank == 16
    with pytest.raises(TypeError, match="`rank` must be an int"):
        lj.multi.pad_rank(lora, 4.0)
    with pytest.raises(ValueError, match="`scale` must be finite and non-zero"):
        lj.multi.pad_rank(lora, 4, scale=0.0)
    with pytest.raises(TypeError, match="`scale` must be a finite number"):
        lj.multi.pad_rank(lora, 4, scale="2")
    with pytest.raises(TypeError, match=r"stacks 2 adapters; pad each before"):
        lj.multi.pad_rank(lj.multi.stack_adapters([lora, lora]), 8)


# --- stack, unstack, replace -----------------------------------------------------------------


def test_stack_puts_the_adapter_axis_after_the_layer_axis(tiny):
    loras = _adapters(tiny, [3, 3], alpha=[3.0, 12.0])
    stacked = lj.multi.stack_adapters(loras)
    q = _query(stacked)  # scanned: (layers, ...)
    assert q.a.shape == (2, 2, 16, 3) and q.b.shape == (2, 2, 3, 2, 8)
    assert q.scale == (1.0, 4.0) and q.layout == _query(loras[0]).layout
    np.testing.assert_array_equal(q.a[:, 1], _query(loras[1]).a)
    embed = stacked["params"]["embed"]["embedding"]
    assert (
        embed.a.shape == (2, 32, 3)
        and embed.layout == loras[0]["params"]["embed"]["embedding"].layout
    )


def test_unstack_and_replace_round_trip_bit_for_bit(tiny):
    loras = _adapters(tiny, [3, 3, 3], alpha=[3.0, 12.0, 5.0], rslora=True)
    stacked = lj.multi.stack_adapters(loras)
    for i, lora in enumerate(loras):
        _same(lj.multi.unstack_adapter(stacked, i), lora)
        assert _query(lj.multi.unstack_adapter(stacked, i)).scale == _query(lora).scale
    swapped = lj.multi.replace_adapter(stacked, 1, loras[2])
    assert _query(swapped).scale == tuple(_query(x).scale for x in (loras[0], loras[2], loras[2]))
    _same(lj.multi.unstack_adapter(swapped, 1), loras[2])
    _same(lj.multi.unstack_adapter(swapped, 0), loras[0])
    _same(lj.multi.replace_adapter(swapped, 1, loras[1]), stacked)
    _same(jax.jit(lj.multi.unstack_adapter, static_argnums=1)(stacked, 2), loras[2])


def test_unstack_and_replace_errors(tiny):
    loras = _adapters(tiny, [3, 3])
    stacked = lj.multi.stack_adapters(loras)
    for bad in (-1, 2):
        with pytest.raises(IndexError, match=rf"`i` is {bad}, but `stacked` holds 2 adapters"):
            lj.multi.unstack_adapter(stacked, bad)
        with pytest.raises(IndexError, match=r"holds 2 adapters: i must be in 0\.\.1"):
            lj.multi.replace_adapter(stacked, bad, loras[0])
    with pytest.raises(TypeError, match="`i` must be an int"):
        lj.multi.unstack_adapter(stacked, 1.0)
    with pytest.raises(ValueError, match=r"params/.*`stacked` must come from lj.multi.stack_"):
        lj.multi.unstack_adapter(loras[0], 0)
    [wide] = _adapters(tiny, [4])
    with pytest.raises(
        ValueError,
        match=r"`lora` cannot replace adapter 1 of `stacked` at 'params/blocks/attn/key/kernel'"
        r".*shapes.*pad_rank",
    ):
        lj.multi.replace_adapter(stacked, 1, wide)
    with pytest.raises(TypeError, match=r"`lora` at .* stacks 2 adapters"):
        lj.multi.replace_adapter(stacked, 0, stacked)


def test_stack_errors_name_the_adapter_and_path(tiny):
    _, variables, _, layouts = tiny
    a, b = _adapters(tiny, [3, 2])
    with pytest.raises(
        ValueError, match=r"`loras\[1\]`.*'params/blocks/attn/key/kernel'.*pad_rank"
    ):
        lj.multi.stack_adapters([a, b])
    qv = lj.LoraConfig(rank=3, targets=r".*/(query|value)/kernel")
    _, c = lj.split(variables, qv, key=jax.random.key(0), layouts=layouts)
    with pytest.raises(
        ValueError, match=r"`loras\[1\]` has no adapter for 'params/blocks/attn/key"
    ):
        lj.multi.stack_adapters([a, c])
    with pytest.raises(
        ValueError, match=r"`loras\[1\]` has an adapter for .*which `loras\[0\]` lacks"
    ):
        lj.multi.stack_adapters([c, a])
    w = _query(c)
    other = lj.Layout("einsum", w.layout.in_axes, w.layout.out_axes, w.layout.stack_axes)
    d = jax.tree.map(lambda x: x, c, is_leaf=lambda x: isinstance(x, lj.LoraWeights))
    d["params"]["blocks"]["attn"]["query"] = {"kernel": w.replace(layout=other)}
    with pytest.raises(ValueError, match=r"`loras\[1\]`.*query/kernel.*layouts"):
        lj.multi.stack_adapters([c, d])
    with pytest.raises(ValueError, match="empty"):
        lj.multi.stack_adapters([])
    with pytest.raises(TypeError, match=r"`loras\[0\]` at .* stacks 1 adapters"):
        lj.multi.stack_adapters([lj.multi.stack_adapters([a])])


def test_stack_refuses_different_dropout_and_pissa_bases(tiny):
    [plain] = _adapters(tiny, [3])
    [dropped] = _adapters(tiny, [3], dropout=0.1)
    with pytest.raises(
        ValueError,
        match=r"`loras\[2\]` cannot be stacked with `loras\[0\]` at 'params/blocks/attn/key/"
        r"kernel': their dropout rates differ, 0.1 against 0.0",
    ):
        lj.multi.stack_adapters([plain, plain, dropped])
    _, variables, _, layouts = tiny
    pissa = [
        lj.split(
            variables,
            lj.LoraConfig(rank=r, targets=TARGETS, init="pissa"),
            key=jax.random.key(0),
            layouts=layouts,
        )[1]
        for r in (2, 3)
    ]
    same = lj.multi.stack_adapters([pissa[0], pissa[0]])  # one base: fine
    assert _query(same).residual_norm == _query(pissa[0]).residual_norm is not None
    with pytest.raises(ValueError, match=r"`loras\[1\]`.*their residual norms differ.*pissa"):
        lj.multi.stack_adapters([lj.multi.pad_rank(pissa[0], 3), pissa[1]])


# --- mixed batches ----------------------------------------------------------------------------


def _check_mixed(tiny, adapters, stacked):
    model, variables, _, _ = tiny
    ids = _batch(model)
    adapter_ids = jnp.array([2, -1, 0, 3, 1, -1])
    y = jax.jit(lj.multi.lora_apply_mixed(model.apply))(variables, stacked, adapter_ids, ids)
    base = jax.jit(model.apply)(variables, ids)
    apply = lj.lora_apply(model.apply)
    for e, k in enumerate(adapter_ids.tolist()):
        if k == -1:
            np.testing.assert_array_equal(y[e], base[e])
            _close(y[e : e + 1], model.apply(variables, ids[e : e + 1]), 1e-6)
            continue
        alone = apply(variables, adapters[k], ids[e : e + 1])
        assert np.abs(as_f64(alone) - as_f64(base[e : e + 1])).max() > 0.1
        _close(y[e : e + 1], alone, 1e-5)


def test_mixed_batch_equals_each_example_alone(tiny):
    """k = 4 adapters of ranks 4, 2, 4, 3 (padded to 4, each keeping its scale) on
    attention, MLP, scan, Einsum, Conv and tied Embed; -1 rows are the base bit for bit."""
    adapters = _adapters(tiny, [4, 2, 4, 3])
    stacked = lj.multi.stack_adapters([lj.multi.pad_rank(x, 4) for x in adapters])
    assert _query(stacked).scale == (2.0, 4.0, 2.0, 8.0 / 3)
    _check_mixed(tiny, adapters, stacked)


def test_mixed_batch_of_different_alphas_equals_each_alone(tiny):
    """Adapters of one rank and four alphas (rsLoRA) stack as they are, no rescaling."""
    adapters = _adapters(tiny, [4] * 4, alpha=[1.0, 6.0, 16.0, 3.0], rslora=True, seed=20)
    stacked = lj.multi.stack_adapters(adapters)
    assert _query(stacked).scale == (0.5, 3.0, 8.0, 1.5)
    _check_mixed(tiny, adapters, stacked)


def test_mixed_batch_never_retraces(tiny):
    model, variables, _, _ = tiny
    ids = _batch(model, 4)
    apply = lj.multi.lora_apply_mixed(model.apply)
    fwd = jax.jit(chex.assert_max_traces(lambda s, i: apply(variables, s, i, ids), n=1))
    for seed, adapter_ids in enumerate(([0, 1, 2, 3], [3, 3, -1, 0], [-1, -1, -1, -1])):
        stacked = lj.multi.stack_adapters(_adapters(tiny, [3] * 4, seed=10 * seed))
        fwd(stacked, jnp.array(adapter_ids))


def test_mixed_batch_gradients_reach_each_adapter(mlp):
    """d(loss)/d(adapter j) over a mixed batch = the gradient over j's examples alone."""
    model, variables, x = mlp  # x: (3, 8)
    configs = [lj.LoraConfig(rank=2, alpha=a, targets=".*/kernel") for a in (2.0, 5.0)]
    loras = [
        perturb(lj.split(variables, c, key=jax.random.key(i))[1], jax.random.key(9 + i))
        for i, c in enumerate(configs)
    ]
    adapter_ids = jnp.array([1, -1, 0])
    mixed = lj.multi.lora_apply_mixed(model.apply)
    loss = lambda s: jnp.sum(mixed(variables, s, adapter_ids, x) ** 2)
    grads = jax.grad(loss)(lj.multi.stack_adapters(loras))
    apply = lj.lora_apply(model.apply)
    for j, e in ((0, 2), (1, 0)):
        alone = lambda lo, xe=x[e : e + 1]: jnp.sum(apply(variables, lo, xe) ** 2)
        want = jax.grad(alone)(loras[j])
        got = lj.multi.unstack_adapter(grads, j)
        for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            _close(g, w)


def test_mixed_batch_bad_ids(tiny):
    model, variables, _, _ = tiny
    ids = _batch(model, 3)
    stacked = lj.multi.stack_adapters(_adapters(tiny, [3, 3]))
    apply = lj.multi.lora_apply_mixed(model.apply)
    with pytest.raises(ValueError, match=r"adapter_ids\[1\] is 2.*holds 2 adapters.*0\.\.1"):
        apply(variables, stacked, jnp.array([0, 2, 1]), ids)
    with pytest.raises(ValueError, match=r"adapter_ids\[2\] is -2"):
        apply(variables, stacked, np.array([0, 1, -2]), ids)
    with pytest.raises(TypeError, match="1-D integer array"):
        apply(variables, stacked, jnp.array([0.0, 1.0, 1.0]), ids)
    with pytest.raises(ValueError, match=r"params/embed/embedding.*shape \(3, 6\).*2 examples"):
        apply(variables, stacked, jnp.array([0, 1]), ids)
    # Under jit the ids cannot be read: an out-of-range example gets NaN, the others not.
    y = jax.jit(apply)(variables, stacked, jnp.array([0, 5, -1]), ids)
    assert np.isnan(y[1]).all() and np.isfinite(y[0]).all() and np.isfinite(y[2]).all()


def test_mixed_batch_refuses_what_it_cannot_compute(tiny):
    model, variables, _, layouts = tiny
    ids = _batch(model, 2)
    config = lj.LoraConfig(rank=2, targets=[*TARGETS, ".*/gate"])
    _, lora = lj.split(variables, config, key=jax.random.key(0), layouts=layouts)
    apply = lj.multi.lora_apply_mixed(model.apply)
    with pytest.raises(ValueError, match=r"stack_adapters"):
        apply(variables, lora, jnp.array([0, 0]), ids)
    dense = nn.DenseGeneral(3, axis=0)  # contracts the example axis
    x = jnp.ones((4, 5))
    v = dense.init(jax.random.key(0), x)
    c = lj.LoraConfig(rank=1, targets=".*/kernel")
    stacked = lj.multi.stack_adapters([lj.split(v, c, key=jax.random.key(1))[1]])
    with pytest.raises(ValueError, match=r"params/kernel.*example axis first \(and not contracted"):
        lj.multi.lora_apply_mixed(dense.apply)(v, stacked, jnp.zeros(4, int), x)


def test_mixed_batch_serves_raw_params_through_the_rewrite(tiny):
    """`params/gate` is a raw ``self.param`` (``x @ gate``): no Flax layer sees it, so the
    contraction rewrite adds each example's own term; equal to running each alone."""
    model, variables, _, layouts = tiny
    ids = _batch(model, 3)
    config = lj.LoraConfig(rank=2, targets=[*TARGETS, ".*/gate"])
    loras = [
        perturb(lj.split(variables, config, key=jax.random.key(i), layouts=layouts)[1], key)
        for i, key in enumerate(jax.random.split(jax.random.key(7), 2))
    ]
    frozen = lj.split(variables, config, key=jax.random.key(0), layouts=layouts)[0]
    stacked = lj.multi.stack_adapters(loras)
    mixed = lj.multi.lora_apply_mixed(model.apply)(frozen, stacked, jnp.array([1, -1, 0]), ids)
    alone = [
        lj.lora_apply(model.apply)(frozen, loras[1], ids[:1]),
        model.apply(frozen, ids[1:2]),
        lj.lora_apply(model.apply)(frozen, loras[0], ids[2:]),
    ]
    np.testing.assert_allclose(mixed, jnp.concatenate(alone), atol=1e-5)


def test_mixed_batch_refuses_a_use_that_is_not_a_contraction():
    params = {"w": jnp.ones((4, 3))}
    fn = lambda p, x: x @ p["w"] + p["w"].sum()
    lora = lj.split(params, lj.LoraConfig(rank=1, targets="w"), key=jax.random.key(0))[1]
    stacked = lj.multi.stack_adapters([lora, lora])
    with pytest.raises(ValueError, match=r"w: a mixed batch needs every use .* factored"):
        lj.multi.lora_apply_mixed(fn)(params, stacked, jnp.array([0, 1]), jnp.ones((2, 4)))


# --- combine and merge several ----------------------------------------------------------------

STACKED = lj.Layout("dense", in_axes=(1,), out_axes=(2,), stack_axes=(0,))
# alpha / rank, alpha / sqrt(rank) (rsLoRA), alpha / rank: what `split` must give each adapter.
SCALES = [4.0 / 2, 3.0 / math.sqrt(3), 8.0 / 2]


@pytest.fixture(scope="module")
def toy():
    """Three adapters (ranks 2, 3, 2; alphas 4, 3 with rsLoRA, 8) on two matrices and a
    stacked (scanned-like) kernel; the third adapts `fc` only."""
    keys = jax.random.split(jax.random.key(0), 3)
    params = {
        "params": {
            "fc": {"kernel": jax.random.normal(keys[0], (8, 6))},
            "proj": {"kernel": jax.random.normal(keys[1], (6, 5))},
            "stack": {"kernel": jax.random.normal(keys[2], (3, 8, 6))},
        }
    }
    layouts = {"params/stack/kernel": STACKED}
    configs = [
        lj.LoraConfig(rank=2, alpha=4.0, targets=".*/kernel"),
        lj.LoraConfig(rank=3, alpha=3.0, targets=".*/kernel", use_rslora=True),
        lj.LoraConfig(rank=2, alpha=8.0, targets=".*/fc/kernel"),
    ]
    loras = []
    for i, config in enumerate(configs):
        _, lora = lj.split(params, config, key=jax.random.key(i), layouts=layouts)
        loras.append(perturb(lora, jax.random.key(10 + i), 0.3))
    return params, loras


def _dense_sum(loras, scales, weights, path):
    """NumPy float64: Σ w_i·s_i·a_i@b_i over the adapters that have `path`."""
    total = 0.0
    for lora, scale, weight in zip(loras, scales, weights, strict=True):
        flat = _flat(lora)
        if path in flat:
            w = flat[path]
            total = total + weight * scale * (as_f64(w.a) @ as_f64(w.b))
    return total


def _flat(lora):
    leaves = jax.tree_util.tree_flatten_with_path(
        lora, is_leaf=lambda x: isinstance(x, lj.LoraWeights)
    )[0]
    return {"/".join(k.key for k in kp): w for kp, w in leaves}


PATHS = ("params/fc/kernel", "params/proj/kernel", "params/stack/kernel")
WEIGHTS = [1.0, -0.5, 2.0]


def _merged_delta(params, lora, path):
    merged = _flat_params(lj.merge(params, lora))
    return as_f64(merged[path]) - as_f64(_flat_params(params)[path])


def _flat_params(tree):
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(k.key for k in kp): x for kp, x in leaves}


def test_adapters_of_different_alphas_combine_with_their_own_scales(toy):
    """cat over three adapters whose scales differ (2, √3, 4) is the NumPy sum of
    w_i·s_i·a_i@b_i with each s_i from its own alpha; the result carries scale 1.0."""
    params, loras = toy
    for lora, scale in zip(loras, SCALES, strict=True):
        assert all(w.scale == pytest.approx(scale) for w in _flat(lora).values())
    lora = lj.multi.combine_adapters(loras, WEIGHTS)  # "cat" by default
    flat = _flat(lora)
    assert [flat[p].rank for p in PATHS] == [7, 5, 5]
    assert all(w.scale == 1.0 for w in flat.values())
    for path in PATHS:
        _close(_merged_delta(params, lora, path), _dense_sum(loras, SCALES, WEIGHTS, path))


@pytest.mark.parametrize("rank", [None, 4])
def test_svd_is_the_truncated_svd_of_the_sum(toy, rank):
    params, loras = toy
    lora = lj.multi.combine_adapters(loras, WEIGHTS, combination_type="svd", rank=rank)
    for path in PATHS:
        want = _dense_sum(loras, SCALES, WEIGHTS, path)
        u, s, vh = np.linalg.svd(want, full_matrices=False)  # per stacked slice for `stack`
        r = rank or 3
        truncated = (u[..., :r] * s[..., None, :r]) @ vh[..., :r, :]
        assert _flat(lora)[path].rank == r and _flat(lora)[path].scale == 1.0
        _close(_merged_delta(params, lora, path), truncated, 1e-5)


def test_svd_at_full_rank_is_exact(toy):
    params, loras = toy
    lora = lj.multi.combine_adapters(loras[:2], [1.0, 1.0], combination_type="svd", rank=5)
    for path in PATHS:
        _close(
            _merged_delta(params, lora, path),
            _dense_sum(loras[:2], SCALES[:2], [1.0, 1.0], path),
        )


def test_linear_follows_peft_formula(toy):
    params, loras = toy
    pair, pair_scales, weights = [loras[0], loras[2]], [SCALES[0], SCALES[2]], [0.7, -1.5]
    lora = lj.multi.combine_adapters(pair, weights, combination_type="linear")
    for path in PATHS:
        present = [
            (_flat(x)[path], s, w)
            for x, s, w in zip(pair, pair_scales, weights, strict=True)
            if path in _flat(x)
        ]
        cs = [w * s for _, s, w in present]
        a = sum(
            np.sign(c) * np.sqrt(abs(c)) * as_f64(f.a)
            for (f, _, _), c in zip(present, cs, strict=True)
        )
        b = sum(np.sqrt(abs(c)) * as_f64(f.b) for (f, _, _), c in zip(present, cs, strict=True))
        _close(_merged_delta(params, lora, path), a @ b)
    # One adapter: linear is exact.
    one = lj.multi.combine_adapters([loras[0]], [0.5], combination_type="linear")
    for path in PATHS:
        _close(_merged_delta(params, one, path), _dense_sum([loras[0]], SCALES[:1], [0.5], path))


def test_combine_errors(toy):
    params, loras = toy
    with pytest.raises(ValueError, match=r"`weights` has 2 entries but there are 3 adapters"):
        lj.multi.combine_adapters(loras, [1.0, 1.0])
    with pytest.raises(ValueError, match=r"`loras` is empty"):
        lj.multi.combine_adapters([], [])
    with pytest.raises(
        ValueError, match=r"params/fc/kernel: `linear` needs one rank.*`loras\[1\]` has rank 3"
    ):
        lj.multi.combine_adapters(loras, WEIGHTS, combination_type="linear")
    with pytest.raises(ValueError, match=r"params/proj/kernel: svd rank 6 must be in 1\.\.5"):
        lj.multi.combine_adapters(loras, WEIGHTS, combination_type="svd", rank=6)
    with pytest.raises(ValueError, match=r"params/fc/kernel: svd rank 4 must be in 1\.\.2.*sum"):
        lj.multi.combine_adapters([loras[0]], [1.0], combination_type="svd", rank=4)
    with pytest.raises(ValueError, match="`combination_type` must be one of"):
        lj.multi.combine_adapters(loras, WEIGHTS, combination_type="ties")
    with pytest.raises(ValueError, match="`rank` applies to 'svd' only"):
        lj.multi.combine_adapters(loras, WEIGHTS, combination_type="cat", rank=2)
    with pytest.raises(TypeError, match="`rank` must be an int or None"):
        lj.multi.combine_adapters(loras, WEIGHTS, combination_type="svd", rank=2.0)
    with pytest.raises(TypeError, match=r"`weights\[1\]` must be a finite number"):
        lj.multi.combine_adapters(loras, [1.0, float("nan"), 1.0])
    with pytest.raises(TypeError, match=r"`loras\[1\]` at 'params/fc/kernel' stacks 2 adapters"):
        lj.multi.combine_adapters([loras[0], lj.multi.stack_adapters(loras[:1] * 2)], [1.0, 1.0])
    w = _flat(loras[1])["params/fc/kernel"]
    bad = {"params": {"fc": {"kernel": w.replace(a=w.a[:4])}}}
    with pytest.raises(
        ValueError, match=r"`loras\[1\]` and `loras\[0\]` disagree at 'params/fc/kernel'"
    ):
        lj.multi.combine_adapters([loras[0], bad], [1.0, 1.0])
    config = lj.LoraConfig(rank=2, targets=".*/fc/kernel", init="pissa")
    _, pissa = lj.split(params, config, key=jax.random.key(0))
    with pytest.raises(
        ValueError, match=r"`loras\[1\]` and `loras\[0\]` need different bases at 'params/fc/"
    ):
        lj.multi.combine_adapters([loras[0], pissa], [1.0, 1.0])
    kept = lj.multi.combine_adapters([pissa, pissa], [0.5, 0.5], combination_type="svd")
    assert (
        _flat(kept)["params/fc/kernel"].residual_norm
        == _flat(pissa)["params/fc/kernel"].residual_norm
    )


def test_merge_many_is_the_sum_of_single_merges(toy):
    params, loras = toy
    merged = _flat_params(lj.multi.merge_many(params, loras, WEIGHTS))
    base = _flat_params(params)
    for path in PATHS:
        singles = sum(
            w * _merged_delta(params, lora, path) for lora, w in zip(loras, WEIGHTS, strict=True)
        )
        _close(as_f64(merged[path]) - as_f64(base[path]), singles)
        _close(as_f64(merged[path]) - as_f64(base[path]), _dense_sum(loras, SCALES, WEIGHTS, path))
    plain = _flat_params(lj.multi.merge_many(params, loras))
    for path in PATHS:
        _close(
            as_f64(plain[path]) - as_f64(base[path]),
            sum(_merged_delta(params, x, path) for x in loras),
        )
    back = lj.multi.unmerge_many(lj.multi.merge_many(params, loras, WEIGHTS), loras, WEIGHTS)
    for got, want in zip(jax.tree.leaves(back), jax.tree.leaves(params), strict=True):
        _close(got, want, 1e-6)


def test_merge_many_errors(toy):
    params, loras = toy
    with pytest.raises(ValueError, match=r"`weights` has 1 entries but there are 3 adapters"):
        lj.multi.merge_many(params, loras, [1.0])
    small = {"params": {"fc": {"kernel": jnp.ones((4, 6))}}}
    with pytest.raises(ValueError, match=r"`loras\[0\]`: params/fc/kernel: adapter shapes"):
        lj.multi.merge_many(small, loras[2:])
    with pytest.raises(TypeError, match=r"`loras\[0\]` at .* stacks 2 adapters"):
        lj.multi.merge_many(params, [lj.multi.stack_adapters(loras[:1] * 2)])


def test_merge_many_of_pissa_adapters_round_trips(toy):
    """A PiSSA adapter checks its residual base on merge_many, not on unmerge_many."""
    params, _ = toy
    config = lj.LoraConfig(rank=2, targets=".*/fc/kernel", init="pissa")
    frozen, pissa = lj.split(params, config, key=jax.random.key(0))
    merged = lj.multi.merge_many(frozen, [pissa])
    _close(_flat_params(merged)["params/fc/kernel"], _flat_params(params)["params/fc/kernel"])
    back = lj.multi.unmerge_many(merged, [pissa])
    for got, want in zip(jax.tree.leaves(back), jax.tree.leaves(frozen), strict=True):
        _close(got, want, 1e-6)
    with pytest.raises(ValueError, match=r"`loras\[0\]`: params/fc/kernel: .*init='pissa'"):
        lj.multi.merge_many(params, [pissa])


@pytest.mark.slow
@pytest.mark.parametrize("combination_type", lj.multi.COMBINATIONS)
def test_combinations_match_peft_add_weighted_adapter(toy, combination_type):
    """The same two adapters combined by PEFT on PyTorch give the same update."""
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    _, loras = toy
    pair, alphas, weights = [loras[0], loras[2]], [4.0, 8.0], [0.7, -1.5]
    ours = lj.multi.combine_adapters(pair, weights, combination_type=combination_type)
    net = torch.nn.Sequential()
    net.add_module("fc", torch.nn.Linear(8, 6, bias=False))
    hf = lambda alpha: peft.LoraConfig(
        r=2, lora_alpha=alpha, target_modules=["fc"], init_lora_weights=False
    )
    model = peft.get_peft_model(net, hf(alphas[0]), adapter_name="a0")
    model.add_adapter("a1", hf(alphas[1]))
    layer = model.base_model.model.fc
    for name, lora in zip(("a0", "a1"), pair, strict=True):
        w = lora["params"]["fc"]["kernel"]
        layer.lora_A[name].weight.data = torch.tensor(np.array(w.a).T.copy())
        layer.lora_B[name].weight.data = torch.tensor(np.array(w.b).T.copy())
    model.add_weighted_adapter(["a0", "a1"], weights, "mix", combination_type=combination_type)
    theirs = layer.get_delta_weight("mix").detach().numpy().T  # (in, out), scale included
    w = ours["params"]["fc"]["kernel"]
    mine = w.scale * (as_f64(w.a) @ as_f64(w.b))
    _close(mine, theirs, 1e-5)
    assert layer.r["mix"] == w.rank and layer.scaling["mix"] == 1.0 == w.scale


@pytest.mark.slow
def test_benchmark_serving_table_swaps_without_recompiling():
    from train import benchmark

    table = benchmark.main(["--preset", "tiny", "--rounds", "1", "--part", "serving"])
    for name in ("base (no adapter)", "one adapter (swapped every call)", "mixed batch of 4"):
        assert re.search(rf"\| forward, {re.escape(name)}.*\| 1 / 3 \|$", table, re.M), table


@pytest.mark.parametrize("alpha", [2.0, 16.0])
def test_olora_is_peft_olora_init(alpha):
    """OLoRA as PEFT's `olora_init`: the (out, in) weight's QR, A = R[:r], B = Q[:, :r]
    (not divided by the scale), base = W - s·B@A (float64 NumPy reference; the products are
    compared, which do not depend on QR's signs). The model starts exactly at the base,
    on a 2-D kernel and on a scanned (3-D) one, per layer."""
    rank = 3
    for shape, layouts in (((12, 7), None), ((2, 12, 7), {"w": STACKED})):
        w = np.asarray(jax.random.normal(jax.random.key(0), shape), np.float64)
        config = lj.LoraConfig(rank=rank, alpha=alpha, targets="w", init="olora")
        frozen, lora = lj.split(
            {"w": jnp.asarray(w, jnp.float32)}, config, key=jax.random.key(1), layouts=layouts
        )
        a, b, s = (
            np.asarray(lora["w"].a, np.float64),
            np.asarray(lora["w"].b, np.float64),
            alpha / rank,
        )
        for i, wi in enumerate(w.reshape(-1, 12, 7)):
            q, r = np.linalg.qr(wi.T)
            ba = q[:, :rank] @ r[:rank]  # PEFT's B @ A, (out, in)
            ai, bi = a.reshape(-1, 12, rank)[i], b.reshape(-1, rank, 7)[i]
            np.testing.assert_allclose(bi.T @ ai.T, ba, atol=1e-5)
            resid = np.asarray(frozen["w"], np.float64).reshape(-1, 12, 7)[i]
            np.testing.assert_allclose(resid, wi - s * ba.T, atol=1e-5)
        merged = np.asarray(lj.merge(frozen, lora)["w"], np.float64)
        np.testing.assert_allclose(merged, w, atol=1e-5)  # starts exactly at the base
        assert lora["w"].residual_norm is not None  # the original weights are refused
