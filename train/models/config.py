"""`LlamaConfig`: the static, hashable description of a Llama-family decoder, and `PRESETS`."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

__all__ = ["ATTENTIONS", "FAMILIES", "LlamaConfig", "PRESETS", "REMATS", "ROPE_TYPES"]

ROPE_TYPES = ("default", "llama3", "linear")
FAMILIES = ("llama", "gemma3")
ATTENTIONS = ("auto", "xla", "cudnn")
REMATS = ("none", "dots", "full")
_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")

RopeScaling = tuple[tuple[str, float | str], ...]


def _positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ValueError(f"LlamaConfig.{name} must be a positive int; found {value!r}.")


def _positive_number(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ValueError(f"LlamaConfig.{name} must be a number > 0; found {value!r}.")


def _float_dtype(name: str, value: Any) -> str:
    try:
        dtype = jnp.dtype(value)
    except TypeError as err:
        raise ValueError(
            f"LlamaConfig.{name} must be a float dtype name; found {value!r}."
        ) from err
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"LlamaConfig.{name} must be a float dtype; found {dtype.name!r}.")
    return dtype.name


def _freeze_rope_scaling(value: Any) -> RopeScaling | None:
    """Validates HF-style rope scaling and returns it as sorted pairs (None for default)."""
    if value is None:
        return None
    try:
        items = dict(value.items() if isinstance(value, Mapping) else value)
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"LlamaConfig.rope_scaling must be a dict or (key, value) pairs; found {value!r}."
        ) from err
    rope_type = items.pop("rope_type", items.pop("type", "default"))
    if rope_type in (None, "default"):
        return None
    if rope_type == "linear":
        if set(items) != {"factor"}:
            raise ValueError(
                "LlamaConfig.rope_scaling (linear) needs exactly ['factor']; found "
                f"{sorted(items)}."
            )
        _positive_number("rope_scaling['factor']", items["factor"])
        return (("rope_type", "linear"), ("factor", float(items["factor"])))
    if rope_type != "llama3":
        raise ValueError(
            f"LlamaConfig.rope_scaling: rope_type {rope_type!r} is not supported; "
            f"supported: {', '.join(ROPE_TYPES)}."
        )
    missing = [k for k in _LLAMA3_KEYS if k not in items]
    unknown = sorted(set(items) - set(_LLAMA3_KEYS))
    if missing or unknown:
        raise ValueError(
            f"LlamaConfig.rope_scaling (llama3) needs exactly {list(_LLAMA3_KEYS)}; "
            f"missing {missing}, unknown {unknown}."
        )
    for key in _LLAMA3_KEYS:
        _positive_number(f"rope_scaling[{key!r}]", items[key])
    if items["low_freq_factor"] >= items["high_freq_factor"]:
        raise ValueError(
            "LlamaConfig.rope_scaling: low_freq_factor must be < high_freq_factor; found "
            f"{items['low_freq_factor']} and {items['high_freq_factor']}."
        )
    pairs = [(k, float(items[k])) for k in _LLAMA3_KEYS]
    return (("rope_type", "llama3"), *sorted(pairs))


def _check_experts(c: LlamaConfig) -> None:
    """Validates the mixture-of-experts fields and freezes `mlp_only_layers` to a tuple."""
    if not isinstance(c.norm_topk_prob, bool):
        raise ValueError(f"LlamaConfig.norm_topk_prob must be a bool; found {c.norm_topk_prob!r}.")
    if isinstance(c.num_experts, bool) or not isinstance(c.num_experts, int | np.integer):
        raise ValueError(f"LlamaConfig.num_experts must be an int >= 0; found {c.num_experts!r}.")
    if c.num_experts < 0:
        raise ValueError(f"LlamaConfig.num_experts must be an int >= 0; found {c.num_experts!r}.")
    for name in ("num_experts_per_tok", "decoder_sparse_step"):
        _positive_int(name, getattr(c, name))
    try:
        layers = tuple(sorted({int(i) for i in c.mlp_only_layers}))
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"LlamaConfig.mlp_only_layers must be layer indices; found {c.mlp_only_layers!r}."
        ) from err
    if any(not 0 <= i < c.num_layers for i in layers):
        raise ValueError(
            f"LlamaConfig.mlp_only_layers must be in [0, {c.num_layers}); found {list(layers)}."
        )
    object.__setattr__(c, "mlp_only_layers", layers)
    if not c.num_experts:
        return
    _positive_int("moe_intermediate_size", c.moe_intermediate_size)
    if c.num_experts_per_tok > c.num_experts:
        raise ValueError(
            f"LlamaConfig.num_experts_per_tok ({c.num_experts_per_tok}) exceeds num_experts "
            f"({c.num_experts})."
        )
    kinds = {c.is_sparse_layer(i) for i in range(c.num_layers)}
    if c.scan_layers and len(kinds) > 1:
        raise ValueError(
            "LlamaConfig.scan_layers needs every layer alike; mlp_only_layers "
            f"{list(layers)} and decoder_sparse_step {c.decoder_sparse_step} mix dense and "
            "sparse MLP layers. Load it with scan_layers=False."
        )


_GEMMA_ONLY = (
    "query_pre_attn_scalar",
    "final_logit_softcapping",
    "rope_local_theta",
)


def _check_family(c: LlamaConfig) -> None:
    """Validates `family` and the Gemma 3 fields; freezes `global_layers` to a sorted tuple."""
    if c.family not in FAMILIES:
        raise ValueError(f"LlamaConfig.family must be one of {FAMILIES}; found {c.family!r}.")
    try:
        layers = tuple(sorted({int(i) for i in c.global_layers}))
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"LlamaConfig.global_layers must be layer indices; found {c.global_layers!r}."
        ) from err
    if any(not 0 <= i < c.num_layers for i in layers):
        raise ValueError(
            f"LlamaConfig.global_layers must be in [0, {c.num_layers}); found {list(layers)}."
        )
    object.__setattr__(c, "global_layers", layers)
    for name in _GEMMA_ONLY:
        if getattr(c, name) is not None:
            _positive_number(name, getattr(c, name))
    if c.family == "llama":
        used = [n for n in (*_GEMMA_ONLY, "global_layers") if getattr(c, n)]
        if used:
            raise ValueError(f"LlamaConfig: {used} are Gemma 3 fields; set family='gemma3'.")
        return
    if not c.qk_norm or c.num_experts or c.attention_bias:
        raise ValueError(
            "LlamaConfig(family='gemma3') needs qk_norm=True, no experts and no attention_bias; "
            f"found qk_norm={c.qk_norm}, num_experts={c.num_experts}, "
            f"attention_bias={c.attention_bias}."
        )


@dataclasses.dataclass(frozen=True, kw_only=True)
class LlamaConfig:
    """The architecture of a Llama-family decoder: static and hashable (safe under `jax.jit`).

    Attributes:
        vocab_size: number of token ids.
        hidden_size: model width.
        intermediate_size: width of the SwiGLU MLP.
        num_layers: number of decoder layers.
        num_heads: number of query heads.
        num_kv_heads: number of key/value heads (grouped-query attention); divides
            `num_heads`.
        head_dim: width of one head; ``hidden_size // num_heads`` when None (resolved here).
        max_seq_len: longest KV cache `init_cache` accepts.
        rope_theta: rotary base.
        rope_scaling: HF rope scaling, as a dict or sorted ``(key, value)`` pairs (stored as
            pairs): None / ``rope_type="default"``, ``"llama3"`` with ``factor``,
            ``low_freq_factor``, ``high_freq_factor``, ``original_max_position_embeddings``,
            or ``"linear"`` with ``factor`` (positions divided by it).
        rms_norm_eps: RMSNorm epsilon.
        attention_bias: a bias on q/k/v (Qwen2); never on o_proj.
        tie_embeddings: the output head is the transposed embedding (no ``lm_head``).
        sliding_window: each query sees only the last `sliding_window` positions (Mistral;
            Gemma 3's local layers), itself included.
        qk_norm: an RMSNorm over ``head_dim`` on each query and key head before the rotary
            embedding (Qwen3's ``q_norm`` / ``k_norm``).
        num_experts: 0 for a dense MLP in every layer; else the number of routed experts of
            the sparse MLP layers (Qwen3-MoE: a softmax router, top `num_experts_per_tok`).
        num_experts_per_tok: experts each token is routed to.
        moe_intermediate_size: width of one expert's SwiGLU; `intermediate_size` stays the
            width of the dense MLP layers.
        norm_topk_prob: the top-k routing weights are renormalised to sum to 1.
        decoder_sparse_step: layer ``i`` is sparse when ``(i + 1) % decoder_sparse_step == 0``
            and ``i`` is not in `mlp_only_layers`.
        mlp_only_layers: layers that keep the dense MLP (stored as a sorted tuple).
        family: ``"llama"``, or ``"gemma3"`` for Gemma 3's block: RMSNorms scaling by
            ``1 + weight`` (the ``scale`` params hold HF's raw ``weight``), norms before and
            after attention and MLP, a GeGLU MLP (tanh GELU), the embedding times
            ``sqrt(hidden_size)``; it needs ``qk_norm``.
        global_layers: Gemma 3's full-attention layers; every other layer is local (sees
            `sliding_window` positions, rotary base `rope_local_theta`). Gemma 3 only.
        rope_local_theta: the rotary base of the local layers, without `rope_scaling`
            (Gemma 3's ``rope_local_base_freq``); None: the global rotary everywhere.
        query_pre_attn_scalar: the attention scores are scaled by its ``** -0.5`` instead of
            ``head_dim ** -0.5`` (Gemma 3).
        final_logit_softcapping: the output logits become ``cap * tanh(logits / cap)``
            (Gemma 3 may set it).
        scan_layers: the layers are one `nn.scan` (params under ``layers/`` with a leading
            layer axis) instead of ``layers_0`` ... ``layers_{n-1}``.
        dtype: compute dtype (``"float32"``, ``"bfloat16"``, ``"float16"``).
        param_dtype: dtype of freshly initialised parameters.
        attention: the kernel of `jax.nn.dot_product_attention`: ``"auto"`` (cuDNN's fused
            kernel on a GPU in bf16/f16 without a KV cache, XLA otherwise), ``"xla"``, or
            ``"cudnn"`` (forced; JAX raises where it is unsupported). Calls with a KV cache
            (an explicit mask) always run on XLA. Never changes the math.
        remat: rematerialisation of each decoder layer in training: ``"none"``, ``"dots"``
            (`nn.remat` saving only the matmul outputs without batch dimensions) or
            ``"full"`` (save nothing: recompute the whole layer in the backward pass).

    Example:
        >>> from train.models import LlamaConfig
        >>> c = LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_layers=1,
        ...                 num_heads=2, num_kv_heads=1)
        >>> c.head_dim, LlamaConfig.from_dict(c.to_dict()) == c
        (4, True)
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int | None = None
    max_seq_len: int = 2048
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | Mapping[str, float | str] | None = None
    rms_norm_eps: float = 1e-5
    attention_bias: bool = False
    tie_embeddings: bool = False
    sliding_window: int | None = None
    qk_norm: bool = False
    num_experts: int = 0
    num_experts_per_tok: int = 1
    moe_intermediate_size: int | None = None
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    family: str = "llama"
    global_layers: tuple[int, ...] = ()
    rope_local_theta: float | None = None
    query_pre_attn_scalar: float | None = None
    final_logit_softcapping: float | None = None
    scan_layers: bool = False
    dtype: str = "float32"
    param_dtype: str = "float32"
    attention: str = "auto"
    remat: str = "none"

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers"):
            _positive_int(name, getattr(self, name))
        for name in ("num_heads", "num_kv_heads", "max_seq_len"):
            _positive_int(name, getattr(self, name))
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"LlamaConfig.num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                f"({self.num_kv_heads})."
            )
        set_ = object.__setattr__
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                raise ValueError(
                    f"LlamaConfig: hidden_size ({self.hidden_size}) is not a multiple of "
                    f"num_heads ({self.num_heads}); set head_dim explicitly."
                )
            set_(self, "head_dim", self.hidden_size // self.num_heads)
        _positive_int("head_dim", self.head_dim)
        if int(self.head_dim or 0) % 2:
            raise ValueError(f"LlamaConfig.head_dim must be even (rotary); found {self.head_dim}.")
        if self.sliding_window is not None:
            _positive_int("sliding_window", self.sliding_window)
        _positive_number("rope_theta", self.rope_theta)
        _positive_number("rms_norm_eps", self.rms_norm_eps)
        for name in ("attention_bias", "tie_embeddings", "scan_layers", "qk_norm"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(
                    f"LlamaConfig.{name} must be a bool; found {getattr(self, name)!r}."
                )
        set_(self, "rope_scaling", _freeze_rope_scaling(self.rope_scaling))
        _check_experts(self)
        _check_family(self)
        set_(self, "dtype", _float_dtype("dtype", self.dtype))
        set_(self, "param_dtype", _float_dtype("param_dtype", self.param_dtype))
        for name, allowed in (("attention", ATTENTIONS), ("remat", REMATS)):
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"LlamaConfig.{name} must be one of {allowed}; found {getattr(self, name)!r}."
                )

    def is_sparse_layer(self, layer: int) -> bool:
        """Whether layer `layer` has the routed-experts MLP (HF Qwen3-MoE's rule).

        Args:
            layer: the layer index.

        Returns:
            True for a mixture-of-experts layer, False for a dense MLP.
        """
        return (
            self.num_experts > 0
            and layer not in self.mlp_only_layers
            and (layer + 1) % self.decoder_sparse_step == 0
        )

    def is_local_layer(self, layer: int) -> bool:
        """Whether layer `layer` attends through the sliding window (not a global layer).

        Args:
            layer: the layer index.

        Returns:
            True when `sliding_window` is set and `layer` is not in `global_layers`.
        """
        return self.sliding_window is not None and layer not in self.global_layers

    def to_dict(self) -> dict[str, Any]:
        """The config as a JSON-able dict (`rope_scaling` as a dict); `from_dict` inverts it.

        Returns:
            ``{field: value}`` for every field.
        """
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["rope_scaling"] = None if self.rope_scaling is None else dict(self.rope_scaling)
        out["mlp_only_layers"] = list(self.mlp_only_layers)
        out["global_layers"] = list(self.global_layers)
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LlamaConfig:
        """Builds a config from `to_dict` output (e.g. read back from JSON).

        Args:
            d: ``{field: value}``; the required fields and any optional ones.

        Returns:
            The config.

        Raises:
            ValueError: `d` is not a mapping, has unknown keys or lacks required ones (both
                are listed), or holds an invalid value.
        """
        if not isinstance(d, Mapping):
            raise ValueError(f"LlamaConfig.from_dict expects a dict; found {type(d).__name__}.")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - set(fields))
        if unknown:
            raise ValueError(
                f"LlamaConfig.from_dict: unknown keys {unknown}; known keys: {sorted(fields)}."
            )
        required = [n for n, f in fields.items() if f.default is dataclasses.MISSING]
        missing = [n for n in required if n not in d]
        if missing:
            raise ValueError(f"LlamaConfig.from_dict: missing required keys {missing}.")
        return cls(**d)


PRESETS: dict[str, LlamaConfig] = {
    # The CPU demo model for byte-level tokens (256 bytes + 2 specials), about 0.9M params.
    "tiny": LlamaConfig(
        vocab_size=258,
        hidden_size=128,
        intermediate_size=384,
        num_layers=4,
        num_heads=4,
        num_kv_heads=2,
        max_seq_len=512,
        tie_embeddings=False,
    ),
    # Two layers of the same width: fast to compile, for tests and smoke runs.
    "micro": LlamaConfig(
        vocab_size=258,
        hidden_size=64,
        intermediate_size=192,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        max_seq_len=512,
        tie_embeddings=False,
    ),
}
