"""``python -m train`` / ``lora-jax-train``: fine-tune a language model with LoRA.

Parses the command line: flags override a ``--config`` file, which overrides what the run
in ``--run-dir`` recorded (for eval, sample and export), which overrides the command's
defaults. `FLAGS` is the one table of settings on the command line: each command offers
only the flags it reads, with its own defaults, and a flag or config-file key it does not
read is an error. Prepares devices and processes *before* JAX starts (``--devices``
simulates CPU devices), runs a subcommand, and turns user mistakes into one line on
stderr and exit status 2 (``--debug`` shows the traceback).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import glob
import json
import os
import pathlib
import sys
import time
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, NoReturn

from train.settings import (
    ATTENTIONS,
    COMMANDS,
    DTYPES,
    GGUF_TYPES,
    QUANTIZE,
    REMATS,
    STRATEGIES,
    Settings,
    UserError,
    read_config_file,
    resolve,
)

__all__ = ["FLAGS", "Flag", "build_parser", "flags_of", "main"]

SUMMARIES = {
    "finetune": "train LoRA adapters on a base model (the built-in one or a HF folder)",
    "pretrain": "train the built-in tiny base model from scratch (all weights)",
    "eval": "eval loss of the base and of a fine-tuned run's adapter",
    "sample": "continue --prompt with the base and the adapted model (KV cache)",
    "export": "write the adapter (--lora-out), a PEFT adapter (--peft-out), or merged "
    "weights as a HuggingFace folder (--merged-out) or a GGUF file (--gguf-out)",
}

DESCRIPTION = """\
Fine-tune a language model with LoRA (lora_jax).

With no arguments: pretrain a tiny Llama-style model on English prose that ships with
Python (cached after the first run), adapt it with LoRA to Python source code of the
standard library, and report eval losses, speed, adapter size and samples.

COMMAND is finetune when left out; `python -m train COMMAND --help` lists the flags
COMMAND reads, with its defaults.

examples:
  python -m train                                   # the built-in demo (a few minutes, CPU)
  python -m train finetune --base ~/models/SmolLM2-135M --data notes/ --steps 500
  python -m train finetune --config run.yaml --lr 1e-3   # flags override the file
  python -m train sample --run-dir runs/finetune --prompt "def parse(" --temperature 0.8
  python -m train export --run-dir runs/finetune --peft-out runs/peft   # PEFT loads it
  python -m train finetune --strategy mesh --devices 4   # 4 simulated CPU devices
  python -m train finetune --quantize nf4               # QLoRA: adapters on a 4-bit base
  python -m train finetune --task code=stdlib --task prose=pydoc   # an adapter per task
"""

# Which commands read a setting.
ALL = COMMANDS
FINETUNE = ("finetune",)
TRAINING = ("finetune", "pretrain")
DATA = ("finetune", "pretrain", "eval")
LOADING = ("finetune", "eval", "sample", "export")  # they load a base model
SAMPLING = ("finetune", "sample")  # finetune ends with a sample
FROM_RUN = ("eval", "sample", "export")  # they read a finished finetune run
EXPORT = ("export",)


@dataclasses.dataclass(frozen=True)
class Flag:
    """One setting on the command line.

    Attributes:
        field: the `Settings` field it sets; the field's type makes it a number, a string,
            a list of paths, or a switch that turns the command's default over.
        commands: the commands that read it; only their parsers offer it.
        group: its section in ``--help``.
        help: what it does.
        names: its flags (default: ``--field-name``).
        choices: the values it takes, when only some.
        per_command: the help for a command that reads it differently.
        recorded: eval, sample and export take it from the run they read (``run.json``).
        show_default: whether ``--help`` shows the command's default.
    """

    field: str
    commands: tuple[str, ...]
    group: str
    help: str
    names: tuple[str, ...] = ()
    choices: tuple[str, ...] | None = None
    per_command: Mapping[str, str] = dataclasses.field(default_factory=dict)
    recorded: bool = False
    show_default: bool = True

    @property
    def flags(self) -> tuple[str, ...]:
        """Its flags, the first one the main one."""
        return self.names or ("--" + self.field.replace("_", "-"),)


# One row per setting on the command line; `python -m train COMMAND --help` lists the rows
# whose commands hold COMMAND, in this order. (Laid out as a table, not by the formatter.)
# fmt: off
FLAGS = (
    Flag("base", ALL, "model and data",
         "`tiny` (built-in, cached), a HF checkpoint folder, or a folder from `pretrain`",
         per_command={"pretrain": "the preset model to train from scratch: `tiny` or `micro`"},
         recorded=True),
    Flag("tokenizer", ALL, "model and data", "`auto` (the base's own), `byte`, or a tokenizer.json",
         per_command={"pretrain": "`auto` (= `byte`), `byte`, or a tokenizer.json"},
         recorded=True),
    Flag("cache_dir", ALL, "model and data",
         "where the built-in base and compiled steps are cached", recorded=True),
    Flag("data", DATA, "model and data", "text files, folders, .jsonl files, or built-ins "
         "`stdlib` (Python code) / `pydoc` (English prose)", recorded=True),
    Flag("eval_data", DATA, "model and data", "held-out data; without it, the built-in held-out "
         "split, or every 20th window of --data", recorded=True),
    Flag("task", FINETUNE, "model and data", "NAME=DATA: one task of a multi-task run (DATA "
         "as --data takes it); repeat it: one adapter per task, trained together in one run "
         "(every batch mixes the tasks), saved in <run-dir>/adapters/NAME/; not with --data"),
    Flag("seq_len", DATA, "model and data", "tokens per sequence", recorded=True),
    Flag("scan_layers", LOADING, "model and data",
         "run the layers as one nn.scan (faster compile)", recorded=True),
    Flag("dtype", ALL, "model and data", "weights and compute dtype", choices=DTYPES,
         recorded=True),
    Flag("remat", TRAINING, "model and data", "recompute each decoder layer in the backward "
         "pass: `dots` keeps the matmul outputs, `full` keeps nothing (less memory, more "
         "compute; same math)", choices=REMATS),
    Flag("attention", ("finetune", "pretrain", "eval", "sample"), "model and data",
         "attention kernel: `auto` (cuDNN fused on a GPU in bfloat16, else XLA), `xla`, or "
         "`cudnn` (same math)", choices=ATTENTIONS),
    Flag("run_dir", ALL, "run", "the finetune run to read; without it, the latest "
         "runs/finetune-*", show_default=False, per_command={
             "finetune": "folder for checkpoints, metrics.jsonl, loss.png, adapter/; without "
             "it, a new runs/finetune-<time> (with --resume, the latest runs/finetune-*)",
             "pretrain": "folder to save the base model in; without it, a new "
             "runs/pretrain-<time>"}),
    Flag("adapter", FROM_RUN, "run",
         "adapter folder; without it, <run-dir>/adapter, else the run's latest checkpoint",
         per_command={"sample": "adapter folder, or NAME=DIR, repeated: a batch of prompts "
                      "each with its own adapter (`base`: the plain base); without it, "
                      "<run-dir>/adapter, else the run's latest checkpoint"}),
    Flag("resume", FINETUNE, "run", "continue the run in --run-dir from its latest checkpoint"),
    Flag("steps", TRAINING, "run", "training steps"),
    Flag("batch_size", DATA, "run", "global batch size (sequences per step)",
         per_command={"eval": "sequences per eval batch"}),
    Flag("seed", ("finetune", "pretrain", "sample"), "run",
         "seed for init, data order, dropout and sampling",
         per_command={"pretrain": "seed for init and data order", "sample": "seed for sampling"}),
    Flag("lr", TRAINING, "run", "peak learning rate (linear warmup, then cosine)"),
    Flag("warmup_steps", TRAINING, "run", "warmup steps"),
    Flag("min_lr_ratio", TRAINING, "run", "final lr as a fraction of --lr"),
    Flag("weight_decay", TRAINING, "run", "AdamW weight decay of the adapters",
         per_command={"pretrain": "AdamW weight decay of the weight matrices"}),
    Flag("clip_norm", TRAINING, "run", "clip gradients to this global norm (0: off)",
         recorded=True),
    Flag("accum_steps", FINETUNE, "run", "gradient accumulation micro-batches"),
    Flag("eval_every", TRAINING, "run", "evaluate every N steps"),
    Flag("eval_batches", DATA, "run", "held-out batches per evaluation"),
    Flag("log_every", TRAINING, "run", "log the train loss every N steps"),
    Flag("save_every", FINETUNE, "run", "checkpoint every N steps"),
    Flag("keep", FINETUNE, "run", "checkpoints to keep"),
    Flag("progress", ALL, "run",
         "plain log lines instead of progress bars (default: progress bars on)",
         names=("--no-progress",), per_command=dict.fromkeys(FROM_RUN,
             "plain log lines instead of progress bars while the built-in base is first "
             "pretrained (default: progress bars on)")),
    Flag("compare_full", FINETUNE, "run", "also run a full fine-tune for comparison"),
    Flag("full_lr", FINETUNE, "run", "peak lr of the full fine-tune"),
    Flag("rank", FINETUNE, "LoRA", "adapter rank r", recorded=True),
    Flag("alpha", FINETUNE, "LoRA", "scale numerator: s = alpha / r", recorded=True),
    Flag("targets", FINETUNE, "LoRA", "`all-linear`, `attention`, or a regex over param paths",
         recorded=True),
    Flag("dropout", FINETUNE, "LoRA", "LoRA dropout on the adapter input", recorded=True),
    Flag("rslora", FINETUNE, "LoRA", "scale by alpha / sqrt(r)", recorded=True),
    Flag("dora", FINETUNE, "LoRA", "DoRA: also train a magnitude per output feature "
         "(PEFT's use_dora)", recorded=True),
    Flag("lora_bias", FINETUNE, "LoRA", "also train a bias of each up-projection (PEFT's "
         "lora_bias; not with --dora)", recorded=True),
    Flag("quantize", FINETUNE, "LoRA", "store the frozen base quantized (QLoRA): int8 per "
         "output channel, or int4 / nf4 in groups; embeddings and norms stay float",
         choices=QUANTIZE, recorded=True),
    Flag("quantize_group", FINETUNE, "LoRA", "weights per scale of int4 / nf4 along each "
         "kernel's input axis (must divide it)", recorded=True),
    Flag("strategy", FINETUNE, "devices and processes",
         "jit (one device), pmap or mesh (data parallel)", choices=STRATEGIES),
    Flag("devices", FINETUNE, "devices and processes",
         "devices per process (on CPU: simulated); without it, every local device (jit: one)"),
    Flag("coordinator", FINETUNE, "devices and processes",
         "host:port of process 0 (multi-process runs)"),
    Flag("num_processes", FINETUNE, "devices and processes", "processes in the run"),
    Flag("process_id", FINETUNE, "devices and processes", "this process's index"),
    Flag("prompt", SAMPLING, "sampling", "text to continue",
         per_command={"sample": "text to continue; repeat it for a batch (one per --adapter, "
                      "or one for every adapter)"}),
    Flag("max_new_tokens", SAMPLING, "sampling", "tokens to generate"),
    Flag("temperature", SAMPLING, "sampling", "0 is greedy"),
    Flag("top_k", SAMPLING, "sampling", "sample among the k most likely tokens"),
    Flag("merged", SAMPLING, "sampling", "sample from merged weights instead of the factored path"),
    Flag("out_adapter", EXPORT, "export", "write the adapter (lora_jax format) here",
         names=("--lora-out",)),
    Flag("out_merged", EXPORT, "export", "write merged weights as a HF checkpoint folder here",
         names=("--merged-out",)),
    Flag("out_peft", EXPORT, "export",
         "write a HuggingFace PEFT adapter (adapter_config.json + safetensors) here",
         names=("--peft-out", "--peft")),
    Flag("out_gguf", EXPORT, "export", "write the merged model as one GGUF file (weights, "
         "hyperparameters, tokenizer) for llama.cpp-family runtimes", names=("--gguf-out",)),
    Flag("gguf_type", EXPORT, "export", "GGUF storage of the matrices (norms stay float32)",
         choices=GGUF_TYPES),
)
# fmt: on

# What eval / sample / export take from the run's run.json (the model, the data, and what
# shapes its adapters and optimizer state).
INHERITED = tuple(f.field for f in FLAGS if f.recorded)
_TYPES = typing.get_type_hints(Settings)


def flags_of(command: str) -> tuple[Flag, ...]:
    """The flags `command` offers (the settings it reads), in ``--help`` order.

    Example:
        >>> [f.flags[0] for f in flags_of("export")][-5:]
        ['--lora-out', '--merged-out', '--peft-out', '--gguf-out', '--gguf-type']
    """
    return tuple(f for f in FLAGS if command in f.commands)


def _shown(value: Any) -> str:
    """A default as ``--help`` shows it ("" for none, or a switch's)."""
    if value is None or isinstance(value, bool):
        return ""
    if isinstance(value, tuple):
        return " ".join(_shown(v) for v in value)
    if isinstance(value, str) and value != value.strip():
        return repr(value)
    return str(value)


def _help(flag: Flag, command: str, default: Any) -> str:
    text = flag.per_command.get(command, flag.help)
    shown = _shown(default) if flag.show_default else ""
    if flag.recorded and command in FROM_RUN:
        text += f" (default: the run's{', else ' + shown if shown else ''})"
    elif shown:
        text += f" (default: {shown})"
    return text.replace("%", "%%")


def _kind(flag: Flag, default: Any) -> dict[str, Any]:
    """How argparse reads the flag, from its `Settings` field's type."""
    hint = _TYPES[flag.field]
    optional = typing.get_origin(hint) in (types.UnionType, typing.Union)  # `int | None`
    kind = next(t for t in typing.get_args(hint) if t is not type(None)) if optional else hint
    if kind is bool:
        return {"action": "store_false" if default else "store_true"}
    if typing.get_origin(kind) is tuple:  # repeatable: `--data a b --data c` is a, b, c
        return {"nargs": "+", "action": "extend"}
    if flag.choices:
        return {"type": kind, "choices": flag.choices}
    return {"type": kind, "metavar": flag.flags[0][2:].upper().replace("-", "_")}


class _Parser(argparse.ArgumentParser):
    """A parser whose errors are `UserError`s (one line on stderr, exit status 2)."""

    def error(self, message: str) -> NoReturn:
        raise UserError(f"{message} (`{self.prog} --help` lists the flags)")


def _add_flags(p: argparse.ArgumentParser, command: str) -> None:
    p.add_argument("--config", help="YAML or JSON file of settings; flags override it")
    p.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    defaults = resolve(command, {}, {})
    groups: dict[str, Any] = {}
    for flag in flags_of(command):
        if flag.group not in groups:
            groups[flag.group] = p.add_argument_group(flag.group)
        default = getattr(defaults, flag.field)
        groups[flag.group].add_argument(
            *flag.flags,
            dest=flag.field,
            default=argparse.SUPPRESS,
            help=_help(flag, command, default),
            **_kind(flag, default),
        )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser: one subparser per command, each with the flags it reads.

    Example:
        >>> ns = build_parser().parse_args(["pretrain", "--steps", "5"])
        >>> ns.command, ns.steps
        ('pretrain', 5)
    """
    parser = _Parser(
        prog="python -m train",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        sp = sub.add_parser(
            name, help=SUMMARIES[name], description=SUMMARIES[name], allow_abbrev=False
        )
        _add_flags(sp, name)
    return parser


def _and(names: Sequence[str]) -> str:
    return " and ".join([", ".join(names[:-1]), names[-1]] if len(names) > 1 else names)


def _not_taken(command: str, extras: Sequence[str]) -> str:
    """The error for what `command` does not take: a flag of another command, an unknown
    flag, or a stray argument."""
    see = f"`python -m train {command} --help` lists its flags"
    name = next((a for a in extras if a.startswith("-")), extras[0]).split("=", 1)[0]
    other = next((f for f in FLAGS if name in f.flags), None)
    if other is not None:
        return f"`{command}` does not read {name}, a flag of {_and(other.commands)}; {see}."
    if not name.startswith("-"):
        first = (
            f" (the command comes first: python -m train {name} ...)" if name in COMMANDS else ""
        )
        return f"unexpected argument {name!r}{first}; {see}."
    offered = ["--config", "--debug", *(n for f in flags_of(command) for n in f.flags)]
    near = difflib.get_close_matches(name, offered, n=1)
    hint = f" Did you mean {near[0]}?" if near else ""
    return f"unknown flag {name} for `{command}`; {see}.{hint}"


def parse(argv: Sequence[str]) -> tuple[Settings, bool]:
    """Settings from the command line (a missing command means ``finetune``).

    Raises:
        UserError: a flag or config-file key the command does not read, a bad value, or
            (eval, sample, export) a run folder with no fine-tuned run in it.

    Example:
        >>> s, debug = parse(["--steps", "3"])
        >>> s.command, s.steps, debug
        ('finetune', 3, False)
    """
    args = list(argv)
    if not args or (args[0] not in COMMANDS and args[0] not in ("-h", "--help")):
        args.insert(0, "finetune")
    ns, extras = build_parser().parse_known_args(args)
    flags = vars(ns)
    command = flags.pop("command")
    if extras:
        raise UserError(_not_taken(command, extras))
    config_file, debug = flags.pop("config", None), flags.pop("debug")
    file_values = read_config_file(config_file) if config_file else {}
    reads = {f.field for f in flags_of(command)}
    if "run_dir" not in flags and "run_dir" not in file_values:
        processes = flags.get("num_processes", file_values.get("num_processes", 1))
        if "num_processes" in reads and processes > 1:
            raise UserError("multi-process runs need the same --run-dir in every process.")
        flags["run_dir"] = default_run_dir(command, bool(flags.get("resume")))
    recorded = {}
    if command in FROM_RUN:  # the run's own base and data by default
        recorded = run_settings(str(flags.get("run_dir", file_values.get("run_dir"))))
    s = resolve(command, file_values, flags, recorded=recorded, reads=reads)
    if s.task:
        given = [f"--{n.replace('_', '-')}" for n in ("data", "eval_data") if n in flags]
        given += [f"`{n}` (config file)" for n in ("data", "eval_data") if n in file_values]
        if given:
            raise UserError(
                f"--task NAME=DATA names each task's data (each holds out its own eval "
                f"split); drop {' and '.join(given)}."
            )
    if command in FROM_RUN:
        check_run(s)
    return s, debug


# What a finetune run leaves in its folder (`train.finetune.ADAPTER` and `CHECKPOINTS`;
# named here too so that parsing does not import JAX).
ADAPTER_DIR = "adapter"
CHECKPOINTS_DIR = "checkpoints"


def check_run(s: Settings) -> None:
    """eval, sample and export read a fine-tuned run: ``--run-dir`` must hold its adapter
    or checkpoints, unless ``--adapter`` names the adapter.

    Raises:
        UserError: naming the folder and what to pass instead.

    Example:
        >>> check_run(Settings(command="sample", run_dir="/nonexistent"))
        Traceback (most recent call last):
        train.settings.UserError: `sample` reads a fine-tuned run, and /nonexistent does not ...
    """
    if s.adapter:
        return
    run = pathlib.Path(s.run_dir)
    checkpoints = run / CHECKPOINTS_DIR
    if (run / ADAPTER_DIR).is_dir() or (checkpoints.is_dir() and any(checkpoints.iterdir())):
        return
    found = "holds no adapter/ and no checkpoints/" if run.is_dir() else "does not exist"
    raise UserError(
        f"`{s.command}` reads a fine-tuned run, and {run} {found}: pass --run-dir DIR of a "
        "`python -m train finetune` run, or --adapter DIR."
    )


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
        raise UserError(
            f"{path} is damaged ({err}); repair it, or remove it and pass --base (and, for "
            "eval, --data) as flags."
        ) from None
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
