"""`polyattn prune`: removing heads and channels physically equals zeroing their contribution (softmax heads, grouped
kv heads, LightNet heads with their LRPE frequencies, MLP channels), pruning nothing changes nothing, torch-pruning's
MLP groups equal the hand-written rule, the pruned model is smaller, it loads from its run directory with its new
shapes, and `--finetune-steps` trains it with the run's recipe into a run that evaluates and generates."""

import copy
import json

import pytest
import torch

import polyattn
from polyattn.cli import main
from polyattn.deploy.prune import apply_plan, prune_model, prune_plan
from polyattn.errors import UserError
from polyattn.layers import Attention
from polyattn.layers.lightnet import LightNetAttention
from polyattn.train.loop import load_run

IMAGE_MODELS = ("vit_nano", "illama_femto", "lightnet_vision_nano")


def model_and_input(name, **kw):
    torch.manual_seed(0)
    if name in IMAGE_MODELS:
        return (polyattn.create_model(name, img_size=16, patch_size=4, num_classes=5, depth=2, **kw).eval(),
                torch.randn(2, 3, 16, 16))
    model = polyattn.create_model(name, vocab_size=64, dim=64, depth=2, num_heads=4, **kw).eval()
    return model, torch.randint(0, 64, (2, 12))


def zeroed(model, plan):
    """The unpruned model with the removed units' output weights set to zero: what pruning must equal."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        for name, keep in plan["heads"].items():
            attn = model.get_submodule(name)
            group = attn.num_heads // getattr(attn, "num_kv_heads", attn.num_heads)  # query heads per kv head
            for g in sorted(set(range(attn.num_heads // group)) - set(keep)):
                attn.o_proj.weight[:, g * group * attn.head_dim:(g + 1) * group * attn.head_dim] = 0
        for name, keep in plan["mlp"].items():
            mlp = model.get_submodule(name)
            out = mlp.w2 if hasattr(mlp, "w2") else mlp.fc2
            out.weight[:, sorted(set(range(out.in_features)) - set(keep))] = 0
    return model


def logits(out):
    return out if torch.is_tensor(out) else out[0]


CASES = [("vit_nano", {}), ("illama_femto", {}), ("lightnet_vision_nano", {}), ("llama_lm_nano", {}),
         ("llama_lm_nano", {"num_kv_heads": 2}), ("lightnet_lm_nano", {}), ("lightnet_lm_nano", {"lrpe": "rotary"})]


@pytest.mark.parametrize(("name", "kw"), CASES)
def test_pruning_equals_zeroing_the_removed_units(name, kw):
    model, x = model_and_input(name, **kw)
    plan = prune_plan(model, 0.5, 0.25)
    assert plan["mlp"] and plan["heads"]
    reference = zeroed(model, plan)
    pruned = apply_plan(copy.deepcopy(model), plan)
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        torch.testing.assert_close(logits(pruned(x)), logits(reference(x)), rtol=1e-5, atol=1e-5)
    for module in pruned.modules():
        if isinstance(module, (Attention, LightNetAttention)):
            assert module.q_proj.out_features == module.num_heads * module.head_dim
    if name.startswith("lightnet"):  # the kept heads keep the LRPE frequencies they were trained with
        attn = pruned.blocks[0].attn
        assert attn.num_heads == 2 and list(attn.lrpe_head_index) == plan["heads"]["blocks.0.attn"]
        assert attn.g_norm.groups == 2 and attn.g_proj[1].out_features == 2 * attn.head_dim


@pytest.mark.parametrize("name", ["lightnet_lm_nano", "lightnet_vision_nano", "llama_lm_nano"])
def test_pruning_nothing_changes_nothing(name):
    model, x = model_and_input(name)
    plan = prune_plan(model, 0.0, 0.0)
    pruned = apply_plan(copy.deepcopy(model), plan)
    with torch.no_grad():
        assert torch.equal(logits(pruned(x)), logits(model(x)))


@pytest.mark.parametrize("name", ["vit_nano", "illama_femto", "llama_lm_nano", "lightnet_lm_nano"])
def test_torch_pruning_mlp_groups_equal_the_hand_written_rule(name):
    pytest.importorskip("torch_pruning")
    model, x = model_and_input(name)
    plan = prune_plan(model, 0.5, 0.5)
    own = apply_plan(copy.deepcopy(model), plan)
    via_tp = copy.deepcopy(model)
    assert prune_model(via_tp, plan, (x,)).startswith("torch-pruning")
    own_state, tp_state = own.state_dict(), via_tp.state_dict()
    assert own_state.keys() == tp_state.keys()
    assert all(torch.equal(own_state[k], tp_state[k]) for k in own_state)


@pytest.mark.parametrize("name", ["llama_lm_nano", "lightnet_lm_nano"])
def test_pruned_causal_lm_still_decodes_like_its_forward(name):
    model, x = model_and_input(name, **({"num_kv_heads": 2} if name.startswith("llama") else {}))
    pruned = apply_plan(model, prune_plan(model, 0.5, 0.5))
    assert torch.equal(pruned.generate(x[:, :4], 8), pruned.generate(x[:, :4], 8, use_cache=False))


def test_bad_share_is_one_sentence():
    model, _ = model_and_input("llama_lm_nano")
    with pytest.raises(UserError, match="share of units to remove"):
        prune_plan(model, 1.0, 0.0)


@pytest.fixture(scope="module")
def lightnet_run(tmp_path_factory):
    """A tiny LightNet LM run of two steps (the LLaMA-style one is the session's `tiny_lm_run`)."""
    from polyattn.train.config import build_config
    from polyattn.train.loop import train

    root = tmp_path_factory.mktemp("prune")
    overrides = ["model.dim=64", "model.depth=1", "model.num_heads=4", "data.seq_len=16", "train.batch_size=4",
                 "data.eval_batch_size=8", "data.eval_tokens=200", "train.progress=false", "train.precision=fp32",
                 "train.max_steps=2", "train.log_every=1", f"train.out_dir={root}", "train.run_name=lightnet"]
    train(build_config("lightnet_lm_shakespeare", overrides), evaluate=False)
    return root / "lightnet"


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


def test_pruned_lightnet_fine_tunes_with_its_recipe_and_runs_everywhere(lightnet_run, tmp_path, capsys):
    out = tmp_path / "lightnet-pruned"
    for bad, message in ((["train.lr=1e-4"], "there is no fine-tune"),
                         (["--finetune-steps", "2", "model.depth=1"], "pruned model as it is"),
                         (["--finetune-steps", "2", "train.steps=5"], "set by prune itself")):
        assert main(["prune", str(lightnet_run), "--out", str(out), *bad]) == 2
        assert message in capsys.readouterr().err and not out.exists()
    assert main(["prune", str(lightnet_run), "--heads", "0.5", "--mlp", "0.5", "--out", str(out),
                 "--finetune-steps", "12", "train.lr=5e-4"]) == 0
    tuned = tmp_path / "lightnet-pruned-ft12"
    pruned, finetuned = load_run(out), load_run(tuned)
    assert finetuned.config.train.lr == 5e-4 and pruned.config.train.lr != 5e-4
    attn = finetuned.model.blocks[0].attn
    assert attn.num_heads == 2 and attn.lrpe_head_index == pruned.model.blocks[0].attn.lrpe_head_index
    assert finetuned.config.train.steps == 12 and finetuned.config.deploy == pruned.config.deploy
    assert finetuned.config.train.init_weights == str((out / "model.safetensors").resolve())
    # trained: the weights moved away from the pruned ones, and the loss fell over the fine-tune
    assert not torch.equal(finetuned.model.blocks[0].attn.q_proj.weight, pruned.model.blocks[0].attn.q_proj.weight)
    losses = [r["loss"] for r in map(json.loads, (tuned / "metrics.jsonl").read_text().splitlines())
              if r.get("kind") == "train" and "loss" in r]
    assert len(losses) == 12 and sum(losses[-3:]) < sum(losses[:3])
    capsys.readouterr()
    assert main(["eval", str(tuned), "--precision", "fp32"]) == 0
    assert main(["generate", str(tuned), "--prompt", "RO", "--max-new-tokens", "8", "--precision", "fp32"]) == 0
    assert main(["prune", str(lightnet_run), "--out", str(out)]) == 2  # it exists
