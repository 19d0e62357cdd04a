"""The app's model on accelerators (issue 20): the bf16 policy of the step (no float32 copy of
the base anywhere), attention through `jax.nn.dot_product_attention` against a float64 NumPy
reference, remat policies, and FSDP placement of the base and its adapters. All on the CPU
with the micro preset or smaller."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, PartitionSpec

import lora_jax as lj
from train.base import layouts_of
from train.commands import _with_kernels, builtin_recipe
from train.models import PRESETS, Llama, LlamaConfig, init_cache
from train.models.llama import _attend, _mask
from train.settings import Settings, UserError

MICRO = PRESETS["micro"]
BATCH, SEQ = 2, 16
LORA = lj.LoraConfig(rank=4, alpha=8.0, targets="all-linear")
F32, BF16 = jnp.dtype("float32"), jnp.dtype("bfloat16")


def _ids(n: int = SEQ, batch: int = BATCH, vocab: int = 258) -> jax.Array:
    return jnp.asarray(np.random.default_rng(0).integers(0, vocab, (batch, n)), jnp.int32)


# Compiles here are a few times faster without LLVM's expensive passes; the numbers compared
# come from programs compiled alike.
FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _compiled(fn, *args):
    return jax.jit(fn).trace(*args).lower().compile(FAST)


def _variables(config: LlamaConfig, ids: jax.Array, dtype: str = "float32"):
    """Random weights of `config`'s shapes (norm scales about 1) without compiling an init."""
    shapes = jax.eval_shape(Llama(config).init, jax.random.key(0), ids)
    rng = np.random.default_rng(0)

    def fill(path, leaf):
        around = 1.0 if "norm" in jax.tree_util.keystr(path) else 0.0
        return jnp.asarray(around + rng.normal(0, 0.05, leaf.shape), dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def _split(config: LlamaConfig, dtype: str) -> tuple:
    variables = _variables(config, _ids(), dtype)
    layouts = layouts_of(config, variables, SEQ)
    return lj.split(variables, LORA, key=jax.random.key(1), layouts=layouts)


def _loss_fn(config: LlamaConfig, seen: list | None = None):
    apply = lj.lora_apply(Llama(config).apply)

    def loss_fn(frozen, lora, batch, key):
        if seen is not None:
            seen.extend(x.dtype for x in jax.tree.leaves(frozen))
        logits = apply(frozen, lora, batch["inputs"])
        nll = -jax.nn.log_softmax(logits)[..., :-1, :]
        picked = jnp.take_along_axis(nll, batch["inputs"][..., 1:, None], axis=-1)
        return jnp.mean(picked)

    return loss_fn


def _floating_dtypes(tree) -> set:
    return {x.dtype for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)}


# ---- the bf16 step: no float32 copy of the base ------------------------------------------


def _sub_jaxprs(params: dict):
    for value in params.values():
        for item in value if isinstance(value, list | tuple) else (value,):
            if isinstance(item, jax.extend.core.ClosedJaxpr):
                yield item.jaxpr
            elif isinstance(item, jax.extend.core.Jaxpr):
                yield item


def float32_copies(jaxpr, shapes: set) -> list[str]:
    """Equations of `jaxpr` and every sub-jaxpr (pjit, scan, remat, cond, custom_vjp...) that
    convert a base-shaped operand to float32 or multiply a float32 base-shaped operand."""
    found = []
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        operands = [v.aval for v in eqn.invars if hasattr(v.aval, "shape")]
        if name == "convert_element_type" and eqn.params["new_dtype"] == F32:
            found += [f"{name} {a.shape}" for a in operands[:1] if tuple(a.shape) in shapes]
        if name == "dot_general":
            found += [
                f"{name} {a.shape}" for a in operands if tuple(a.shape) in shapes and a.dtype == F32
            ]
        for sub in _sub_jaxprs(eqn.params):
            found += float32_copies(sub, shapes)
    return found


@pytest.fixture(scope="module")
def bf16_run():
    """One step of the micro Llama stored and computed in bf16 (remat dots, so the walker
    also goes into the checkpoint sub-jaxpr), LoRA all-linear, float32 adapters."""
    config = dataclasses.replace(MICRO, dtype="bfloat16", param_dtype="bfloat16", remat="dots")
    frozen, lora = _split(config, "bfloat16")
    tx = optax.adamw(1e-2)
    state = lj.TrainState.create(lora, tx, key=jax.random.key(2))
    batch = {"inputs": _ids()}
    shapes = {tuple(x.shape) for x in jax.tree.leaves(frozen) if x.ndim == 2}
    return config, frozen, state, tx, batch, shapes


def test_bf16_step_keeps_float32_adapters_and_a_bf16_base(bf16_run):
    config, frozen, state, tx, batch, _ = bf16_run
    step = lj.make_train_step(_loss_fn(config), tx, donate=False)
    new, metrics = step(state, frozen, batch)
    assert _floating_dtypes(frozen) == {BF16}
    assert _floating_dtypes(new.lora) == {F32}
    assert _floating_dtypes(new.opt_state) == {F32}
    assert metrics["loss"].dtype == F32 and np.isfinite(float(metrics["loss"]))
    moved = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), new.lora, state.lora)
    assert max(jax.tree.leaves(moved)) > 0


def test_bf16_step_makes_no_float32_copy_of_the_base(bf16_run):
    config, frozen, state, tx, batch, shapes = bf16_run
    assert {(258, 64), (64, 64), (64, 192), (192, 64), (64, 258)} <= shapes
    step = lj.make_train_step(_loss_fn(config), tx, donate=False)
    jaxpr = jax.make_jaxpr(step)(state, frozen, batch).jaxpr
    assert float32_copies(jaxpr, shapes) == []
    # The walker does find copies: the same bf16 base under a float32 compute config.
    f32_config = dataclasses.replace(config, dtype="float32")
    step = lj.make_train_step(_loss_fn(f32_config), tx, donate=False)
    copies = float32_copies(jax.make_jaxpr(step)(state, frozen, batch).jaxpr, shapes)
    assert any(c.startswith("convert_element_type (64, 64)") for c in copies), copies
    assert any(c.startswith("dot_general (64, 192)") for c in copies), copies
    # ... and so does the library's cast of a float32-stored base to bf16 not happen twice:
    step = lj.make_train_step(_loss_fn(config), tx, donate=False, compute_dtype=jnp.bfloat16)
    assert float32_copies(jax.make_jaxpr(step)(state, frozen, batch).jaxpr, shapes) == []


def test_compute_dtype_casts_a_float32_base_inside_the_step():
    config = dataclasses.replace(MICRO, dtype="bfloat16")
    frozen, lora = _split(config, "float32")
    tx = optax.adam(1e-2)
    state = lj.TrainState.create(lora, tx, key=jax.random.key(2))
    seen: list = []
    step = lj.make_train_step(_loss_fn(config, seen), tx, compute_dtype=jnp.bfloat16)
    new, metrics = jax.eval_shape(step, state, frozen, {"inputs": _ids()})  # traced only
    assert set(seen) == {BF16}  # what loss_fn received
    assert _floating_dtypes(frozen) == {F32}  # the caller's base is untouched
    assert _floating_dtypes(new.lora) == _floating_dtypes(new.opt_state) == {F32}
    assert metrics["loss"].dtype == F32
    with pytest.raises(TypeError, match=r"`compute_dtype` must be a floating dtype.*int32"):
        lj.make_train_step(_loss_fn(config), tx, compute_dtype=jnp.int32)
    with pytest.raises(TypeError, match=r"`compute_dtype` must be a floating dtype.*'nope'"):
        lj.make_train_step(_loss_fn(config), tx, compute_dtype="nope")


# ---- attention against a float64 NumPy reference -----------------------------------------


def reference_attention(q, k, v, *, scale, visible):
    """Grouped-query attention in float64: q ``(b, s, h, d)``, k/v ``(b, t, kv, d)``, query
    head ``n`` reads kv head ``n // (h // kv)``; `visible` ``(s, t)`` bool."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    group = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
    scores = np.einsum("bshd,bthd->bhst", q, k) * scale
    scores = np.where(visible, scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    out = np.einsum("bhst,bthd->bshd", probs, v)
    return out.reshape(*out.shape[:2], -1)


def _visible(s: int, t: int, end: int, window: int | None) -> np.ndarray:
    diff = (end + np.arange(s))[:, None] - np.arange(t)[None, :]
    return (diff >= 0) & (diff < (window or t + s))


GEMMA = LlamaConfig(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    family="gemma3",
    qk_norm=True,
    sliding_window=4,
    global_layers=(1,),
    rope_local_theta=100.0,
    query_pre_attn_scalar=24.0,
)
# bf16 keeps 8 significant bits (relative rounding 2**-9): q and k are rounded before the
# scores, the probabilities are rounded to bf16 before the weighted sum of v, and the output
# is rounded once more; with |v| <= ~3 that is a few times 2**-9 * 3 ~ 6e-3 at worst, so
# 2e-2 passes correct attention and fails a wrong mask or scale (errors of order 1).
TOLERANCE = {"float32": 1e-5, "bfloat16": 2e-2}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize(
    ("config", "window", "cached"),
    [
        (MICRO, None, False),  # causal, GQA (4 heads over 2 kv heads), head_dim ** -0.5
        (MICRO, 5, False),  # sliding window < seq
        (GEMMA, 4, False),  # query_pre_attn_scalar ** -0.5
        (GEMMA, None, True),  # prefill into a cache of 16 slots
        (GEMMA, 4, True),  # one decode step at slot 9 through the window
    ],
)
def test_attention_matches_a_float64_reference(config, window, cached, dtype):
    c = dataclasses.replace(config, dtype=dtype)
    b, s, t, d = 2, (1 if window and cached else 9), 16, c.head_dim
    end = 9 if s == 1 else 0
    rng, kv_len = np.random.default_rng(3), t if cached else s
    q = jnp.asarray(rng.normal(size=(b, s, c.num_heads, d)), dtype)
    k, v = (jnp.asarray(rng.normal(size=(b, kv_len, c.num_kv_heads, d)), dtype) for _ in "kv")
    visible = _visible(s, kv_len, end, window)
    if cached:
        slots = end + jnp.arange(s, dtype=jnp.int32)
        mask = _mask(slots, jnp.arange(t, dtype=jnp.int32), window)
        out = _compiled(lambda q, k, v: _attend(c, q, k, v, None, mask), q, k, v)(q, k, v)
    else:
        out = _compiled(lambda q, k, v: _attend(c, q, k, v, window, None), q, k, v)(q, k, v)
    assert out.dtype == jnp.dtype(dtype) and out.shape == (b, s, c.num_heads * d)
    scale = (c.query_pre_attn_scalar or d) ** -0.5
    want = reference_attention(q.astype(jnp.float32), k.astype(jnp.float32), v, scale=scale,
                               visible=visible)  # fmt: skip
    err = np.abs(np.asarray(out, np.float64) - want).max()
    assert err < TOLERANCE[dtype], err
    if window and not cached:  # the window matters: full causal attention differs
        wide = reference_attention(q.astype(jnp.float32), k.astype(jnp.float32), v,
                                   scale=scale, visible=_visible(s, s, 0, None))  # fmt: skip
        assert np.abs(wide - want).max() > 0.1


def test_gemma3_mixed_layers_scanned_unrolled_and_cached_agree():
    """Layer 0 local (window 4 of 10 tokens), layer 1 global: scanned (a `lax.switch` on the
    layer kind), unrolled (static kinds) and through a KV cache (the explicit mask) agree."""
    scanned, unrolled = dataclasses.replace(GEMMA, scan_layers=True), GEMMA
    ids = _ids(10, vocab=64)
    stacked = _variables(scanned, ids)["params"]
    params = {k: v for k, v in stacked.items() if k != "layers"}
    for i in range(GEMMA.num_layers):
        params[f"layers_{i}"] = jax.tree.map(lambda x, i=i: x[i], stacked["layers"])
    variables = {"params": params}
    full = _compiled(Llama(unrolled).apply, variables, ids)(variables, ids)
    scan_apply = _compiled(Llama(scanned).apply, {"params": stacked}, ids)
    np.testing.assert_allclose(scan_apply({"params": stacked}, ids), full, atol=1e-5, rtol=0)
    cached = lambda p, ids, c: Llama(unrolled).apply(p, ids, cache=c)
    cache = init_cache(unrolled, 2, 16)
    first, cache = _compiled(cached, variables, ids[:, :9], cache)(variables, ids[:, :9], cache)
    last, _ = _compiled(cached, variables, ids[:, 9:], cache)(variables, ids[:, 9:], cache)
    np.testing.assert_allclose(np.concatenate([first, last], 1), full, atol=1e-5, rtol=0)


# ---- remat ---------------------------------------------------------------------------------


@pytest.mark.parametrize("scan", [False, True])
def test_remat_policies_same_loss_and_gradients_adapters_factored(scan):
    config = dataclasses.replace(MICRO, scan_layers=scan)
    frozen, lora = _split(config, "float32")
    lora = jax.tree.map(lambda x: x + 0.01, lora)  # b != 0: gradients reach every factor
    batch = {"inputs": _ids()}
    results = {}
    for remat in ("none", "dots", "full"):
        c = dataclasses.replace(config, remat=remat)
        fn = jax.value_and_grad(lambda lo, c=c: _loss_fn(c)(frozen, lo, batch, None))
        traced = jax.jit(fn).trace(lora)
        assert ("remat" in str(traced.jaxpr)) == (remat != "none")
        results[remat] = traced.lower().compile(FAST)(lora)
        if remat == "full":
            routes = lj.routes(Llama(c).apply, frozen, lora, batch["inputs"])
            assert len(routes) == 7 * (1 if scan else 2)
            assert set(routes.values()) == {"factored (Dense)"}
    loss, grads = results["none"]
    for remat in ("dots", "full"):
        np.testing.assert_allclose(results[remat][0], loss, rtol=1e-6)
        for got, want in zip(
            jax.tree.leaves(results[remat][1]), jax.tree.leaves(grads), strict=True
        ):
            np.testing.assert_allclose(got, want, atol=1e-6, rtol=1e-6)


# ---- FSDP placement ------------------------------------------------------------------------


def test_fsdp_places_the_base_sharded_and_adapters_like_their_kernels():
    frozen, lora = _split(MICRO, "float32")
    mesh = Mesh(np.array(jax.devices()[:4]).reshape(2, 2), ("data", "fsdp"))
    strategy = lj.parallel.mesh(mesh, data_axis="data", fsdp_axis="fsdp")
    placed = strategy.place_frozen(frozen)
    state = strategy.place_state(
        lj.TrainState.create(lora, optax.adam(1e-3), key=jax.random.key(0)), frozen
    )
    layer = placed["params"]["layers_0"]
    adapters = state.lora["params"]["layers_0"]
    q, up = layer["self_attn"]["q_proj"]["kernel"], layer["mlp"]["up_proj"]["kernel"]
    assert q.sharding.spec == PartitionSpec("fsdp", None)  # (64, 64): the first largest axis
    assert up.sharding.spec == PartitionSpec(None, "fsdp")  # (64, 192)
    wq, wup = adapters["self_attn"]["q_proj"]["kernel"], adapters["mlp"]["up_proj"]["kernel"]
    assert wq.a.sharding.spec == PartitionSpec("fsdp", None)  # a (in, r) follows in
    assert wq.b.sharding.spec == PartitionSpec(None, None)
    assert wup.a.sharding.spec == PartitionSpec(None, None)
    assert wup.b.sharding.spec == PartitionSpec(None, "fsdp")
    assert len(q.addressable_shards) == 4 and q.addressable_shards[0].data.shape == (32, 64)


# ---- kernel choice, config and flags -------------------------------------------------------


def test_attention_kernel_choice_and_the_auto_fallback(monkeypatch):
    c = dataclasses.replace(MICRO, dtype="bfloat16")
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(1, 8, 4, 16)), jnp.bfloat16)
    k = jnp.asarray(rng.normal(size=(1, 8, 2, 16)), jnp.bfloat16)
    attend = lambda config: _compiled(lambda q, k: _attend(config, q, k, k, 3, None), q, k)(q, k)
    xla = attend(dataclasses.replace(c, attention="xla"))
    assert jax.default_backend() == "cpu"
    with pytest.raises(RuntimeError, match="cuDNN"):  # forced: JAX's own error
        attend(dataclasses.replace(c, attention="cudnn"))
    # "auto" on a GPU asks cuDNN first; where it refuses (here: no cuDNN) XLA computes
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    np.testing.assert_array_equal(attend(c), xla)


def test_config_fields_and_the_app_flags():
    with pytest.raises(ValueError, match=r"LlamaConfig.attention must be one of .*'flash'"):
        dataclasses.replace(MICRO, attention="flash")
    with pytest.raises(ValueError, match=r"LlamaConfig.remat must be one of .*'some'"):
        dataclasses.replace(MICRO, remat="some")
    c = dataclasses.replace(MICRO, remat="dots", attention="xla")
    assert LlamaConfig.from_dict(c.to_dict()) == c
    old = {k: v for k, v in MICRO.to_dict().items() if k not in ("remat", "attention")}
    assert LlamaConfig.from_dict(old) == MICRO  # a config written before the fields existed
    s = Settings(remat="full", attention="xla")
    assert (_with_kernels(MICRO, s).remat, _with_kernels(MICRO, s).attention) == ("full", "xla")
    s = Settings(command="sample", remat="dots", attention="xla")  # sampling reads no --remat
    sampled = _with_kernels(MICRO, s, ("attention",))
    assert (sampled.remat, sampled.attention) == ("none", "xla")
    assert "remat" not in builtin_recipe()["model"]  # the built-in base's cache key is as before
    with pytest.raises(UserError, match=r"`remat` must be one of none, dots, full; found 'x'"):
        Settings(remat="x")
    with pytest.raises(UserError, match=r"`attention` must be one of auto, xla, cudnn"):
        Settings(attention="flash")


def test_compute_dtype_unpacks_a_quantized_base_to_it_and_keeps_its_storage():
    """A QLoRA base under ``compute_dtype``: the codes and float32 scales are kept as stored
    (casting the scales would change the weights), and the kernel unpacks to bfloat16."""
    from lora_jax.training._step import cast_frozen

    w = jax.random.normal(jax.random.key(0), (64, 32))
    tree = lj.quant.quantize({"w": w, "norm": jnp.ones(32)}, "nf4", group_size=32)
    cast = cast_frozen(tree, jnp.dtype(jnp.bfloat16))
    assert cast["norm"].dtype == BF16 and cast["w"].dtype == BF16
    assert cast["w"].dequantize().dtype == BF16
    stored = lambda t: [(x.dtype, x.shape) for x in jax.tree.leaves(t["w"])]
    assert stored(cast) == stored(tree)
    np.testing.assert_array_equal(
        np.asarray(cast["w"].dequantize(), np.float32),
        np.asarray(tree["w"].dequantize().astype(jnp.bfloat16), np.float32),
    )
