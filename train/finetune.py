"""The LoRA fine-tuning loop: split the base, train adapters with any strategy, evaluate,
checkpoint (and resume exactly), and save the final adapter.

Everything LoRA-specific goes through the public `lora_jax` API: `split`, `lora_apply`,
`make_train_step`, `TrainState`, `CheckpointManager`, `save_adapter`.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import time
from typing import Any

import jax
import numpy as np

import lora_jax as lj
from train.base import Base, layouts_of
from train.data import make_loader
from train.evaluation import eval_loss, make_eval_fn
from train.losses import make_optimizer, schedule, token_nll
from train.models import Llama
from train.placement import restore_target
from train.report import Reporter
from train.settings import Settings, UserError

__all__ = ["LoraResult", "lora_config", "lora_logits_fn", "run_lora"]

CHECKPOINTS = "checkpoints"
ADAPTER = "adapter"
RUN_FILE = "run.json"
# Settings that must not change when a run is resumed (steps may grow).
_RESUME_FIXED = (
    "base",
    "data",
    "seq_len",
    "batch_size",
    "seed",
    "rank",
    "alpha",
    "targets",
    "dora",
    "lora_bias",
    "quantize",
    "quantize_group",
)
# What a run recorded before a setting existed ran with its default.
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(Settings)}


@dataclasses.dataclass
class LoraResult:
    """What a LoRA run produced (host arrays; the adapters carry their own scales)."""

    frozen: Any
    lora: Any
    summary: lj.core.Summary
    steps: int
    eval_loss: float | None
    train_loss: float | None
    tokens_per_s: float | None
    seconds: float


def lora_config(s: Settings) -> lj.LoraConfig:
    """The `lj.LoraConfig` of the run settings (used only to create the adapters).

    Example:
        >>> lora_config(Settings(rank=4, alpha=8.0)).rank
        4
    """
    return lj.LoraConfig(
        rank=s.rank,
        alpha=s.alpha,
        targets=s.targets,
        dropout=s.dropout,
        use_rslora=s.rslora,
        use_dora=s.dora,
        lora_bias=s.lora_bias,
    )


def lora_logits_fn(model: Llama) -> Any:
    """``fn((frozen, lora), ids) -> logits``, for evaluation (no dropout)."""
    apply = lj.lora_apply(model.apply, deterministic=True)
    return lambda params, ids: apply(params[0], params[1], ids)


def _loss_fn(model: Llama) -> Any:
    apply = lj.lora_apply(model.apply)

    def loss_fn(frozen: Any, lora: Any, batch: dict, key: jax.Array) -> Any:
        logits = apply(frozen, lora, batch["inputs"], rngs={lj.DROPOUT_RNG: key})
        out = token_nll(logits, batch)
        return out["loss"], {"nll_sum": out["nll_sum"], "weight": out["weight"]}

    return loss_fn


def new_state(s: Settings, base: Base) -> tuple[tuple[Any, Any], lj.TrainState, Any]:
    """``((frozen, lora), state, optimizer)`` of a fresh run (also the restore target)."""
    config = lora_config(s)
    key_split, key_state = jax.random.split(jax.random.key(s.seed))
    layouts = layouts_of(base.config, base.variables, s.seq_len)
    frozen, lora = lj.split(base.variables, config, key=key_split, layouts=layouts)
    optimizer = make_optimizer(
        schedule(s.lr, steps=s.steps, warmup_steps=s.warmup_steps, min_lr_ratio=s.min_lr_ratio),
        weight_decay=s.weight_decay,
        clip_norm=s.clip_norm,
    )
    return (frozen, lora), lj.TrainState.create(lora, optimizer, key=key_state), optimizer


def _check_resume(run_dir: pathlib.Path, s: Settings) -> None:
    path = run_dir / RUN_FILE
    if not path.exists():
        return
    before = json.loads(path.read_text())
    changed = [
        f"{k}: {before.get(k, _DEFAULTS[k])!r} then, {_jsonable(getattr(s, k))!r} now"
        for k in _RESUME_FIXED
        if before.get(k, _DEFAULTS[k]) != _jsonable(getattr(s, k))
    ]
    if changed:
        raise UserError(
            f"--resume needs the settings the run in {run_dir} started with; changed: "
            + "; ".join(changed)
        )


def _jsonable(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else v


def write_run_file(run_dir: pathlib.Path, s: Settings) -> None:
    """Records the settings of a run in ``run.json`` (read back by eval/sample/export)."""
    record = {k: _jsonable(v) for k, v in dataclasses.asdict(s).items()}
    (run_dir / RUN_FILE).write_text(json.dumps(record, indent=2) + "\n")


def open_checkpoints(
    run_dir: pathlib.Path,
    s: Settings,
    strategy: lj.parallel.Strategy,
    state: Any,
    frozen: Any,
    check_resume: Any = None,
) -> tuple[lj.CheckpointManager, Any, dict[str, Any] | None, int]:
    """The run's checkpoint manager and where training starts: ``(mgr, state, None, 0)``
    for a new run, or, under ``--resume``, the latest checkpoint restored in `state`'s
    placement with the data position saved beside it and its step.

    Args:
        run_dir: the run folder.
        s: the run settings (``keep``, ``save_every``, ``resume``).
        strategy: where the step runs (the restored state is placed for it).
        state: the fresh state (the restore target's structure).
        frozen: the base (checked against the checkpoint's fingerprint).
        check_resume: ``check_resume(run_dir, s)`` refuses changed settings on resume;
            None: this module's check of a single-adapter run.

    Raises:
        UserError: the run folder holds checkpoints and ``--resume`` was not given.
    """
    mgr = lj.CheckpointManager(
        run_dir / CHECKPOINTS, max_to_keep=s.keep, save_interval_steps=s.save_every
    )
    latest = mgr.latest_step()
    if latest is not None and not s.resume:
        mgr.close()
        raise UserError(
            f"{run_dir} already holds checkpoints (latest step {latest}). Pass --resume to "
            "continue that run, or choose another --run-dir; nothing was changed."
        )
    if latest is None:
        return mgr, state, None, 0
    (check_resume or _check_resume)(run_dir, s)
    target = restore_target(strategy, state, frozen)
    state, position = mgr.restore(target, frozen=frozen, strict=True)
    return mgr, state, position, int(state.step)


def run_lora(
    s: Settings,
    base: Base,
    train_packed: Any,
    eval_sets: list[dict[str, Any]],
    strategy: lj.parallel.Strategy,
    reporter_stream: Any,
) -> LoraResult:
    """Trains LoRA adapters on the base for ``s.steps`` steps (resuming if asked).

    Args:
        s: the run settings.
        base: the frozen base model.
        train_packed: packed training windows (`train.data.pack_documents`).
        eval_sets: fixed evaluation batches (numpy) for the eval loss.
        strategy: where the step runs (`train.placement.make_strategy`).
        reporter_stream: where the progress bar goes (None: silent).

    Returns:
        The `LoraResult`.

    Raises:
        UserError: checkpoints in the run folder without ``--resume``, or changed settings
            on resume.
    """
    run_dir = pathlib.Path(s.run_dir).absolute()
    model = Llama(base.config)
    (frozen, _), state, optimizer = new_state(s, base)
    loader = make_loader(
        train_packed,
        batch_size=s.batch_size // jax.process_count(),
        seed=s.seed,
        shard_index=jax.process_index(),
        shard_count=jax.process_count(),
    )
    main = jax.process_index() == 0
    mgr, state, position, start = open_checkpoints(run_dir, s, strategy, state, frozen)
    if position is not None:
        loader.set_state(position["loader"])
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_run_file(run_dir, s)

    step_fn = lj.make_train_step(
        _loss_fn(model),
        optimizer,
        strategy=strategy,
        accum_steps=s.accum_steps,
    )
    eval_fn = make_eval_fn(lora_logits_fn(model))
    frozen_placed = strategy.place_frozen(frozen)
    frozen_eval = strategy.gather(frozen_placed)
    placed = strategy.place_state(state, frozen)
    tokens_per_step = s.batch_size * s.seq_len
    last_eval: float | None = None
    last_train: float | None = None
    window: list[Any] = []
    timed_tokens, timed_seconds = 0, 0.0
    t0 = time.perf_counter()
    with Reporter(
        run_dir,
        total=s.steps,
        start=start,
        progress=s.progress,
        desc="lora",
        stream=reporter_stream,
        enabled=main,
    ) as rep:
        tick = time.perf_counter()
        for step in range(start + 1, s.steps + 1):
            batch = strategy.place_batch(next(loader))
            placed, metrics = step_fn(placed, frozen_placed, batch)
            window.append(strategy.metrics(metrics)["aux"])
            if step % s.log_every == 0 or step == s.steps:
                sums = jax.device_get(window)
                loss = sum(float(w["nll_sum"]) for w in sums) / max(
                    sum(float(w["weight"]) for w in sums), 1e-9
                )
                now = time.perf_counter()
                if step - len(window) > start:  # the first window holds the compile
                    timed_tokens += tokens_per_step * len(window)
                    timed_seconds += now - tick
                tick = now
                last_train = loss
                lr = optimizer_lr(s, step)
                rep.log(step, "train", loss=loss, lr=lr, tokens=tokens_per_step * len(window))
                window = []
            if step % s.eval_every == 0 or step == s.steps:
                lora_now = jax.device_get(strategy.gather(placed.lora))
                last_eval = eval_loss(eval_fn, (frozen_eval, lora_now), eval_sets)
                rep.log(step, "eval", loss=last_eval)
                tick = time.perf_counter()
            if step % s.save_every == 0 or step == s.steps:
                mgr.save(
                    step,
                    placed,  # a pmap state is saved as one copy
                    data_position={"loader": loader.get_state()},
                    force=step == s.steps,
                    frozen=frozen,
                )
        mgr.wait_until_finished()
    mgr.close()
    final_lora = jax.device_get(strategy.gather(placed.lora))
    return LoraResult(
        frozen=frozen,
        lora=final_lora,
        summary=lj.summary(frozen, final_lora),
        steps=s.steps,
        eval_loss=last_eval,
        train_loss=last_train,
        tokens_per_s=timed_tokens / timed_seconds if timed_seconds else None,
        seconds=time.perf_counter() - t0,
    )


def optimizer_lr(s: Settings, step: int) -> float:
    """The learning rate the schedule gives at `step` (for the log)."""
    f = schedule(s.lr, steps=s.steps, warmup_steps=s.warmup_steps, min_lr_ratio=s.min_lr_ratio)
    return float(np.asarray(f(step)))
