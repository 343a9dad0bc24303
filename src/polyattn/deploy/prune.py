"""`polyattn prune RUN_DIR --heads 0.25 --mlp 0.25 [--finetune-steps N [key=value ...]]`: structured pruning into a
smaller run.

Whole attention heads and MLP hidden channels are removed physically (the linear layers get fewer rows and
columns), so the pruned model is smaller and faster, and its run directory records what was kept (`deploy:` in
`config.yaml`), from which `load_run` builds the smaller shapes before loading the weights. `--finetune-steps N`
then trains the pruned model for N steps with the run's own recipe (`finetune_pruned`), changed by any key=value
given after it (e.g. `train.lr=1e-4`: a fine-tune often wants a lower rate than training from scratch).

Importance score: magnitude, per layer, of what the unit writes into the residual stream. Chosen over a Taylor
score (|gradient · weight| over a few batches) because it needs no data and no backward pass, so the plan is a
function of the weights alone (a pruned run is reproduced from its source run exactly, on any machine), and
because the short fine-tune that follows recovers most of the difference a better ranking would make (README
"Deploy": the quality before and after it). Per unit:

- head `h` of a softmax `Attention`: `‖W_v[h]‖_F · ‖W_o[:, h]‖_F`, the size of the value path (its query/key
  weights only say where it looks, not how much it contributes); with grouped kv heads (LLaMA's GQA) the unit is
  one kv head with the query heads that share it, scored `‖W_v[g]‖_F · ‖W_o[:, heads of g]‖_F`;
- head `h` of `LightNetAttention`: `‖W_o[:, h] · diag(γ_h)‖_F`, γ the per-head RMSNorm's weight: the norm rescales
  every head's output to unit RMS, so its value weights do not say how much it writes, only γ and `W_o` do;
- hidden channel `j` of an MLP: `‖W_in[j]‖ · ‖W_out[:, j]‖` (with SwiGLU `‖w1[j]‖ · ‖w3[j]‖ · ‖w2[:, j]‖`).

In every layer the lowest-scored `round(share · count)` units go (at least one stays).

Which code removes what (`PRUNABLE`, the one place that knows the modules' structure), measured on these models:

- MLP channels (`Mlp` with GELU: ViT; `GatedMlp`, SwiGLU: iLLaMA, LLaMA-style, LightNet): torch-pruning's
  `DependencyGraph` when it is installed (the `prune` extra). Traced through the whole model, the group it builds
  from `fc1`/`w1`'s output channels is exactly `fc1`/`w1` (and `w3`) rows and `fc2`/`w2` columns, checked for
  every group before it is pruned (`_tp_prune_mlps`), and the result equals the hand-written rule bit for bit
  (`tests/test_deploy_prune.py`). Without torch-pruning, that rule (`keep_channels`) does the same.
- Attention heads: own code (`keep_heads`, `keep_lightnet_heads`). torch-pruning 1.6.1 finds the channels but not
  the heads: asked to remove the 16 value channels of one head, it groups q/k/v rows and o_proj columns, then
  leaves `num_heads` as it was, so the next forward fails (`unflatten: sizes [4, 16] don't multiply up to 48`, in
  ViT, iLLaMA and the LLaMA-style LM; its `num_heads` option belongs to its high-level pruner and assumes one
  fused qkv layer, which these models do not have). In LightNet it is wrong before that: the d → 2d LRPE
  concatenation and the reshapes map one head's 16 value channels to 16 query, 32 key and 12 output/gate
  channels, and it cannot know the per-head LRPE frequencies (not parameters) or that the group norm's weight
  is per head. So heads are cut here, with every per-head piece: q/k/v rows, o_proj columns; in LightNet also
  the gate's output rows, the per-head RMSNorm's weight and groups, and the LRPE frequencies of the kept heads
  (`LightNetAttention.lrpe_head_index`). RoPE needs nothing: it rotates every head alike, within its head dim,
  which pruning keeps. MD-TPE acts on the residual width, which stays, so it is untouched.

Not pruned: attention whose keys come from a context of another width (a cross-attention of the model's own width
is pruned like self-attention: its heads are as independent, but the Perceivers' pruned runs are not tested),
`MultiScanAttention` (the multi-scan baseline), the Perceivers' tied K=V attention; the residual width
(embeddings, norms, TPE).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from ..errors import UserError
from ..layers.attention import Attention
from ..layers.lightnet import LightNetAttention
from ..layers.mlp import GatedMlp, Mlp
from ..layers.norm import GroupRMSNorm


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


def _head_channels(keep: torch.Tensor, head_dim: int) -> torch.Tensor:
    """The channels `[h·d, (h+1)·d)` of each kept head `h`."""
    return (keep[:, None] * head_dim + torch.arange(head_dim)).flatten()


def head_scores(attn: Attention) -> torch.Tensor:
    """One score per kv head (= per head without grouped kv heads), module docstring."""
    D, G = attn.head_dim, attn.num_heads // attn.num_kv_heads
    v = attn.v_proj.weight.detach().unflatten(0, (attn.num_kv_heads, D)).flatten(1).norm(dim=1)
    o = attn.o_proj.weight.detach().unflatten(1, (attn.num_kv_heads, G * D)).transpose(0, 1).flatten(1).norm(dim=1)
    return v * o


def keep_heads(attn: Attention, keep: torch.Tensor) -> None:
    """Keeps the kv heads `keep` (sorted indices) of `attn` with their query heads, in place."""
    D, G = attn.head_dim, attn.num_heads // attn.num_kv_heads
    kv = _head_channels(keep, D)
    q = _head_channels((keep[:, None] * G + torch.arange(G)).flatten(), D)
    attn.q_proj = _rows(attn.q_proj, q)
    attn.k_proj, attn.v_proj = _rows(attn.k_proj, kv), _rows(attn.v_proj, kv)
    attn.o_proj = _columns(attn.o_proj, q)
    attn.num_heads, attn.num_kv_heads = len(keep) * G, len(keep)


def lightnet_head_scores(attn: LightNetAttention) -> torch.Tensor:
    """`‖W_o[:, h] · diag(γ_h)‖_F` per head (module docstring)."""
    scaled = attn.o_proj.weight.detach() * attn.g_norm.weight.detach()  # [D, H·d], column c scaled by γ_c
    return scaled.unflatten(1, (attn.num_heads, attn.head_dim)).transpose(0, 1).flatten(1).norm(dim=1)


def keep_lightnet_heads(attn: LightNetAttention, keep: torch.Tensor) -> None:
    """Keeps the heads `keep` (sorted indices) of a `LightNetAttention`, in place, with all their per-head parts."""
    channels = _head_channels(keep, attn.head_dim)
    attn.q_proj, attn.k_proj, attn.v_proj = (_rows(p, channels) for p in (attn.q_proj, attn.k_proj, attn.v_proj))
    attn.g_proj[1] = _rows(attn.g_proj[1], channels)
    norm = GroupRMSNorm(len(channels), len(keep), eps=attn.g_norm.eps)
    with torch.no_grad():
        norm.weight.copy_(attn.g_norm.weight[channels])
    attn.g_norm = norm
    attn.o_proj = _columns(attn.o_proj, channels)
    attn.lrpe_head_index = tuple(attn.lrpe_head_index[i] for i in keep.tolist())
    attn.num_heads = len(keep)


def mlp_scores(mlp: nn.Module) -> torch.Tensor:
    if isinstance(mlp, GatedMlp):
        return mlp.w1.weight.norm(dim=1) * mlp.w3.weight.norm(dim=1) * mlp.w2.weight.norm(dim=0)
    return mlp.fc1.weight.norm(dim=1) * mlp.fc2.weight.norm(dim=0)


def _mlp_layers(mlp: nn.Module) -> tuple[list[nn.Linear], nn.Linear]:
    """The layers whose rows are the hidden channels, and the one whose columns are."""
    return ([mlp.w1, mlp.w3], mlp.w2) if isinstance(mlp, GatedMlp) else ([mlp.fc1], mlp.fc2)


def keep_channels(mlp: nn.Module, keep: torch.Tensor) -> None:
    """Keeps the hidden channels `keep` (sorted indices) of `mlp`, in place (the rule torch-pruning is checked
    against, and the one used without it)."""
    if isinstance(mlp, GatedMlp):
        mlp.w1, mlp.w3, mlp.w2 = _rows(mlp.w1, keep), _rows(mlp.w3, keep), _columns(mlp.w2, keep)
    else:
        mlp.fc1, mlp.fc2 = _rows(mlp.fc1, keep), _columns(mlp.fc2, keep)


def _self_attention(m: nn.Module) -> bool:
    return isinstance(m, Attention) and m.k_proj.in_features == m.q_proj.in_features


class Unit(NamedTuple):
    """A prunable unit of one module type."""

    kind: str
    """'heads' or 'mlp' (the CLI option that sets its share, and the key of the plan)."""
    applies: Callable[[nn.Module], bool]
    scores: Callable[[nn.Module], torch.Tensor]
    keep: Callable[[nn.Module, torch.Tensor], None]


PRUNABLE = {Attention: Unit("heads", _self_attention, head_scores, keep_heads),
            LightNetAttention: Unit("heads", lambda m: True, lightnet_head_scores, keep_lightnet_heads),
            Mlp: Unit("mlp", lambda m: True, mlp_scores, keep_channels),
            GatedMlp: Unit("mlp", lambda m: True, mlp_scores, keep_channels)}
"""module type → its unit (which kind, whether an instance has it, its importance scores, how to keep some)."""


def _unit(module: nn.Module) -> Unit | None:
    unit = PRUNABLE.get(type(module))
    return unit if unit is not None and unit.applies(module) else None


def prune_plan(model: nn.Module, heads: float, mlp: float) -> dict[str, dict[str, list[int]]]:
    """Per unit kind, module name → the sorted indices to keep (the lowest-scored share removed, module docstring)."""
    shares = {"heads": heads, "mlp": mlp}
    for kind, share in shares.items():
        if not 0.0 <= share < 1.0:
            raise UserError(f"--{kind} is the share of units to remove per layer, in [0, 1); got {share}.")
    plan: dict[str, dict[str, list[int]]] = {"heads": {}, "mlp": {}}
    for name, module in model.named_modules():
        unit = _unit(module)
        if unit is not None:
            with torch.no_grad():
                s = unit.scores(module)
            n_keep = max(1, len(s) - round(shares[unit.kind] * len(s)))
            plan[unit.kind][name] = sorted(s.topk(n_keep).indices.tolist())
    return plan


def apply_plan(model: nn.Module, plan: dict[str, dict[str, list[int]]]) -> nn.Module:
    """Prunes `model` in place to `plan` (from `prune_plan`, or a run's record to rebuild its shapes), with the
    hand-written rules only."""
    for modules in plan.values():
        for name, indices in modules.items():
            module = model.get_submodule(name)
            unit = _unit(module)
            if unit is None:
                raise UserError(f"The pruning record names {name}, which is not a prunable module of this model; "
                                f"it was written for another model or polyattn version.")
            unit.keep(module, torch.tensor(indices, dtype=torch.long))
    return model


def _tp_prune_mlps(model: nn.Module, plan_mlp: dict[str, list[int]], example_inputs: tuple) -> None:
    """The MLP channels of `plan_mlp` removed through torch-pruning's dependency graph, each group checked to be
    exactly the MLP's own layers (module docstring)."""
    import torch_pruning as tp

    output = lambda out: (out if torch.is_tensor(out) else out[0]).float().sum()
    with torch.enable_grad(), warnings.catch_warnings():
        # it warns that it would prune the last dimension of the norms' weights; only MLP groups are pruned here
        warnings.filterwarnings("ignore", message="Unwrapped parameters detected")
        graph = tp.DependencyGraph().build_dependency(model, example_inputs=example_inputs, output_transform=output)
    for name, keep in plan_mlp.items():
        mlp = model.get_submodule(name)
        rows, columns = _mlp_layers(mlp)
        drop = sorted(set(range(rows[0].out_features)) - set(keep))
        if not drop:
            continue
        group = graph.get_pruning_group(rows[0], tp.prune_linear_out_channels, idxs=drop)
        reached = {(id(dep.target.module), dep.handler.__name__) for dep, _ in group
                   if isinstance(dep.target.module, (nn.Linear, nn.Parameter))}
        expected = {*((id(r), "prune_out_channels") for r in rows), (id(columns), "prune_in_channels")}
        if reached != expected:
            raise RuntimeError(f"torch-pruning's group for {name} is not the MLP's own layers; prune it with "
                               f"apply_plan (the hand-written rule) and report this model.")
        group.prune()


def prune_model(model: nn.Module, plan: dict[str, dict[str, list[int]]],
                example_inputs: tuple | None = None) -> str:
    """Prunes `model` in place to `plan`: MLP channels through torch-pruning when it is installed and
    `example_inputs` (one forward's positional inputs) are given, heads by own code (module docstring). Returns
    which code pruned the MLP channels ('torch-pruning X.Y.Z' or 'polyattn')."""
    mlp_pruner = "polyattn"
    if example_inputs is not None and plan.get("mlp"):
        try:
            import torch_pruning
        except ImportError:
            torch_pruning = None
        if torch_pruning is not None:
            _tp_prune_mlps(model, plan["mlp"], example_inputs)
            mlp_pruner = f"torch-pruning {torch_pruning.__version__}"
    apply_plan(model, {k: v for k, v in plan.items() if k != "mlp" or mlp_pruner == "polyattn"})
    return mlp_pruner


def prune_run(run_dir: Path | str, heads: float, mlp: float, out: Path | str | None = None, *,
              finetune_steps: int = 0, finetune_overrides: Sequence[str] = ()) -> list[Path]:
    """Writes a pruned copy of a run directory (default `RUN_DIR-pruned` beside it) and, with `finetune_steps`,
    its fine-tune `OUT-ft<N>` beside it (`finetune_pruned`, its recipe changed by `finetune_overrides`, e.g.
    `train.lr=1e-4`); returns the directories written."""
    from ..registry import model_task
    from ..train.loop import load_run
    from .export import model_spec
    from .quantize import write_transformed_run

    if finetune_steps < 0:
        raise UserError(f"--finetune-steps is a number of optimizer steps, 0 or more; got {finetune_steps}.")
    check_finetune_overrides(finetune_overrides, finetune_steps)
    run_dir = Path(run_dir)
    run = load_run(run_dir)
    if any(r.get("transform") == "quantize" for r in run.config.deploy or []):
        raise UserError(f"{run_dir} is quantized; prune the float run it came from, then quantize the pruned one.")
    out = Path(out) if out is not None else run_dir.with_name(f"{run_dir.name}-pruned")
    tuned = out.with_name(f"{out.name}-ft{finetune_steps}")
    for path in (out, tuned) if finetune_steps else (out,):
        if path.exists():
            raise UserError(f"{path} already exists; pass --out with a new directory or remove it.")
    model = run.model.float().cpu()
    plan = prune_plan(model, heads, mlp)
    if not any(plan.values()):
        raise UserError(f"{run.config.model.name} has no attention heads or MLP channels that prune handles.")
    example = model_spec(model, model_task(run.config.model.name), run.config, batch=1).inputs
    mlp_pruner = prune_model(model, plan, example)
    record = {"transform": "prune", "heads_share": heads, "mlp_share": mlp, "score": "magnitude",
              "mlp_pruner": mlp_pruner, "source_run": str(run_dir.resolve()), "source_weights": run.weights,
              "plan": plan}
    config = copy.deepcopy(run.config)
    written = [write_transformed_run(run_dir, run.config, model, record, out)]
    if finetune_steps:
        written.append(finetune_pruned(out, config, record, tuned, finetune_steps, overrides=finetune_overrides))
    return written


FIXED_BY_FINETUNE = ("train.steps", "train.max_steps", "train.time_budget_s", "train.init_weights",
                     "train.out_dir", "train.run_name")
"""Keys the fine-tune sets itself: its length is --finetune-steps, its start the pruned weights, its place OUT-ftN."""


def check_finetune_overrides(overrides: Sequence[str], steps: int) -> None:
    """One sentence for fine-tune overrides that cannot apply: without a fine-tune, on the model's shape, or on
    what the fine-tune sets itself."""
    if overrides and not steps:
        raise UserError(f"{' '.join(overrides)} would change the fine-tune's recipe, and there is no fine-tune; "
                        f"add --finetune-steps N or drop them.")
    for item in overrides:
        key = item.partition("=")[0].strip()
        if key.startswith("model."):
            raise UserError(f"{key} would change the pruned model's shape or options; the fine-tune trains the "
                            f"pruned model as it is, so change only task.*, data.* and train.* settings.")
        if key in FIXED_BY_FINETUNE:
            raise UserError(f"{key} is set by prune itself (--finetune-steps, the pruned weights, OUT-ftN); "
                            f"drop it.")


def finetune_pruned(pruned_dir: Path, config, record: dict, out: Path, steps: int, *,
                    overrides: Sequence[str] = ()) -> Path:
    """Trains the pruned run `pruned_dir` for `steps` optimizer steps with the source run's recipe `config`,
    into the new run `out`.

    The recipe is the run's `config.yaml` as it is (task, data, batch size, optimizer, precision, EMA, the
    learning-rate schedule with its warm-up share), except its length, `train.steps = steps` (the schedule spans
    the fine-tune), its start, `train.init_weights` = the pruned weights, and the `overrides` (key=value of the
    task, data and train sections, e.g. a lower `train.lr`; `check_finetune_overrides`). The new run is an
    ordinary training run (metrics, checkpoints, a summary with the test metrics, `--resume` after an
    interruption) whose `config.yaml` carries the prune record, so it trains and loads with its pruned shapes.
    """
    from ..train.checkpoint import WEIGHTS
    from ..train.config import apply_overrides
    from ..train.loop import train

    check_finetune_overrides(overrides, steps)
    apply_overrides(config, list(overrides))
    config.deploy = [*(config.deploy or []), record]
    config.train.steps, config.train.max_steps, config.train.time_budget_s = steps, None, None
    config.train.init_weights = str((pruned_dir / WEIGHTS).resolve())
    config.train.out_dir, config.train.run_name = str(out.parent), out.name
    config.environment = None  # this run's own, recorded when it starts
    train(config)
    return out


__all__ = ["FIXED_BY_FINETUNE", "PRUNABLE", "Unit", "apply_plan", "check_finetune_overrides", "finetune_pruned",
           "head_scores", "keep_channels", "keep_heads", "keep_lightnet_heads", "lightnet_head_scores", "mlp_scores",
           "prune_model", "prune_plan", "prune_run"]
