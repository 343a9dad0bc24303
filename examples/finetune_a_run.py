"""Fine-tune a trained run on new images with a new head: a digit classifier becomes an even/odd classifier.

`polyattn.load_run` rebuilds any run's model from its directory with its trained (by default averaged) weights;
`reset_classifier` swaps the head (timm's contract, shared by polyattn's image classifiers). The rest is the
library's data pieces and optimizer in a plain PyTorch loop: put your own images in `ImageDataset`s instead.

    python examples/finetune_a_run.py [--run RUN_DIR] [--steps 40]
      (without --run it first trains a small digits classifier for a minute's fraction)
"""

import argparse
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

import polyattn
from polyattn.data import BatchLoader, EvalTransform, ImageDataset, load_image_split
from polyattn.train import CosineSchedule, build_config, build_optimizer, train


def parity(dataset: ImageDataset) -> ImageDataset:
    """The same images, labelled even (0) or odd (1): a new task for the run's features."""
    return ImageDataset(dataset.images, dataset.labels % 2, ["even", "odd"], dataset.source)


def main(run: str | None = None, steps: int = 40, base_steps: int = 40) -> float:
    if run is None:  # a small digits classifier to start from
        out = tempfile.mkdtemp()
        train(build_config("default", [f"train.steps={base_steps}", "train.epochs=2", "model.depth=2",
                                       "train.progress=false", f"train.out_dir={out}", "train.run_name=base"]))
        run = str(Path(out) / "base")
    model, config, _ = polyattn.load_run(run)  # and the tokenizer, None for image runs
    data = config.data
    train_set = parity(load_image_split(data.source, "train", image_size=data.image_size, progress=False))
    test_set = parity(load_image_split(data.source, "test", image_size=data.image_size, progress=False))
    model.reset_classifier(2)  # a new, freshly initialised head; the body keeps its trained weights
    model.train()
    transform = EvalTransform(data.mean, data.std)  # the run's normalisation (no augmentation here)
    optimizer = build_optimizer(model, lr=5e-4, weight_decay=0.05, betas=(0.9, 0.999))
    schedule = CosineSchedule(5e-4, 1e-5, warmup_steps=steps // 10, total_steps=steps)
    loader = BatchLoader(train_set, 64, shuffle=True, seed=0, drop_last=True)
    step = 0
    while step < steps:
        for images, labels in loader.epoch(step // len(loader)):
            for group in optimizer.param_groups:
                group["lr"] = schedule(step)
            loss = F.cross_entropy(model(transform(images)), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
            if step == steps:
                break
    model.eval()
    with torch.no_grad():
        accuracy = (model(transform(test_set.images)).argmax(-1) == test_set.labels).float().mean().item()
    print(f"fine-tuned {config.model.name} from {run} for {steps} steps: even/odd test accuracy {accuracy:.3f}")
    return accuracy


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", help="an image-classifier run directory (default: train a small one first)")
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    main(args.run, args.steps)
