"""The `polyattn` command line: parses arguments and calls the packages below. Thin by design."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .errors import Interrupted, UserError

EPILOG_TRAIN = """\
examples:
  polyattn train                                   default recipe: a ViT on the embedded digits, minutes on a CPU
  polyattn train vit_tiny_cifar10 data.source=../shared/data/cifar10-jpg.tar.gz
  polyattn train default train.epochs=3 model.depth=4 train.lr=2e-3
  polyattn train --resume runs/default-vit_nano-20261122-101500

Overrides are section.key=value with sections model, task, data and train (model=NAME picks the model;
model.ARG sets a constructor argument). Values are read as YAML and type-checked.
"""


def _cmd_models(args) -> int:
    from .registry import count_parameters, get_entry, list_models

    names = list_models(args.task)
    rows = []
    for name in names:
        entry = get_entry(name)
        rows.append((name, entry.task, f"{count_parameters(name) / 1e6:.2f}M", entry.description))
    widths = [max(len(r[i]) for r in [*rows, ("model", "task", "params", "")]) for i in range(3)]
    print(f"{'model':<{widths[0]}}  {'task':<{widths[1]}}  {'params':>{widths[2]}}  description")
    for row in rows:
        print(f"{row[0]:<{widths[0]}}  {row[1]:<{widths[1]}}  {row[2]:>{widths[2]}}  {row[3]}")
    print(f"\n{len(rows)} models; parameter counts at each model's default size and number of classes.")
    return 0


def _cmd_train(args) -> int:
    from .train.config import apply_overrides, build_config, list_recipes
    from .train.loop import load_run_config, train

    if args.list_recipes:
        print("\n".join(list_recipes()))
        return 0
    if args.resume:
        recipe_like = [a for a in ([args.recipe] if args.recipe else []) if "=" not in a]
        if recipe_like:
            raise UserError("A resumed run keeps its own recipe; pass only key=value overrides with --resume.")
        overrides = ([args.recipe] if args.recipe else []) + args.overrides
        config = load_run_config(Path(args.resume))
        apply_overrides(config, overrides)
        train(config, resume_dir=Path(args.resume), force=args.force)
        return 0
    recipe, overrides = args.recipe, list(args.overrides)
    if recipe is not None and "=" in recipe:  # `polyattn train key=value` with the default recipe
        recipe, overrides = None, [recipe, *overrides]
    train(build_config(recipe, overrides))
    return 0


def _cmd_eval(args) -> int:
    from .train.loop import evaluate_run

    evaluate_run(Path(args.run_dir), data_source=args.data, split=args.split, device_name=args.device,
                 ema=False if args.no_ema else None, overrides=args.overrides)
    return 0


def _cmd_generate(args) -> int:
    from .data.tokenizers import load_run_tokenizer
    from .registry import model_task
    from .tasks.causal_lm import stream_text
    from .train.loop import load_run_config, load_run_model, resolve_device

    if args.max_new_tokens < 0:
        raise UserError(f"--max-new-tokens must be 0 or more, got {args.max_new_tokens}.")
    if args.temperature < 0:
        raise UserError(f"--temperature must be 0 (greedy) or more, got {args.temperature}.")
    if args.top_k is not None and args.top_k < 1:
        raise UserError(f"--top-k must be a positive number of tokens, got {args.top_k}.")
    if args.top_p is not None and not 0.0 < args.top_p <= 1.0:
        raise UserError(f"--top-p must be in (0, 1], got {args.top_p}.")
    run_dir = Path(args.run_dir)
    config = load_run_config(run_dir)
    task = model_task(config.model.name)
    if task != "causal_lm":
        raise UserError(f"{run_dir} holds a {task} model ('{config.model.name}'); `polyattn generate` needs a causal "
                        f"language model run.")
    device = resolve_device(args.device)
    tokenizer = load_run_tokenizer(run_dir, config.data.tokenizer)
    model, _ = load_run_model(run_dir, device=device)
    sys.stdout.write(args.prompt)
    sys.stdout.flush()
    for piece in stream_text(model, tokenizer, args.prompt, args.max_new_tokens, temperature=args.temperature,
                             top_k=args.top_k, top_p=args.top_p, use_cache=not args.no_cache, seed=args.seed,
                             device=device):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def _cmd_sample(args) -> int:
    import json

    from .registry import model_task
    from .tasks.diffusion import read_class_names, sample_to_dir
    from .train.checkpoint import atomic_write_text
    from .train.loop import load_run_config, load_run_model, resolve_device

    run_dir = Path(args.run_dir)
    config = load_run_config(run_dir)
    if model_task(config.model.name) != "diffusion":
        raise UserError(f"{run_dir} holds a {model_task(config.model.name)} model ('{config.model.name}'); "
                        f"`polyattn sample` needs a diffusion run (a dit_* model).")
    if args.classifier is not None:
        classifier_config = load_run_config(Path(args.classifier))
        if model_task(classifier_config.model.name) != "classification":
            raise UserError(f"--classifier {args.classifier} holds a {model_task(classifier_config.model.name)} "
                            f"model; it must be an image-classifier run trained on the same dataset.")
    device = resolve_device(args.device)
    model, config = load_run_model(run_dir, ema=False if args.no_ema else None, device=device)
    name = f"{args.sampler}-{args.steps}steps-cfg{args.cfg:g}-seed{args.seed}"
    out = Path(args.out) if args.out else run_dir / "samples" / name
    result = sample_to_dir(model, config.data, read_class_names(run_dir, model.num_classes), out,
                           classes=args.classes, n=args.n, steps=args.steps, cfg=args.cfg, sampler=args.sampler,
                           eta=args.eta, seed=args.seed, batch_size=args.batch_size, device=device)
    n = len(result["labels"])
    print(f"{n} images in {result['seconds']:.1f} s ({result['seconds'] / n:.3f} s per image, {args.steps} "
          f"{args.sampler} steps, cfg {args.cfg:g}); grid: {result['grid']}; images: {out / 'images'}")
    if args.classifier is not None:
        from .tasks.sample_quality import measure_samples

        classifier, classifier_config = load_run_model(Path(args.classifier), device=device)
        metrics = measure_samples(result["images"], result["labels"], classifier=classifier,
                                  classifier_config=classifier_config, data_config=config.data, device=device)
        metrics = {"run": str(run_dir), "classifier_run": str(args.classifier), "steps": args.steps,
                   "sampler": args.sampler, "cfg": args.cfg, "seed": args.seed, **metrics}
        atomic_write_text(out / "quality.json", json.dumps(metrics, indent=2) + "\n")
        print(f"classifier Fréchet distance {metrics['classifier_fd']:.4f} (real held-out images: "
              f"{metrics['real_classifier_fd']:.4f}); class accuracy {metrics['classifier_accuracy']:.4f} (real: "
              f"{metrics['real_classifier_accuracy']:.4f}); written to {out / 'quality.json'}")
    return 0


def _cmd_inspect(args) -> int:
    from .analysis import inspect_run

    inspect_run(Path(args.run_dir), n_images=args.n_images, rank_images=args.rank_images, split=args.split,
                out_dir=Path(args.out) if args.out else None, device_name=args.device,
                ema=False if args.no_ema else None)
    return 0


def _cmd_bench(args) -> int:
    return args.bench_run(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="polyattn", description="Efficient attention models: build, train, "
                                     "evaluate and benchmark.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("models", help="list the registered models with their task and parameter count",
                       description="List the registered models with their task and parameter count.")
    p.add_argument("--task", choices=["classification", "causal_lm", "masked_lm", "diffusion"])
    p.set_defaults(func=_cmd_models)

    p = sub.add_parser("train", help="train a model from a recipe, or resume a run",
                       description="Train a model from a recipe in configs/ (default: 'default'), with key=value "
                                   "overrides, or resume an interrupted run.",
                       epilog=EPILOG_TRAIN, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe", nargs="?", help="recipe name in configs/ or a path to a YAML file")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.lr=3e-4")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run exactly where it stopped")
    p.add_argument("--force", action="store_true", help="with --resume: accept changed settings that make the "
                   "run differ from an uninterrupted one (batch size, seed, learning rate, data)")
    p.add_argument("--list-recipes", action="store_true", help="print the available recipes and exit")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("eval", help="evaluate a run directory",
                       description="Evaluate a run directory's final weights (or its latest checkpoint).")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="settings changed for this evaluation only, e.g. data.eval_stride=512 or an inference-time "
                        "model option such as model.s2_at_inference=true (the weights stay the run's)")
    p.add_argument("--data", help="evaluate on another data source of the same kind (folder or archive)")
    p.add_argument("--split", default="test", help="split to evaluate (default: test)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    p.add_argument("--no-ema", action="store_true",
                   help="evaluate the raw weights of a run that kept averaged ones (train.ema_decay)")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("generate", help="generate text with a causal language model run",
                       description="Continue a prompt with a trained causal LM, streaming the text as it is "
                                   "generated (KV cache or recurrent state; --no-cache recomputes every step).")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--prompt", default="", help="text to continue (default: empty, start a new document)")
    p.add_argument("--max-new-tokens", type=int, default=200, help="tokens to generate (default: 200)")
    p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature; 0 = greedy (default: 0.8)")
    p.add_argument("--top-k", type=int, default=200, help="sample among the k most likely tokens (default: 200)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling threshold in (0, 1] (default: off)")
    p.add_argument("--seed", type=int, default=None, help="random seed for reproducible samples")
    p.add_argument("--no-cache", action="store_true", help="recompute the whole sequence at every step")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser("sample", help="generate images with a diffusion run",
                       description="Sample class-conditional images from a diffusion run (its EMA weights when it "
                                   "has them) and write a PNG grid and the individual images; with --classifier, "
                                   "also measure them (see polyattn.tasks.sample_quality).")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--classes", help="comma-separated class names or indices (default: all classes)")
    p.add_argument("--n", type=int, default=8, help="images per class (default: 8)")
    p.add_argument("--steps", type=int, default=50, help="sampler steps (default: 50)")
    p.add_argument("--cfg", type=float, default=1.0, help="classifier-free guidance scale; 1 = none (default: 1)")
    p.add_argument("--sampler", default="euler", choices=["euler", "heun", "ddim"], help="ODE sampler (default: "
                   "euler; heun: 2 model calls per step; ddim: with --eta > 0 adds noise)")
    p.add_argument("--eta", type=float, default=0.0, help="ddim only: 0 = deterministic, 1 = ancestral (default: 0)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--batch-size", type=int, default=64, help="images per model call (default: 64)")
    p.add_argument("--out", help="output directory (default: RUN_DIR/samples/<sampler>-<steps>steps-cfg<W>-seed<S>)")
    p.add_argument("--classifier", metavar="CLS_RUN_DIR", help="an image-classifier run on the same dataset: write "
                   "quality.json with the classifier Fréchet distance and class accuracy of the samples and of "
                   "held-out real images")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights even if the run has EMA weights")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    p.set_defaults(func=_cmd_sample)

    p = sub.add_parser("inspect", help="attention maps, attention-map ranks and calibration of a classifier run",
                       description="Write attention-map images of a few inputs, the attention-map rank per layer "
                                   "(iLLaMA paper: where the cumulative singular values reach 80%%), the ECE and a "
                                   "reliability diagram of an image-classifier run, with inspect.json holding "
                                   "every number.")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--n-images", type=int, default=4, help="inputs to draw attention maps for (default: 4)")
    p.add_argument("--rank-images", type=int, default=30,
                   help="inputs whose mean map gives the rank, as in the paper (default: 30)")
    p.add_argument("--split", default="test", help="split to use (default: test)")
    p.add_argument("--out", help="output directory (default: RUN_DIR/inspect)")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights even if the run has EMA weights")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    p.set_defaults(func=_cmd_inspect)

    p = sub.add_parser("bench", help="run a benchmark suite", description="Benchmarks that print tables and write "
                       "plots and JSON. They measure; they never assert times.")
    bench = p.add_subparsers(dest="suite", metavar="SUITE")
    bench.required = True
    _add_bench_suites(bench)
    return parser


BENCH_SUITES = {"mixers": "time and peak memory of token mixers against sequence length and grid size",
                "compare": "train a comparison suite's models with one recipe and one time budget; rebuild its table"}


def _add_bench_suites(bench) -> None:
    import importlib

    for name, help_text in BENCH_SUITES.items():
        module = importlib.import_module(f".bench.{name}", __package__)
        p = bench.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(p)
        p.set_defaults(func=_cmd_bench, bench_run=module.run)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except Interrupted as err:
        print(str(err), file=sys.stderr)
        return err.exit_code
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        from .train.checkpoint import WRITE_ERRNOS, write_error

        if err.errno not in WRITE_ERRNOS:
            raise
        # a write that no module turned into a sentence (a third-party writer): still one sentence with the path
        print(f"error: {write_error(err.filename or 'a file', err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted; a training run can be continued with `polyattn train --resume RUN_DIR`.",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
