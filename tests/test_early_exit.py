"""Per-input early exit (Shallow-Deep Networks' confidence exit, arXiv 1810.07052; PABEE's deep-supervision loss,
arXiv 2006.04152): a threshold of 1.0 is exactly the full model, 0 exits after the first block, the batched exit
equals running each input alone, exited rows leave the batch, and the task trains every exit."""

import pytest
import torch

from polyattn.layers.early_exit import exit_confidence
from polyattn.registry import create_model
from polyattn.tasks.classification import ClassificationTask

TINY = dict(img_size=16, patch_size=4, num_classes=5, embed_dim=32, depth=4, num_heads=2)
MODELS = ["vit_tiny", "illama_tiny", "lightnet_vision_tiny"]


@pytest.fixture(scope="module")
def images():
    return torch.randn(6, 3, 16, 16, generator=torch.Generator().manual_seed(0))


def exit_model(name, **kw):
    torch.manual_seed(0)
    extra = dict(mask_mode="causal") if name.startswith("illama") else {}
    model = create_model(name, **TINY, **extra, early_exit=True, **kw).eval()
    with torch.no_grad():  # spread the exits' confidences so that mid thresholds split the batch
        model.head.weight.mul_(30)
    return model


@pytest.mark.parametrize("name", MODELS)
def test_threshold_one_is_the_full_model_and_zero_exits_after_block_one(name, images):
    model = exit_model(name)
    with torch.no_grad():
        full = model.forward_head(model.forward_features(images))
        never = model.forward_early_exit(images, 1.0)
        first = model.forward_early_exit(images, 0.0)
        exits = model.forward_exits(images)
    assert torch.equal(never.logits, full) and (never.exit_block == TINY["depth"]).all()
    assert (first.exit_block == 1).all() and torch.equal(first.logits, exits[0])
    assert torch.equal(exits[-1], full)  # the last exit is the model's own output
    assert torch.equal(model(images), full)  # exit_threshold defaults to 1.0


@pytest.mark.parametrize("name", MODELS)
def test_batched_exit_equals_each_input_alone(name, images):
    model = exit_model(name)
    with torch.no_grad():
        conf = torch.stack([exit_confidence(z) for z in model.forward_exits(images)])  # (E, B)
        v = conf[:-1].flatten().sort().values  # between two middle confidences: some inputs exit, some run on,
        threshold = float(v[len(v) // 2 - 1: len(v) // 2 + 1].mean())  # and round-off cannot flip the rule
        out = model.forward_early_exit(images, threshold)
        alone = [model.forward_early_exit(images[i:i + 1], threshold) for i in range(len(images))]
    assert len(set(out.exit_block.tolist())) > 1, "the threshold should split the batch"
    for i, one in enumerate(alone):
        assert int(one.exit_block) == int(out.exit_block[i])
        torch.testing.assert_close(out.logits[i], one.logits[0], atol=1e-5, rtol=1e-5)
        # the exit taken is the first whose confidence passes the threshold
        passed = (conf[:-1, i] > threshold).nonzero()
        expected = int(passed[0]) + 1 if len(passed) else TINY["depth"]
        assert int(one.exit_block) == expected


def test_exited_rows_leave_the_batch(images):
    model = exit_model("vit_tiny")
    rows = []
    hooks = [b.register_forward_hook(lambda m, i, o: rows.append(i[0].shape[0])) for b in model.blocks]
    with torch.no_grad():
        out = model.forward_early_exit(images, 0.0)
    for h in hooks:
        h.remove()
    assert rows == [len(images)] and (out.exit_block == 1).all()  # the later blocks never ran


def test_deep_supervision_loss_trains_every_exit(images):
    model = exit_model("vit_tiny").train()
    task = ClassificationTask(5)
    y = torch.arange(6) % 5
    exits = model(images, all_exits=True)
    assert exits.shape == (TINY["depth"], 6, 5)
    losses = torch.stack([task.loss(z, y) for z in exits])
    weights = torch.arange(1.0, 5.0)
    torch.testing.assert_close(task.exits_loss(exits, y), (weights * losses).sum() / weights.sum())
    task.exits_loss(exits, y).backward()
    assert all(n.weight.grad is not None and n.weight.grad.abs().sum() > 0 for n in model.exit_norms)


def test_eval_reports_blocks_and_bad_settings_are_refused(images):
    model = exit_model("vit_tiny", exit_threshold=0.0)
    metrics = ClassificationTask(5).evaluate(model, [(images, torch.arange(6) % 5)])
    assert metrics["blocks"] == 1.0
    with pytest.raises(ValueError, match="softmax probability in"):
        create_model("vit_tiny", **TINY, early_exit=True, exit_threshold=1.5)
    with pytest.raises(ValueError, match="set reversible=False"):
        create_model("vit_tiny", **TINY, early_exit=True, reversible=True)
    with pytest.raises(ValueError, match="built without exits"):
        create_model("vit_tiny", **TINY)(images, all_exits=True)
