"""`polyattn export RUN_DIR --format onnx|pt2 [--decode-step]`: a trained run as a graph that runs without polyattn.

- `onnx`: `torch.onnx.export(..., dynamo=True)` (the exporter built on `torch.export`; needs `onnxscript`), run
  with onnxruntime to check it.
- `pt2`: a `torch.export` `ExportedProgram` saved with `torch.export.save`, reloaded with `torch.export.load` to
  check it.

What is exported is the model's inference call: classifiers `images [B, C, H, W] → logits [B, classes]`, causal
and masked LMs `tokens [B, T] → logits`, DiT one denoiser call `(x [B, C, H, W], t [B], y [B]) → velocity`. With
`--decode-step`, a causal LM's single-token step with its state as explicit inputs and outputs instead
(`polyattn.deploy.decode_step`).

Dynamic shapes: the batch is always dynamic, the sequence length too where the graph allows it. Whether it does
is not assumed per family: the graph is exported with a dynamic sequence, checked at a second length, and
exported again with a fixed one when that check fails or the exporter fixed the length itself (LightNet's
chunked scan and kernelized linear attention's chunk loop split the sequence into chunks with Python integers, so
their graphs fix T; the fixed axis is read from the exported program's inputs, before onnxruntime is fed another
length, which it would not refuse). `export.json` records which dimensions are dynamic and the measured
error of every check.

Check: on the example inputs and on a second batch size (and length), the exported graph must match the eager
model within `ATOL + RTOL · max|eager|`; a graph that does not is an error, not a file.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import UserError

FORMATS = ("onnx", "pt2")
RTOL, ATOL = 1e-4, 1e-5
"""Exported == eager within `ATOL + RTOL · max|eager|` (float32 graphs; observed errors are about 1e-7)."""


@dataclass
class ExportSpec:
    """What to export: the module, its example inputs (two sets: the export's and a check at other shapes), the
    input and output names, and the dynamic dimensions of each input (`{axis: name}`), longest-first choices."""

    module: nn.Module
    inputs: tuple[torch.Tensor, ...]
    check_inputs: tuple[torch.Tensor, ...]
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    dynamic: list[dict[int, str]]
    fixed_inputs: tuple[torch.Tensor, ...] | None = None
    """Check inputs with the same sequence length as `inputs`, for the fallback export with a fixed length."""


def _require(module: str, extra: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise UserError(f"This needs the optional package '{module.split('.')[0]}'; install polyattn[{extra}] "
                        f"(pip install 'polyattn[{extra}]').") from err


class _Positional(nn.Module):
    """The model's forward with positional inputs only (export wants them; `forward` may take keywords)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, *inputs):
        return self.model(*inputs)


def model_spec(model: nn.Module, task: str, config, *, batch: int = 2) -> ExportSpec:
    """The full-forward export of `model` (of registered `task`) at the run's own input shape."""
    g = torch.Generator().manual_seed(0)
    if task in ("classification", "diffusion"):
        pe = model.patch_embed
        (H, W), C = pe.img_size, pe.in_chans
        image = lambda b: torch.randn(b, C, H, W, generator=g)
        if task == "classification":
            return ExportSpec(_Positional(model), (image(batch),), (image(batch + 1),), ("images",), ("logits",),
                              [{0: "batch"}])
        cond = lambda b: (image(b), torch.rand(b, generator=g), torch.randint(0, model.num_classes, (b,), generator=g))
        return ExportSpec(_Positional(model), cond(batch), cond(batch + 1), ("x", "t", "y"), ("velocity",),
                          [{0: "batch"}] * 3)
    T = min(config.data.seq_len, getattr(model, "max_seq_len", config.data.seq_len))
    tokens = lambda b, t: torch.randint(0, model.vocab_size - 1, (b, t), generator=g)
    short = max(1, T // 2 + 1) if T > 2 else T
    return ExportSpec(_Positional(model), (tokens(batch, T),), (tokens(batch + 1, short),), ("tokens",), ("logits",),
                      [{0: "batch", 1: "seq"}], fixed_inputs=(tokens(batch + 1, T),))


def step_spec(model: nn.Module, max_len: int, *, batch: int = 2) -> ExportSpec:
    """The single-token decoding step of a causal LM (`polyattn.deploy.decode_step`), state as inputs."""
    from .decode_step import decode_step

    step = decode_step(model, max_len).eval()
    g = torch.Generator().manual_seed(0)

    def inputs(b):
        # a state some tokens in, so that the check does not only see empty slots
        state = step.initial_state(b)
        with torch.no_grad():
            for _ in range(3):
                _, *state = step(torch.randint(0, model.vocab_size, (b, 1), generator=g), *state)
        return (torch.randint(0, model.vocab_size, (b, 1), generator=g), *state)

    first = inputs(batch)
    return ExportSpec(_Positional(step), first, inputs(batch + 1), ("token", *step.state_names),
                      ("logits", *(f"new_{n}" for n in step.state_names)), [{0: "batch"}] * len(first))


def _dynamic_shapes(spec: ExportSpec, names: set[str]):
    from torch.export import Dim

    shapes = tuple({axis: Dim.AUTO for axis, name in axes.items() if name in names} or None for axes in spec.dynamic)
    return (shapes,)  # the exported modules take `*inputs`: one varargs entry holding every input's shape


def _flat(outputs) -> list[torch.Tensor]:
    return list(outputs) if isinstance(outputs, (tuple, list)) else [outputs]


def _max_error(reference: list[torch.Tensor], got: list) -> tuple[float, float]:
    """Largest |exported − eager| over the outputs, and the allowed bound `ATOL + RTOL · max|eager|`."""
    err, bound = 0.0, 0.0
    for ref, out in zip(reference, got):
        out = torch.as_tensor(out)
        if out.shape != ref.shape:
            return float("inf"), 0.0
        if ref.dtype in (torch.bool, torch.int64, torch.int32):
            err = max(err, float((out.to(ref.dtype) != ref).any()) * float("inf"))
            continue
        diff = (out.float() - ref.float()).abs()
        finite = torch.isfinite(ref)
        if not torch.equal(finite, torch.isfinite(out)):
            return float("inf"), 0.0
        err = max(err, float(diff[finite].max()) if finite.any() else 0.0)
        bound = max(bound, ATOL + RTOL * (float(ref[finite].abs().max()) if finite.any() else 0.0))
    return err, bound or ATOL


class OnnxRunner:
    """An exported ONNX file run with onnxruntime: `runner(*tensors) -> [numpy arrays]`."""

    def __init__(self, path: Path):
        ort = _require("onnxruntime", "export")
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.names = [i.name for i in self.session.get_inputs()]

    def __call__(self, *inputs):
        feeds = {n: torch.as_tensor(x).numpy() for n, x in zip(self.names, inputs)}
        return [torch.from_numpy(o) for o in self.session.run(None, feeds)]


def load_exported(path: Path):
    """A callable of the exported file at `path` (`.onnx` through onnxruntime, `.pt2` through torch.export)."""
    path = Path(path)
    if path.suffix == ".onnx":
        return OnnxRunner(path)
    program = torch.export.load(str(path))
    module = program.module()
    return lambda *inputs: _flat(module(*inputs))


class SpecializedDimension(Exception):
    """The exporter fixed a dimension that was asked to be dynamic (`_check_dynamic`)."""


def _check_dynamic(program: torch.export.ExportedProgram, spec: ExportSpec, names: set[str]) -> None:
    """Raises `SpecializedDimension` when `program` fixed one of the dimensions `names` of its inputs.

    `Dim.AUTO` lets torch.export specialize a dimension silently when the model's code reads it as a Python
    integer (a `range(0, T, chunk)` loop unrolls into slices with fixed bounds). The program's input then has that
    size, but the ONNX file may still declare the axis symbolic, and onnxruntime, fed another length, does not
    refuse it: the unrolled slices come out empty and it dies of SIGFPE inside `session.run`. So a specialized
    axis is caught here, from the program's own input shapes, before anything runs at another shape."""
    placeholders = [n for n in program.graph.nodes if n.op == "placeholder"]
    user = [n for n, s in zip(placeholders, program.graph_signature.input_specs)
            if s.kind == torch.export.graph_signature.InputKind.USER_INPUT]
    for node, input_name, axes in zip(user, spec.input_names, spec.dynamic):
        shape = node.meta["val"].shape
        for axis, name in axes.items():
            size = shape[axis]
            if name not in names:
                continue
            # torch.export writes the fixed size in the shape; the ONNX exporter keeps a symbol of one value
            span = program.range_constraints.get(size.node.expr) if isinstance(size, torch.SymInt) else None
            if not isinstance(size, torch.SymInt) or (span is not None and span.lower == span.upper):
                raise SpecializedDimension(f"the exporter fixed the {name} axis of {input_name} at "
                                           f"{spec.inputs[spec.input_names.index(input_name)].shape[axis]} "
                                           f"(the model's code reads it as a Python integer)")


def _export_once(spec: ExportSpec, fmt: str, path: Path, names: set[str]):
    """Writes the graph to `path`; returns a callable of the program in memory (pt2), or None (onnx: the check
    runs the file through onnxruntime). Raises `SpecializedDimension` instead when a dynamic axis was fixed."""
    shapes = _dynamic_shapes(spec, names)
    if fmt == "pt2":
        program = torch.export.export(spec.module, spec.inputs, dynamic_shapes=shapes, strict=False)
        _check_dynamic(program, spec, names)
        torch.export.save(program, str(path))
        module = program.module()
        return lambda *inputs: _flat(module(*inputs))
    _require("onnxscript", "export")
    program = torch.onnx.export(spec.module, spec.inputs, dynamic_shapes=shapes, dynamo=True,
                                input_names=list(spec.input_names), output_names=list(spec.output_names),
                                verbose=False)
    _check_dynamic(program.exported_program, spec, names)
    program.save(str(path))
    return None


def export_spec(spec: ExportSpec, fmt: str, path: Path) -> dict[str, Any]:
    """Exports `spec` to `path` and checks it against the eager module; returns the record for export.json."""
    if fmt not in FORMATS:
        raise UserError(f"Unknown export format '{fmt}'; choose one of {', '.join(FORMATS)}.")
    spec.module.eval()
    with torch.no_grad():
        eager = lambda inputs: [t.detach() for t in _flat(spec.module(*inputs))]
        has_seq = any("seq" in axes.values() for axes in spec.dynamic)
        # most dynamic first; each attempt is checked at shapes it did not see, the next one fixes more
        attempts = [({"batch", "seq"}, spec.check_inputs)] if has_seq else []
        attempts += [({"batch"}, spec.fixed_inputs if has_seq else spec.check_inputs), (set(), None)]
        failures = []
        for names, other in attempts:
            checks = [spec.inputs] if other is None else [spec.inputs, other]
            start = time.perf_counter()
            try:
                # a pt2 attempt is checked in memory, and only the one kept is checked again from its file:
                # reading a program back costs about as much as exporting it (its symbolic shapes), and an
                # attempt that fails its check (LightNet's dynamic length) need not be read back at all
                in_memory = _export_once(spec, fmt, path, names)
                errors = [] if in_memory is None else [_max_error(eager(x), in_memory(*x)) for x in checks]
                if all(e <= b for e, b in errors):
                    run = load_exported(path)
                    errors = [_max_error(eager(x), run(*x)) for x in checks]
            except UserError:
                raise
            except Exception as err:  # the exporter's or runtime's own failure: fix more dimensions, else report
                cause = err.__cause__ or err
                failures.append(f"dynamic {sorted(names)}: {type(cause).__name__}: "
                                f"{str(cause).strip().splitlines()[0][:300]}")
                continue
            bad = [(e, b) for e, b in errors if not e <= b]
            if bad:
                failures.append(f"dynamic {sorted(names)}: the graph differs from the model by {bad[0][0]:.3g} "
                                f"(allowed {bad[0][1]:.3g})")
                continue
            return {"format": fmt, "file": path.name, "inputs": {n: list(t.shape) for n, t in
                                                                 zip(spec.input_names, spec.inputs)},
                    "input_names": list(spec.input_names), "output_names": list(spec.output_names),
                    "dynamic": [n for n in ("batch", "seq") if n in names],
                    "check": {"max_abs_error": max(e for e, _ in errors), "allowed": min(b for _, b in errors),
                              "shapes": [[list(t.shape) for t in x] for x in checks]},
                    "fallbacks": failures, "export_seconds": round(time.perf_counter() - start, 1)}
    path.unlink(missing_ok=True)
    raise UserError(f"Exporting to {fmt} failed: {'; '.join(failures)}.")


def export_run(run_dir: Path | str, fmt: str = "onnx", *, decode_step: bool = False, out: Path | str | None = None,
               max_len: int | None = None) -> Path:
    """Exports a run directory's model (module docstring); returns the exported file.

    Args:
        out (Path, Optional): output folder; default `RUN_DIR/export`.
        max_len (int, Optional): `--decode-step` only: slots of the bounded KV cache (LLaMA-style) or tokens of
            LLP's window; default the run's `data.seq_len`.
    """
    from ..registry import model_task
    from ..train.checkpoint import atomic_write_text
    from ..train.loop import load_run

    if fmt not in FORMATS:
        raise UserError(f"Unknown export format '{fmt}'; choose one of {', '.join(FORMATS)}.")
    run = load_run(run_dir)
    model, config = run.model.float().eval(), run.config
    task = model_task(config.model.name)
    if decode_step:
        if task != "causal_lm":
            raise UserError(f"--decode-step needs a causal LM run; {run_dir} holds a {task} model.")
        bound = max_len or config.data.seq_len
        spec = step_spec(model, bound)
    else:
        if max_len is not None:
            raise UserError("--max-len bounds the decoding state; use it with --decode-step.")
        spec = model_spec(model, task, config)
    out = Path(out) if out is not None else Path(run_dir) / "export"
    out.mkdir(parents=True, exist_ok=True)
    stem = "decode_step" if decode_step else "model"
    path = out / f"{stem}.{fmt}"
    record = export_spec(spec, fmt, path)
    record.update({"run": str(run_dir), "model": config.model.name, "task": task, "weights": run.weights,
                   "torch": torch.__version__, "what": "decode step" if decode_step else "forward"})
    if decode_step:
        record["max_len"] = bound
    atomic_write_text(out / f"{stem}.{fmt}.json", json.dumps(record, indent=2) + "\n")
    return path


__all__ = ["ATOL", "FORMATS", "RTOL", "ExportSpec", "OnnxRunner", "export_run", "export_spec", "load_exported",
           "model_spec", "step_spec"]
