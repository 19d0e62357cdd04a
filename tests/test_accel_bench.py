"""The accelerator measurement (`--part accelerator`): it runs end to end on the CPU with the
tiny preset, its FLOP and MFU arithmetic matches a hand count, the device-peak table answers
as documented, and the 1B and 8B presets have the published parameter counts."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from train import benchmark
from train.bench import accel, accel_report
from train.models import Llama, num_params

RECORD_FIELDS = (
    "step_s",
    "tokens_per_s",
    "mfu",
    "flops_per_token",
    "peak_bytes",
    "peak_kind",
    "trainable",
    "matmul_params",
    "estimate_bytes",
    "first_step_s",
)


@pytest.mark.slow  # three fresh processes, each compiling a bf16 step (about 8 s each here)
def test_command_runs_end_to_end_on_cpu(tmp_path, capsys):
    out = tmp_path / "accel.json"
    text = benchmark.main(
        ["--part", "accelerator", "--accel-preset", "tiny", "--steps", "2", "--json", str(out)]
    )
    result = json.loads(out.read_text())
    records = {r["variant"]: r for r in result["records"]}
    assert list(records) == list(accel.VARIANTS)
    for r in records.values():
        assert r["status"] == "ok", r
        assert all(k in r for k in RECORD_FIELDS), sorted(set(RECORD_FIELDS) - set(r))
        assert r["mfu"] is None  # a CPU is not in the table and no --peak-tflops was given
        assert r["peak_kind"].startswith("process peak RSS") and r["peak_bytes"] > 0
        assert r["tokens_per_s"] == pytest.approx(2 * 32 / r["step_s"])
        assert len(r["step_times"]) == 2 and r["attention"] == "auto" and r["remat"] == "dots"
    assert records["full"]["param_dtype"] == "float32"
    assert records["lora-qv"]["param_dtype"] == "bfloat16"
    for variant in ("lora-qv", "lora-all-linear"):
        r = records[variant]
        assert r["tokens_per_s_vs_full"] == pytest.approx(
            r["tokens_per_s"] / records["full"]["tokens_per_s"]
        )
        assert r["peak_bytes_vs_full"] > 0
    assert records["lora-qv"]["trainable"] == 2 * 4 * ((64 + 64) + (64 + 32))  # as counted below
    assert records["lora-qv"]["trainable"] < records["lora-all-linear"]["trainable"]
    assert "| tiny | lora-all-linear | 2 x 32 |" in text and "| n/a |" in text
    assert "8b LoRA r16 at batch 4 x 2048 fits one device: not run" in text
    assert text in capsys.readouterr().out


def _hand_count(c) -> tuple[int, int]:
    """(all params, matmul params) of a Llama config, counted from its shapes."""
    h, i, hd = c.hidden_size, c.intermediate_size, c.head_dim
    attn = h * c.num_heads * hd * 2 + h * c.num_kv_heads * hd * 2  # q, o; k, v
    kernels = c.num_layers * (attn + 3 * h * i)
    embed = c.vocab_size * h
    head = 0 if c.tie_embeddings else embed
    norms = (2 * c.num_layers + 1) * h
    matmul = kernels + head + (embed if c.tie_embeddings else 0)
    return kernels + embed + head + norms, matmul


def _shapes(c):
    ids = jnp.zeros((1, 4), jnp.int32)
    return jax.eval_shape(Llama(c).init, jax.random.key(0), ids)["params"]


@pytest.mark.parametrize("tied", [True, False])
def test_matmul_params_and_flops_against_a_hand_count(tied):
    c = dataclasses.replace(accel.PRESETS["tiny"].config, tie_embeddings=tied)
    total, n = _hand_count(c)
    shapes = _shapes(c)
    assert num_params(shapes) == total
    assert accel.matmul_params(shapes, tied=tied) == n
    # tiny: h 64, i 128, 2 layers, 4 heads of 16, 2 kv heads, vocab 256
    # the head is the tied embedding or lm_head: 256 x 64 either way, counted once
    assert n == 2 * (64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 128) + 256 * 64
    assert accel.flops_per_token(n) == 6.0 * n
    lora = 2 * 4 * ((64 + 64) + (64 + 32))  # 2 layers, rank 4 on q (64 -> 64), v (64 -> 32)
    rho = lora / n
    assert accel.flops_per_token(n, lora) == pytest.approx(6.0 * n * (2 + rho) / 3)
    # MFU: 1,000 tokens in 0.5 s at 6N FLOPs each, on a 1e-6 TFLOP/s (1 MFLOP/s) device
    tokens_per_s = 1000 / 0.5
    got = accel.mfu(tokens_per_s, accel.flops_per_token(n), 1e-6)
    assert got == pytest.approx(tokens_per_s * 6.0 * n / 1e6)
    assert accel.mfu(tokens_per_s, 1.0, None) is None


def test_lora_flops_fraction_is_between_two_thirds_and_one():
    assert accel.flops_per_token(900, 0) == pytest.approx(6 * 900 * 2 / 3)
    assert accel.flops_per_token(900, 900) == pytest.approx(6 * 900)
    assert accel.mfu(2000.0, 460.0, 9.2e-7) == pytest.approx(1.0)  # 920,000 FLOP/s of 920,000


@pytest.mark.parametrize(
    ("kind", "tflops"),
    [
        ("NVIDIA H100 80GB HBM3", 989.0),
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA H200", 989.0),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("NVIDIA L4", 121.0),
        ("NVIDIA L40S", 362.0),
        ("NVIDIA B200", 2250.0),
        ("TPU v4", 275.0),
        ("TPU v5 lite", 197.0),
        ("TPU v5", 459.0),
        ("TPU v6 lite", 918.0),
        ("cpu", None),
        ("NVIDIA L40", None),  # not L4, not L40S: unknown
    ],
)
def test_device_peak_lookup(kind, tflops):
    assert accel.peak_tflops(kind) == tflops
    assert accel.peak_tflops(kind, 123.0) == 123.0  # the flag wins


@pytest.mark.parametrize(("name", "published"), [("1b", 1_235_814_400), ("8b", 8_030_261_248)])
def test_presets_have_the_published_sizes(name, published):
    p = accel.PRESETS[name]
    shapes = _shapes(p.config)  # abstract: nothing is allocated
    assert num_params(shapes) == published
    assert accel.matmul_params(shapes, tied=p.config.tie_embeddings) == _hand_count(p.config)[1]
    assert (p.seq, p.config.dtype, p.config.attention) == (2048, "bfloat16", "auto")


def test_memory_estimate_skips_8b_full_on_an_h200_and_fits_8b_lora_on_80_gb():
    p = accel.PRESETS["8b"]
    params = 8_030_261_248
    full = accel.estimate_bytes(p, "full", params, 0)
    lora = accel.estimate_bytes(p, "lora-all-linear", params, 42_000_000)
    assert full > 0.95 * 141e9 > 0.95 * 80e9 > lora
    one_b = accel.PRESETS["1b"]
    assert accel.estimate_bytes(one_b, "full", 1_235_814_400, 0) < 0.95 * 80e9


def test_a_skipped_or_failed_variant_is_reported_not_raised():
    records = [
        {"preset": "8b", "variant": "full", "batch": 4, "seq": 2048, "status": "skipped",
         "reason": "does not fit (estimate 160.0 GiB > 132.0 GiB)"},
        {"preset": "8b", "variant": "lora-qv", "batch": 4, "seq": 2048, "status": "failed",
         "reason": "exit 1: RESOURCE_EXHAUSTED"},
    ]  # fmt: skip
    assert accel_report.add_derived(records, None) is None
    text = accel_report.table(records)
    assert "skipped: does not fit (estimate 160.0 GiB > 132.0 GiB)" in text
    assert "missed" in accel_report.fit_target(records)
    records[1] = {**records[0], "variant": "lora-qv"}
    assert "not measured (does not fit" in accel_report.fit_target(records)
    with pytest.raises(ValueError, match="--accel-preset: unknown"):
        accel_report.run(["70b"], 1, None)
    with pytest.raises(ValueError, match="--steps must be at least 1; found 0"):
        accel_report.run(["tiny"], 0, None)


def test_the_run_is_bounded_and_the_measuring_process_never_starts_jax():
    # With the budget spent, nothing starts; the parent never starts a JAX backend, so on a
    # GPU it would hold none of the device's memory while the children measure.
    code = (
        "import jax._src.xla_bridge as xb\n"
        "from train.bench import accel_report\n"
        "r = accel_report.run(['tiny'], 1, None, budget_s=0.0)\n"
        "print(accel_report.report(r))\n"
        "assert not xb._backends, xb._backends\n"
        "assert [x['status'] for x in r['records']] == ['skipped'] * 3\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("skipped: not run: the time budget (0 s) is spent") == 3
