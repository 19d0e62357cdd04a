"""`train.sampling`: KV-cache generation against a no-cache reference loop, through the base,
unmerged adapters and merged weights; `pick` (greedy, top-k, temperature) and the errors."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lj
from train.models import Llama, LlamaConfig, init_cache
from train.sampling import generate, pick

SIZES = dict(
    vocab_size=61,
    hidden_size=32,
    intermediate_size=48,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    max_seq_len=32,
)
PROMPT = np.array([[3, 14, 15, 9, 26], [53, 5, 8, 9, 7]], np.int32)  # a batch of 2 prompts
NEW = 10


@dataclasses.dataclass(frozen=True)
class Forward:
    """``forward(params, ids, cache)`` for `generate`: hashable by value (a static argument).
    With `lora` set, params are ``(frozen, lora)`` and the low-rank path runs factored."""

    config: LlamaConfig
    lora: bool = False

    def __call__(self, params, ids, cache):
        apply = Llama(self.config).apply
        if not self.lora:
            return apply(params, ids, cache=cache)
        return lj.lora_apply(apply)(params[0], params[1], ids, cache=cache)


def random_model(scan_layers: bool) -> tuple[LlamaConfig, dict]:
    """Weights drawn large enough that the logits have clear winners (norm scales near 1)."""
    config = LlamaConfig(**SIZES, scan_layers=scan_layers)
    shapes = jax.eval_shape(Llama(config).init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
    rng = np.random.default_rng(0)
    variables = jax.tree_util.tree_map_with_path(
        lambda path, leaf: jnp.asarray(
            0.3 * rng.standard_normal(leaf.shape) + (path[-1].key == "scale"), jnp.float32
        ),
        shapes,
    )
    return config, variables


@functools.partial(jax.jit, static_argnums=0)
def logits_without_cache(config: LlamaConfig, variables, ids):
    return Llama(config).apply(variables, ids)


def greedy_without_cache(config: LlamaConfig, variables, prompt: np.ndarray, new: int):
    """The reference: the full forward, no cache, on the whole sequence so far, argmax
    appended each step. The sequence sits in a fixed-size buffer (one compilation) whose
    unfilled tail holds filler ids, which a causal model never lets earlier positions see.
    Also returns the smallest gap between the best and second-best logit."""
    batch, length = prompt.shape
    ids = np.full((batch, length + new), SIZES["vocab_size"] - 1, np.int32)
    ids[:, :length] = prompt
    gap = np.inf
    for t in range(length - 1, length + new - 1):
        logits = np.asarray(logits_without_cache(config, variables, jnp.asarray(ids)))[:, t]
        top2 = np.sort(logits, axis=-1)[:, -2:]
        gap = min(gap, float((top2[:, 1] - top2[:, 0]).min()))
        ids[:, t + 1] = logits.argmax(-1)
    return ids[:, length:].tolist(), gap


def is_weights(x) -> bool:
    return isinstance(x, lj.LoraWeights)


def with_random_b(lora, seed: int):
    """Every adapter's B (zeros after `split`) replaced by random values."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda w: dataclasses.replace(
            w, b=jnp.asarray(0.5 * rng.standard_normal(w.b.shape), w.b.dtype)
        ),
        lora,
        is_leaf=is_weights,
    )


def greedy(forward: Forward, params, config: LlamaConfig) -> list[list[int]]:
    cache = init_cache(config, PROMPT.shape[0], PROMPT.shape[1] + NEW)
    return generate(
        forward, params, jnp.asarray(PROMPT), cache, max_new_tokens=NEW, key=jax.random.key(0)
    )


@pytest.mark.parametrize("scan_layers", [False, True], ids=["unrolled", "scanned"])
def test_greedy_with_cache_equals_full_recompute(scan_layers):
    config, variables = random_model(scan_layers)
    want, gap = greedy_without_cache(config, variables, PROMPT, NEW)
    assert gap > 1e-3  # no near-ties: float rounding cannot flip an argmax
    got = greedy(Forward(config), variables, config)
    assert got == want
    assert len(set(map(tuple, got))) == 2  # the two rows really differ


@pytest.mark.parametrize("scan_layers", [False, True], ids=["unrolled", "scanned"])
def test_greedy_through_lora_equals_merged_and_reference(scan_layers):
    config, variables = random_model(scan_layers)
    lora_config = lj.LoraConfig(rank=4, targets="all-linear")
    layouts = lj.infer_layouts(Llama(config).apply, variables, jnp.asarray(PROMPT))
    frozen, lora = lj.split(variables, lora_config, key=jax.random.key(1), layouts=layouts)
    assert all(not np.any(w.b) for w in jax.tree.leaves(lora, is_leaf=is_weights))
    lora = with_random_b(lora, seed=2)
    merged = jax.jit(lj.merge)(frozen, lora)
    ids = jnp.asarray(PROMPT)
    change = logits_without_cache(config, merged, ids) - logits_without_cache(
        config, variables, ids
    )
    assert np.abs(np.asarray(change)).max() > 0.1  # the adapters change the model

    want, gap = greedy_without_cache(config, merged, PROMPT, NEW)
    assert gap > 1e-3
    factored = greedy(Forward(config, lora=True), (frozen, lora), config)
    assert factored == want
    assert greedy(Forward(config), merged, config) == want


LOGITS = jax.random.normal(jax.random.key(7), (4, 20)) * 2.0


def test_pick_greedy_and_top_1():
    want = np.asarray(LOGITS).argmax(-1).tolist()
    assert pick(LOGITS, key=jax.random.key(0)).tolist() == want
    for seed in range(5):
        got = pick(LOGITS, key=jax.random.key(seed), temperature=1.5, top_k=1)
        assert got.dtype == jnp.int32
        assert got.tolist() == want


def test_pick_top_k_samples_only_the_k_largest():
    k = 3
    keys = jax.random.split(jax.random.key(1), 500)
    ids = np.asarray(jax.vmap(lambda key: pick(LOGITS, key=key, temperature=2.0, top_k=k))(keys))
    top = np.argsort(-np.asarray(LOGITS), axis=-1)[:, :k]
    for row in range(LOGITS.shape[0]):
        assert set(ids[:, row]) == set(top[row])  # only the top k, and each of them is drawn


def test_pick_temperature_matches_softmax_frequencies():
    logits = jnp.array([[1.0, 0.0, -0.5, 2.0, 0.3, -2.0]])
    temperature, n = 0.7, 4000
    keys = jax.random.split(jax.random.key(3), n)
    ids = np.asarray(jax.vmap(lambda key: pick(logits, key=key, temperature=temperature))(keys))
    freq = np.bincount(ids[:, 0], minlength=logits.shape[1]) / n
    z = np.asarray(logits[0], np.float64) / temperature
    p = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
    stderr = np.sqrt(p * (1 - p) / n)
    assert np.all(np.abs(freq - p) <= 4 * stderr + 1e-12), (freq, p)


def shift(params, ids, cache):
    """A toy model that always predicts ``id + 1`` (mod 5)."""
    return jax.nn.one_hot((ids + 1) % 5, 5) * 10.0, cache


def test_generate_errors():
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="`max_new_tokens` must be >= 1; found 0"):
        generate(shift, None, jnp.array([[0, 1]]), None, max_new_tokens=0, key=key)
    with pytest.raises(ValueError, match=r"`prompt` must be \(batch, length>0\).*\(2, 0\)"):
        generate(shift, None, jnp.zeros((2, 0), jnp.int32), None, max_new_tokens=3, key=key)
    with pytest.raises(ValueError, match=r"`prompt` must be .*\(3,\)"):
        generate(shift, None, jnp.array([0, 1, 2]), None, max_new_tokens=3, key=key)


def test_eos_cuts_each_row_after_its_first_eos():
    prompt, key = jnp.array([[0], [3], [1]]), jax.random.key(0)
    full = generate(shift, None, prompt, None, max_new_tokens=6, key=key)
    assert full == [[1, 2, 3, 4, 0, 1], [4, 0, 1, 2, 3, 4], [2, 3, 4, 0, 1, 2]]
    cut = generate(shift, None, prompt, None, max_new_tokens=6, key=key, eos_id=4)
    assert cut == [row[: row.index(4) + 1] for row in full] == [[1, 2, 3, 4], [4], [2, 3, 4]]
    short = generate(shift, None, prompt, None, max_new_tokens=2, key=key, eos_id=4)
    assert short == [[1, 2], [4], [2, 3]]  # a row without EOS is kept whole
