"""What a run records as it goes: metrics as JSON lines, TensorBoard events and PNG plots of the curves."""

from __future__ import annotations

import json
import math
import sys
from functools import partial
from pathlib import Path
from typing import Any

METRICS = "metrics.jsonl"


class RunLog:
    """Appends metric records to metrics.jsonl and TensorBoard; draws plots from metrics.jsonl.

    On resume, records after the checkpoint's step (written by the interrupted process) are dropped from
    metrics.jsonl and TensorBoard is told to purge them, so the log reads as one uninterrupted run.
    """

    def __init__(self, run_dir: Path, *, resume_step: int | None = None):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / METRICS
        if resume_step is not None:
            self._truncate_after(resume_step)
        self.tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=resume_step)
        except ImportError:
            print("note: tensorboard is not installed, so no TensorBoard events are written "
                  "(pip install 'polyattn[log]').", file=sys.stderr)

    def log(self, kind: str, step: int, values: dict[str, Any]) -> None:
        record = {"kind": kind, "step": step, **values}
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as err:
            from ..files import write_error

            raise write_error(self.path, err) from err
        if self.tb is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                    self.tb.add_scalar(f"{kind}/{key}", value, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()

    def _truncate_after(self, step: int) -> None:
        from ..files import atomic_write_text

        kept = [r for r in read_metrics(self.run_dir) if r["step"] <= step]
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / METRICS
    if not path.is_file():
        return []
    records, damaged = [], 0
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            damaged += 1  # a line cut short by a killed process, or damaged on disk: the other lines still count
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and "kind" in record:
            records.append(record)
        else:
            damaged += 1
    if damaged:
        print(f"note: skipped {damaged} unreadable line(s) of {path}.", file=sys.stderr)
    return records


NOT_PLOTTED = ("kind", "step", "epoch", "count")
"""Record fields that are not curves (`count` is the number of evaluated samples, the same at every point)."""
KIND_COLORS = {"train": "tab:blue", "val": "tab:orange", "test": "tab:green"}
OWN_FIGURE = ("lr", "grad_norm", "soft_mask_a")
"""Training values drawn alone: they have no evaluation counterpart (throughput, `*_per_s`, too)."""


def curves(records: list[dict[str, Any]]) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """`{metric: {kind: [(step, value), ...]}}` of every numeric field of every record but the run's header,
    where kind is 'train' or the evaluated split ('val', 'test'). A kind logged twice at one step (the last
    epoch's evaluation and the final one, both on the test split) keeps one point."""
    out: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for r in records:
        if r.get("kind") == "run":
            continue
        for key, value in r.items():
            if key in NOT_PLOTTED or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            points = out.setdefault(key, {}).setdefault(r["kind"], [])
            if points and points[-1][0] == r["step"]:
                points.pop()
            points.append((r["step"], value))
    return out


def write_plots(run_dir: Path) -> list[Path]:
    """The run's curves as PNGs in `plots/`: one figure per metric with its training curve and every evaluated
    split on it (`loss.png`: train, val and test), the learning rate, gradient norm and throughput each on their
    own, and `overview.png` with all of them. A metric logged once is a single marked point."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    from ..files import atomic_save

    series = curves(read_metrics(run_dir))
    if not series:
        return []
    order = sorted(series, key=lambda k: (k != "loss", k in OWN_FIGURE or k.endswith("_per_s"), k))
    out_dir = Path(run_dir) / "plots"
    written = []

    def draw(ax, key: str) -> None:
        for kind, points in sorted(series[key].items(), key=lambda kv: kv[0] != "train"):
            steps, values = zip(*points)
            ax.plot(steps, values, label=kind, color=KIND_COLORS.get(kind), marker="o" if len(points) < 30 else None,
                    markersize=4 if kind == "train" else 6, linewidth=1 if kind == "train" else 1.5)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(key)
        ax.set_title(key.replace("_per_s", "/s"), fontsize=10)
        if key == "lr":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
        ax.grid(alpha=0.3)
        if len(series[key]) > 1 or key not in OWN_FIGURE:
            ax.legend(fontsize=8)

    def save(fig, name: str) -> None:
        path = out_dir / name
        fig.tight_layout()
        atomic_save(path, partial(fig.savefig, format="png"))
        plt.close(fig)
        written.append(path)

    for key in order:
        fig, ax = plt.subplots(figsize=(5, 3.4), dpi=100)
        draw(ax, key)
        save(fig, f"{key}.png")
    cols = min(3, len(order))
    rows = -(-len(order) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.4 * cols, 3.2 * rows), dpi=90, squeeze=False)
    for ax, key in zip(axes.flat, order):
        draw(ax, key)
    for ax in list(axes.flat)[len(order):]:
        ax.axis("off")
    fig.suptitle(Path(run_dir).name, fontsize=11)
    save(fig, "overview.png")
    return written


def format_table(rows: list[tuple[str, str]], title: str) -> str:
    """A two-column plain-text table for the end-of-run summary."""
    width = max(len(k) for k, _ in rows)
    value_width = max(len(v) for _, v in rows)
    line = "-" * (width + value_width + 5)
    body = "\n".join(f"  {k:<{width}}   {v}" for k, v in rows)
    return f"{title}\n{line}\n{body}\n{line}"
