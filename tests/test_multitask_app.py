"""The app's multi-task runs: ``finetune --task NAME=DATA ...`` (one adapter per task, every
batch mixing the tasks) and ``sample`` with several adapters in one batch.

A random micro base (no pretraining) and two small corpora (Python code, English prose);
one module-scoped run of a few steps at a high learning rate.
"""

from __future__ import annotations

import dataclasses
import io
import json
import pathlib
import shutil
import sysconfig
from typing import Any

import jax
import numpy as np
import pytest

import lora_jax as lj
from train import corpora, mixed_sampling, multitask
from train.base import load_base, save_base
from train.cli import main, parse
from train.commands import export, sample
from train.models import PRESETS, Llama, init_cache
from train.report import read_metrics
from train.sampling import generate
from train.settings import UserError
from train.sources import pydoc_topics

STEPS = 6
FAST = ["--seq-len", "32", "--no-progress", "--eval-batches", "1", "--max-new-tokens", "6"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, pathlib.Path]:
    root = tmp_path_factory.mktemp("multitask")
    config = PRESETS["micro"]
    variables = Llama(config).init(jax.random.key(0), np.zeros((1, 8), np.int32))
    save_base(root / "base", config, variables, tokenizer="byte", info={})
    code = root / "code"  # tiny data (about 40 windows each): a few steps see it all
    code.mkdir()
    stdlib = pathlib.Path(sysconfig.get_paths()["stdlib"])
    (code / "colorsys.py").write_text((stdlib / "colorsys.py").read_text()[:1400])
    prose = root / "prose.txt"
    prose.write_text(pydoc_topics()[0][:1400])
    (root / "empty").mkdir()
    found = {"root": root, "base": root / "base", "code": code, "prose": prose}
    return found | {"empty": root / "empty"}


def _finetune(folders, run_dir, *extra: str, out: io.StringIO | None = None) -> int:
    import contextlib

    argv = ["finetune", "--base", str(folders["base"]), "--run-dir", str(run_dir), *FAST]
    with contextlib.redirect_stdout(out or io.StringIO()):
        return main([*argv, *extra])


@pytest.fixture(scope="module")
def run(folders) -> dict:
    """Two tasks, batch 5 (3 code rows, 2 prose rows), a high learning rate."""
    run_dir = folders["root"] / "run"
    out = io.StringIO()
    assert _finetune(folders, run_dir, *_run_args(folders), out=out) == 0
    return {"dir": run_dir, "out": out.getvalue()}


def _run_args(folders) -> list[str]:
    return [
        *("--task", f"code={folders['code']}", "--task", f"prose={folders['prose']}"),
        *("--batch-size", "5", "--steps", str(STEPS), "--lr", "3e-2", "--warmup-steps", "0"),
        *("--log-every", "1", "--eval-every", "3", "--save-every", "3", "--temperature", "0"),
    ]


def test_each_task_gets_its_adapter_equal_to_its_slice_of_the_final_state(folders, run):
    s, _ = parse(["finetune", "--base", str(folders["base"]), "--task", "a=x", "--task", "b=y"])
    base = load_base(folders["base"])
    frozen, target, _ = multitask._new_state(s, base, 2)
    with lj.CheckpointManager(run["dir"] / "checkpoints", read_only=True) as mgr:
        assert mgr.latest_step() == STEPS
        state, position = mgr.restore(target, frozen=frozen)
    assert set(position["loaders"]) == {"code", "prose"}
    for i, name in enumerate(("code", "prose")):
        loaded = lj.load_adapter(run["dir"] / "adapters" / name, frozen=base.variables)
        want = lj.multi.unstack_adapter(state.lora, i)
        got_leaves, want_leaves = jax.tree.leaves(loaded), jax.tree.leaves(want)
        assert len(got_leaves) == len(want_leaves) > 0
        for got, ref in zip(got_leaves, want_leaves, strict=True):
            np.testing.assert_array_equal(np.asarray(got), np.asarray(ref))
    first, second = (lj.multi.unstack_adapter(state.lora, i) for i in range(2))
    assert any(  # the tasks trained apart
        not np.array_equal(a, b)
        for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(second), strict=True)
    )


def test_resume_continues_the_stacked_state_exactly(folders, run, tmp_path):
    """Steps 1-3, then --resume for 4-6 (each task's data position restored): the adapters
    equal those of the uninterrupted run bit for bit."""
    resumed = tmp_path / "run"
    shutil.copytree(run["dir"], resumed)
    shutil.rmtree(resumed / "checkpoints" / str(STEPS))
    shutil.rmtree(resumed / "adapters")
    assert _finetune(folders, resumed, *_run_args(folders)) == 2  # checkpoints, no --resume
    assert _finetune(folders, resumed, *_run_args(folders), "--resume") == 0
    for name in ("code", "prose"):
        got = lj.load_adapter(resumed / "adapters" / name)
        want = lj.load_adapter(run["dir"] / "adapters" / name)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_each_task_reports_train_and_eval_losses_that_fall(run):
    records = read_metrics(run["dir"])
    summary = json.loads((run["dir"] / "summary.json").read_text())
    for name in ("code", "prose"):
        train = [r["loss"] for r in records if r["split"] == f"train/{name}"]
        evals = [r["loss"] for r in records if r["split"] == f"eval/{name}"]
        assert len(train) == STEPS and len(evals) == 2
        assert np.mean(train[STEPS // 2 :]) < np.mean(train[: STEPS // 2]) - 0.05, train
        base = summary["tasks"][name]["base_eval_loss"]
        assert max(evals) < base - 0.1 and summary["tasks"][name]["lora_eval_loss"] == evals[-1]
        assert f"base {base:.3f} -> LoRA {evals[-1]:.3f}" in run["out"].split(f"  {name}:")[1]
    assert [t["rows_per_batch"] for t in summary["tasks"].values()] == [3, 2]
    assert "train/code" in run["out"] and "eval/prose" in run["out"]  # the log lines


def _sample(folders, *argv: str) -> Any:
    s, _ = parse(["sample", "--base", str(folders["base"]), "--temperature", "0", *argv])
    return sample(s, io.StringIO())


@dataclasses.dataclass(frozen=True)
class _Forward:
    """A reference sampling forward: the base alone, or with one adapter (`lj.lora_apply`)."""

    model: Llama
    adapted: bool

    def __call__(self, params, ids, cache):
        if not self.adapted:
            logits, cache = self.model.apply(params, ids, cache=cache)
        else:
            apply = lj.lora_apply(self.model.apply, deterministic=True)
            logits, cache = apply(params[0], params[1], ids, cache=cache)
        return logits[..., :256], cache  # the byte tokenizer's ids, as the app samples


def test_sampling_several_adapters_in_one_batch_equals_each_alone(folders, run):
    """Prompts of different lengths, each with its own adapter (or none), in one batch: each
    row's greedy continuation equals that prompt sampled alone with its adapter."""
    adapters, new = run["dir"] / "adapters", 12
    prompts = ("def ", "The first one ", "class A")
    rows = _sample(
        folders,
        *("--run-dir", str(run["dir"]), "--max-new-tokens", str(new)),
        *("--adapter", f"code={adapters / 'code'}", "--adapter", f"prose={adapters / 'prose'}"),
        *("--adapter", "base", *(x for p in prompts for x in ("--prompt", p))),
    )
    assert [(r["adapter"], r["prompt"]) for r in rows] == list(
        zip(("code", "prose", "base"), prompts, strict=True)
    )
    base = load_base(folders["base"])
    model = Llama(base.config)
    for row in rows:
        ids = corpora.encode_prompt(base.tokenizer, row["prompt"])
        cache = init_cache(base.config, 1, ids.shape[1] + new)
        if row["adapter"] == "base":
            forward, params = _Forward(model, False), base.variables
        else:
            lora = lj.load_adapter(adapters / row["adapter"], frozen=base.variables)
            forward, params = _Forward(model, True), (base.variables, lora)
        alone = generate(forward, params, ids, cache, max_new_tokens=new, key=jax.random.key(0))
        assert row["text"] == base.tokenizer.decode(alone[0]), row
    # A multi-task run without --adapter: the base, then every task, one prompt for all.
    s, _ = parse(["sample", "--base", str(folders["base"]), "--run-dir", str(run["dir"])])
    assert mixed_sampling.wants_mixed_sample(s)
    assert [name for name, _ in mixed_sampling._entries(s)] == ["base", "code", "prose"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--task", "a=x", "--data", "y"], r"--task NAME=DATA names each task's data.*--data"),
        (["--task", "a=x", "--task", "a=y"], r"--task a=\.\.\. is given twice"),
        (["--task", "a/b=x"], r"NAME 'a/b' must be a safe folder name"),
        (["--task", "noequals"], r"--task 'noequals': expected NAME=DATA"),
        (["--task", "a=x", "--task", "b=y", "--dora"], r"no DoRA"),
        (["--task", "a=x", "--task", "b=y", "--batch-size", "1"], r"--batch-size 1 is below"),
    ],
)
def test_bad_task_flags_are_one_line_errors(folders, tmp_path, capsys, extra, message):
    import re

    assert _finetune(folders, tmp_path / "r", *extra) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert re.search(message, err), err


def test_a_task_with_no_examples_is_named(folders, tmp_path):
    tasks = ["--task", f"code={folders['code']}", "--task", f"nothing={folders['empty']}"]
    with pytest.raises(UserError, match=r"--task nothing=.*empty"):
        _finetune(folders, tmp_path / "r", *tasks, "--batch-size", "2", "--debug")


def test_sample_counts_that_do_not_pair_are_refused(folders, run):
    adapters = run["dir"] / "adapters"
    with pytest.raises(UserError, match=r"2 --prompt texts and 3 --adapter entries"):
        _sample(
            folders,
            *("--run-dir", str(run["dir"]), "--adapter", "base"),
            *("--adapter", str(adapters / "code"), "--adapter", str(adapters / "prose")),
            *("--prompt", "a", "--prompt", "b"),
        )


def test_export_of_a_multitask_run_asks_which_adapter(folders, run, tmp_path):
    argv = ["export", "--base", str(folders["base"]), "--run-dir", str(run["dir"])]
    s, _ = parse([*argv, "--lora-out", str(tmp_path / "out")])
    with pytest.raises(UserError, match=r"multi-task run \(.*code, prose\); pass --adapter .*"):
        export(s, io.StringIO())
    code = run["dir"] / "adapters" / "code"  # NAME=DIR works wherever DIR does
    s, _ = parse([*argv, "--lora-out", str(tmp_path / "out"), "--adapter", f"code={code}"])
    export(s, io.StringIO())
    got, want = lj.load_adapter(tmp_path / "out"), lj.load_adapter(code)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_every_batch_holds_each_tasks_share_with_its_ids_and_token_counts():
    from train.data import pack_documents
    from train.tokenizer import ByteTokenizer

    tok = ByteTokenizer()
    packs = [pack_documents([ch * 400], tok, seq_len=8) for ch in "abc"]
    data = [
        multitask._TaskData(multitask.Task(n, (n,)), p, [])
        for n, p in zip("abc", packs, strict=True)
    ]
    rows = multitask.shares(7, 3)
    assert rows == [3, 2, 2]
    batches = multitask.MixedBatches(data, rows, seed=0)
    for _ in range(3):
        batch = next(batches)
        assert batch["adapter_ids"].tolist() == [0, 0, 0, 1, 1, 2, 2]
        for row, task in zip(batch["inputs"], batch["adapter_ids"], strict=True):
            assert set(tok.decode(row.tolist())) <= {"abc"[task]}  # its task's text only
        np.testing.assert_array_equal(batch["target_tokens"], batch["weights"].sum(axis=1))
    state = batches.get_state()
    again = multitask.MixedBatches(data, rows, seed=0)
    again.set_state(json.loads(json.dumps(state)))
    np.testing.assert_array_equal(next(again)["inputs"], next(batches)["inputs"])
