"""Training steps: jit, pmap and mesh agree; base untouched; one compile; errors before compile."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import run_two_processes
from jax.sharding import Mesh, PartitionSpec
from problem import (
    CONFIG,
    assert_close,
    base,
    batches,
    loss_fn,
    optimizer,
    run_strategy,
    start,
    strategy_named,
    to_numpy,
    train_adapters_only,
    train_counting,
)

import lora_jax as lj
from lora_jax.core._weights import flatten_lora

STEPS = 5


def _run(strategy: str, data, fsdp: bool = False, place: bool = True, **kw):
    frozen, state = start()
    return run_strategy(loss_fn, frozen, state, strategy, data, fsdp, place, **kw)


@pytest.fixture(scope="module")
def reference():
    data = batches(STEPS)
    return data, _run("jit", data)[0]


@pytest.mark.parametrize(
    ("strategy", "fsdp", "place"),
    [("pmap", False, True), ("mesh", False, True), ("mesh", False, False), ("mesh", True, True)],
)
def test_strategies_train_the_same_adapters(reference, strategy, fsdp, place):
    assert jax.device_count() >= 4
    data, ref = reference
    state, metrics = _run(strategy, data, fsdp=fsdp, place=place)
    assert np.shape(metrics["loss"]) == ()  # one value each
    assert_close(state.lora, ref.lora)
    assert int(np.asarray(state.step).ravel()[0]) == STEPS
    if fsdp:  # the base is sharded over fsdp, and each adapter follows its kernel
        b = state.lora["params"]["fc1"]["kernel"].b
        assert b.sharding.spec == PartitionSpec(None, "fsdp")
        assert state.lora["params"]["fc1"]["kernel"].a.sharding.spec == PartitionSpec(None, None)


def test_accumulation_matches_one_big_batch(reference):
    data, ref = reference
    state, _ = _run("jit", data, accum_steps=4)
    assert_close(state.lora, ref.lora)


def test_adapters_only_combined_tree_matches_lora_only(reference):
    data, ref = reference
    frozen, state = start()
    params, opt_size = train_adapters_only(loss_fn, frozen, state.lora, data)
    lora_size = sum(x.size for x in jax.tree.leaves(state.lora))
    assert opt_size == 2 * lora_size + 1  # adam's mu, nu for a and b, and a count
    assert_close(params["lora"], ref.lora)
    for got, want in zip(jax.tree.leaves(params["frozen"]), jax.tree.leaves(frozen), strict=True):
        np.testing.assert_array_equal(got, want)


def test_base_bit_identical_state_small_one_compile():
    frozen, state = start()
    state, losses, traces = train_counting(loss_fn, frozen, state, batches(60))
    assert traces == 1
    base_shapes = {x.shape for x in jax.tree.leaves(frozen) if x.ndim == 2}
    assert not {x.shape for x in jax.tree.leaves(state.opt_state)} & base_shapes
    assert np.mean(losses[-5:]) < 0.25 * losses[0], losses  # a learnable task, learnt


def test_jit_state_placed_beside_a_committed_base_compiles_once(caplog):
    """The step's outputs are committed: `place_state` commits the state to the base's device,
    so the second call reuses the first compile (it compiled twice before)."""
    frozen, state = start()
    frozen = jax.device_put(frozen, jax.devices()[0])
    strategy = lj.parallel.jit()
    step = lj.make_train_step(loss_fn, optimizer(), strategy=strategy)
    state = strategy.place_state(state, frozen)
    with jax.log_compiles(True), caplog.at_level("WARNING"):
        for b in batches(3):
            state, _ = step(state, frozen, b)
    done = "Finished XLA compilation of jit(_update)"
    compiles = [r for r in caplog.records if done in r.message]
    assert len(compiles) == 1, [r.message for r in compiles]


def test_bf16_base_trains_float32_adapters():
    frozen, state = start()
    frozen = jax.tree.map(lambda x: x.astype(jnp.bfloat16), frozen)
    step = lj.make_train_step(loss_fn, optimizer())
    losses = []
    for b in batches(20):
        state, metrics = step(state, frozen, b)
        losses.append(float(metrics["loss"]))
    assert metrics["loss"].dtype == jnp.float32
    assert {x.dtype for x in jax.tree.leaves(state.lora)} == {jnp.dtype(jnp.float32)}
    assert {x.dtype for x in jax.tree.leaves(state.opt_state) if x.ndim} == {jnp.dtype(jnp.float32)}
    assert losses[-1] < 0.5 * losses[0]


def test_nonfinite_updates_are_skipped_and_counted():
    frozen, state = start()
    step = lj.make_train_step(loss_fn, optimizer(), skip_nonfinite=True, donate=False)
    good = batches(1)[0]
    bad = {"x": good["x"].copy(), "y": good["y"]}
    bad["x"][0, 0] = np.nan
    new, metrics = step(state, frozen, bad)
    assert int(metrics["skipped"]) == 1 and int(new.step) == 1
    assert_close(new.lora, state.lora, rtol=0.0)
    new, metrics = step(new, frozen, good)
    assert int(metrics["skipped"]) == 1 and np.isfinite(float(metrics["loss"]))


def test_loraplus_scales_b_updates():
    frozen, state = start()
    grads = jax.grad(lambda lo: loss_fn(frozen, lo, batches(1)[0], None))(state.lora)
    plain = optax.sgd(0.1)
    plus = optax.chain(optax.sgd(0.1), lj.optim.loraplus(16.0))
    u1, _ = plain.update(grads, plain.init(state.lora))
    u2, _ = plus.update(grads, plus.init(state.lora))
    for w1, w2 in zip(flatten_lora(u1).values(), flatten_lora(u2).values(), strict=True):
        np.testing.assert_allclose(w2.a, w1.a)
        np.testing.assert_allclose(w2.b, 16.0 * w1.b, rtol=1e-6)
    with pytest.raises(ValueError, match=r"`lr_ratio` must be a number > 0; found 0"):
        lj.optim.loraplus(0)


# ---- errors before any compile ------------------------------------------------------------


def test_bad_inputs_fail_before_compiling():
    frozen, state = start()
    tx = optimizer()
    b = batches(1)[0]
    with pytest.raises(
        TypeError, match=r"loss_fn\(frozen, lora, batch, key\).*found bad\(frozen, lora\)"
    ):

        def bad(frozen, lora):
            return 0.0

        lj.make_train_step(bad, tx)
    mesh = Mesh(np.array(jax.devices()[:4]), ("batch",))
    with pytest.raises(ValueError, match=r"mesh has no axis 'data'; its axes are \('batch',\)"):
        lj.parallel.mesh(mesh)
    with pytest.raises(ValueError, match=r"mesh has no axis 'fsdp'"):
        lj.parallel.mesh(mesh, data_axis="batch", fsdp_axis="fsdp")
    with pytest.raises(TypeError, match=r"`mesh` must be a jax.sharding.Mesh; found tuple"):
        lj.parallel.mesh(("data",))
    with pytest.raises(ValueError, match=r"`accum_steps` must be an int >= 1; found 0"):
        lj.make_train_step(loss_fn, tx, accum_steps=0)
    odd = {k: v[:6] for k, v in b.items()}
    with pytest.raises(
        ValueError,
        match=r"batch leaf 'x' has leading size 6, which is not divisible by 4 \(4 devices",
    ):
        lj.parallel.shard_batch(odd, 4)
    mesh = strategy_named("mesh")
    step = lj.make_train_step(loss_fn, tx, strategy=mesh)
    with pytest.raises(
        ValueError, match=r"batch leaf 'x' has leading size 6, which is not divisible by 4"
    ):
        step(state, frozen, odd)
    with pytest.raises(ValueError, match=r"leading size 6, which is not divisible by 4"):
        mesh.place_batch(odd)
    with pytest.raises(ValueError, match=r"accum_steps=4"):
        lj.make_train_step(loss_fn, tx, accum_steps=4)(state, frozen, odd)
    pmap = strategy_named("pmap")
    pstep = lj.make_train_step(loss_fn, tx, strategy=pmap)
    rep = lj.parallel.replicate
    with pytest.raises(
        ValueError, match=r"the pmap step needs 4 .* lj.parallel.replicate\(state\)"
    ):
        pstep(state, rep(frozen), lj.parallel.shard_batch(b))
    with pytest.raises(ValueError, match=r"lj.parallel.shard_batch\(batch\)"):
        pstep(rep(state), rep(frozen), b)
    other, _ = lj.split(
        {"params": {"w": jnp.ones((3, 3))}},
        lj.LoraConfig(rank=1, targets=".*"),
        key=jax.random.key(0),
    )
    with pytest.raises(
        ValueError, match=r"'params/fc1/kernel', which is not a parameter of `frozen`"
    ):
        lj.make_train_step(loss_fn, tx)(state, other, b)
    with pytest.raises(TypeError, match=r"`state` must be a lj.TrainState; found dict"):
        lj.make_train_step(loss_fn, tx)({"lora": state.lora}, frozen, b)
    with pytest.raises(ValueError, match="holds no LoraWeights"):
        lj.optim.adapter_mask(frozen)
    with pytest.raises(ValueError, match="holds no LoraWeights"):
        lj.optim.adapters_only(optax.sgd(0.1)).init(frozen)


# ---- strategies as values, optax pieces, key and PiSSA checks -----------------------------


@pytest.mark.parametrize("name", ["jit", "pmap", "mesh"])
def test_each_strategy_is_a_named_tuple_of_functions(name):
    strategy = strategy_named(name)
    assert isinstance(strategy, lj.parallel.Strategy) and isinstance(strategy, tuple)
    assert strategy._fields[-1] == "axis_name"
    assert strategy.axis_name == ("devices" if name == "pmap" else None)
    for field in strategy._fields[:-1]:
        assert callable(getattr(strategy, field)), field


@pytest.mark.parametrize("name", ["jit", "pmap", "mesh"])
def test_string_strategy_is_a_type_error(name):
    with pytest.raises(
        TypeError,
        match=rf"lj.parallel.jit\(\), lj.parallel.pmap\(\) or lj.parallel.mesh\(mesh.*"
        rf"found the string '{name}' \(strategies are values: strategy=lj.parallel.{name}\(",
    ):
        lj.make_train_step(loss_fn, optimizer(), strategy=name)
    with pytest.raises(TypeError, match=r"`strategy` must be a lj.parallel.Strategy.*found dict"):
        lj.make_train_step(loss_fn, optimizer(), strategy={"kind": name})


def test_adapters_only_keeps_state_for_adapters_and_base_bit_identical():
    frozen, state = start()
    tree = {"frozen": frozen, "lora": state.lora}
    tx = lj.optim.adapters_only(optax.adam(1e-1))
    opt_state = tx.init(tree)
    adapter_sizes = sorted(x.size for x in jax.tree.leaves(state.lora))
    slots = sorted(x.size for x in jax.tree.leaves(opt_state) if x.ndim)
    assert slots == sorted(adapter_sizes * 2)  # adam's mu and nu, for a and b only
    grads = jax.tree.map(jnp.ones_like, tree)
    updates, _ = tx.update(grads, opt_state, tree)
    new = optax.apply_updates(tree, updates)
    for got, want in zip(jax.tree.leaves(new["frozen"]), jax.tree.leaves(frozen), strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert all(np.abs(x).max() > 0 for x in jax.tree.leaves(updates["lora"]))


def test_adapter_mask_has_optax_masked_meaning():
    """`optax.masked(tx, adapter_mask(tree))`: a/b get tx's update, every other leaf passes
    its incoming update through unchanged (unlike `adapters_only`, which zeroes it)."""
    frozen, state = start()
    tree = {"frozen": frozen, "lora": state.lora}
    mask = lj.optim.adapter_mask(tree)
    assert not any(jax.tree.leaves(mask["frozen"]))
    assert all(jax.tree.leaves(mask["lora"]))
    assert len(jax.tree.leaves(mask["lora"])) == 2 * len(flatten_lora(state.lora))
    tx = optax.masked(optax.sgd(1.0), mask)
    grads = jax.tree.map(lambda x: jnp.full_like(x, 0.5), tree)
    updates, _ = tx.update(grads, tx.init(tree), tree)
    for u in jax.tree.leaves(updates["frozen"]):
        np.testing.assert_array_equal(np.asarray(u), 0.5)  # passed through, unchanged
    for u in jax.tree.leaves(updates["lora"]):
        np.testing.assert_array_equal(np.asarray(u), -0.5)  # sgd(1.0)
    only = lj.optim.adapters_only(optax.sgd(1.0))
    zeroed, _ = only.update(grads, only.init(tree), tree)
    assert not any(np.asarray(u).any() for u in jax.tree.leaves(zeroed["frozen"]))


def test_train_state_key_is_checked():
    _, state = start()
    with pytest.raises(
        TypeError, match=r"TrainState.create: `key` must be a PRNG key.*found int 0"
    ):
        lj.TrainState.create(state.lora, optimizer(), key=0)


@pytest.mark.parametrize("name", ["jit", "pmap", "mesh"])
def test_step_refuses_pissa_adapter_on_the_original_base(name):
    original = base()
    config = lj.LoraConfig(rank=4, alpha=8.0, targets=".*/kernel", init="pissa")
    residual, lora = lj.split(original, config, key=jax.random.key(0))
    strategy = strategy_named(name)
    state = lj.TrainState.create(lora, optimizer(), key=jax.random.key(1))
    step = lj.make_train_step(loss_fn, optimizer(), strategy=strategy, donate=False)
    placed, batch = strategy.place_state(state, residual), strategy.place_batch(batches(1)[0])
    with pytest.raises(ValueError, match=r"kernel.*init='pissa'.*not the original variables"):
        step(placed, strategy.place_frozen(original), batch)
    _, metrics = step(placed, strategy.place_frozen(residual), batch)
    assert np.isfinite(float(strategy.metrics(metrics)["loss"]))


# ---- two real processes -------------------------------------------------------------------


@pytest.mark.slow
def test_two_processes_train_like_one(tmp_path, reference):
    _, ref = reference
    worker = os.path.join(os.path.dirname(__file__), "multiprocess_worker.py")
    run_two_processes(worker, str(tmp_path), str(STEPS))
    flat_ref = {
        jax.tree_util.keystr(k): v
        for k, v in jax.tree_util.tree_flatten_with_path(to_numpy(ref.lora))[0]
    }
    for name in ("pmap", "mesh"):
        got = [np.load(tmp_path / f"{name}_{i}.npz") for i in range(2)]
        for key, want in flat_ref.items():
            np.testing.assert_array_equal(got[0][key], got[1][key])  # both processes agree
            assert np.abs(got[0][key] - want).max() <= 1e-5 * np.abs(want).max(), (name, key)


def test_old_state_is_donated_and_create_copies_lora():
    frozen, state = start()
    step = lj.make_train_step(loss_fn, optimizer())
    lora_before = state.lora
    user_lora = lj.split(frozen, CONFIG, key=jax.random.key(2))[1]
    fresh = lj.TrainState.create(user_lora, optimizer(), key=jax.random.key(0))
    new, _ = step(state, frozen, batches(1)[0])
    assert all(x.is_deleted() for x in jax.tree.leaves(lora_before))  # buffers reused
    assert not any(x.is_deleted() for x in jax.tree.leaves(frozen))  # the base never is
    step(fresh, frozen, batches(1)[0])
    assert not any(x.is_deleted() for x in jax.tree.leaves(user_lora))  # create() copied
    assert int(new.step) == 1


@pytest.mark.parametrize("extra", ["use_dora", "lora_bias"])
def test_dora_and_lora_bias_train_the_same_under_every_strategy(extra):
    """The magnitude or bias rides with a and b: pmap replicates it, a mesh with FSDP shards
    it along b's output axes, and every strategy trains what jit trains."""
    config = lj.LoraConfig(rank=4, alpha=8.0, targets=".*/kernel", **{extra: True})
    data = batches(3)
    results = {}
    for strategy, fsdp in (("jit", False), ("pmap", False), ("mesh", True)):
        frozen, lora = lj.split(base(), config, key=jax.random.key(2))
        state = lj.TrainState.create(lora, optimizer(), key=jax.random.key(3))
        results[strategy, fsdp] = run_strategy(loss_fn, frozen, state, strategy, data, fsdp)[0]
    ref = results["jit", False].lora
    name = "magnitude" if extra == "use_dora" else "bias"
    assert float(jnp.abs(getattr(ref["params"]["fc1"]["kernel"], name)).sum()) > 0
    for state in results.values():
        # Adam divides by the root of tiny second moments at the start, so float rounding of
        # the cross-device gradient sums shows at about 1e-4 of the largest value (measured
        # 1.6e-4 at most); a wrong gradient is off by whole factors.
        assert_close(state.lora, ref, rtol=3e-4)
    w = results["mesh", True].lora["params"]["fc1"]["kernel"]
    assert getattr(w, name).sharding.spec == PartitionSpec("fsdp")
