"""`polyattn prune`: removing heads and channels physically equals zeroing their contribution, the pruned model
is smaller, and it loads from its run directory with its new shapes."""

import copy

import pytest
import torch

import polyattn
from polyattn.cli import main
from polyattn.deploy.prune import apply_plan, prune_plan
from polyattn.errors import UserError
from polyattn.layers import Attention
from polyattn.train.loop import load_run


def model_and_input(name):
    torch.manual_seed(0)
    if name == "vit_nano":
        return (polyattn.create_model(name, img_size=16, patch_size=4, num_classes=5, depth=2).eval(),
                torch.randn(2, 3, 16, 16))
    model = polyattn.create_model(name, vocab_size=64, dim=64, depth=2, num_heads=4).eval()
    return model, torch.randint(0, 64, (2, 12))


def zeroed(model, plan):
    """The unpruned model with the removed units' output weights set to zero: what pruning must equal."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        for name, keep in plan["heads"].items():
            attn = model.get_submodule(name)
            drop = sorted(set(range(attn.num_heads)) - set(keep))
            for h in drop:
                attn.o_proj.weight[:, h * attn.head_dim:(h + 1) * attn.head_dim] = 0
        for name, keep in plan["mlp"].items():
            mlp = model.get_submodule(name)
            out = mlp.w2 if hasattr(mlp, "w2") else mlp.fc2
            drop = sorted(set(range(out.in_features)) - set(keep))
            out.weight[:, drop] = 0
    return model


@pytest.mark.parametrize("name", ["vit_nano", "illama_femto", "llama_lm_nano", "lightnet_lm_nano"])
def test_pruning_equals_zeroing_the_removed_units(name):
    if name == "illama_femto":
        torch.manual_seed(0)
        model, x = polyattn.create_model(name, img_size=16, patch_size=4, num_classes=5, depth=2).eval(), \
            torch.randn(2, 3, 16, 16)
    else:
        model, x = model_and_input(name)
    plan = prune_plan(model, 0.5, 0.25)
    assert plan["mlp"] and (plan["heads"] or name.startswith("lightnet"))
    reference = zeroed(model, plan)
    pruned = apply_plan(copy.deepcopy(model), plan)
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), reference(x), rtol=1e-5, atol=1e-5)
    for module in pruned.modules():
        if isinstance(module, Attention):
            assert module.q_proj.out_features == module.num_heads * module.head_dim


def test_pruned_causal_lm_still_decodes_like_its_forward():
    model, x = model_and_input("llama_lm_nano")
    pruned = apply_plan(model, prune_plan(model, 0.5, 0.5))
    assert torch.equal(pruned.generate(x[:, :4], 8), pruned.generate(x[:, :4], 8, use_cache=False))


def test_bad_share_is_one_sentence():
    model, _ = model_and_input("llama_lm_nano")
    with pytest.raises(UserError, match="share of units to remove"):
        prune_plan(model, 1.0, 0.0)


def test_pruned_run_directory_loads_with_its_new_shapes(tiny_lm_run, tmp_path, capsys):
    out = tmp_path / "pruned"
    assert main(["prune", str(tiny_lm_run), "--heads", "0.5", "--mlp", "0.5", "--out", str(out)]) == 0
    run = load_run(out)
    assert run.model.blocks[0].attn.num_heads == 2
    assert (out / "model.safetensors").stat().st_size < (tiny_lm_run / "model.safetensors").stat().st_size
    assert main(["eval", str(out), "--precision", "fp32"]) == 0
    assert main(["quantize", str(out), "--method", "int8-dynamic", "--out", str(tmp_path / "pq")]) == 0
    assert load_run(tmp_path / "pq").model.blocks[0].attn.q_proj.out_features == 32
    assert main(["prune", str(tmp_path / "pq"), "--out", str(tmp_path / "x")]) == 2
    assert "prune the float run" in capsys.readouterr().err
