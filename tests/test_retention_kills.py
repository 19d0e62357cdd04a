"""Issue 16: crash-safe retention under random kills.

A writer saves every step with ``max_to_keep=3`` (`retention_worker.py`) and is SIGKILLed
20 times at random moments; after every kill the folder is reopened here and every listed
step restored. Wanted: 0 wrong restores and 0 listed-but-unreadable steps.

What a kill can cut, and what the design promises for each (orbax 0.12 on a local disk):

* a write: the step is written under ``<step>.orbax-checkpoint-tmp`` and renamed to
  ``<step>`` once every item is on disk, so the partial step is never listed; opening the
  folder for writing removes it.
* retention: it runs after the new step is committed, and sets each old step aside with one
  atomic rename into ``_deleted/`` (``todelete_subdir``), oldest first; `lora_jax` deletes
  what is there at the start of the next save (a kill mid-delete leaves it there, never
  listed) and when the folder is opened for writing (orbax leaves ``_deleted/`` alone). A
  kill after the commit and before the rename leaves one step more than ``max_to_keep``,
  all complete (the next save trims them).

So after each kill: the listed steps are consecutive, at most ``max_to_keep + 1`` of them
(the writer's first step is finished, retention included, before it can be killed), every
one restores to exactly what was saved under its number, and the latest grows from kill to
kill. Most random kills land inside a write (a save is ~0.1 s, mostly writing); the windows
between a commit and its retention, and while set-aside steps wait for deletion, are a few
milliseconds, so every fourth kill waits for the one and every fourth for the other.
"""

from __future__ import annotations

import os
import pathlib
import random
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from retention_worker import MAX_TO_KEEP, state_at

import lora_jax as lj
from lora_jax.io._steps import DELETED, complete

HERE = pathlib.Path(__file__).parent
KILLS = 20
TMP = ".orbax-checkpoint-tmp"


def _look(ckpt: pathlib.Path) -> dict:
    """What is on disk (before anything reopens the folder)."""
    names = os.listdir(ckpt) if ckpt.is_dir() else []
    steps = sorted(int(n) for n in names if n.isdigit())
    aside = ckpt / DELETED
    return {
        "tmp": sorted(n for n in names if TMP in n),
        "deleted": len(os.listdir(aside)) if aside.is_dir() else 0,
        "committed": steps,
        "partial": [s for s in steps if not complete(ckpt / str(s))],
    }


def _over_retention(ckpt: pathlib.Path) -> bool:
    return sum(n.isdigit() for n in os.listdir(ckpt)) > MAX_TO_KEEP


def _set_aside(ckpt: pathlib.Path) -> bool:
    aside = ckpt / DELETED
    return aside.is_dir() and bool(os.listdir(aside))


def _run_and_kill(ckpt, ready, log, sleep: float, wait_for=None) -> None:
    """Starts the writer, waits until its first step is on disk, lets it run `sleep` s (then,
    with `wait_for`, until that predicate of the folder holds, for 5 s at most) and
    SIGKILLs it."""
    ready.unlink(missing_ok=True)
    with open(log, "wb") as out:
        child = subprocess.Popen(
            [sys.executable, str(HERE / "retention_worker.py"), str(ckpt), str(ready)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 180
        while not ready.exists():
            if child.poll() is not None or time.monotonic() > deadline:
                tail = log.read_text(errors="replace")[-3000:]
                pytest.fail(f"the writer died or hung before its first step:\n{tail}")
            time.sleep(0.01)
        time.sleep(sleep)
        if wait_for is not None:
            until = time.monotonic() + 5
            while not wait_for(ckpt) and time.monotonic() < until:
                time.sleep(0.0005)
        assert child.poll() is None, log.read_text(errors="replace")[-3000:]
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)


def _matches(state, position, step: int) -> bool:
    want, want_position = state_at(step)
    same = [
        np.array_equal(np.asarray(a), np.asarray(b))
        for a, b in zip(
            jax.tree.leaves((state.lora, state.opt_state, state.step, state.skipped)),
            jax.tree.leaves((want.lora, want.opt_state, want.step, want.skipped)),
            strict=True,
        )
    ]
    rng = np.array_equal(jax.random.key_data(state.rng), jax.random.key_data(want.rng))
    return all(same) and rng and position == want_position


@pytest.mark.slow
def test_random_kills_never_leave_a_wrong_or_unreadable_step(tmp_path):
    ckpt, ready, log = tmp_path / "ckpt", tmp_path / "ready", tmp_path / "worker.log"
    chooser = random.Random(16)
    target = state_at(1)[0]
    wrong, unreadable, seen = [], [], []
    latest = 0
    for kill in range(KILLS):
        wait_for = {3: _over_retention, 1: _set_aside}.get(kill % 4)
        targeted = wait_for is not None
        _run_and_kill(ckpt, ready, log, chooser.uniform(0.0, 0.6), wait_for)
        before = _look(ckpt)
        with lj.CheckpointManager(ckpt, max_to_keep=MAX_TO_KEEP) as mgr:  # the reopen
            steps = mgr.all_steps()
            assert mgr.latest_step() == steps[-1], (mgr.latest_step(), steps)
            for step in steps:
                try:
                    state, position = mgr.restore(target, step)
                except Exception as err:  # listed but unreadable
                    unreadable.append((kill, step, repr(err)[:300]))
                    continue
                if not _matches(state, position, step):
                    wrong.append((kill, step))
        after = _look(ckpt)
        seen.append({"kill": kill, "targeted": targeted, **before, "listed": steps})
        # every complete committed step is listed, and nothing else
        assert steps == [s for s in before["committed"] if s not in before["partial"]], seen[-1]
        assert steps == list(range(steps[0], steps[-1] + 1)), seen[-1]  # consecutive
        assert len(steps) <= MAX_TO_KEEP + 1, seen[-1]  # one more only if retention was cut
        assert steps[-1] > latest, (latest, seen[-1])  # every run commits a new step
        latest = steps[-1]
        # the reopen removed what the kill left behind
        assert not after["deleted"] and not after["partial"] and not after["tmp"], after

    mid_write = sum(bool(s["tmp"]) for s in seen)
    cut_retention = sum(len(s["listed"]) > MAX_TO_KEEP for s in seen)
    set_aside = sum(s["deleted"] > 0 for s in seen)
    summary = (
        f"{KILLS} kills: {mid_write} inside a write, {cut_retention} between a commit and "
        f"its retention, {set_aside} with steps set aside in {DELETED}/, "
        f"{sum(bool(s['partial']) for s in seen)} with a partial step; last step {latest}"
    )
    print(summary)
    for s in seen:
        print(s)
    assert not wrong, (wrong, summary)
    assert not unreadable, (unreadable, summary)
    # the kills hit the moments that matter (otherwise this proves nothing)
    assert mid_write >= 3 and cut_retention >= 2 and set_aside >= 3, summary
