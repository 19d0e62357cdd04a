"""`make demo`: pretrain a tiny transformer on one task, then adapt it to another with LoRA.

Runs on a laptop CPU in well under a minute:

1. pretrain a 2-layer causal transformer on sequences where each token is the previous
   one plus 1 (mod 32);
2. freeze it and fine-tune LoRA adapters (rank 4, all linear layers) on a new rule, each
   token is 3 times the previous plus 1 (mod 32);
3. print the loss going down, the trainable share, and check that the base is untouched
   and that merged weights give the same predictions.

Usage: ``python -m train.demo``
"""

from __future__ import annotations

import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import lora_jax as lj

VOCAB, SEQ, DIM, HEADS, LAYERS, BATCH = 32, 16, 64, 4, 2, 32


class Block(nn.Module):
    @nn.compact
    def __call__(self, x):
        mask = nn.make_causal_mask(jnp.ones(x.shape[:2]))
        h = nn.LayerNorm()(x)
        x = x + nn.MultiHeadDotProductAttention(num_heads=HEADS, name="attn")(h, h, mask=mask)
        h = nn.Dense(4 * DIM, name="up")(nn.LayerNorm()(x))
        return x + nn.Dense(DIM, name="down")(nn.gelu(h))


class TinyLM(nn.Module):
    @nn.compact
    def __call__(self, ids):
        x = nn.Embed(VOCAB, DIM, name="embed")(ids)
        x = x + self.param("pos", nn.initializers.normal(0.02), (SEQ, DIM))
        for i in range(LAYERS):
            x = Block(name=f"block_{i}")(x)
        return nn.Dense(VOCAB, name="lm_head")(nn.LayerNorm()(x))


def batch(key: jax.Array, mult: int) -> jax.Array:
    """Sequences following x[t+1] = mult * x[t] + 1 (mod VOCAB)."""
    start = jax.random.randint(key, (BATCH, 1), 0, VOCAB)

    def step(x, _):
        return (mult * x + 1) % VOCAB, x

    return jax.lax.scan(step, start[:, 0], None, length=SEQ)[1].T


def next_token_loss(logits: jax.Array, ids: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:]).mean()


def pretrain(model: TinyLM, key: jax.Array, steps: int = 200) -> dict:
    variables = model.init(key, jnp.zeros((1, SEQ), jnp.int32))
    tx = optax.adam(3e-3)

    @jax.jit
    def step(variables, opt_state, key):
        ids = batch(key, 1)
        loss, grads = jax.value_and_grad(lambda v: next_token_loss(model.apply(v, ids), ids))(
            variables
        )
        updates, opt_state = tx.update(grads, opt_state)
        return optax.apply_updates(variables, updates), opt_state, loss

    opt_state = tx.init(variables)
    for i, k in enumerate(jax.random.split(key, steps)):
        variables, opt_state, loss = step(variables, opt_state, k)
        if i % 50 == 0 or i == steps - 1:
            print(f"  pretrain step {i:4d}  loss {float(loss):.4f}")
    return variables


def main() -> None:
    t0 = time.time()
    model = TinyLM()
    print("1) pretraining the base on x[t+1] = x[t] + 1 (mod 32)")
    variables = pretrain(model, jax.random.key(0))

    config = lj.LoraConfig(rank=4, alpha=8.0, targets="all-linear")
    example = jnp.zeros((1, SEQ), jnp.int32)
    layouts = lj.infer_layouts(model.apply, variables, example)
    frozen, lora = lj.split(variables, config, key=jax.random.key(1), layouts=layouts)
    apply = lj.lora_apply(model.apply, config)
    print("\n2) LoRA adapters, all linear layers but the head:")
    print(lj.summary(frozen, lora, lj.routes(model.apply, config, frozen, lora, example)))

    tx = optax.adam(1e-2)
    opt_state = tx.init(lora)

    @jax.jit
    def train_step(lora, opt_state, key):
        ids = batch(key, 3)
        loss_fn = lambda lo: next_token_loss(apply(frozen, lo, ids), ids)
        loss, grads = jax.value_and_grad(loss_fn)(lora)
        updates, opt_state = tx.update(grads, opt_state)
        return optax.apply_updates(lora, updates), opt_state, loss

    eval_ids = batch(jax.random.key(123), 3)
    base_loss = float(next_token_loss(model.apply(variables, eval_ids), eval_ids))
    print(f"\n3) fine-tuning LoRA on x[t+1] = 3 x[t] + 1 (mod 32); base eval loss {base_loss:.4f}")
    for i, k in enumerate(jax.random.split(jax.random.key(2), 300)):
        lora, opt_state, loss = train_step(lora, opt_state, k)
        if i % 50 == 0 or i == 299:
            print(f"  lora step {i:4d}  loss {float(loss):.4f}")

    tuned = float(next_token_loss(apply(frozen, lora, eval_ids), eval_ids))
    merged = lj.merge(frozen, lora, config)
    same = np.allclose(apply(frozen, lora, eval_ids), model.apply(merged, eval_ids), atol=1e-4)
    untouched = all(
        np.array_equal(a, b)
        for a, b in zip(jax.tree.leaves(frozen), jax.tree.leaves(variables), strict=True)
    )
    share = lj.summary(frozen, lora).fraction
    print(f"\neval loss on the new rule: base {base_loss:.4f} -> adapted {tuned:.4f}")
    print(
        f"trainable: {100 * share:.2f}% of the base; base untouched: {untouched}; "
        f"merged == factored: {same}; {time.time() - t0:.1f}s"
    )


if __name__ == "__main__":
    main()
