"""Measures the weight-only quantized layers' CPU paths, for the README "Deploy" table of the AVX2 check.

    PYTHONPATH=src python scripts/quant_kernels.py
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 \
        PYTHONPATH=src python scripts/quant_kernels.py      # as on an AVX2-only CPU

One 512 → 1536 layer, one thread, ms per call (median of 5 after a warm-up), at 1 row (decoding) and 256 rows
(evaluation): the float layer in float32 and bfloat16, torch's int8/int4 pack kernels with bfloat16 and with
float32 activations (whether they take them, and how fast), and the float32 path of the quantized layers
(dequantize, then the float32 matmul). On a shared machine the figures are indications, not benchmarks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from polyattn.bench.common import median, time_call
from polyattn.deploy.quantize import INT4_GROUP, Int4WeightOnlyLinear, Int8WeightOnlyLinear
from polyattn.hardware import cpu_isa, native_bf16


def median_ms(fn, repeats: int = 5) -> float:
    """Median milliseconds of `repeats` calls of `fn`, after one warm-up call."""
    fn()
    return median(time_call(fn, torch.device("cpu"), repeats)) * 1e3


def main() -> None:
    torch.set_num_threads(1)
    print(f"ISA {cpu_isa()} (dispatch {torch.backends.cpu.get_cpu_capability()}), native bf16 "
          f"{native_bf16('cpu')}, torch {torch.__version__}")
    torch.manual_seed(0)
    linear = nn.Linear(512, 1536)
    q8, q4 = Int8WeightOnlyLinear.from_float(linear), Int4WeightOnlyLinear.from_float(linear)
    w_bf16 = linear.weight.detach().bfloat16()

    def paths(x: torch.Tensor) -> dict:
        xb = x.bfloat16()
        return {
            "float32 matmul": lambda: F.linear(x, linear.weight),
            "bfloat16 matmul": lambda: F.linear(xb, w_bf16),
            "int8 pack kernel, bf16": lambda: torch._weight_int8pack_mm(xb, q8.weight_int8,
                                                                        q8.weight_scale.bfloat16()),
            "int8 pack kernel, fp32": lambda: torch._weight_int8pack_mm(x, q8.weight_int8, q8.weight_scale),
            "int8 dequantized, fp32": lambda: q8(x),
            "int4 pack kernel, bf16": lambda: torch._weight_int4pack_mm_for_cpu(
                xb, q4._packed, INT4_GROUP, q4.scales_and_zeros.bfloat16()),
            "int4 pack kernel, fp32": lambda: torch._weight_int4pack_mm_for_cpu(
                x, q4._packed, INT4_GROUP, q4.scales_and_zeros),
            "int4 dequantized, fp32": lambda: q4(x),
        }

    for rows in (1, 256):
        with torch.no_grad():
            for name, fn in paths(torch.randn(rows, 512)).items():
                try:
                    print(f"{rows:4d} rows  {name:24s} {median_ms(fn):9.3f} ms")
                except RuntimeError as err:
                    print(f"{rows:4d} rows  {name:24s} refused: {err}")


if __name__ == "__main__":
    main()
