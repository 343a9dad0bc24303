"""`polyattn prune RUN_DIR --heads 0.25 --mlp 0.25`: structured pruning into a smaller run directory.

Whole attention heads and MLP hidden channels are removed physically (the linear layers get fewer rows and
columns), so the pruned model is smaller and faster, and its run directory records what was kept (`deploy:` in
`config.yaml`), from which `load_run` builds the smaller shapes before loading the weights.

Importance score (magnitude of the path through the unit, per layer; no data needed):

- head `h` of a softmax `Attention`: `‖W_v[h]‖_F · ‖W_o[:, h]‖_F`, the size of the value path the head writes
  into the residual stream (its query/key weights only say where it looks, not how much it contributes);
- hidden channel `j` of an MLP: `‖W_in[j]‖ · ‖W_out[:, j]‖` (with SwiGLU `‖w1[j]‖ · ‖w3[j]‖ · ‖w2[:, j]‖`).

In every layer the lowest-scored `round(share · count)` units go (at least one head and one channel stay).

What is pruned, per module type (`PRUNABLE`, the one place that knows the modules' structure): the heads of
`polyattn.layers.Attention` in self-attention without grouped kv heads (ViT, iLLaMA, the LLaMA-style LM, BERT),
and the hidden channels of `Mlp` and `GatedMlp` (those models and LightNet's GLU). LightNet's own attention heads
are not pruned (their LRPE, decay and group norm are per head; not built yet), nor are cross-attention layers.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..errors import UserError
from ..layers.attention import Attention
from ..layers.mlp import GatedMlp, Mlp


def _rows(linear: nn.Linear, keep: torch.Tensor) -> nn.Linear:
    new = nn.Linear(linear.in_features, len(keep), bias=linear.bias is not None)
    with torch.no_grad():
        new.weight.copy_(linear.weight[keep])
        if linear.bias is not None:
            new.bias.copy_(linear.bias[keep])
    return new


def _columns(linear: nn.Linear, keep: torch.Tensor) -> nn.Linear:
    new = nn.Linear(len(keep), linear.out_features, bias=linear.bias is not None)
    with torch.no_grad():
        new.weight.copy_(linear.weight[:, keep])
        if linear.bias is not None:
            new.bias.copy_(linear.bias)
    return new


def head_scores(attn: Attention) -> torch.Tensor:
    D = attn.head_dim
    v = attn.v_proj.weight.detach().unflatten(0, (attn.num_kv_heads, D)).flatten(1).norm(dim=1)
    o = attn.o_proj.weight.detach().unflatten(1, (attn.num_heads, D)).transpose(0, 1).flatten(1).norm(dim=1)
    return v * o


def keep_heads(attn: Attention, keep: torch.Tensor) -> None:
    """Keeps the heads `keep` (sorted indices) of `attn`, in place."""
    D = attn.head_dim
    channels = (keep[:, None] * D + torch.arange(D)).flatten()
    attn.q_proj, attn.k_proj, attn.v_proj = (_rows(p, channels) for p in (attn.q_proj, attn.k_proj, attn.v_proj))
    attn.o_proj = _columns(attn.o_proj, channels)
    attn.num_heads = attn.num_kv_heads = len(keep)


def mlp_scores(mlp: nn.Module) -> torch.Tensor:
    if isinstance(mlp, GatedMlp):
        return mlp.w1.weight.norm(dim=1) * mlp.w3.weight.norm(dim=1) * mlp.w2.weight.norm(dim=0)
    return mlp.fc1.weight.norm(dim=1) * mlp.fc2.weight.norm(dim=0)


def keep_channels(mlp: nn.Module, keep: torch.Tensor) -> None:
    """Keeps the hidden channels `keep` (sorted indices) of `mlp`, in place."""
    if isinstance(mlp, GatedMlp):
        mlp.w1, mlp.w3, mlp.w2 = _rows(mlp.w1, keep), _rows(mlp.w3, keep), _columns(mlp.w2, keep)
    else:
        mlp.fc1, mlp.fc2 = _rows(mlp.fc1, keep), _columns(mlp.fc2, keep)


def _prunable_attention(m: nn.Module) -> bool:
    return (isinstance(m, Attention) and m.num_kv_heads == m.num_heads
            and m.k_proj.in_features == m.q_proj.in_features)


PRUNABLE = {"heads": (_prunable_attention, head_scores, keep_heads),
            "mlp": (lambda m: isinstance(m, (Mlp, GatedMlp)), mlp_scores, keep_channels)}
"""unit → (which modules have it, their importance scores, how to keep some of them)."""


def prune_plan(model: nn.Module, heads: float, mlp: float) -> dict[str, dict[str, list[int]]]:
    """Per unit kind, module name → the sorted indices to keep (the lowest-scored share removed, module docstring)."""
    plan: dict[str, dict[str, list[int]]] = {}
    for kind, share in (("heads", heads), ("mlp", mlp)):
        if not 0.0 <= share < 1.0:
            raise UserError(f"--{kind} is the share of units to remove per layer, in [0, 1); got {share}.")
        applies, scores, _ = PRUNABLE[kind]
        plan[kind] = {}
        for name, module in model.named_modules():
            if applies(module):
                with torch.no_grad():
                    s = scores(module)
                n_keep = max(1, len(s) - round(share * len(s)))
                plan[kind][name] = sorted(s.topk(n_keep).indices.tolist())
    return plan


def apply_plan(model: nn.Module, plan: dict[str, dict[str, list[int]]]) -> nn.Module:
    """Prunes `model` in place to `plan` (from `prune_plan`, or a run's record to rebuild its shapes)."""
    for kind, modules in plan.items():
        _, _, keep = PRUNABLE[kind]
        for name, indices in modules.items():
            keep(model.get_submodule(name), torch.tensor(indices, dtype=torch.long))
    return model


def prune_run(run_dir: Path | str, heads: float, mlp: float, out: Path | str | None = None) -> Path:
    """Writes a pruned copy of a run directory and returns it (default `RUN_DIR-pruned` beside it)."""
    from ..train.loop import load_run
    from .quantize import write_transformed_run

    run_dir = Path(run_dir)
    run = load_run(run_dir)
    if any(r.get("transform") == "quantize" for r in run.config.deploy or []):
        raise UserError(f"{run_dir} is quantized; prune the float run it came from, then quantize the pruned one.")
    model = run.model.float().cpu()
    plan = prune_plan(model, heads, mlp)
    if not any(plan.values()):
        raise UserError(f"{run.config.model.name} has no attention heads or MLP channels that prune handles.")
    apply_plan(model, plan)
    record = {"transform": "prune", "heads_share": heads, "mlp_share": mlp, "score": "magnitude",
              "source_run": str(run_dir.resolve()), "source_weights": run.weights, "plan": plan}
    out = Path(out) if out is not None else run_dir.with_name(f"{run_dir.name}-pruned")
    return write_transformed_run(run_dir, run.config, model, record, out)


__all__ = ["PRUNABLE", "apply_plan", "head_scores", "keep_channels", "keep_heads", "mlp_scores", "prune_plan",
           "prune_run"]
