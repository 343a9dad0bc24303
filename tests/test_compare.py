"""Comparison suites: calibrated step budgets, one result file per row, and the table rebuilt from them."""

import json

import pytest

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
    run_row,
    table,
)
from polyattn.cli import main
from polyattn.errors import UserError

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
    results.mkdir()
    (results / "calibration.json").write_text(json.dumps(
        {row.name: {"unit": "samples", "per_step": 64, "best": 1.0e6, "measurements": [elsewhere]}}))
    assert best_here(json.loads((results / "calibration.json").read_text())[row.name]) is None
    result = run_row(suite, row, results, tmp_path / "runs")  # recalibrates here instead of using 1e6 samples/s
    entry = json.loads((results / "calibration.json").read_text())[row.name]
    assert len(entry["measurements"]) == 2 and entry["best"] == entry["measurements"][1]["value"] < 1.0e6
    assert result["calibrated_throughput"] == entry["best"]
    assert result["steps"] == max(1, int(0.5 * entry["best"] / 64))


def test_lookup_and_suite_files():
    assert lookup({"a": {"b": 2}}, "a.b") == 2 and lookup({"a": {}}, "a.b") is None
    for name in ("vision", "vision_mixers", "lm", "lm_mixers"):
        suite = load_suite(name)
        assert suite.budget_s == 600 and len({r.name for r in suite.rows}) == len(suite.rows)
        for row in suite.rows:  # every row is a valid configuration
            row_config(suite, row)
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
