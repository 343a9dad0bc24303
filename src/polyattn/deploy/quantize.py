"""`polyattn quantize RUN_DIR --method M`: the run's linear layers in 8 or 4 bits, as a new run directory.

Methods (every `nn.Linear` whose weight is its own, i.e. not tied to an embedding, and whose input width the
method's grouping divides; embeddings, convolutions, norms and every op stay as they were):

- `int8-dynamic`: int8 weights (symmetric, one scale per output channel) and activations quantized to int8 per
  call (per tensor, from their range), int8 products accumulated in int32 by fbgemm:
  `torch.ops.quantized.linear_dynamic`, the kernel of `torch.ao.quantization.quantize_dynamic`. Chosen over
  torchao's `Int8DynamicActivationInt8WeightConfig` because that one is 2-10x slower in CPU eager mode here
  (measured, README "Deploy"; open reports ao#3157, ao#4365: it is meant to be paired with torch.compile).
- `int8-weight-only`: int8 weights (one scale per output channel), activations in their own dtype. On CPU in
  bfloat16 the product is `torch._weight_int8pack_mm` (the kernel torchao's `Int8WeightOnlyConfig` calls; input
  widths that are a multiple of `INT8_PACK_MULTIPLE` only, it crashes on others); in
  float32 that kernel is slower than dequantizing once per call and using the float matmul, so that is done.
- `int4-weight-only` (layers with input widths divisible by 32, output widths by 16; others stay float): 4-bit
  weights in groups of 32 input channels with a float scale and zero per group
  (asymmetric, torchao's `Int4WeightOnlyConfig` layout), two weights per byte on disk; bfloat16 on CPU runs
  `torch._weight_int4pack_mm_for_cpu`, otherwise the weights are dequantized per call.

The quantized modules hold plain tensors (int8/uint8 weights, float32 scales), so the run directory stays a
safetensors state dict; `config.yaml` gains a `deploy` record (method, source run, the replaced modules) from which
`load_run` rebuilds the quantized modules before loading the weights (`polyattn.deploy.record`). `eval`,
`generate`, `sample`, `inspect` and `bench` read the new directory as any other.

What stays float32: everything that is not a linear layer's weight. LightNet's state `S` and log-normaliser `z`
are computed by the ops in float32 from the (dequantized) projections, and softmax attention in float32, exactly
as in the float model.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError

METHODS = ("int8-dynamic", "int8-weight-only", "int4-weight-only")
INT4_GROUP = 32
INT8_PACK_MULTIPLE = 16
"""`torch._weight_int8pack_mm` (torch 2.13, CPU) crashes the process (a general protection fault) for input widths
that are not a multiple of 16 once there are 16 rows or more (measured: 340 and 344 crash, 320, 336 and 352 run;
LightNet's GLU is 344 wide); such layers take the dequantized path."""


def _per_channel_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 with one scale per output row: `w ≈ q · scale[:, None]`, q in [-127, 127]."""
    scale = (w.abs().amax(1) / 127).clamp_min(1e-12).float()
    return torch.round(w.float() / scale[:, None]).clamp(-127, 127).to(torch.int8), scale


class QuantizedLinear(nn.Module):
    """Base of the quantized linear layers: the float layer's shape, its float32 bias, `weight` dequantized.

    A method says how it stores a weight (`quantize_weight`, `dequantize`) and, where its kernel wants the weight
    prepacked, how it packs it (`repack`, called after the stored tensors are set or loaded)."""

    def __init__(self, in_features: int, out_features: int, bias: bool):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    @classmethod
    def from_float(cls, linear: nn.Linear) -> QuantizedLinear:
        q = cls(linear.in_features, linear.out_features, linear.bias is not None)
        q.quantize_weight(linear.weight.detach())
        if linear.bias is not None:
            q.bias = linear.bias.detach().float().clone()
        q.repack()
        return q

    def quantize_weight(self, w: torch.Tensor) -> None:
        """Sets the stored tensors from the float weight `w [out, in]`."""
        raise NotImplementedError

    def repack(self) -> None:
        """Packs the stored weight for the method's kernel; nothing to do for a kernel that reads it as stored."""

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized float32 weight `[out, in]` (for code that reads a layer's weight or its dtype)."""
        return self.dequantize()

    def dequantize(self) -> torch.Tensor:
        raise NotImplementedError

    def quantized_parameters(self) -> int:
        """The float layer's parameter count this layer stands for (`polyattn.registry.parameter_count`)."""
        return self.in_features * self.out_features + (0 if self.bias is None else self.out_features)

    def _float(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantize().to(x.dtype), bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class PerChannelInt8Linear(QuantizedLinear):
    """The storage both int8 methods share: `weight_int8 [out, in]` and one float32 scale per output channel."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__(in_features, out_features, bias)
        self.register_buffer("weight_int8", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_features))

    def quantize_weight(self, w: torch.Tensor) -> None:
        self.weight_int8, self.weight_scale = _per_channel_int8(w)

    def dequantize(self) -> torch.Tensor:
        return self.weight_int8.float() * self.weight_scale[:, None]


class DynamicInt8Linear(PerChannelInt8Linear):
    """int8 weights and per-call int8 activations (`int8-dynamic`, module docstring)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__(in_features, out_features, bias)
        self._packed = None
        # the fbgemm kernel takes its weight prepacked; pack again whenever the stored tensors change
        self.register_load_state_dict_post_hook(lambda module, _: module.repack())
        self.repack()

    def repack(self) -> None:
        qweight = torch._make_per_channel_quantized_tensor(
            self.weight_int8.cpu(), self.weight_scale.double().cpu(),
            torch.zeros(self.out_features, dtype=torch.long), 0)
        self._packed = torch.ops.quantized.linear_prepack(qweight, None if self.bias is None else self.bias.cpu())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu":
            return self._float(x)
        # fbgemm x86: activations in 7 bits (reduce_range) so int8 products cannot overflow its int16 adds
        out = torch.ops.quantized.linear_dynamic(x.float().reshape(-1, self.in_features), self._packed, True)
        return out.reshape(*x.shape[:-1], self.out_features).to(x.dtype)


class Int8WeightOnlyLinear(PerChannelInt8Linear):
    """int8 weights, activations in their own dtype (`int8-weight-only`, module docstring)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and x.dtype == torch.bfloat16 and self.in_features % INT8_PACK_MULTIPLE == 0:
            out = torch._weight_int8pack_mm(x.reshape(-1, self.in_features), self.weight_int8,
                                            self.weight_scale.to(torch.bfloat16))
            out = out.reshape(*x.shape[:-1], self.out_features)
            return out if self.bias is None else out + self.bias.to(out.dtype)
        return self._float(x)


class Int4WeightOnlyLinear(QuantizedLinear):
    """4-bit weights in groups of `INT4_GROUP` input channels (`int4-weight-only`, module docstring).

    Stored: `weight_int4 [out, in/2]` uint8 (two 4-bit values per byte, low nibble first) and
    `scales_and_zeros [in/G, out, 2]` float32; a weight is `(q − 8) · scale + zero` (the layout of torch's int4
    kernels), with `zero = min + 8 · scale` and `scale = (max − min) / 15` over its group.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__(in_features, out_features, bias)
        if in_features % INT4_GROUP:
            raise ValueError(f"int4 groups of {INT4_GROUP} need in_features divisible by it, got {in_features}")
        self.register_buffer("weight_int4", torch.zeros(out_features, in_features // 2, dtype=torch.uint8))
        self.register_buffer("scales_and_zeros", torch.zeros(in_features // INT4_GROUP, out_features, 2))
        self._packed = None
        self.register_load_state_dict_post_hook(lambda module, _: module.repack())

    def quantize_weight(self, w: torch.Tensor) -> None:
        w = w.float().reshape(self.out_features, -1, INT4_GROUP)  # (N, K/G, G)
        lo, hi = w.amin(-1), w.amax(-1)
        scale = ((hi - lo) / 15).clamp_min(1e-12)
        codes = torch.round((w - lo[..., None]) / scale[..., None]).clamp(0, 15).to(torch.uint8).flatten(1)
        self.weight_int4 = codes[:, 0::2] | (codes[:, 1::2] << 4)
        self.scales_and_zeros = torch.stack((scale, lo + 8 * scale), -1).transpose(0, 1).contiguous()

    def codes(self) -> torch.Tensor:
        """The 4-bit values `[out, in]` (0..15)."""
        return torch.stack((self.weight_int4 & 15, self.weight_int4 >> 4), -1).flatten(1)

    def repack(self) -> None:
        self._packed = None
        if self.weight_int4.device.type == "cpu":
            self._packed = torch._convert_weight_to_int4pack_for_cpu(self.codes().to(torch.int32), 1)

    def dequantize(self) -> torch.Tensor:
        scale, zero = self.scales_and_zeros.unbind(-1)  # (K/G, N) each
        codes = self.codes().float().reshape(self.out_features, -1, INT4_GROUP)
        return ((codes - 8) * scale.t()[..., None] + zero.t()[..., None]).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._packed is not None and x.device.type == "cpu" and x.dtype == torch.bfloat16:
            out = torch._weight_int4pack_mm_for_cpu(x.reshape(-1, self.in_features), self._packed, INT4_GROUP,
                                                    self.scales_and_zeros.to(torch.bfloat16))
            out = out.reshape(*x.shape[:-1], self.out_features)
            return out if self.bias is None else out + self.bias.to(out.dtype)
        return self._float(x)


QUANTIZED = {"int8-dynamic": DynamicInt8Linear, "int8-weight-only": Int8WeightOnlyLinear,
             "int4-weight-only": Int4WeightOnlyLinear}


def quantizable_linears(model: nn.Module, method: str) -> list[str]:
    """Names of the linear layers `method` replaces: every `nn.Linear` whose weight no other module shares (a
    head tied to the embedding stays float) and, for int4, whose input width the group size divides and whose
    output width is a multiple of 16."""
    counts: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        counts[id(p)] = counts.get(id(p), 0) + 1
    names = []
    for name, module in model.named_modules():
        if type(module) is nn.Linear and counts[id(module.weight)] == 1:
            if method == "int4-weight-only" and (module.in_features % INT4_GROUP or module.out_features % 16):
                continue  # the int4 kernel packs output rows in blocks of 16
            names.append(name)
    return names


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, new)


def quantize_model(model: nn.Module, method: str, names: list[str] | None = None) -> list[str]:
    """Replaces the linear layers `names` (default `quantizable_linears`) of `model` by their `method` form, in
    place, from their current weights; returns the names."""
    if method not in METHODS:
        raise UserError(f"Unknown quantization method '{method}'; choose one of {', '.join(METHODS)}.")
    names = quantizable_linears(model, method) if names is None else names
    for name in names:
        _replace(model, name, QUANTIZED[method].from_float(model.get_submodule(name)))
    return names


def empty_quantized(model: nn.Module, method: str, names: list[str]) -> None:
    """Replaces the linear layers `names` by empty `method` modules of their shape (weights loaded afterwards)."""
    if method not in METHODS:
        raise UserError(f"Unknown quantization method '{method}' in the run's deploy record; it was written by "
                        f"another polyattn version.")
    for name in names:
        linear = model.get_submodule(name)
        _replace(model, name, QUANTIZED[method](linear.in_features, linear.out_features, linear.bias is not None))




def quantize_run(run_dir: Path | str, method: str, out: Path | str | None = None) -> Path:
    """Writes a quantized copy of a run directory (module docstring) and returns it.

    Args:
        out (Path, Optional): the new run directory (must not exist); default `RUN_DIR-<method>` beside it.
    """
    from ..train.loop import load_run

    if method not in METHODS:
        raise UserError(f"Unknown quantization method '{method}'; choose one of {', '.join(METHODS)}.")
    run_dir = Path(run_dir)
    run = load_run(run_dir)
    out = Path(out) if out is not None else run_dir.with_name(f"{run_dir.name}-{method}")
    if out.exists():
        raise UserError(f"{out} already exists; pass --out with a new directory or remove it.")
    model, config = run.model.float().cpu(), run.config
    names = quantize_model(model, method)
    if not names:
        raise UserError(f"{config.model.name} has no linear layer that {method} can quantize.")
    record = {"transform": "quantize", "method": method, "source_run": str(run_dir.resolve()),
              "source_weights": run.weights, "modules": names}
    return write_transformed_run(run_dir, config, model, record, out)


def write_transformed_run(run_dir: Path, config, model: nn.Module, record: dict, out: Path) -> Path:
    """The run directory `out` of a transformed model: the source run's own records (tokenizer, class names,
    metrics), its config with `record` appended to `deploy`, and the model's weights."""
    from ..files import staged_dir
    from ..train.checkpoint import CONFIG, EMA_WEIGHTS, WEIGHTS, save_weights
    from ..train.config import save_yaml

    if out.exists():
        raise UserError(f"{out} already exists; pass --out with a new directory or remove it.")
    config.deploy = [*(config.deploy or []), record]
    config.train.run_name = out.name
    with staged_dir(out) as staging:  # a folder named `out` is always a whole run directory
        for item in Path(run_dir).iterdir():
            if item.is_file() and item.name not in (WEIGHTS, EMA_WEIGHTS, CONFIG) and not item.name.startswith("."):
                shutil.copy2(item, staging / item.name)
        save_yaml(config.to_dict(), staging / CONFIG)
        save_weights(model, staging / WEIGHTS, model_name=config.model.name)
    return out

__all__ = ["INT4_GROUP", "INT8_PACK_MULTIPLE", "METHODS", "DynamicInt8Linear", "Int4WeightOnlyLinear",
           "Int8WeightOnlyLinear", "PerChannelInt8Linear", "QuantizedLinear", "empty_quantized", "quantizable_linears",
           "quantize_model",
           "quantize_run", "write_transformed_run"]
