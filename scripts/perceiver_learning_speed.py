"""Why Double and Split attention learn more slowly step for step than Perceiver AR (issue #18 §3; the evidence
paragraph of the README's language-model comparison).

Every row trains the same tiny model (D 64, 4 layers, 4 heads; a window of 256 bytes of tinyshakespeare ending in
64 latents) from the same seed on the same batches, in float32, and reports:

- the training loss on the latents (the last 64 positions), mean of the last 50 steps, and the validation loss on
  the latents of 8 held-out batches;
- per layer, what the latents' queries attend to: the attention mass on the 8 nearest positions (the query's own
  and the 7 before it) and the entropy of the weights against that of uniform weights over the visible keys.

Rows: the four Perceivers; controls that separate the bidirectional context from the scoring of late positions
only: Double with causal context rows (a dense causal decoder scored on the latents, `llama_lm` weight for weight),
the same decoder scored on 64 positions spread over the window (every 4th), and on every position.

    OMP_NUM_THREADS=1 PYTHONPATH=src python scripts/perceiver_learning_speed.py              # every row, 400 steps
    OMP_NUM_THREADS=1 PYTHONPATH=src python scripts/perceiver_learning_speed.py ar double --steps 100
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from polyattn.layers.mixer_hooks import observe_mixer_ops
from polyattn.models.llama_lm import LlamaLM
from polyattn.models.perceiver_ar import PerceiverAR
from polyattn.models.perceiver_variants import (
    CompressedAttentionPerceiver,
    DoubleAttentionPerceiver,
    SplitAttentionPerceiver,
)
from polyattn.ops.attention import MaskMode, causal_mask, causal_mask_at
from polyattn.ops.losses import cross_entropy
from polyattn.train import build_optimizer

DATA = Path(__file__).resolve().parents[1] / "../shared/data/tinyshakespeare.txt"
WINDOW, LATENTS, DIM, DEPTH, HEADS, BATCH, WARMUP, LR = 256, 64, 64, 4, 4, 8, 30, 1e-3


class CausalContextDouble(DoubleAttentionPerceiver):
    """Double attention with causal context rows: a dense causal decoder whose loss is on the latents only."""

    def context_mask(self, window_pos: torch.Tensor, context_len: torch.Tensor) -> torch.Tensor:
        return causal_mask_at(window_pos, window_pos)


class ScoredPositions(torch.nn.Module):
    """`llama_lm` (a dense causal decoder) returning the logits of the latents, trained on the `scored` positions."""

    def __init__(self, scored: slice):
        super().__init__()
        self.decoder = LlamaLM(vocab_size=256, dim=DIM, depth=DEPTH, num_heads=HEADS)
        self.scored = scored

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.decoder(x)  # (B, WINDOW, V)
        return logits[:, -LATENTS:], cross_entropy(logits[:, self.scored], y[:, self.scored])


def shape() -> dict:
    return dict(vocab_size=256, dim=DIM, depth=DEPTH, num_heads=HEADS, max_seq_len=WINDOW)


ROWS = {
    "ar": ("PerceiverAR", lambda: PerceiverAR(num_latents=LATENTS, **shape())),
    "double": ("Double", lambda: DoubleAttentionPerceiver(num_latents=LATENTS, **shape())),
    "split": ("Split (4 segments)", lambda: SplitAttentionPerceiver(num_latents=LATENTS, num_segments=4, **shape())),
    "compressed": ("Compressed (64 rows)", lambda: CompressedAttentionPerceiver(
        num_latents=LATENTS, compressed_len=WINDOW // 4, **shape())),
    "causal_context": ("Double, causal context rows", lambda: CausalContextDouble(num_latents=LATENTS, **shape())),
    "spread": ("dense causal, 64 positions spread", lambda: ScoredPositions(slice(3, None, 4))),
    "every": ("dense causal, every position", lambda: ScoredPositions(slice(None))),
}


def batch(tokens: torch.Tensor, draw: int, rows: int = BATCH) -> tuple[torch.Tensor, torch.Tensor]:
    """`rows` windows of `WINDOW` inputs and their next-token targets, at positions drawn from seed `draw`."""
    g = torch.Generator().manual_seed(draw)
    starts = torch.randint(0, len(tokens) - WINDOW - 1, (rows,), generator=g)
    windows = torch.stack([tokens[s:s + WINDOW + 1] for s in starts.tolist()])
    return windows[:, :-1], windows[:, 1:]


def latent_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the training loss, the loss on the latents)."""
    logits, loss = model(x, y)
    return loss, cross_entropy(logits[:, -LATENTS:], y[:, -LATENTS:])


def attention_locality(model: torch.nn.Module, x: torch.Tensor) -> list[tuple[float, float, float]]:
    """Per attention call (one per layer): the latents' mass on their 8 nearest keys, the entropy of their weights,
    and the entropy of uniform weights over their visible keys (nats)."""
    found = []

    def observe(call) -> None:
        q, k = call.q.double(), call.k.double()
        R, S = q.shape[1], k.shape[1]
        if R < LATENTS:
            return  # Perceiver AR's cross-attend keys being encoded: no latent queries here
        scores = torch.einsum("bthd,bshd->bhts", q, k) * q.shape[-1] ** -0.5
        allowed = call.kwargs.get("attn_mask")
        if MaskMode(call.kwargs.get("mask_mode", MaskMode.BIDIRECTIONAL)) is MaskMode.CAUSAL:
            allowed = causal_mask(R, S) if allowed is None else allowed & causal_mask(R, S)
        if allowed is not None:
            scores = scores.masked_fill(~allowed, float("-inf"))
        w = scores.softmax(-1)[:, :, R - LATENTS:]  # the latents' queries, at key columns S − LATENTS + i
        col, own = torch.arange(S), S - LATENTS + torch.arange(LATENTS)[:, None]
        near = ((col <= own) & (col > own - 8)).double()
        entropy = -(w * w.clamp_min(1e-30).log()).sum(-1)
        found.append(((w * near).sum(-1).mean().item(), entropy.mean().item(),
                      (w > 0).sum(-1).double().log().mean().item()))

    with torch.no_grad(), observe_mixer_ops(observe):
        model(x, torch.zeros_like(x))
    return found


def run(name: str, steps: int, train: torch.Tensor, val: torch.Tensor) -> dict:
    torch.manual_seed(0)
    model = ROWS[name][1]().train()
    optimizer = build_optimizer(model, LR, 0.1, (0.9, 0.95))
    losses = []
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = LR * min(1.0, (step + 1) / WARMUP)
        loss, on_latents = latent_loss(model, *batch(train, step))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(on_latents.item())
    model.eval()
    with torch.no_grad():
        val_loss = sum(latent_loss(model, *batch(val, 1000 + i))[1].item() for i in range(8)) / 8
    return {"train": sum(losses[-50:]) / len(losses[-50:]), "val": val_loss,
            "layers": attention_locality(model, batch(train, 5000, rows=4)[0])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("rows", nargs="*", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--steps", type=int, default=400)
    args = parser.parse_args()
    torch.set_num_threads(1)
    tokens = torch.tensor(list(DATA.read_bytes()), dtype=torch.long)
    cut = int(len(tokens) * 0.9)
    train, val = tokens[:cut], tokens[cut:]
    print(f"| model | train loss on the latents, steps {max(1, args.steps - 49)}–{args.steps} | val loss on the "
          f"latents | per layer: attention on the 8 nearest / entropy − uniform (nats) |")
    print("|---|---|---|---|")
    for name in args.rows:
        r = run(name, args.steps, train, val)
        layers = " · ".join(f"{near:.2f} / {ent - uniform:+.2f}" for near, ent, uniform in r["layers"])
        print(f"| {ROWS[name][0]} | {r['train']:.3f} | {r['val']:.3f} | {layers} |", flush=True)
    print(f"\nD {DIM}, {DEPTH} layers, {HEADS} heads, window {WINDOW}, {LATENTS} latents, batch {BATCH}, "
          f"AdamW {LR} (warm-up {WARMUP} steps), float32, 1 thread, seed 0; {math.prod((BATCH, WINDOW))} tokens "
          f"per step.")


if __name__ == "__main__":
    main()
