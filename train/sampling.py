"""Sampling with a KV cache: greedy, temperature and top-k, in one jitted call.

`generate` takes any ``forward(params, ids, cache) -> (logits, cache)``, so the same code
samples from the base, from unmerged adapters (``lj.lora_apply``) and from merged weights.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["generate", "pick"]

Forward = Callable[[Any, jax.Array, Any], tuple[jax.Array, Any]]


def pick(
    logits: jax.Array, *, key: jax.Array, temperature: float = 0.0, top_k: int | None = None
) -> jax.Array:
    """Chooses the next token from the last position's logits.

    Args:
        logits: ``(batch, vocab)``.
        key: PRNG key (unused when greedy).
        temperature: 0 picks the most likely token; above 0 samples from
            ``softmax(logits / temperature)``.
        top_k: sample only among the `top_k` most likely tokens.

    Returns:
        ``(batch,)`` int32 token ids.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> pick(jnp.array([[0.0, 3.0, 1.0]]), key=jax.random.key(0)).tolist()
        [1]
        >>> logits = jnp.array([[0.0, 3.0, 9.0]])
        >>> pick(logits, key=jax.random.key(0), temperature=1.0, top_k=1).tolist()
        [2]
    """
    logits = logits.astype(jnp.float32)
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@partial(jax.jit, static_argnames=("forward", "max_new_tokens", "temperature", "top_k"))
def _generate(forward, params, prompt, cache, key, *, max_new_tokens, temperature, top_k):
    logits, cache = forward(params, prompt, cache)
    keys = jax.random.split(key, max_new_tokens)
    first = pick(logits[:, -1], key=keys[0], temperature=temperature, top_k=top_k)

    def step(carry, k):
        token, cache = carry
        logits, cache = forward(params, token[:, None], cache)
        nxt = pick(logits[:, -1], key=k, temperature=temperature, top_k=top_k)
        return (nxt, cache), token

    (last, _), tokens = jax.lax.scan(step, (first, cache), keys[1:])
    return jnp.concatenate([tokens.T, last[:, None]], axis=1)


def generate(
    forward: Forward,
    params: Any,
    prompt: jax.Array,
    cache: Any,
    *,
    max_new_tokens: int,
    key: jax.Array,
    temperature: float = 0.0,
    top_k: int | None = None,
    eos_id: int | None = None,
) -> list[list[int]]:
    """Continues each prompt by `max_new_tokens` tokens, reusing keys and values.

    The prompt is run once (prefill) to fill the cache; each new token then costs one
    single-position forward pass. Everything runs in one jitted call (`lax.scan`).

    Args:
        forward: ``forward(params, ids, cache) -> (logits, cache)``; must be hashable
            (a module-level function or a stable closure), it is a static argument.
        params: what `forward` takes as weights (a traced argument, not a constant).
        prompt: ``(batch, prompt_len)`` int32 ids, every row the same length.
        cache: an empty cache with room for ``prompt_len + max_new_tokens`` positions.
        max_new_tokens: how many tokens to add.
        key: PRNG key for sampling.
        temperature: see `pick`.
        top_k: see `pick`.
        eos_id: when set, each row is cut after its first end-of-sequence token.

    Returns:
        One list of new token ids per prompt row.

    Raises:
        ValueError: `max_new_tokens` below 1 or an empty prompt.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> def forward(params, ids, cache):  # a "model" that always predicts id + 1
        ...     return jax.nn.one_hot((ids + 1) % 5, 5) * 10.0, cache
        >>> generate(forward, None, jnp.array([[0, 1]]), None, max_new_tokens=4,
        ...          key=jax.random.key(0))
        [[2, 3, 4, 0]]
    """
    if max_new_tokens < 1:
        raise ValueError(f"`max_new_tokens` must be >= 1; found {max_new_tokens}.")
    if prompt.ndim != 2 or prompt.shape[1] == 0:
        raise ValueError(f"`prompt` must be (batch, length>0) ids; found shape {prompt.shape}.")
    out = _generate(
        forward,
        params,
        jnp.asarray(prompt, jnp.int32),
        cache,
        key,
        max_new_tokens=max_new_tokens,
        temperature=float(temperature),
        top_k=top_k,
    )
    rows = np.asarray(out).tolist()
    if eos_id is not None:
        rows = [r[: r.index(eos_id) + 1] if eos_id in r else r for r in rows]
    return rows
