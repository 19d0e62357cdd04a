"""The benchmark's mixture-of-experts model and its training-step variants.

`MoEGPT` is `CustomGPT` (raw einsum attention, ``table[ids]``, ``x @ lm_head``) with each
block's MLP replaced by 8 experts and top-2 routing, written as the dropless MoE layers of
the open JAX LLMs: a router kernel ``(d_model, experts)``, expert kernels ``w_in``
``(experts, d_model, ffn)`` and ``w_out`` ``(experts, ffn, d_model)``, the token copies
sorted by expert and run through `jax.lax.ragged_dot`. Each expert is ``4 * d_model /
TOP_K`` wide, so a token costs the FLOPs of the dense model's MLP.
"""

from __future__ import annotations

from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

import lora_jax as lj
from train.bench.models import CustomGPT, GPTConfig
from train.bench.steps import Runner, full_runner, lora_runner

EXPERTS = 8
TOP_K = 2
# Expert LoRA: every linear kernel but the router (expert kernels and attention).
EXPERT_LORA = r".*/(attn/(query|key|value|out)|moe/(w_in|w_out))"
FACTORED = "factored"  # every adapter's route must be "factored (...)"
_INIT = nn.initializers.normal(0.02)
# One adapter per expert: what `lj.infer_layouts` reads from a `ragged_dot` kernel.
EXPERT_LAYOUT = lj.Layout("einsum", in_axes=(1,), out_axes=(2,), stack_axes=(0,))


def expert_ffn(cfg: GPTConfig) -> int:
    """Each expert's hidden width: top-2 of these cost one dense ``4 * d_model`` MLP."""
    return 4 * cfg.d_model // TOP_K


def route(x: jax.Array, router: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Plain softmax top-k routing (no load-balancing term, no noise): each token's
    ``(tokens, TOP_K)`` expert ids and gate weights renormalised to sum to 1."""
    probs = jax.nn.softmax(x @ router, axis=-1)
    gates, experts = jax.lax.top_k(probs, TOP_K)
    return experts, gates / gates.sum(-1, keepdims=True)


class MoeMlp(nn.Module):
    """Dropless top-2 MoE: token copies sorted by expert, two `ragged_dot`s, unsorted,
    and summed with their gate weights."""

    cfg: GPTConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d, f = self.cfg.d_model, expert_ffn(self.cfg)
        router = self.param("router", _INIT, (d, EXPERTS))
        w_in = self.param("w_in", _INIT, (EXPERTS, d, f))
        w_out = self.param("w_out", _INIT, (EXPERTS, f, d))
        tokens = x.reshape(-1, d)
        experts, gates = route(tokens, router)
        order = jnp.argsort(experts.reshape(-1), stable=True)  # copies grouped by expert
        sizes = jnp.bincount(experts.reshape(-1), length=EXPERTS).astype(jnp.int32)
        h = nn.gelu(jax.lax.ragged_dot(tokens[order // TOP_K], w_in, sizes))  # copy -> token
        y = jnp.zeros((order.size, d), x.dtype).at[order].set(jax.lax.ragged_dot(h, w_out, sizes))
        return jnp.einsum("tkd,tk->td", y.reshape(-1, TOP_K, d), gates).reshape(x.shape)


class MoEGPT(CustomGPT):
    """`CustomGPT` with a top-2 mixture of 8 experts as every block's MLP."""

    mlp: ClassVar[Any] = MoeMlp
    mlp_name: ClassVar[str] = "moe"


def moe_runners(cfg: GPTConfig, ids: jax.Array) -> dict[str, Runner]:
    """`MoEGPT`'s variants: full fine-tuning and expert LoRA (experts and attention, the
    layouts read from the `ragged_dot`s and einsums), the LoRA step checked to route
    every adapter ``factored (...)`` before it is timed."""
    model = MoEGPT(cfg)
    variables = jax.jit(model.init)(jax.random.key(0), ids)
    layouts = lj.infer_layouts(model.apply, variables, ids)  # experts: EXPERT_LAYOUT
    return {
        "moe full": full_runner(model, variables, ids, "MoE full fine-tune"),
        "moe lora": lora_runner(
            "MoE expert lora (experts + attention)",
            model,
            variables,
            ids,
            EXPERT_LORA,
            route=FACTORED,
            layouts=layouts,
        ),
    }
