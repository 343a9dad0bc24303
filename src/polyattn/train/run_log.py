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
            from .checkpoint import write_error

            raise write_error(self.path, err) from err
        if self.tb is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                    self.tb.add_scalar(f"{kind}/{key}", value, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()

    def _truncate_after(self, step: int) -> None:
        from .checkpoint import atomic_write_text

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


def write_plots(run_dir: Path) -> list[Path]:
    """One PNG per metric that was logged more than once: training curves and evaluation curves."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    from .checkpoint import _atomic_write

    records = read_metrics(run_dir)
    series: dict[tuple[str, str], list[tuple[int, float]]] = {}
    for r in records:
        for key, value in r.items():
            if key in ("kind", "step", "epoch") or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            series.setdefault((r["kind"], key), []).append((r["step"], value))
    out_dir = Path(run_dir) / "plots"
    written = []
    for (kind, key), points in sorted(series.items()):
        if len(points) < 2:
            continue
        steps, values = zip(*points)
        fig, ax = plt.subplots(figsize=(5, 3.2), dpi=100)
        ax.plot(steps, values, marker="." if len(points) < 50 else None)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(key)
        ax.set_title(f"{kind}: {key}")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = out_dir / f"{kind}_{key}.png"
        _atomic_write(path, partial(fig.savefig, format="png"))
        plt.close(fig)
        written.append(path)
    return written


def format_table(rows: list[tuple[str, str]], title: str) -> str:
    """A two-column plain-text table for the end-of-run summary."""
    width = max(len(k) for k, _ in rows)
    value_width = max(len(v) for _, v in rows)
    line = "-" * (width + value_width + 5)
    body = "\n".join(f"  {k:<{width}}   {v}" for k, v in rows)
    return f"{title}\n{line}\n{body}\n{line}"
