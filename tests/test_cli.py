"""The training app end to end through its command line (`train.cli.main`), in-process.

A base is pretrained once per test session on pydoc prose with a small batch; each test
then fine-tunes it on a few files of code for a handful of steps.
"""

from __future__ import annotations

import ast
import dataclasses
import io
import json
import pathlib
import re
import shutil
import sysconfig

import jax
import numpy as np
import pytest

import lora_jax as lj
from train import cli, report
from train.cli import main, parse
from train.models import PRESETS, Llama, from_pretrained

FAST = ["--seq-len", "32", "--batch-size", "8", "--no-progress", "--log-every", "2"]


def run(*argv: str) -> int:
    return main([*argv])


@pytest.fixture(scope="session")
def base_dir(tmp_path_factory) -> pathlib.Path:
    folder = tmp_path_factory.mktemp("base") / "tiny"
    code = run(
        "pretrain",
        "--base",
        "micro",
        "--data",
        "pydoc",
        "--steps",
        "60",
        "--eval-every",
        "60",
        "--run-dir",
        str(folder),
        *FAST,
    )
    assert code == 0
    return folder


@pytest.fixture(scope="session")
def code_dir(tmp_path_factory) -> pathlib.Path:
    """A few standard-library modules as a small fine-tuning corpus."""
    folder = tmp_path_factory.mktemp("code")
    stdlib = pathlib.Path(sysconfig.get_paths()["stdlib"])
    for name in ("textwrap.py", "shlex.py", "fnmatch.py", "colorsys.py", "bisect.py"):
        shutil.copy(stdlib / name, folder / name)
    return folder


def finetune(base_dir, code_dir, run_dir, *extra: str) -> int:
    return run(
        "finetune",
        "--base",
        str(base_dir),
        "--data",
        str(code_dir),
        "--run-dir",
        str(run_dir),
        "--eval-batches",
        "2",
        "--max-new-tokens",
        "8",
        *FAST,
        *extra,
    )


def adapter_arrays(run_dir: pathlib.Path, base_dir: pathlib.Path) -> list[np.ndarray]:
    lora = lj.load_adapter(run_dir / "adapter")
    return [np.asarray(x) for x in jax.tree.leaves(lora)]


def test_finetune_end_to_end(base_dir, code_dir, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert (
        finetune(
            base_dir,
            code_dir,
            run_dir,
            "--steps",
            "16",
            "--lr",
            "1e-2",
            "--warmup-steps",
            "2",
            "--eval-every",
            "8",
            "--save-every",
            "8",
            "--compare-full",
        )
        == 0
    )
    out = capsys.readouterr().out
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["lora_eval_loss"] < summary["base_eval_loss"] - 0.01  # the loss falls
    assert summary["full_eval_loss"] < summary["base_eval_loss"]
    assert 0 < summary["trainable_share"] < 0.2
    assert summary["adapter_bytes_on_disk"] > summary["adapter_bytes"]
    for words in ("Eval loss", "Trainable", "Tokens/s", "base:", "adapted:"):
        assert words in out
    records = report.read_metrics(run_dir)
    train = [r for r in records if r["split"] == "train"]
    assert [r["step"] for r in train] == list(range(2, 17, 2))
    assert all(r["tokens_per_s"] > 0 for r in train)
    assert [r["step"] for r in records if r["split"] == "eval"] == [8, 16]
    assert (run_dir / "loss.png").stat().st_size > 1000
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["16", "8"]


def test_resume_continues_exactly(base_dir, code_dir, tmp_path):
    """A run cut after step 4 and resumed equals the uninterrupted run (data position too)."""
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    args = ("--steps", "8", "--save-every", "4", "--eval-every", "8", "--dropout", "0.1")
    assert finetune(base_dir, code_dir, whole, *args) == 0
    assert finetune(base_dir, code_dir, cut, *args) == 0
    shutil.rmtree(cut / "checkpoints" / "8")  # as if the process died after step 4's save
    shutil.rmtree(cut / "adapter")
    assert finetune(base_dir, code_dir, cut, *args, "--resume") == 0
    for a, b in zip(adapter_arrays(whole, base_dir), adapter_arrays(cut, base_dir), strict=True):
        np.testing.assert_array_equal(a, b)
    losses = lambda d: [r["loss"] for r in report.read_metrics(d) if r["split"] == "train"]
    assert losses(cut)[-2:] == losses(whole)[-2:]  # steps 6 and 8 saw the same batches


def test_checkpoints_without_resume_are_refused_and_kept(base_dir, code_dir, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert finetune(base_dir, code_dir, run_dir, "--steps", "2", "--save-every", "2") == 0
    before = sorted(str(p) for p in run_dir.rglob("*"))
    capsys.readouterr()
    assert finetune(base_dir, code_dir, run_dir, "--steps", "2") == 2
    err = capsys.readouterr().err
    assert "--resume" in err and "Traceback" not in err and err.count("\n") == 1
    assert sorted(str(p) for p in run_dir.rglob("*")) == before
    assert finetune(base_dir, code_dir, run_dir, "--steps", "2", "--rank", "4", "--resume") == 2
    assert "rank: 8 then, 4 now" in capsys.readouterr().err


@pytest.mark.parametrize("flag, part", [("--dora", "magnitude"), ("--lora-bias", "bias")])
def test_dora_and_lora_bias_runs_train_and_record_the_choice(
    base_dir, code_dir, tmp_path, capsys, flag, part
):
    run_dir = tmp_path / "run"
    args = ("--steps", "4", "--save-every", "2", "--eval-every", "4", flag)
    assert finetune(base_dir, code_dir, run_dir, *args) == 0
    lora = lj.load_adapter(run_dir / "adapter")
    weights = jax.tree.leaves(lora, is_leaf=lambda x: isinstance(x, lj.LoraWeights))
    assert weights and all(getattr(w, part) is not None for w in weights)
    assert any(np.abs(np.asarray(getattr(w, part))).sum() > 0 for w in weights)  # trained
    capsys.readouterr()
    assert finetune(base_dir, code_dir, run_dir, "--steps", "6", "--resume") == 2
    assert f"{part_flag(flag)}: True then, False now" in capsys.readouterr().err


def part_flag(flag: str) -> str:
    return flag.removeprefix("--").replace("-", "_")


@pytest.mark.slow
def test_strategies_train_the_same_adapters(base_dir, code_dir, tmp_path):
    got = {}
    for strategy in ("jit", "pmap", "mesh"):
        devices = [] if strategy == "jit" else ["--devices", "4"]
        run_dir = tmp_path / strategy
        assert (
            finetune(
                base_dir,
                code_dir,
                run_dir,
                "--steps",
                "4",
                "--strategy",
                strategy,
                "--eval-every",
                "4",
                *devices,
            )
            == 0
        )
        got[strategy] = adapter_arrays(run_dir, base_dir)
    for strategy in ("pmap", "mesh"):
        for a, b in zip(got["jit"], got[strategy], strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.fixture(scope="module")
def trained(base_dir, code_dir, tmp_path_factory) -> pathlib.Path:
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    assert finetune(base_dir, code_dir, run_dir, "--steps", "6", "--lr", "1e-2") == 0
    return run_dir


def test_sample_merged_equals_factored(base_dir, trained, capsys):
    common = (
        "sample",
        "--base",
        str(base_dir),
        "--run-dir",
        str(trained),
        "--prompt",
        "def f(",
        "--max-new-tokens",
        "12",
        "--temperature",
        "0",
    )
    assert run(*common) == 0
    factored = capsys.readouterr().out
    assert run(*common, "--merged") == 0
    merged = capsys.readouterr().out
    assert "--- base" in factored and "--- adapted" in factored
    strip = lambda text: text.replace(" (merged)", "")
    assert strip(merged) == factored


def test_eval_matches_the_run_summary(base_dir, code_dir, trained, capsys):
    assert (
        run(
            "eval",
            "--base",
            str(base_dir),
            "--data",
            str(code_dir),
            "--run-dir",
            str(trained),
            "--eval-batches",
            "2",
            "--seq-len",
            "32",
            "--batch-size",
            "8",
            "--no-progress",
        )
        == 0
    )
    line = capsys.readouterr().out
    summary = json.loads((trained / "summary.json").read_text())
    assert f"base {summary['base_eval_loss']:.4f}" in line
    assert f"{summary['lora_eval_loss']:.4f}" in line


def test_export_adapter_and_merged_weights(base_dir, trained, tmp_path):
    out_lora, out_merged = tmp_path / "lora", tmp_path / "merged"
    assert (
        run(
            "export",
            "--base",
            str(base_dir),
            "--run-dir",
            str(trained),
            "--lora-out",
            str(out_lora),
            "--merged-out",
            str(out_merged),
        )
        == 0
    )
    lora = lj.load_adapter(out_lora)
    original = lj.load_adapter(trained / "adapter")
    for a, b in zip(jax.tree.leaves(lora), jax.tree.leaves(original), strict=True):
        np.testing.assert_array_equal(a, b)
    model_config, merged = from_pretrained(out_merged)
    from train.base import load_base

    base = load_base(base_dir)
    ids = jax.random.randint(jax.random.key(0), (2, 16), 0, 256)
    factored = lj.lora_apply(Llama(base.config).apply)(base.variables, lora, ids)
    plain = Llama(model_config).apply(merged, ids)
    np.testing.assert_allclose(plain, factored, atol=2e-4)


def test_builtin_base_is_pretrained_once_and_cached(code_dir, tmp_path, monkeypatch, capsys):
    from train import settings

    small = dict(settings.COMMAND_DEFAULTS["pretrain"], steps=4, batch_size=4, seq_len=32)
    monkeypatch.setitem(settings.COMMAND_DEFAULTS, "pretrain", small)
    monkeypatch.setitem(PRESETS, "tiny", PRESETS["micro"])
    common = (
        "--cache-dir",
        str(tmp_path / "cache"),
        "--data",
        str(code_dir),
        "--steps",
        "2",
        "--seq-len",
        "32",
        "--batch-size",
        "4",
        "--no-progress",
        "--eval-batches",
        "1",
        "--max-new-tokens",
        "4",
    )
    assert run(*common, "--run-dir", str(tmp_path / "a")) == 0
    assert "pretraining the built-in tiny model" in capsys.readouterr().out
    assert run(*common, "--run-dir", str(tmp_path / "b")) == 0
    assert "pretraining" not in capsys.readouterr().out
    (cached,) = (tmp_path / "cache").iterdir()
    assert (cached / "base.json").exists() and (cached / "loss.png").exists()


def test_config_file_and_flags(base_dir, code_dir, tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("steps: 7\nlr: 3e-4\nrun-dir: runs/x\ntargets: attention\n")
    s, _ = parse(["--config", str(cfg), "--steps", "9"])
    assert (s.steps, s.lr, s.run_dir, s.targets) == (9, 3e-4, "runs/x", "attention")
    cfg.write_text('{"stesp": 3}')
    bad = tmp_path / "bad.json"
    bad.write_text('{"stesp": 3}')
    with pytest.raises(ValueError, match=r"unknown setting `stesp`.*`steps`"):
        parse(["--config", str(bad)])
    assert parse(["--data", "a", "b", "--run-dir", "x"])[0].data == ("a", "b")


def test_help_lists_the_commands(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for command in ("finetune", "pretrain", "eval", "sample", "export"):
        assert command in out


def _error(capsys, *argv: str) -> str:
    assert run(*argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err and err.count("\n") == 1, err
    return err


# The flags each command reads (the spec of `python -m train COMMAND --help`).
EVERY = {"--config", "--debug", "--base", "--tokenizer", "--cache-dir", "--dtype", "--run-dir"}
EVERY |= {"--no-progress"}
DATA = {"--data", "--eval-data", "--seq-len", "--batch-size", "--eval-batches"}
TRAINING = {"--steps", "--seed", "--lr", "--warmup-steps", "--min-lr-ratio", "--weight-decay"}
TRAINING |= {"--clip-norm", "--eval-every", "--log-every", "--remat", "--attention"}
SAMPLING = {"--seed", "--prompt", "--max-new-tokens", "--temperature", "--top-k", "--merged"}
FROM_RUN = {"--scan-layers", "--adapter"}
FLAGS_OF = {
    "finetune": EVERY
    | DATA
    | TRAINING
    | SAMPLING
    | {"--scan-layers", "--resume", "--task"}
    | {"--accum-steps", "--save-every", "--keep", "--compare-full", "--full-lr"}
    | {"--rank", "--alpha", "--targets", "--dropout", "--rslora", "--dora", "--lora-bias"}
    | {"--strategy", "--devices", "--coordinator", "--num-processes", "--process-id"}
    | {"--quantize", "--quantize-group"},
    "pretrain": EVERY | DATA | TRAINING,
    "eval": EVERY | DATA | FROM_RUN | {"--attention"},
    "sample": EVERY | SAMPLING | FROM_RUN | {"--attention"},
    "export": EVERY
    | FROM_RUN
    | {"--lora-out", "--merged-out", "--peft-out", "--gguf-out", "--gguf-type"},
}


def help_entries(capsys, monkeypatch, command: str) -> dict[str, str]:
    """`python -m train COMMAND --help` as {flag: its line(s) joined}."""
    monkeypatch.setenv("COLUMNS", "500")  # no wrapped help text
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    entries: dict[str, str] = {}
    flag = None
    for line in capsys.readouterr().out.splitlines():
        start = re.match(r"  (--[\w-]+)", line)
        if start:
            flag = start.group(1)
            entries[flag] = line.strip()
        elif flag and line.startswith("      "):
            entries[flag] += " " + line.strip()
        else:
            flag = None
    return entries


def _default(entry: str) -> str | None:
    """The default an entry shows (eval / sample / export: the one without a run record)."""
    found = re.search(r"\(default: (?:the run's(?:, else )?)?(.*?)\)$", entry)
    return found.group(1) or None if found else None


@pytest.mark.parametrize("command", list(FLAGS_OF))
def test_help_lists_exactly_the_flags_the_command_reads(command, capsys, monkeypatch):
    assert set(help_entries(capsys, monkeypatch, command)) == FLAGS_OF[command]


@pytest.mark.parametrize("command", list(FLAGS_OF))
def test_help_shows_the_defaults_the_command_runs_with(command, capsys, monkeypatch, tmp_path):
    """Passing a default that ``--help`` shows changes nothing; a flag shows no default only
    when there is none (a switch off, nothing, or a folder chosen at run time)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "run" / "adapter").mkdir(parents=True)  # a run, for eval / sample / export
    plain = [command, "--run-dir", str(tmp_path / "run")]
    want, _ = parse(plain)
    fields = {name: f.field for f in cli.FLAGS for name in f.flags}
    for flag, entry in help_entries(capsys, monkeypatch, command).items():
        shown = _default(entry)
        if flag in ("--config", "--debug"):
            assert shown is None, entry
        elif flag == "--run-dir":  # chosen at run time
            assert shown is None and "without it" in entry, entry
        elif flag == "--no-progress":
            assert shown == "progress bars on" and want.progress, entry
        elif shown is None:
            assert getattr(want, fields[flag]) in (None, (), False), entry
        else:
            value = [ast.literal_eval(shown)] if shown.startswith("'") else shown.split()
            assert parse([*plain, flag, *value])[0] == want, entry


def test_pretrain_defaults_are_pretrains(capsys, monkeypatch, tmp_path):
    """pretrain's own defaults (those the built-in base is pretrained with), not finetune's."""
    from train.commands import builtin_recipe

    monkeypatch.chdir(tmp_path)
    entries = help_entries(capsys, monkeypatch, "pretrain")
    shown = {flag: _default(entries[flag]) for flag in ("--data", "--steps", "--warmup-steps")}
    shown["--eval-every"] = _default(entries["--eval-every"])
    assert shown == {
        "--data": "pydoc",
        "--steps": "300",
        "--warmup-steps": "30",
        "--eval-every": "100",
    }
    s, _ = parse(["pretrain"])
    assert (s.data, s.steps, s.warmup_steps, s.eval_every) == (("pydoc",), 300, 30, 100)
    recipe = builtin_recipe()
    assert (recipe["data"], recipe["steps"], recipe["warmup_steps"]) == (["pydoc"], 300, 30)
    assert s.run_dir.startswith("runs/pretrain-")
    finetune_help = help_entries(capsys, monkeypatch, "finetune")
    assert _default(finetune_help["--steps"]) == str(parse([])[0].steps) != "300"


@pytest.mark.parametrize("command", list(FLAGS_OF))
def test_no_progress_help_says_what_the_default_is(command, capsys, monkeypatch):
    entries = help_entries(capsys, monkeypatch, command)
    assert "instead of progress bars" in entries["--no-progress"]
    assert entries["--no-progress"].endswith("(default: progress bars on)")
    for entry in entries.values():
        assert not re.search(r"default: (True|False|None|\(\))", entry), entry


@pytest.mark.parametrize(
    ("command", "flag", "readers"),
    [
        ("pretrain", "--rank=4", "finetune"),
        ("pretrain", "--strategy", "finetune"),
        ("eval", "--steps", "finetune and pretrain"),
        ("sample", "--data", "finetune, pretrain and eval"),
        ("export", "--merged", "finetune and sample"),
        ("finetune", "--lora-out", "export"),
    ],
)
def test_a_flag_the_command_does_not_read_is_an_error(command, flag, readers, capsys):
    err = _error(capsys, command, flag, "x")
    name = flag.split("=")[0]
    assert f"`{command}` does not read {name}, a flag of {readers};" in err
    assert f"`python -m train {command} --help`" in err


def test_unknown_and_bad_flags_are_one_line_errors(capsys):
    assert "unknown flag --stesp for `finetune`" in _error(capsys, "--stesp", "3")
    assert "Did you mean --steps?" in _error(capsys, "finetune", "--stesp", "3")
    assert "invalid int value: 'x'" in _error(capsys, "--steps", "x")
    assert "the command comes first" in _error(capsys, "--steps", "3", "eval")
    assert "--merged" in _error(capsys, "export", "--merged-o", "x")  # no abbreviations


def test_a_config_key_the_command_does_not_read_is_an_error(tmp_path, capsys):
    cfg = tmp_path / "export.yaml"
    cfg.write_text("merged: true\n")
    with pytest.raises(ValueError, match=r"`export` does not read `merged`.*`out_merged`"):
        parse(["export", "--config", str(cfg)])
    cfg.write_text("log-every: 5\n")
    err = _error(capsys, "eval", "--config", str(cfg))
    assert "`eval` does not read `log_every` (set in the config file)" in err
    cfg.write_text("rank: 4\n")
    assert "`pretrain` does not read `rank`" in _error(capsys, "pretrain", "--config", str(cfg))


@pytest.mark.parametrize("command", ["eval", "sample", "export"])
def test_a_run_dir_without_a_run_is_an_error(command, tmp_path, capsys):
    missing = tmp_path / "nonexistent"
    err = _error(capsys, command, "--run-dir", str(missing))
    assert f"`{command}` reads a fine-tuned run, and {missing} does not exist" in err
    assert "--run-dir DIR" in err and "--adapter DIR" in err
    (tmp_path / "empty").mkdir()
    err = _error(capsys, command, "--run-dir", str(tmp_path / "empty"))
    assert "holds no adapter/ and no checkpoints/" in err


def test_sample_of_a_missing_run_is_an_error_not_the_bare_base(capsys):
    assert run("sample", "--run-dir", "/nonexistent") == 2
    captured = capsys.readouterr()
    assert "/nonexistent does not exist" in captured.err and not captured.out


def test_run_folder_names_are_finetunes():
    from train import finetune as ft

    assert (cli.ADAPTER_DIR, cli.CHECKPOINTS_DIR) == (ft.ADAPTER, ft.CHECKPOINTS)


def _fields_read(monkeypatch, argv: list[str]) -> set[str]:
    """The `Settings` fields a command reads while it runs (parsing left out)."""
    from train.commands import RUNNERS
    from train.settings import Settings

    s, _ = parse(argv)
    runner = RUNNERS[s.command]
    fields, seen = {f.name for f in dataclasses.fields(Settings)}, set()

    def record(self, name):
        if name in fields:
            seen.add(name)
        return object.__getattribute__(self, name)

    with monkeypatch.context() as m:
        m.setattr(Settings, "__getattribute__", record)
        runner(s, io.StringIO())
    return seen


def test_each_command_reads_the_flags_it_lists(base_dir, trained, tmp_path, monkeypatch):
    """Against the code that runs: the flags a command lists are the settings it reads.

    Left out: `cache_dir` and `progress`, read by eval / sample / export only for the
    built-in base (and `cache_dir` by every command for the compilation cache, before it
    runs); what eval / sample / export take from the run's record (`cli.INHERITED`).
    """
    run_args = ["--base", str(base_dir), "--run-dir", str(trained)]
    argvs = {
        "pretrain": [
            *("pretrain", "--base", "micro", "--run-dir", str(tmp_path / "pre")),
            *("--steps", "2", "--eval-every", "2", "--eval-batches", "1", *FAST),
        ],
        "eval": ["eval", *run_args, "--eval-batches", "1"],
        "sample": ["sample", *run_args, "--max-new-tokens", "4"],
        "export": ["export", *run_args, "--lora-out", str(tmp_path / "out")],
    }
    for command, argv in argvs.items():
        read = _fields_read(monkeypatch, argv)
        listed = {f.field for f in cli.flags_of(command)}
        assert listed - {"cache_dir", "progress"} <= read, command
        assert read <= listed | set(cli.INHERITED), command


def test_user_errors_are_one_line(base_dir, code_dir, tmp_path, capsys):
    assert "does not exist" in _error(capsys, "--base", str(tmp_path / "nope"), *FAST)
    hf = tmp_path / "gpt2"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    assert "GPT2LMHeadModel" in _error(capsys, "--base", str(hf), *FAST)
    broken = tmp_path / "broken"
    shutil.copytree(base_dir, broken)
    (broken / "base.json").write_text("{not json")
    assert "damaged" in _error(capsys, "--base", str(broken), *FAST)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "blob.bin").write_bytes(bytes(range(256)) * 4)
    assert str(empty) in _error(capsys, "--base", str(base_dir), "--data", str(empty), *FAST)
    err = _error(capsys, "--base", str(base_dir), "--data", str(code_dir), "--seq-len", "4096")
    assert "--seq-len 4096" in err
    err = _error(
        capsys,
        "--base",
        str(base_dir),
        "--data",
        str(code_dir),
        "--strategy",
        "mesh",
        "--devices",
        "3",
        "--batch-size",
        "8",
    )
    assert "--batch-size 8" in err
    assert "--strategy" in _error(
        capsys, "--base", str(base_dir), "--strategy", "jit", "--devices", "2"
    )
    err = _error(
        capsys,
        "export",
        "--base",
        str(base_dir),
        "--run-dir",
        str(tmp_path / "none"),
        "--lora-out",
        str(tmp_path / "o"),
    )
    assert f"{tmp_path / 'none'} does not exist" in err


@pytest.mark.slow
def test_two_processes_train_what_one_process_trains(base_dir, code_dir, tmp_path):
    """Two real processes (2 devices each, gloo over loopback) = one process with 4."""
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    args = [
        "--base",
        str(base_dir),
        "--data",
        str(code_dir),
        "--steps",
        "4",
        "--eval-every",
        "4",
        "--eval-batches",
        "2",
        "--max-new-tokens",
        "4",
        "--strategy",
        "mesh",
        *FAST,
    ]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # --devices decides
    many = tmp_path / "two"
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "train",
                *args,
                "--run-dir",
                str(many),
                "--devices",
                "2",
                "--coordinator",
                f"127.0.0.1:{port}",
                "--num-processes",
                "2",
                "--process-id",
                str(i),
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    for p in procs:
        out, _ = p.communicate(timeout=240)
        assert p.returncode == 0, out
    one = tmp_path / "one"
    assert (
        finetune(
            base_dir,
            code_dir,
            one,
            "--steps",
            "4",
            "--eval-every",
            "4",
            "--strategy",
            "mesh",
            "--devices",
            "4",
        )
        == 0
    )
    exported = tmp_path / "exported"
    assert run("export", "--run-dir", str(many), "--lora-out", str(exported)) == 0
    want = lj.load_adapter(one / "adapter")
    # the two processes saved the adapter together (process 0 wrote), as one process does
    for got in (lj.load_adapter(exported), lj.load_adapter(many / "adapter")):
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def test_console_script_is_installed():
    from importlib.metadata import entry_points

    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "lora-jax-train"]
    assert script.load() is main


def test_sampling_settings_are_checked_before_training(base_dir, code_dir, tmp_path, capsys):
    run_dir = tmp_path / "run"
    err = _error(
        capsys,
        "--base",
        str(base_dir),
        "--data",
        str(code_dir),
        "--run-dir",
        str(run_dir),
        "--max-new-tokens",
        "600",
        *FAST,
    )
    assert "--max-new-tokens 600" in err and not run_dir.exists()
    assert "max_new_tokens" in _error(capsys, "--max-new-tokens", "0", *FAST)


def test_runs_get_their_own_folder_and_sample_finds_the_latest(
    base_dir, code_dir, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    common = ["--base", str(base_dir), "--data", str(code_dir), "--steps", "2", *FAST]
    assert run(*common, "--eval-batches", "1", "--max-new-tokens", "4") == 0
    (first,) = (tmp_path / "runs").iterdir()
    assert first.name.startswith("finetune-") and (first / "adapter").is_dir()
    capsys.readouterr()
    assert run("sample", "--max-new-tokens", "4", "--temperature", "0") == 0  # no flags needed
    assert "--- adapted" in capsys.readouterr().out
