"""Run settings: built-in defaults, what a finished run recorded, a YAML/JSON config file,
then command-line flags.

`Settings` is the one record of what a run does; `resolve` layers the sources (later wins)
and checks every value, so a typo in a config file, or a setting the command does not
read, is an error that names the key, not a silently ignored setting.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import pathlib
from collections.abc import Collection, Mapping
from typing import Any

__all__ = [
    "COMMANDS",
    "QUANTIZE",
    "Settings",
    "UserError",
    "default_cache_dir",
    "read_config_file",
    "resolve",
]

COMMANDS = ("finetune", "pretrain", "eval", "sample", "export")
STRATEGIES = ("jit", "pmap", "mesh")
DTYPES = ("float32", "bfloat16")
REMATS = ("none", "dots", "full")  # LlamaConfig.remat (train.models.config, which loads JAX)
ATTENTIONS = ("auto", "xla", "cudnn")  # LlamaConfig.attention
QUANTIZE = ("none", "int8", "int4", "nf4")
GGUF_TYPES = ("f16", "q8_0")  # export --gguf-type (train.models.gguf_out)


class UserError(ValueError):
    """A mistake in the command line, a config file or the inputs: printed as one line."""


def default_cache_dir() -> str:
    """Where the built-in base model is cached: ``$LORA_JAX_CACHE`` or ``~/.cache/lora_jax``.

    Example:
        >>> isinstance(default_cache_dir(), str)
        True
    """
    env = os.environ.get("LORA_JAX_CACHE")
    return env or str(pathlib.Path("~/.cache/lora_jax").expanduser())


@dataclasses.dataclass(frozen=True, kw_only=True)
class Settings:
    """Everything a run of ``python -m train`` does (see ``python -m train --help``).

    Example:
        >>> Settings(steps=10).steps
        10
    """

    command: str = "finetune"
    # Model and data.
    base: str = "tiny"
    tokenizer: str = "auto"
    cache_dir: str = dataclasses.field(default_factory=default_cache_dir)
    data: tuple[str, ...] = ("stdlib",)
    eval_data: tuple[str, ...] = ()
    # Multi-task finetune: NAME=DATA per task, one adapter each (train.multitask).
    task: tuple[str, ...] = ()
    seq_len: int = 128
    dtype: str = "float32"
    scan_layers: bool = False
    remat: str = "none"
    attention: str = "auto"
    # The run.
    run_dir: str = "runs/finetune"
    resume: bool = False
    steps: int = 200
    batch_size: int = 16
    seed: int = 0
    lr: float = 3e-3
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    clip_norm: float = 1.0
    accum_steps: int = 1
    # LoRA.
    rank: int = 8
    alpha: float = 16.0
    targets: str = "all-linear"
    dropout: float = 0.0
    rslora: bool = False
    dora: bool = False
    lora_bias: bool = False
    # QLoRA: the frozen base stored quantized ("none": float).
    quantize: str = "none"
    quantize_group: int = 64
    # Evaluation, logging, checkpoints.
    eval_every: int = 50
    eval_batches: int = 16
    log_every: int = 10
    save_every: int = 100
    keep: int = 3
    progress: bool = True
    compare_full: bool = False
    full_lr: float = 1e-3
    # Devices and processes.
    strategy: str = "jit"
    devices: int | None = None
    coordinator: str | None = None
    num_processes: int = 1
    process_id: int = 0
    # Sampling.
    prompt: tuple[str, ...] = ("def ",)
    max_new_tokens: int = 120
    temperature: float = 0.8
    top_k: int | None = 40
    merged: bool = False
    adapter: tuple[str, ...] = ()
    # Export.
    out_adapter: str | None = None
    out_merged: str | None = None
    out_peft: str | None = None
    out_gguf: str | None = None
    gguf_type: str = "f16"

    def __post_init__(self) -> None:
        _check(self)


# Defaults that differ per command (pretraining trains every weight, longer, from scratch).
# This is also the built-in base's recipe, hashed into its cache folder's name: `save_every`
# stays in it for that hash only (pretrain writes no checkpoints).
COMMAND_DEFAULTS: dict[str, dict[str, Any]] = {
    "pretrain": {
        "data": ("pydoc",),
        "steps": 300,
        "batch_size": 16,
        "seq_len": 128,
        "lr": 3e-3,
        "warmup_steps": 30,
        "eval_every": 100,
        "save_every": 100,
        "weight_decay": 0.01,
    },
}

_POSITIVE = (
    "seq_len",
    "steps",
    "batch_size",
    "eval_every",
    "eval_batches",
    "log_every",
    "save_every",
    "keep",
    "rank",
    "accum_steps",
    "num_processes",
    "max_new_tokens",
    "quantize_group",
)


def _check(s: Settings) -> None:
    def bad(field: str, expected: str) -> UserError:
        return UserError(f"`{field}` must be {expected}; found {getattr(s, field)!r}.")

    if s.command not in COMMANDS:
        raise bad("command", f"one of {', '.join(COMMANDS)}")
    for field in _POSITIVE:
        if not isinstance(getattr(s, field), int) or getattr(s, field) < 1:
            raise bad(field, "a positive integer")
    for field in ("lr", "full_lr", "alpha"):
        if not getattr(s, field) > 0:
            raise bad(field, "a positive number")
    if s.strategy not in STRATEGIES:
        raise bad("strategy", f"one of {', '.join(STRATEGIES)}")
    if s.dtype not in DTYPES:
        raise bad("dtype", f"one of {', '.join(DTYPES)}")
    if s.remat not in REMATS:
        raise bad("remat", f"one of {', '.join(REMATS)}")
    if s.attention not in ATTENTIONS:
        raise bad("attention", f"one of {', '.join(ATTENTIONS)}")
    if s.quantize not in QUANTIZE:
        raise bad("quantize", f"one of {', '.join(QUANTIZE)}")
    if s.gguf_type not in GGUF_TYPES:
        raise bad("gguf_type", f"one of {', '.join(GGUF_TYPES)}")
    if not 0 <= s.dropout < 1:
        raise bad("dropout", "in [0, 1)")
    if not 0 <= s.min_lr_ratio <= 1:
        raise bad("min_lr_ratio", "in [0, 1]")
    if s.warmup_steps < 0 or s.weight_decay < 0 or s.clip_norm < 0 or s.temperature < 0:
        raise UserError("`warmup_steps`, `weight_decay`, `clip_norm`, `temperature` must be >= 0.")
    if s.devices is not None and s.devices < 1:
        raise bad("devices", "a positive integer")
    if s.top_k is not None and s.top_k < 1:
        raise bad("top_k", "a positive integer")
    if not 0 <= s.process_id < s.num_processes:
        raise bad("process_id", f"in [0, {s.num_processes}) for {s.num_processes} processes")
    if s.num_processes > 1 and not s.coordinator:
        raise bad("coordinator", "an address like 127.0.0.1:8476 when --num-processes > 1")
    if not s.data:
        raise bad("data", "at least one path, or `stdlib` / `pydoc`")
    if not s.prompt:
        raise bad("prompt", "at least one text to continue")


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """Reads a YAML (``.yaml``/``.yml``) or JSON config file into a flat mapping.

    Args:
        path: the file. Keys are `Settings` field names (dashes or underscores).

    Returns:
        The mapping, keys normalized to underscores.

    Raises:
        UserError: a missing or unparsable file, or one that is not a mapping.

    Example:
        >>> import json, tempfile
        >>> f = tempfile.NamedTemporaryFile("w", suffix=".json", delete=False)
        >>> _ = f.write(json.dumps({"steps": 5, "run-dir": "runs/x"})); f.close()
        >>> read_config_file(f.name)
        {'steps': 5, 'run_dir': 'runs/x'}
    """
    file = pathlib.Path(path)
    if not file.is_file():
        raise UserError(f"config file {file} does not exist.")
    text = file.read_text()
    try:
        if file.suffix in (".yaml", ".yml"):
            import yaml

            raw = yaml.safe_load(text)
        else:
            raw = json.loads(text)
    except Exception as err:
        raise UserError(f"config file {file} is not valid {file.suffix[1:]}: {err}") from None
    if not isinstance(raw, dict):
        raise UserError(f"config file {file} must hold a mapping of settings; found {raw!r}.")
    return {str(k).replace("-", "_"): v for k, v in raw.items()}


# Settings that hold several values (a config file may give one string).
_TUPLES = ("data", "eval_data", "task", "prompt", "adapter")


def _coerce(name: str, value: Any, field: dataclasses.Field) -> Any:
    if name in _TUPLES:
        return tuple([value] if isinstance(value, str) else value)
    default = field.default if field.default is not dataclasses.MISSING else None
    if isinstance(default, bool) and not isinstance(value, bool):
        raise UserError(f"`{name}` must be true or false; found {value!r}.")
    if isinstance(default, float) and not isinstance(value, bool):
        try:  # YAML reads `3e-3` as a string
            return float(value)
        except (TypeError, ValueError):
            raise UserError(f"`{name}` must be a number; found {value!r}.") from None
    return value


def resolve(
    command: str,
    file_values: Mapping[str, Any],
    flags: Mapping[str, Any],
    *,
    recorded: Mapping[str, Any] | None = None,
    reads: Collection[str] | None = None,
) -> Settings:
    """Layers defaults, the command's defaults, a run's record, a config file and flags
    (later wins).

    Args:
        command: one of `COMMANDS`.
        file_values: settings from `read_config_file` (may be empty).
        flags: settings given on the command line.
        recorded: settings a finished run recorded (eval, sample and export take the
            model, data and adapter shape of the run they read); not checked against `reads`.
        reads: the settings `command` reads; a config-file key or flag outside them is an
            error. None: every setting.

    Returns:
        The checked `Settings`.

    Raises:
        UserError: an unknown key, or one the command does not read (with the closest
            valid one), or an invalid value.

    Example:
        >>> resolve("pretrain", {"steps": 50}, {"steps": 7}).steps
        7
        >>> resolve("pretrain", {}, {}).data
        ('pydoc',)
        >>> resolve("sample", {"stpes": 3}, {}, reads={"seed", "steps"})
        Traceback (most recent call last):
        train.settings.UserError: unknown setting `stpes` in the config file. Did you mean `steps`?
    """
    fields = {f.name: f for f in dataclasses.fields(Settings) if f.name != "command"}
    valid = list(fields) if reads is None else [n for n in fields if n in reads]
    values: dict[str, Any] = dict(COMMAND_DEFAULTS.get(command, {}))
    for name, value in (recorded or {}).items():
        values[name] = _coerce(name, value, fields[name])
    for source, mapping in (("config file", file_values), ("flags", flags)):
        for name, value in mapping.items():
            _check_name(name, source, command, list(fields), valid)
            values[name] = _coerce(name, value, fields[name])
    try:
        return Settings(command=command, **values)
    except TypeError as err:
        raise UserError(f"bad setting: {err}") from None


def _check_name(name: str, source: str, command: str, known: list[str], valid: list[str]) -> None:
    if name in valid:
        return
    near = difflib.get_close_matches(name, valid, n=1)
    if name not in known:
        near = near or difflib.get_close_matches(name, known, n=1)
    hint = f" Did you mean `{near[0]}`?" if near else ""
    if name not in known:
        raise UserError(f"unknown setting `{name}` in the {source}.{hint}")
    raise UserError(
        f"`{command}` does not read `{name}` (set in the {source}); remove it, or see "
        f"`python -m train {command} --help` for what it reads.{hint}"
    )
