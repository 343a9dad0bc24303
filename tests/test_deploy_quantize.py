"""`polyattn quantize`: quantized models stay within a stated tolerance of the float model, the int8/int4 kernels
equal their dequantized reference, LightNet's state stays float32, and the new run directory loads everywhere."""

import copy

import pytest
import torch
from torch import nn

import polyattn
from polyattn.cli import main
from polyattn.deploy.quantize import (
    METHODS,
    DynamicInt8Linear,
    Int4WeightOnlyLinear,
    Int8WeightOnlyLinear,
    quantizable_linears,
    quantize_model,
    quantize_run,
)
from polyattn.errors import UserError
from polyattn.train.loop import load_run

# relative L2 error of the logits on fixed inputs, at a test size with random weights (every weight is noise, the
# hardest case for 4 bits); measured 0.02-0.06, 0.007-0.03 and 0.09-0.26
TOLERANCE = {"int8-dynamic": 0.1, "int8-weight-only": 0.05, "int4-weight-only": 0.35}


def relative_error(ref, x):
    return float((x.float() - ref.float()).norm() / ref.float().norm())


def small_lm(name):
    torch.manual_seed(0)
    return polyattn.create_model(name, vocab_size=64, dim=64, depth=2, num_heads=2).eval()


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", ["llama_lm_nano", "lightnet_lm_nano", "vit_nano"])
def test_quantized_model_stays_within_tolerance(name, method):
    if name == "vit_nano":
        torch.manual_seed(0)
        model = polyattn.create_model(name, img_size=16, patch_size=4, num_classes=10, depth=2).eval()
        x = torch.randn(4, 3, 16, 16)
    else:
        model, x = small_lm(name), torch.randint(0, 64, (2, 24))
    quantized = copy.deepcopy(model)
    names = quantize_model(quantized, method)
    assert names and all(not isinstance(quantized.get_submodule(n), nn.Linear) for n in names)
    with torch.no_grad():
        ref = model(x)
        assert relative_error(ref, quantized(x)) < TOLERANCE[method]
        with torch.autocast("cpu", torch.bfloat16):  # the kernels' own path
            assert relative_error(ref, quantized(x)) < TOLERANCE[method] + 0.02


@pytest.mark.parametrize("cls", [DynamicInt8Linear, Int8WeightOnlyLinear, Int4WeightOnlyLinear])
def test_quantized_kernel_equals_its_dequantized_reference(cls):
    """Each module's fast path (fbgemm, int8pack, int4pack) against `F.linear` with its own dequantized weight."""
    torch.manual_seed(0)
    linear = nn.Linear(64, 48)
    q = cls.from_float(linear)
    x = torch.randn(5, 7, 64)
    with torch.no_grad():
        reference = torch.nn.functional.linear(x, q.dequantize(), q.bias)
        if cls is DynamicInt8Linear:  # activations are quantized too: one activation step per 127 of the range
            assert relative_error(reference, q(x)) < 0.02
        else:
            fast = q(x.bfloat16()).float()
            assert relative_error(reference, fast) < 0.01
            torch.testing.assert_close(q(x), reference)  # float32: the dequantized path itself
        # the dequantized weight is the float weight to within half a step of its quantization grid
        err = (q.dequantize() - linear.weight).abs().max()
        step = linear.weight.abs().max() / (127 if cls is not Int4WeightOnlyLinear else 7)
        assert err <= step


def test_tied_head_and_lightnet_state_stay_float():
    torch.manual_seed(0)
    model = polyattn.create_model("lightnet_lm_nano", vocab_size=64, dim=64, depth=2, num_heads=2,
                                  tie_embeddings=True).eval()
    names = quantize_model(model, "int8-weight-only")
    assert "io.head" not in names and not any(n.startswith("io.") for n in names)
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        _, cache = model.forward_cached(torch.randint(0, 64, (2, 9)))
    for layer in cache.layers:
        assert layer.S.dtype == torch.float32 and layer.z.dtype == torch.float32


def test_int4_skips_widths_its_groups_do_not_divide():
    model = nn.Sequential(nn.Linear(48, 64), nn.Linear(64, 32), nn.Linear(32, 8))
    assert quantizable_linears(model, "int4-weight-only") == ["1"]
    assert quantizable_linears(model, "int8-dynamic") == ["0", "1", "2"]


@pytest.mark.parametrize("method", METHODS)
def test_quantized_run_directory_loads_and_runs(tiny_lm_run, tmp_path, method, capsys):
    out = tmp_path / method
    assert main(["quantize", str(tiny_lm_run), "--method", method, "--out", str(out)]) == 0
    run = load_run(out)
    assert run.config.deploy[0]["method"] == method
    assert run.config.deploy[0]["source_run"] == str(tiny_lm_run.resolve())
    # the stored model is the one quantized in memory, and smaller on disk
    expected = load_run(tiny_lm_run).model
    quantize_model(expected, method)
    tokens = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(run.model(tokens), expected(tokens))
    assert (out / "model.safetensors").stat().st_size < (tiny_lm_run / "model.safetensors").stat().st_size
    assert main(["eval", str(out), "--precision", "fp32"]) == 0
    assert main(["generate", str(out), "--prompt", "To be", "--max-new-tokens", "5", "--temperature", "0"]) == 0
    assert "loss" in capsys.readouterr().out


def test_quantize_refuses_an_existing_output_and_an_unknown_method(tiny_lm_run, tmp_path, capsys):
    assert main(["quantize", str(tiny_lm_run), "--method", "int8-dynamic", "--out", str(tmp_path)]) == 2
    assert "already exists" in capsys.readouterr().err
    with pytest.raises(UserError, match="Unknown quantization method"):
        quantize_model(nn.Linear(4, 4), "int2")


def test_a_write_that_fails_leaves_no_run_directory(tiny_lm_run, tmp_path, monkeypatch):
    import polyattn.train.checkpoint as checkpoint

    def full_disk(*args, **kwargs):
        raise UserError("No space left on device")

    monkeypatch.setattr(checkpoint, "save_weights", full_disk)
    with pytest.raises(UserError, match="No space left"):
        quantize_run(tiny_lm_run, "int8-dynamic", tmp_path / "q")
    assert list(tmp_path.iterdir()) == []  # neither a half-written run directory nor its staging folder


def test_int8_kv_cache_keeps_greedy_decoding_close_and_the_cache_small():
    from polyattn.layers import Int8KVCache, int8_kv_cache
    from polyattn.models.generation import generate, stream_generate

    model = small_lm("llama_lm_nano")
    prompt = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(3))
    _, ref_logits = generate(model, prompt, 20, return_logits=True)
    steps = list(stream_generate(model, prompt, 20, cache_transform=int8_kv_cache))
    logits = torch.stack([s.logits for s in steps], 1)
    # the first step's logits come before any int8 entry is read; later ones within 2% of the float cache's
    assert relative_error(ref_logits[:, 1:], logits[:, 1:]) < 0.02
    _, cache = model.forward_cached(prompt)
    small = int8_kv_cache(cache)
    assert all(isinstance(c, Int8KVCache) for c in small)
    floats = sum(c.k.numel() * 4 + c.v.numel() * 4 for c in cache)
    assert sum(c.nbytes() for c in small) < floats / 3
    with pytest.raises(UserError, match="softmax KV cache"):
        int8_kv_cache(small_lm("lightnet_lm_nano").forward_cached(prompt)[1])


@pytest.mark.parametrize("method", METHODS)
def test_a_quantized_model_counts_the_weights_it_stands_for(method):
    """Its integer weights are buffers, not parameters; `parameter_count` counts the float layers they replace."""
    model = small_lm("llama_lm_nano")
    before = polyattn.parameter_count(model)
    quantized = copy.deepcopy(model)
    quantize_model(quantized, method)
    assert sum(p.numel() for p in quantized.parameters()) < before  # what the header used to show
    assert polyattn.parameter_count(quantized) == before


def test_int8_weight_only_takes_widths_the_pack_kernel_cannot():
    """torch's int8 pack kernel crashes the process for input widths off a multiple of 16 (LightNet's GLU is 344
    wide, with 16+ rows); those layers take the dequantized path, in bfloat16 as in float32."""
    torch.manual_seed(0)
    q = Int8WeightOnlyLinear.from_float(nn.Linear(344, 128))
    x = torch.randn(32, 344)
    with torch.no_grad():
        reference = torch.nn.functional.linear(x, q.dequantize(), q.bias)
        assert relative_error(reference, q(x.bfloat16())) < 0.01
