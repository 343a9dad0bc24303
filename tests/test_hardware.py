"""Precision and kernels chosen per device (polyattn.hardware): auto resolves by what the device computes natively,
explicit slow choices warn, the ops' internal dtype decisions follow the device, and runs record what they ran on."""

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

from polyattn import UserError, hardware
from polyattn.hardware import Precision, resolve_precision

AVX2_ONLY = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}


@pytest.fixture
def bf16_native(monkeypatch):
    """Sets whether this CPU counts as computing bfloat16 natively, for the resolver and for the ops."""
    import polyattn.ops.attention as attention_ops
    import polyattn.ops.chunk_gated as chunk_ops

    def set_native(value: bool):
        for module in (hardware, attention_ops, chunk_ops):
            monkeypatch.setattr(module, "native_bf16", lambda device, v=value: v)
        monkeypatch.setattr(hardware, "cpu_bf16_ratio", lambda v=value: 3.0 if v else 0.0)
        monkeypatch.setattr(hardware, "_measured_cpu_bf16_ratio", lambda: 0.01)

    return set_native


@pytest.mark.parametrize("native, expected", [(True, "bf16"), (False, "fp32")])
def test_auto_picks_bf16_only_where_native(bf16_native, native, expected):
    bf16_native(native)
    p = resolve_precision("auto", "cpu")
    assert p.name == expected and p.reason.startswith("auto: ") and p.warning is None
    assert p.autocast_dtype == (torch.bfloat16 if native else None)


def test_explicit_bf16_on_a_slow_cpu_runs_with_a_warning_saying_what_to_set(bf16_native):
    bf16_native(False)
    p = resolve_precision("bf16", "cpu")
    assert p.name == "bf16"
    assert "100x slower" in p.warning and "auto or fp32" in p.warning
    bf16_native(True)
    assert resolve_precision("bf16", "cpu").warning is None
    assert resolve_precision("fp32", "cpu") == Precision("fp32", "requested")


def test_fp16_is_for_cuda_and_unknown_precisions_are_errors():
    with pytest.raises(UserError, match="for CUDA devices"):
        resolve_precision("fp16", "cpu")
    with pytest.raises(UserError, match="is not one of auto, bf16, fp16, fp32"):
        resolve_precision("half", "cpu")


def test_the_probe_answers_for_this_cpu_and_names_its_isa():
    assert hardware.cpu_isa() in ("AMX", "AVX-512 BF16", "AVX-512", "AVX2", "baseline")
    native = hardware.native_bf16("cpu")
    assert isinstance(native, bool)
    if hardware.cpu_isa() in ("AVX2", "baseline", "AVX-512"):
        assert not native
    env = hardware.environment(torch.device("cpu"), resolve_precision("auto", "cpu"))
    assert env["isa"] == hardware.cpu_isa() and env["precision"] in ("bf16", "fp32") and env["cpu"]
    yaml.safe_dump(env)  # plain values only: it goes into config.yaml


def test_an_avx2_only_cpu_resolves_to_float32():
    """The kernels torch may use are capped at AVX2 (as on an AVX2-only machine): the probe must see it."""
    code = ("from polyattn import hardware; p = hardware.resolve_precision('auto', 'cpu'); "
            "print(hardware.cpu_isa(), hardware.native_bf16('cpu'), p.name)")
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, **AVX2_ONLY}, capture_output=True,
                         text=True, timeout=120, check=True).stdout.split()
    assert out == ["AVX2", "False", "fp32"]


def test_resolve_device_names_what_to_use_instead():
    assert hardware.resolve_device("cpu") == torch.device("cpu")
    assert hardware.resolve_device("auto").type in ("cpu", "cuda")
    with pytest.raises(UserError, match="not a device"):
        hardware.resolve_device("gpu0")
    with pytest.raises(UserError, match="not supported"):
        hardware.resolve_device("meta")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="no CUDA device"):
            hardware.resolve_device("cuda:0")


def test_lightnet_products_run_in_float32_for_bfloat16_inputs_where_bfloat16_is_slow(bf16_native):
    from polyattn.ops.chunk_gated import matmul_dtype

    x = torch.zeros(1, 4, 1, 8, dtype=torch.bfloat16)
    bf16_native(False)
    assert matmul_dtype(x, x) == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert matmul_dtype(x.float(), x.float()) == torch.float32
    bf16_native(True)
    assert matmul_dtype(x, x) == torch.bfloat16
    assert matmul_dtype(x.double(), x.double()) == torch.float64


def test_short_bfloat16_attention_takes_the_explicit_path_only_where_bfloat16_is_native(bf16_native):
    from polyattn.ops.attention import Backend, MaskMode, _pick_backend

    q = torch.zeros(1, 65, 2, 8, dtype=torch.bfloat16)
    bf16_native(True)
    assert _pick_backend(Backend.AUTO, MaskMode.CAUSAL, q, 65) is Backend.EXPLICIT
    bf16_native(False)
    assert _pick_backend(Backend.AUTO, MaskMode.CAUSAL, q, 65) is Backend.SDPA
    assert _pick_backend(Backend.AUTO, MaskMode.ILLAMA_SOFT, q, 65) is Backend.EXPLICIT  # only it can


def test_both_attention_paths_agree_in_bfloat16():
    """The per-device choice picks between two forms of one operator: they must agree."""
    from polyattn.ops.attention import attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 33, 2, 16, generator=g).bfloat16() for _ in range(3))
    a = attention(q, k, v, mask_mode="causal", backend="explicit").float()
    b = attention(q, k, v, mask_mode="causal", backend="sdpa").float()
    torch.testing.assert_close(a, b, atol=2e-2, rtol=2e-2)


def test_a_run_records_what_it_ran_on_and_resume_keeps_its_precision(tmp_path, cache_dir, bf16_native, capsys):
    from polyattn.train.config import build_config
    from polyattn.train.loop import load_run_config, train

    bf16_native(False)
    config = build_config("default", ["train.max_steps=2", "train.epochs=1", "train.progress=false", "model.depth=1",
                                      f"train.out_dir={tmp_path}", "train.run_name=r", "train.checkpoint_every=1"])
    summary = train(config, evaluate=False)
    assert "cpu, fp32 (auto: " in capsys.readouterr().err
    stored = yaml.safe_load((tmp_path / "r" / "config.yaml").read_text())
    assert stored["train"]["precision"] == "auto"  # what was asked, and what it resolved to, both kept
    assert stored["environment"]["precision"] == "fp32" and "no native bfloat16" in stored["environment"][
        "precision_reason"]
    assert summary["precision"] == "fp32" and summary["isa"] == hardware.cpu_isa()
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["precision_reason"]

    # On a machine where auto would now mean bf16, the resumed run keeps fp32, so it stays exact.
    bf16_native(True)
    (tmp_path / "r" / "summary.json").unlink()
    resumed = load_run_config(tmp_path / "r")
    resumed.train.max_steps = 3
    summary = train(resumed, resume_dir=tmp_path / "r", evaluate=False)
    assert summary["precision"] == "fp32" and "kept from the run's start" in summary["precision_reason"]


def test_inference_precision_reproduces_the_run_and_stays_fast(bf16_native):
    from polyattn.train.config import RunConfig
    from polyattn.train.loop import inference_precision

    cpu = torch.device("cpu")
    config = RunConfig()
    config.environment = {"precision": "fp32"}
    bf16_native(True)
    assert inference_precision("auto", cpu, config).name == "fp32"  # eval matches the run's own numbers
    config.environment = {"precision": "bf16"}
    assert inference_precision("auto", cpu, config).name == "bf16"
    bf16_native(False)
    p = inference_precision("auto", cpu, config)
    assert p.name == "fp32" and "does not compute" in p.reason  # not 100x slower on an AVX2 laptop
    assert inference_precision("bf16", cpu, config).warning
    config.environment = None
    config.train.precision = "bf16"  # a run from before runs recorded their environment
    assert inference_precision("auto", cpu, config).name == "fp32"


def test_train_takes_device_and_precision_on_the_command_line(tmp_path, cache_dir, capsys):
    from polyattn.cli import main

    code = main(["train", "default", "--device", "cpu", "--precision", "fp32", "train.max_steps=1",
                 "train.epochs=1", "train.progress=false", "model.depth=1", f"train.out_dir={tmp_path}",
                 "train.run_name=c"])
    assert code == 0
    stored = yaml.safe_load((tmp_path / "c" / "config.yaml").read_text())
    assert stored["train"]["device"] == "cpu" and stored["train"]["precision"] == "fp32"
    assert "cpu, fp32 (requested)" in capsys.readouterr().err
    assert main(["train", "default", "--device", "gpu", f"train.out_dir={tmp_path}"]) == 2


@pytest.mark.parametrize("isa, native, keys", [("AMX", True, 128), ("AVX-512 BF16", True, 192), ("AVX2", False, 0)])
def test_the_explicit_attention_threshold_is_the_one_measured_for_each_cpu_kind(monkeypatch, isa, native, keys):
    import polyattn.ops.attention as attention_ops
    from polyattn.ops.attention import Backend, MaskMode, _pick_backend

    monkeypatch.setattr(attention_ops, "cpu_isa", lambda: isa)
    monkeypatch.setattr(attention_ops, "native_bf16", lambda device: native)
    assert attention_ops.explicit_max_keys_cpu() == keys
    q = torch.zeros(1, 1, 2, 8, dtype=torch.bfloat16)
    assert _pick_backend(Backend.AUTO, MaskMode.CAUSAL, q, 257) is (Backend.EXPLICIT if keys >= 257 else Backend.SDPA)


@pytest.mark.parametrize("cap, isa", [("", "AMX"), ("DEFAULT", "AMX"), ("AVX512_CORE_AMX", "AMX"),
                                      ("AVX512_CORE_BF16", "AVX-512 BF16"), ("avx512_core_fp16", "AVX-512 BF16"),
                                      ("AVX512_CORE_VNNI", "AVX-512"), ("AVX2", "AVX-512")])
def test_the_isa_level_follows_onednns_cap(monkeypatch, cap, isa):
    """oneDNN runs the bfloat16 products; capped below the hardware, the ISA level (and what is decided from it,
    e.g. the explicit attention path's key limit) is the cap's. AVX2 for oneDNN alone leaves torch's own kernels at
    AVX-512, so the level stays AVX-512 (the probe then measures the products)."""
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
    hardware.cpu_isa.cache_clear()
    try:
        assert hardware.cpu_isa() == isa
    finally:
        monkeypatch.undo()
        hardware.cpu_isa.cache_clear()


def test_bfloat16_instructions_slower_than_float32_resolve_to_float32(monkeypatch):
    """AVX-512 BF16 without AMX can compute bfloat16 products at half the float32 rate (an AMX Xeon with oneDNN
    capped at AVX512_CORE_BF16 measured 0.51x): having the instructions is not enough for `auto`."""
    for ratio, expected in ((0.51, "fp32"), (0.99, "fp32"), (1.0, "bf16"), (1.4, "bf16")):
        monkeypatch.setattr(hardware, "cpu_bf16_ratio", lambda r=ratio: r)
        monkeypatch.setattr(hardware, "_measured_cpu_bf16_ratio", lambda r=ratio: r)
        assert hardware.native_bf16("cpu") == (expected == "bf16")
        p = resolve_precision("auto", "cpu")
        assert p.name == expected
        if expected == "fp32":
            assert f"at {ratio:.2f}x the float32 rate" in p.reason
            assert f"about {1 / ratio:.1f}x slower" in resolve_precision("bf16", "cpu").warning
