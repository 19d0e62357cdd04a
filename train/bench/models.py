"""The benchmark's model: a GPT-style decoder in linen, its NNX twin, and its twin in the
custom-module style of the open Flax LLMs (raw `self.param` kernels, `jnp.einsum`)."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import nnx


@dataclasses.dataclass(frozen=True)
class GPTConfig:
    layers: int = 8
    d_model: int = 768
    heads: int = 12
    vocab: int = 8192
    seq: int = 256
    batch: int = 4


PRESETS = {
    "medium": GPTConfig(),
    "tiny": GPTConfig(layers=2, d_model=64, heads=4, vocab=256, seq=32, batch=2),
}
RANK = 8


def attend(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """Causal self-attention on (batch, seq, heads, head_dim) projections."""
    t, head_dim = q.shape[1], q.shape[3]
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(head_dim)
    mask = jnp.tril(jnp.ones((t, t), bool))
    weights = jax.nn.softmax(jnp.where(mask, logits, -1e9), axis=-1)
    return jnp.einsum("bhqk,bkhd->bqhd", weights, v)


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, heads: int) -> jax.Array:
    """Multi-head causal self-attention on (batch, seq, d_model) projections."""
    b, t, d = q.shape
    split = lambda x: x.reshape(b, t, heads, d // heads)
    return attend(split(q), split(k), split(v)).reshape(b, t, d)


class Attention(nn.Module):
    cfg: GPTConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = self.cfg.d_model
        q, k, v = (nn.Dense(d, name=n)(x) for n in ("query", "key", "value"))
        return nn.Dense(d, name="out")(causal_attention(q, k, v, self.cfg.heads))


class Mlp(nn.Module):
    cfg: GPTConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = nn.gelu(nn.Dense(4 * self.cfg.d_model, name="up")(x))
        return nn.Dense(self.cfg.d_model, name="down")(h)


class Block(nn.Module):
    cfg: GPTConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + Attention(self.cfg, name="attn")(nn.LayerNorm(name="ln1")(x))
        return x + Mlp(self.cfg, name="mlp")(nn.LayerNorm(name="ln2")(x))


class GPT(nn.Module):
    cfg: GPTConfig

    @nn.compact
    def __call__(self, ids: jax.Array) -> jax.Array:
        x = nn.Embed(self.cfg.vocab, self.cfg.d_model, name="embed")(ids)
        x = x + self.param("pos", nn.initializers.normal(0.02), (self.cfg.seq, self.cfg.d_model))
        for i in range(self.cfg.layers):
            x = Block(self.cfg, name=f"block_{i}")(x)
        return nn.Dense(self.cfg.vocab, name="lm_head")(nn.LayerNorm(name="ln_f")(x))


# The custom-module twin: the same sizes, written as the open Flax LLMs write their layers.
# Projections have no biases (as in those models); the layer norms stay `nn.LayerNorm`, so
# that only the way the kernels are used differs from `GPT`.
_INIT = nn.initializers.normal(0.02)


class EinsumAttention(nn.Module):
    """Attention with raw 3-D head kernels: q/k/v ``(d_model, heads, head_dim)`` and the
    output ``(heads, head_dim, d_model)``, each used by `jnp.einsum`."""

    cfg: GPTConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d, h = self.cfg.d_model, self.cfg.heads
        q, k, v = (
            jnp.einsum("btd,dhk->bthk", x, self.param(n, _INIT, (d, h, d // h)))
            for n in ("query", "key", "value")
        )
        return jnp.einsum(
            "bthk,hkd->btd", attend(q, k, v), self.param("out", _INIT, (h, d // h, d))
        )


class MatmulMlp(nn.Module):
    """The MLP with raw 2-D kernels used by ``@``."""

    cfg: GPTConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = self.cfg.d_model
        up, down = self.param("up", _INIT, (d, 4 * d)), self.param("down", _INIT, (4 * d, d))
        return nn.gelu(x @ up) @ down


class CustomBlock(nn.Module):
    cfg: GPTConfig
    mlp: Any = MatmulMlp  # the MLP module class, and its name in the params
    mlp_name: str = "mlp"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + EinsumAttention(self.cfg, name="attn")(nn.LayerNorm(name="ln1")(x))
        return x + self.mlp(self.cfg, name=self.mlp_name)(nn.LayerNorm(name="ln2")(x))


class CustomGPT(nn.Module):
    """`GPT` in the custom-module style: an embedding table read by ``table[ids]``, raw
    einsum/matmul kernels, and an untied ``x @ lm_head`` output. A subclass swaps every
    block's MLP by setting `mlp` and `mlp_name`."""

    cfg: GPTConfig
    mlp: ClassVar[Any] = MatmulMlp
    mlp_name: ClassVar[str] = "mlp"

    @nn.compact
    def __call__(self, ids: jax.Array) -> jax.Array:
        cfg = self.cfg
        x = self.param("embed", _INIT, (cfg.vocab, cfg.d_model))[ids]
        x = x + self.param("pos", _INIT, (cfg.seq, cfg.d_model))
        for i in range(cfg.layers):
            x = CustomBlock(cfg, self.mlp, self.mlp_name, name=f"block_{i}")(x)
        return nn.LayerNorm(name="ln_f")(x) @ self.param("lm_head", _INIT, (cfg.d_model, cfg.vocab))


class NnxBlock(nnx.Module):
    """The same block in NNX, with `nnx.LoRALinear` on the named targets."""

    def __init__(self, cfg: GPTConfig, targets: set[str], rngs: nnx.Rngs):
        d = cfg.d_model

        def linear(name: str, n_in: int, n_out: int) -> nnx.Module:
            if name in targets:
                return nnx.LoRALinear(n_in, n_out, lora_rank=RANK, rngs=rngs)
            return nnx.Linear(n_in, n_out, rngs=rngs)

        self.heads = cfg.heads
        self.ln1, self.ln2 = nnx.LayerNorm(d, rngs=rngs), nnx.LayerNorm(d, rngs=rngs)
        self.query, self.key, self.value = (linear(n, d, d) for n in ("query", "key", "value"))
        self.out = linear("out", d, d)
        self.up, self.down = linear("up", d, 4 * d), linear("down", 4 * d, d)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.ln1(x)
        x = x + self.out(causal_attention(self.query(h), self.key(h), self.value(h), self.heads))
        return x + self.down(nnx.gelu(self.up(self.ln2(x))))


class NnxGPT(nnx.Module):
    def __init__(self, cfg: GPTConfig, targets: set[str], rngs: nnx.Rngs):
        self.embed = nnx.Embed(cfg.vocab, cfg.d_model, rngs=rngs)
        self.pos = nnx.Param(0.02 * jax.random.normal(rngs.params(), (cfg.seq, cfg.d_model)))
        self.blocks = nnx.List([NnxBlock(cfg, targets, rngs) for _ in range(cfg.layers)])
        self.ln_f = nnx.LayerNorm(cfg.d_model, rngs=rngs)
        self.lm_head = nnx.Linear(cfg.d_model, cfg.vocab, rngs=rngs)

    def __call__(self, ids: jax.Array) -> jax.Array:
        x = self.embed(ids) + self.pos[...]
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def lm_loss(logits: Any, ids: jax.Array) -> jax.Array:
    """Next-token cross-entropy, in float32."""
    logits = logits[:, :-1].astype(jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()
