"""Output that tells what it does: command headers, which weights were used, progress off a terminal, run plots,
attention figures and the comparison-suite plot."""

import json

from polyattn.cli import main
from polyattn.progress import note, progress_bar
from polyattn.train.config import build_config
from polyattn.train.loop import train
from polyattn.train.run_log import curves, write_plots

TINY = ["model.embed_dim=16", "model.depth=1", "model.num_heads=2", "model.patch_size=4", "data.image_size=8",
        "train.batch_size=256", "train.log_every=1"]


def test_train_and_eval_say_what_they_run_on_and_with_which_weights(tmp_path, cache_dir, capsys):
    train(build_config("default", [*TINY, "train.epochs=2", "train.ema_decay=0.9", f"train.out_dir={tmp_path}",
                                   "train.run_name=r"]))
    err = capsys.readouterr().err
    first = err.splitlines()[0]
    for part in ("training vit_nano", "M parameters", "digits (1,438 train / 359 test images, 10 classes",
                 "cpu", "bf16", "thread", "steps"):
        assert part in first, (part, first)
    # off a terminal each bar redraw and each evaluation line is a line of its own: no line holds two
    lines = err.splitlines()
    assert sum(line.startswith("epoch ") for line in lines) == 2
    assert not any("\r" in line or "\x1b[" in line for line in lines)

    assert main(["eval", str(tmp_path / "r")]) == 0
    out = capsys.readouterr()
    assert "averaged (EMA) weights" in out.err.splitlines()[0] and "(averaged (EMA) weights)" in out.out
    assert main(["eval", str(tmp_path / "r"), "--no-ema"]) == 0
    assert "raw weights" in capsys.readouterr().out

    plots = tmp_path / "r" / "plots"
    assert {p.name for p in plots.glob("*.png")} >= {"loss.png", "top1.png", "lr.png", "samples_per_s.png",
                                                    "overview.png"}


def test_plots_overlay_train_and_evaluation_and_draw_single_points(tmp_path):
    records = [{"kind": "run", "step": 0, "params": 10},
               {"kind": "train", "step": 5, "loss": 2.0, "lr": 1e-3, "samples_per_s": 100.0, "epoch": 1.0},
               {"kind": "val", "step": 5, "loss": 2.2, "top1": 0.3, "count": 50, "epoch": 1},
               {"kind": "test", "step": 5, "loss": 2.1, "top1": 0.31, "count": 60},
               {"kind": "test", "step": 5, "loss": 2.1, "top1": 0.31, "count": 60}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    series = curves(records)
    assert set(series["loss"]) == {"train", "val", "test"} and series["loss"]["test"] == [(5, 2.1)]
    assert "count" not in series and "params" not in series and "epoch" not in series
    written = {p.name for p in write_plots(tmp_path)}
    assert written == {"loss.png", "top1.png", "lr.png", "samples_per_s.png", "overview.png"}


def test_progress_off_a_terminal_is_plain_lines(capsys):
    for _ in progress_bar(range(3), desc="work", unit="it", leave=True):
        note("a note")
    err = capsys.readouterr().err
    assert "a note" in err and "\r" not in err and "\x1b[" not in err
    assert err.splitlines()[-1].startswith("work: 100%")


def test_attention_figure_has_a_colour_bar_per_layer(tmp_path, monkeypatch):
    import torch

    from polyattn.analysis import plots

    figures = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: figures.append(fig))
    plots.attention_figure(torch.zeros(3, 8, 8, dtype=torch.uint8), [torch.rand(2, 2), torch.rand(2, 2)],
                           ["block 0", "block 1"], tmp_path / "a.png", title="t", what="w")
    assert len(figures[0].axes) == 3 + 2  # the input, two maps, and a colour bar beside each map


def test_comparison_suites_plot_their_table(tmp_path):
    from polyattn.bench.compare import Row, Suite, table_plot

    suite = Suite(name="s", title="S", recipe="default", budget_s=1, overrides=[],
                  rows=[Row("a", "first"), Row("b", "second"), Row("c", "not run")],
                  columns=[["top-1 (%)", "summary.test.top1", ".1f", 100], ["img/s", "calibrated_throughput", ".0f"]])
    for name, top1, speed in (("a", 0.5, 100.0), ("b", 0.6, 50.0)):
        (tmp_path / f"{name}.json").write_text(json.dumps({"summary": {"test": {"top1": top1}},
                                                           "calibrated_throughput": speed}))
    assert table_plot(suite, tmp_path) == tmp_path / "table.png" and (tmp_path / "table.png").stat().st_size > 1000


def test_a_benchmark_without_matplotlib_still_writes_its_table_and_json(tmp_path, capsys):
    from polyattn.bench.common import write_results
    from polyattn.errors import UserError

    def no_matplotlib(path):
        raise UserError("Drawing figures needs matplotlib, which is not installed; install it with pip install "
                        "'polyattn[log]'.")

    write_results(tmp_path, "suite", {"a": 1}, "| a |", no_matplotlib)
    out = capsys.readouterr().out
    assert json.loads((tmp_path / "suite.json").read_text()) == {"a": 1}
    assert (tmp_path / "suite.md").read_text() == "| a |\n" and not (tmp_path / "suite.png").exists()
    assert "no plot: Drawing figures needs matplotlib" in out and "suite.png" not in out
