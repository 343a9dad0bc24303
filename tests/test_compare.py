"""Comparison suites: calibrated step budgets, one result file per row, and the table rebuilt from them."""

import json
from pathlib import Path

import pytest
import torch

from polyattn.bench.common import bench_header
from polyattn.bench.compare import (
    Row,
    Suite,
    best_here,
    calibrate,
    fill_markdown_block,
    load_suite,
    lookup,
    rescore,
    row_config,
    row_device,
    run_row,
    table,
)
from polyattn.cli import main
from polyattn.errors import UserError
from polyattn.train.loop import build_model

TINY = ["model.embed_dim=32", "model.depth=1", "model.num_heads=2", "model.patch_size=4", "data.image_size=8",
        "data.crop_padding=1", "train.batch_size=64", "train.log_every=5"]


def tiny_suite():
    return Suite(name="tiny", title="Tiny", recipe="default", budget_s=0.5, overrides=TINY,
                 rows=[Row("a", "first model"), Row("b", "second model", ["model.depth=2"])],
                 columns=[["top-1 (%)", "summary.test.top1", ".1f", 100], ["steps", "steps", "d"]],
                 calibration_steps=3)


def test_rows_train_for_their_calibrated_budget_and_the_table_reads_the_saved_results(tmp_path, cache_dir):
    suite, results = tiny_suite(), tmp_path / "results"
    first = calibrate(suite, suite.rows[0], results)
    assert first["unit"] == "samples" and first["per_step"] == 64 and first["best"] > 0
    result = run_row(suite, suite.rows[0], results, tmp_path / "runs")
    assert result["steps"] == max(1, int(0.5 * first["best"] / 64)) == result["summary"]["steps"]
    saved = json.loads((results / "a.json").read_text())
    assert saved["summary"]["test"] == result["summary"]["test"] and saved["label"] == "first model"

    text = table(suite, results)
    assert "| first model |" in text and f"| {result['steps']} |" in text
    assert "Not run yet: second model." in text

    # a second calibration keeps every measurement and uses the best
    again = calibrate(suite, suite.rows[0], results)
    assert len(again["measurements"]) == 2 and again["best"] == max(m["value"] for m in again["measurements"])


def test_a_calibration_from_another_machine_is_never_used(tmp_path, cache_dir):
    suite, results = tiny_suite(), tmp_path / "results"
    row = suite.rows[0]
    elsewhere = {"device_name": "another CPU (AVX2)", "threads": 2, "value": 1.0e6}
    assert row_device(suite, row) == torch.device("cpu")  # the recipe's auto on a machine without CUDA
    results.mkdir()
    (results / "calibration.json").write_text(json.dumps(
        {row.name: {"unit": "samples", "per_step": 64, "best": 1.0e6, "measurements": [elsewhere]}}))
    assert best_here(json.loads((results / "calibration.json").read_text())[row.name]) is None
    result = run_row(suite, row, results, tmp_path / "runs")  # recalibrates here instead of using 1e6 samples/s
    entry = json.loads((results / "calibration.json").read_text())[row.name]
    assert len(entry["measurements"]) == 2 and entry["best"] == entry["measurements"][1]["value"] < 1.0e6
    assert result["calibrated_throughput"] == entry["best"]
    assert result["steps"] == max(1, int(0.5 * entry["best"] / 64))


def test_rows_trained_at_other_threads_keep_the_budgets_calibrated_at_the_default(tmp_path, cache_dir):
    # `--threads 1` trains rows side by side; each row's budget is still the idle calibration at the default
    # thread count, also for the second row one process trains (its first run must not leave its threads behind)
    suite, results = tiny_suite(), tmp_path / "results"
    default = torch.get_num_threads()
    calibrated = [calibrate(suite, row, results)["best"] for row in suite.rows]
    for row, best in zip(suite.rows, calibrated, strict=True):
        result = run_row(suite, row, results, tmp_path / "runs", threads=default + 1)
        assert torch.get_num_threads() == default
        assert result["calibrated_throughput"] == best and result["config"]["train"]["threads"] == default + 1
    record = json.loads((results / "calibration.json").read_text())
    assert [len(record[row.name]["measurements"]) for row in suite.rows] == [1, 1]  # nothing recalibrated


def test_a_calibration_keeps_what_another_process_recorded_while_it_measured(tmp_path, cache_dir, monkeypatch):
    from polyattn.train import loop

    suite, results = tiny_suite(), tmp_path / "results"
    other = {"unit": "samples", "per_step": 64, "best": 5.0, "measurements": [{"value": 5.0}]}
    original = loop.train

    def train_beside_another_process(*args, **kwargs):
        results.mkdir(parents=True, exist_ok=True)
        (results / "calibration.json").write_text(json.dumps({"b": other}))
        return original(*args, **kwargs)

    monkeypatch.setattr(loop, "train", train_beside_another_process)
    calibrate(suite, suite.rows[0], results)
    record = json.loads((results / "calibration.json").read_text())
    assert record["b"] == other and len(record["a"]["measurements"]) == 1


def test_a_suite_of_steps_trains_every_row_for_them_without_calibration(tmp_path, cache_dir):
    suite, results = tiny_suite(), tmp_path / "results"
    suite.budget_s, suite.steps = None, 3
    suite.columns = [["top-1 (%)", "summary.test.top1", ".1f", 100], ["img/s", "summary.train_samples_per_s", ".0f"]]
    suite.rows[1].steps = 2  # a row's own count
    for row, steps in zip(suite.rows, (3, 2), strict=True):
        result = run_row(suite, row, results, tmp_path / "runs")
        assert result["steps"] == result["summary"]["steps"] == steps and result["calibrated_throughput"] is None
        assert [step for step, _ in result["train_loss"]] == [steps]  # log_every=5: the last step is logged
    assert not (results / "calibration.json").exists()
    with pytest.raises(UserError, match=r"trains every row for 3 steps.*nothing to calibrate"):
        calibrate(suite, suite.rows[0], results)
    from polyattn.bench.compare import loss_plot, speed_column, table_plot

    assert speed_column(suite) == suite.columns[1]
    pytest.importorskip("matplotlib")
    assert table_plot(suite, results) == results / "table.png" and (results / "table.png").is_file()
    assert loss_plot(suite, results) == results / "train_loss.png" and (results / "train_loss.png").is_file()


@pytest.mark.parametrize("keys, message", [
    ({}, "exactly one of budget_s"),
    ({"budget_s": 60, "steps": 10}, "exactly one of budget_s"),
    ({"steps": 0}, "steps must be a positive whole number"),
    ({"steps": 2.5}, "steps must be a positive whole number"),
    ({"steps": 10, "rows": [{"name": "a", "steps": 0}]}, "row 'a': steps must be a positive whole number"),
    ({"budget_s": 60, "rows": [{"name": "a", "steps": 5}]}, "has a time budget"),
])
def test_a_suite_needs_one_budget(tmp_path, monkeypatch, keys, message):
    from polyattn.bench import compare

    (tmp_path / "compare").mkdir()
    (tmp_path / "compare" / "s.yaml").write_text(json.dumps(
        {"title": "S", "recipe": "default", "rows": [{"name": "a"}], "columns": [], **keys}))
    monkeypatch.setattr(compare, "RECIPE_DIRS", [tmp_path])
    with pytest.raises(UserError, match=message):
        load_suite("s")


def test_lookup_and_suite_files():
    assert lookup({"a": {"b": 2}}, "a.b") == 2 and lookup({"a": {}}, "a.b") is None
    for name in ("vision", "vision_mixers", "vision_stem", "lm", "lm_mixers", "lm_reversible", "lm_long",
                 "vision_fine", "vision_ablations", "diffusion", "diffusion_cifar10"):
        suite = load_suite(name)
        assert suite.budget_s == (1800 if name in ("vision_ablations", "diffusion_cifar10") else 600)
        assert len({r.name for r in suite.rows}) == len(suite.rows)
        for row in suite.rows:  # every row is a valid configuration
            row_config(suite, row)
    by_steps = load_suite("lm_steps")
    assert [r.steps or by_steps.steps for r in by_steps.rows] == [449, 909, 909, 449]
    gap = load_suite("lm_gap")
    assert gap.steps == 300 and gap.budget_s is None
    for row in gap.rows:  # every knob row builds its model
        build_model(row_config(gap, row), {})
    with pytest.raises(UserError, match="no comparison suite 'nope'"):
        load_suite("nope")


def test_unknown_row_is_one_sentence(capsys):
    assert main(["bench", "compare", "vision", "--rows", "nope", "--table"]) == 2
    assert "has no row nope" in capsys.readouterr().err


def test_every_suite_file_builds_its_rows():
    for name in ("vision", "lm", "diffusion"):
        suite = load_suite(name)
        for row in suite.rows:
            row_config(suite, row)


def test_a_diffusion_row_is_sampled_and_measured(tmp_path, cache_dir):
    suite = Suite(name="gen", title="Gen", recipe="dit_digits", budget_s=0.3,
                  overrides=["model.depth=1", "model.embed_dim=32", "model.num_heads=2", "train.batch_size=32"],
                  rows=[Row("softmax", "softmax")], columns=[["FD", "quality.classifier_fd", ".2f"]],
                  calibration_steps=2, measure="sample_quality",
                  measure_args={"classifier": {"recipe": "default", "overrides": [*TINY[:3], "train.max_steps=2"]},
                                "n": 2, "steps": 2, "cfg": 2.0})
    from polyattn.bench.compare import _extra_measures

    result = run_row(suite, suite.rows[0], tmp_path / "results", tmp_path / "runs",
                     extra_measures=_extra_measures(suite))
    assert result["quality"]["classifier_fd"] >= 0 and result["sampling"]["n_per_class"] == 2
    assert (tmp_path / "runs" / "gen" / "_classifier" / "summary.json").is_file()
    assert "| softmax |" in table(suite, tmp_path / "results")


def test_the_table_goes_between_its_markers_and_bad_markers_are_one_sentence(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- table:vision -->\nold table\n<!-- /table:vision -->\nafter\n")
    fill_markdown_block(readme, "vision", "| a |\n|---|\n")
    assert readme.read_text() == "intro\n<!-- table:vision -->\n| a |\n|---|\n<!-- /table:vision -->\nafter\n"
    fill_markdown_block(readme, "vision", "| b |")  # idempotent, one block
    assert readme.read_text().count("| b |") == 1 and "| a |" not in readme.read_text()
    with pytest.raises(UserError, match="needs one '<!-- table:lm -->' line"):
        fill_markdown_block(readme, "lm", "x")
    with pytest.raises(UserError, match="There is no file"):
        fill_markdown_block(tmp_path / "missing.md", "lm", "x")


def test_rescore_reevaluates_a_finished_row_with_the_suites_current_settings(tmp_path, cache_dir):
    suite, results = tiny_suite(), tmp_path / "results"
    first = run_row(suite, suite.rows[0], results, tmp_path / "runs")["summary"]["test"]
    suite.overrides = [*suite.overrides, "data.test_fraction=0.1"]  # a smaller test split than the row trained with
    rescore(suite, suite.rows[0], results)
    saved = json.loads((results / "a.json").read_text())
    assert saved["rescored"]["test_before"] == first
    assert 0 < saved["summary"]["test"]["count"] < first["count"]
    assert saved["config"]["data"]["test_fraction"] == 0.1
    rescore(suite, suite.rows[1], results)  # a row without a result is left alone
    assert not (results / "b.json").exists()


def fake_result(results, name, loss, rate):
    results.mkdir(parents=True, exist_ok=True)
    (results / f"{name}.json").write_text(json.dumps({"summary": {"test": {"loss": loss}},
                                                      "calibrated_throughput": rate, "steps": 10}))


def test_rows_with_group_and_x_draw_curves_and_plain_suites_do_not(tmp_path):
    from polyattn.bench.compare import curves_plot, table

    columns = [["val loss", "summary.test.loss", ".3f"], ["tok/s", "calibrated_throughput", ".0f"]]
    rows = [Row(f"{g}_{x}", f"{g} at {x}", group=g, x=x) for g in ("soft", "linear") for x in (1024, 4096, 16384)]
    suite = Suite(name="long", title="Long", recipe="llama_lm_shakespeare", budget_s=1, overrides=[], rows=rows,
                  columns=columns, x_label="window (tokens)")
    results = tmp_path / "long"
    for i, row in enumerate(rows[:-1]):  # the last row has not run: its line has two points
        fake_result(results, row.name, 2.0 - 0.1 * i, 1000.0 / (i + 1))
    path = curves_plot(suite, results)
    assert path == results / "curves.png" and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    plain = Suite(name="plain", title="Plain", recipe="default", budget_s=1, overrides=[],
                  rows=[Row(r.name, r.label) for r in rows], columns=columns)
    before = table(plain, results)
    assert curves_plot(plain, tmp_path / "plain") is None and not (tmp_path / "plain").exists()
    assert table(plain, results) == before and "| soft at 1024 | 2.000 | 1000 |" in before


@pytest.mark.parametrize("rows, message", [
    ([Row("a", "a", group="m")], "row 'a' has only one of group and x"),
    ([Row("a", "a", group="m", x=0)], "row 'a': x must be a positive number"),
    ([Row("a", "a"), Row("a", "b")], "row 'a': the name is used twice"),
    ([Row("b", "b", evaluates="a"), Row("a", "a")], "row 'b' evaluates 'a', which is not a row trained earlier"),
])
def test_bad_rows_are_one_sentence(rows, message):
    from polyattn.bench.compare import check_rows

    with pytest.raises(UserError, match=message):
        check_rows("s", rows)


TINY_LM = ["data.source=shakespeare", "model.dim=32", "model.depth=1", "model.num_heads=2", "train.batch_size=2",
           "data.eval_batch_size=4", "data.eval_stride=16", "data.eval_start=32", "data.eval_tokens=256",
           "train.log_every=1", "train.eval_every=1000"]


def test_one_command_trains_a_row_and_scores_its_weights_a_second_way(tmp_path, cache_dir, monkeypatch):
    from polyattn.bench import compare

    rows = [Row("llama_32", "LLaMA, 32", ["data.seq_len=32"], group="LLaMA", x=32),
            Row("s2_32", "S², 32", ["data.seq_len=32", "model.s2_group_size=8"], group="S² full", x=32),
            Row("s2_32_grouped", "S², 32, grouped", ["model.s2_at_inference=true"], group="S² grouped", x=32,
                evaluates="s2_32")]
    suite = Suite(name="tinylong", title="Tiny long", recipe="llama_lm_shakespeare", budget_s=0.3, overrides=TINY_LM,
                  rows=rows, columns=[["val loss", "summary.test.loss", ".3f"], ["tok/s", "calibrated_throughput",
                                                                                  ".0f"]],
                  calibration_steps=2, x_label="window (tokens)")
    monkeypatch.setattr(compare, "load_suite", lambda name: suite)
    results = tmp_path / "results"
    (results / "tinylong").mkdir(parents=True)  # calibrated here already (640 tokens/s: 3 steps of 64 tokens)
    here = {**bench_header(torch.device("cpu")), "value": 640.0}
    (results / "tinylong" / "calibration.json").write_text(json.dumps(
        {name: {"unit": "tokens", "per_step": 64, "measurements": [here]} for name in ("llama_32", "s2_32")}))
    assert main(["bench", "compare", "tinylong", "--results", str(results), "--runs", str(tmp_path / "runs")]) == 0
    trained = json.loads((results / "tinylong" / "s2_32.json").read_text())
    grouped = json.loads((results / "tinylong" / "s2_32_grouped.json").read_text())
    assert grouped["evaluates"] == "s2_32" and grouped["eval_overrides"] == ["model.s2_at_inference=true"]
    assert grouped["steps"] == trained["steps"] and grouped["run_dir"] == trained["run_dir"]
    assert grouped["steps"] == 3 and grouped["config"]["model"]["s2_at_inference"] is True
    # the same weights and the same 256 targets, scored with the grouped mask instead of full attention
    assert grouped["summary"]["test"]["tokens"] == trained["summary"]["test"]["tokens"] == 256
    assert grouped["summary"]["test"]["loss"] != trained["summary"]["test"]["loss"]
    assert (results / "tinylong" / "curves.png").is_file()
    # --rescore scores the second way again; a row whose trained row has no result is left alone
    (results / "tinylong" / "s2_32_grouped.json").unlink()
    assert main(["bench", "compare", "tinylong", "--rescore", "--results", str(results), "--runs",
                 str(tmp_path / "runs")]) == 0
    assert json.loads((results / "tinylong" / "s2_32_grouped.json").read_text())["summary"]["test"] == \
        grouped["summary"]["test"]
    # retraining the trained row re-scores the row that evaluates it, in the same command
    (results / "tinylong" / "s2_32_grouped.json").unlink()
    assert main(["bench", "compare", "tinylong", "--rows", "s2_32", "--force", "--results", str(results), "--runs",
                 str(tmp_path / "runs")]) == 0
    assert (results / "tinylong" / "s2_32_grouped.json").is_file()
    with pytest.raises(UserError, match="row 'llama_32', which has no result yet; train it first"):
        compare.evaluate_row(suite, Row("x", "x", [], evaluates="llama_32"), tmp_path / "empty")


def test_every_lm_long_row_scores_the_same_validation_bytes_with_half_a_window_of_context():
    from pathlib import Path

    from polyattn.data.text import scored_range, split_stream

    text = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"
    if not text.is_file():
        pytest.skip("needs ../shared/data/tinyshakespeare.txt")
    n_val = split_stream(text.stat().st_size, 0.1)[1]  # byte-level: one token per byte
    n_val = n_val.stop - n_val.start
    suite = load_suite("lm_long")
    ranges, windows = set(), set()
    for row in suite.rows:
        data = row_config(suite, row).data
        ranges.add(scored_range(n_val, data.seq_len, data.eval_tokens, stride=data.eval_stride,
                                start=data.eval_start))
        assert data.seq_len - data.eval_stride >= data.seq_len // 2  # at least half a window before every target
        assert row_config(suite, row).train.batch_size * data.seq_len == 16384  # the same tokens per step
        windows.add(data.seq_len)
    assert ranges == {(15872, 15872 + 90112)} and windows == {1024, 4096, 16384}


def test_decoding_speed_times_its_repeats_after_an_untimed_run(monkeypatch):
    import polyattn
    from polyattn.bench import generation_speed

    model = polyattn.create_model("llama_lm_nano", vocab_size=17, dim=16, depth=1, num_heads=2).eval()
    calls = []
    real = generation_speed.stream_generate
    monkeypatch.setattr(generation_speed, "stream_generate", lambda *a: calls.append(a[2]) or real(*a))
    speed = generation_speed.decode_speed(model, 17, 8, new_tokens=3, repeats=2)
    assert calls == [4, 4, 4] and speed["tokens_per_s"] > 0 and speed["prefill_s"] > 0


def test_the_sample_classifier_is_trained_again_when_its_settings_change(tmp_path, monkeypatch):
    import polyattn.train.loop as loop
    from polyattn.bench.sample_quality import classifier_run

    trained = []

    def fake_train(config):  # writes what a finished run has, and remembers what it was asked for
        trained.append(config.data.image_size)
        run_dir = Path(config.train.out_dir) / config.train.run_name
        run_dir.mkdir(parents=True)
        (run_dir / "summary.json").write_text("{}")

    monkeypatch.setattr(loop, "train", fake_train)
    runs = tmp_path / "runs"
    assert classifier_run(runs, "default", ["data.image_size=16"]) == runs / "_classifier"
    classifier_run(runs, "default", ["data.image_size=16"])  # the same settings: reused
    assert trained == [16]
    classifier_run(runs, "default", ["data.image_size=8"])  # others: trained again, in place
    assert trained == [16, 8] and (runs / "_classifier" / "summary.json").is_file()
    (runs / "_classifier.json").unlink()  # a classifier from before the settings were recorded
    classifier_run(runs, "default", ["data.image_size=8"])
    assert trained == [16, 8, 8]
