"""QLoRA rows: what a quantized frozen base saves (bytes, peak memory) and costs (step
time, eval loss), each side by side with float LoRA in the same run.

- Base bytes (`lj.quant.nbytes`: codes plus float32 scales) of int8 / int4 / nf4 against
  float32, for the whole base (the embedding and norms stay float: `quantize` with the
  inferred layouts takes exactly the contraction kernels) and for the quantized kernels
  alone.
- Step time: QLoRA nf4 all-linear / float LoRA all-linear (same adapters), alternating.
- Peak process memory of the two runs, each in a fresh process (`train.bench.child`); the
  QLoRA process builds its base kernel by kernel (as a loader reading a checkpoint does),
  so the float base never exists whole there.
- Quality: the demo's fine-tune (``python -m train`` with its defaults, as ``make demo``
  runs it) on an nf4 base and on the float base, each a ``python -m train`` process; both
  eval losses and their ratio.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import tempfile
from typing import Any

import jax
import jax.numpy as jnp

import lora_jax as lj
from train.bench.steps import ALL_LINEAR, CUSTOM_ROUTE, Runner, lora_runner
from train.quantized import flat_leaves

FORMATS = ("int8", "int4", "nf4")
GROUP = 64
QLORA_ROUTE = CUSTOM_ROUTE  # a quantized kernel runs through the contraction rewrite


def layouts_of(model: Any, variables: Any, ids: jax.Array) -> dict[str, lj.Layout]:
    return lj.infer_layouts(model.apply, variables, ids)


def base_bytes(model: Any, variables: Any, ids: jax.Array) -> dict[str, dict[str, int]]:
    """Bytes of the float base and of each quantized one: ``{variant: {"whole", "kernels",
    "kernels_float"}}`` (``kernels``: the quantized kernels' codes and scales;
    ``kernels_float``: the same kernels in float32)."""
    layouts = layouts_of(model, variables, ids)
    total = lj.quant.nbytes(variables)
    out = {"float32": {"whole": total, "kernels": 0, "kernels_float": 0}}
    flat = flat_leaves(variables)
    for fmt, double in (*((f, False) for f in FORMATS), ("nf4", True)):
        q = lj.quant.quantize(variables, fmt, group_size=GROUP, layouts=layouts, double=double)
        kernels = {p: x for p, x in flat_leaves(q).items() if lj.quant.is_quantized(x)}
        out[fmt + (" double" if double else "")] = {
            "whole": lj.quant.nbytes(q),
            "kernels": lj.quant.nbytes(list(kernels.values())),
            "kernels_float": lj.quant.nbytes([flat[p] for p in kernels]),
        }
    return out


def step_runners(model: Any, variables: Any, ids: jax.Array) -> dict[str, Runner]:
    """Float LoRA and QLoRA nf4 on the same all-linear adapters (QLoRA checked to run
    factored through the rewrite)."""
    layouts = layouts_of(model, variables, ids)
    q = lj.quant.quantize(variables, "nf4", group_size=GROUP, layouts=layouts)
    return {
        "lora": lora_runner("float LoRA all-linear", model, variables, ids, ALL_LINEAR),
        "qlora": lora_runner(
            "QLoRA nf4 all-linear",
            model,
            q,
            ids,
            ALL_LINEAR,
            route=QLORA_ROUTE,
            layouts=layouts,
        ),
    }


_quantize_kernel = jax.jit(
    lj.quant.quantize_kernel, static_argnames=("format", "axis", "group_size", "double")
)


def streamed_quantized_init(model: Any, ids: jax.Array, fmt: str) -> tuple[Any, Any]:
    """The model's variables with every contraction kernel quantized, built one leaf at a
    time (random normal kernels, unit norm scales, zero biases), so that at most one float
    kernel exists at once: how a QLoRA run loads a big base from its checkpoint. Also
    returns the layouts (read from the abstract float model)."""
    abstract = jax.eval_shape(model.init, jax.random.key(0), ids)
    layouts = layouts_of(model, abstract, ids)
    keys = iter(jax.random.split(jax.random.key(0), len(jax.tree.leaves(abstract))))

    def make(keypath: Any, spec: Any) -> Any:
        path = "/".join(str(getattr(k, "key", k)) for k in keypath)
        name = path.rsplit("/", 1)[-1]
        if name == "scale":
            return jnp.ones(spec.shape, spec.dtype)
        if name == "bias":
            return jnp.zeros(spec.shape, spec.dtype)
        w = 0.02 * jax.random.normal(next(keys), spec.shape, spec.dtype)
        layout = layouts.get(path)
        if layout is None or layout.kind == "embed":
            return w
        q = _quantize_kernel(w, fmt, axis=layout.in_axes[-1], group_size=GROUP)
        del w
        return jax.block_until_ready(q)

    return jax.tree_util.tree_map_with_path(make, abstract), layouts


def _app(*args: str, timeout: float) -> None:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    cmd = [sys.executable, "-m", "train", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if done.returncode != 0:
        raise RuntimeError(
            f"`python -m train {' '.join(args)}` failed (exit {done.returncode}):\n"
            f"{done.stderr[-2000:]}"
        )


# The quality row's fine-tunes: the demo (`make demo` runs `python -m train`, i.e. these
# defaults) for the medium preset; a seconds-long stand-in on a freshly pretrained `micro`
# base for the tiny one.
TINY_PRETRAIN = ("--base", "micro", "--data", "pydoc", "--steps", "30", "--eval-every", "30")
TINY_FINETUNE: tuple[str, ...] = ("--steps", "12", "--eval-every", "12", "--eval-batches", "2")
TINY_FINETUNE += ("--lr", "1e-2", "--max-new-tokens", "4")
TINY_COMMON = ("--seq-len", "32", "--batch-size", "8", "--no-progress")


def demo_quality(preset: str, timeout: float = 1800.0) -> dict[str, Any]:
    """Eval losses of the demo's fine-tune on the float base and on an nf4 base, each in
    its own ``python -m train`` process (settings identical but ``--quantize``)."""
    losses: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = pathlib.Path(tmp)
        if preset == "tiny":
            base = root / "base"
            _app("pretrain", *TINY_PRETRAIN, *TINY_COMMON, "--run-dir", str(base), timeout=timeout)
            extra: tuple[str, ...] = ("--base", str(base), "--cache-dir", str(root / "cache"))
            extra += TINY_FINETUNE + TINY_COMMON
        else:
            extra = ("--no-progress",)  # the demo's settings (base: the cached built-in)
        for fmt in ("none", "nf4"):
            run_dir = root / fmt
            _app("finetune", *extra, "--quantize", fmt, "--run-dir", str(run_dir), timeout=timeout)
            summary = json.loads((run_dir / "summary.json").read_text())
            losses[fmt] = float(summary["lora_eval_loss"])
            if fmt == "nf4":
                losses["nf4 base"] = float(summary["base_eval_loss"])
                losses["float base"] = float(summary["float_base_eval_loss"])
    return {
        "float": losses["none"],
        "nf4": losses["nf4"],
        "float_base": losses["float base"],
        "nf4_base": losses["nf4 base"],
        "settings": "tiny stand-in" if preset == "tiny" else "demo defaults",
    }
