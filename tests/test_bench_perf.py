"""The performance benchmarks (`polyattn bench train|peers|decode`) run end to end at smoke-test size, cover every
model family, count FLOPs correctly and record what they ran on. They measure; nothing here asserts a time."""

import importlib.util
import json
import math

import pytest
import torch
from torch import nn

from polyattn.bench.training import WORKLOADS, count_flops, quick, synthetic_step, training_step
from polyattn.cli import main
from polyattn.hardware import Precision
from polyattn.registry import create_model, list_models, model_task

FP32 = Precision("fp32", "requested")


def test_every_registered_model_family_has_a_training_workload():
    families = {name.rsplit("_", 1)[0] for name in list_models()}
    covered = {w.model.rsplit("_", 1)[0] for w in WORKLOADS}
    assert families <= covered, f"families without a `bench train` workload: {sorted(families - covered)}"


@pytest.mark.parametrize("workload", WORKLOADS, ids=lambda w: w.name)
def test_every_workload_takes_a_training_step(workload):
    w = quick(workload)
    model = create_model(w.model, **w.args)
    loss_fn, samples, tokens = synthetic_step(model, model_task(w.model), w, torch.device("cpu"),
                                              torch.Generator().manual_seed(0))
    before = [p.detach().clone() for p in model.parameters()]
    assert math.isfinite(loss_fn().item()) and samples == w.batch and tokens >= samples
    training_step(model, loss_fn, FP32, torch.device("cpu"))()
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_flops_of_a_linear_layer_are_forward_plus_twice_backward():
    model = nn.Linear(32, 16, bias=False)
    x = torch.randn(8, 32)
    flops = count_flops(model, lambda: model(x).square().sum(), FP32, torch.device("cpu"))
    # forward 2·B·in·out; backward: the input gradient is not needed for a leaf input, the weight gradient is
    assert flops == 2 * 8 * 32 * 16 * 2


def test_bench_train_writes_table_json_and_plot(tmp_path, capsys):
    assert main(["bench", "train", "--quick", "--model", "vit_tiny", "llama_lm", "--precisions", "fp32",
                 "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "train.json").read_text())
    assert [r["workload"] for r in data["rows"]] == ["vit_tiny", "llama_lm"]
    for row in data["rows"]:
        assert row["precision"] == "fp32" and row["flops_per_step"] > 0 and row["mfu"] > 0
        assert row["tokens_per_s"] >= row["samples_per_s"] > 0
    header = data["header"]
    assert header["isa"] and header["cpu"] and header["torch"] and header["git"] and header["peaks"]["fp32"]
    assert (tmp_path / "train.png").stat().st_size > 0
    assert "| vit_tiny | batch 2 | fp32 |" in capsys.readouterr().out


def test_bench_decode_reports_latency_against_context(tmp_path):
    assert main(["bench", "decode", "--quick", "--models", "kv_cache", "lightnet_state", "--precision", "fp32",
                 "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "decode.json").read_text())
    assert {(p["model"], p["context"]) for p in data["points"]} == {
        (m, c) for m in ("kv_cache", "lightnet_state") for c in (32, 64)}
    assert all(p["step_s"] > 0 for p in data["points"])
    assert set(data["ratios"]) == {"kv_cache_batch1_64_over_32", "lightnet_state_batch1_64_over_32"}
    assert (tmp_path / "decode.png").stat().st_size > 0


def test_bench_decode_times_perceiver_ar_with_and_without_its_cache(tmp_path):
    assert main(["bench", "decode", "--quick", "--models", "perceiver_ar", "perceiver_ar_recomputed", "--precision",
                 "fp32", "--out", str(tmp_path)]) == 0
    points = json.loads((tmp_path / "decode.json").read_text())["points"]
    assert {(p["model"], p["context"]) for p in points} == {
        (m, c) for m in ("perceiver_ar", "perceiver_ar_recomputed") for c in (32, 64)}
    assert all(p["step_s"] > 0 and len(p["times"]) == 2 for p in points)
    assert all(p["prefill_s"] == 0 for p in points if p["model"] == "perceiver_ar_recomputed")
    assert "no cache: the window recomputed" in (tmp_path / "decode.md").read_text()


@pytest.mark.skipif(importlib.util.find_spec("x_transformers") is None, reason="the bench extra is not installed")
def test_bench_peers_times_both_sides_of_a_pair(tmp_path):
    assert main(["bench", "peers", "--quick", "--pairs", "llama_decoder", "--precisions", "fp32", "--breakdown",
                 "--out", str(tmp_path)]) == 0
    (row,) = json.loads((tmp_path / "peers.json").read_text())["rows"]
    assert row["ratio"] == pytest.approx(row["polyattn_seconds"] / row["peer_seconds"])
    # the profiled step of each side, split: both run SDPA and GEMMs, so both kinds are there on both sides
    for side in ("polyattn", "peer"):
        parts = row["breakdown"][side]
        assert parts["attention"] > 0 and parts["products"] > 0 and parts["other"] > 0
    assert "| llama_decoder | fp32 | peer |" in (tmp_path / "peers.md").read_text()
    # the same shapes: the two models' parameter counts agree within 2%
    assert abs(row["polyattn_params"] - row["peer_params"]) / row["peer_params"] < 0.02


def test_bench_dtypes_takes_each_internal_choice_both_ways(tmp_path):
    assert main(["bench", "dtypes", "--quick", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "dtypes.json").read_text())
    assert {r["decision"] for r in data["rows"]} == {"attention_short", "lightnet_global", "chunk_core"}
    for row in data["rows"]:
        assert len(row["seconds"]) == 2 and row["chosen"] in row["seconds"] and row["fastest"] in row["seconds"]
    assert isinstance(data["header"]["native_bf16"], bool)


def test_bench_reversible_memory_is_flat_in_depth(tmp_path):
    assert main(["bench", "reversible", "--quick", "--models", "vit_tiny", "--out", str(tmp_path)]) == 0
    points = json.loads((tmp_path / "reversible.json").read_text())["points"]
    memory = {(p["depth"], p["reversible"]): p["memory_bytes"] for p in points}
    assert memory[(2, True)] == memory[(4, True)] < memory[(2, False)] < memory[(4, False)]
    assert (tmp_path / "reversible.md").is_file() and (tmp_path / "reversible.png").is_file()
