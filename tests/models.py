"""Small Flax models that use every layer kind lora_jax computes factored."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp


class Mlp(nn.Module):
    """Two Dense layers: the simplest target."""

    hidden: int = 16
    out: int = 4

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(self.hidden, name="fc1")(x)
        return nn.Dense(self.out, name="fc2")(jnp.tanh(x))


class Block(nn.Module):
    """A pre-norm attention + MLP block, scannable (carry, _) -> (carry, None)."""

    dim: int = 16
    heads: int = 2

    @nn.compact
    def __call__(self, x, _=None):
        h = nn.LayerNorm(name="ln1")(x)
        x = x + nn.MultiHeadDotProductAttention(
            num_heads=self.heads, qkv_features=self.dim, name="attn"
        )(h, h)
        h = nn.LayerNorm(name="ln2")(x)
        h = nn.remat(nn.Dense)(2 * self.dim, name="up")(h)
        return x + nn.Dense(self.dim, name="down")(nn.gelu(h)), None


class Tiny(nn.Module):
    """Embedding, scanned blocks, Einsum, Conv, a raw param, tied output head."""

    vocab: int = 32
    dim: int = 16
    layers: int = 2

    @nn.compact
    def __call__(self, ids):
        embed = nn.Embed(self.vocab, self.dim, name="embed")
        x = embed(ids)
        stack = nn.scan(
            Block,
            variable_axes={"params": 0},
            split_rngs={"params": True, "lora_dropout": True},
            length=self.layers,
        )
        x, _ = stack(dim=self.dim, name="blocks")(x, None)
        x = nn.Einsum((self.dim, 2, self.dim // 2), "btd,dhk->bthk", name="mix")(x)
        x = x.reshape(*x.shape[:2], self.dim)
        x = nn.Conv(self.dim, (3,), name="conv")(x)
        gate = self.param("gate", nn.initializers.normal(0.1), (self.dim, self.dim))
        x = x + jnp.tanh(x @ gate)
        return embed.attend(x)


class ScannedMlp(nn.Module):
    """Three scanned residual MLP layers (24 -> 40 -> 24), sizes found nowhere else so that
    a test can find their arrays in compiled HLO."""

    @nn.compact
    def __call__(self, x):
        class Layer(nn.Module):
            @nn.compact
            def __call__(self, h, _):
                return h + nn.Dense(24, name="down")(jnp.tanh(nn.Dense(40, name="up")(h))), None

        stack = nn.scan(Layer, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
        return stack(name="layers")(x, None)[0]
