"""QLoRA in the training app: ``finetune --quantize int8|int4|nf4`` trains adapters on a
quantized base (cached once), reports the base's bytes, and eval / sample / export of the
run rebuild the same base from its recorded settings.

The base is the small one `tests/test_cli.py` pretrains, with the same fast settings."""

from __future__ import annotations

import contextlib
import io
import json
import os
import pathlib
import shutil
import sysconfig

import jax
import numpy as np
import pytest
from test_cli import FAST, adapter_arrays, finetune, run

import lora_jax as lj
from train import quantized
from train.base import load_base


def qfinetune(base, code, run_dir, cache, *extra: str) -> int:
    return finetune(base, code, run_dir, "--cache-dir", str(cache), *extra)


@pytest.fixture(scope="module")
def qbase(tmp_path_factory) -> pathlib.Path:
    """A small base, as `tests/test_cli.py` pretrains it."""
    folder = tmp_path_factory.mktemp("base") / "micro"
    args = ("--base", "micro", "--data", "pydoc", "--steps", "60", "--eval-every", "60")
    assert run("pretrain", *args, "--run-dir", str(folder), *FAST) == 0
    return folder


@pytest.fixture(scope="module")
def qcode(tmp_path_factory) -> pathlib.Path:
    """A few standard-library modules as a small fine-tuning corpus."""
    folder = tmp_path_factory.mktemp("code")
    stdlib = pathlib.Path(sysconfig.get_paths()["stdlib"])
    for name in ("textwrap.py", "shlex.py", "fnmatch.py", "colorsys.py", "bisect.py"):
        shutil.copy(stdlib / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> pathlib.Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def qtrained(qbase, qcode, cache, tmp_path_factory) -> tuple[pathlib.Path, str]:
    run_dir = tmp_path_factory.mktemp("qlora") / "run"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = qfinetune(
            qbase, qcode, run_dir, cache, "--steps", "6", "--lr", "1e-2", "--quantize", "nf4"
        )
    assert code == 0
    return run_dir, out.getvalue()


def _folders(cache: pathlib.Path) -> list[pathlib.Path]:
    return sorted((cache / "quantized").iterdir())


def test_finetune_on_nf4_trains_and_reports_the_bytes(qtrained, cache):
    run_dir, out = qtrained
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["base_quantized"] == "nf4" and summary["base_quantize_group"] == 64
    ratio = summary["base_bytes_quantized"] / summary["base_bytes"]
    assert 0.14 < ratio < 0.3, ratio  # 4.5 bits per kernel weight; embeddings stay float
    mib = lambda n: f"{n / 2**20:,.2f} MiB"
    want = (
        f"base: {mib(summary['base_bytes'])} float32 -> {mib(summary['base_bytes_quantized'])} "
        f"nf4 g64 ({ratio:.2f})"
    )
    assert want in out, out
    assert summary["lora_eval_loss"] < summary["base_eval_loss"]  # the adapters learn
    # The nf4 base is a little worse than the float one, and it is what the run trained on.
    assert 0 < summary["base_eval_loss"] - summary["float_base_eval_loss"] < 0.1
    assert "nf4 base" in out and "QLoRA" in out
    (folder,) = _folders(cache)
    record = json.loads((folder / quantized.RECORD_FILE).read_text())
    kernels = record["kernels"]
    # Exactly the contraction kernels: embeddings and norms stay float.
    assert kernels and all(p.endswith("/kernel") for p in kernels)
    assert not any("embed" in p or "norm" in p for p in kernels)
    assert {k["static"]["format"] for k in kernels.values()} == {"nf4"}


def test_eval_and_sample_of_a_qlora_run_rebuild_the_quantized_base(qtrained, capsys):
    run_dir, _ = qtrained
    common = ("--run-dir", str(run_dir), "--no-progress")
    assert run("eval", *common, "--eval-batches", "2", "--batch-size", "8") == 0
    line = capsys.readouterr().out
    summary = json.loads((run_dir / "summary.json").read_text())
    assert f"base (nf4) {summary['base_eval_loss']:.4f}" in line, line
    assert f"{summary['lora_eval_loss']:.4f}" in line
    sample = (
        "sample",
        *common,
        "--prompt",
        "def f(",
        "--max-new-tokens",
        "8",
        "--temperature",
        "0",
    )
    assert run(*sample) == 0
    factored = capsys.readouterr().out
    assert "--- base" in factored and "--- adapted" in factored
    assert run(*sample, "--merged") == 0  # a quantized kernel merges as its float value
    assert capsys.readouterr().out.replace(" (merged)", "") == factored


def test_peft_export_of_a_qlora_run_is_a_plain_lora_adapter(qbase, qtrained, tmp_path):
    """Adapters are float whatever the base: PEFT's files, and no quantization field (PEFT
    has none; a PEFT user loads them on a bitsandbytes 4-bit base)."""
    run_dir, _ = qtrained
    peft, merged = tmp_path / "peft", tmp_path / "merged"
    args = ("export", "--run-dir", str(run_dir), "--peft-out", str(peft))
    assert run(*args, "--merged-out", str(merged)) == 0
    assert sorted(p.name for p in peft.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    config = json.loads((peft / "adapter_config.json").read_text())
    assert not any("quant" in key.lower() for key in config), config
    assert config["peft_type"] == "LORA" and config["r"] == 8
    assert (merged / "config.json").exists()


def test_a_second_run_reads_the_cache_and_a_damaged_cache_is_rebuilt(
    qbase,
    qcode,
    qtrained,
    cache,
    tmp_path,
    capsys,
):
    (folder,) = _folders(cache)
    stamp = folder.stat().st_mtime_ns
    assert qfinetune(qbase, qcode, tmp_path / "b", cache, "--steps", "2", "--quantize", "nf4") == 0
    assert "read from the cache" in capsys.readouterr().out
    assert json.loads((tmp_path / "b" / "summary.json").read_text())["base_quantized_cached"]
    assert _folders(cache) == [folder] and folder.stat().st_mtime_ns == stamp  # not rewritten
    # The same base, quantized and read back, is the same tree.
    base = load_base(qbase)
    fresh = lj.quant.quantize(
        base.variables, "nf4", layouts=quantized.layouts_of(base.config, base.variables, 32)
    )
    restored = quantized.read_cache(folder, base.variables)
    assert jax.tree.structure(fresh) == jax.tree.structure(restored)
    for a, b in zip(jax.tree.leaves(fresh), jax.tree.leaves(restored), strict=True):
        np.testing.assert_array_equal(a, b)
    # Damage one array file: the digests catch it, the cache is quantized again.
    files = [p for p in (folder / "params").rglob("*") if p.is_file() and p.stat().st_size > 64]
    biggest = max(files, key=lambda p: p.stat().st_size)
    data = bytearray(biggest.read_bytes())
    data[len(data) // 2] ^= 0xFF
    biggest.write_bytes(bytes(data))
    assert qfinetune(qbase, qcode, tmp_path / "c", cache, "--steps", "2", "--quantize", "nf4") == 0
    out = capsys.readouterr().out
    assert "is damaged" in out and "quantized and cached" in out, out
    assert not json.loads((tmp_path / "c" / "summary.json").read_text())["base_quantized_cached"]
    assert quantized.read_cache(folder, base.variables) is not None  # rewritten, readable


def test_int8_and_int4_train_too(qbase, qcode, cache, tmp_path):
    ratios = {}
    for fmt in ("int8", "int4"):
        run_dir = tmp_path / fmt
        assert qfinetune(qbase, qcode, run_dir, cache, "--steps", "2", "--quantize", fmt) == 0
        summary = json.loads((run_dir / "summary.json").read_text())
        ratios[fmt] = summary["base_bytes_quantized"] / summary["base_bytes"]
    assert ratios["int4"] < ratios["int8"] < 0.45, ratios


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err and err.count("\n") == 1, err
    return err


def test_a_group_size_that_does_not_fit_names_the_flag(qbase, qcode, cache, tmp_path, capsys):
    run_dir = tmp_path / "run"
    args = ("--steps", "2", "--quantize", "nf4", "--quantize-group", "48")
    assert qfinetune(qbase, qcode, run_dir, cache, *args) == 2
    err = _one_line_error(capsys)
    assert "--quantize-group 48" in err and "Change --quantize-group" in err, err
    assert "--quantize-group 32" in err  # the largest size that fits, in the flag's words
    assert not run_dir.exists()  # nothing trained, nothing written


def test_resume_with_another_quantize_is_refused(qbase, qcode, cache, tmp_path, capsys):
    run_dir = tmp_path / "run"
    args = ("--steps", "2", "--save-every", "2")
    assert qfinetune(qbase, qcode, run_dir, cache, *args, "--quantize", "nf4") == 0
    capsys.readouterr()
    resumed = (*args, "--steps", "4", "--resume")
    assert qfinetune(qbase, qcode, run_dir, cache, *resumed, "--quantize", "int8") == 2
    assert "quantize: 'nf4' then, 'int8' now" in _one_line_error(capsys)
    assert qfinetune(qbase, qcode, run_dir, cache, *resumed) == 2  # none is a change too
    assert "quantize: 'nf4' then, 'none' now" in _one_line_error(capsys)
    assert qfinetune(qbase, qcode, run_dir, cache, *resumed, "--quantize", "nf4") == 0


def test_a_run_recorded_before_quantize_existed_resumes(qbase, qcode, cache, tmp_path):
    run_dir = tmp_path / "run"
    args = ("--steps", "2", "--save-every", "2")
    assert qfinetune(qbase, qcode, run_dir, cache, *args) == 0
    record = json.loads((run_dir / "run.json").read_text())
    del record["quantize"], record["quantize_group"]
    (run_dir / "run.json").write_text(json.dumps(record))
    assert qfinetune(qbase, qcode, run_dir, cache, "--steps", "4", "--resume") == 0


@pytest.mark.slow
def test_strategies_train_the_same_adapters_on_a_quantized_base(qbase, qcode, cache, tmp_path):
    got = {}
    for strategy in ("jit", "pmap", "mesh"):
        devices = [] if strategy == "jit" else ["--devices", "4"]
        run_dir = tmp_path / strategy
        args = ("--steps", "4", "--eval-every", "4", "--strategy", strategy, *devices)
        assert qfinetune(qbase, qcode, run_dir, cache, *args, "--quantize", "nf4") == 0
        got[strategy] = adapter_arrays(run_dir, qbase)
    for strategy in ("pmap", "mesh"):
        for a, b in zip(got["jit"], got[strategy], strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_nf4_fine_tune_is_within_3_percent_of_the_float_one(qbase, qcode, cache, tmp_path):
    """The quality claim at test size: the same fine-tune on an nf4 base and on the float
    base reach eval losses within 3% (`python -m train.benchmark --part qlora` checks it
    at the demo's size)."""
    losses = {}
    for fmt in ("none", "nf4"):
        run_dir = tmp_path / fmt
        args = ("--steps", "24", "--lr", "1e-2", "--eval-every", "24", "--quantize", fmt)
        assert qfinetune(qbase, qcode, run_dir, cache, *args) == 0
        losses[fmt] = json.loads((run_dir / "summary.json").read_text())["lora_eval_loss"]
    assert losses["nf4"] <= 1.03 * losses["none"], losses
    assert os.path.isdir(cache / "quantized")
