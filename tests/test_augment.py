"""The DeiT augmentation pieces: RandAugment and random erasing (kornia, driven by the job's generator), mixup and
cutmix with soft targets, their config checks, and exact resume of a run that uses all of them."""

import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F

from polyattn.cli import main
from polyattn.data.transforms import MixupCutmix, TrainAugment, generator_as_global_rng
from polyattn.errors import UserError
from polyattn.tasks.classification import ClassificationTask
from polyattn.train.config import build_config
from polyattn.train.loop import load_run_config, train
from polyattn.train.run_log import read_metrics

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def images(n=32, c=3, h=16, w=16, seed=0):
    return torch.randint(0, 256, (n, c, h, w), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


# ---- RandAugment and random erasing -----------------------------------------------------------------------

@pytest.mark.parametrize("channels", [3, 1])
def test_randaugment_and_erasing_are_reproducible_from_the_generator(channels):
    x = images(c=channels)
    mean, std = MEAN[:channels], STD[:channels]
    aug = TrainAugment(mean, std, pad=2, flip=0.5, randaugment_ops=2, randaugment_magnitude=9, erase=0.5)
    g = torch.Generator().manual_seed(5)
    state = g.get_state()
    global_before = torch.get_rng_state()
    first = aug(x, g)
    assert torch.equal(torch.get_rng_state(), global_before), "kornia's draws must not touch the global RNG"
    second = aug(x, g)
    g.set_state(state)
    assert torch.equal(aug(x, g), first)
    assert not torch.equal(first, second)
    assert first.dtype == torch.float32 and first.shape == x.shape
    plain = TrainAugment(mean, std, pad=2, flip=0.5)(x, torch.Generator().manual_seed(5))
    assert not torch.equal(first, plain)  # RandAugment and erasing did something


def test_randaugment_changes_images_and_keeps_the_pixel_range():
    x = images(n=64)
    aug = TrainAugment((0.0,) * 3, (1 / 255,) * 3, randaugment_ops=2, randaugment_magnitude=9)
    out = aug(x, torch.Generator().manual_seed(0))  # in pixel units: normalized with mean 0, std 1/255
    assert out.min() >= -1e-3 and out.max() <= 255 + 1e-3
    changed = (out - x.float()).abs().mean(dim=(1, 2, 3)) > 1.0
    assert changed.float().mean() > 0.9


def test_erasing_sets_one_rectangle_to_the_mean():
    x = torch.full((64, 3, 32, 32), 200, dtype=torch.uint8)
    out = TrainAugment(MEAN, STD, erase=1.0)(x, torch.Generator().manual_seed(1))
    value = (200 / 255 - 0.5) / 0.25
    erased = out[:, 0] == 0.0  # (B, H, W); untouched pixels keep `value` != 0
    assert torch.allclose(out[~erased[:, None].expand_as(out)], torch.tensor(value))
    assert (out == 0).all(dim=1).eq(erased).all()  # every channel of an erased pixel
    for mask in erased:
        rows, cols = mask.any(1).nonzero().flatten(), mask.any(0).nonzero().flatten()
        assert rows.numel() and cols.numel()
        box = mask[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
        assert box.all(), "the erased pixels form one rectangle"
        assert 0.01 <= mask.float().mean() <= 0.4  # 2-33 % of the area, up to rounding to whole pixels
    none = TrainAugment(MEAN, STD, erase=0.0)(x, torch.Generator().manual_seed(1))
    assert (none != 0).all()


def test_generator_as_global_rng_advances_only_the_generator():
    g = torch.Generator().manual_seed(3)
    expected = torch.rand(4, generator=torch.Generator().manual_seed(3))
    before = torch.get_rng_state()
    with generator_as_global_rng(g):
        drawn = torch.rand(4)
    assert torch.equal(drawn, expected)
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(torch.rand(4, generator=g), torch.rand(8, generator=torch.Generator().manual_seed(3))[4:])


# ---- mixup and cutmix --------------------------------------------------------------------------------------

def distinct_batch(b=16, c=3, h=16, w=16):
    """Images whose pixels all differ between samples (sample i holds values in [i, i + 0.5))."""
    x = torch.arange(b, dtype=torch.float32).view(b, 1, 1, 1) + torch.rand(1, c, h, w) * 0.5
    labels = torch.arange(b) % 5
    return x, labels


def test_mixup_mixes_images_and_labels_in_the_same_proportion():
    x, y = distinct_batch()
    mix = MixupCutmix(5, mixup_alpha=0.8)
    out, targets = mix(x, y, torch.Generator().manual_seed(0))
    assert targets.shape == (16, 5) and targets.dtype == torch.float32
    assert torch.allclose(targets.sum(-1), torch.ones(16))
    # sample 0 is mixed with sample 15 (label 0 with label 0 is ambiguous; use sample 1 with 14: labels 1 and 4)
    lam = float(targets[1, 1])
    assert 0.0 < lam < 1.0
    assert torch.allclose(targets[1, 4], torch.tensor(1 - lam))
    assert torch.allclose(out, lam * x + (1 - lam) * x.flip(0), atol=1e-6)


def test_cutmix_label_share_is_the_pasted_area():
    x, y = distinct_batch(h=20, w=24)
    mix = MixupCutmix(5, cutmix_alpha=1.0)
    g = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(20):
        out, targets = mix(x, y, g)
        pasted = (out != x).all(dim=1)  # (B, H, W): pixels taken from the reversed batch
        assert torch.equal(out[:, :, pasted[0]], x.flip(0)[:, :, pasted[0]])
        area = pasted[0].float().mean().item()
        assert all(torch.equal(p, pasted[0]) for p in pasted)  # one box for the whole batch
        lam = float(targets[1, 1])
        assert math.isclose(lam, 1 - area, abs_tol=1e-6)
        assert torch.allclose(targets.sum(-1), torch.ones(16))
        seen.add(round(area, 3))
    assert len(seen) > 5  # λ and the box position vary


@pytest.mark.parametrize("alpha", [0.001, 1.0])
def test_mixup_lambda_follows_beta_alpha_alpha(alpha):
    x, y = distinct_batch(b=4, h=2, w=2)
    mix, g = MixupCutmix(5, mixup_alpha=alpha), torch.Generator().manual_seed(0)
    lam = torch.tensor([float(mix(x, y, g)[1][1, 1]) for _ in range(400)])  # sample 1 (label 1) pairs with 2
    if alpha < 0.01:  # mass at the ends: the batch is mostly kept or swapped with its reverse, rarely blended
        assert (torch.minimum(lam, 1 - lam) > 0.01).float().mean() < 0.03  # Beta(.001, .001): ~0.5 %
    else:  # Beta(1, 1) is uniform
        assert abs(lam.mean() - 0.5) < 0.05 and abs(lam.std() - 12**-0.5) < 0.03


def test_switch_and_mix_probabilities():
    x, y = distinct_batch()
    g = torch.Generator().manual_seed(0)
    only_cutmix = MixupCutmix(5, mixup_alpha=1.0, cutmix_alpha=1.0, switch_prob=1.0)
    for _ in range(5):
        out, _ = only_cutmix(x, y, g)
        assert ((out == x) | (out == x.flip(0))).all()  # pasted pixels, never blends
    only_mixup = MixupCutmix(5, mixup_alpha=1.0, cutmix_alpha=1.0, switch_prob=0.0)
    out, targets = only_mixup(x, y, g)
    lam = float(targets[1, 1])
    assert torch.allclose(out, lam * x + (1 - lam) * x.flip(0), atol=1e-6)
    never = MixupCutmix(5, mixup_alpha=1.0, prob=0.0)
    assert not never.enabled
    out, targets = never(x, y, g)
    assert torch.equal(out, x) and torch.equal(targets, F.one_hot(y, 5).float())
    assert not MixupCutmix(5).enabled


def test_mixup_is_reproducible_from_the_generator():
    x, y = distinct_batch()
    mix = MixupCutmix(5, mixup_alpha=0.8, cutmix_alpha=1.0, prob=0.8)
    a = [mix(x, y, g) for g in [torch.Generator().manual_seed(9)] for _ in range(4)]
    b = [mix(x, y, g) for g in [torch.Generator().manual_seed(9)] for _ in range(4)]
    for (xa, ta), (xb, tb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ta, tb)


def test_soft_target_loss_equals_hard_label_loss_for_one_hot_and_mixes_linearly():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(16, 5, generator=g)
    x, y = distinct_batch()
    for eps in (0.0, 0.1):
        task = ClassificationTask(5, label_smoothing=eps)
        assert torch.allclose(task.loss(logits, F.one_hot(y, 5).float()), task.loss(logits, y), atol=1e-6)
        _, targets = MixupCutmix(5, mixup_alpha=0.8)(x, y, torch.Generator().manual_seed(1))
        lam = float(targets[1, 1])
        per_sample = (lam * F.cross_entropy(logits, y, label_smoothing=eps, reduction="none")
                      + (1 - lam) * F.cross_entropy(logits, y.flip(0), label_smoothing=eps, reduction="none"))
        assert torch.allclose(task.loss(logits, targets), per_sample.mean(), atol=1e-6)
    with pytest.raises(UserError, match="do not match the logits"):
        ClassificationTask(5).loss(logits, torch.ones(16, 4) / 4)


# ---- configuration -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("override, message", [
    ("data.mixup_alpha=-0.5", "data.mixup_alpha must be at least 0"),
    ("data.cutmix_alpha=-1", "data.cutmix_alpha must be at least 0"),
    ("data.mix_prob=1.5", "data.mix_prob must be a probability, from 0 to 1"),
    ("data.mix_switch_prob=-0.1", "data.mix_switch_prob must be a probability, from 0 to 1"),
    ("data.random_erase=2", "data.random_erase must be a probability, from 0 to 1"),
    ("data.randaugment_ops=20", "data.randaugment_ops must be at least 0 and at most 13"),
    ("data.randaugment_magnitude=10", "data.randaugment_magnitude must be greater than 0 and less than 10"),
])
def test_bad_augmentation_values_are_one_sentence(override, message, tmp_path, cache_dir, capsys):
    extra = ["data.randaugment_ops=2"] if "magnitude" in override else []
    code = main(["train", "default", override, *extra, f"train.out_dir={tmp_path}", "train.progress=false"])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err
    assert err.count("\n") == 1 and "Traceback" not in err


TINY = ["model.embed_dim=32", "model.depth=1", "model.num_heads=2", "model.patch_size=4", "data.image_size=8",
        "data.crop_padding=1", "train.batch_size=64", "train.progress=false", "train.log_every=1",
        "train.epochs=2", "train.precision=fp32", "model.drop_path_rate=0.1"]
STRONG = ["data.randaugment_ops=2", "data.randaugment_magnitude=9", "data.random_erase=0.25",
          "data.mixup_alpha=0.8", "data.cutmix_alpha=1.0", "data.mix_prob=0.9"]


def test_resumed_run_with_every_augmentation_matches_the_uninterrupted_one(tmp_path, cache_dir):
    ref = train(build_config("default", [*TINY, *STRONG, f"train.out_dir={tmp_path}", "train.run_name=ref"]))

    # the same run stopped at step 9 (a checkpoint: checkpoint_every=3), then resumed to the end
    stopped = tmp_path / "stopped"
    train(build_config("default", [*TINY, *STRONG, f"train.out_dir={tmp_path}", "train.run_name=stopped",
                                   "train.max_steps=9", "train.checkpoint_every=3"]))
    assert (stopped / "checkpoints" / "latest").read_text().strip() == "step-00000009"
    (stopped / "summary.json").unlink()  # make it an interrupted run again
    (stopped / "model.safetensors").unlink()
    config = load_run_config(stopped)
    config.train.max_steps, config.train.checkpoint_every = None, None
    resumed = train(config, resume_dir=stopped)

    assert resumed["steps"] == ref["steps"] > 9
    assert resumed["test"] == ref["test"]
    losses = lambda run: [(r["step"], r["loss"]) for r in read_metrics(run) if r["kind"] == "train"]
    assert losses(stopped) == losses(tmp_path / "ref")
    ref_config = json.dumps(load_run_config(tmp_path / "ref").to_dict()["data"], sort_keys=True)
    assert '"mixup_alpha": 0.8' in ref_config and '"randaugment_ops": 2' in ref_config
    shutil.rmtree(tmp_path / "ref")
