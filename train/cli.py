"""``python -m train`` / ``lora-jax-train``: fine-tune a language model with LoRA.

Parses the command line: flags override a ``--config`` file, which overrides what the run
in ``--run-dir`` recorded (for eval, sample and export), which overrides the defaults.
Prepares devices and processes *before* JAX starts (``--devices`` simulates CPU devices),
runs a subcommand, and turns user mistakes into one line on stderr and exit status 2
(``--debug`` shows the traceback).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

from train.settings import COMMANDS, Settings, UserError, read_config_file, resolve

__all__ = ["build_parser", "main"]

_DEFAULTS = Settings()

DESCRIPTION = """\
Fine-tune a language model with LoRA (lora_jax).

With no arguments: pretrain a tiny Llama-style model on English prose that ships with
Python (cached after the first run), adapt it with LoRA to Python source code of the
standard library, and report eval losses, speed, adapter size and samples.

commands (finetune is the default):
  finetune   train LoRA adapters on a base model (the built-in one or a HF folder)
  pretrain   train the built-in tiny base model from scratch (all weights)
  eval       eval loss of the base, and of the run's adapter if it has one
  sample     continue --prompt with the base and the adapted model (KV cache)
  export     write the adapter (--lora-out), a PEFT adapter (--peft-out), or merged
             weights as a HuggingFace folder (--merged-out)

examples:
  python -m train                                   # the built-in demo (a few minutes, CPU)
  python -m train finetune --base ~/models/SmolLM2-135M --data notes/ --steps 500
  python -m train finetune --config run.yaml --lr 1e-3   # flags override the file
  python -m train sample --run-dir runs/finetune --prompt "def parse(" --temperature 0.8
  python -m train export --run-dir runs/finetune --peft-out runs/peft   # PEFT loads it
  python -m train finetune --strategy mesh --devices 4   # 4 simulated CPU devices
"""


def _opt(group: Any, flag: str | tuple[str, ...], field: str, help: str, **kw: Any) -> None:
    default = getattr(_DEFAULTS, field)
    shown = f" (default: {default})" if default not in (None, (), False, "runs/finetune") else ""
    flags = (flag,) if isinstance(flag, str) else flag
    group.add_argument(*flags, dest=field, help=help + shown, default=argparse.SUPPRESS, **kw)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML or JSON file of settings; flags override it")
    p.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    m = p.add_argument_group("model and data")
    _opt(
        m,
        "--base",
        "base",
        "`tiny` (built-in, cached), a HF checkpoint folder, or a folder from `pretrain`",
    )
    _opt(m, "--tokenizer", "tokenizer", "`auto` (the base's own), `byte`, or a tokenizer.json")
    _opt(m, "--cache-dir", "cache_dir", "where the built-in base is cached")
    _opt(
        m,
        "--data",
        "data",
        "text files, folders, .jsonl files, or built-ins `stdlib` "
        "(Python code) / `pydoc` (English prose)",
        nargs="+",
    )
    _opt(
        m,
        "--eval-data",
        "eval_data",
        "held-out data (default: the built-in held-out split, or every 20th window of --data)",
        nargs="+",
    )
    _opt(m, "--seq-len", "seq_len", "tokens per training sequence", type=int)
    _opt(
        m,
        "--scan-layers",
        "scan_layers",
        "run the layers as one nn.scan (faster compile)",
        action="store_true",
    )
    _opt(m, "--dtype", "dtype", "weights and compute dtype", choices=["float32", "bfloat16"])
    r = p.add_argument_group("run")
    _opt(
        r,
        "--run-dir",
        "run_dir",
        "folder for checkpoints, metrics.jsonl, loss.png, adapter/ "
        "(default: a new runs/<command>-<time>; eval/sample/export/--resume: the latest "
        "runs/finetune-*)",
    )
    _opt(
        r,
        "--resume",
        "resume",
        "continue the run in --run-dir from its latest checkpoint",
        action="store_true",
    )
    _opt(r, "--steps", "steps", "training steps", type=int)
    _opt(r, "--batch-size", "batch_size", "global batch size (sequences per step)", type=int)
    _opt(r, "--seed", "seed", "seed for init, data order, dropout and sampling", type=int)
    _opt(r, "--lr", "lr", "peak learning rate (linear warmup, then cosine)", type=float)
    _opt(r, "--warmup-steps", "warmup_steps", "warmup steps", type=int)
    _opt(r, "--min-lr-ratio", "min_lr_ratio", "final lr as a fraction of --lr", type=float)
    _opt(r, "--weight-decay", "weight_decay", "AdamW weight decay (adapters only)", type=float)
    _opt(r, "--clip-norm", "clip_norm", "clip gradients to this global norm (0: off)", type=float)
    _opt(r, "--accum-steps", "accum_steps", "gradient accumulation micro-batches", type=int)
    _opt(r, "--eval-every", "eval_every", "evaluate every N steps", type=int)
    _opt(r, "--eval-batches", "eval_batches", "held-out batches per evaluation", type=int)
    _opt(r, "--log-every", "log_every", "log the train loss every N steps", type=int)
    _opt(r, "--save-every", "save_every", "checkpoint every N steps", type=int)
    _opt(r, "--keep", "keep", "checkpoints to keep", type=int)
    _opt(
        r,
        "--no-progress",
        "progress",
        "plain log lines instead of a progress bar",
        action="store_false",
    )
    _opt(
        r,
        "--compare-full",
        "compare_full",
        "also run a full fine-tune for comparison",
        action="store_true",
    )
    _opt(r, "--full-lr", "full_lr", "peak lr of the full fine-tune", type=float)
    lo = p.add_argument_group("LoRA")
    _opt(lo, "--rank", "rank", "adapter rank r", type=int)
    _opt(lo, "--alpha", "alpha", "scale numerator: s = alpha / r", type=float)
    _opt(lo, "--targets", "targets", "`all-linear`, `attention`, or a regex over param paths")
    _opt(lo, "--dropout", "dropout", "LoRA dropout on the adapter input", type=float)
    _opt(lo, "--rslora", "rslora", "scale by alpha / sqrt(r)", action="store_true")
    d = p.add_argument_group("devices and processes")
    _opt(
        d,
        "--strategy",
        "strategy",
        "jit (one device), pmap or mesh (data parallel)",
        choices=["jit", "pmap", "mesh"],
    )
    _opt(d, "--devices", "devices", "devices per process (on CPU: simulated)", type=int)
    _opt(d, "--coordinator", "coordinator", "host:port of process 0 (multi-process runs)")
    _opt(d, "--num-processes", "num_processes", "processes in the run", type=int)
    _opt(d, "--process-id", "process_id", "this process's index", type=int)
    sa = p.add_argument_group("sampling")
    _opt(sa, "--prompt", "prompt", "text to continue")
    _opt(sa, "--max-new-tokens", "max_new_tokens", "tokens to generate", type=int)
    _opt(sa, "--temperature", "temperature", "0 is greedy", type=float)
    _opt(sa, "--top-k", "top_k", "sample among the k most likely tokens", type=int)
    _opt(
        sa,
        "--merged",
        "merged",
        "sample from merged weights instead of the factored path",
        action="store_true",
    )
    _opt(sa, "--adapter", "adapter", "adapter folder (default: <run-dir>/adapter)")
    ex = p.add_argument_group("export")
    _opt(ex, "--lora-out", "out_adapter", "write the adapter (lora_jax format) here")
    _opt(ex, "--merged-out", "out_merged", "write merged weights as a HF checkpoint folder")
    _opt(
        ex,
        ("--peft-out", "--peft"),
        "out_peft",
        "write a HuggingFace PEFT adapter (adapter_config.json + safetensors) here",
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser: one subparser per command, all sharing the options.

    Example:
        >>> ns = build_parser().parse_args(["pretrain", "--steps", "5"])
        >>> ns.command, ns.steps
        ('pretrain', 5)
    """
    parser = argparse.ArgumentParser(
        prog="python -m train",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        sp = sub.add_parser(
            name,
            help=f"see `python -m train {name} --help`",
            formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        )
        _common(sp)
    return parser


def parse(argv: Sequence[str]) -> tuple[Settings, bool]:
    """Settings from the command line (a missing command means ``finetune``).

    Example:
        >>> s, debug = parse(["--steps", "3"])
        >>> s.command, s.steps, debug
        ('finetune', 3, False)
    """
    args = list(argv)
    if not args or (args[0] not in COMMANDS and args[0] not in ("-h", "--help")):
        args.insert(0, "finetune")
    ns = vars(build_parser().parse_args(args))
    command, config_file, debug = ns.pop("command"), ns.pop("config", None), ns.pop("debug")
    file_values = read_config_file(config_file) if config_file else {}
    if "run_dir" not in ns and "run_dir" not in file_values:
        if ns.get("num_processes", file_values.get("num_processes", 1)) > 1:
            raise UserError("multi-process runs need the same --run-dir in every process.")
        ns["run_dir"] = default_run_dir(command, bool(ns.get("resume")))
    if command in ("eval", "sample", "export"):  # the run's own base and data by default
        run_dir = str(ns.get("run_dir", file_values.get("run_dir")))
        file_values = {**run_settings(run_dir), **file_values}
    return resolve(command, file_values, ns), debug


def default_run_dir(command: str, resume: bool, root: str = "runs") -> str:
    """A new ``runs/<command>-<time>`` folder, or the latest finetune run to resume or use.

    Example:
        >>> default_run_dir("pretrain", False).startswith("runs/pretrain-")
        True
    """
    if command in ("finetune", "pretrain") and not resume:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        folder, n = f"{root}/{command}-{stamp}", 1
        while os.path.exists(folder):
            n += 1
            folder = f"{root}/{command}-{stamp}-{n}"
        return folder
    runs = sorted(glob.glob(f"{root}/finetune-*/run.json"), key=os.path.getmtime)
    return os.path.dirname(runs[-1]) if runs else f"{root}/finetune"


# What eval / sample / export take from the run's run.json (the model, the data, and what
# shapes its adapters and optimizer state).
INHERITED = (
    "base",
    "tokenizer",
    "cache_dir",
    "data",
    "eval_data",
    "seq_len",
    "dtype",
    "scan_layers",
    "rank",
    "alpha",
    "targets",
    "dropout",
    "rslora",
    "clip_norm",
)


def run_settings(run_dir: str) -> dict[str, Any]:
    """The model and data settings a finished run recorded (``run.json``), if any.

    Example:
        >>> run_settings("/nonexistent")
        {}
    """
    path = os.path.join(run_dir, "run.json")
    if not os.path.exists(path):
        return {}
    try:
        with open(path) as f:
            record = json.load(f)
    except (OSError, ValueError) as err:
        raise UserError(f"{path} is damaged ({err}); pass the settings as flags.") from None
    return {k: record[k] for k in INHERITED if k in record}


def _prepare_devices(s: Settings) -> None:
    """Before JAX starts: simulated CPU devices, the compilation cache, multi-process setup."""
    if s.devices and "jax" not in sys.modules:
        flags = os.environ.get("XLA_FLAGS", "")
        if "xla_force_host_platform_device_count" not in flags:
            flag = f"--xla_force_host_platform_device_count={s.devices}"
            os.environ["XLA_FLAGS"] = f"{flags} {flag}".strip()
    import jax

    if not jax.config.jax_compilation_cache_dir:  # type: ignore[attr-defined]  # reuse compiled steps across runs
        jax.config.update("jax_compilation_cache_dir", os.path.join(s.cache_dir, "xla"))
    if s.num_processes > 1:
        # CPU collectives across processes (only the CPU backend reads this setting).
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            s.coordinator, num_processes=s.num_processes, process_id=s.process_id
        )


def main(argv: Sequence[str] | None = None) -> int:
    """Runs ``python -m train``; returns the exit status (0 ok, 2 a user error).

    Args:
        argv: the arguments (default: ``sys.argv[1:]``).

    Returns:
        The exit status.
    """
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    try:
        s, debug = parse(argv)
        _prepare_devices(s)
        from train.commands import RUNNERS

        RUNNERS[s.command](s, sys.stdout)
    except (UserError, ValueError, FileNotFoundError) as err:
        if debug:
            raise
        hint = "" if isinstance(err, UserError) else " (--debug shows where)"
        print(f"error: {err}{hint}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "interrupted: checkpoints already written are kept; --resume continues.",
            file=sys.stderr,
        )
        return 130
    return 0
