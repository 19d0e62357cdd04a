"""QLoRA: adapters trained on a quantized frozen base (issue 17).

The reference is the dequantized float twin of the quantized base: `lora_apply` on the
quantized base must give the same outputs and adapter gradients as on the twin, while
unpacking each kernel only where it is used (a scanned layer's slice inside the loop,
never the whole stack).
"""

from __future__ import annotations

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec
from models import Mlp, ScannedMlp, Tiny

import lora_jax as lj

FORMATS = ("int8", "int4", "nf4")


def _close(x, y, tol):
    for a, b in zip(jax.tree.leaves(x), jax.tree.leaves(y), strict=True):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        scale = max(np.abs(b).max(), 1e-6)
        assert np.abs(a - b).max() <= tol * scale, (np.abs(a - b).max(), scale)


def _tiny():
    model = Tiny()
    ids = jax.random.randint(jax.random.key(0), (2, 6), 0, 32)
    variables = model.init(jax.random.key(1), ids)
    layouts = lj.infer_layouts(model.apply, variables, ids)
    return model, ids, variables, layouts


def _twins(variables, fmt, layouts, group=8, **kw):
    q = lj.quant.quantize(variables, fmt, group_size=group, layouts=layouts, **kw)
    return q, lj.quant.dequantize_tree(q)


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_quantized_base_runs_like_its_float_twin(fmt):
    """Every layer kind of `Tiny` (embedding lookup and tied head, scanned attention
    blocks, Einsum, Conv, a raw param) on a quantized base: outputs and adapter gradients
    equal those on the dequantized float twin, and every adapter still runs factored."""
    model, ids, variables, layouts = _tiny()
    q, twin = _twins(variables, fmt, layouts)
    assert any(lj.quant.is_quantized(x) for x in jax.tree.leaves(q, is_leaf=lj.quant.is_quantized))
    config = lj.LoraConfig(rank=2, targets=r".*(kernel|gate)")
    frozen_q, lora = lj.split(q, config, key=jax.random.key(2), layouts=layouts)
    frozen_f, _ = lj.split(twin, config, key=jax.random.key(2), layouts=layouts)
    lora = jax.tree.map(lambda x: x + 0.05, lora)  # b != 0: the low-rank path matters
    apply = lj.lora_apply(model.apply)
    _close(apply(frozen_q, lora, ids), apply(frozen_f, lora, ids), 1e-5)

    def loss(frozen, lora_):
        return jnp.mean(apply(frozen, lora_, ids) ** 2)

    grad = jax.jit(jax.grad(loss, argnums=1))
    _close(grad(frozen_q, lora), grad(frozen_f, lora), 1e-4)
    routes = lj.routes(model.apply, frozen_q, lora, ids)
    assert all(r.startswith("factored") for r in routes.values()), routes


def _float_arrays(hlo: str, shape: tuple[int, ...]) -> int:
    dims = ",".join(map(str, shape))
    return len(re.findall(rf"f32\[{dims}\]", hlo))


def test_a_scanned_layer_unpacks_only_its_own_slice():
    """The float kernel of the whole stack never exists in the training step: each
    iteration unpacks its layer's slice (and the backward pass unpacks it again instead of
    keeping it). Unpacking the tree first (the naive way) does create it: the check can
    fail."""
    model, x = ScannedMlp(), jnp.ones((4, 24))
    variables = model.init(jax.random.key(0), x)
    layouts = lj.infer_layouts(model.apply, variables, x)
    q = lj.quant.quantize(variables, "nf4", group_size=8, layouts=layouts)
    config = lj.LoraConfig(rank=2, targets=".*kernel")
    frozen, lora = lj.split(q, config, key=jax.random.key(1), layouts=layouts)
    apply = lj.lora_apply(model.apply)

    def loss(frozen_, lora_):
        return jnp.mean(apply(frozen_, lora_, x) ** 2)

    def naive(frozen_, lora_):
        return loss(lj.quant.dequantize_tree(frozen_), lora_)

    for fn, want in ((loss, 0), (naive, 1)):
        hlo = jax.jit(jax.grad(fn, argnums=1)).lower(frozen, lora).compile().as_text()
        found = _float_arrays(hlo, (3, 24, 40)) + _float_arrays(hlo, (3, 40, 24))
        assert (found > 0) == bool(want), (fn.__name__, found)


def test_training_on_a_quantized_base_lowers_the_loss_and_leaves_it_untouched():
    model, x = Mlp(hidden=32, out=8), jax.random.normal(jax.random.key(0), (16, 16))
    variables = model.init(jax.random.key(1), x)
    target = model.apply(jax.tree.map(lambda w: w * 1.1, variables), x)
    q = lj.quant.quantize(variables, "nf4", group_size=16)
    before = jax.tree.map(np.asarray, q)
    config = lj.LoraConfig(rank=4, alpha=8.0, targets=".*kernel")
    frozen, lora = lj.split(q, config, key=jax.random.key(2))
    apply = lj.lora_apply(model.apply)

    def loss_fn(frozen_, lora_, batch, key):
        del key
        return jnp.mean((apply(frozen_, lora_, batch["x"]) - batch["y"]) ** 2)

    tx = optax.adam(1e-2)
    state = lj.TrainState.create(lora, tx, key=jax.random.key(3))
    step = lj.make_train_step(loss_fn, tx)
    losses = []
    for _ in range(30):
        state, metrics = step(state, frozen, {"x": x, "y": target})
        losses.append(float(metrics["loss"]))
    assert losses[-1] < 0.5 * losses[0], losses
    for a, b in zip(jax.tree.leaves(frozen), jax.tree.leaves(before), strict=True):
        np.testing.assert_array_equal(np.asarray(a), b)  # the base is bit-identical


def _quantized_problem():
    from problem import CONFIG, base, optimizer

    q = lj.quant.quantize(base(), "nf4", group_size=16)
    frozen, lora = lj.split(q, CONFIG, key=jax.random.key(2))
    return frozen, lj.TrainState.create(lora, optimizer(), key=jax.random.key(3))


@pytest.mark.parametrize(("strategy", "fsdp"), [("pmap", False), ("mesh", False), ("mesh", True)])
def test_strategies_train_the_same_adapters_on_a_quantized_base(strategy, fsdp):
    """jit, pmap and mesh (data parallel, and FSDP with the quantized kernels sharded
    along their output axis: codes and scales alike) train the same adapters on 4
    devices."""
    from problem import assert_close, batches, loss_fn, run_strategy

    assert jax.device_count() >= 4
    data = batches(4)
    ref, _ = run_strategy(loss_fn, *_quantized_problem(), "jit", data)
    frozen, state = _quantized_problem()
    got, _ = run_strategy(loss_fn, frozen, state, strategy, data, fsdp)
    # float32 reduction order differs across strategies; Adam turns that noise in
    # near-zero gradients into updates of up to lr (measured 1.2e-5 relative under FSDP)
    assert_close(got.lora, ref.lora, rtol=5e-5)
    if fsdp:
        from problem import strategy_named

        placed = strategy_named("mesh", fsdp=True).place_frozen(frozen)
        q = placed["params"]["fc1"]["kernel"]
        assert lj.quant.is_quantized(q)
        assert q.codes.sharding.spec == q.scales.sharding.spec == PartitionSpec(None, "fsdp")


def test_nnx_on_a_quantized_base():
    """The NNX pure form: a quantized ``nnx.split`` state runs like its float twin."""
    from flax import nnx
    from nnx_models import NnxTiny

    model = NnxTiny(rngs=nnx.Rngs(0))
    ids = jax.random.randint(jax.random.key(1), (2, 6), 0, 32)
    graphdef, state = nnx.split(model)
    layouts = lj.infer_layouts(model)
    q, twin = _twins(state, "int4", layouts)
    config = lj.LoraConfig(rank=2, targets=".*kernel")
    frozen_q, lora = lj.split(q, config, key=jax.random.key(2), layouts=layouts)
    frozen_f, _ = lj.split(twin, config, key=jax.random.key(2), layouts=layouts)
    lora = jax.tree.map(lambda x: x + 0.05, lora)
    apply = lj.lora_apply(graphdef)
    _close(apply(frozen_q, lora, ids), apply(frozen_f, lora, ids), 1e-5)
    grad = jax.jit(jax.grad(lambda f, lo: jnp.mean(apply(f, lo, ids) ** 2), argnums=1))
    _close(grad(frozen_q, lora), grad(frozen_f, lora), 1e-4)


def test_a_mixed_batch_on_a_quantized_base():
    """Several adapters in one batch (`lj.multi.lora_apply_mixed`) on a quantized base:
    each example equals its adapter alone on the float twin."""
    model, ids, variables, layouts = _tiny()
    q, twin = _twins(variables, "nf4", layouts)
    config = lj.LoraConfig(rank=2, targets=r".*(kernel|gate)")
    frozen_q, _ = lj.split(q, config, key=jax.random.key(2), layouts=layouts)
    frozen_f, _ = lj.split(twin, config, key=jax.random.key(2), layouts=layouts)
    adapters = [
        jax.tree.map(
            lambda x, i=i: x + 0.03 * (i + 1),
            lj.split(twin, config, key=jax.random.key(i), layouts=layouts)[1],
        )
        for i in range(3)
    ]
    stacked = lj.multi.stack_adapters(adapters)
    which = jnp.array([2, 0])
    mixed = lj.multi.lora_apply_mixed(model.apply)(frozen_q, stacked, which, ids)
    alone = lj.lora_apply(model.apply)
    for row, i in enumerate(np.asarray(which)):
        _close(mixed[row], alone(frozen_f, adapters[i], ids[row : row + 1])[0], 1e-5)


def test_an_adapter_records_its_quantized_base(tmp_path):
    """`save_adapter(frozen=quantized)` notes how each base kernel was stored; loading
    checks the content fingerprint against the quantized values: the same quantized base
    loads strictly, the float original (other values) warns."""
    _, _, variables, layouts = _tiny()
    q = lj.quant.quantize(variables, "nf4", group_size=8, layouts=layouts, double=True)
    config = lj.LoraConfig(rank=2, targets=".*attn/query/kernel")
    frozen, lora = lj.split(q, config, key=jax.random.key(2), layouts=layouts)
    lj.save_adapter(tmp_path / "a", lora, frozen=frozen)
    entry = lj.io.read_metadata(tmp_path / "a")["adapters"]["params/blocks/attn/query/kernel"]
    assert entry["base_quantization"] == {
        "format": "nf4",
        "group_size": 8,
        "axis": 1,
        "double": True,
        "dtype": "float32",
    }
    back = lj.load_adapter(tmp_path / "a", frozen=frozen, strict=True)
    _close(back, lora, 0.0)
    with pytest.warns(UserWarning, match="base's values differ"):
        lj.load_adapter(tmp_path / "a", frozen=variables)


def test_summary_counts_a_quantized_base_by_what_it_stores():
    model, x = Mlp(hidden=32, out=8), jnp.ones((2, 16))
    variables = model.init(jax.random.key(0), x)
    q = lj.quant.quantize(variables, "nf4", group_size=16)
    frozen, lora = lj.split(q, lj.LoraConfig(rank=2, targets=".*kernel"), key=jax.random.key(1))
    s = lj.summary(frozen, lora)
    assert s.total == sum(x.size for x in jax.tree.leaves(variables))  # float parameters
    assert s.base_bytes == lj.quant.nbytes(q) < lj.quant.nbytes(variables)


class Unrolled(nn.Module):
    layers: int

    @nn.compact
    def __call__(self, x):
        for i in range(self.layers):
            x = jnp.tanh(nn.Dense(512, name=f"d{i}")(x))
        return x


def _step_temporaries(layers: int, unpack_first: bool) -> int:
    model, x = Unrolled(layers), jnp.ones((8, 512))
    variables = model.init(jax.random.key(0), x)
    q = lj.quant.quantize(variables, "nf4")
    frozen, lora = lj.split(q, lj.LoraConfig(rank=4, targets=".*kernel"), key=jax.random.key(1))
    apply = lj.lora_apply(model.apply)
    if unpack_first:
        loss = lambda lo, f: jnp.sum(apply(lj.quant.dequantize_tree(f), lo, x))
    else:
        loss = lambda lo, f: jnp.sum(apply(f, lo, x))
    compiled = jax.jit(jax.grad(loss)).lower(lora, frozen).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_unrolled_layers_unpack_one_kernel_at_a_time():
    """Layers that are not scanned: each kernel is unpacked next to its use, forward and
    backward, so the step's temporaries do not grow with the number of layers (XLA would
    otherwise unpack every kernel at the start and keep them all: the naive version's grow
    by a float kernel, 1 MiB, per layer)."""
    kernel = 512 * 512 * 4
    ours = _step_temporaries(8, False) - _step_temporaries(2, False)
    naive = _step_temporaries(8, True) - _step_temporaries(2, True)
    assert ours < kernel, ours
    assert naive >= 5 * kernel, naive
