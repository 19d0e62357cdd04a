"""Training steps: jit, pmap and mesh agree; base untouched; one compile; errors before compile."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, PartitionSpec
from problem import (
    CONFIG,
    assert_close,
    batches,
    loss_fn,
    optimizer,
    run_strategy,
    start,
    to_numpy,
    train_counting,
    train_masked,
)

import lora_jax as lj

STEPS = 5


def _run(strategy: str, data, fsdp: bool = False, **kw):
    frozen, state = start()
    return run_strategy(loss_fn, frozen, state, strategy, data, fsdp, **kw)


@pytest.fixture(scope="module")
def reference():
    data = batches(STEPS)
    return data, _run("jit", data)[0]


@pytest.mark.parametrize(("strategy", "fsdp"), [("pmap", False), ("mesh", False), ("mesh", True)])
def test_strategies_train_the_same_adapters(reference, strategy, fsdp):
    assert jax.device_count() >= 4
    data, ref = reference
    state, _ = _run(strategy, data, fsdp=fsdp)
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


def test_masked_combined_tree_matches_lora_only(reference):
    data, ref = reference
    frozen, state = start()
    params, opt_size = train_masked(loss_fn, frozen, state.lora, data)
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
    plus = optax.chain(optax.sgd(0.1), lj.loraplus(16.0))
    u1, _ = plain.update(grads, plain.init(state.lora))
    u2, _ = plus.update(grads, plus.init(state.lora))
    for w1, w2 in zip(
        lj.weights.flatten_lora(u1).values(), lj.weights.flatten_lora(u2).values(), strict=True
    ):
        np.testing.assert_allclose(w2.a, w1.a)
        np.testing.assert_allclose(w2.b, 16.0 * w1.b, rtol=1e-6)
    with pytest.raises(ValueError, match=r"`lr_ratio` must be a number > 0; found 0"):
        lj.loraplus(0)


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
    with pytest.raises(ValueError, match=r"`strategy` must be one of .*found 'tpu'"):
        lj.make_train_step(loss_fn, tx, strategy="tpu")
    with pytest.raises(ValueError, match=r'strategy="mesh" needs `mesh=`'):
        lj.make_train_step(loss_fn, tx, strategy="mesh")
    mesh = Mesh(np.array(jax.devices()[:4]), ("batch",))
    with pytest.raises(ValueError, match=r"mesh has no axis 'data'; its axes are \('batch',\)"):
        lj.make_train_step(loss_fn, tx, strategy="mesh", mesh=mesh)
    with pytest.raises(ValueError, match=r"`accum_steps` must be an int >= 1; found 0"):
        lj.make_train_step(loss_fn, tx, accum_steps=0)
    odd = {k: v[:6] for k, v in b.items()}
    with pytest.raises(
        ValueError,
        match=r"batch leaf 'x' has leading size 6, which is not divisible by 4 \(4 devices",
    ):
        lj.shard_batch(odd, 4)
    step = lj.make_train_step(
        loss_fn, tx, strategy="mesh", mesh=Mesh(np.array(jax.devices()[:4]), ("data",))
    )
    with pytest.raises(
        ValueError, match=r"batch leaf 'x' has leading size 6, which is not divisible by 4"
    ):
        step(state, frozen, odd)
    with pytest.raises(ValueError, match=r"accum_steps=4"):
        lj.make_train_step(loss_fn, tx, accum_steps=4)(state, frozen, odd)
    pstep = lj.make_train_step(loss_fn, tx, strategy="pmap")
    with pytest.raises(ValueError, match=r"the pmap step needs 4 .* lj.replicate\(state\)"):
        pstep(state, lj.replicate(frozen), lj.shard_batch(b))
    with pytest.raises(ValueError, match=r"lj.shard_batch\(batch\)"):
        pstep(lj.replicate(state), lj.replicate(frozen), b)
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
    with pytest.raises(ValueError, match=r"not a target of `config`"):
        lj.lora_mask({"lora": state.lora}, lj.LoraConfig(targets=".*/fc2/kernel"))
    with pytest.raises(ValueError, match="holds no LoraWeights"):
        lj.lora_mask(frozen, CONFIG)


# ---- two real processes -------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_train_like_one(tmp_path, reference):
    _, ref = reference
    worker = os.path.join(os.path.dirname(__file__), "multiprocess_worker.py")
    port = str(_free_port())
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    procs = [
        subprocess.Popen(
            [sys.executable, worker, str(i), port, str(tmp_path), str(STEPS)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for i in range(2)
    ]
    try:
        outputs = [p.communicate(timeout=240)[0].decode() for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, out in zip(procs, outputs, strict=True):
        assert p.returncode == 0, out[-3000:]
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
