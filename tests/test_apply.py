"""lora_apply: equal to the base at init, equal to the merged model after, under transforms."""

from __future__ import annotations

import warnings

import flax.linen as nn
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import as_f64, perturb
from hypothesis import given, settings

import lora_jax as lj

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@pytest.mark.slow
@settings(max_examples=20, deadline=None)
@given(
    batch=st.integers(1, 4),
    d_in=st.integers(1, 12),
    d_out=st.integers(1, 12),
    rank_frac=st.floats(0.0, 1.0),
    dtype=st.sampled_from(sorted(DTYPES)),
    init=st.sampled_from(["normal", "kaiming_uniform", "gaussian"]),
    seed=st.integers(0, 2**16),
)
def test_dense_property(batch, d_in, d_out, rank_frac, dtype, init, seed):
    """At init: bit for bit the base. With B != 0: merged model and NumPy agree."""
    dt = DTYPES[dtype]
    model = nn.Dense(d_out, dtype=dt, param_dtype=dt)
    x = jax.random.normal(jax.random.key(seed), (batch, d_in), dt)
    variables = model.init(jax.random.key(seed + 1), x)
    rank = 1 + int(rank_frac * (min(d_in, d_out) - 1))
    config = lj.LoraConfig(rank=rank, alpha=2.0 * rank, targets=".*/kernel", init=init)
    frozen, lora = lj.split(variables, config, key=jax.random.key(seed + 2))
    assert frozen is variables
    merged_at_init = lj.merge(frozen, lora)  # split, then combine: the input
    for got, want in zip(jax.tree.leaves(merged_at_init), jax.tree.leaves(variables), strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    apply = lj.lora_apply(model.apply)
    y0 = apply(frozen, lora, x)
    np.testing.assert_array_equal(np.asarray(y0), np.asarray(model.apply(variables, x)))
    assert y0.dtype == dt and lora["params"]["kernel"].a.dtype == jnp.float32

    lora = perturb(lora, jax.random.key(seed + 3), 0.2)
    y = apply(frozen, lora, x)
    merged = model.apply(lj.merge(frozen, lora), x)
    w = lora["params"]["kernel"]
    ref = (
        as_f64(x) @ as_f64(variables["params"]["kernel"])
        + as_f64(variables["params"]["bias"])
        + 2.0 * (as_f64(x) @ as_f64(w.a)) @ as_f64(w.b)
    )
    tol = {"float32": 1e-5, "bfloat16": 6e-2, "float16": 6e-3}[dtype]
    scale = 1.0 + np.abs(ref).max()
    np.testing.assert_allclose(as_f64(y), ref, atol=tol * scale, rtol=tol)
    np.testing.assert_allclose(as_f64(merged), ref, atol=tol * scale, rtol=tol)
    back = lj.unmerge(lj.merge(frozen, lora), lora)
    np.testing.assert_allclose(
        as_f64(back["params"]["kernel"]), as_f64(variables["params"]["kernel"]), atol=tol * 4
    )


def test_tiny_at_init_is_bitwise_base(tiny):
    model, variables, ids, layouts = tiny
    config = lj.LoraConfig(rank=3, targets=[".*/kernel", ".*/embedding", ".*/gate"])
    frozen, lora = lj.split(variables, config, key=jax.random.key(2), layouts=layouts)
    y = lj.lora_apply(model.apply)(frozen, lora, ids)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(model.apply(variables, ids)))


def test_tiny_factored_equals_merged(tiny, tiny_lora):
    model, _, ids, _ = tiny
    _, frozen, lora = tiny_lora
    y = jax.jit(lj.lora_apply(model.apply))(frozen, lora, ids)
    ref = model.apply(lj.merge(frozen, lora), ids)
    assert np.abs(np.asarray(y) - np.asarray(model.apply(frozen, ids))).max() > 1e-2
    np.testing.assert_allclose(y, ref, rtol=2e-5, atol=2e-5)


def test_unmerge_recovers_base(tiny, tiny_lora):
    _, frozen, lora = tiny_lora
    back = lj.unmerge(lj.merge(frozen, lora), lora)
    for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(frozen), strict=True):
        np.testing.assert_allclose(x, y, atol=1e-6)


def test_grad_is_nonzero_for_a_and_b(tiny, tiny_lora):
    model, _, ids, _ = tiny
    _, frozen, lora = tiny_lora
    apply = lj.lora_apply(model.apply)
    grads = jax.jit(jax.grad(lambda lo: jnp.sum(apply(frozen, lo, ids) ** 2)))(lora)
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        assert float(jnp.abs(g).max()) > 0, jax.tree_util.keystr(path)


def _dot_shapes(jaxpr) -> list[tuple[int, ...]]:
    shapes = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            shapes.append(tuple(eqn.outvars[0].aval.shape))
        for sub in jax.core.subjaxprs(eqn) if hasattr(jax.core, "subjaxprs") else ():
            shapes.extend(_dot_shapes(sub))
        for param in eqn.params.values():
            inner = getattr(param, "jaxpr", param)
            if hasattr(inner, "eqns"):
                shapes.extend(_dot_shapes(inner))
    return shapes


class _TwoDense(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(24, name="fc2")(jnp.tanh(nn.Dense(40, name="fc1")(x)))


@pytest.mark.parametrize("factored", [True, False])
def test_no_kernel_sized_gradient(factored):
    """The factored path never computes dW; the merged path (the control) does."""
    model = _TwoDense()
    x = jnp.ones((5, 32))
    variables = model.init(jax.random.key(0), x)
    config = lj.LoraConfig(rank=4, targets=".*/kernel")
    frozen, lora = lj.split(variables, config, key=jax.random.key(1))
    if factored:
        apply = lj.lora_apply(model.apply)
    else:
        apply = lambda f, lo, x: model.apply(lj.merge(f, lo), x)
    loss = lambda lo: jnp.sum(apply(frozen, lo, x))
    shapes = set(_dot_shapes(jax.make_jaxpr(jax.grad(loss))(lora).jaxpr))
    kernel_shapes = {(32, 40), (40, 32), (40, 24), (24, 40)}
    assert bool(shapes & kernel_shapes) is not factored, shapes


def test_one_trace_for_many_lora_values(tiny, tiny_lora):
    model, _, ids, _ = tiny
    _, frozen, lora = tiny_lora
    apply = lj.lora_apply(model.apply)
    traces = []

    @jax.jit
    def f(lo):
        traces.append(1)
        return apply(frozen, lo, ids)

    outs = [f(perturb(lora, jax.random.key(i))) for i in range(3)]
    assert len(traces) == 1
    assert not np.allclose(outs[0], outs[1])


def test_vmap_over_inputs(mlp):
    model, variables, x = mlp
    config = lj.LoraConfig(rank=2, targets=".*/kernel")
    frozen, lora = lj.split(variables, config, key=jax.random.key(1))
    lora = perturb(lora, jax.random.key(2))
    apply = lj.lora_apply(model.apply)
    batched = jax.vmap(lambda xi: apply(frozen, lora, xi))(x)
    single = jnp.stack([apply(frozen, lora, xi) for xi in x])
    np.testing.assert_allclose(batched, single, rtol=1e-6, atol=1e-6)


def test_vmap_over_adapters(mlp):
    model, variables, x = mlp
    config = lj.LoraConfig(rank=2, targets=".*/kernel")
    frozen, lora = lj.split(variables, config, key=jax.random.key(1))
    loras = [perturb(lora, jax.random.key(i)) for i in range(3)]
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *loras)
    apply = lj.lora_apply(model.apply)
    out = jax.vmap(lambda lo: apply(frozen, lo, x))(stacked)
    for i, lo in enumerate(loras):
        np.testing.assert_allclose(out[i], apply(frozen, lo, x), rtol=1e-6, atol=1e-6)


def test_dropout_only_with_rng_and_unbiased(mlp):
    model, variables, x = mlp
    config = lj.LoraConfig(rank=4, targets=".*/fc1/kernel", dropout=0.5)
    frozen, lora = lj.split(variables, config, key=jax.random.key(1))
    lora = perturb(lora, jax.random.key(2), 0.5)
    apply = jax.jit(lj.lora_apply(model.apply))
    with pytest.warns(UserWarning, match=r"LoRA dropout .* no 'lora_dropout' rng"):
        plain = apply(frozen, lora, x)  # no rng: no dropout, and a warning says so
    np.testing.assert_array_equal(plain, apply(frozen, lora, x))  # deterministic without rng
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # deterministic=True: the same numbers, no warning
        evaluate = lj.lora_apply(model.apply, deterministic=True)
        np.testing.assert_array_equal(plain, evaluate(frozen, lora, x))
        evaluate(frozen, lora, x, rngs={lj.DROPOUT_RNG: jax.random.key(5)})
    rngs = lambda k: {lj.DROPOUT_RNG: k}
    one = apply(frozen, lora, x, rngs=rngs(jax.random.key(5)))
    np.testing.assert_array_equal(one, apply(frozen, lora, x, rngs=rngs(jax.random.key(5))))
    assert not np.allclose(one, plain)
    # Inverted dropout is unbiased on the (linear) low-rank path of a single Dense.
    dense = nn.Dense(4)
    dv = dense.init(jax.random.key(0), x)
    dconfig = lj.LoraConfig(rank=4, targets=".*/kernel", dropout=0.5)
    f, lo = lj.split(dv, dconfig, key=jax.random.key(1))
    lo = perturb(lo, jax.random.key(2), 0.5)
    dapply = lj.lora_apply(dense.apply)
    n = 4000
    samples = jax.vmap(lambda k: dapply(f, lo, x, rngs=rngs(k)))(
        jax.random.split(jax.random.key(7), n)
    )
    stderr = np.asarray(samples.std(0)) / np.sqrt(n)
    mean = lj.lora_apply(dense.apply, deterministic=True)(f, lo, x)
    assert (np.abs(np.asarray(samples.mean(0) - mean)) < 5 * stderr + 1e-6).all()


def test_dropout_inside_scan_needs_split_rngs():
    from test_layers import _Stack

    x = jnp.ones((2, 6))
    model = _Stack()
    variables = model.init(jax.random.key(0), x)
    config = lj.LoraConfig(rank=2, targets=".*/kernel", dropout=0.1)
    frozen, lora = lj.split(
        variables,
        config,
        key=jax.random.key(1),
        layouts=lj.infer_layouts(model.apply, variables, x),
    )
    apply = lj.lora_apply(model.apply)
    with pytest.raises(ValueError, match=r"params/layers/fc/kernel: .*split_rngs"):
        apply(frozen, lora, x, rngs={lj.DROPOUT_RNG: jax.random.key(0)})


def test_tiny_dropout_runs_in_scan_with_split_rngs(tiny, tiny_lora):
    model, _, ids, _ = tiny
    _, frozen, lora = tiny_lora
    is_w = lambda w: isinstance(w, lj.LoraWeights)
    lora = jax.tree.map(lambda w: w.replace(dropout=0.2), lora, is_leaf=is_w)
    apply = lj.lora_apply(model.apply)
    y = apply(frozen, lora, ids, rngs={lj.DROPOUT_RNG: jax.random.key(0)})
    assert np.isfinite(np.asarray(y)).all()
    # params/gate is served by the contraction rewrite: its dropout runs there too.
    only_gate = {"params": {"gate": lora["params"]["gate"]}}
    runs = [
        apply(frozen, perturb(only_gate, jax.random.key(2)), ids, rngs={lj.DROPOUT_RNG: k})
        for k in jax.random.split(jax.random.key(3), 2)
    ]
    assert not np.allclose(runs[0], runs[1])


def test_bf16_base_keeps_dtypes(tiny):
    _, variables, _, layouts = tiny
    bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), variables)
    config = lj.LoraConfig(rank=2, targets=".*/kernel")
    frozen, lora = lj.split(bf16, config, key=jax.random.key(0), layouts=layouts)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(lora))
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(frozen))
    merged = lj.merge(frozen, perturb(lora, jax.random.key(1)))
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(merged))


def test_plain_function_is_factored_by_the_rewrite():
    params = {"w": jnp.ones((4, 3)) * 0.5}
    fn = lambda p, x: jnp.tanh(x @ p["w"])
    config = lj.LoraConfig(rank=2, targets="w")
    frozen, lora = lj.split(params, config, key=jax.random.key(0))
    lora = perturb(lora, jax.random.key(1))
    x = jnp.ones((2, 4))
    y = lj.lora_apply(fn)(frozen, lora, x)
    np.testing.assert_allclose(y, fn(lj.merge(frozen, lora), x), rtol=1e-6)
    assert lj.routes(fn, frozen, lora, x) == {"w": "factored (dot_general)"}


def test_lora_that_does_not_fit_frozen(mlp, tiny):
    model, variables, x = mlp
    config = lj.LoraConfig(rank=2, targets=".*/kernel")
    _, lora = lj.split(variables, config, key=jax.random.key(0))
    apply = lj.lora_apply(model.apply)
    _, tiny_vars, _, _ = tiny
    with pytest.raises(ValueError, match=r"'params/fc1/kernel', which is not a parameter"):
        apply(tiny_vars, lora, x)
    bigger = mlp_wide_variables(x)
    with pytest.raises(
        ValueError, match=r"params/fc1/kernel: adapter shapes .* expected a=\(8, 2\), b=\(2, 32\)"
    ):
        apply(bigger, lora, x)
    with pytest.raises(ValueError, match="do not fit"):
        lj.merge(bigger, lora)
    with pytest.raises(TypeError, match="must hold only LoraWeights"):
        apply(variables, {"params": {"fc1": {"kernel": jnp.ones(3)}}}, x)


def mlp_wide_variables(x):
    from models import Mlp

    return Mlp(hidden=32).init(jax.random.key(0), x)


@pytest.mark.slow
@settings(max_examples=10, deadline=None)
@given(
    d_model=st.integers(2, 10),
    heads=st.integers(1, 3),
    head_dim=st.integers(1, 4),
    rank=st.integers(1, 2),
    seed=st.integers(0, 2**16),
)
def test_attention_property(d_model, heads, head_dim, rank, seed):
    """Multi-axis DenseGeneral kernels (q/k/v and out): base at init, merged and NumPy after."""
    model = nn.MultiHeadDotProductAttention(
        num_heads=heads, qkv_features=heads * head_dim, out_features=d_model
    )
    x = jax.random.normal(jax.random.key(seed), (2, 3, d_model))
    variables = model.init(jax.random.key(seed + 1), x)
    layouts = lj.infer_layouts(model.apply, variables, x)
    rank = min(rank, d_model, heads * head_dim)
    config = lj.LoraConfig(rank=rank, alpha=3.0, targets="attention")
    frozen, lora = lj.split(variables, config, key=jax.random.key(seed + 2), layouts=layouts)
    # Both jitted: XLA's fused code and op-by-op execution of the base itself differ in ulps.
    apply = jax.jit(lj.lora_apply(model.apply))
    np.testing.assert_array_equal(apply(frozen, lora, x), jax.jit(model.apply)(variables, x))
    merged = lj.merge(frozen, lora)
    for got, want in zip(jax.tree.leaves(merged), jax.tree.leaves(variables), strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    lora = perturb(lora, jax.random.key(seed + 3), 0.3)
    merged = lj.merge(frozen, lora)
    np.testing.assert_allclose(apply(frozen, lora, x), model.apply(merged, x), rtol=2e-5, atol=2e-5)
    w = lora["params"]["query"]["kernel"]  # NumPy reference of one merged kernel
    ref = as_f64(variables["params"]["query"]["kernel"]) + (3.0 / rank) * np.tensordot(
        as_f64(w.a), as_f64(w.b), axes=1
    )
    np.testing.assert_allclose(as_f64(merged["params"]["query"]["kernel"]), ref, atol=1e-5)


@pytest.mark.slow
@settings(max_examples=10, deadline=None)
@given(
    d_in=st.integers(2, 12),
    d_out=st.integers(2, 12),
    stack=st.integers(0, 2),
    seed=st.integers(0, 2**16),
)
def test_pissa_split_then_merge_returns_the_tree(d_in, d_out, stack, seed):
    shape = (stack, d_in, d_out) if stack else (d_in, d_out)
    w = jax.random.normal(jax.random.key(seed), shape)
    layouts = {"w": lj.Layout("dense", (1,), (2,), (0,))} if stack else None
    rank = 1 + seed % min(d_in, d_out)
    config = lj.LoraConfig(rank=rank, targets="w", init="pissa")
    frozen, lora = lj.split(
        {"w": w, "b": jnp.ones(3)}, config, key=jax.random.key(0), layouts=layouts
    )
    back = lj.merge(frozen, lora)
    np.testing.assert_allclose(back["w"], w, atol=2e-5)
    np.testing.assert_array_equal(back["b"], jnp.ones(3))


class _WithFlag(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
        return nn.Dropout(0.5, deterministic=not train)(nn.Dense(4)(x))


def test_static_flags_and_shape_structs_in_abstract_traces():
    model, x = _WithFlag(), jnp.ones((2, 3))
    variables = model.init(jax.random.key(0), x, False)
    spec = jax.ShapeDtypeStruct((2, 3), jnp.float32)
    layouts = lj.infer_layouts(model.apply, variables, spec, False)
    assert layouts == {"params/Dense_0/kernel": lj.Layout("dense", (0,), (1,))}
    config = lj.LoraConfig(rank=1, targets=".*/kernel")
    frozen, lora = lj.split(variables, config, key=jax.random.key(0))
    rngs = {"dropout": jax.random.key(1)}
    routes = lj.routes(model.apply, frozen, lora, x, True, rngs=rngs)
    assert routes == {"params/Dense_0/kernel": "factored (Dense)"}
