"""Many adapters on one base: swap without retracing, pad, stack, mixed batches, combine."""

from __future__ import annotations

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


def _adapters(tiny, ranks, alpha=8.0, seed=0):
    """One (config, trained-looking adapter) per rank, on the Tiny model."""
    _, variables, _, layouts = tiny
    out = []
    for i, rank in enumerate(ranks):
        config = lj.LoraConfig(rank=rank, alpha=alpha, targets=TARGETS)
        _, lora = lj.split(variables, config, key=jax.random.key(seed + i), layouts=layouts)
        out.append((config, perturb(lora, jax.random.key(100 + seed + i), 0.2)))
    return out


def _batch(model, n=6):
    return jax.random.randint(jax.random.key(7), (n, 6), 0, model.vocab)


def _close(got, want, tol=1e-5):
    want = as_f64(want)
    np.testing.assert_allclose(as_f64(got), want, rtol=0, atol=tol * (1.0 + np.abs(want).max()))


# --- swap and pad -------------------------------------------------------------------------


def test_swapping_adapters_and_padded_ranks_never_retrace(tiny):
    model, variables, _, _ = tiny
    ids = _batch(model)
    (config, a0), (_, a1), (_, a2), (small_config, small) = _adapters(tiny, [4, 4, 4, 2])
    apply = lj.lora_apply(model.apply, config)
    fwd = jax.jit(chex.assert_max_traces(lambda lora: apply(variables, lora, ids), n=1))
    padded = lj.pad_rank(small, 4, small_config, to_config=config)
    outs = [fwd(lora) for lora in (a0, a1, a2, padded, a0)]
    np.testing.assert_array_equal(outs[0], outs[4])
    assert not np.allclose(outs[0], outs[1])


@pytest.mark.parametrize(
    ("rank", "new_rank", "alpha", "rslora", "bitwise"),
    [(4, 8, 8.0, False, True), (3, 8, 6.0, False, False), (2, 8, 8.0, True, True),
     (3, 5, 8.0, True, False)],
)  # fmt: skip
def test_pad_rank_keeps_outputs_and_merge(tiny, rank, new_rank, alpha, rslora, bitwise):
    """Exact in arithmetic; bit for bit when b's rescale factor is a power of two."""
    model, variables, _, layouts = tiny
    ids = _batch(model)
    config = lj.LoraConfig(rank=rank, alpha=alpha, targets=TARGETS, use_rslora=rslora)
    _, lora = lj.split(variables, config, key=jax.random.key(0), layouts=layouts)
    lora = perturb(lora, jax.random.key(1), 0.2)
    padded = lj.pad_rank(lora, new_rank, config)
    w = padded["params"]["blocks"]["attn"]["query"]["kernel"]
    assert w.rank == new_rank and not np.asarray(w.a[..., rank:]).any()
    assert not np.asarray(w.b[:, rank:]).any()  # (layers, rank, heads, head_dim)
    apply = jax.jit(lj.lora_apply(model.apply, config))
    want, got = apply(variables, lora, ids), apply(variables, padded, ids)
    if bitwise:
        np.testing.assert_array_equal(got, want)
    _close(got, want, 1e-6)
    merged = lj.merge(variables, padded, config)
    for g, m in zip(
        jax.tree.leaves(merged), jax.tree.leaves(lj.merge(variables, lora, config)), strict=True
    ):
        _close(g, m, 1e-6)


def test_pad_rank_onto_another_alpha(tiny):
    model, variables, _, _ = tiny
    ids = _batch(model)
    [(config, lora)] = _adapters(tiny, [2], alpha=3.0)
    shared = lj.LoraConfig(rank=8, alpha=16.0, targets=TARGETS)
    padded = lj.pad_rank(lora, 8, config, to_config=shared)
    want = lj.lora_apply(model.apply, config)(variables, lora, ids)
    _close(lj.lora_apply(model.apply, shared)(variables, padded, ids), want, 1e-6)


def test_pad_rank_errors(tiny):
    [(config, lora)] = _adapters(tiny, [4])
    with pytest.raises(
        ValueError, match=r"params/blocks/attn/key/kernel: cannot pad to rank 2.*rank 4"
    ):
        lj.pad_rank(lora, 2, config)
    with pytest.raises(TypeError, match="`rank` must be an int"):
        lj.pad_rank(lora, 4.0, config)


# --- stack and mixed batches ----------------------------------------------------------------


def test_stack_puts_the_adapter_axis_after_the_layer_axis(tiny):
    loras = [lora for _, lora in _adapters(tiny, [3, 3])]
    stacked = lj.stack_adapters(loras)
    q = stacked["params"]["blocks"]["attn"]["query"]["kernel"]  # scanned: (layers, ...)
    assert q.a.shape == (2, 2, 16, 3) and q.b.shape == (2, 2, 3, 2, 8)
    np.testing.assert_array_equal(
        q.a[:, 1], loras[1]["params"]["blocks"]["attn"]["query"]["kernel"].a
    )
    embed = stacked["params"]["embed"]["embedding"]
    assert (
        embed.a.shape == (2, 32, 3)
        and embed.layout == loras[0]["params"]["embed"]["embedding"].layout
    )


def test_mixed_batch_equals_each_example_alone(tiny):
    """k = 4 adapters of ranks 4, 2, 4, 3 (padded to 4) on attention, MLP, scan, Einsum,
    Conv and tied Embed; -1 rows are the base bit for bit."""
    model, variables, _, _ = tiny
    ids = _batch(model)
    adapters = _adapters(tiny, [4, 2, 4, 3])
    shared = adapters[0][0]
    stacked = lj.stack_adapters([lj.pad_rank(x, 4, c, to_config=shared) for c, x in adapters])
    adapter_ids = jnp.array([2, -1, 0, 3, 1, -1])
    mixed = jax.jit(lj.lora_apply_mixed(model.apply, shared))
    y = mixed(variables, stacked, adapter_ids, ids)
    base = jax.jit(model.apply)(variables, ids)
    for e, k in enumerate(adapter_ids.tolist()):
        if k == -1:
            np.testing.assert_array_equal(y[e], base[e])
            _close(y[e : e + 1], model.apply(variables, ids[e : e + 1]), 1e-6)
            continue
        config, lora = adapters[k]
        alone = lj.lora_apply(model.apply, config)(variables, lora, ids[e : e + 1])
        assert np.abs(as_f64(alone) - as_f64(base[e : e + 1])).max() > 0.1
        _close(y[e : e + 1], alone, 1e-5)


def test_mixed_batch_never_retraces(tiny):
    model, variables, _, _ = tiny
    ids = _batch(model, 4)
    config = _adapters(tiny, [3])[0][0]
    apply = lj.lora_apply_mixed(model.apply, config)
    fwd = jax.jit(chex.assert_max_traces(lambda s, i: apply(variables, s, i, ids), n=1))
    for seed, adapter_ids in enumerate(([0, 1, 2, 3], [3, 3, -1, 0], [-1, -1, -1, -1])):
        stacked = lj.stack_adapters([x for _, x in _adapters(tiny, [3] * 4, seed=10 * seed)])
        fwd(stacked, jnp.array(adapter_ids))


def test_mixed_batch_gradients_reach_each_adapter(mlp):
    """d(loss)/d(adapter j) over a mixed batch = the gradient over j's examples alone."""
    model, variables, x = mlp  # x: (3, 8)
    config = lj.LoraConfig(rank=2, targets=".*/kernel")
    loras = [
        perturb(lj.split(variables, config, key=jax.random.key(i))[1], jax.random.key(9 + i))
        for i in range(2)
    ]
    adapter_ids = jnp.array([1, -1, 0])
    mixed = lj.lora_apply_mixed(model.apply, config)
    loss = lambda s: jnp.sum(mixed(variables, s, adapter_ids, x) ** 2)
    grads = jax.grad(loss)(lj.stack_adapters(loras))
    apply = lj.lora_apply(model.apply, config)
    for j, e in ((0, 2), (1, 0)):
        alone = lambda lo, xe=x[e : e + 1]: jnp.sum(apply(variables, lo, xe) ** 2)
        want = jax.grad(alone)(loras[j])
        got = jax.tree.map(lambda g, j=j: g[j], grads)
        for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            _close(g, w)


def test_mixed_batch_bad_ids(tiny):
    model, variables, _, _ = tiny
    ids = _batch(model, 3)
    config = _adapters(tiny, [3])[0][0]
    stacked = lj.stack_adapters([x for _, x in _adapters(tiny, [3, 3])])
    apply = lj.lora_apply_mixed(model.apply, config)
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
    apply = lj.lora_apply_mixed(model.apply, config)
    with pytest.raises(ValueError, match=r"no supported Flax layer.*params/gate"):
        apply(variables, lj.stack_adapters([lora]), jnp.array([0, 0]), ids)
    with pytest.raises(ValueError, match=r"lj.stack_adapters"):
        apply(variables, lora, jnp.array([0, 0]), ids)
    dense = nn.DenseGeneral(3, axis=0)  # contracts the example axis
    x = jnp.ones((4, 5))
    v = dense.init(jax.random.key(0), x)
    c = lj.LoraConfig(rank=1, targets=".*/kernel")
    stacked = lj.stack_adapters([lj.split(v, c, key=jax.random.key(1))[1]])
    with pytest.raises(ValueError, match=r"params/kernel.*example axis first \(and not contracted"):
        lj.lora_apply_mixed(dense.apply, c)(v, stacked, jnp.zeros(4, int), x)


def test_stack_errors_name_the_adapter_and_path(tiny):
    _, variables, _, layouts = tiny
    (_, a), (_, b) = _adapters(tiny, [3, 2])
    with pytest.raises(
        ValueError, match=r"`loras\[1\]`.*'params/blocks/attn/key/kernel'.*pad_rank"
    ):
        lj.stack_adapters([a, b])
    qv = lj.LoraConfig(rank=3, targets=r".*/(query|value)/kernel")
    _, c = lj.split(variables, qv, key=jax.random.key(0), layouts=layouts)
    with pytest.raises(
        ValueError, match=r"`loras\[1\]` has no adapter for 'params/blocks/attn/key"
    ):
        lj.stack_adapters([a, c])
    with pytest.raises(
        ValueError, match=r"`loras\[1\]` has an adapter for .*which `loras\[0\]` lacks"
    ):
        lj.stack_adapters([c, a])
    w = c["params"]["blocks"]["attn"]["query"]["kernel"]
    other = lj.Layout("einsum", w.layout.in_axes, w.layout.out_axes, w.layout.stack_axes)
    d = jax.tree.map(lambda x: x, c, is_leaf=lambda x: isinstance(x, lj.LoraWeights))
    d["params"]["blocks"]["attn"]["query"] = {"kernel": lj.LoraWeights(w.a, w.b, other)}
    with pytest.raises(ValueError, match=r"`loras\[1\]`.*query/kernel.*layouts"):
        lj.stack_adapters([c, d])
    with pytest.raises(ValueError, match="empty"):
        lj.stack_adapters([])


# --- combine and merge several ----------------------------------------------------------------

STACKED = lj.Layout("dense", in_axes=(1,), out_axes=(2,), stack_axes=(0,))


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
    return params, loras, configs


def _dense_sum(loras, configs, weights, path):
    """NumPy float64: Σ w_i·s_i·a_i@b_i over the adapters that have `path`."""
    total = 0.0
    for lora, config, weight in zip(loras, configs, weights, strict=True):
        flat = _flat(lora)
        if path in flat:
            w = flat[path]
            total = total + weight * config.scale_for(path, w.rank) * (as_f64(w.a) @ as_f64(w.b))
    return total


def _flat(lora):
    leaves = jax.tree_util.tree_flatten_with_path(
        lora, is_leaf=lambda x: isinstance(x, lj.LoraWeights)
    )[0]
    return {"/".join(k.key for k in kp): w for kp, w in leaves}


PATHS = ("params/fc/kernel", "params/proj/kernel", "params/stack/kernel")
WEIGHTS = [1.0, -0.5, 2.0]


def _merged_delta(params, lora, config, path):
    merged = _flat_params(lj.merge(params, lora, config))
    return as_f64(merged[path]) - as_f64(_flat_params(params)[path])


def _flat_params(tree):
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(k.key for k in kp): x for kp, x in leaves}


def test_cat_is_the_exact_weighted_sum(toy):
    params, loras, configs = toy
    lora, config = lj.combine_adapters(loras, configs, WEIGHTS, combination_type="cat")
    flat = _flat(lora)
    assert [flat[p].rank for p in PATHS] == [7, 5, 5]
    for path in PATHS:
        assert config.scale_for(path, flat[path].rank) == 1.0
        assert config.rank_for(path) == flat[path].rank
        _close(_merged_delta(params, lora, config, path), _dense_sum(loras, configs, WEIGHTS, path))
    assert lj.select_targets(params, config, {"params/stack/kernel": STACKED}).keys() == set(PATHS)


@pytest.mark.parametrize("rank", [None, 4])
def test_svd_is_the_truncated_svd_of_the_sum(toy, rank):
    params, loras, configs = toy
    lora, config = lj.combine_adapters(loras, configs, WEIGHTS, combination_type="svd", rank=rank)
    for path in PATHS:
        want = _dense_sum(loras, configs, WEIGHTS, path)
        u, s, vh = np.linalg.svd(want, full_matrices=False)  # per stacked slice for `stack`
        r = rank or 3
        truncated = (u[..., :r] * s[..., None, :r]) @ vh[..., :r, :]
        assert _flat(lora)[path].rank == r
        _close(_merged_delta(params, lora, config, path), truncated, 1e-5)


def test_svd_at_full_rank_is_exact(toy):
    params, loras, configs = toy
    lora, config = lj.combine_adapters(
        loras[:2], configs[:2], [1.0, 1.0], combination_type="svd", rank=5
    )
    for path in PATHS:
        _close(
            _merged_delta(params, lora, config, path),
            _dense_sum(loras[:2], configs[:2], [1.0, 1.0], path),
        )


def test_linear_follows_peft_formula(toy):
    params, loras, configs = toy
    pair, pair_configs, weights = [loras[0], loras[2]], [configs[0], configs[2]], [0.7, -1.5]
    lora, config = lj.combine_adapters(pair, pair_configs, weights, combination_type="linear")
    for path in PATHS:
        present = [
            (_flat(x)[path], c, w)
            for x, c, w in zip(pair, pair_configs, weights, strict=True)
            if path in _flat(x)
        ]
        cs = [w * c.scale_for(path, f.rank) for f, c, w in present]
        a = sum(
            np.sign(c) * np.sqrt(abs(c)) * as_f64(f.a)
            for (f, _, _), c in zip(present, cs, strict=True)
        )
        b = sum(np.sqrt(abs(c)) * as_f64(f.b) for (f, _, _), c in zip(present, cs, strict=True))
        _close(_merged_delta(params, lora, config, path), a @ b)
    # One adapter: linear is exact.
    one, one_config = lj.combine_adapters([loras[0]], configs[0], [0.5], combination_type="linear")
    for path in PATHS:
        _close(
            _merged_delta(params, one, one_config, path),
            _dense_sum([loras[0]], [configs[0]], [0.5], path),
        )


def test_combine_errors(toy):
    _, loras, configs = toy
    with pytest.raises(ValueError, match=r"`weights` has 2 entries but there are 3 adapters"):
        lj.combine_adapters(loras, configs, [1.0, 1.0], combination_type="cat")
    with pytest.raises(ValueError, match=r"`configs` has 2 entries but there are 3 adapters"):
        lj.combine_adapters(loras, configs[:2], WEIGHTS, combination_type="cat")
    with pytest.raises(
        ValueError, match=r"params/fc/kernel: `linear` needs one rank.*`loras\[1\]` has rank 3"
    ):
        lj.combine_adapters(loras, configs, WEIGHTS, combination_type="linear")
    with pytest.raises(ValueError, match=r"params/proj/kernel: svd rank 6 must be in 1\.\.5"):
        lj.combine_adapters(loras, configs, WEIGHTS, combination_type="svd", rank=6)
    with pytest.raises(ValueError, match=r"params/fc/kernel: svd rank 4 must be in 1\.\.2.*sum"):
        lj.combine_adapters([loras[0]], configs[0], [1.0], combination_type="svd", rank=4)
    with pytest.raises(ValueError, match="`combination_type` must be one of"):
        lj.combine_adapters(loras, configs, WEIGHTS, combination_type="ties")
    with pytest.raises(ValueError, match="`rank` applies to 'svd' only"):
        lj.combine_adapters(loras, configs, WEIGHTS, combination_type="cat", rank=2)
    with pytest.raises(TypeError, match=r"`weights\[1\]` must be a finite number"):
        lj.combine_adapters(loras, configs, [1.0, float("nan"), 1.0], combination_type="cat")
    w = _flat(loras[1])["params/fc/kernel"]
    bad = {"params": {"fc": {"kernel": lj.LoraWeights(w.a[:4], w.b, w.layout)}}}
    with pytest.raises(
        ValueError, match=r"`loras\[1\]` and `loras\[0\]` disagree at 'params/fc/kernel'"
    ):
        lj.combine_adapters([loras[0], bad], configs[:2], [1.0, 1.0], combination_type="cat")


def test_merge_many_is_the_sum_of_single_merges(toy):
    params, loras, configs = toy
    merged = _flat_params(lj.merge_many(params, loras, configs, WEIGHTS))
    base = _flat_params(params)
    for path in PATHS:
        singles = sum(
            w * _merged_delta(params, lora, config, path)
            for lora, config, w in zip(loras, configs, WEIGHTS, strict=True)
        )
        _close(as_f64(merged[path]) - as_f64(base[path]), singles)
    plain = _flat_params(lj.merge_many(params, loras, configs))
    for path in PATHS:
        _close(
            as_f64(plain[path]) - as_f64(base[path]),
            sum(_merged_delta(params, x, c, path) for x, c in zip(loras, configs, strict=True)),
        )
    back = lj.unmerge_many(lj.merge_many(params, loras, configs, WEIGHTS), loras, configs, WEIGHTS)
    for got, want in zip(jax.tree.leaves(back), jax.tree.leaves(params), strict=True):
        _close(got, want, 1e-6)


def test_merge_many_errors(toy):
    params, loras, configs = toy
    with pytest.raises(ValueError, match=r"`weights` has 1 entries but there are 3 adapters"):
        lj.merge_many(params, loras, configs, [1.0])
    small = {"params": {"fc": {"kernel": jnp.ones((4, 6))}}}
    with pytest.raises(ValueError, match=r"`loras\[0\]`: params/fc/kernel: adapter shapes"):
        lj.merge_many(small, loras[2:], configs[2])


@pytest.mark.slow
@pytest.mark.parametrize("combination_type", lj.COMBINATIONS)
def test_combinations_match_peft_add_weighted_adapter(toy, combination_type):
    """The same two adapters combined by PEFT on PyTorch give the same update."""
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    _, loras, configs = toy
    pair, pair_configs, weights = [loras[0], loras[2]], [configs[0], configs[2]], [0.7, -1.5]
    ours, our_config = lj.combine_adapters(
        pair, pair_configs, weights, combination_type=combination_type
    )
    net = torch.nn.Sequential()
    net.add_module("fc", torch.nn.Linear(8, 6, bias=False))
    hf = lambda c: peft.LoraConfig(
        r=c.rank, lora_alpha=c.alpha, target_modules=["fc"], init_lora_weights=False
    )
    model = peft.get_peft_model(net, hf(pair_configs[0]), adapter_name="a0")
    model.add_adapter("a1", hf(pair_configs[1]))
    layer = model.base_model.model.fc
    for name, lora in zip(("a0", "a1"), pair, strict=True):
        w = lora["params"]["fc"]["kernel"]
        layer.lora_A[name].weight.data = torch.tensor(np.array(w.a).T.copy())
        layer.lora_B[name].weight.data = torch.tensor(np.array(w.b).T.copy())
    model.add_weighted_adapter(["a0", "a1"], weights, "mix", combination_type=combination_type)
    theirs = layer.get_delta_weight("mix").detach().numpy().T  # (in, out), scale included
    w = ours["params"]["fc"]["kernel"]
    mine = our_config.scale_for("params/fc/kernel", w.rank) * (as_f64(w.a) @ as_f64(w.b))
    _close(mine, theirs, 1e-5)
    assert layer.r["mix"] == w.rank and layer.scaling["mix"] == 1.0


@pytest.mark.slow
def test_benchmark_serving_table_swaps_without_recompiling():
    from train import benchmark

    table = benchmark.main(["--preset", "tiny", "--rounds", "1", "--part", "serving"])
    for name in ("base (no adapter)", "one adapter (swapped every call)", "mixed batch of 4"):
        assert re.search(rf"\| forward, {re.escape(name)}.*\| 1 / 3 \|$", table, re.M), table
