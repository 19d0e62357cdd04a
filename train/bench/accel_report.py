"""Runs the accelerator measurement (`train.bench.accel`), one fresh process per variant
(`train.bench.accel_child`), and reports it: MFU and LoRA/full ratios added to each record,
the README-ready markdown table, the targets.

This process never starts a JAX backend, so on a GPU it holds none of the device's memory
while the children run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any

from train.bench.accel import (
    FIT_TARGET,
    MFU_TARGET,
    PRESETS,
    SPEEDUP_TARGET,
    VARIANTS,
    flops_per_token,
    mfu,
    peak_tflops,
)
from train.bench.accel_child import WARMUP

BUDGET_S = 470.0  # the whole measurement, so that it fits a short loan of a device (8 min)
MIN_CHILD_S = 30.0  # a child needs at least this to start JAX and compile


def run_child(preset: str, variant: str, steps: int, timeout: float) -> dict[str, Any]:
    """Runs one variant in a fresh process; a failure (out of memory, a timeout) becomes a
    record with ``status: "failed"`` and the child's last error line, so the rest still run."""
    flags = os.environ.get("XLA_FLAGS", "").split()  # a user's flags stay; simulated devices go
    keep = [f for f in flags if not f.startswith("--xla_force_host_platform_device_count")]
    env = {**os.environ, "XLA_FLAGS": " ".join(keep)}
    cmd = [sys.executable, "-m", "train.bench.accel_child", "--preset", preset]
    cmd += ["--variant", variant, "--steps", str(steps)]
    start = time.perf_counter()
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        if done.returncode == 0 and lines:
            record = json.loads(lines[-1])
        else:
            tail = [x for x in done.stderr.splitlines() if x.strip()][-1:] or ["no output"]
            record = {"status": "failed", "reason": f"exit {done.returncode}: {tail[0][:300]}"}
    except subprocess.TimeoutExpired:
        record = {"status": "failed", "reason": f"timed out after {timeout:.0f} s"}
    where = {"preset": preset, "variant": variant, **_shape(preset)}
    return {**where, **record, "wall_s": time.perf_counter() - start}


def _shape(preset: str) -> dict[str, int]:
    return {"batch": PRESETS[preset].batch, "seq": PRESETS[preset].seq}


def add_derived(records: list[dict[str, Any]], flag: float | None) -> float | None:
    """Adds FLOPs per token, MFU and the LoRA/full ratios to each record (in place); returns
    the peak TFLOP/s used (None: unknown device and no flag)."""
    kinds = [r["device_kind"] for r in records if "device_kind" in r]
    peak = peak_tflops(kinds[0] if kinds else "", flag)
    full = {r["preset"]: r for r in records if r["variant"] == "full" and r["status"] == "ok"}
    for r in records:
        if r["status"] != "ok":
            continue
        lora = None if r["variant"] == "full" else r["trainable"]
        r["flops_per_token"] = flops_per_token(r["matmul_params"], lora)
        r["mfu"] = mfu(r["tokens_per_s"], r["flops_per_token"], peak)
        f = full.get(r["preset"])
        if lora is not None and f is not None:
            r["tokens_per_s_vs_full"] = r["tokens_per_s"] / f["tokens_per_s"]
            r["peak_bytes_vs_full"] = r["peak_bytes"] / f["peak_bytes"]
    return peak


def _gib(n: float) -> str:
    return f"{n / 2**30:,.2f} GiB"


def _ratio(r: dict[str, Any], key: str) -> str:
    return f"{r[key]:.2f}" if key in r else ""


def _met(ok: bool) -> str:
    return "met" if ok else "missed"


def _target(r: dict[str, Any]) -> str:
    """The bounds beside a LoRA row, with met/missed on an accelerator (the targets are an
    H100/H200-class GPU's; on a CPU only the bound is shown)."""
    if r["status"] != "ok" or r["variant"] == "full":
        return ""
    verdict = (lambda ok: "") if r["platform"] == "cpu" else (lambda ok: f" {_met(ok)}")
    out = [
        f"MFU >= {MFU_TARGET:.0%}" + ("" if r["mfu"] is None else verdict(r["mfu"] >= MFU_TARGET))
    ]
    ratio = r.get("tokens_per_s_vs_full")
    if r["variant"] == "lora-all-linear" and ratio is not None:
        out.append(f"tokens/s >= {SPEEDUP_TARGET}x full{verdict(ratio >= SPEEDUP_TARGET)}")
    return "; ".join(out)


def table(records: list[dict[str, Any]]) -> str:
    """The README-ready markdown table of the records (after `add_derived`)."""
    lines = [
        "| preset | variant | batch x seq | step (s) | tokens/s | MFU | peak memory "
        "| trainable | LoRA/full tokens/s | LoRA/full memory | target |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        head = f"| {r['preset']} | {r['variant']} | {r['batch']} x {r['seq']} "
        if r["status"] != "ok":
            lines.append(head + f"| {r['status']}: {r['reason']} |  |  |  |  |  |  |  |")
            continue
        mfu_s = "n/a" if r["mfu"] is None else f"{r['mfu']:.1%}"
        rss = "" if r["peak_kind"].startswith("device") else " (RSS)"
        lines.append(
            head + f"| {r['step_s']:.3f} | {r['tokens_per_s']:,.0f} | {mfu_s} "
            f"| {_gib(r['peak_bytes'])}{rss} | {r['trainable']:,} "
            f"| {_ratio(r, 'tokens_per_s_vs_full')} | {_ratio(r, 'peak_bytes_vs_full')} "
            f"| {_target(r)} |"
        )
    return "\n".join(lines)


def fit_target(records: list[dict[str, Any]]) -> str:
    """The third target: the 8B LoRA r16 runs at batch >= 4 x 2048 on one device."""
    p = PRESETS[FIT_TARGET]
    what = f"{FIT_TARGET} LoRA r{p.rank} at batch {p.batch} x {p.seq} fits one device"
    runs = [r for r in records if r["preset"] == FIT_TARGET and r["variant"] != "full"]
    if not runs:
        return f"{what}: not run"
    if any(r["status"] == "skipped" for r in runs):  # never started: neither met nor missed
        return f"{what}: not measured ({'; '.join(r['reason'] for r in runs)[:200]})"
    ok = all(r["status"] == "ok" for r in runs)
    peaks = ", ".join(f"{r['variant']} {_gib(r['peak_bytes'])}" for r in runs if "peak_bytes" in r)
    return f"{what}: {_met(ok)} ({peaks or 'no run finished'})"


def run(presets: list[str], steps: int, flag: float | None, budget_s: float = BUDGET_S) -> dict:
    """Every variant of every preset, one process each, within `budget_s` seconds in all (a
    child is stopped when the budget is spent, and the rest are reported as not run);
    returns the JSON-able result."""
    unknown = [p for p in presets if p not in PRESETS]
    if unknown:
        raise ValueError(f"--accel-preset: unknown {unknown}; known: {sorted(PRESETS)}.")
    if steps < 1:
        raise ValueError(f"--steps must be at least 1; found {steps}.")
    start, records = time.perf_counter(), list[dict[str, Any]]()
    for name in presets:
        for variant in VARIANTS:
            print(f"  accelerator: {name} {variant}", flush=True)
            left = budget_s - (time.perf_counter() - start)
            if left < MIN_CHILD_S:
                why = f"not run: the time budget ({budget_s:.0f} s) is spent"
                record = {"preset": name, "variant": variant, **_shape(name), "reason": why}
                record["status"] = "skipped"
                records.append({**record, "wall_s": 0.0})
            else:
                records.append(run_child(name, variant, steps, left))
            print(f"    {records[-1]['status']} in {records[-1]['wall_s']:.0f} s", flush=True)
    peak = add_derived(records, flag)
    kinds = sorted({r["device_kind"] for r in records if "device_kind" in r})
    return {
        "device_kind": (kinds or ["unknown (no variant started)"])[0] if len(kinds) < 2 else kinds,
        "peak_tflops": peak,
        "peak_source": "--peak-tflops" if flag is not None else "table (bf16 dense)",
        "steps": steps,
        "presets": {n: {"why": PRESETS[n].why, **PRESETS[n].config.to_dict()} for n in presets},
        "records": records,
        "fit_target": fit_target(records),
        "wall_s": time.perf_counter() - start,
    }


def report(result: dict[str, Any]) -> str:
    """The printed report: a header line, the table, the targets and the counting rules."""
    peak = result["peak_tflops"]
    peak_s = "unknown (MFU n/a)" if peak is None else f"{peak:g} TFLOP/s ({result['peak_source']})"
    return (
        f"Device: {result['device_kind']}, bf16 dense peak {peak_s}; {result['steps']} timed "
        f"steps per variant after {WARMUP} warm-up steps, each variant in a fresh process; "
        f"{result['wall_s']:.0f} s in all.\n\n{table(result['records'])}\n\n"
        f"Targets: LoRA all-linear tokens/s >= {SPEEDUP_TARGET}x full fine-tuning at the "
        f"same batch; LoRA MFU >= {MFU_TARGET:.0%}; {result['fit_target']}.\n"
        "MFU counts 6*N FLOPs per token for full fine-tuning (N: every kernel, the embedding "
        "only when tied) and (2 + trainable/N)/3 of that for LoRA; attention's own FLOPs are "
        "not counted, so MFU is understated at long sequences."
    )
