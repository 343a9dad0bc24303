"""Classification loss and metrics, checked against direct formulas and brute-force counts."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from polyattn.errors import UserError
from polyattn.tasks.classification import (
    ClassificationTask,
    expected_calibration_error,
    reliability_bins,
    topk_correct,
)


def test_loss_equals_cross_entropy_and_the_smoothed_target_formula():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(16, 7, generator=g)
    targets = torch.randint(0, 7, (16,), generator=g)
    for eps in (0.0, 0.1, 0.3):
        loss = ClassificationTask(7, label_smoothing=eps).loss(logits, targets)
        assert torch.allclose(loss, F.cross_entropy(logits, targets, label_smoothing=eps))
        smoothed = F.one_hot(targets, 7).double() * (1 - eps) + eps / 7
        by_hand = -(smoothed * logits.double().log_softmax(-1)).sum(-1).mean()
        assert math.isclose(loss.item(), by_hand.item(), rel_tol=1e-6)


def test_soft_targets():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(8, 5, generator=g)
    soft = torch.softmax(torch.randn(8, 5, generator=g), -1)
    task = ClassificationTask(5, label_smoothing=0.2)
    by_hand = -((soft * 0.8 + 0.2 / 5) * logits.log_softmax(-1)).sum(-1).mean()
    assert torch.allclose(task.loss(logits, soft), by_hand, atol=1e-6)
    hard = torch.randint(0, 5, (8,), generator=g)
    assert torch.allclose(task.loss(logits, F.one_hot(hard, 5).float()), task.loss(logits, hard), atol=1e-6)
    # mixup: the loss of a mixed target is the mix of the losses
    a, b = hard, hard.roll(1)
    mixed = 0.7 * F.one_hot(a, 5).float() + 0.3 * F.one_hot(b, 5).float()
    assert torch.allclose(task.loss(logits, mixed), 0.7 * task.loss(logits, a) + 0.3 * task.loss(logits, b),
                          atol=1e-6)


def test_loss_is_float32_under_low_precision_logits():
    logits = torch.randn(4, 3).bfloat16()
    loss = ClassificationTask(3).loss(logits, torch.tensor([0, 1, 2, 0]))
    assert loss.dtype == torch.float32


def test_topk_against_brute_force():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(200, 10, generator=g)
    targets = torch.randint(0, 10, (200,), generator=g)
    counts = topk_correct(logits, targets, (1, 3, 5, 10))
    for k, n in counts.items():
        rank = (logits > logits.gather(1, targets[:, None])).sum(1)  # classes scoring above the target
        assert n == int((rank < k).sum())
    assert counts[10] == 200
    with pytest.raises(UserError, match="Top-11"):
        topk_correct(logits, targets, (11,))


def test_ece_is_zero_when_calibrated():
    # in each bin, the fraction correct equals the confidence: 10 samples at 0.3 (3 right), 10 at 0.9 (9 right)
    conf = torch.tensor([0.3] * 10 + [0.9] * 10)
    correct = torch.tensor([1] * 3 + [0] * 7 + [1] * 9 + [0] * 1, dtype=torch.bool)
    assert expected_calibration_error(conf, correct, n_bins=10) == pytest.approx(0.0, abs=1e-7)  # float32 0.3


def test_ece_by_hand():
    conf = torch.tensor([0.95, 0.85, 0.55, 0.52, 0.15])
    correct = torch.tensor([1, 0, 1, 1, 0], dtype=torch.bool)
    # 5 bins of width 0.2: (0.8, 1] holds 0.95, 0.85 -> acc 0.5, conf 0.9, gap 0.4, weight 2/5
    #                      (0.4, 0.6] holds 0.55, 0.52 -> acc 1, conf 0.535, gap 0.465, weight 2/5
    #                      [0, 0.2] holds 0.15 -> acc 0, conf 0.15, gap 0.15, weight 1/5
    expected = 0.4 * 0.4 + 0.4 * 0.465 + 0.2 * 0.15
    assert expected_calibration_error(conf, correct, n_bins=5) == pytest.approx(expected)
    bins = reliability_bins(conf, correct, n_bins=5)
    assert bins.count.tolist() == [1, 0, 2, 0, 2]
    assert bins.accuracy[4].item() == pytest.approx(0.5) and bins.confidence[2].item() == pytest.approx(0.535)
    assert torch.isnan(bins.accuracy[1]) and torch.isnan(bins.confidence[3])
    assert torch.allclose(bins.edges, torch.linspace(0, 1, 6, dtype=torch.float64))
    # bin edges: a confidence exactly on an edge goes to the lower bin; 0 goes to the first
    edge = reliability_bins(torch.tensor([0.0, 0.2, 0.2001, 1.0], dtype=torch.float64), torch.ones(4), 5)
    assert edge.count.tolist() == [2, 1, 0, 0, 1]
    assert math.isnan(expected_calibration_error(torch.tensor([]), torch.tensor([]), 5))


class Linear(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(12, 6)
        self.seen_training = []

    def forward(self, x):
        self.seen_training.append(self.training)
        return self.fc(x.flatten(1).float())


def random_images(n: int, seed: int):
    """n random 3x2x2 images with labels of 6 classes, and the same cut into batches of 10 (the last one short)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 2, 2, generator=g)
    y = torch.randint(0, 6, (n,), generator=g)
    return x, y, [(x[i:i + 10], y[i:i + 10]) for i in range(0, n, 10)]


def test_evaluate_equals_metrics_on_the_concatenated_logits():
    torch.manual_seed(0)
    model = Linear()
    x, y, batches = random_images(37, seed=3)
    task = ClassificationTask(6, label_smoothing=0.1, ece_bins=8)
    model.train()
    metrics = task.evaluate(model, batches)
    assert model.training and set(model.seen_training) == {False}
    with torch.no_grad():
        logits = model.fc(x.flatten(1))
    conf, pred = logits.softmax(-1).max(-1)
    assert metrics["count"] == 37
    assert metrics["loss"] == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-5)
    assert metrics["top1"] == pytest.approx((pred == y).float().mean().item())
    assert metrics["top5"] == pytest.approx(topk_correct(logits, y, (5,))[5] / 37)
    assert metrics["ece"] == pytest.approx(expected_calibration_error(conf, pred == y, 8), abs=1e-6)
    model.eval()
    task.evaluate(model, batches)
    assert not model.training


def test_evaluate_with_flip_scores_the_mean_logits_of_each_image_and_its_mirror_image():
    torch.manual_seed(0)
    model = Linear()
    x, y, batches = random_images(23, seed=4)
    task = ClassificationTask(6)
    metrics = task.evaluate(model, batches, flip=True)
    with torch.no_grad():
        logits = (model.fc(x.flatten(1)) + model.fc(x.flip(-1).flatten(1))) / 2
    assert metrics["loss"] == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-5)
    assert metrics["top1"] == pytest.approx((logits.argmax(-1) == y).float().mean().item())
    assert metrics["loss"] != pytest.approx(task.evaluate(model, batches)["loss"], rel=1e-3)  # a second view
    # a mirror-symmetric model gives what the single view gives
    symmetric = nn.Sequential(nn.Flatten(), nn.Linear(12, 6))
    with torch.no_grad():
        symmetric[1].weight.copy_(symmetric[1].weight.view(6, 3, 2, 2).flip(-1).add(
            symmetric[1].weight.view(6, 3, 2, 2)).view(6, 12))
    single, both = task.evaluate(symmetric, batches), task.evaluate(symmetric, batches, flip=True)
    assert both["loss"] == pytest.approx(single["loss"], rel=1e-5) and both["top1"] == single["top1"]


def test_evaluate_with_few_classes_and_autocast():
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    batches = [(torch.randn(5, 1, 2, 2), torch.randint(0, 3, (5,)))]
    metrics = ClassificationTask(3).evaluate(model, batches, autocast_dtype=torch.bfloat16)
    assert set(metrics) == {"loss", "top1", "top3", "ece", "count"} and metrics["top3"] == 1.0
    assert math.isfinite(metrics["loss"])


def test_evaluate_errors():
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    with pytest.raises(UserError, match="empty"):
        ClassificationTask(3).evaluate(model, [])
    with pytest.raises(UserError, match="gives 3 logits"):
        ClassificationTask(10).evaluate(model, [(torch.randn(2, 4), torch.tensor([0, 1]))])
    with pytest.raises(UserError, match="Label smoothing"):
        ClassificationTask(3, label_smoothing=1.0)


def test_eval_images_evaluates_one_fixed_subset_of_the_split(cache_dir):
    from contextlib import nullcontext

    from polyattn.tasks.image_classification import ImageClassificationJob
    from polyattn.train.config import build_config

    tiny = ["model.embed_dim=32", "model.depth=1", "model.num_heads=2", "model.patch_size=4", "data.image_size=8",
            "train.batch_size=64", "train.progress=false"]
    job = ImageClassificationJob(build_config("default", [*tiny, "task.eval_images=50"]), torch.device("cpu"))
    full = job.datasets["test"]
    part = job.eval_dataset("test")
    assert len(part) == 50 < len(full)
    again = ImageClassificationJob(build_config("default", [*tiny, "task.eval_images=50", "train.seed=7"]),
                                   torch.device("cpu")).eval_dataset("test")
    assert torch.equal(part.images, again.images) and torch.equal(part.labels, again.labels)  # not the run's seed
    assert not torch.equal(part.images, full.images[:50])  # a random subset, not the first images of the file
    flat = full.images.flatten(1)
    assert all((flat == image.flatten()).all(-1).any() for image in part.images)  # images of the split

    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    metrics = job.evaluate(model, "test", autocast=nullcontext, progress=False)
    assert metrics["count"] == 50
    expected = job.task.evaluate(model, [(job.eval_transform(part.images), part.labels)])
    assert metrics["loss"] == pytest.approx(expected["loss"], rel=1e-5) and metrics["top1"] == expected["top1"]

    everything = ImageClassificationJob(build_config("default", [*tiny, "task.eval_images=100000"]),
                                        torch.device("cpu"))
    assert everything.eval_dataset("test") is everything.datasets["test"]
    with pytest.raises(UserError, match=r"task\.eval_images"):
        build_config("default", [*tiny, "task.eval_images=0"])
