"""What a run shows and leaves behind: a progress bar, ``metrics.jsonl`` and ``loss.png``.

Only process 0 of a multi-process run writes or prints (the others get a silent `Reporter`).
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import sys
import time
from collections.abc import Iterable
from typing import Any

__all__ = ["METRICS_FILE", "PLOT_FILE", "Reporter", "plot_losses", "read_metrics"]

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"


class Reporter:
    """Progress bar (tqdm, with loss, tokens/s and ETA) and a ``metrics.jsonl`` log.

    Each call to `log` appends one JSON line ``{"step": ..., "split": "train", ...}`` so a
    run can be plotted or compared later (`read_metrics`); resuming appends to the same file.
    Without a terminal (or with ``progress=False``) a plain line is printed every
    `log` call instead of a bar.

    Example:
        >>> import tempfile
        >>> d = tempfile.mkdtemp()
        >>> with Reporter(d, total=2, start=0, progress=False, desc="demo", stream=None) as r:
        ...     r.log(1, "train", loss=2.5, tokens=64)
        >>> read_metrics(d)[0]["loss"]
        2.5
    """

    def __init__(
        self,
        run_dir: str | os.PathLike | None,
        *,
        total: int,
        start: int,
        progress: bool = True,
        desc: str = "",
        stream: Any = sys.stderr,
        enabled: bool = True,
    ) -> None:
        """Opens the log (appending) and the bar.

        Args:
            run_dir: folder of ``metrics.jsonl``; None writes no file.
            total: the last step of the run.
            start: the step the run starts from (above 0 when resuming).
            progress: show a tqdm bar when the stream is a terminal.
            desc: the bar's label.
            stream: where bar and lines go; None prints nothing.
            enabled: False makes a silent reporter (processes other than 0).
        """
        self.enabled = enabled
        self.stream = stream if enabled else None
        self.file = None
        if enabled and run_dir is not None:
            path = pathlib.Path(run_dir) / METRICS_FILE
            path.parent.mkdir(parents=True, exist_ok=True)
            self.file = path.open("a")
        tty = self.stream is not None and getattr(self.stream, "isatty", lambda: False)()
        self.bar = None
        if progress and tty:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=start, desc=desc, file=self.stream, unit="step")
        self.desc = desc
        self.total = total
        self.last_time = time.perf_counter()
        self.start_time = self.last_time
        self.tokens = 0

    def log(self, step: int, split: str, **values: float) -> None:
        """Records metrics of one step (and advances the bar for ``"train"``).

        Args:
            step: the step the values belong to.
            split: ``"train"``, ``"eval"`` or any label.
            **values: numbers; ``tokens`` (tokens seen since the last train log) sets
                the tokens/s figure.
        """
        if not self.enabled:
            return
        record: dict[str, Any] = {"step": step, "split": split, "time": round(time.time(), 3)}
        now = time.perf_counter()
        if split == "train" and "tokens" in values:
            record["tokens_per_s"] = round(values["tokens"] / max(now - self.last_time, 1e-9), 1)
            self.last_time = now
        record.update({k: _plain(v) for k, v in values.items()})
        if self.file is not None:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        self._show(step, split, record)

    def _show(self, step: int, split: str, record: dict[str, Any]) -> None:
        shown = {k: v for k, v in record.items() if k in ("loss", "lr", "tokens_per_s")}
        text = " ".join(f"{k}={_fmt(v)}" for k, v in shown.items())
        if self.bar is not None:
            if split == "train":
                self.bar.update(step - self.bar.n)
                self.bar.set_postfix_str(text)
            else:
                self.bar.write(f"step {step} {split}: {text}")
        elif self.stream is not None:
            print(f"{self.desc} step {step}/{self.total} {split}: {text}", file=self.stream)

    def write(self, text: str) -> None:
        """Prints a line without breaking the bar."""
        if self.bar is not None:
            self.bar.write(text)
        elif self.stream is not None:
            print(text, file=self.stream)

    def close(self) -> None:
        """Closes the bar and the log file."""
        if self.bar is not None:
            self.bar.close()
        if self.file is not None:
            self.file.close()

    def __enter__(self) -> Reporter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _plain(v: Any) -> Any:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return v
    return int(f) if isinstance(v, int) else (f if math.isfinite(f) else str(f))


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.0f}"
    return str(v)


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Reads a run's ``metrics.jsonl`` (an empty list when there is none).

    Args:
        run_dir: the run folder.

    Returns:
        The records in the order they were written.

    Example:
        >>> import tempfile
        >>> read_metrics(tempfile.mkdtemp())
        []
    """
    path = pathlib.Path(run_dir) / METRICS_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_losses(
    records: Iterable[dict[str, Any]],
    path: str | os.PathLike,
    *,
    title: str = "",
    references: dict[str, float] | None = None,
) -> pathlib.Path:
    """Plots train and eval loss against the step into a PNG file.

    Args:
        records: metric records (`read_metrics`); those with a ``loss`` are plotted by split.
        path: the PNG file to write.
        title: the plot's title.
        references: horizontal lines to draw, label -> loss (e.g. the base model's).

    Returns:
        The path written.

    Example:
        >>> import tempfile, pathlib
        >>> out = pathlib.Path(tempfile.mkdtemp()) / "loss.png"
        >>> recs = [{"step": 1, "split": "train", "loss": 3.0},
        ...         {"step": 2, "split": "eval", "loss": 2.0}]
        >>> plot_losses(recs, out).exists()
        True
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_split: dict[str, list[tuple[int, float]]] = {}
    for r in records:
        if isinstance(r.get("loss"), float | int):
            by_split.setdefault(r["split"], []).append((r["step"], float(r["loss"])))
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for split, points in sorted(by_split.items()):
        points.sort()
        xs, ys = zip(*points, strict=True)
        ax.plot(xs, ys, marker="o" if split != "train" else None, label=f"{split} loss")
    for (label, value), style in zip((references or {}).items(), ("--", ":", "-."), strict=False):
        ax.axhline(value, linestyle=style, color="gray", linewidth=1, label=f"{label}: {value:.3f}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = pathlib.Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out
