"""The contraction rewrite: LoRA factored wherever a contraction uses an adapted kernel.

Custom linen modules with raw ``self.param`` kernels, an NNX raw ``nnx.Param``, plain
functions of a params dict, scanned and rematerialized stacks, tied embeddings, control
flow. Each test compares outputs and gradients (w.r.t. the adapters) with the merged path
``fn(lj.merge(frozen, lora), ...)``, and with a float64 NumPy reference where cheap.
"""

from __future__ import annotations

import math
import re
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import as_f64, assert_tree_close, check_against_merged
from jax import lax

import lora_jax as lj

FACTORED = "factored (dot_general)"
D, HEADS, HEAD_DIM, T = 8, 2, 4, 5


def _normal(shape, seed, scale=1.0, dtype=np.float32):
    """Host-drawn values (eager `jax.random` compiles per shape; that is most of a test)."""
    return jnp.asarray((scale * np.random.default_rng(seed).standard_normal(shape)).astype(dtype))


def _fill(abstract, seed=1, scale=0.4, dtype=None):
    """Random values for the leaves of an abstract tree (`jax.eval_shape` of an init)."""
    leaves, treedef = jax.tree.flatten(abstract)
    return treedef.unflatten(
        [_normal(x.shape, seed + i, scale, dtype or x.dtype) for i, x in enumerate(leaves)]
    )


def _init(model, *args):
    return _fill(jax.eval_shape(model.init, jax.random.key(0), *args))


def _split(variables, targets, layouts=None, rank=2):
    """Adapters with random non-zero a and b (so the low-rank path is visible)."""
    config = lj.LoraConfig(rank=rank, alpha=2.0 * rank, targets=targets)
    frozen, lora = lj.split(variables, config, key=jax.random.key(2), layouts=layouts)
    return frozen, _fill(lora, seed=100, scale=0.3)


def _merged_f64(frozen, lora):
    """``{path: W + s·a@b}`` in float64 NumPy, for layouts in ``(*stack, *in, *out)`` order
    with at most one stack axis."""
    out = {}
    for kp, w in jax.tree_util.tree_leaves_with_path(
        lora, is_leaf=lambda x: isinstance(x, lj.LoraWeights)
    ):
        assert w.layout.perm == tuple(range(w.layout.ndim))
        base = frozen
        for k in kp:
            base = base[k.key]
        a, b = as_f64(w.a), as_f64(w.b)
        if w.layout.stack_axes:
            delta = np.stack([np.tensordot(a[i], b[i], 1) for i in range(a.shape[0])])
        else:
            delta = np.tensordot(a, b, 1)
        out["/".join(str(k.key) for k in kp)] = as_f64(base) + w.scale * delta
    return out


def _softmax(s):
    e = np.exp(s - s.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


# -- 1. custom linen attention: raw 3-D head kernels and jnp.einsum ------------------------
class _Attention(nn.Module):
    """MQA with raw kernels: q (d, heads, head_dim); k and v (d, head_dim) or stacked in one
    (d, 2, head_dim); out (heads, head_dim, d)."""

    stacked_kv: bool = False

    @nn.compact
    def __call__(self, x):
        init = nn.initializers.normal(0.3)
        q = jnp.einsum("btd,dhk->bthk", x, self.param("q", init, (D, HEADS, HEAD_DIM)))
        if self.stacked_kv:
            kv = jnp.einsum("btd,dkh->btkh", x, self.param("kv", init, (D, 2, HEAD_DIM)))
            k, v = kv[:, :, 0], kv[:, :, 1]
        else:
            k = x @ self.param("k", init, (D, HEAD_DIM))
            v = jnp.einsum("btd,dk->btk", x, self.param("v", init, (D, HEAD_DIM)))
        p = jax.nn.softmax(jnp.einsum("bthk,bsk->bhts", q, k) / math.sqrt(HEAD_DIM), axis=-1)
        o = jnp.einsum("bhts,bsk->bthk", p, v)
        return jnp.einsum("bthk,hkd->btd", o, self.param("o", init, (HEADS, HEAD_DIM, D)))


def _attention_f64(p, x, stacked_kv):
    q = np.einsum("btd,dhk->bthk", x, p["params/q"])
    if stacked_kv:
        kv = np.einsum("btd,dkh->btkh", x, p["params/kv"])
        k, v = kv[:, :, 0], kv[:, :, 1]
    else:
        k, v = x @ p["params/k"], x @ p["params/v"]
    s = _softmax(np.einsum("bthk,bsk->bhts", q, k) / math.sqrt(HEAD_DIM))
    return np.einsum("bthk,hkd->btd", np.einsum("bhts,bsk->bthk", s, v), p["params/o"])


HEAD_LAYOUTS = {
    "params/q": lj.Layout("dense", in_axes=(0,), out_axes=(1, 2)),
    "params/kv": lj.Layout("dense", in_axes=(0,), out_axes=(1, 2)),
    "params/o": lj.Layout("dense", in_axes=(0, 1), out_axes=(2,)),
}


@pytest.mark.parametrize("stacked_kv", [False, True])
def test_custom_attention_with_raw_head_kernels(stacked_kv):
    model = _Attention(stacked_kv)
    x = _normal((2, T, D), 0)
    frozen, lora = _split(_init(model, x), "params/.*", HEAD_LAYOUTS)
    routes = lj.routes(model.apply, frozen, lora, x)
    assert set(routes.values()) == {FACTORED}, routes
    assert len(routes) == (3 if stacked_kv else 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing merged, so no warning
        y = check_against_merged(lj.lora_apply(model.apply), model.apply, frozen, lora, x)
    assert_tree_close(y, _attention_f64(_merged_f64(frozen, lora), as_f64(x), stacked_kv))
    assert np.abs(np.asarray(y - jax.jit(model.apply)(frozen, x))).max() > 1e-2


# -- 2. NNX: a raw nnx.Param used by x @ w --------------------------------------------------
class _RawNnx(nnx.Module):
    def __init__(self, w):
        self.w = nnx.Param(w)

    def __call__(self, x):
        return jnp.tanh(x @ self.w)


def test_nnx_raw_param():
    """The NNX pure form sends a raw ``nnx.Param`` through the rewrite too; its route per
    use shows once example inputs are given."""
    graphdef, state = nnx.split(_RawNnx(_normal((6, 5), 1, 0.4)))
    frozen, lora = _split(state, "w")
    x = _normal((4, 6), 0)
    assert lj.routes(graphdef, frozen, lora, x) == {"w": FACTORED}
    assert "give example inputs" in lj.routes(graphdef, frozen, lora)["w"]
    base = lambda params, x: nnx.merge(graphdef, params)(x)
    y = check_against_merged(lj.lora_apply(graphdef), base, frozen, lora, x)
    assert_tree_close(y, np.tanh(as_f64(x) @ _merged_f64(frozen, lora)["w"]))


# -- 3. plain functions of a params dict, no Flax --------------------------------------------
def _mlp(p, x):
    return jax.nn.gelu(x @ p["w1"] + p["b1"]) @ p["w2"]


def test_plain_function_mlp():
    params = {"w1": _normal((6, 10), 1, 0.3), "b1": jnp.zeros(10), "w2": _normal((10, 3), 2, 0.3)}
    x = _normal((4, 6), 0)
    frozen, lora = _split(params, "w.*")
    assert lj.routes(_mlp, frozen, lora, x) == {"w1": FACTORED, "w2": FACTORED}
    y = check_against_merged(lj.lora_apply(_mlp), _mlp, frozen, lora, x)
    w = _merged_f64(frozen, lora)
    h = as_f64(x) @ w["w1"]
    gelu = 0.5 * h * (1 + np.tanh(np.sqrt(2 / np.pi) * (h + 0.044715 * h**3)))
    assert_tree_close(y, gelu @ w["w2"])


USES = {
    "matmul": lambda p, x: x @ p["w"],
    "kernel on the left": lambda p, x: jnp.einsum("df,td->tf", p["w"], x),
    "transposed twice": lambda p, x: (p["w"].T @ x.T).T,
    "tensordot": lambda p, x: jnp.tensordot(x, p["w"], axes=1),
    "vmap over rows": lambda p, x: jax.vmap(lambda row: row @ p["w"])(x),
}


@pytest.mark.parametrize("use", sorted(USES))
def test_plain_function_contraction_forms(use):
    fn = USES[use]
    frozen, lora = _split({"w": _normal((6, 5), 1, 0.4)}, "w")
    x = _normal((4, 6), 0)
    assert lj.routes(fn, frozen, lora, x) == {"w": FACTORED}
    y = check_against_merged(lj.lora_apply(fn), fn, frozen, lora, x)
    assert_tree_close(y, as_f64(x) @ _merged_f64(frozen, lora)["w"])
    assert_tree_close(lj.lora_apply(fn)(frozen, lora, x), y)  # eager: concrete values, not tracers


def _loop_over_layers(p, x):
    for w in p["params"]["layers"] if "layers" in p["params"] else p["params"].values():
        x = jnp.tanh(x @ w)
    return x


@pytest.mark.parametrize("container", ["dict", "list"])
def test_plain_function_over_a_params_collection(container):
    """A plain function whose tree has a top-level ``params`` key, as Flax's has."""
    ws = [_normal((6, 6), 1, 0.4), _normal((6, 3), 2, 0.4)]
    layers = {"w1": ws[0], "w2": ws[1]} if container == "dict" else {"layers": ws}
    frozen, lora = _split({"params": layers}, "params/.*")
    x = _normal((4, 6), 0)
    assert set(lj.routes(_loop_over_layers, frozen, lora, x).values()) == {FACTORED}
    check_against_merged(lj.lora_apply(_loop_over_layers), _loop_over_layers, frozen, lora, x)


# -- 4. scanned stacks: nn.scan(nn.remat(...)) and lax.scan -----------------------------------
class _Block(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        w = self.param("w", nn.initializers.normal(0.4), (6, 6))
        return jnp.tanh(x @ w), None


class _Stack(nn.Module):
    layers: int = 3

    @nn.compact
    def __call__(self, x):
        scan = nn.scan(
            nn.remat(_Block),
            variable_axes={"params": 0},
            split_rngs={"params": True},
            length=self.layers,
        )
        return scan(name="stack")(x, None)[0]


def _scan_f64(stacked, x):
    for w in stacked:
        x = np.tanh(x @ w)
    return x


def test_nn_scan_of_remat_block_with_raw_kernel():
    model = _Stack()
    x = _normal((4, 6), 0)
    layout = lj.Layout("dense", in_axes=(1,), out_axes=(2,), stack_axes=(0,))
    frozen, lora = _split(_init(model, x), ".*/w", {"params/stack/w": layout})
    assert lj.routes(model.apply, frozen, lora, x) == {"params/stack/w": FACTORED}
    y = check_against_merged(lj.lora_apply(model.apply), model.apply, frozen, lora, x)
    assert_tree_close(y, _scan_f64(_merged_f64(frozen, lora)["params/stack/w"], as_f64(x)))


def _lax_scan_stack(p, x):
    return lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, p["w"])[0]


def test_lax_scan_over_stacked_params():
    frozen, lora = _split(
        {"w": _normal((3, 6, 6), 1, 0.4)},
        "w",
        {"w": lj.Layout("dense", in_axes=(1,), out_axes=(2,), stack_axes=(0,))},
    )
    x = _normal((4, 6), 0)
    assert lj.routes(_lax_scan_stack, frozen, lora, x) == {"w": FACTORED}
    y = check_against_merged(lj.lora_apply(_lax_scan_stack), _lax_scan_stack, frozen, lora, x)
    assert_tree_close(y, _scan_f64(_merged_f64(frozen, lora)["w"], as_f64(x)))


def test_batched_einsum_over_an_expert_axis():
    """An experts axis as a ``dot_general`` batch dimension: per-expert factors."""
    fn = lambda p, x: jnp.einsum("ebd,edf->ebf", x, p["w"])
    frozen, lora = _split(
        {"w": _normal((3, 6, 5), 1, 0.4)},
        "w",
        {"w": lj.Layout("dense", in_axes=(1,), out_axes=(2,), stack_axes=(0,))},
    )
    x = _normal((3, 4, 6), 0)
    assert lj.routes(fn, frozen, lora, x) == {"w": FACTORED}
    y = check_against_merged(lj.lora_apply(fn), fn, frozen, lora, x)
    assert_tree_close(y, np.einsum("ebd,edf->ebf", as_f64(x), _merged_f64(frozen, lora)["w"]))


# -- 5. tied embeddings: one table, lookup and output head ------------------------------------
VOCAB = 11
IDS = jnp.array([[1, 3, 5], [0, 10, 2]])


class _TiedRaw(nn.Module):
    @nn.compact
    def __call__(self, ids):
        table = self.param("table", nn.initializers.normal(1.0), (VOCAB, D))
        return jnp.tanh(table[ids]) @ table.T


def test_tied_raw_embedding_factored_in_both_uses():
    model = _TiedRaw()
    frozen, lora = _split(_init(model, IDS), "params/table")
    route = lj.routes(model.apply, frozen, lora, IDS)["params/table"]
    assert route == "factored (dot_general); factored (gather)"
    y = check_against_merged(lj.lora_apply(model.apply), model.apply, frozen, lora, IDS)
    table = _merged_f64(frozen, lora)["params/table"]
    assert_tree_close(y, np.tanh(table[np.asarray(IDS)]) @ table.T)


class _TiedStockEmbed(nn.Module):
    @nn.compact
    def __call__(self, ids):
        embed = nn.Embed(VOCAB, D, name="embed")
        return jnp.tanh(embed(ids)) @ embed.embedding.T


class _TiedStockEmbedNnx(nnx.Module):
    def __init__(self, rngs):
        self.embed = nnx.Embed(VOCAB, D, rngs=rngs)

    def __call__(self, ids):
        return jnp.tanh(self.embed(ids)) @ self.embed.embedding[...].T


def test_tied_stock_embed_also_used_by_hand():
    model = _TiedStockEmbed()
    variables = _init(model, IDS)
    layouts = lj.infer_layouts(model.apply, variables, IDS)
    frozen, lora = _split(variables, ".*/embedding", layouts)
    check_against_merged(lj.lora_apply(model.apply), model.apply, frozen, lora, IDS)


def test_tied_stock_embed_also_used_by_hand_nnx():
    model = nnx.eval_shape(lambda: _TiedStockEmbedNnx(nnx.Rngs(0)))
    graphdef, state = nnx.split(model)
    frozen, lora = _split(_fill(state), ".*/embedding", lj.infer_layouts(model))
    base = lambda params, ids: nnx.merge(graphdef, params)(ids)
    check_against_merged(lj.lora_apply(graphdef), base, frozen, lora, IDS)


# -- 6. control flow and a custom_vjp use ------------------------------------------------------
@jax.custom_vjp
def _custom_matmul(x, w):
    return x @ w


def _custom_matmul_fwd(x, w):
    return x @ w, (x, w)


def _custom_matmul_bwd(res, g):
    x, w = res
    return g @ w.T, x.T @ g


_custom_matmul.defvjp(_custom_matmul_fwd, _custom_matmul_bwd)


def _control_flow(p, x, flag):
    h = lax.cond(flag, lambda h: h @ p["w1"], lambda h: -jnp.sin(h @ p["w1"]), x)
    h = jax.jit(lambda h, w: jnp.tanh(h @ w))(h, p["w2"])
    return _custom_matmul(h, p["w3"])


@pytest.mark.parametrize("flag", [True, False])
def test_cond_jit_and_custom_vjp(flag):
    frozen, lora = _split({f"w{i}": _normal((6, 6), i, 0.4) for i in (1, 2, 3)}, "w.*")
    x, flag = _normal((4, 6), 0), jnp.asarray(flag)
    routes = lj.routes(_control_flow, frozen, lora, x, flag)
    assert routes["w1"] == routes["w2"] == FACTORED
    # The custom_vjp function's primal program is rewritten; its rule is for the base alone.
    assert (
        routes["w3"] == FACTORED + "; inside custom_vjp_call (differentiated by JAX, not its rule)"
    )
    check_against_merged(lj.lora_apply(_control_flow), _control_flow, frozen, lora, x, flag)


# -- 7. an elementwise use: merged for that use, one warning ----------------------------------
def _with_elementwise(p, x):
    return x @ p["w"] + jnp.sum(p["w"]) + 2.0 * p["w"][0]


def test_elementwise_use_is_merged_and_warned_once():
    frozen, lora = _split({"w": _normal((6, 6), 1, 0.4)}, "w")
    x = _normal((4, 6), 0)
    route = lj.routes(_with_elementwise, frozen, lora, x)["w"]
    assert FACTORED in route and "merged (used by reduce_sum)" in route, route
    apply = lj.lora_apply(_with_elementwise)
    with pytest.warns(UserWarning, match=r"1 adapter\(s\) run merged.*w \(.*reduce_sum") as rec:
        check_against_merged(apply, _with_elementwise, frozen, lora, x)
    assert len([r for r in rec if "run merged" in str(r.message)]) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        jax.eval_shape(apply, frozen, lora, x)  # same structure: no second warning


# -- 8. the compiled gradient step holds no weight-sized contraction ---------------------------
class _Projections(nn.Module):
    """Kernels of 48*80 = 3840 elements; no other value here has that many."""

    @nn.compact
    def __call__(self, x):
        init = nn.initializers.normal(0.1)
        h = jnp.einsum("td,dhk->thk", x, self.param("q", init, (48, 2, 40)))
        return jnp.tanh(h.reshape(h.shape[0], 80)) @ self.param("out", init, (80, 48))


_CONTRACTION = re.compile(r"= \(?\w+\[([\d,]*)\][^=]*? (?:dot|convolution|custom-call)\(")


def _contraction_sizes(hlo: str) -> list[int]:
    """Element counts of the results of every dot, convolution and custom call."""
    return [math.prod(int(d) for d in dims.split(",") if d) for dims in _CONTRACTION.findall(hlo)]


@pytest.mark.parametrize("factored", [True, False])
def test_compiled_gradient_has_no_weight_sized_contraction(factored):
    model = _Projections()
    x = _normal((6, 48), 0)
    layouts = {"params/q": lj.Layout("dense", in_axes=(0,), out_axes=(1, 2))}
    frozen, lora = _split(_init(model, x), "params/.*", layouts, rank=4)
    if factored:
        apply = lj.lora_apply(model.apply)
    else:
        apply = lambda f, lo, x: model.apply(lj.merge(f, lo), x)
    loss = lambda lo, f, x: jnp.sum(apply(f, lo, x) ** 2)
    hlo = jax.jit(jax.grad(loss)).lower(lora, frozen, x).compile().as_text()
    sizes = _contraction_sizes(hlo)
    assert sizes, "no contraction found: has the HLO text format changed?"
    assert (48 * 80 in sizes) is not factored, sizes


# -- 9. jit of the whole apply, bf16 base -----------------------------------------------------
def test_jit_with_bf16_base_keeps_dtype():
    model = _Attention(stacked_kv=True)
    x = _normal((2, T, D), 0, dtype=jnp.bfloat16)
    variables = _fill(jax.eval_shape(model.init, jax.random.key(0), x), dtype=jnp.bfloat16)
    frozen, lora = _split(variables, "params/.*", HEAD_LAYOUTS)
    assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(lora))
    y = jax.jit(lj.lora_apply(model.apply))(frozen, lora, x)
    assert y.dtype == jax.eval_shape(model.apply, frozen, x).dtype == jnp.bfloat16
    assert bool(jnp.isfinite(y).all())
    merged = jax.jit(lambda f, lo, x: model.apply(lj.merge(f, lo), x))(frozen, lora, x)
    assert_tree_close(y, merged, tol=5e-2)
    assert_tree_close(y, _attention_f64(_merged_f64(frozen, lora), as_f64(x), True), tol=5e-2)
