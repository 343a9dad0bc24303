"""Shared benchmark helpers: a self-describing header, median timing after warm-up, memory measures, and the
results every suite writes (JSON, markdown table, plot)."""

import json
import os
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ..errors import UserError
from ..files import atomic_write_text
from ..hardware import environment, resolve_device


def add_machine_arguments(parser, *, threads_help: str = "torch intra-op threads (default: torch's)") -> None:
    """`--device` and `--threads` of the suites that measure on one device."""
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    parser.add_argument("--threads", type=int, default=None, help=threads_help)


def use_machine(args) -> torch.device:
    """Applies `--threads` (when given) and resolves `--device`: the device a suite measures on."""
    if args.threads:
        torch.set_num_threads(args.threads)
    return resolve_device(args.device)


def git_revision() -> str:
    """Short git revision of the working tree (with "+dirty" when it has changes), or "unknown"."""
    try:
        root = Path(__file__).resolve().parent
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (rev + ("+dirty" if dirty else "")) or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def bench_header(device: torch.device, **extra) -> dict:
    """Device with its name and ISA level (polyattn.hardware.environment), torch version, git revision, thread
    count and any benchmark-specific settings."""
    return {
        **environment(device),
        "git": git_revision(),
        "cpu_count": os.cpu_count(),
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
        **extra,
    }


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], device: torch.device, repeats: int) -> list[float]:
    """Wall-clock seconds of `repeats` calls of `fn` (the caller does the warm-up), synchronising around each."""
    times = []
    for _ in range(repeats):
        synchronize(device)
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return times


def median(xs: list[float]) -> float:
    return statistics.median(xs)


class SavedTensorBytes:
    """Counts the bytes of the distinct tensor storages autograd saves for backward inside the context.

    On a CPU there is no allocator statistic per call, so this is the memory measure for training: the
    activations a forward pass keeps alive until backward (what grows with the sequence length). It does not see
    transient buffers freed within the forward pass, nor the backward pass's own temporaries.
    """

    def __init__(self):
        self.bytes = 0
        self._seen: set[int] = set()
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda x: x)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key not in self._seen:
            self._seen.add(key)
            self.bytes += storage.nbytes()
        return t

    def __enter__(self):
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)
        self._seen.clear()  # keeps only the count: no reference to freed storages' addresses beyond this call


def save_figure(fig, path: Path, title: str) -> None:
    """A suite's figure under its `title` (small, above the axes), laid out, written as a PNG and closed."""
    from ..analysis.plots import _save

    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    _save(fig, path)


def write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(obj, indent=2))


def write_results(out: Path | str, name: str, record: dict, table: str,
                  plot: Callable[[Path], None] | None = None) -> None:
    """How every suite ends: prints the markdown `table`, writes `record` to `<name>.json`, the table to
    `<name>.md` and, where `plot` is given, calls it with the path `<name>.png`, all under `out`; then prints the
    paths it wrote."""
    print("\n" + table)
    out = Path(out)
    paths = [out / f"{name}.json", out / f"{name}.md"]
    write_json(paths[0], record)
    atomic_write_text(paths[1], table + "\n")
    if plot is not None:
        try:
            plot(out / f"{name}.png")
            paths.append(out / f"{name}.png")
        except UserError as err:  # matplotlib missing: the table and the JSON are what the suite measured
            print(f"no plot: {err}")
    print("wrote " + ", ".join(str(path) for path in paths))
