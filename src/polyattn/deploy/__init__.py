"""Taking a trained run elsewhere: export to ONNX or a `torch.export` program (`export`), including the
single-token decoding step with its state as explicit tensors (`decode_step`), and weight quantization into a new
run directory (`quantize`). Optional packages (onnx, onnxscript, onnxruntime) are imported on first use.
"""

from .decode_step import BoundedKVStep, DecodeStep, RecurrentStep, WindowStep, decode_step, greedy_decode
from .export import FORMATS, export_run, load_exported
from .quantize import (
    METHODS,
    DynamicInt8Linear,
    Int4WeightOnlyLinear,
    Int8WeightOnlyLinear,
    quantize_model,
    quantize_run,
)
from .record import rebuild

__all__ = ["FORMATS", "METHODS", "BoundedKVStep", "DecodeStep", "DynamicInt8Linear", "Int4WeightOnlyLinear",
           "Int8WeightOnlyLinear", "RecurrentStep", "WindowStep", "decode_step", "export_run", "greedy_decode",
           "load_exported", "quantize_model", "quantize_run", "rebuild"]
