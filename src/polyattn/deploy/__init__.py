"""Taking a trained run elsewhere: export to ONNX or a `torch.export` program (`export`), including the
single-token decoding step with its state as explicit tensors (`decode_step`); weight quantization into a new run
directory (`quantize`); structured pruning of attention heads and MLP channels, with an optional short fine-tune
(`prune`). The optional packages (onnx, onnxscript, onnxruntime, torch-pruning) are imported on first use.
"""

from .decode_step import (
    BoundedKVStep,
    DecodeStep,
    LatentWindowStep,
    RecurrentStep,
    WindowStep,
    decode_step,
    greedy_decode,
)
from .export import FORMATS, export_run, load_exported
from .prune import apply_plan, finetune_pruned, prune_model, prune_plan, prune_run
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
           "Int8WeightOnlyLinear", "LatentWindowStep", "RecurrentStep", "WindowStep", "apply_plan", "decode_step",
           "export_run", "finetune_pruned", "greedy_decode", "load_exported", "prune_model", "prune_plan",
           "prune_run", "quantize_model", "quantize_run", "rebuild"]
