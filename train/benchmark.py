"""The benchmark: one table of ratios, each measured side by side in one run.

Model: a GPT-style decoder (default `medium`: 8 layers, d_model 768, 12 heads, vocab 8192,
sequence 256, batch 4, float32, adamw; rank 8). Variants that are compared are timed
alternating, round by round, in the same process, and each ratio is the median of the
per-round ratios (drift on a shared machine cancels); peak memory and device scaling are
measured in fresh processes (`train.bench.child`), since a process's peak and its device
count are properties of the whole process.

Rows (targets on a CPU in brackets):
- LoRA step / full fine-tune step, q/v [<= 0.65] and all-linear [<= 0.75]; lora_jax on an
  NNX model (`add_lora`) and flax's own `nnx.LoRALinear` beside them.
- Factored / merged LoRA step: what computing ``(x @ a) @ b`` instead of ``W + a@b`` buys.
- The same model in the custom-module style (`CustomGPT`: raw `self.param` kernels,
  `jnp.einsum` with 3-D head kernels, ``@``, ``table[ids]``; each adapter checked to route
  ``factored (dot_general)``): LoRA all-linear / its full fine-tune [<= 0.72], that ratio
  minus the stock model's all-linear ratio [<= +0.03: the custom style costs at most 0.03
  more; being cheaper is fine], and LoRA q/v / full.
- A mixture-of-experts twin (`MoEGPT`: each MLP 8 experts, top-2, sorted tokens through
  `jax.lax.ragged_dot`; each LoRA adapter checked to route ``factored (...)``): expert
  LoRA (expert kernels and attention, not the router) / its full fine-tune [<= 0.75].
- Peak memory of a LoRA run / a full fine-tune run [q/v <= 0.70], optimizer-state bytes.
- Forward with an adapter merged into the weights / base forward [<= 1.02].
- Mixed batch over 4 adapters / one adapter [<= 1.2] (traces / calls shows swapping
  adapters never recompiles).
- Adapter save and restore time, size on disk / raw A/B bytes.
- Steps/s on 2 and 4 simulated CPU devices / 1 (a sanity check only: simulated devices
  share the same cores).
- QLoRA (`train.bench.qlora`): base bytes int8 / float32 [<= 0.27] and int4, nf4 / float32
  [<= 0.16] (scales included), for the whole base (embedding and norms float) and for the
  quantized kernels alone; peak memory of a QLoRA nf4 run / a float LoRA run; QLoRA nf4
  step / float LoRA step [<= 1.5, CPU]; the demo's fine-tune on an nf4 base / on the float
  base, eval loss [<= 1.03].
- DoRA (`use_dora=True`, through the contraction rewrite, checked to route ``factored
  (dot_general, DoRA)``): DoRA all-linear step / LoRA all-linear step [<= 1.15; PEFT
  measures about +26% on GPU], and the peak memory of a DoRA run / a LoRA run beside it.
- Many adapters in one step (`train.bench.multitask`): 8 all-linear rank-8 adapters mixed
  in a batch of 8 (`lj.multi.make_train_step`, an optimizer state per adapter) / one
  adapter (`lj.make_train_step`) on the same batch [<= 1.15].

Usage::

    python -m train.benchmark                 # the medium model (~10 minutes on 2 CPU cores)
    python -m train.benchmark --preset tiny   # a smoke run (seconds)
    python -m train.benchmark --part serving  # only the serving rows
    python -m train.benchmark --part moe      # only the mixture-of-experts rows
    python -m train.benchmark --part qlora    # only the QLoRA rows (runs the demo twice)
    python -m train.benchmark --part dora     # only the DoRA rows
    python -m train.benchmark --part multitask  # only the many-adapters training row
    python -m train.benchmark --part accelerator  # bf16 Llama 1B/8B: tokens/s, MFU, memory

`--part accelerator` (not part of `all`; `train.bench.accel_report`) runs Llama-3.2-1B-like (seq
2048, batch 8) and Llama-3-8B-like (seq 2048, batch 4) presets in bf16, each variant (full
fine-tuning where it fits, LoRA q/v, LoRA all-linear) in a fresh process, and prints step
time, tokens/s, MFU, peak device memory and the LoRA/full ratios (`--accel-preset tiny`:
a CPU smoke run; `--json PATH` writes the records; `--peak-tflops` sets the device's bf16
peak when the table does not know it; `--steps` timed steps per variant).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
from typing import Any

import jax

from train.bench import accel_report, files, processes, qlora
from train.bench.models import GPT, PRESETS, RANK, GPTConfig
from train.bench.moe import EXPERTS, TOP_K, moe_runners
from train.bench.multitask import MULTITASK_ADAPTERS, multitask_batch, multitask_runners
from train.bench.serving import SERVING_ADAPTERS, serving_runners
from train.bench.steps import (
    ALL_LINEAR,
    DORA_ROUTE,
    NNX_ALL_LINEAR,
    QV,
    Runner,
    custom_runners,
    floor_runner,
    full_runner,
    lora_runner,
    measure,
    nnx_lora_jax_runner,
    nnx_runner,
    paired,
    paired_gap,
)

PARTS = ("train", "moe", "serving", "files", "memory", "scaling", "qlora", "dora", "multitask")
TARGETS = {
    "lora q/v": 0.65,
    "lora all-linear": 0.75,
    "custom all-linear": 0.72,
    "moe expert lora": 0.75,
    "memory q/v": 0.70,
    "merged forward": 1.02,
    "mixed": 1.2,
    "qlora int8 bytes": 0.27,
    "qlora 4-bit bytes": 0.16,
    "qlora step": 1.5,
    "qlora quality": 1.03,
    "dora step": 1.15,
    "multitask step": 1.15,
}


CUSTOM_GAP = 0.03  # |custom-style all-linear ratio - stock all-linear ratio| at most this


def _mib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"


def _verdict(ratio: float, key: str) -> str:
    target = TARGETS.get(key)
    return "" if target is None else f"<= {target} {'met' if ratio <= target else 'MISSED'}"


def _ratio_row(label: str, r: Runner, ref: Runner, unit: float, key: str = "") -> str:
    ratio, low, high = paired(r, ref)
    this, that = (unit * statistics.median(x.times) for x in (r, ref))
    suffix = "ms" if unit == 1e3 else "s"
    return (
        f"| {label} | {this:.3f} {suffix} | {that:.3f} {suffix} | {ratio:.2f} "
        f"({low:.2f}-{high:.2f}) | {_verdict(ratio, key)} |"
    )


def _gap_row(label: str, custom: tuple[Runner, Runner], stock: tuple[Runner, Runner]) -> str:
    gap, low, high = paired_gap(*custom, *stock)
    this, that = (paired(*pair)[0] for pair in (custom, stock))
    verdict = "met" if gap <= CUSTOM_GAP else "MISSED"
    return (
        f"| {label} | {this:.2f} | {that:.2f} | {gap:+.2f} ({low:+.2f} to {high:+.2f}) "
        f"| <= +{CUSTOM_GAP} {verdict} |"
    )


def custom_rows(runners: dict[str, Runner]) -> list[str]:
    full = runners["custom full"]
    return [
        _ratio_row(
            "custom-style: LoRA all-linear step / full fine-tune step",
            runners["custom all"],
            full,
            1,
            "custom all-linear",
        ),
        _gap_row(
            "custom-style all-linear ratio minus stock all-linear ratio",
            (runners["custom all"], full),
            (runners["all"], runners["full"]),
        ),
        _ratio_row("custom-style: LoRA attention (q/v) / full", runners["custom qv"], full, 1),
    ]


def train_rows(runners: dict[str, Runner]) -> list[str]:
    full, merged = runners["full"], runners["merged"]
    rows = [
        _ratio_row("LoRA q/v step / full fine-tune step", runners["qv"], full, 1, "lora q/v"),
        _ratio_row(
            "LoRA all-linear step / full fine-tune step", runners["all"], full, 1, "lora all-linear"
        ),
        _ratio_row("lora_jax on NNX (add_lora), all-linear / full", runners["nnx"], full, 1),
        _ratio_row("peer: nnx.LoRALinear q/v / full", runners["peer qv"], full, 1),
        _ratio_row("peer: nnx.LoRALinear all-linear / full", runners["peer all"], full, 1),
        _ratio_row("factored / merged LoRA step (all-linear)", runners["all"], merged, 1),
    ]
    return rows + custom_rows(runners)


def moe_rows(runners: dict[str, Runner]) -> list[str]:
    return [
        _ratio_row(
            f"MoE ({EXPERTS} experts, top-{TOP_K}): expert LoRA (experts + attention) step "
            "/ full fine-tune step",
            runners["moe lora"],
            runners["moe full"],
            1,
            "moe expert lora",
        )
    ]


def serving_rows(runners: list[Runner]) -> list[str]:
    base, merged, one, mixed = runners
    return [
        _ratio_row("forward, adapter merged / base forward", merged, base, 1e3, "merged forward"),
        _ratio_row(
            f"forward, mixed batch of {SERVING_ADAPTERS} adapters / one adapter "
            f"(traces/calls: one {one.traces}/{one.calls}, mixed {mixed.traces}/{mixed.calls})",
            mixed,
            one,
            1e3,
            "mixed",
        ),
    ]


def memory_rows(mem: dict[str, dict[str, Any]]) -> list[str]:
    full = mem["full"]
    above = lambda m: m["peak_bytes"] - m["baseline_bytes"]
    rows = []
    for variant, label, key in (
        ("lora-qv", "q/v", "memory q/v"),
        ("lora-all-linear", "all-linear", ""),
    ):
        m = mem[variant]
        ratio = m["peak_bytes"] / full["peak_bytes"]
        rows.append(
            f"| peak memory (process), LoRA {label} run / full fine-tune run "
            f"| {_mib(m['peak_bytes'])} | {_mib(full['peak_bytes'])} | {ratio:.2f} "
            f"| {_verdict(ratio, key)} |"
        )
    qv = mem["lora-qv"]
    # On a small model the peak can come before the model exists (compiles, imports).
    growth = f"{above(qv) / above(full):.2f}" if above(full) > 0 else "n/a"
    rows.append(
        f"| peak memory above the after-import baseline, LoRA q/v / full | {_mib(above(qv))} "
        f"| {_mib(above(full))} | {growth} |  |"
    )
    opt = qv["opt_bytes"] / full["opt_bytes"]
    rows.append(
        f"| optimizer state, LoRA q/v / full fine-tune | {_mib(qv['opt_bytes'])} "
        f"| {_mib(full['opt_bytes'])} | {opt:.4f} |  |"
    )
    return rows


def files_rows(f: dict[str, float]) -> list[str]:
    return [
        f"| adapter save (all-linear, rank {RANK}) | {f['save_s']:.3f} s |  |  |  |",
        f"| adapter restore, digests verified / not | {f['restore_s']:.3f} s "
        f"| {f['restore_unverified_s']:.3f} s "
        f"| {f['restore_s'] / f['restore_unverified_s']:.2f} |  |",
        f"| adapter size on disk / raw A/B bytes | {f['disk_bytes'] / 1024:,.0f} KiB "
        f"| {f['raw_bytes'] / 1024:,.0f} KiB | {f['disk_bytes'] / f['raw_bytes']:.2f} |  |",
    ]


def state_rows(f: dict[str, float]) -> list[str]:
    size = f"{f['state_bytes'] / 2**20:.1f} MiB"
    rows = []
    for name, what in (
        ("save", "until `save` returns"),
        ("write", "until on disk"),
        ("restore", "restore"),
    ):
        on, off = f[f"state_{name}_s"], f[f"state_{name}_unverified_s"]
        rows.append(
            f"| training-state step ({size}), {what}, digests / none | {on:.3f} s "
            f"| {off:.3f} s | {on / off:.2f} |  |"
        )
    return rows


def qlora_bytes_rows(b: dict[str, dict[str, int]]) -> list[str]:
    """Quantized / float32 bytes of the base: whole (what the issue's target is about) and
    the quantized kernels alone (the embedding, kept float, weighs on the whole)."""
    whole = b["float32"]["whole"]
    rows = []
    for variant, v in b.items():
        if variant == "float32":
            continue
        key = (
            ""
            if "double" in variant
            else ("qlora int8 bytes" if variant == "int8" else "qlora 4-bit bytes")
        )
        shown = variant.replace("double", "+ double quantization")
        group = "" if variant == "int8" else f" g{qlora.GROUP}"
        ratio = v["whole"] / whole
        rows.append(
            f"| base bytes, {shown}{group} / float32, whole base (embedding, norms float) "
            f"| {_mib(v['whole'])} | {_mib(whole)} | {ratio:.3f} | {_verdict(ratio, key)} |"
        )
        kr = v["kernels"] / v["kernels_float"]
        rows.append(
            f"| base bytes, {shown}{group} / float32, quantized kernels only "
            f"| {_mib(v['kernels'])} | {_mib(v['kernels_float'])} | {kr:.3f} "
            f"| {_verdict(kr, key)} |"
        )
    return rows


def qlora_memory_rows(mem: dict[str, dict[str, Any]]) -> list[str]:
    q, f = mem["qlora-nf4"], mem["lora-all-linear"]
    above = lambda m: m["peak_bytes"] - m["baseline_bytes"]
    growth = f"{above(q) / above(f):.2f}" if above(f) > 0 else "n/a"
    return [
        f"| peak memory (process), QLoRA nf4 all-linear run / float LoRA all-linear run "
        f"| {_mib(q['peak_bytes'])} | {_mib(f['peak_bytes'])} "
        f"| {q['peak_bytes'] / f['peak_bytes']:.2f} |  |",
        f"| peak memory above the after-import baseline, QLoRA nf4 / float LoRA "
        f"| {_mib(above(q))} | {_mib(above(f))} | {growth} |  |",
    ]


def qlora_step_rows(runners: dict[str, Runner]) -> list[str]:
    return [
        _ratio_row(
            "QLoRA nf4 all-linear step / float LoRA all-linear step",
            runners["qlora"],
            runners["lora"],
            1,
            "qlora step",
        )
    ]


def qlora_quality_rows(q: dict[str, Any]) -> list[str]:
    ratio = q["nf4"] / q["float"]
    base = q["nf4_base"] / q["float_base"]
    return [
        f"| eval loss after the demo's fine-tune ({q['settings']}), nf4 base / float base "
        f"| {q['nf4']:.4f} | {q['float']:.4f} | {ratio:.4f} | {_verdict(ratio, 'qlora quality')} |",
        f"| eval loss of the base before fine-tuning, nf4 / float32 | {q['nf4_base']:.4f} "
        f"| {q['float_base']:.4f} | {base:.4f} |  |",
    ]


def dora_rows(runners: dict[str, Runner], mem: dict[str, dict[str, Any]]) -> list[str]:
    d, lo = mem["dora-all-linear"], mem["lora-all-linear"]
    return [
        _ratio_row(
            "DoRA all-linear step / LoRA all-linear step",
            runners["dora"],
            runners["lora"],
            1,
            "dora step",
        ),
        f"| peak memory (process), DoRA all-linear run / LoRA all-linear run "
        f"| {_mib(d['peak_bytes'])} | {_mib(lo['peak_bytes'])} "
        f"| {d['peak_bytes'] / lo['peak_bytes']:.2f} |  |",
    ]


def multitask_rows(runners: dict[str, Runner]) -> list[str]:
    k = MULTITASK_ADAPTERS
    return [
        _ratio_row(
            f"{k} adapters mixed in a batch of {k} (lj.multi.make_train_step) / one adapter "
            f"(lj.make_train_step), same batch, all-linear rank {RANK}",
            runners["mixed"],
            runners["one"],
            1,
            "multitask step",
        )
    ]


def scaling_rows(steps_per_s: dict[int, float]) -> list[str]:
    one = steps_per_s[1]
    return [
        f"| steps/s on {n} simulated CPU devices / 1 device (sanity check only) "
        f"| {steps_per_s[n]:.2f} | {one:.2f} | {steps_per_s[n] / one:.2f} |  |"
        for n in sorted(steps_per_s)
        if n != 1
    ]


def step_table(runners: dict[str, Runner]) -> str:
    """The detail behind the training rows: every variant's step time and sizes; ratios
    are to the full fine-tune of the same model."""
    lines = [
        "| variant | median step (s) | ratio to full (range) | compile (s) | trainable params "
        "| trainable bytes | optimizer state |",
        "|---|---|---|---|---|---|---|",
    ]
    for key, r in runners.items():
        full = runners[next((f"{m} full" for m in ("custom", "moe") if key.startswith(m)), "full")]
        med = statistics.median(r.times)
        ratio, low, high = paired(r, full)
        lines.append(
            f"| {r.name} | {med:.3f} | {ratio:.2f} ({low:.2f}-{high:.2f}) "
            f"| {max(r.compile_s - med, 0):.1f} | {r.trainable:,} | {_mib(r.trainable_bytes)} "
            f"| {_mib(r.opt_bytes)} |"
        )
    return "\n".join(lines)


def qlora_step_table(runners: dict[str, Runner], against: str = "float LoRA") -> str:
    """QLoRA's (or DoRA's) step against LoRA's (same targets and ranks)."""
    ref = runners["lora"]
    lines = [
        f"| variant | median step (s) | ratio to {against} (range) | compile (s) |",
        "|---|---|---|---|",
    ]
    for r in runners.values():
        med = statistics.median(r.times)
        ratio, low, high = paired(r, ref)
        lines.append(
            f"| {r.name} | {med:.3f} | {ratio:.2f} ({low:.2f}-{high:.2f}) "
            f"| {max(r.compile_s - med, 0):.1f} |"
        )
    return "\n".join(lines)


def serving_table(runners: list[Runner]) -> str:
    """The detail behind the serving rows: forward times, ratios, traces per calls."""
    base = runners[0]
    lines = [
        "| serving variant | median forward (ms) | ratio to base (range) | traces / calls |",
        "|---|---|---|---|",
    ]
    for r in runners:
        ratio, low, high = paired(r, base)
        lines.append(
            f"| {r.name} | {1e3 * statistics.median(r.times):.1f} | {ratio:.2f} "
            f"({low:.2f}-{high:.2f}) | {r.traces} / {r.calls} |"
        )
    return "\n".join(lines)


def _train_runners(model: GPT, variables: Any, ids: jax.Array, cfg: GPTConfig) -> dict:
    return {
        "full": full_runner(model, variables, ids),
        "qv": lora_runner("lora q/v", model, variables, ids, QV),
        "all": lora_runner("lora all-linear", model, variables, ids, ALL_LINEAR),
        "merged": lora_runner(
            "lora all-linear, merged path", model, variables, ids, ALL_LINEAR, merged=True
        ),
        "nnx": nnx_lora_jax_runner("lora_jax add_lora (NNX) all-linear", cfg, ids),
        "peer qv": nnx_runner("nnx.LoRALinear q/v (peer)", cfg, ids, {"query", "value"}),
        "peer all": nnx_runner("nnx.LoRALinear all-linear (peer)", cfg, ids, set(NNX_ALL_LINEAR)),
        "floor": floor_runner(model, variables, ids),
        **custom_runners(cfg, ids),
    }


def _accelerator(args: argparse.Namespace) -> str:
    """`--part accelerator`: never starts a JAX backend here (the children own the device)."""
    names = [n.strip() for n in args.accel_preset.split(",") if n.strip()]
    print(f"benchmark: accelerator presets {names}, {args.steps} timed steps", flush=True)
    result = accel_report.run(names, args.steps, args.peak_tflops)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    text = accel_report.report(result)
    print("\n" + text)
    return text


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), default="medium")
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds per variant")
    parser.add_argument(
        "--part",
        choices=("all", *PARTS, "accelerator"),
        default="all",
        help="one group of rows, or all (accelerator runs only when named)",
    )
    parser.add_argument(
        "--accel-preset",
        default="1b,8b",
        help="accelerator presets: 1b,8b or tiny (comma-separated)",
    )
    parser.add_argument("--peak-tflops", type=float, default=None, help="device bf16 dense peak")
    parser.add_argument("--json", default=None, help="accelerator part: write the records here")
    parser.add_argument("--steps", type=int, default=5, help="accelerator part: timed steps")
    args = parser.parse_args(argv)
    if args.part == "accelerator":
        return _accelerator(args)
    parts = PARTS if args.part == "all" else (args.part,)
    cfg = PRESETS[args.preset]
    model = GPT(cfg)
    ids = jax.random.randint(jax.random.key(0), (cfg.batch, cfg.seq), 0, cfg.vocab)
    variables = jax.jit(model.init)(jax.random.key(0), ids)
    print(f"benchmark: preset {args.preset}, {args.rounds} rounds, parts {parts}", flush=True)
    rows, details = [], []
    if "train" in parts:
        runners = _train_runners(model, variables, ids, cfg)
        measure(list(runners.values()), args.rounds)
        rows += train_rows(runners)
        details.append("Training steps:\n\n" + step_table(runners))
    if "moe" in parts:
        moe = moe_runners(cfg, ids)
        measure(list(moe.values()), args.rounds)
        rows += moe_rows(moe)
        details.append("Mixture-of-experts training steps:\n\n" + step_table(moe))
    if "serving" in parts:
        serving = serving_runners(model, variables, ids)
        measure(serving, args.rounds)
        rows += serving_rows(serving)
        details.append("Serving forwards:\n\n" + serving_table(serving))
    if "memory" in parts:
        print("  memory: one process per variant", flush=True)
        rows += memory_rows(processes.peak_memory(args.preset))
    if "files" in parts:
        rows += files_rows(files.adapter_files(variables, args.rounds))
        rows += state_rows(files.state_files(variables, args.rounds))
    if "scaling" in parts:
        print("  scaling: one process per device count", flush=True)
        rows += scaling_rows(processes.scaling(args.preset, max(args.rounds, 2)))
    if "qlora" in parts:
        rows += qlora_bytes_rows(qlora.base_bytes(model, variables, ids))
        q_runners = qlora.step_runners(model, variables, ids)
        measure(list(q_runners.values()), args.rounds)
        rows += qlora_step_rows(q_runners)
        details.append("QLoRA training steps:\n\n" + qlora_step_table(q_runners))
        del q_runners
        print("  qlora memory: one process per variant", flush=True)
        mem = processes.peak_memory(args.preset, variants=processes.QLORA_MEMORY_VARIANTS)
        rows += qlora_memory_rows(mem)
        print("  qlora quality: the demo's fine-tune, float and nf4 base", flush=True)
        rows += qlora_quality_rows(qlora.demo_quality(args.preset))
    if "dora" in parts:
        d_runners = {
            "lora": lora_runner("lora all-linear", model, variables, ids, ALL_LINEAR),
            "dora": lora_runner(
                "dora all-linear", model, variables, ids, ALL_LINEAR, route=DORA_ROUTE, dora=True
            ),
        }
        measure(list(d_runners.values()), args.rounds)
        print("  dora memory: one process per variant", flush=True)
        mem = processes.peak_memory(args.preset, variants=processes.DORA_MEMORY_VARIANTS)
        rows += dora_rows(d_runners, mem)
        details.append("DoRA training steps:\n\n" + qlora_step_table(d_runners, "LoRA"))
    if "multitask" in parts:
        m_runners = multitask_runners(model, variables, multitask_batch(cfg))
        measure([m_runners["one"], m_runners["mixed"]], args.rounds)
        rows += multitask_rows(m_runners)
        table = qlora_step_table({"lora": m_runners["one"], "mixed": m_runners["mixed"]}, "one")
        details.append("Many adapters in one step:\n\n" + table)
    head = (
        f"Model: {cfg.layers} layers, d_model {cfg.d_model}, {cfg.heads} heads, vocab "
        f"{cfg.vocab}, seq {cfg.seq}, batch {cfg.batch}, float32, adamw, rank {RANK}; "
        f"{args.rounds} rounds; the custom-style rows use the same model written with "
        f"raw params and einsums; the MoE rows use it with {EXPERTS} experts (top-{TOP_K}, "
        f"each {4 // TOP_K} x d_model wide) as every MLP. Machine: {platform.machine()} "
        f"{jax.devices()[0].platform.upper()}, {jax.device_count()} device(s), "
        f"jax {jax.__version__}.\n\n"
        "| measure | this | against | ratio (range) | target |\n|---|---|---|---|---|\n"
    )
    result = head + "\n".join(rows) + "".join(f"\n\n{d}" for d in details)
    print("\n" + result)
    return result


if __name__ == "__main__":
    main()
