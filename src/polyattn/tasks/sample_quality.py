"""Sample quality without downloads: Fréchet distance and class accuracy in a polyattn classifier's feature space.

FID (Heusel et al., arXiv 1706.08500) compares Gaussian fits of Inception-v3 features of real and generated
images. Inception weights cannot be downloaded here, so the features are those of an image classifier that
polyattn trained on the *same dataset*: its pooled pre-head features (`forward_head(forward_features(x),
pre_logits=True)`, everything before the classification layer). The numbers are therefore a "classifier Fréchet
distance" (named so, never FID) and are comparable only between measurements with the same classifier run and
the same numbers of images: the Fréchet distance of finite samples is biased upwards, more so for fewer images.

Two measures per set of generated images, and the same two for held-out real images as the floor:
  - `classifier_fd`: Fréchet distance between the generated images' features and those of the training images of
    the same classes (equal counts per class);
  - `classifier_accuracy`: the share of generated images that the classifier assigns to the class they were
    generated for.
  - `real_classifier_fd`, `real_classifier_accuracy`: the same for test images the generator never saw, with the
    same number of images per class as generated (as far as the test split has them). A generator cannot be
    expected to beat this floor; a good one comes close to it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data.images import load_image_split
from ..data.transforms import normalize, resize_center_crop
from ..errors import UserError

REFERENCE_SEED = 0
"""Seed of the subsets of real images (reference and floor): the same images at every measurement."""


def _sqrtm_psd(a: torch.Tensor) -> torch.Tensor:
    """Square root of a symmetric positive semi-definite matrix (eigen-decomposition; negative round-off → 0)."""
    w, v = torch.linalg.eigh((a + a.T) / 2)
    return (v * w.clamp_min(0).sqrt()) @ v.T


def frechet_distance(mu1: torch.Tensor, sigma1: torch.Tensor, mu2: torch.Tensor, sigma2: torch.Tensor) -> float:
    """Fréchet (2-Wasserstein) distance² between `N(mu1, sigma1)` and `N(mu2, sigma2)`:

        |μ1 − μ2|² + tr(Σ1) + tr(Σ2) − 2·tr((Σ1^½ Σ2 Σ1^½)^½)

    in float64, with symmetric eigen-decompositions only (`tr((Σ1 Σ2)^½)` of FID written in a form that stays
    real and handles singular covariances, e.g. from fewer images than feature dimensions).
    """
    mu1, mu2, sigma1, sigma2 = (torch.as_tensor(a, dtype=torch.float64) for a in (mu1, mu2, sigma1, sigma2))
    diff = mu1 - mu2
    root1 = _sqrtm_psd(sigma1)
    middle = root1 @ sigma2 @ root1
    tr_covmean = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp_min(0).sqrt().sum()
    return float(diff @ diff + sigma1.trace() + sigma2.trace() - 2 * tr_covmean)


def gaussian_fit(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean `[F]` and unbiased covariance `[F, F]` (float64) of features `[n, F]`, n ≥ 2."""
    f = torch.as_tensor(features, dtype=torch.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise UserError(f"A Fréchet distance needs at least 2 feature vectors, got {f.shape[0] if f.ndim else 0}; "
                        f"generate more images.")
    return f.mean(0), torch.cov(f.T).reshape(f.shape[1], f.shape[1])


def classifier_frechet_distance(real: torch.Tensor, generated: torch.Tensor) -> float:
    """Fréchet distance between Gaussian fits of two sets of classifier features `[n, F]`, `[m, F]`."""
    return frechet_distance(*gaussian_fit(real), *gaussian_fit(generated))


@torch.no_grad()
def classifier_features(classifier: nn.Module, images: torch.Tensor, *, mean: Sequence[float], std: Sequence[float],
                        image_size: int | None = None, batch_size: int = 256,
                        device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled pre-head features `[n, F]` (float64) and predicted classes `[n]` of uint8 images `[n, C, H, W]`.

    The images get the classifier's own evaluation preprocessing: resized (shorter side, centre crop) to its
    `image_size` when they differ, then normalised with its `mean`/`std`.
    """
    classifier.eval()
    feats, preds = [], []
    for start in range(0, len(images), batch_size):
        x = images[start:start + batch_size]
        if image_size is not None:
            x = resize_center_crop(x, image_size)
        x = normalize(x, mean, std).to(device)
        tokens = classifier.forward_features(x)
        pooled = classifier.forward_head(tokens, pre_logits=True)  # (b, F)
        logits = classifier.forward_head(tokens)  # (b, K)
        feats.append(pooled.double().cpu())
        preds.append(logits.argmax(-1).cpu())
    return torch.cat(feats), torch.cat(preds)


def _per_class_subset(labels: torch.Tensor, counts: dict[int, int], seed: int) -> torch.Tensor:
    """Indices of up to `counts[c]` random samples of each class c (a fixed choice for a seed)."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(labels), generator=generator)
    chosen = []
    for c, n in counts.items():
        chosen.append(order[labels[order] == c][:n])
    return torch.cat(chosen) if chosen else torch.zeros(0, dtype=torch.long)


def _same_source(a: str, b: str) -> bool:
    if a == b:
        return True
    try:
        return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()
    except OSError:
        return False


def measure_samples(images: torch.Tensor, labels: Sequence[int], *, classifier: nn.Module, classifier_config,
                    data_config, max_reference: int = 10_000, batch_size: int = 256,
                    device: torch.device | str = "cpu") -> dict[str, Any]:
    """Classifier Fréchet distance and class accuracy of generated uint8 `images` `[n, C, H, W]` with requested
    `labels`, and the same measures on held-out real images (the floor); see the module docstring.

    Args:
        classifier: a trained polyattn image classifier (timm's `forward_features`/`forward_head` contract).
        classifier_config: its run config (data source, image size, normalisation).
        data_config: the generator's `DataConfig`; the real images are loaded with it (same size as the samples).
        max_reference: at most this many training images form the reference set (equal counts per class).
    """
    labels = torch.as_tensor(list(labels), dtype=torch.long)
    if len(labels) != len(images):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    if not _same_source(classifier_config.data.source, data_config.source):
        raise UserError(f"The classifier was trained on '{classifier_config.data.source}' but the generator on "
                        f"'{data_config.source}'; its features only measure samples of its own dataset.")
    train = load_image_split(data_config.source, "train", image_size=data_config.image_size,
                             test_fraction=data_config.test_fraction)
    test = load_image_split(data_config.source, "test", image_size=data_config.image_size,
                            test_fraction=data_config.test_fraction)
    num_classes = getattr(classifier, "num_classes", len(train.classes))
    if num_classes != len(train.classes):
        raise UserError(f"The classifier has {num_classes} classes but the dataset {len(train.classes)}; use a "
                        f"classifier run trained on this dataset.")
    if tuple(images.shape[1:]) != tuple(train.images.shape[1:]):
        raise UserError(f"The samples have shape {list(images.shape[1:])} but the dataset's images "
                        f"{list(train.images.shape[1:])}; measure samples of a generator trained on this dataset.")
    classes = sorted(set(labels.tolist()))
    per_class = {c: int((labels == c).sum()) for c in classes}
    reference_counts = {c: max(1, max_reference // len(classes)) for c in classes}
    ref_idx = _per_class_subset(train.labels, reference_counts, REFERENCE_SEED)
    real_idx = _per_class_subset(test.labels, per_class, REFERENCE_SEED)

    d = classifier_config.data
    kwargs = dict(mean=d.mean, std=d.std, image_size=d.image_size, batch_size=batch_size, device=device)
    ref_feats, _ = classifier_features(classifier, train.images[ref_idx], **kwargs)
    gen_feats, gen_pred = classifier_features(classifier, images, **kwargs)
    real_feats, real_pred = classifier_features(classifier, test.images[real_idx], **kwargs)
    return {
        "classifier_fd": classifier_frechet_distance(ref_feats, gen_feats),
        "classifier_accuracy": float((gen_pred == labels).double().mean()),
        "real_classifier_fd": classifier_frechet_distance(ref_feats, real_feats),
        "real_classifier_accuracy": float((real_pred == test.labels[real_idx]).double().mean()),
        "n_generated": len(labels),
        "n_real": len(real_idx),
        "n_reference": len(ref_idx),
        "feature_dim": int(gen_feats.shape[1]),
    }


__all__ = [
    "classifier_features",
    "classifier_frechet_distance",
    "frechet_distance",
    "gaussian_fit",
    "measure_samples",
]
