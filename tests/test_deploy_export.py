"""`polyattn export`: every family's graph (ONNX through onnxruntime, torch.export programs) equals the eager
model, with a dynamic batch; the decoding steps reproduce polyattn's greedy generation token for token."""

import pytest
import torch

import polyattn
from polyattn.cli import main
from polyattn.registry import get_entry

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from polyattn.deploy.decode_step import decode_step, greedy_decode
from polyattn.deploy.export import export_spec, load_exported, model_spec, step_spec


class _Data:
    seq_len = 24


class _Config:
    data = _Data()


def small(name: str) -> torch.nn.Module:
    """A registered model at a test size, with its weights moved off their initial values (DiT's adaLN-Zero
    starts at an output of zero, which would compare nothing)."""
    torch.manual_seed(0)
    params = get_entry(name).parameters()
    overrides = dict(img_size=16, num_classes=5, depth=2, patch_size=4, vocab_size=37, dim=32, num_heads=2,
                     max_seq_len=32, num_latents=16, segment_len=8, chunk_size=8)
    if "compressed" in name:
        overrides["compressed_len"] = 8
    model = polyattn.create_model(name, **{k: v for k, v in overrides.items() if k in params}).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


# one model per family; the decisive ones for shape handling (LightNet's chunked scan, Perceiver's windows)
FAMILIES = ["vit_nano", "illama_nano", "lightnet_vision_nano", "multiscan_vision_nano", "dit_nano", "bert_nano",
            "lightnet_mlm_nano", "llama_lm_nano", "lightnet_lm_nano", "perceiver_ar_nano", "perceiver_compressed_nano",
            "perceiver_double_nano", "perceiver_split_nano", "llp_nano", "linear_lm_nano", "linear_mlm_nano",
            "linear_vision_nano", "perceiver_vision_nano"]


@pytest.mark.slow
@pytest.mark.parametrize("name", FAMILIES)
def test_onnx_forward_matches_eager(name, tmp_path):
    model = small(name)
    spec = model_spec(model, get_entry(name).task, _Config())
    record = export_spec(spec, "onnx", tmp_path / "m.onnx")
    assert "batch" in record["dynamic"]
    assert record["check"]["max_abs_error"] <= record["check"]["allowed"]
    # a fresh batch size the export never saw, through onnxruntime
    run = load_exported(tmp_path / "m.onnx")
    inputs = tuple(torch.cat([x, x[:1]]) for x in spec.inputs)
    torch.testing.assert_close(run(*inputs)[0], model(*inputs).detach(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["vit_nano", "llama_lm_nano"])
def test_pt2_program_reloads_and_matches_eager(name, tmp_path):
    model = small(name)
    spec = model_spec(model, get_entry(name).task, _Config())
    record = export_spec(spec, "pt2", tmp_path / "m.pt2")
    run = load_exported(tmp_path / "m.pt2")
    torch.testing.assert_close(run(*spec.check_inputs)[0], model(*spec.check_inputs).detach(), rtol=1e-4, atol=1e-5)
    if name == "llama_lm_nano":  # the softmax LM's graph takes any length
        assert record["dynamic"] == ["batch", "seq"]


@pytest.mark.parametrize("name,fmt,why", [("lightnet_lm_nano", "pt2", "Guard failed"),
                                          ("linear_lm_nano", "onnx", "fixed the seq axis of tokens at 24")])
def test_a_length_fixed_in_the_graph_falls_back_to_a_fixed_length(name, fmt, why, tmp_path):
    """LightNet's chunked scan and linear attention's chunk loop fix the sequence length in the graph: the export
    says so and still checks. The linear LM's ONNX file used to declare the length dynamic, and onnxruntime fed
    another one died of SIGFPE; now the fixed axis is read from the program before anything runs (LightNet's
    program keeps a symbol and a guard, which its own check at another length trips)."""
    model = small(name)
    record = export_spec(model_spec(model, "causal_lm", _Config()), fmt, tmp_path / f"m.{fmt}")
    assert record["dynamic"] == ["batch"] and why in record["fallbacks"][0]
    assert record["check"]["max_abs_error"] <= record["check"]["allowed"]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["llama_lm_nano", "lightnet_lm_nano", "linear_lm_nano", "perceiver_ar_nano",
                                  "perceiver_double_nano", "perceiver_split_nano", "perceiver_compressed_nano",
                                  "llp_nano"])
def test_onnx_decode_step_generates_polyattn_greedy_tokens(name, tmp_path):
    """50 tokens decoded by onnxruntime from the exported step (state in, state out) are polyattn's own greedy
    output: LightNet's and linear attention's fixed-size recurrent state, the bounded KV cache, Perceiver AR's
    sliding window (and that of its Double, Split and Compressed variants, whose window of 32 slides past the
    prompt, so context rows come and go; Compressed's unrotated rows need the window's absolute positions)."""
    model = small(name)
    spec = step_spec(model, 64)
    export_spec(spec, "onnx", tmp_path / "step.onnx")
    run = load_exported(tmp_path / "step.onnx")
    prompt = torch.randint(0, 37, (2, 5), generator=torch.Generator().manual_seed(1))
    expected = model.generate(prompt, 50)
    got = greedy_decode(run, decode_step(model, 64).initial_state(2), prompt, 50)
    assert torch.equal(got, expected)


def test_eager_decode_step_equals_cached_generation():
    """The step module itself (before export) against `generate`, for every family it supports; 4 + 40 tokens
    outgrow the Perceivers' window of 32 (a window-relative Compressed step departed at token 41)."""
    for name in ["llama_lm_nano", "lightnet_lm_nano", "linear_lm_nano", "perceiver_ar_nano", "perceiver_double_nano",
                 "perceiver_compressed_nano", "llp_nano"]:
        model = small(name)
        step = decode_step(model, 48)
        prompt = torch.randint(0, 37, (2, 4), generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            got = greedy_decode(step, step.initial_state(2), prompt, 40)
        assert torch.equal(got, model.generate(prompt, 40)), name


def test_bounded_cache_state_keeps_its_size():
    model = small("llama_lm_nano")
    step = decode_step(model, 8)
    state = step.initial_state(1)
    with torch.no_grad():
        for _ in range(5):
            _, *new = step(torch.ones(1, 1, dtype=torch.long), *state)
            assert [t.shape for t in new] == [t.shape for t in state]
            state = new
    assert int(state[-1].sum()) == 5  # five real slots, three still empty


def test_export_command_writes_a_checked_graph(tiny_lm_run, tmp_path, capsys):
    assert main(["export", str(tiny_lm_run), "--format", "pt2", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "model.pt2").is_file() and (tmp_path / "model.pt2.json").is_file()
    assert main(["export", str(tiny_lm_run), "--decode-step", "--max-len", "32", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "decode_step.onnx").is_file()
    assert "checked against the eager model" in capsys.readouterr().out


def test_export_refuses_what_it_cannot_export(tiny_lm_run, tmp_path, capsys):
    assert main(["export", str(tiny_lm_run), "--max-len", "8", "--out", str(tmp_path)]) == 2
    assert "use it with --decode-step" in capsys.readouterr().err


def test_decode_step_of_a_model_without_one_is_one_sentence():
    from polyattn.errors import UserError

    with pytest.raises(UserError, match="no exportable decoding step"):
        decode_step(small("vit_nano"), 8)
