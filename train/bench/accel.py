"""The accelerator measurement's definitions (`python -m train.benchmark --part accelerator`):
the presets, the FLOP count behind MFU, the bf16 peaks of known devices, and the memory
estimate that decides whether a variant is run. `train.bench.accel_child` runs a variant,
`train.bench.accel_report` runs them all and reports.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from train.models import LlamaConfig

VARIANTS = ("full", "lora-qv", "lora-all-linear")
# The targets for an H100/H200-class GPU: LoRA all-linear tokens/s at least
# SPEEDUP_TARGET x full fine-tuning's at the same batch; LoRA MFU at least MFU_TARGET; the
# FIT_TARGET preset's LoRA runs fit one device.
SPEEDUP_TARGET = 1.4
MFU_TARGET = 0.45
FIT_TARGET = "8b"
# Targets of the LoRA variants (the regex matches the app's Llama paths; "all-linear" is
# the library's preset: every dense kernel but the output head).
LORA_TARGETS = {"lora-qv": r".*/self_attn/(q_proj|v_proj)/kernel", "lora-all-linear": "all-linear"}
# bf16 dense peaks (TFLOP/s, no sparsity) from the vendors' datasheets, keyed by a regex on
# `jax.Device.device_kind`; the first match wins, so the specific kinds come first.
DEVICE_PEAKS: tuple[tuple[str, float], ...] = (
    (r"H100.*PCIe", 756.0),
    (r"H100", 989.0),
    (r"H200", 989.0),
    (r"A100", 312.0),
    (r"L40S", 362.0),
    (r"\bL4\b", 121.0),
    (r"B200", 2250.0),
    (r"TPU v4", 275.0),
    (r"TPU v5 ?(lite|e)", 197.0),
    (r"TPU v5", 459.0),  # v5p reports "TPU v5"
    (r"TPU v6 ?(lite|e)", 918.0),
)
BYTES_FULL = 4 + 4 + 4 + 4  # float32 master, gradient, Adam's two moments
BYTES_LORA_BASE = 2  # the frozen base in bf16
LOGIT_BYTES = 12  # per token and vocab entry: bf16 logits, float32 copy, float32 gradient


@dataclasses.dataclass(frozen=True)
class AccelPreset:
    """One model and batch of the accelerator measurement.

    Attributes:
        name: the preset's name.
        config: the architecture (bf16 compute; its `param_dtype` is set per variant).
        batch: sequences per step.
        seq: tokens per sequence.
        rank: LoRA rank (alpha is twice it).
        why: why this batch and remat.
        cpu_ok: may run on a CPU (else a CPU-only machine reports it skipped: hours of work).
    """

    name: str
    config: LlamaConfig
    batch: int
    seq: int
    rank: int
    why: str
    cpu_ok: bool = False


def _llama3(**kw: Any) -> LlamaConfig:
    return LlamaConfig(
        num_heads=32,
        num_kv_heads=8,
        vocab_size=128256,
        rope_theta=500000.0,
        max_seq_len=2048,
        scan_layers=True,  # one layer compiled, not 16 or 32: compiles fit the time budget
        dtype="bfloat16",
        attention="auto",
        **kw,
    )


PRESETS: dict[str, AccelPreset] = {
    "1b": AccelPreset(
        "1b",
        _llama3(
            hidden_size=2048,
            intermediate_size=8192,
            num_layers=16,
            tie_embeddings=True,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 32.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
            },
            remat="dots",
        ),
        batch=8,
        seq=2048,
        rank=16,
        why=(
            "16,384 tokens a step keep every matmul compute-bound, and full fine-tuning "
            "(19.8 GB of float32 weights, gradients and Adam moments plus about 40 GB of "
            "activations and logits by the estimate) still fits an 80 GB device, so LoRA and "
            "full fine-tuning are compared at the same batch; remat 'dots' saves the projections' "
            "outputs and recomputes only elementwise work and attention (no counted FLOPs)"
        ),
    ),
    "8b": AccelPreset(
        "8b",
        _llama3(hidden_size=4096, intermediate_size=14336, num_layers=32, remat="dots"),
        batch=4,
        seq=2048,
        rank=16,
        why=(
            "the issue's target (LoRA r16 at 4 x 2048 on one device); without remat the "
            "estimate (about 78 GB in all) leaves no room on an 80 GB device; with 'dots' it is "
            "about 56 GB and only elementwise work and attention are recomputed"
        ),
    ),
    "tiny": AccelPreset(
        "tiny",
        LlamaConfig(
            vocab_size=256,
            hidden_size=64,
            intermediate_size=128,
            num_layers=2,
            num_heads=4,
            num_kv_heads=2,
            max_seq_len=64,
            scan_layers=True,
            tie_embeddings=True,
            dtype="bfloat16",
            attention="auto",
            remat="dots",
        ),
        batch=2,
        seq=32,
        rank=4,
        why="a CPU smoke run (seconds); not a performance figure",
        cpu_ok=True,
    ),
}


def peak_tflops(device_kind: str, flag: float | None = None) -> float | None:
    """The device's bf16 dense peak in TFLOP/s: `flag` when given, else the table's figure
    for the first pattern found in `device_kind`, else None (unknown: MFU is "n/a").

    Args:
        device_kind: ``jax.devices()[0].device_kind``, e.g. ``"NVIDIA H100 80GB HBM3"``.
        flag: ``--peak-tflops``, which wins over the table.

    Returns:
        TFLOP/s, or None.

    Example:
        >>> peak_tflops("NVIDIA H100 PCIe"), peak_tflops("cpu"), peak_tflops("cpu", 1.5)
        (756.0, None, 1.5)
    """
    if flag is not None:
        return float(flag)
    return next((tf for pat, tf in DEVICE_PEAKS if re.search(pat, device_kind)), None)


def matmul_params(params: Any, *, tied: bool) -> int:
    """N of the 6·N FLOPs per token: every ``kernel`` leaf, plus the input embedding only
    when it is tied (then it is also the output head); not norms or biases.

    Args:
        params: a params tree (arrays or `jax.ShapeDtypeStruct`s), e.g. from `jax.eval_shape`.
        tied: the embedding is the output head.

    Returns:
        The number of matmul parameters.

    Example:
        >>> import numpy as np
        >>> tree = {"embed_tokens": {"embedding": np.zeros((10, 4))},
        ...         "l": {"kernel": np.zeros((4, 4)), "scale": np.zeros(4)}}
        >>> matmul_params(tree, tied=True), matmul_params(tree, tied=False)
        (56, 16)
    """
    import jax

    total = 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        name = str(getattr(path[-1], "key", path[-1]))
        if name == "kernel" or (tied and name == "embedding"):
            total += int(_size(leaf.shape))
    return total


def _size(shape: tuple[int, ...]) -> int:
    out = 1
    for d in shape:
        out *= int(d)
    return out


def flops_per_token(n: int, trainable: int | None = None) -> float:
    """Training FLOPs per token: 6·N for full fine-tuning; LoRA counts (2 + rho)/3 of it,
    rho = trainable / N (no weight gradient for the base). Attention's own FLOPs (scores and
    values) are not counted, so MFU is understated at long sequences.

    Args:
        n: matmul parameters (`matmul_params`).
        trainable: LoRA's trainable parameters; None for full fine-tuning.

    Returns:
        FLOPs per token.

    Example:
        >>> flops_per_token(100), flops_per_token(100, trainable=30)
        (600.0, 460.0)
    """
    full = 6.0 * n
    return full if trainable is None else full * (2.0 + trainable / n) / 3.0


def mfu(tokens_per_s: float, flops: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation: ``tokens_per_s * flops / (peak * 1e12)``; None without a peak.

    Args:
        tokens_per_s: measured throughput.
        flops: FLOPs per token (`flops_per_token`).
        peak: the device's bf16 dense peak in TFLOP/s (`peak_tflops`), or None.

    Returns:
        A fraction, or None.

    Example:
        >>> mfu(1000.0, 6e9, 12.0)
        0.5
    """
    return None if peak is None else tokens_per_s * flops / (peak * 1e12)


def activation_bytes(c: LlamaConfig, tokens: int) -> int:
    """A rough estimate of the activations a training step keeps (bf16), by remat policy:
    per token and layer, 'none' keeps about ``5h + 3q + 3kv + 4i`` values, 'dots' the
    matmul outputs and the layer input (``3h + 2q + 2kv + 2i``), 'full' the layer input
    plus one layer's working set; plus the logits (`LOGIT_BYTES` per token and entry)."""
    h, i = c.hidden_size, c.intermediate_size
    q, kv = c.num_heads * int(c.head_dim or 0), c.num_kv_heads * int(c.head_dim or 0)
    everything = 5 * h + 3 * q + 3 * kv + 4 * i
    remat = getattr(c, "remat", "none")
    per_layer = {"none": everything, "dots": 3 * h + 2 * q + 2 * kv + 2 * i, "full": h}[remat]
    layers = 2 * tokens * per_layer * c.num_layers
    working = 2 * tokens * everything if remat == "full" else 0
    return layers + working + LOGIT_BYTES * tokens * c.vocab_size


def estimate_bytes(p: AccelPreset, variant: str, params: int, lora_params: int) -> int:
    """Device bytes of a variant: ``params * 16`` (float32 master, gradient, two Adam moments)
    for full fine-tuning, or the bf16 base plus ``lora_params * 16``, plus activations."""
    weights = params * BYTES_FULL if variant == "full" else params * BYTES_LORA_BASE
    adapters = 0 if variant == "full" else lora_params * BYTES_FULL
    return weights + adapters + activation_bytes(p.config, p.batch * p.seq)
