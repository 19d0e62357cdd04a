"""Several tasks in one run: ``finetune --task NAME=DATA ...``.

``finetune --task NAME=DATA --task NAME=DATA ...`` trains one LoRA adapter per task on one
base in one run: every batch mixes the tasks (a fixed share of the rows each), each row runs
with its task's adapter (`lj.multi.lora_apply_mixed`), and one step
(`lj.multi.make_train_step`) updates every adapter with its own optimizer state, each
task's loss being its own token mean (the step's per-example weights are the rows'
target-token counts). Each task keeps its own held-out split; the log, ``metrics.jsonl``
and ``loss.png`` carry ``train/NAME`` and ``eval/NAME`` beside the mean, and each adapter
is written to ``<run-dir>/adapters/NAME/`` (read by ``sample``/``eval``/``export
--adapter DIR``).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import time
from collections.abc import Callable, Sequence
from typing import Any, TextIO

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lora_jax as lj
from train import corpora
from train.base import Base, layouts_of
from train.data import Packed, make_loader
from train.evaluation import eval_loss, make_eval_fn
from train.finetune import (
    RUN_FILE,
    lora_config,
    lora_logits_fn,
    open_checkpoints,
    write_run_file,
)
from train.losses import make_optimizer, schedule
from train.mixed_sampling import ADAPTERS, BASE, NAME, Row, check_lengths, generate_rows
from train.models import Llama
from train.placement import make_strategy
from train.report import PLOT_FILE, Reporter, plot_losses, read_metrics
from train.settings import Settings, UserError

__all__ = [
    "ADAPTERS",
    "Task",
    "finetune_tasks",
    "parse_tasks",
    "shares",
]

IDS = "adapter_ids"  # the batch key of each row's task (its adapter's index)
COUNTS = "target_tokens"  # the batch key of each row's target-token count (its weight)
SUMMARY_FILE = "summary.json"
# Settings a multi-task run refuses, and why.
_REFUSED = {
    "dora": "DoRA (mixed batches refuse DoRA adapters)",
    "lora_bias": "--lora-bias",
    "compare_full": "--compare-full",
}
# Settings that must not change when a multi-task run is resumed (steps may grow).
_RESUME_FIXED = ("base", "task", "seq_len", "batch_size", "seed", "rank", "alpha", "targets")


@dataclasses.dataclass(frozen=True)
class Task:
    """One task of a multi-task run: its name (a folder name) and its data (as ``--data``)."""

    name: str
    data: tuple[str, ...]


def _name_error(flag: str, text: str, name: str) -> UserError:
    return UserError(
        f"{flag} {text!r}: NAME {name!r} must be a safe folder name: 1 to 64 letters, digits, "
        "'_', '-' or '.', starting with a letter or digit."
    )


def parse_tasks(specs: Sequence[str]) -> list[Task]:
    """The tasks of ``--task NAME=DATA`` flags (DATA: what ``--data`` takes; ``a,b`` for
    several paths).

    Raises:
        UserError: a flag without ``NAME=DATA``, an unsafe or reserved NAME, or a NAME
            given twice (the flag is named).

    Example:
        >>> parse_tasks(["code=stdlib", "prose=pydoc"])[1]
        Task(name='prose', data=('pydoc',))
    """
    tasks: list[Task] = []
    for text in specs:
        name, sep, data = text.partition("=")
        paths = tuple(p for p in data.split(",") if p)
        if not sep or not paths:
            raise UserError(f"--task {text!r}: expected NAME=DATA, e.g. --task code=stdlib.")
        if not NAME.fullmatch(name) or name in (".", ".."):
            raise _name_error("--task", text, name)
        if name == BASE:
            raise UserError(f"--task {text!r}: NAME {BASE!r} is kept for the plain base model.")
        if any(t.name == name for t in tasks):
            raise UserError(f"--task {name}=... is given twice; each task needs its own NAME.")
        tasks.append(Task(name, paths))
    return tasks


def shares(batch_size: int, k: int) -> list[int]:
    """Rows of each task in every batch: ``batch_size // k`` each, and the first
    ``batch_size % k`` tasks (in ``--task`` order) one more.

    Raises:
        UserError: fewer rows than tasks (every batch must hold every task).

    Example:
        >>> shares(8, 3)
        [3, 3, 2]
    """
    if batch_size < k:
        raise UserError(
            f"--batch-size {batch_size} is below the {k} tasks: every batch holds at least "
            f"one row of each task; use --batch-size {k} or more."
        )
    return [batch_size // k + (i < batch_size % k) for i in range(k)]


def _check_settings(s: Settings, k: int) -> None:
    for field, what in _REFUSED.items():
        if getattr(s, field):
            raise UserError(f"--task runs take no {what}; drop it, or train one task alone.")
    if s.quantize != "none":
        raise UserError("--task runs take a float base; drop --quantize.")
    if s.num_processes > 1:
        raise UserError("--task runs run in one process; drop --num-processes.")
    if len(s.prompt) not in (1, k):
        raise UserError(
            f"--task run with {k} tasks: give one --prompt (for every task's sample) or {k} "
            f"(one per task); found {len(s.prompt)}."
        )


@dataclasses.dataclass
class _TaskData:
    task: Task
    train: Packed
    evals: list[dict[str, np.ndarray]]


def _load_task(s: Settings, task: Task, share: int, base: Base) -> _TaskData:
    own = dataclasses.replace(s, data=task.data, eval_data=(), task=(), batch_size=share)
    try:
        train, held = corpora.load_splits(own, base.tokenizer)
    except (UserError, ValueError, FileNotFoundError) as err:
        raise UserError(f"--task {task.name}={','.join(task.data)}: {err}") from None
    return _TaskData(task, train, corpora.eval_sets(s, held))


class MixedBatches:
    """Endless batches mixing the tasks: each task's loader gives its share of the rows, in
    ``--task`` order, with the rows' task ids (`IDS`) and target-token counts (`COUNTS`)."""

    def __init__(self, data: list[_TaskData], rows: list[int], seed: int) -> None:
        self.loaders = [
            make_loader(d.train, batch_size=n, seed=seed) for d, n in zip(data, rows, strict=True)
        ]
        self.names = [d.task.name for d in data]
        self.ids = np.repeat(np.arange(len(rows), dtype=np.int32), rows)

    def __iter__(self) -> MixedBatches:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        parts = [next(loader) for loader in self.loaders]
        batch = {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
        batch[IDS] = self.ids
        batch[COUNTS] = batch["weights"].sum(axis=1, dtype=np.float32)
        return batch

    def get_state(self) -> dict[str, Any]:
        """Each task's loader position (JSON)."""
        return {n: loader.get_state() for n, loader in zip(self.names, self.loaders, strict=True)}

    def set_state(self, state: dict[str, Any]) -> None:
        """Continues from `get_state`."""
        for name, loader in zip(self.names, self.loaders, strict=True):
            loader.set_state(state[name])


def _loss_fn(model: Llama, k: int) -> Callable[..., Any]:
    """Per-row token-mean losses, and each task's weighted NLL and token sums (aux)."""
    apply = lj.multi.lora_apply_mixed(model.apply)

    def loss_fn(frozen: Any, stacked: Any, batch: dict, key: jax.Array) -> Any:
        ids = batch[IDS]
        logits = apply(frozen, stacked, ids, batch["inputs"], rngs={lj.DROPOUT_RNG: key})
        nll = optax.softmax_cross_entropy_with_integer_labels(
            logits.astype(jnp.float32), batch["targets"]
        )
        w = batch["weights"].astype(jnp.float32)
        sums, counts = (nll * w).sum(axis=1), w.sum(axis=1)
        onehot = jax.nn.one_hot(ids, k, dtype=jnp.float32)  # a -1 row: all zeros
        aux = {"nll_sum": sums @ onehot, "weight": counts @ onehot}
        return sums / jnp.maximum(counts, 1.0), aux

    return loss_fn


def _new_state(s: Settings, base: Base, k: int) -> tuple[Any, lj.TrainState, Any]:
    """``(frozen, state, optimizer)``: k adapters that each start where a one-task run with
    this ``--seed`` starts, stacked, with an optimizer state per adapter."""
    key_split, key_state = jax.random.split(jax.random.key(s.seed))
    layouts = layouts_of(base.config, base.variables, s.seq_len)
    frozen, lora = lj.split(base.variables, lora_config(s), key=key_split, layouts=layouts)
    optimizer = make_optimizer(
        schedule(s.lr, steps=s.steps, warmup_steps=s.warmup_steps, min_lr_ratio=s.min_lr_ratio),
        weight_decay=s.weight_decay,
        clip_norm=s.clip_norm,
    )
    stacked = lj.multi.stack_adapters([lora] * k)
    return frozen, lj.multi.init_state(stacked, optimizer, key=key_state), optimizer


def _check_resume(run_dir: pathlib.Path, s: Settings) -> None:
    path = run_dir / RUN_FILE
    if not path.exists():
        return
    before = json.loads(path.read_text())
    now = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(s).items()}
    changed = [
        f"{k}: {before.get(k)!r} then, {now[k]!r} now"
        for k in _RESUME_FIXED
        if before.get(k) != now[k]
    ]
    if changed:
        raise UserError(
            f"--resume needs the settings the run in {run_dir} started with; changed: "
            + "; ".join(changed)
        )


@dataclasses.dataclass
class TasksResult:
    """What a multi-task run produced: the final stacked adapters (host) and the losses."""

    frozen: Any
    stacked: Any
    train_loss: dict[str, float]
    eval_loss: dict[str, float]
    tokens_per_s: float | None
    seconds: float


def _task_losses(window: list[Any], names: list[str]) -> dict[str, float]:
    sums = jax.device_get(window)
    nll = np.sum([np.asarray(w["nll_sum"]) for w in sums], axis=0)
    weight = np.sum([np.asarray(w["weight"]) for w in sums], axis=0)
    return {n: float(nll[i] / max(weight[i], 1e-9)) for i, n in enumerate(names)}


def _mean(values: dict[str, float]) -> float:
    return float(np.mean(list(values.values())))


def run_tasks(
    s: Settings, base: Base, data: list[_TaskData], strategy: Any, stream: Any
) -> TasksResult:
    """Trains one adapter per task for ``s.steps`` mixed steps (resuming if asked)."""
    run_dir = pathlib.Path(s.run_dir).absolute()
    names, k = [d.task.name for d in data], len(data)
    model = Llama(base.config)
    frozen, state, optimizer = _new_state(s, base, k)
    batches = MixedBatches(data, shares(s.batch_size, k), s.seed)
    mgr, state, position, start = open_checkpoints(
        run_dir, s, strategy, state, frozen, _check_resume
    )
    if position is not None:
        batches.set_state(position["loaders"])
    run_dir.mkdir(parents=True, exist_ok=True)
    write_run_file(run_dir, s)
    step_fn = lj.multi.make_train_step(
        _loss_fn(model, k),
        optimizer,
        adapter_ids=IDS,
        weights=COUNTS,
        strategy=strategy,
        accum_steps=s.accum_steps,
    )
    eval_fn = make_eval_fn(lora_logits_fn(model))
    frozen_placed = strategy.place_frozen(frozen)
    frozen_eval = strategy.gather(frozen_placed)
    placed = strategy.place_state(state, frozen)
    tokens_per_step = s.batch_size * s.seq_len
    train_loss: dict[str, float] = {}
    evals: dict[str, float] = {}
    window: list[Any] = []
    timed_tokens, timed_seconds = 0, 0.0
    t0 = time.perf_counter()
    with Reporter(
        run_dir, total=s.steps, start=start, progress=s.progress, desc="tasks", stream=stream
    ) as rep:
        tick = time.perf_counter()
        for step in range(start + 1, s.steps + 1):
            placed, metrics = step_fn(placed, frozen_placed, strategy.place_batch(next(batches)))
            window.append(strategy.metrics(metrics)["aux"])
            if step % s.log_every == 0 or step == s.steps:
                train_loss = _task_losses(window, names)
                now = time.perf_counter()
                if step - len(window) > start:  # the first window holds the compile
                    timed_tokens += tokens_per_step * len(window)
                    timed_seconds += now - tick
                tick = now
                lr = float(np.asarray(_schedule(s)(step)))
                tokens = tokens_per_step * len(window)
                rep.log(step, "train", loss=_mean(train_loss), lr=lr, tokens=tokens)
                for name, loss in train_loss.items():
                    rep.log(step, f"train/{name}", loss=loss)
                window = []
            if step % s.eval_every == 0 or step == s.steps:
                stacked = jax.device_get(strategy.gather(placed.lora))
                for i, d in enumerate(data):
                    lora = lj.multi.unstack_adapter(stacked, i)
                    evals[d.task.name] = eval_loss(eval_fn, (frozen_eval, lora), d.evals)
                rep.log(step, "eval", loss=_mean(evals))
                for name, loss in evals.items():
                    rep.log(step, f"eval/{name}", loss=loss)
                tick = time.perf_counter()
            if step % s.save_every == 0 or step == s.steps:
                mgr.save(
                    step,
                    placed,
                    data_position={"loaders": batches.get_state()},
                    force=step == s.steps,
                    frozen=frozen,
                )
        mgr.wait_until_finished()
    mgr.close()
    return TasksResult(
        frozen=frozen,
        stacked=jax.device_get(strategy.gather(placed.lora)),
        train_loss=train_loss,
        eval_loss=evals,
        tokens_per_s=timed_tokens / timed_seconds if timed_seconds else None,
        seconds=time.perf_counter() - t0,
    )


def _schedule(s: Settings) -> optax.Schedule:
    """The run's learning-rate schedule (for the log)."""
    return schedule(s.lr, steps=s.steps, warmup_steps=s.warmup_steps, min_lr_ratio=s.min_lr_ratio)


def finetune_tasks(s: Settings, out: TextIO, load_base: Callable[..., Base]) -> dict[str, Any]:
    """``python -m train finetune --task NAME=DATA ...``: one adapter per task, one run.

    Args:
        s: the settings (``s.task`` non-empty).
        out: where the log and the report go.
        load_base: ``load_base(s, out) -> Base`` (pretrains the built-in base once).

    Returns:
        The report (also written to ``summary.json``).

    Raises:
        UserError: bad ``--task`` flags, a task whose data gives no examples (named),
            settings a multi-task run refuses, or a run folder with checkpoints and no
            ``--resume``.
    """
    t_start = time.perf_counter()
    tasks = parse_tasks(s.task)
    _check_settings(s, len(tasks))
    rows = shares(s.batch_size, len(tasks))
    strategy = make_strategy(s)
    base = load_base(s, out)
    corpora.check_seq_len(s, base)
    data = [_load_task(s, t, n, base) for t, n in zip(tasks, rows, strict=True)]
    prompts = s.prompt * len(tasks) if len(s.prompt) == 1 else s.prompt
    sample_rows = [Row(BASE, s.prompt[0], -1)]
    sample_rows += [Row(t.name, p, i) for i, (t, p) in enumerate(zip(tasks, prompts, strict=True))]
    check_lengths(s, base, sample_rows)  # fails now, not after training
    base_fn = make_eval_fn(Llama(base.config).apply)
    base_loss = {d.task.name: eval_loss(base_fn, base.variables, d.evals) for d in data}
    result = run_tasks(s, base, data, strategy, out)
    run_dir = pathlib.Path(s.run_dir).absolute()
    (run_dir / ADAPTERS).mkdir(exist_ok=True)
    for i, task in enumerate(tasks):
        lora = lj.multi.unstack_adapter(result.stacked, i)
        lj.save_adapter(run_dir / ADAPTERS / task.name, lora, overwrite=True, frozen=base.variables)
    texts = generate_rows(s, base, result.stacked, sample_rows)
    report: dict[str, Any] = {
        "tasks": {
            d.task.name: {
                "data": list(d.task.data),
                "rows_per_batch": n,
                "base_eval_loss": base_loss[d.task.name],
                "lora_eval_loss": result.eval_loss.get(d.task.name),
                "lora_train_loss": result.train_loss.get(d.task.name),
            }
            for d, n in zip(data, rows, strict=True)
        },
        "tokens_per_s": result.tokens_per_s,
        "train_seconds": result.seconds,
        "samples": [{"adapter": r.name, "prompt": r.prompt, "text": t} for r, t in texts],
        "seconds": time.perf_counter() - t_start,
    }
    plot_losses(read_metrics(run_dir), run_dir / PLOT_FILE, title="multi-task LoRA fine-tuning")
    (run_dir / SUMMARY_FILE).write_text(json.dumps(report, indent=2) + "\n")
    print(_format_report(s, base, report, run_dir), file=out)
    return report


def _format_report(s: Settings, base: Base, r: dict[str, Any], run_dir: pathlib.Path) -> str:
    lines = [
        "",
        f"Run folder        {run_dir}  (metrics.jsonl, loss.png, {ADAPTERS}/<task>/, "
        f"{SUMMARY_FILE})",
        f"Base              {base.source}",
        f"Adapters          one per task, rank {s.rank} on {s.targets}, trained together "
        f"(batch {s.batch_size}: rows per task "
        + ", ".join(f"{n} {t['rows_per_batch']}" for n, t in r["tasks"].items())
        + ")",
        "Eval loss         (nats/token on each task's held-out split)",
    ]
    for name, t in r["tasks"].items():
        lines.append(
            f"  {name + ':':<16}base {t['base_eval_loss']:.3f} -> LoRA {t['lora_eval_loss']:.3f}"
            f"  (train {t['lora_train_loss']:.3f}; data {' '.join(t['data'])})"
        )
    lines += [
        f"Tokens/s          {r['tokens_per_s'] or 0:,.0f}",
        f"Time              {r['seconds']:.0f} s in all, training {r['train_seconds']:.0f} s",
        "Samples           (one batch, each prompt with its task's adapter)",
    ]
    lines += [f"  {x['adapter'] + ':':<9}{x['prompt'] + x['text']!r}" for x in r["samples"]]
    return "\n".join(lines)
