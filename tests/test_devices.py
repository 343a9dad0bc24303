"""The contracts, on every device this machine has: fast == reference (forward and backward), causality, cached
decoding == the full forward, training and exact resume. On a CPU-only machine they run on the CPU (and the
meta-device check below); on a machine with CUDA they also run there: `make gpu-check` runs this file on CUDA.

Tolerances on CUDA: TF32 is off (torch's default for matmuls), but reductions are ordered differently from the
CPU's, so comparisons use the float32 tolerances below, and resume on CUDA is exact to 1e-4 instead of bit for bit
(cuBLAS does not promise the same summation order across processes).
"""

import pytest
import torch

import polyattn
from polyattn.bench.training import WORKLOADS, quick
from polyattn.ops.attention import attention, attention_ref
from polyattn.ops.decay_scan import decay_attn, decay_attn_reference
from polyattn.ops.lightnet import lightnet_attn, lightnet_reference
from polyattn.registry import create_model, model_task
from polyattn.testing import decode_in_steps

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


def _inputs(device, *shape, n=3, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g, dtype=dtype).to(device).requires_grad_() for _ in range(n)]


def _grads(out, inputs):
    return torch.autograd.grad(out, inputs, torch.ones_like(out))


@pytest.mark.parametrize("causal", [True, False])
def test_lightnet_fast_equals_reference(device, causal):
    q, k, v = _inputs(device, 2, 37, 2, 8)
    fast, _ = lightnet_attn(q, k, v, causal=causal, chunk_size=8)
    ref, _ = lightnet_reference(q.double(), k.double(), v.double(), causal=causal)
    torch.testing.assert_close(fast.double(), ref, atol=1e-5, rtol=1e-4)
    for a, b in zip(_grads(fast, (q, k, v)), _grads(ref, (q, k, v))):
        torch.testing.assert_close(a.double(), b.double(), atol=1e-4, rtol=1e-3)


def test_decay_scan_fast_equals_reference(device):
    q, k, v = _inputs(device, 2, 37, 2, 8)
    g = torch.nn.functional.logsigmoid(torch.randn(2, 37, 2, 8, generator=torch.Generator().manual_seed(1)) + 2)
    g = g.to(device).requires_grad_()
    fast, _ = decay_attn(q, k, v, g, chunk_size=8)
    ref, _ = decay_attn_reference(q.double(), k.double(), v.double(), g.double())
    torch.testing.assert_close(fast.double(), ref, atol=1e-5, rtol=1e-4)
    for a, b in zip(_grads(fast, (q, k, v, g)), _grads(ref, (q, k, v, g))):
        torch.testing.assert_close(a.double(), b.double(), atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("mode", ["bidirectional", "causal", "illama_soft"])
def test_attention_both_backends_equal_reference(device, mode):
    q, k, v = _inputs(device, 2, 19, 2, 8)
    ref = attention_ref(q, k, v, mask_mode=mode, soft_mask_a=0.3)
    ref_grads = _grads(ref, (q, k, v))
    for backend in ("auto", "explicit") if mode == "illama_soft" else ("sdpa", "explicit"):
        out = attention(q, k, v, mask_mode=mode, soft_mask_a=0.3, backend=backend)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
        for a, b in zip(_grads(out, (q, k, v)), ref_grads):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


CAUSAL_LMS = ["llama_lm_nano", "lightnet_lm_nano", "perceiver_ar_nano", "llp_nano"]


def _tiny_lm(name, device):
    from polyattn.registry import get_entry

    params = get_entry(name).parameters()
    # Perceivers: every position of these short sequences is a latent, as in tests/test_lm_models.py (their
    # cache is exact against recomputation of the same prefix, which the full forward is only then)
    args = dict(vocab_size=61, dim=32, depth=2, num_heads=2, chunk_size=8, max_seq_len=64, num_latents=32,
                segment_len=8)
    torch.manual_seed(0)
    return create_model(name, **{k: v for k, v in args.items() if k in params}).to(device).eval()


@pytest.mark.parametrize("name", CAUSAL_LMS)
def test_causal_lms_are_causal_and_cached_decoding_equals_the_full_forward(device, name):
    model = _tiny_lm(name, device)
    x = torch.randint(0, 61, (2, 32), generator=torch.Generator().manual_seed(1)).to(device)
    with torch.no_grad():
        full = model(x)
        y = x.clone()
        y[:, -1] = (y[:, -1] + 1) % 61
        torch.testing.assert_close(model(y)[:, :-1], full[:, :-1], atol=1e-5, rtol=0)
        steps = [logits for logits, _ in decode_in_steps(model, x, x.shape[1] - 4)]
        torch.testing.assert_close(torch.cat(steps, 1), full, atol=5e-5, rtol=1e-4)


@pytest.mark.parametrize("workload", WORKLOADS, ids=lambda w: w.name)
def test_forward_and_backward_create_no_tensor_on_another_device(workload):
    """Every model runs forward and backward on the meta device: a tensor made on the CPU inside forward (the
    usual reason a model fails on CUDA) would meet a meta tensor and raise. 0-dim CPU scalars are allowed by torch
    on every device, so they pass here as they do on CUDA."""
    w = quick(workload)
    with torch.device("meta"):
        model = create_model(w.model, **w.args)
    task, meta = model_task(w.model), torch.device("meta")
    if task == "classification":
        out = model(torch.randn(2, 3, 32, 32, device=meta))
    elif task == "diffusion":
        out = model(torch.randn(2, 3, 32, 32, device=meta), torch.rand(2, device=meta),
                    torch.randint(0, 10, (2,), device=meta))
    else:
        out = model(torch.randint(0, 256, (2, w.seq_len), device=meta))
    assert out.device == meta
    out.float().sum().backward()


@pytest.mark.parametrize("name", ["llama_lm_nano", "lightnet_lm_nano", "perceiver_ar_nano"])
def test_cached_decoding_creates_no_tensor_on_another_device(name):
    with torch.device("meta"):
        model = _tiny_lm(name, "meta")
    x = torch.randint(0, 61, (2, 20), device="meta")
    with torch.no_grad():
        logits, cache = model.forward_cached(x)
        logits, cache = model.forward_cached(x[:, :1], cache)
    assert logits.device.type == "meta"


def test_training_and_exact_resume_on_the_device(device, tmp_path, cache_dir):
    from polyattn.train.config import build_config
    from polyattn.train.loop import load_run_config, train

    base = ["model=vit_nano", "model.depth=1", "model.embed_dim=32", "model.num_heads=2", "train.epochs=2",
            "train.batch_size=256", "train.progress=false", "train.precision=fp32", f"train.device={device}",
            f"train.out_dir={tmp_path}"]
    ref = train(build_config("default", [*base, "train.run_name=ref"]))
    steps_per_epoch = ref["steps"] // 2
    train(build_config("default", [*base, "train.run_name=cut", f"train.max_steps={steps_per_epoch + 1}",
                                   "train.checkpoint_every=1"]))
    for name in ("summary.json", "model.safetensors"):
        (tmp_path / "cut" / name).unlink()
    config = load_run_config(tmp_path / "cut")
    config.train.max_steps = None
    resumed = train(config, resume_dir=tmp_path / "cut")
    if device.type == "cpu":
        assert resumed["test"] == ref["test"]
    else:
        for key, value in ref["test"].items():
            assert resumed["test"][key] == pytest.approx(value, abs=1e-4), key
    assert ref["device"] == str(device) and polyattn.hardware.cpu_isa()
