"""What the device computes fast: its name and ISA level, whether it has native bfloat16 products, and the
precision that `auto` resolves to there, with the reason.

Why a measured probe and not only feature flags: a matrix product in bfloat16 is 3-5x faster than float32 with
AMX and 1.3-2.3x on AMD EPYCs with AVX-512 BF16 (a Zen 4 EPYC: 315-428 against 179-202 GFLOP/s, 256² to 2048², 2
threads; the probe's one-thread 256² product 1.95x), but only 0.5x on an AMX Xeon whose oneDNN is capped at
AVX-512 BF16 (`ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16`: 76-80 against 144-153 GFLOP/s, 256² to 2048², idle), and
~100x *slower* on AVX2-only CPUs (torch then has no bfloat16 GEMM kernel; 0.9 against 115 GFLOP/s measured).
Having the instructions is not the question; being faster than float32 is. torch's flags
(`torch.cpu._is_avx512_bf16_supported`, `_is_amx_tile_supported`) report the hardware, but the kernels that run
can be limited below it (`ATEN_CPU_CAPABILITY`, `ONEDNN_MAX_CPU_ISA`, a hypervisor that hides state), and having
them does not make them faster, so where the flags say yes a short product in each dtype decides (about a
millisecond on a native CPU; the answer is cached for the process).

Every command resolves its precision here, and so do the ops whose products would otherwise run in bfloat16
(`polyattn.ops.chunk_gated.matmul_dtype`, `polyattn.ops.attention._pick_backend`).
"""

from __future__ import annotations

import functools
import os
import platform
import time
from dataclasses import dataclass

import torch

from .errors import UserError

PRECISIONS = ("auto", "bf16", "fp16", "fp32")

# A CPU "has native bfloat16" (what `auto` picks bfloat16 for) when a bfloat16 product is at least as fast as a
# float32 one. Measured: AMX 3-5x, AVX-512 BF16 (AMD EPYC) 1.3-2.3x (its bfloat16 training steps 1.05-1.8x faster
# than float32 ones, `polyattn bench train`), an AMX Xeon with oneDNN capped at AVX-512
# BF16 0.51-0.54x (its bfloat16 training steps took 1.3-2.6x the float32 ones), emulated (AVX2) 0.005-0.02x. At
# 0.5 the capped Xeon counted as native and `auto` trained it in bfloat16 at half speed.
NATIVE_BF16_MIN_RATIO = 1.0
# The probe's product size: native bfloat16 measures 3-5x float32 here with AMX (only 0.7-1.1x at 128); an
# emulated bfloat16 product of this size takes ~70 ms, so the probe stops after one when it sees that.
PROBE_SIZE = 256


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo, or what `platform` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@functools.cache
def cpu_isa() -> str:
    """The CPU's vector ISA level as torch will use it: 'AMX', 'AVX-512 BF16', 'AVX-512', 'AVX2' or 'baseline'.

    The kernel level torch dispatches to (`get_cpu_capability`, which follows `ATEN_CPU_CAPABILITY`) and
    oneDNN's (`ONEDNN_MAX_CPU_ISA`) cap the hardware flags, so an AMX machine run with `ATEN_CPU_CAPABILITY=avx2`
    reports AVX2, and one run with `ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16` reports AVX-512 BF16.
    """
    capability = torch.backends.cpu.get_cpu_capability().upper()  # 'AVX512', 'AVX2', 'DEFAULT', ...
    if capability.startswith("AVX512"):
        if torch.cpu._is_amx_tile_supported() and _onednn_allows("AMX"):
            return "AMX"
        if torch.cpu._is_avx512_bf16_supported() and _onednn_allows("BF16"):
            return "AVX-512 BF16"
        return "AVX-512"
    if capability.startswith("AVX2"):
        return "AVX2"
    return "baseline"


def _onednn_allows(feature: str) -> bool:
    """Whether oneDNN, which runs torch's bfloat16 CPU products, may use `feature` ('AMX' or 'BF16').

    `ONEDNN_MAX_CPU_ISA` caps it below the hardware (e.g. `AVX512_CORE_BF16` on an AMX machine runs the bfloat16
    products of an AVX-512 BF16 CPU), and torch's flags do not see the cap. Its levels are cumulative: a cap
    that names AMX allows BF16 too; `AVX512_CORE_FP16` (Sapphire Rapids' AVX-512 without AMX) includes BF16.
    """
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA", "").strip().upper()
    if cap in ("", "ALL", "DEFAULT"):
        return True
    if "AMX" in cap:
        return True
    return feature == "BF16" and ("BF16" in cap or "FP16" in cap)


def device_name(device: torch.device) -> str:
    """A readable name: the CUDA device's, or the CPU model with its ISA level."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()} ({cpu_isa()})"


def _matmul_rate(dtype: torch.dtype, n: int, calls: int = 5) -> float:
    """FLOP/s of one thread's n×n product in `dtype`: the best of `calls` timed calls after a warm-up call.

    One thread: the probe wants the ratio of two dtypes' rates, and a multi-threaded small product on a loaded
    machine measures the scheduler (2-thread float32 at 128×128 measured 0.5 GFLOP/s beside 130 on one thread).
    The best of several calls: a single call can be preempted.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
        a @ b  # warm-up: the first call picks (and may JIT) a kernel
        t0 = time.perf_counter()
        a @ b
        best = time.perf_counter() - t0
        for _ in range(calls if best < 0.02 else 0):  # past 20 ms the dtype is emulated: no need for more
            t0 = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - t0)
    finally:
        torch.set_num_threads(threads)
    return 2 * n**3 / best


@functools.cache
def _measured_cpu_bf16_ratio() -> float:
    """The bfloat16 / float32 rate of a PROBE_SIZE² product on this CPU, measured (cached for the process)."""
    return _matmul_rate(torch.bfloat16, PROBE_SIZE) / _matmul_rate(torch.float32, PROBE_SIZE)


@functools.cache
def cpu_bf16_ratio() -> float:
    """The measured bfloat16 / float32 product rate on this CPU; 0 when torch's flags already say there is no
    bfloat16 hardware (or the dispatch level is capped below it), so AVX2 machines pay nothing for the probe."""
    if not (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()):
        return 0.0
    if cpu_isa() in ("AVX2", "baseline"):  # the dispatch level is capped below the hardware
        return 0.0
    return _measured_cpu_bf16_ratio()


@torch.compiler.assume_constant_result  # traced code (torch.compile) sees the answer, not the probe
def native_bf16(device: torch.device | str) -> bool:
    """Whether bfloat16 products run at least at float32 speed on `device` (CPUs: measured, `cpu_bf16_ratio`)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        return cpu_bf16_ratio() >= NATIVE_BF16_MIN_RATIO
    return False


@dataclass(frozen=True)
class Precision:
    """A resolved training/inference precision: the name used in configs, why it was chosen, and a warning when
    the user's explicit choice is slow on this device."""

    name: str
    reason: str
    warning: str | None = None

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.name)

    def describe(self) -> str:
        return f"{self.name} ({self.reason})"


def resolve_precision(requested: str, device: torch.device | str) -> Precision:
    """What `requested` ('auto', 'bf16', 'fp16' or 'fp32') means on `device`.

    auto: bfloat16 autocast where the device has native bfloat16 products, float32 elsewhere (float16 is never
    picked automatically: it needs a loss scaler and is only worth it on GPUs without bfloat16). An explicit bf16
    on a device without native bfloat16 still runs, with a warning; fp16 runs only on CUDA.
    """
    device = torch.device(device)
    if requested not in PRECISIONS:
        raise UserError(f"Precision '{requested}' is not one of {', '.join(PRECISIONS)}.")
    where = device_name(device)
    if requested == "auto":
        if native_bf16(device):
            return Precision("bf16", f"auto: {where} has native bfloat16 products")
        return Precision("fp32", f"auto: {where} {_no_bf16_why(device)}")
    if requested == "fp16":
        if device.type != "cuda":
            raise UserError("Precision fp16 (float16 autocast with a loss scaler) is for CUDA devices; on a CPU use "
                            "precision auto, bf16 or fp32.")
        return Precision("fp16", "requested (float16 autocast with a gradient scaler)")
    if requested == "bf16" and not native_bf16(device):
        if device.type == "cpu":
            slowdown = 1 / max(_measured_cpu_bf16_ratio(), 1e-6)
            digits = 0 if slowdown >= 10 else 1
            warning = (f"bf16 on {where}, whose bfloat16 matrix products run about {slowdown:.{digits}f}x slower "
                       f"than float32 ones; set precision auto or fp32.")
        else:
            warning = f"bf16 on {where}, which has no native bfloat16 support; set precision auto or fp32."
        return Precision("bf16", "requested", warning)
    return Precision(requested, "requested")


def _no_bf16_why(device: torch.device) -> str:
    """Why `auto` did not pick bfloat16 on `device`: no native products, or native ones slower than float32."""
    if device.type == "cpu" and cpu_bf16_ratio() > 0.05:  # above emulation: the instructions are there
        return f"computes bfloat16 products at {cpu_bf16_ratio():.2f}x the float32 rate"
    return "has no native bfloat16 products"


def autocast_for(precision: Precision, device: torch.device):
    """A context-manager factory for the forward pass of a resolved precision: bfloat16/float16 autocast (float32
    master weights stay untouched) or nothing."""
    from contextlib import nullcontext

    dtype = precision.autocast_dtype
    if dtype is None:
        return nullcontext
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


def resolve_device(name: str) -> torch.device:
    """'auto' (CUDA when available), 'cpu', 'cuda' or 'cuda:N' as a torch.device, checked to exist."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise UserError(f"Device '{name}' is not a device; use auto, cpu, cuda or cuda:N.") from err
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"Device '{name}' is not supported; use auto, cpu, cuda or cuda:N.")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"Device '{name}' asks for CUDA but no CUDA device is available; use --device cpu.")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"Device '{name}' does not exist: this machine has {torch.cuda.device_count()} CUDA "
                            f"device(s), cuda:0 to cuda:{torch.cuda.device_count() - 1}.")
    return device


def environment(device: torch.device, precision: Precision | None = None) -> dict:
    """What a run or benchmark ran on, for its config, summary or JSON header."""
    out = {
        "device": str(device),
        "device_name": device_name(device),
        "cpu": cpu_name(),
        "isa": cpu_isa(),
        "threads": torch.get_num_threads(),
        "torch": str(torch.__version__),
    }
    if device.type == "cuda":
        out["cuda"] = str(torch.version.cuda)
    if precision is not None:
        out["precision"] = precision.name
        out["precision_reason"] = precision.reason
    env = {k: os.environ[k] for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")
           if k in os.environ}
    if env:
        out["isa_limits"] = env
    return out


__all__ = ["PRECISIONS", "Precision", "autocast_for", "cpu_isa", "cpu_name", "device_name", "environment",
           "native_bf16", "resolve_device", "resolve_precision"]
