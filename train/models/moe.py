"""`SparseMoe`: Qwen3-MoE's routed-experts MLP in Flax linen, dropless, through `ragged_dot`.

HuggingFace's ``Qwen3MoeSparseMoeBlock``: a router ``gate`` (softmax in float32 over the
experts, top `num_experts_per_tok`, renormalised when `norm_topk_prob`), then each token's
copies go through their experts' SwiGLU and are summed with the routing weights. Here the
copies are sorted by expert and run through `jax.lax.ragged_dot` with expert kernels
``(experts, in, out)``, so `lora_jax` adapts each expert on its own tokens only (route
``"factored (ragged_dot)"``). The router's load-balancing loss (HF's ``aux_loss``, only
added when ``output_router_logits``) is not computed: it does not enter the logits.

Parameters (under the layer's ``mlp``): ``gate`` ``(hidden, experts)`` (HF
``mlp.gate.weight`` transposed), ``experts/gate_up_proj`` ``(experts, hidden, 2 * moe_i)``
(gate then up, as HF's fused ``experts.gate_up_proj`` transposed) and ``experts/down_proj``
``(experts, moe_i, hidden)``. They are raw parameters, not ``kernel`` leaves: the
``"all-linear"`` target preset leaves them out, as PEFT's ``all-linear`` does; a regex such
as ``.*/experts/.*`` targets them.
"""

from __future__ import annotations

import typing

import flax.linen as nn
import jax
import jax.numpy as jnp

from train.models.config import LlamaConfig

__all__ = ["SparseMoe", "route"]

_INIT = nn.initializers.normal(0.02)


def route(logits: jax.Array, top_k: int, normalize: bool) -> tuple[jax.Array, jax.Array]:
    """HF Qwen3-MoE routing: softmax in float32, the top `top_k` experts per token.

    Args:
        logits: router logits ``(tokens, experts)``.
        top_k: experts per token.
        normalize: renormalise the kept probabilities to sum to 1 (``norm_topk_prob``).

    Returns:
        ``(experts, weights)``, both ``(tokens, top_k)``; weights in the logits' dtype.

    Example:
        >>> import jax.numpy as jnp
        >>> experts, weights = route(jnp.array([[0.0, 2.0, 1.0]]), 2, True)
        >>> experts.tolist(), round(float(weights.sum()), 5)
        ([[1, 2]], 1.0)
    """
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    weights, experts = jax.lax.top_k(probs, top_k)
    if normalize:
        weights = weights / weights.sum(axis=-1, keepdims=True)
    return experts, weights.astype(logits.dtype)


class SparseMoe(nn.Module):
    """The routed-experts SwiGLU MLP of a Qwen3-MoE layer: ``(..., hidden) -> (..., hidden)``.

    Attributes:
        config: the architecture (``num_experts``, ``num_experts_per_tok``,
            ``moe_intermediate_size``, ``norm_topk_prob``).

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from train.models import LlamaConfig
        >>> c = LlamaConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1,
        ...     num_heads=2, num_kv_heads=1, num_experts=4, num_experts_per_tok=2,
        ...     moe_intermediate_size=6)
        >>> x = jnp.ones((2, 3, 8))
        >>> v = SparseMoe(c).init(jax.random.key(0), x)
        >>> v["params"]["experts"]["gate_up_proj"].shape, SparseMoe(c).apply(v, x).shape
        ((4, 8, 12), (2, 3, 8))
    """

    config: LlamaConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        e, k, d = c.num_experts, c.num_experts_per_tok, c.hidden_size
        inner = typing.cast(int, c.moe_intermediate_size)
        gate = self.param("gate", _INIT, (d, e), c.param_dtype)
        gate_up, down = _Experts(e, d, inner, c.param_dtype, name="experts")()
        tokens = x.reshape(-1, d)
        experts, weights = route(tokens @ gate.astype(c.dtype), k, c.norm_topk_prob)
        flat = experts.reshape(-1)
        order = jnp.argsort(flat, stable=True)  # the token copies grouped by expert
        token = order // k
        sizes = jnp.bincount(flat, length=e).astype(jnp.int32)
        h = jax.lax.ragged_dot(tokens[token], gate_up.astype(c.dtype), sizes)
        g, u = jnp.split(h, 2, axis=-1)
        y = jax.lax.ragged_dot(nn.silu(g) * u, down.astype(c.dtype), sizes)
        y = y * weights.reshape(-1)[order][:, None]
        return jnp.zeros_like(tokens).at[token].add(y).reshape(x.shape)


class _Experts(nn.Module):
    """Holds the expert kernels (HF's ``mlp.experts`` module): ``(gate_up, down)``."""

    experts: int
    hidden: int
    inner: int
    param_dtype: str

    @nn.compact
    def __call__(self) -> tuple[jax.Array, jax.Array]:
        e, d, f = self.experts, self.hidden, self.inner
        gate_up = self.param("gate_up_proj", _INIT, (e, d, 2 * f), self.param_dtype)
        return gate_up, self.param("down_proj", _INIT, (e, f, d), self.param_dtype)
