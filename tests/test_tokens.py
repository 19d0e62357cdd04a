"""Trainable token rows (`lj.tokens`), against NumPy and dense-table references: the rows
are replaced in the lookup and the head, the gradient of the rows is the dense table's
gradient at those rows, training moves those rows only (optimizer state for them alone),
and every bad input is a specific error."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import lora_jax as lj

VOCAB, DIM = 16, 8
EMBED, MIX, HEAD = "params/embed/embedding", "params/mix/kernel", "params/head/kernel"
IDX = [11, 2, 7]


class TinyLM(nn.Module):
    """Embedding, one Dense with tanh, and a tied (``embed.attend``) or untied head."""

    tied: bool = False

    @nn.compact
    def __call__(self, ids):
        embed = nn.Embed(VOCAB, DIM, name="embed")
        h = jnp.tanh(nn.Dense(DIM, name="mix")(embed(ids)))
        if self.tied:
            return embed.attend(h)
        return nn.Dense(VOCAB, use_bias=False, name="head")(h)


def _numpy_logits(p, ids, tied):
    """The same model in NumPy (float64), from plain arrays."""
    table = np.asarray(p["embed"]["embedding"], np.float64)
    mix = p["mix"]
    h = np.tanh(table[ids] @ np.asarray(mix["kernel"], np.float64) + np.asarray(mix["bias"]))
    return h @ (table.T if tied else np.asarray(p["head"]["kernel"], np.float64))


def _setup(tied):
    model = TinyLM(tied=tied)
    ids = jax.random.randint(jax.random.key(1), (4, 6), 0, VOCAB).at[0, :3].set(jnp.array(IDX))
    variables = model.init(jax.random.key(0), ids)
    return model, variables, ids


def _rows_at(tree, path):
    node = tree
    for key in path.split("/"):
        node = node[key]
    return node


def _paths(tied):
    return {EMBED: IDX} if tied else {EMBED: IDX, HEAD: [3, 11]}


@pytest.mark.parametrize("tied", [False, True])
def test_rows_replace_the_lookup_and_the_head(tied):
    model, variables, ids = _setup(tied)
    rows = lj.tokens.select(variables, _paths(tied))
    emb = _rows_at(rows, EMBED)
    table = np.asarray(variables["params"]["embed"]["embedding"])
    np.testing.assert_array_equal(np.asarray(emb.values), table[IDX])  # starts at the rows
    assert (emb.indices, emb.axis, emb.values.dtype) == (tuple(IDX), 0, jnp.float32)
    new = jax.random.normal(jax.random.key(5), emb.values.shape)
    rows = jax.tree.map(lambda x: x, rows)
    rows["params"]["embed"]["embedding"] = emb.replace(values=new)
    want = {k: dict(v) for k, v in variables["params"].items()}
    want["embed"]["embedding"] = table.copy()
    want["embed"]["embedding"][IDX] = np.asarray(new)
    if not tied:
        head = _rows_at(rows, HEAD)
        kernel = np.asarray(variables["params"]["head"]["kernel"])
        assert head.axis == 1 and head.values.shape == (2, DIM)
        np.testing.assert_array_equal(np.asarray(head.values), kernel[:, [3, 11]].T)
        rows["params"]["head"]["kernel"] = head.replace(values=head.values * 3.0 + 1.0)
        want["head"]["kernel"] = kernel.copy()
        want["head"]["kernel"][:, [3, 11]] = np.asarray(head.values * 3.0 + 1.0).T
    merged = lj.tokens.apply(variables, rows)
    got = np.asarray(jax.jit(model.apply)(merged, ids))
    np.testing.assert_allclose(got, _numpy_logits(want, ids, tied), atol=1e-5)
    assert merged["params"]["mix"]["kernel"] is variables["params"]["mix"]["kernel"]
    np.testing.assert_array_equal(np.asarray(variables["params"]["embed"]["embedding"]), table)


def test_gradient_of_a_lookup_is_the_numpy_sum_over_occurrences():
    params = {"params": {"embed": {"embedding": jnp.zeros((VOCAB, DIM))}}}
    rows = lj.tokens.select(params, {EMBED: IDX})
    ids = np.array([[11, 2, 11, 5], [0, 11, 7, 7]])
    w = np.random.default_rng(0).normal(size=(*ids.shape, DIM)).astype(np.float32)

    def loss(rows):
        table = lj.tokens.apply(params, rows)["params"]["embed"]["embedding"]
        return jnp.sum(table[ids] * w)

    got = _rows_at(jax.grad(loss)(rows), EMBED).values
    dense = np.zeros((VOCAB, DIM), np.float32)
    np.add.at(dense, ids, w)  # d loss / d table, by hand
    np.testing.assert_allclose(np.asarray(got), dense[IDX], rtol=1e-6)


@pytest.mark.parametrize("tied", [False, True])
def test_gradient_equals_the_dense_tables_gradient_at_the_rows(tied):
    model, variables, ids = _setup(tied)
    rows = lj.tokens.select(variables, _paths(tied))
    labels = jnp.roll(ids, 1, axis=1)

    def loss_of(params):
        logits = model.apply(params, ids)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    grads = jax.jit(jax.grad(lambda r: loss_of(lj.tokens.apply(variables, r))))(rows)
    dense = jax.jit(jax.grad(loss_of))(variables)["params"]  # every entry of every table
    np.testing.assert_allclose(
        np.asarray(_rows_at(grads, EMBED).values),
        np.asarray(dense["embed"]["embedding"])[IDX],
        rtol=1e-5,
        atol=1e-7,
    )
    if not tied:
        np.testing.assert_allclose(
            np.asarray(_rows_at(grads, HEAD).values),
            np.asarray(dense["head"]["kernel"])[:, [3, 11]].T,
            rtol=1e-5,
            atol=1e-7,
        )
    # no gradient reaches the frozen table, even when `frozen` itself is differentiated
    frozen_grads = jax.jit(jax.grad(lambda f: loss_of(lj.tokens.apply(f, rows))))(variables)
    assert not np.any(np.asarray(frozen_grads["params"]["embed"]["embedding"]))


@pytest.mark.parametrize("tied", [False, True])
def test_training_moves_only_the_rows_with_state_for_them_alone(tied):
    model, variables, ids = _setup(tied)
    config = lj.LoraConfig(rank=2, alpha=4.0, targets=".*/mix/kernel")
    frozen, lora = lj.split(variables, config, key=jax.random.key(2))
    rows = lj.tokens.select(frozen, _paths(tied))
    apply = lj.lora_apply(model.apply)
    labels = jnp.roll(ids, 1, axis=1)

    def loss_fn(trainable, frozen, ids):
        logits = apply(lj.tokens.apply(frozen, trainable["rows"]), trainable["lora"], ids)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    tx = optax.adam(5e-2)
    trainable = {"lora": lora, "rows": rows}
    opt_state = tx.init(trainable)
    n_rows = sum(len(v) for v in _paths(tied).values())
    moment = n_rows * DIM + (DIM * 2 + 2 * DIM)  # the rows, then lora's a and b
    assert sum(x.size for x in jax.tree.leaves(opt_state)) == 2 * moment + 1  # mu, nu, count
    assert _rows_at(opt_state[0].mu["rows"], EMBED).values.shape == (len(IDX), DIM)

    @jax.jit
    def step(trainable, opt_state, frozen):
        loss, grads = jax.value_and_grad(loss_fn)(trainable, frozen, ids)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    losses = []
    for _ in range(4):
        trainable, opt_state, loss = step(trainable, opt_state, frozen)
        losses.append(float(loss))
    assert losses[-1] < losses[0]
    assert step._cache_size() == 1  # one compile
    before = np.asarray(frozen["params"]["embed"]["embedding"])
    after = np.asarray(lj.tokens.apply(frozen, trainable["rows"])["params"]["embed"]["embedding"])
    others = np.setdiff1d(np.arange(VOCAB), IDX)
    np.testing.assert_array_equal(after[others], before[others])  # bit-identical
    assert np.all(np.abs(after[IDX] - before[IDX]).max(axis=1) > 1e-3)  # every row moved
    np.testing.assert_array_equal(np.asarray(frozen["params"]["embed"]["embedding"]), before)
    if not tied:
        head0 = np.asarray(frozen["params"]["head"]["kernel"])
        head1 = np.asarray(lj.tokens.apply(frozen, trainable["rows"])["params"]["head"]["kernel"])
        cols = np.setdiff1d(np.arange(VOCAB), [3, 11])
        np.testing.assert_array_equal(head1[:, cols], head0[:, cols])
        assert np.abs(head1[:, [3, 11]] - head0[:, [3, 11]]).min() > 0


def test_make_train_step_refuses_rows_loudly():
    """`make_train_step` trains `LoraWeights` trees; rows train with jax.grad + optax."""
    _, variables, _ = _setup(False)
    rows = lj.tokens.select(variables, {EMBED: IDX})
    tx = optax.adam(1e-2)
    step = lj.make_train_step(lambda f, r, b, k: jnp.sum(b), tx)
    state = lj.TrainState.create(rows, tx, key=jax.random.key(0))
    with pytest.raises(TypeError, match="must hold only LoraWeights"):
        step(state, variables, jnp.ones((2, 2)))


def test_dtype_and_nnx_state():
    table = jnp.arange(VOCAB * DIM, dtype=jnp.bfloat16).reshape(VOCAB, DIM)
    params = {"params": {"embed": {"embedding": table}}}
    rows = lj.tokens.select(params, {EMBED: [1]}, dtype=jnp.float32)
    assert _rows_at(rows, EMBED).values.dtype == jnp.float32
    assert lj.tokens.apply(params, rows)["params"]["embed"]["embedding"].dtype == jnp.bfloat16
    assert _rows_at(lj.tokens.select(params, {EMBED: [1]}), EMBED).values.dtype == jnp.bfloat16
    model = nnx.Embed(VOCAB, DIM, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    rows = lj.tokens.select(state, {"embedding": [4, 0]})
    rows = jax.tree.map(lambda v: v + 1.0, rows)
    merged = nnx.merge(graphdef, lj.tokens.apply(state, rows))
    out = merged(jnp.array([4, 5]))
    np.testing.assert_allclose(out[0], model.embedding.get_value()[4] + 1.0)
    np.testing.assert_array_equal(out[1], model.embedding.get_value()[5])


def test_errors_name_the_path_and_what_was_found():
    params = {
        "params": {
            "embed": {"embedding": jnp.zeros((VOCAB, DIM))},
            "norm": {"scale": jnp.ones(DIM)},
            "ids": {"embedding": jnp.zeros((VOCAB, DIM), jnp.int32)},
        }
    }
    select = lj.tokens.select
    with pytest.raises(ValueError, match=r"'params/embed/embeding' is not a parameter.*embed/"):
        select(params, {"params/embed/embeding": [1]})
    with pytest.raises(ValueError, match=r"indices \[16, 20\] are out of range for axis 0 of"):
        select(params, {EMBED: [1, 16, 20]})
    with pytest.raises(ValueError, match=r"must be distinct; repeated: \[3\]"):
        select(params, {EMBED: [3, 1, 3]})
    with pytest.raises(ValueError, match="non-empty list of ints; found an empty list"):
        select(params, {EMBED: []})
    with pytest.raises(ValueError, match=r"must be >= 0; found \[-1\]"):
        select(params, {EMBED: [-1]})
    with pytest.raises(ValueError, match="found non-integers"):
        select(params, {EMBED: [1.0]})
    with pytest.raises(ValueError, match=r"norm/scale: token rows need a 2-D float table.*\(8,\)"):
        select(params, {"params/norm/scale": [1]}, axis=0)
    with pytest.raises(ValueError, match=r"2-D float table.*int32"):
        select(params, {"params/ids/embedding": [1]})
    with pytest.raises(ValueError, match=r"cannot be told from the name 'scale' .*; pass axis=0"):
        select(params, {"params/norm/scale": [1]})
    with pytest.raises(ValueError, match=r"`axis` must be 0, 1 or None; found 2"):
        select(params, {EMBED: [1]}, axis=2)
    with pytest.raises(ValueError, match=r"non-empty \{path: \[ints\]\} dict"):
        select(params, {})
    quantized = {"params": {"head": {"kernel": jnp.ones((64, 16))}}}
    quantized = lj.quant.quantize(quantized, "int8")
    with pytest.raises(ValueError, match=r"quantized kernel \(QuantizedKernel.*not supported"):
        select(quantized, {"params/head/kernel": [1]})
    with pytest.raises(ValueError, match=r"`axis` must be 0 .* or 1"):
        lj.tokens.TokenRows(jnp.zeros((1, DIM)), (1,), axis=2)
    rows = lj.tokens.select(params, {EMBED: [1, 2]})
    bad = jax.tree.map(lambda v: v[:, :3], rows)
    with pytest.raises(ValueError, match=r"values must have shape \(n, dim\) = \(2, 8\).*\(2, 3\)"):
        lj.tokens.apply(params, bad)
    with pytest.raises(ValueError, match="not a parameter"):
        lj.tokens.apply({"params": {}}, rows)
    with pytest.raises(TypeError, match="must hold only TokenRows"):
        lj.tokens.apply(params, {"params": {"embed": {"embedding": jnp.zeros((2, DIM))}}})
