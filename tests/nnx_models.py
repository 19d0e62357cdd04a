"""Flax NNX twins of the linen models in `models.py`, and converters between the two.

`NnxTiny` is `models.Tiny` with its scanned blocks unrolled into an `nnx.List`: given the
same weights (`load_linen`) it computes the same function, so adapters moved across with
`lora_from_linen` must give the same outputs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from lora_jax.core._paths import flatten, nest
from lora_jax.core._weights import flatten_lora


class NnxMlp(nnx.Module):
    def __init__(self, din: int = 8, hidden: int = 16, out: int = 4, *, rngs: nnx.Rngs):
        self.fc1 = nnx.Linear(din, hidden, rngs=rngs)
        self.fc2 = nnx.Linear(hidden, out, rngs=rngs)

    def __call__(self, x):
        return self.fc2(jnp.tanh(self.fc1(x)))


class NnxBlock(nnx.Module):
    def __init__(self, dim: int, heads: int, *, rngs: nnx.Rngs):
        self.ln1 = nnx.LayerNorm(dim, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(heads, dim, qkv_features=dim, decode=False, rngs=rngs)
        self.ln2 = nnx.LayerNorm(dim, rngs=rngs)
        self.up = nnx.Linear(dim, 2 * dim, rngs=rngs)
        self.down = nnx.Linear(2 * dim, dim, rngs=rngs)

    def __call__(self, x):
        h = self.ln1(x)
        x = x + self.attn(h, h)
        return x + self.down(nnx.gelu(self.up(self.ln2(x))))


class NnxTiny(nnx.Module):
    """Embedding, blocks, Einsum, Conv, a raw param, tied output head (as `models.Tiny`)."""

    def __init__(self, vocab: int = 32, dim: int = 16, layers: int = 2, *, rngs: nnx.Rngs):
        self.embed = nnx.Embed(vocab, dim, rngs=rngs)
        self.blocks = nnx.List([NnxBlock(dim, 2, rngs=rngs) for _ in range(layers)])
        self.mix = nnx.Einsum("btd,dhk->bthk", (dim, 2, dim // 2), (2, dim // 2), rngs=rngs)
        self.conv = nnx.Conv(dim, dim, (3,), rngs=rngs)
        self.gate = nnx.Param(0.1 * jax.random.normal(rngs.params(), (dim, dim)))

    def __call__(self, ids):
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x)
        x = self.mix(x)
        x = x.reshape(*x.shape[:2], -1)
        x = self.conv(x)
        x = x + jnp.tanh(x @ self.gate[...])
        return self.embed.attend(x)


def _nnx_paths(path: str, value, layers: int):
    """The NNX path(s) and value(s) of one linen parameter (scanned blocks unstacked)."""
    path = path.removeprefix("params/")
    if path.startswith("blocks/"):
        rest = path.removeprefix("blocks/")
        return [(f"blocks/{i}/{rest}", value[i]) for i in range(layers)]
    return [(path, value)]


def load_linen(model: nnx.Module, variables, layers: int = 2) -> nnx.Module:
    """Copies linen variables into the NNX twin (in place); every parameter is set once."""
    flat = {}
    for path, value in flatten(variables).items():
        flat.update(_nnx_paths(path, value, layers))
    seen = set()
    for path, node in nnx.iter_graph(model):
        name = "/".join(str(p) for p in path)
        if isinstance(node, nnx.Param) and not isinstance(node, nnx.LoRAParam):
            node.set_value(jnp.asarray(flat[name]).reshape(node.get_value().shape))
            seen.add(name)
    assert seen == set(flat), sorted(set(flat) ^ seen)
    return model


def lora_from_linen(lora, nnx_layouts, layers: int = 2):
    """Linen adapters as NNX adapters: scanned ones split per layer, NNX layouts; each
    keeps its scale and dropout rate (a residual norm only where nothing was split)."""
    out = {}
    for path, w in flatten_lora(lora).items():
        parts = list(zip(_nnx_paths(path, w.a, layers), _nnx_paths(path, w.b, layers), strict=True))
        norm = w.residual_norm if len(parts) == 1 else None
        for (p, a), (_, b) in parts:
            layout = nnx_layouts.get(p, w.layout)
            out[p] = w.replace(a=a, b=b, layout=layout, residual_norm=norm)
    return nest(out)


class NnxLayers(nnx.Module):
    """Every supported NNX layer: Embed (lookup and attend), multi-axis LinearGeneral in
    and out, Einsum, Conv and a list of Linear."""

    def __init__(self, *, rngs: nnx.Rngs):
        self.emb = nnx.Embed(11, 8, rngs=rngs)
        self.q = nnx.LinearGeneral(8, (2, 4), rngs=rngs)
        self.o = nnx.LinearGeneral((2, 4), 8, axis=(-2, -1), rngs=rngs)
        self.e = nnx.Einsum("btd,dh->bth", (8, 6), (6,), rngs=rngs)
        self.conv = nnx.Conv(6, 5, kernel_size=(3,), padding="SAME", rngs=rngs)
        self.layers = nnx.List([nnx.Linear(5, 5, rngs=rngs) for _ in range(2)])

    def __call__(self, ids):
        x = self.emb(ids)
        x = self.o(self.q(x))
        x = self.conv(self.e(x))
        for layer in self.layers:
            x = jnp.tanh(layer(x))
        return x, self.emb.attend(jnp.tanh(x[..., :1]) * jnp.ones(8))
