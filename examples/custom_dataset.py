"""Train on your own images from Python: register them as a data source, train a recipe on them, load the run.

`register_image_source(name, load)` makes `data.source=name` read the `ImageDataset` that `load(split)` returns
(uint8 images `[N, C, H, W]`, int64 labels, class names), so every recipe, override and run-directory feature
works on it. Here the "dataset" is synthetic: crosses and squares drawn in 16×16 images.

    python examples/custom_dataset.py [--steps 60] [--out runs/examples]
"""

import argparse
import tempfile
from pathlib import Path

import torch

import polyattn
from polyattn.data import EvalTransform, ImageDataset, register_image_source
from polyattn.train import build_config, evaluate_run, train


def shapes(split: str, size: int = 16) -> ImageDataset:
    """Crosses (class 0) and hollow squares (class 1) at random places, with noise; a different draw per split."""
    g = torch.Generator().manual_seed(0 if split == "train" else 1)
    n = 256 if split == "train" else 64
    images = torch.randint(0, 60, (n, 1, size, size), generator=g, dtype=torch.uint8)
    labels = torch.arange(n) % 2
    for i in range(n):
        r, c = torch.randint(3, size - 4, (2,), generator=g).tolist()
        if labels[i] == 0:
            images[i, 0, r - 3:r + 4, c] = 255
            images[i, 0, r, c - 3:c + 4] = 255
        else:
            images[i, 0, r - 3:r + 4, [c - 3, c + 3]] = 255
            images[i, 0, [r - 3, r + 3], c - 3:c + 4] = 255
    return ImageDataset(images, labels, ["cross", "square"], source="shapes")


def main(steps: int = 60, out: str | None = None) -> dict:
    register_image_source("shapes", shapes)
    out = out or tempfile.mkdtemp()
    # the default recipe (a ViT with 2x2 patches), smaller, on the registered images; any key=value works here
    config = build_config("default", ["data.source=shapes", "model.depth=2", "model.embed_dim=64",
                                      "train.batch_size=32", f"train.steps={steps}", "train.warmup_epochs=0.5",
                                      "train.epochs=8", "train.progress=false", f"train.out_dir={out}",
                                      "train.run_name=shapes"])
    summary = train(config)
    run_dir = Path(out) / "shapes"
    metrics = evaluate_run(run_dir)  # needs the registration above, as the run's data.source is 'shapes'
    run = polyattn.load_run(run_dir)  # the run directory rebuilds the model alone, with its normalisation
    test = shapes("test")
    with torch.no_grad():
        predicted = run.model(EvalTransform(run.config.data.mean, run.config.data.std)(test.images[:8])).argmax(-1)
    print(f"{run.config.model.name}: test top-1 {metrics['top1']:.3f} after {summary['steps']} steps; first "
          f"test images: {', '.join(test.classes[i] for i in predicted)}")
    return metrics


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--out", help="folder for the run directory (default: a temporary folder)")
    args = parser.parse_args()
    main(args.steps, args.out)
