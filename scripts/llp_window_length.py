"""Why LLP/ECP learns more slowly step for step at longer training windows (issue #18; the lm_long suite: 1.629 at
1K, 1.780 at 4K, 1.855 at 16K, with its training loss behind from the first hundred steps), although its receptive
field (5 segments of 256, 1,280 tokens) is the same at every window.

Every step trains on 16,384 bytes of tinyshakespeare, as in lm_long; what changes is how they are cut:

- `1k`: 16 windows of 1,024 bytes, each from its own random place in the text;
- `4k`: 4 windows of 4,096;
- `4k_shuffled`: 4 windows of 4,096, each made of 4 pieces of 1,024 bytes from 4 random places: the 1k row's
  16 independent pieces per step, laid out as the 4k row's windows;
- `16k`: 1 window of 16,384.

If `4k_shuffled` learns like `1k`, the slowdown is the step's fewer independent pieces of text (gradients of
neighbouring text agree with each other, so a step of one long stretch carries less information than one of
many short ones); if it learns like `4k`, it is the window length itself (positions, segment count, the kernels).

The same model (llp_nano: D 128, 4 layers, 4 heads, segments of 256), seed, optimizer and schedule as lm_long
(AdamW 1e-3, cosine to 1e-4 after 30 warm-up steps, betas 0.9/0.95, weight decay 0.1, clip 1) for every row, in
bfloat16 autocast where the CPU computes it natively (`--precision`). Reported: the training loss (mean of the last
50 steps) and the validation loss on the same targets for every row: windows of 4,096 over the last 10% of the
text advancing by 2,048 and scoring their second half, so each target has at least 2,048 bytes of context, more
than the model can see.

    OMP_NUM_THREADS=2 PYTHONPATH=src python scripts/llp_window_length.py                 # every row, 200 steps
    OMP_NUM_THREADS=1 PYTHONPATH=src python scripts/llp_window_length.py 4k_shuffled --steps 100

A first run (150 steps, one thread, AMD EPYC with AVX-512 BF16, bf16; results/llp_window_length/) gave validation
losses 1k 2.268, 4k_shuffled 2.286, 4k 2.319: shuffling the pieces recovers about two thirds of the 4k row's gap
at that length, one seed; lm_long's rows ran some 560 steps.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

import polyattn
from polyattn.hardware import Precision, autocast_for, resolve_precision
from polyattn.train import build_optimizer

DATA = Path(__file__).resolve().parents[1] / "../shared/data/tinyshakespeare.txt"
TOKENS_PER_STEP, PIECE, WARMUP, LR, MIN_LR = 16_384, 1_024, 30, 1e-3, 1e-4
EVAL_WINDOW = 4_096

ROWS = {  # name: (window length, bytes per independent piece)
    "1k": (1_024, 1_024),
    "4k": (4_096, 4_096),
    "4k_shuffled": (4_096, PIECE),
    "16k": (16_384, 16_384),
}


def batch(text: torch.Tensor, step: int, window: int, piece: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`TOKENS_PER_STEP // window` windows (inputs, next-byte targets), each of `window // piece` random pieces."""
    g = torch.Generator().manual_seed(step)
    pieces = TOKENS_PER_STEP // piece
    starts = torch.randint(0, len(text) - piece - 1, (pieces,), generator=g)
    rows = torch.stack([text[s:s + piece + 1] for s in starts.tolist()])  # (pieces, piece + 1)
    x, y = rows[:, :-1].reshape(-1, window), rows[:, 1:].reshape(-1, window)
    return x, y


def lr_at(step: int, steps: int) -> float:
    if step < WARMUP:
        return LR * (step + 1) / WARMUP
    progress = (step - WARMUP) / max(steps - WARMUP, 1)
    return MIN_LR + 0.5 * (LR - MIN_LR) * (1 + math.cos(math.pi * progress))


@torch.no_grad()
def validation_loss(model: torch.nn.Module, val: torch.Tensor, autocast) -> float:
    model.eval()
    total, count = 0.0, 0
    half = EVAL_WINDOW // 2
    for start in range(0, len(val) - EVAL_WINDOW - 1, half):
        x = val[start:start + EVAL_WINDOW][None]
        y = val[start + 1:start + EVAL_WINDOW + 1][None]
        with autocast():
            logits = model(x)
        scored = torch.nn.functional.cross_entropy(logits[0, half:].float(), y[0, half:], reduction="sum")
        total, count = total + scored.item(), count + half
    model.train()
    return total / count


def run(name: str, steps: int, train: torch.Tensor, val: torch.Tensor, precision: Precision) -> dict:
    window, piece = ROWS[name]
    torch.manual_seed(0)
    model = polyattn.create_model("llp_nano", vocab_size=256, max_seq_len=16_384)
    optimizer = build_optimizer(model, LR, 0.1, (0.9, 0.95))
    autocast = autocast_for(precision, torch.device("cpu"))
    losses, start = [], time.perf_counter()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps)
        x, y = batch(train, step, window, piece)
        with autocast():
            _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if (step + 1) % 50 == 0:
            print(f"  {name} step {step + 1}: loss {sum(losses[-50:]) / 50:.3f}", flush=True)
    return {"row": name, "window": window, "piece": piece, "steps": steps,
            "train_loss_last50": sum(losses[-50:]) / min(50, len(losses)),
            "train_loss_at": {s: sum(losses[s - 50:s]) / 50 for s in range(50, steps + 1, 50)},
            "val_loss": validation_loss(model, val, autocast), "seconds": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("rows", nargs="*", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    text = torch.frombuffer(bytearray(DATA.read_bytes()), dtype=torch.uint8).long()
    split = int(len(text) * 0.9)
    train, val = text[:split], text[split:]
    precision = resolve_precision(args.precision, torch.device("cpu"))
    print(f"precision {precision.name} ({precision.reason}), {torch.get_num_threads()} threads", flush=True)
    results = []
    for name in args.rows:
        results.append(run(name, args.steps, train, val, precision))
        r = results[-1]
        print(f"{name:12s} window {r['window']:6d}, pieces of {r['piece']:6d}: train (last 50) "
              f"{r['train_loss_last50']:.3f}, val {r['val_loss']:.3f}  ({r['seconds']:.0f} s)", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
