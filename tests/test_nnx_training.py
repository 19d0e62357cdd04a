"""Training NNX models: the pure form through jit, pmap and mesh trains what linen trains;
the in-place form with ``nnx.Optimizer(wrt=nnx.LoRAParam)`` trains the same adapters;
orbax checkpoints and adapter files round-trip for both forms."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec
from nnx_models import NnxMlp, load_linen, lora_from_linen
from problem import (
    HIDDEN,
    IN,
    OUT,
    assert_close,
    batches,
    loss_fn,
    optimizer,
    run_strategy,
    start,
    train_adapters_only,
    train_counting,
)

import lora_jax as lj

STEPS = 5


def _model() -> NnxMlp:
    return load_linen(NnxMlp(IN, HIDDEN, OUT, rngs=nnx.Rngs(0)), start()[0])


GRAPHDEF, _ = nnx.split(_model())
APPLY = lj.lora_apply(GRAPHDEF)


def nnx_loss(frozen, lora, batch, key):
    del key
    return jnp.mean((APPLY(frozen, lora, batch["x"]).astype(jnp.float32) - batch["y"]) ** 2)


def _start():
    """The NNX state and the same initial adapters as the linen problem's `start`."""
    model = _model()
    lora = lora_from_linen(start()[1].lora, lj.infer_layouts(model))
    state = lj.TrainState.create(lora, optimizer(), key=jax.random.key(3))
    return model, nnx.state(model), state


def _run(strategy: str, data, fsdp: bool = False):
    _, frozen, state = _start()
    return run_strategy(nnx_loss, frozen, state, strategy, data, fsdp)[0]


@pytest.fixture(scope="module")
def reference():
    data = batches(STEPS)
    return data, _run("jit", data)


def test_pure_form_trains_what_linen_trains(reference):
    data, ref = reference
    frozen, state = start()
    step = lj.make_train_step(loss_fn, optimizer())
    for b in data:
        state, _ = step(state, frozen, b)
    assert_close(ref.lora, lora_from_linen(state.lora, lj.infer_layouts(_model())))


@pytest.mark.parametrize(("strategy", "fsdp"), [("pmap", False), ("mesh", False), ("mesh", True)])
def test_strategies_train_the_same_nnx_adapters(reference, strategy, fsdp):
    data, ref = reference
    state = _run(strategy, data, fsdp)
    assert_close(state.lora, ref.lora)
    if fsdp:  # each adapter follows its kernel's sharding on the NNX state too
        assert state.lora["fc1"]["kernel"].b.sharding.spec == PartitionSpec(None, "fsdp")


def test_in_place_training_with_nnx_optimizer(reference):
    data, ref = reference
    model, _, state = _start()
    lj.nnx.add_lora(model, lora=state.lora)
    kernels = jax.tree.map(np.array, lj.nnx.lora_state(model)[0])
    opt = nnx.Optimizer(model, optimizer(), wrt=nnx.LoRAParam)
    traces = []

    @nnx.jit
    def step(model, opt, batch):
        traces.append(1)

        def loss(model):
            return jnp.mean((model(batch["x"]) - batch["y"]) ** 2)

        value, grads = nnx.value_and_grad(loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
        opt.update(model, grads)
        return value

    for b in data:
        step(model, opt, b)
    assert len(traces) == 1
    frozen, lora = lj.nnx.lora_state(model)
    assert_close(lora, ref.lora)
    for got, want in zip(jax.tree.leaves(frozen), jax.tree.leaves(kernels), strict=True):
        np.testing.assert_array_equal(np.asarray(got), want)  # the base, bit for bit
    slots = {"/".join(map(str, p)) for p, v in nnx.to_flat_state(nnx.state(opt)) if v.ndim}
    assert slots and all(s.endswith(("lora_a", "lora_b")) for s in slots), slots


def test_pure_step_base_untouched_opt_state_small_one_compile():
    _, frozen, state = _start()
    state, _, traces = train_counting(nnx_loss, frozen, state, batches(8))
    assert traces == 1
    lora_shapes = {x.shape for x in jax.tree.leaves(state.lora)}
    assert {x.shape for x in jax.tree.leaves(state.opt_state) if x.ndim} == lora_shapes


def test_checkpoints_resume_and_adapter_files(tmp_path):
    data = batches(4)
    _, frozen, state = _start()
    step = lj.make_train_step(nnx_loss, optimizer(), donate=False)
    straight = state
    for b in data:
        straight, _ = step(straight, frozen, b)
    with lj.CheckpointManager(tmp_path / "ckpt") as mgr:
        for b in data[:2]:
            state, _ = step(state, frozen, b)
        mgr.save(2, state)
        resumed, _ = mgr.restore(_start()[2], frozen=frozen)
        for b in data[2:]:
            resumed, _ = step(resumed, frozen, b)
        pick = lambda s: jax.tree.leaves((s.step, s.lora, s.opt_state))
        for got, want in zip(pick(resumed), pick(straight), strict=True):
            np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
        small = nnx.state(NnxMlp(IN, HIDDEN // 2, OUT, rngs=nnx.Rngs(0)))
        with pytest.raises(ValueError, match=r"fc1/kernel: expected shape \(32, 128\), found"):
            mgr.restore(_start()[2], frozen=small)
    # in place: save the model's adapters, load them onto a fresh model
    model = lj.nnx.add_lora(_model(), lora=straight.lora)
    lj.save_adapter(tmp_path / "adapter", lj.nnx.lora_state(model)[1])
    fresh = _model()
    lora = lj.load_adapter(tmp_path / "adapter", frozen=nnx.state(fresh))
    lj.nnx.add_lora(fresh, lora=lora)
    x = data[0]["x"]
    np.testing.assert_array_equal(np.asarray(fresh(x)), np.asarray(model(x)))
    np.testing.assert_array_equal(
        np.asarray(fresh(x)), np.asarray(APPLY(nnx.state(_model()), straight.lora, x))
    )
    with pytest.raises(
        ValueError,
        match=r"(?s)different base.*fc1/kernel: expected shape \(32, 128\), found \(32, 8\)",
    ):
        lj.load_adapter(
            tmp_path / "adapter", frozen=nnx.state(NnxMlp(IN, 8, OUT, rngs=nnx.Rngs(0)))
        )


def test_adapters_only_on_a_combined_nnx_tree(reference):
    """For users who keep one tree: `lj.optim.adapters_only` keeps optimizer state for the
    adapters only, and leaves the base bit-identical."""
    data, ref = reference
    _, frozen, state = _start()
    params, opt_size = train_adapters_only(nnx_loss, frozen, state.lora, data)
    assert opt_size == 2 * sum(x.size for x in jax.tree.leaves(state.lora)) + 1
    assert_close(params["lora"], ref.lora)
    for got, want in zip(jax.tree.leaves(params["frozen"]), jax.tree.leaves(frozen), strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
