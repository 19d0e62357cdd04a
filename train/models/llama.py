"""`Llama`: a Llama-family decoder (Llama, SmolLM, Mistral, Qwen2, Qwen3, Qwen3-MoE, Gemma 3).

The architecture is HuggingFace's ``LlamaForCausalLM``: RMSNorm in
float32, rotary embeddings in the ``rotate_half`` convention, grouped-query attention, a
SwiGLU MLP and an untied or tied output head; Qwen3's per-head q/k RMSNorm (``qk_norm``) and
Qwen3-MoE's routed experts (`train.models.moe.SparseMoe`) are options, and
``family="gemma3"`` is Gemma 3's block (``Gemma3ForCausalLM``: ``1 + weight`` RMSNorms around
attention and MLP, GeGLU, the ``sqrt(hidden)`` embedding scale, local sliding-window layers
with their own rotary base between global ones, optional final-logit soft-capping). Every
projection is a plain `nn.Dense` and the embedding an `nn.Embed`, so `lora_jax` computes
their low-rank path factored (the experts' through `jax.lax.ragged_dot`). Parameter
names follow HuggingFace (``layers_0/self_attn/q_proj/kernel`` is
``model.layers.0.self_attn.q_proj.weight`` transposed); `train.models.hf` maps them.

Attention is `jax.nn.dot_product_attention` (softmax in float32): causal with a left window
for sliding-window layers in training (cuDNN's fused kernel where `LlamaConfig.attention`
picks it), an explicit boolean mask over the cache slots with a KV cache (XLA). Each decoder
layer can be rematerialised (`LlamaConfig.remat`) in training.

The static description lives in `train.models.config`; the KV cache is a plain pytree
from `init_cache`.
"""

from __future__ import annotations

import functools
import typing
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import lora_jax as lj
from train.models.config import PRESETS, LlamaConfig
from train.models.moe import SparseMoe

__all__ = ["PRESETS", "Llama", "LlamaConfig", "init_cache", "num_params", "rope_frequencies"]

_INIT = nn.initializers.normal(0.02)
_F32 = jnp.float32


def rope_frequencies(config: LlamaConfig, *, local: bool = False) -> np.ndarray:
    """The rotary inverse frequencies, ``(head_dim // 2,)`` float32, as HuggingFace computes them.

    Args:
        config: the model config (``head_dim``, ``rope_theta``, ``rope_scaling``,
            ``rope_local_theta``).
        local: those of the sliding-window layers: base ``rope_local_theta`` without scaling
            when it is set (Gemma 3), else the same as the global ones.

    Returns:
        The inverse frequencies, with Llama 3.1 or linear scaling applied when configured.

    Example:
        >>> from train.models import LlamaConfig, rope_frequencies
        >>> c = LlamaConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1,
        ...                 num_heads=2, num_kv_heads=1)
        >>> [round(float(f), 3) for f in rope_frequencies(c)]
        [1.0, 0.01]
    """
    dim = typing.cast(int, config.head_dim)  # resolved by LlamaConfig.__post_init__
    exponent = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
    own_base = local and config.rope_local_theta is not None
    theta = config.rope_local_theta if own_base else config.rope_theta
    inv = (np.float32(1.0) / np.float32(theta) ** exponent).astype(np.float32)
    scaling = {} if own_base else dict(config.rope_scaling or ())
    if scaling.get("rope_type") == "linear":
        return (inv / np.float32(scaling["factor"])).astype(np.float32)
    if scaling.get("rope_type") != "llama3":
        return inv
    factor, low, high = (
        float(scaling[k]) for k in ("factor", "low_freq_factor", "high_freq_factor")
    )
    old_len = float(scaling["original_max_position_embeddings"])
    wavelen = 2 * np.pi / inv
    scaled = np.where(wavelen > old_len / low, inv / factor, inv)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def _rope(config: LlamaConfig, positions: jax.Array, local: bool) -> tuple[jax.Array, jax.Array]:
    """cos and sin, ``(batch, seq, 1, head_dim)`` in the compute dtype."""
    inv = rope_frequencies(config, local=local)
    freqs = positions[..., None].astype(_F32) * jnp.asarray(inv)
    angles = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
    return jnp.cos(angles).astype(config.dtype), jnp.sin(angles).astype(config.dtype)


def _apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    x1, x2 = jnp.split(x, 2, axis=-1)
    return x * cos + jnp.concatenate([-x2, x1], axis=-1) * sin


def _mask(q_slots: jax.Array, k_slots: jax.Array, window: int | None) -> jax.Array:
    """``(seq, keys)`` bool: causal, and within the sliding window when one is set."""
    diff = q_slots[:, None] - k_slots[None, :]
    ok = diff >= 0
    return ok & (diff < window) if window is not None else ok


def _softcap(x: jax.Array, cap: float | None) -> jax.Array:
    return x if cap is None else jnp.tanh(x / cap) * cap


def _kernel(c: LlamaConfig) -> str:
    """The `dot_product_attention` implementation of a call without a KV cache."""
    if c.attention != "auto":
        return c.attention
    fused = jax.default_backend() == "gpu" and c.dtype in ("bfloat16", "float16")
    return "cudnn" if fused else "xla"


def _attend(c: LlamaConfig, q, k, v, window: int | None, mask: jax.Array | None) -> jax.Array:
    """Grouped-query attention, q ``(b, s, h, d)``, k and v ``(b, t, kv_heads, d)`` (BTNH,
    kv heads dividing h) -> ``(b, s, h * d)``. With `mask` ``(s, t)`` (a KV cache) it is the
    mask, on XLA; without, causal within `window` (``0 <= q - k < window``) on `_kernel`'s
    implementation, falling back to XLA when ``"auto"`` chose cuDNN and it refuses."""
    b, s, h, d = q.shape
    scale = float((c.query_pre_attn_scalar or d) ** -0.5)
    attention = functools.partial(jax.nn.dot_product_attention, q, k, v, scale=scale)
    if mask is not None:
        out = attention(mask=mask[None, None], implementation="xla")
        return out.reshape(b, s, h * d)
    causal = functools.partial(
        attention, is_causal=True, local_window_size=None if window is None else (window - 1, 0)
    )
    kernel = _kernel(c)
    if kernel == "cudnn" and c.attention == "auto":
        try:
            out = causal(implementation="cudnn")
        except Exception:  # shapes or dtypes cuDNN does not take: XLA computes the same
            out = causal(implementation="xla")
    else:
        out = causal(implementation=kernel)
    return out.reshape(b, s, h * d)


def _dense(config: LlamaConfig, features: int, name: str, bias: bool = False) -> nn.Dense:
    return nn.Dense(
        features,
        use_bias=bias,
        dtype=config.dtype,
        param_dtype=config.param_dtype,
        kernel_init=_INIT,
        name=name,
    )


class _RMSNorm(nn.Module):
    """HF RMSNorm: ``x * rsqrt(mean(x^2) + eps)`` in float32, then ``* scale``; Gemma's
    (`plus_one`) multiplies by ``1 + scale`` in float32 before the cast (scale starts at 0)."""

    eps: float
    dtype: str
    param_dtype: str
    plus_one: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        init = nn.initializers.zeros if self.plus_one else nn.initializers.ones
        scale = self.param("scale", init, (x.shape[-1],), self.param_dtype)
        x32 = x.astype(_F32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        if self.plus_one:
            return (y * (1.0 + scale.astype(_F32))).astype(self.dtype)
        return scale.astype(self.dtype) * y.astype(self.dtype)


def _norm(c: LlamaConfig) -> Any:
    """The RMSNorm of `c`'s family, waiting for its ``name``."""
    return functools.partial(_RMSNorm, c.rms_norm_eps, c.dtype, c.param_dtype, c.family == "gemma3")


class _Attention(nn.Module):
    """Grouped-query self-attention with rotary embeddings and an optional KV cache slot."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, x, cos, sin, mask, kind, kv, end):
        c = self.config
        b, s, _ = x.shape
        hd, bias = typing.cast(int, c.head_dim), c.attention_bias
        q = _dense(c, c.num_heads * hd, "q_proj", bias)(x).reshape(b, s, c.num_heads, hd)
        k = _dense(c, c.num_kv_heads * hd, "k_proj", bias)(x).reshape(b, s, c.num_kv_heads, hd)
        v = _dense(c, c.num_kv_heads * hd, "v_proj", bias)(x).reshape(b, s, c.num_kv_heads, hd)
        if c.qk_norm:  # Qwen3, Gemma 3: RMSNorm over head_dim of each head, before the rotation
            q, k = _norm(c)(name="q_norm")(q), _norm(c)(name="k_norm")(k)
        q, k = _apply_rope(q, cos, sin), _apply_rope(k, cos, sin)
        if kv is not None:
            update = functools.partial(jax.lax.dynamic_update_slice, start_indices=(0, end, 0, 0))
            kv = (update(kv[0], k.astype(kv[0].dtype)), update(kv[1], v.astype(kv[1].dtype)))
            k, v = kv[0].astype(c.dtype), kv[1].astype(c.dtype)
        if mask is not None:  # a KV cache: this layer kind's mask over the cache slots
            out = _attend(c, q, k, v, None, mask[kind])
        else:
            out = _by_kind(c, kind, q, k, v)
        return _dense(c, c.hidden_size, "o_proj")(out), kv


def _by_kind(c: LlamaConfig, kind: Any, q, k, v) -> jax.Array:
    """Causal attention with the window of layer kind `kind`: static when `kind` is an int
    or there is one kind; under scan with Gemma 3's two kinds a `lax.switch` between the two
    static calls (`local_window_size` is static), so the fused kernel serves both."""
    windows = [c.sliding_window if local else None for local in _layer_kinds(c)[0]]
    if isinstance(kind, int) or len(windows) == 1:
        return _attend(c, q, k, v, windows[kind if isinstance(kind, int) else 0], None)
    branches = [functools.partial(_attend, c, window=w, mask=None) for w in windows]
    return jax.lax.switch(kind, branches, q, k, v)


class _Mlp(nn.Module):
    """SwiGLU: ``down(silu(gate(x)) * up(x))``; Gemma 3's GeGLU has the tanh GELU."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        gate = _dense(c, c.intermediate_size, "gate_proj")(x)
        up = _dense(c, c.intermediate_size, "up_proj")(x)
        act = nn.silu(gate) if c.family == "llama" else nn.gelu(gate, approximate=True)
        return _dense(c, c.hidden_size, "down_proj")(act * up)


class _DecoderLayer(nn.Module):
    """Pre-norm block; scannable as ``(x, cos, sin, mask, kind, kv, end) -> (x, kv)``, where
    `cos`, `sin` and `mask` (None without a KV cache) are stacked per layer kind and `kind`
    (an int, traced under scan) picks this layer's. `sparse`: the MLP is the routed experts
    (`SparseMoe`) instead of the dense SwiGLU. Gemma 3 also norms the attention and MLP
    outputs (sandwich norms)."""

    config: LlamaConfig
    sparse: bool = False

    @nn.compact
    def __call__(self, x, cos, sin, mask, kind, kv, end):
        c = self.config
        norm = _norm(c)
        h, kv = _Attention(c, name="self_attn")(
            norm(name="input_layernorm")(x), cos[kind], sin[kind], mask, kind, kv, end
        )
        mlp = SparseMoe(c, name="mlp") if self.sparse else _Mlp(c, name="mlp")
        if c.family == "gemma3":
            x = x + norm(name="post_attention_layernorm")(h)
            h = mlp(norm(name="pre_feedforward_layernorm")(x))
            return x + norm(name="post_feedforward_layernorm")(h), kv
        x = x + h
        return x + mlp(norm(name="post_attention_layernorm")(x)), kv


def _check_inputs(config: LlamaConfig, ids: Any, cache: Any) -> None:
    if not hasattr(ids, "dtype") or not jnp.issubdtype(ids.dtype, jnp.integer):
        raise TypeError(f"`ids` must be an integer array; found {getattr(ids, 'dtype', ids)!r}.")
    if ids.ndim != 2:
        raise ValueError(f"`ids` must have shape (batch, seq); found shape {ids.shape}.")
    if cache is None:
        return
    if not isinstance(cache, Mapping) or set(cache) != {"k", "v", "end"}:
        raise ValueError("`cache` must be the dict from `init_cache` with keys 'k', 'v', 'end'.")
    want = (config.num_layers, ids.shape[0], None, config.num_kv_heads, config.head_dim)
    for name in ("k", "v"):
        got = tuple(cache[name].shape)
        if len(got) != 5 or any(w is not None and w != g for w, g in zip(want, got, strict=True)):
            raise ValueError(
                f"cache[{name!r}] must have shape (num_layers, batch, max_len, kv_heads, "
                f"head_dim) = {want[:2]} + (max_len,) + {want[3:]}; found {got}."
            )
    if ids.shape[1] > cache["k"].shape[2]:
        raise ValueError(f"{ids.shape[1]} tokens do not fit a cache of {cache['k'].shape[2]}.")


class Llama(nn.Module):
    """A Llama-family causal LM: ``ids -> logits``, or ``(ids, cache) -> (logits, cache)``.

    Attributes:
        config: the architecture (`LlamaConfig`).

    Call arguments: ``ids`` ``(batch, seq)`` int; ``positions`` (keyword) ``(seq,)`` or
    ``(batch, seq)`` rotary positions, default ``end + arange(seq)``; ``cache`` (keyword) from
    `init_cache`. Without a cache it returns float32 logits ``(batch, seq, vocab)``; with
    one it writes the new keys and values at ``cache["end"]``, attends to every filled slot
    and returns ``(logits, cache)`` with ``end`` advanced by ``seq``. The caller keeps
    ``end + seq <= max_len`` (under jit it cannot be checked).

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from train.models import Llama, LlamaConfig
        >>> c = LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_layers=1,
        ...                 num_heads=2, num_kv_heads=1)
        >>> ids = jnp.zeros((1, 3), jnp.int32)
        >>> variables = Llama(c).init(jax.random.key(0), ids)
        >>> Llama(c).apply(variables, ids).shape
        (1, 3, 16)
    """

    config: LlamaConfig

    @nn.compact
    def __call__(self, ids: jax.Array, *, positions: Any = None, cache: Any = None) -> Any:
        c = self.config
        _check_inputs(c, ids, cache)
        b, s = ids.shape
        end = jnp.zeros((), jnp.int32) if cache is None else cache["end"]
        slots = end + jnp.arange(s, dtype=jnp.int32)
        positions = slots if positions is None else jnp.asarray(positions)
        keys = None if cache is None else jnp.arange(cache["k"].shape[2], dtype=jnp.int32)
        cos, sin, mask = _kind_tables(c, jnp.broadcast_to(positions, (b, s)), slots, keys)
        embed = nn.Embed(
            c.vocab_size, c.hidden_size, c.dtype, c.param_dtype, _INIT, name="embed_tokens"
        )
        x = embed(ids)
        if c.family == "gemma3":  # sqrt(hidden) rounded to the dtype first, as HF does
            x = x * jnp.asarray(np.float32(np.sqrt(c.hidden_size)), _F32).astype(x.dtype)
        x, kv = _decoder_stack(c, x, cos, sin, mask, cache, end)
        x = _norm(c)(name="norm")(x)
        head = embed.attend if c.tie_embeddings else _dense(c, c.vocab_size, "lm_head")
        logits = _softcap(head(x).astype(_F32), c.final_logit_softcapping)
        if cache is None:
            return logits
        return logits, {"k": kv[0], "v": kv[1], "end": end + s}


def _layer_kinds(c: LlamaConfig) -> tuple[list[bool], list[int]]:
    """The attention kinds present (local = sliding window) and each layer's index into them."""
    local = [c.is_local_layer(i) for i in range(c.num_layers)]
    kinds = sorted(set(local))
    return kinds, [kinds.index(x) for x in local]


def _kind_tables(c: LlamaConfig, positions, slots, keys) -> tuple[jax.Array, jax.Array, Any]:
    """cos, sin ``(kinds, batch, seq, 1, head_dim)`` and, with cache slots `keys`, masks
    ``(kinds, seq, keys)`` (else None): one entry per attention kind present (one for every
    model but Gemma 3's two)."""
    kinds, _ = _layer_kinds(c)
    ropes = [_rope(c, positions, local) for local in kinds]
    cos = jnp.stack([cos for cos, _ in ropes])
    if keys is None:
        return cos, jnp.stack([sin for _, sin in ropes]), None
    masks = [_mask(slots, keys, c.sliding_window if local else None) for local in kinds]
    return cos, jnp.stack([sin for _, sin in ropes]), jnp.stack(masks)


_POLICIES = {
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "full": jax.checkpoint_policies.nothing_saveable,
}


def _layer_class(c: LlamaConfig, cached: bool) -> Any:
    """`_DecoderLayer`, wrapped in `nn.remat` with `c.remat`'s policy when training (no
    cache). ``"dots"`` saves the matmuls without batch dimensions (the projections and the
    LoRA factors, not the attention scores, which are ``seq**2`` per head)."""
    if c.remat == "none" or cached:
        return _DecoderLayer
    static = () if c.scan_layers else (5,)  # `kind` (self is 0) is a Python int unrolled
    return nn.remat(
        _DecoderLayer,
        policy=_POLICIES[c.remat],
        prevent_cse=not c.scan_layers,  # scan already keeps XLA from merging the recompute
        static_argnums=static,
    )


def _decoder_stack(c: LlamaConfig, x, cos, sin, mask, cache, end) -> tuple[jax.Array, Any]:
    """The decoder layers (unrolled ``layers_{i}`` or one scanned ``layers``); call it inside
    a compact method. Returns ``(x, (k, v))``, the cache part None without a cache."""
    _, index = _layer_kinds(c)
    layer_class = _layer_class(c, cache is not None)
    if c.scan_layers:
        stack = nn.scan(
            layer_class,
            variable_axes={"params": 0},
            split_rngs={"params": True, lj.DROPOUT_RNG: True},
            in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, 0, 0, nn.broadcast),
            length=c.num_layers,
        )
        kv = None if cache is None else (cache["k"], cache["v"])
        kinds = jnp.asarray(index, jnp.int32)
        return stack(c, c.is_sparse_layer(0), name="layers")(x, cos, sin, mask, kinds, kv, end)
    new = []
    for i in range(c.num_layers):
        kv = None if cache is None else (cache["k"][i], cache["v"][i])
        layer = layer_class(c, c.is_sparse_layer(i), name=f"layers_{i}")
        x, kv = layer(x, cos, sin, mask, index[i], kv, end)
        new.append(kv)
    return x, None if cache is None else tuple(jnp.stack(t) for t in zip(*new, strict=True))


def init_cache(
    config: LlamaConfig, batch_size: int, max_len: int, *, dtype: Any = None
) -> dict[str, jax.Array]:
    """An empty KV cache for `Llama`: room for `max_len` positions per sequence.

    Args:
        config: the model config.
        batch_size: number of sequences.
        max_len: number of positions; at most ``config.max_seq_len``.
        dtype: dtype of the cached keys and values; the compute dtype by default.

    Returns:
        ``{"k": zeros (num_layers, batch, max_len, kv_heads, head_dim), "v": same,
        "end": int32 0}``; ``end`` counts the filled positions.

    Raises:
        ValueError: `max_len` or `batch_size` is not positive, or `max_len` exceeds
            ``config.max_seq_len``.

    Example:
        >>> from train.models import PRESETS, init_cache
        >>> cache = init_cache(PRESETS["tiny"], 2, 16)
        >>> cache["k"].shape, int(cache["end"])
        ((4, 2, 16, 2, 32), 0)
    """
    for name, value in (("batch_size", batch_size), ("max_len", max_len)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
            raise ValueError(f"`{name}` must be a positive int; found {value!r}.")
    if max_len > config.max_seq_len:
        raise ValueError(
            f"`max_len` = {max_len} exceeds the model's max_seq_len = {config.max_seq_len}."
        )
    shape = (config.num_layers, batch_size, max_len, config.num_kv_heads, config.head_dim)
    dtype = jnp.dtype(config.dtype if dtype is None else dtype)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype), "end": jnp.int32(0)}


def num_params(params: Any) -> int:
    """The number of scalars in a pytree of arrays (params or variables).

    Args:
        params: any pytree whose leaves have a ``size``.

    Returns:
        The total size.

    Example:
        >>> import jax.numpy as jnp
        >>> num_params({"a": jnp.ones((2, 3)), "b": {"c": jnp.ones(4)}})
        10
    """
    return sum(int(np.size(leaf)) for leaf in jax.tree_util.tree_leaves(params))
