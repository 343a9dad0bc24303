"""Sample quality of a finished diffusion run, for `polyattn bench compare`: samples of every class, their
classifier Fréchet distance and class accuracy (polyattn.tasks.sample_quality) in the features of a classifier
run on the same data, beside the same measures on held-out real images, and the sampling time per image."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..tasks.diffusion import read_class_names, sample_to_dir
from ..tasks.sample_quality import measure_samples


def classifier_run(results_runs: Path, recipe: str, overrides: list[str]) -> Path:
    """The classifier run that measures the samples: trained once (under `results_runs/_classifier`) and reused
    while the recipe and overrides it was trained with are the ones asked for (`_classifier.json` beside it
    records them; a run trained with others, or before they were recorded, is trained again). A file lock lets
    rows measured side by side share it."""
    import fcntl
    import json
    import shutil

    from ..files import atomic_write_text
    from ..train.config import build_config
    from ..train.loop import train

    run_dir = results_runs / "_classifier"
    spec = {"recipe": recipe, "overrides": list(overrides)}
    record = results_runs / "_classifier.json"
    results_runs.mkdir(parents=True, exist_ok=True)
    with open(results_runs / "_classifier.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        trained = (run_dir / "summary.json").is_file() and record.is_file() and json.loads(record.read_text()) == spec
        if not trained:
            if run_dir.exists():
                shutil.rmtree(run_dir)  # an interrupted attempt, or a classifier of other settings
            record.unlink(missing_ok=True)
            train(build_config(recipe, [*overrides, f"train.out_dir={results_runs}", "train.run_name=_classifier",
                                        "train.progress=false"]))
            atomic_write_text(record, json.dumps(spec) + "\n")
    return run_dir


def quality_measures(run_dir: Path, *, classifier: dict[str, Any], n: int, steps: int, cfg: float,
                     sampler: str = "euler", seed: int = 0) -> dict[str, Any]:
    from ..train.loop import load_run_model

    classifier_dir = classifier_run(Path(run_dir).parent, classifier["recipe"], list(classifier.get("overrides", [])))
    model, config = load_run_model(run_dir)
    out = Path(run_dir) / "samples" / f"{sampler}-{steps}steps-cfg{cfg:g}-seed{seed}"
    result = sample_to_dir(model, config.data, read_class_names(run_dir, model.num_classes), out, classes=None, n=n,
                           steps=steps, cfg=cfg, sampler=sampler, seed=seed, progress=False)
    cls_model, cls_config = load_run_model(classifier_dir)
    metrics = measure_samples(result["images"], result["labels"], classifier=cls_model, classifier_config=cls_config,
                              data_config=config.data, device=torch.device("cpu"))
    sampling = {"sampler": sampler, "steps": steps, "cfg": cfg, "n_per_class": n, "grid": str(result["grid"]),
                "seconds_per_image": result["seconds"] / len(result["labels"]), "threads": torch.get_num_threads()}
    encode = getattr(model, "encode_condition", None)
    if encode is not None and encode(torch.tensor(result["labels"][:1])) is not None:  # something to reuse
        sampling["condition_reuse"] = condition_reuse_seconds(model, result["labels"], steps=steps, cfg=cfg,
                                                              sampler=sampler)
    return {"sampling": sampling, "quality": metrics, "classifier_run": str(classifier_dir)}


def condition_reuse_seconds(model: torch.nn.Module, labels: list[int], *, steps: int, cfg: float, sampler: str,
                            batch: int = 64, repeats: int = 3) -> dict[str, float]:
    """What reusing a model's step-independent conditioning (`encode_condition`: DiT's cross-attention class token
    keys/values) saves in sampling: seconds per image for one batch of `labels`, with the conditioning computed
    once per batch (as `sample` does) and recomputed in every step and guidance branch (the model called as
    `model(x, t, y)`), each the median of `repeats` runs taken in turn so that both see the same machine."""
    import statistics
    import time

    from ..tasks.diffusion import sample

    y = torch.tensor(labels[:batch])
    recompute = lambda x, t, y: model(x, t, y)  # no `encode_condition`: `sample` conditions every call afresh
    times: dict[str, list[float]] = {"reused": [], "recomputed": []}
    for _ in range(repeats):
        for name, net in (("reused", model), ("recomputed", recompute)):
            start = time.perf_counter()
            sample(net, y, shape=(model.in_chans, *model.img_size), null_label=model.num_classes, steps=steps,
                   cfg=cfg, sampler=sampler, generator=torch.Generator().manual_seed(0), batch_size=batch,
                   progress=False)
            times[name].append((time.perf_counter() - start) / len(y))
    reused, recomputed = (statistics.median(times[k]) for k in ("reused", "recomputed"))
    return {"reused_seconds_per_image": reused, "recomputed_seconds_per_image": recomputed,
            "saving": 1 - reused / recomputed, "images": len(y), "repeats": repeats}
