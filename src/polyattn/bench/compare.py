"""Side-by-side comparisons of models trained with one recipe and one training budget, saved row by row.

A suite (`configs/compare/<suite>.yaml`) names a base recipe, the budget in seconds and the rows: a model and the
overrides that make it that row. Each row is trained for the number of optimizer steps it completes in the budget
on this machine: a short calibration run measures the row's training throughput first (`calibration.json` keeps
every measurement and the best one taken on this CPU is used, so a calibration taken while the machine was busy can
be redone, and one taken on another CPU is never used: the row is calibrated again), and
the run then trains for `budget × samples/s / batch size` steps with its schedule spanning exactly those steps.
Results are therefore repeatable and unaffected by other work on the machine while the run trains.

A suite with `steps: N` in place of `budget_s` compares step for step: every row trains exactly N optimizer
steps (or its own `steps:`, e.g. rows at several counts with `x` the count), with no calibration, and its
throughput is the one its run measured.

Each finished row is written at once to `<results>/<suite>/<row>.json` (its summary, config, calibration,
training-loss curve and machine); `--table` rebuilds the Markdown table, `table.png` and `train_loss.png` (every
row's training loss against the step) from those files alone.

A row with `evaluates: ROW` trains nothing: it scores the weights of the earlier row ROW with its own overrides
as evaluation-time settings (e.g. `model.s2_at_inference=true`), so one suite reports one training evaluated two
ways. Rows that vary a length carry `group:` (the model) and `x:` (its window or token count); the suite then
also draws `curves.png`, the table's first column and the training throughput against x, one line per group.

    polyattn bench compare vision                     train every row that has no result yet
    polyattn bench compare vision --rows vit lightnet train these rows (again, with --force)
    polyattn bench compare vision --calibrate         only (re)measure throughput, keeping the best per row
    polyattn bench compare vision --table             print the table from the saved results
    polyattn bench compare lm --rescore               re-evaluate finished rows with the suite's current settings
    polyattn bench compare lm --table --readme README.md   also refill the README's <!-- table:lm --> block
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import UserError
from ..files import atomic_write_text
from ..hardware import PRECISIONS, environment, resolve_device
from ..train.config import RECIPE_DIRS, build_config, load_yaml
from ..train.run_log import read_metrics
from .common import bench_header, median

CALIBRATION = "calibration.json"


@dataclass
class Row:
    name: str
    label: str
    overrides: list[str] = field(default_factory=list)
    group: str | None = None
    """The model this row is one point of, in a suite whose rows vary a length (`curves.png`: one line each)."""
    x: float | None = None
    """Where the row lies on that length axis (its window length or token count)."""
    evaluates: str | None = None
    """The earlier row whose trained weights this row scores, its `overrides` being evaluation-time settings."""
    steps: int | None = None
    """In a suite of `steps`, this row's own step count (e.g. rows at several counts, with `x` the count)."""


@dataclass
class Suite:
    name: str
    title: str
    recipe: str
    budget_s: float | None
    """The wall-clock budget of every row, turned into a step count by calibration; None in a suite of `steps`."""
    overrides: list[str]
    rows: list[Row]
    columns: list[list[str]]
    """Table columns after the row label: [header, dotted path into the result JSON, format, optional scale]."""
    calibration_steps: int = 30
    measure: str | None = None
    """Measures taken on each finished run besides its training summary: None, "generation" (LM decoding
    speed, see polyattn.bench.generation_speed) or "sample_quality" (diffusion samples measured by a classifier,
    see polyattn.bench.sample_quality), with `measure_args`."""
    measure_args: dict[str, Any] = field(default_factory=dict)
    x_label: str = "x"
    """The axis of the rows' `x` in `curves.png` (e.g. "window (tokens)")."""
    steps: int | None = None
    """A step-for-step suite: every row trains exactly this many optimizer steps, whatever its speed (no
    calibration; its throughput is the one its run measured); `budget_s` is then None."""

    def row(self, name: str) -> Row:
        return next(r for r in self.rows if r.name == name)


def suite_path(name: str) -> Path:
    for folder in RECIPE_DIRS:
        path = folder / "compare" / f"{name}.yaml"
        if path.is_file():
            return path
    known = sorted({p.stem for folder in RECIPE_DIRS for p in (folder / "compare").glob("*.yaml")})
    raise UserError(f"There is no comparison suite '{name}'; the suites are: {', '.join(known) or 'none'}.")


def load_suite(name: str) -> Suite:
    raw = load_yaml(suite_path(name))
    rows = [Row(r["name"], r.get("label", r["name"]), list(r.get("overrides", [])), r.get("group"), r.get("x"),
                r.get("evaluates"), r.get("steps")) for r in raw["rows"]]
    check_rows(name, rows)
    if ("budget_s" in raw) == ("steps" in raw):
        raise UserError(f"Suite '{name}' needs exactly one of budget_s (a wall-clock budget per row) and steps (the "
                        f"same number of optimizer steps for every row).")
    steps = raw.get("steps")
    for where, value in [(f"Suite '{name}'", steps), *((f"Suite '{name}', row '{r.name}'", r.steps) for r in rows)]:
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise UserError(f"{where}: steps must be a positive whole number of optimizer steps, got {value!r}.")
    if steps is None and any(r.steps is not None for r in rows):
        raise UserError(f"Suite '{name}' has a time budget; a row's own steps belong in a suite of steps (steps: N "
                        f"in place of budget_s).")
    return Suite(name=name, title=raw["title"], recipe=raw["recipe"],
                 budget_s=None if steps is not None else float(raw["budget_s"]),
                 overrides=list(raw.get("overrides", [])), rows=rows, columns=raw["columns"],
                 calibration_steps=int(raw.get("calibration_steps", 30)), measure=raw.get("measure"),
                 measure_args=dict(raw.get("measure_args", {})), x_label=str(raw.get("x_label", "x")), steps=steps)


def check_rows(suite: str, rows: list[Row]) -> None:
    """One sentence for a suite file whose rows cannot be run or plotted: a repeated name, `group` without `x`
    (or the reverse), an `x` that is not a positive number, an `evaluates` that names no earlier trained row."""
    seen: dict[str, Row] = {}
    for row in rows:
        where = f"Suite '{suite}', row '{row.name}'"
        if row.name in seen:
            raise UserError(f"{where}: the name is used twice; give every row its own name.")
        if (row.group is None) != (row.x is None):
            raise UserError(f"{where} has only one of group and x; give both (the model and its length) or neither.")
        if row.x is not None and (isinstance(row.x, bool) or not isinstance(row.x, (int, float)) or row.x <= 0):
            raise UserError(f"{where}: x must be a positive number (a window length or token count), got {row.x!r}.")
        source = seen.get(row.evaluates) if row.evaluates is not None else None
        if row.evaluates is not None and (source is None or source.evaluates is not None):
            raise UserError(f"{where} evaluates '{row.evaluates}', which is not a row trained earlier in the suite; "
                            f"name a training row above it.")
        seen[row.name] = row


def row_config(suite: Suite, row: Row, *extra: str):
    """The run config of a row; a row that `evaluates` another is that row's config with its own overrides."""
    trained = [] if row.evaluates is None else suite.row(row.evaluates).overrides
    return build_config(suite.recipe, [*suite.overrides, *trained, *row.overrides, "train.progress=false", *extra])


def _throughput_key(summary: dict[str, Any]) -> str:
    return next(k for k in summary if k.startswith("train_") and k.endswith("_per_s"))


def row_device(suite: Suite, row: Row) -> torch.device:
    """The device the row trains on (its config's `train.device`, e.g. from `--device`), whose name and thread
    count its calibration and result record."""
    return resolve_device(row_config(suite, row).train.device)


def best_here(entry: dict[str, Any], device: torch.device | None = None) -> float | None:
    """The best throughput of a row's calibration entry measured on this machine's `device` (same CPU or GPU name,
    ISA level and thread count; the CPU when `device` is None), or None: a step budget is only fair when it was
    measured where the row trains."""
    here = environment(device or torch.device("cpu"))
    values = [m["value"] for m in entry.get("measurements", [])
              if all(m.get(key) == here[key] for key in ("device_name", "threads"))]
    return max(values) if values else None


def calibrate(suite: Suite, row: Row, results: Path) -> dict[str, Any]:
    """Measures the row's training throughput and records it; returns the row's calibration record: `unit`
    (samples or tokens), `per_step` (units per optimizer step), `best` (units/s on this machine) and every
    measurement (on any machine)."""
    from ..train.loop import train

    if suite.steps is not None:
        raise UserError(f"Suite '{suite.name}' trains every row for {suite.steps} steps, not for a time budget; it "
                        f"has nothing to calibrate.")
    path = results / CALIBRATION
    warmup = 5  # first steps pay one-off costs (allocator growth, first calls); they are not timed
    with tempfile.TemporaryDirectory(prefix="polyattn-calibrate-") as tmp:
        config = row_config(suite, row, f"train.out_dir={tmp}", "train.run_name=c", "train.log_every=1",
                            f"train.max_steps={warmup + suite.calibration_steps}")
        summary = train(config, evaluate=False)
        records = [r for r in read_metrics(Path(tmp) / "c") if r["kind"] == "train"]
    key = _throughput_key(summary)
    # The log holds the cumulative throughput after every step; the units per step are fixed, so the time of
    # step k is units_k / throughput_k − units_{k−1} / throughput_{k−1}.
    per_step = summary[key] * summary["train_time_s"] / summary["steps"]
    elapsed = [r["step"] * per_step / r[key[6:]] for r in records]
    step_times = [b - a for a, b in zip(elapsed[warmup - 1:], elapsed[warmup:], strict=False)]
    value = per_step / median(step_times)
    # read only now: another process training rows of this suite may have recorded a calibration meanwhile
    record = json.loads(path.read_text()) if path.is_file() else {}
    entry = record.setdefault(row.name, {"unit": key[6:-6], "measurements": []})
    entry["per_step"] = round(per_step)
    device = row_device(suite, row)
    entry["measurements"].append({**bench_header(device), "value": value})
    entry["best"] = best_here(entry, device)
    results.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(record, indent=2) + "\n")
    print(f"calibration {suite.name}/{row.name}: {value:.1f} {entry['unit']}/s (best {entry['best']:.1f})")
    return entry


def run_row(suite: Suite, row: Row, results: Path, runs: Path, *, extra_measures=None,
            threads: int | None = None) -> dict[str, Any]:
    """Trains one row for its calibrated step budget and saves its result. `threads` sets the CPU threads of the
    training run only (two rows can then train side by side); the budget is the calibrated one either way."""
    from ..train.loop import train

    device = row_device(suite, row)
    if suite.steps is not None:
        steps, throughput = row.steps or suite.steps, None
        budget = f"{steps} steps"
    else:
        calibration = results / CALIBRATION
        record = json.loads(calibration.read_text()) if calibration.is_file() else {}
        throughput = None if row.name not in record else best_here(record[row.name], device)
        if throughput is None:
            entry = calibrate(suite, row, results)
            throughput = entry["best"]
        else:
            entry = record[row.name]
        steps = max(1, math.floor(suite.budget_s * throughput / entry["per_step"]))
        budget = f"{steps} steps ({suite.budget_s:.0f} s at {throughput:.1f}/s)"
    run_dir = runs / suite.name / row.name
    if run_dir.exists():
        shutil.rmtree(run_dir)  # a row is retrained from scratch: an interrupted earlier attempt is discarded
    config = row_config(suite, row, f"train.steps={steps}", f"train.out_dir={runs / suite.name}",
                        f"train.run_name={row.name}", *([f"train.threads={threads}"] if threads else []))
    print(f"{suite.name}/{row.name}: {budget}")
    summary = train(config)
    result = {"suite": suite.name, "row": row.name, "label": row.label, "recipe": suite.recipe,
              "overrides": [*suite.overrides, *row.overrides], "budget_s": suite.budget_s,
              "calibrated_throughput": throughput, "steps": steps, "summary": summary,
              "train_loss": train_loss_curve(run_dir), "config": config.to_dict(), "run_dir": str(run_dir),
              **bench_header(device)}
    if extra_measures is not None:
        result.update(extra_measures(run_dir))
    results.mkdir(parents=True, exist_ok=True)
    atomic_write_text(results / f"{row.name}.json", json.dumps(result, indent=2) + "\n")
    return result


def train_loss_curve(run_dir: Path) -> list[list[float]]:
    """`[step, training loss]` of every logged training window of a run (kept in its result, so the suite's
    `train_loss.png` can be drawn without the run directory)."""
    return [[r["step"], round(r["loss"], 5)] for r in read_metrics(run_dir)
            if r["kind"] == "train" and isinstance(r.get("loss"), (int, float)) and math.isfinite(r["loss"])]


def remeasure(suite: Suite, row: Row, results: Path) -> None:
    path = results / f"{row.name}.json"
    measures = _extra_measures(suite)
    if measures is None or not path.is_file():
        return
    result = json.loads(path.read_text())
    result.update(measures(Path(result["run_dir"])))
    result["measured"] = bench_header(torch.device("cpu"))
    atomic_write_text(path, json.dumps(result, indent=2) + "\n")
    print(f"{suite.name}/{row.name}: measures retaken")


def _evaluate_weights(suite: Suite, row: Row, run_dir: Path) -> tuple[dict[str, Any], Any]:
    """The test metrics of the weights in `run_dir` under the row's current data and task settings (and, for a
    row that `evaluates` another, its evaluation-time model overrides), and that current config."""
    from ..hardware import autocast_for
    from ..tasks import build_job
    from ..train.loop import load_run_model, run_precision

    device = torch.device("cpu")
    model, config = load_run_model(run_dir, device=device, overrides=row.overrides if row.evaluates else None)
    current = row_config(suite, row)
    config.data, config.task = current.data, current.task
    job = build_job(config, device=device, splits=("test",), run_dir=run_dir)
    autocast = autocast_for(run_precision(config, device), device)
    return job.evaluate(model, "test", autocast=autocast), current


def rescore(suite: Suite, row: Row, results: Path) -> None:
    """Re-evaluates a finished row from its saved weights with the suite's current data and task settings (e.g. an
    evaluation stride added after the row trained) and replaces its test metrics; the training is untouched."""
    path = results / f"{row.name}.json"
    if not path.is_file():
        return
    result = json.loads(path.read_text())
    before = result["summary"].get("test")
    result["summary"]["test"], current = _evaluate_weights(suite, row, Path(result["run_dir"]))
    result["config"]["data"], result["config"]["task"] = current.to_dict()["data"], current.to_dict()["task"]
    result["rescored"] = {**bench_header(torch.device("cpu")), "test_before": before}
    atomic_write_text(path, json.dumps(result, indent=2) + "\n")
    print(f"{suite.name}/{row.name}: rescored, test {before} -> {result['summary']['test']}")


def evaluate_row(suite: Suite, row: Row, results: Path) -> dict[str, Any]:
    """Scores the weights of the row that `row` evaluates with `row`'s overrides and saves the result: the trained
    row's training record (steps, throughput) with these test metrics, marked with what it evaluates."""
    source_path = results / f"{row.evaluates}.json"
    if not source_path.is_file():
        raise UserError(f"Row '{row.name}' scores the weights of row '{row.evaluates}', which has no result yet; "
                        f"train it first: polyattn bench compare {suite.name} --rows {row.evaluates}.")
    source = json.loads(source_path.read_text())
    test, current = _evaluate_weights(suite, row, Path(source["run_dir"]))
    source.pop("rescored", None)  # that record is of the trained row's own score, not of this one
    result = {**source, "row": row.name, "label": row.label, "evaluates": row.evaluates,
              "eval_overrides": list(row.overrides), "summary": {**source["summary"], "test": test},
              "config": current.to_dict(), "evaluated": bench_header(torch.device("cpu"))}
    results.mkdir(parents=True, exist_ok=True)
    atomic_write_text(results / f"{row.name}.json", json.dumps(result, indent=2) + "\n")
    print(f"{suite.name}/{row.name}: the weights of {row.evaluates} scored with {' '.join(row.overrides)}: {test}")
    return result


def lookup(result: dict[str, Any], dotted: str) -> Any:
    value: Any = result
    for key in dotted.split("."):
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return value


def table(suite: Suite, results: Path) -> str:
    """The Markdown table of the suite's saved results (rows without a result are listed as not run)."""
    header = ["model", *[c[0] for c in suite.columns]]
    lines = [f"**{suite.title}**", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    missing = []
    for row in suite.rows:
        path = results / f"{row.name}.json"
        if not path.is_file():
            missing.append(row.label)
            continue
        result = json.loads(path.read_text())
        cells = []
        for column in suite.columns:
            _, dotted, fmt, *scale = column
            value = lookup(result, dotted)
            cells.append("–" if value is None else format(value * scale[0] if scale else value, fmt))
        lines.append(f"| {row.label} | " + " | ".join(cells) + " |")
    if missing:
        lines += ["", "Not run yet: " + "; ".join(missing) + "."]
    return "\n".join(lines) + "\n"


def _scaled(value: float, column: list) -> float:
    """A result's value as its table column shows it (the column's optional fourth entry is a scale)."""
    return value * column[3] if len(column) > 3 else value


def speed_column(suite: Suite) -> list | None:
    """The table column holding the rows' training throughput: the calibrated one of a suite with a time budget,
    the one its runs measured (`summary.train_..._per_s`) in a suite of `steps`; None when the table has neither."""
    return next((c for c in suite.columns if c[1] == "calibrated_throughput"
                 or (c[1].startswith("summary.train_") and c[1].endswith("_per_s"))), None)


def table_plot(suite: Suite, results: Path) -> Path | None:
    """`table.png` beside `table.md`: each finished row as a labelled point of the table's first column (its
    quality measure) against its training throughput; None when matplotlib is missing or no row has both."""
    try:
        from ..analysis.plots import _save, pyplot

        plt = pyplot()
    except UserError:
        return None
    quality = suite.columns[0]
    speed = speed_column(suite)
    points = []
    for row in suite.rows:
        path = results / f"{row.name}.json"
        if speed is None or not path.is_file():
            continue
        result = json.loads(path.read_text())
        y, x = lookup(result, quality[1]), lookup(result, speed[1])
        if isinstance(x, (int, float)) and isinstance(y, (int, float)):
            points.append((row.label, x, _scaled(y, quality)))
    if not points:
        return None
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for i, (label, x, y) in enumerate(points):
        ax.scatter([x], [y], s=40, color=f"C{i % 10}", label=label, zorder=3)
    ax.set_xlabel(speed[0])
    ax.set_ylabel(quality[0])
    ax.set_title(suite.title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    _save(fig, results / "table.png")
    return results / "table.png"


def curves_plot(suite: Suite, results: Path) -> Path | None:
    """`curves.png` of a suite whose rows carry `group` and `x`: the table's first column (its quality measure)
    and the training throughput against x, one line per group, log-x; None when the suite has no groups, no
    finished grouped row, or matplotlib is missing. A row that `evaluates` another has its training's throughput,
    so it is drawn in the quality panel only."""
    from ..analysis.plots import line_panels

    grouped = [r for r in suite.rows if r.group is not None]
    if not grouped:
        return None
    quality = suite.columns[0]
    speed = speed_column(suite)
    lines: dict[str, list[list[tuple[float, float]]]] = {}
    for row in grouped:
        path = results / f"{row.name}.json"
        panels = lines.setdefault(row.group, [[], []])
        if not path.is_file():
            continue
        result = json.loads(path.read_text())
        y = lookup(result, quality[1])
        if isinstance(y, (int, float)):
            panels[0].append((row.x, _scaled(y, quality)))
        rate = None if speed is None or row.evaluates else lookup(result, speed[1])
        if isinstance(rate, (int, float)):
            panels[1].append((row.x, _scaled(rate, speed)))
    if not any(points for panels in lines.values() for points in panels):
        return None
    try:
        line_panels(lines, results / "curves.png", x_label=suite.x_label,
                    y_labels=[quality[0], speed[0] if speed else "throughput"], title=suite.title)
    except UserError:  # matplotlib missing: the table is still written
        return None
    return results / "curves.png"


def loss_plot(suite: Suite, results: Path) -> Path | None:
    """`train_loss.png`: every finished row's training loss against the optimizer step (the step-for-step view:
    learning speed apart from throughput); None when no result holds a loss curve or matplotlib is missing."""
    from ..analysis.plots import line_panels

    lines = {}
    for row in suite.rows:
        path = results / f"{row.name}.json"
        curve = json.loads(path.read_text()).get("train_loss") if path.is_file() and row.evaluates is None else None
        if curve:
            lines[row.label] = [[(step, loss) for step, loss in curve]]
    if not lines:
        return None
    try:
        line_panels(lines, results / "train_loss.png", x_label="optimizer step", y_labels=["training loss"],
                    title=suite.title, log_x=False, markers=False)
    except UserError:  # matplotlib missing: the table is still written
        return None
    return results / "train_loss.png"


def fill_markdown_block(path: Path, suite: str, text: str) -> None:
    """Replaces what lies between the `<!-- table:SUITE -->` and `<!-- /table:SUITE -->` lines of a Markdown file."""
    if not path.is_file():
        raise UserError(f"There is no file {path} to put the '{suite}' table into; check --readme.")
    start, end = f"<!-- table:{suite} -->", f"<!-- /table:{suite} -->"
    lines = path.read_text().splitlines(keepends=True)
    marks = [i for i, line in enumerate(lines) if line.strip() in (start, end)]
    if len(marks) != 2 or lines[marks[0]].strip() != start:
        raise UserError(f"{path} needs one '{start}' line followed by one '{end}' line to put the table between.")
    lines[marks[0] + 1:marks[1]] = [text if text.endswith("\n") else text + "\n"]
    atomic_write_text(path, "".join(lines))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("suite", help="comparison suite: a file in configs/compare (vision, lm, ...)")
    parser.add_argument("--rows", nargs="+", help="only these rows (default: every row without a result)")
    parser.add_argument("--force", action="store_true", help="retrain rows that already have a result")
    parser.add_argument("--calibrate", action="store_true", help="only measure throughput (keeps the best)")
    parser.add_argument("--table", action="store_true", help="only rebuild the table (and its plots, curves.png "
                        "for rows with group and x) from the saved results")
    parser.add_argument("--remeasure", action="store_true", help="only retake the suite's extra measures (e.g. "
                        "decoding speed) of finished rows, e.g. once the machine is idle, and update their results")
    parser.add_argument("--rescore", action="store_true", help="only re-evaluate finished rows from their saved "
                        "weights with the suite's current data and task settings, and update their results")
    parser.add_argument("--readme", type=Path, help="also put the table into this Markdown file, between its "
                        "'<!-- table:SUITE -->' and '<!-- /table:SUITE -->' lines")
    parser.add_argument("--results", type=Path, default=Path("results"), help="results folder (default: results)")
    parser.add_argument("--runs", type=Path, default=Path("runs/compare"), help="run directories")
    parser.add_argument("--threads", type=int, help="CPU threads of the training runs (calibration keeps the "
                        "default), e.g. 1 to train two rows side by side on a 2-core machine")
    parser.add_argument("--device", help="train the rows on this device: auto, cpu, cuda or cuda:N (default: the "
                        "suite's recipe, auto)")
    parser.add_argument("--precision", choices=PRECISIONS,
                        help="train the rows in this precision (default: the suite's recipe, auto)")


def run(args) -> int:
    suite = load_suite(args.suite)
    # device and precision become overrides of every row, so the rows' saved configs record them
    suite.overrides += [f"train.{key}={getattr(args, key)}" for key in ("device", "precision")
                        if getattr(args, key, None) is not None]
    results = args.results / suite.name
    names = {r.name for r in suite.rows}
    unknown = sorted(set(args.rows or []) - names)
    if unknown:
        raise UserError(f"Suite '{suite.name}' has no row {', '.join(unknown)}; its rows are: "
                        f"{', '.join(r.name for r in suite.rows)}.")
    if not args.table:
        # a row that scores another row's weights comes along with it, so it is re-scored when that row retrains
        rows = [r for r in suite.rows if args.rows is None or r.name in args.rows or r.evaluates in args.rows]
        trained_now = set()
        for row in rows:
            if row.evaluates is not None:  # scores another row's weights: nothing to calibrate or measure
                trained = (results / f"{row.evaluates}.json").is_file()
                due = args.force or row.evaluates in trained_now or not (results / f"{row.name}.json").is_file()
                if (args.rescore and trained) or (due and not (args.calibrate or args.remeasure or args.rescore)):
                    evaluate_row(suite, row, results)
            elif args.calibrate:
                calibrate(suite, row, results)
            elif args.remeasure:
                remeasure(suite, row, results)
            elif args.rescore:
                rescore(suite, row, results)
            elif args.force or not (results / f"{row.name}.json").is_file():
                run_row(suite, row, results, args.runs, extra_measures=_extra_measures(suite), threads=args.threads)
                trained_now.add(row.name)
    text = table(suite, results)
    if not args.calibrate:
        atomic_write_text(results / "table.md", text)
        table_plot(suite, results)
        curves_plot(suite, results)
        loss_plot(suite, results)
        if args.readme:
            fill_markdown_block(args.readme, suite.name, text)
    print(text)
    return 0


def _extra_measures(suite: Suite):
    if suite.measure == "generation":
        from .generation_speed import generation_measures

        return lambda run_dir: generation_measures(run_dir, **suite.measure_args)
    if suite.measure == "sample_quality":
        from .sample_quality import quality_measures

        return lambda run_dir: quality_measures(run_dir, **suite.measure_args)
    if suite.measure is not None:
        raise UserError(f"Suite '{suite.name}' asks for measure '{suite.measure}'; the measures are 'generation' "
                        f"and 'sample_quality'.")
    return None
