"""The `polyattn` command line: parses arguments and calls the packages below. Thin by design."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .errors import Interrupted, UserError
from .registry import TASKS, parameter_count

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
    if args.name:
        names = [n for n in names if args.name.lower() in n.lower()]
    shape, recipe_args, recipe_model = {}, {}, None
    if args.recipe:
        shape, recipe_args, recipe_model = _recipe_shape(args.recipe)
        task = get_entry(recipe_model).task
        names = [n for n in names if get_entry(n).task == task]
        note = (f"parameter counts at the shape of recipe {args.recipe}: " + ", ".join(f"{k}={v}" for k, v in
                shape.items()) + f"; {recipe_model} also with the recipe's own model arguments")
    else:
        note = ("parameter counts at each model's default size and number of classes (224 px and 1,000 classes for "
                "most image models); --recipe R counts them at a recipe's shape.")
    if not names:
        raise UserError(f"No registered model matches '{args.name}'" + (f" for task {args.task}" if args.task else "")
                        + "; run `polyattn models` to list them all.")
    rows = []
    for name in names:
        entry = get_entry(name)
        params = entry.parameters()
        args = {**shape, **(recipe_args if name == recipe_model else {})}
        count = count_parameters(name, **{k: v for k, v in args.items() if k in params})
        rows.append((name, entry.task, f"{count / 1e6:.2f}M", entry.description))
    widths = [max(len(r[i]) for r in [*rows, ("model", "task", "params", "")]) for i in range(3)]
    print(f"{'model':<{widths[0]}}  {'task':<{widths[1]}}  {'params':>{widths[2]}}  description")
    for row in rows:
        print(f"{row[0]:<{widths[0]}}  {row[1]:<{widths[1]}}  {row[2]:>{widths[2]}}  {row[3]}")
    print(f"\n{len(rows)} models; {note}")
    return 0


def _recipe_shape(recipe: str) -> tuple[dict, dict, str]:
    """What a recipe fixes for every model of its task: the model arguments that follow from its data (number of
    classes, image size and channels, vocabulary; the data is loaded, from the cache after the first time) and
    its patch size; then the recipe's own model arguments (its depth, width, ...) and its model's name."""
    import torch

    from .tasks import build_job
    from .train.config import build_config

    config = build_config(recipe, [])
    job = build_job(config, device=torch.device("cpu"), splits=("train",))
    shape = dict(job.inferred_model_args)
    if "patch_size" in config.model.args:
        shape["patch_size"] = config.model.args["patch_size"]
    return shape, dict(config.model.args), config.model.name


def _cmd_config(args) -> int:
    from .train.config import build_config, config_keys, describe_config, find_recipe, format_value, keys_markdown

    if args.keys or args.markdown:
        if args.recipe or args.overrides:
            raise UserError("--keys lists every key with its default; leave out the recipe and overrides, or drop "
                            "--keys to see a recipe's resolved config.")
        if args.markdown:
            text = keys_markdown()
            if args.readme:
                from .bench.compare import fill_markdown_block

                fill_markdown_block(args.readme, "config-keys", text)
                print(f"wrote the table of {len(config_keys())} keys into {args.readme}")
                return 0
            print(text, end="")
            return 0
        keys = config_keys()
        width = max(len(k.key) for k in keys)
        type_width = max(len(k.type) for k in keys)
        for k in keys:
            print(f"{k.key:<{width}}  {k.type:<{type_width}}  {format_value(k.default):<12}  {k.help}")
        print(f"\n{len(keys)} keys, plus model=NAME and model.ARG for the model's constructor arguments "
              f"(`polyattn config RECIPE` lists them).")
        return 0
    recipe, overrides = args.recipe, list(args.overrides)
    if recipe is not None and "=" in recipe:
        recipe, overrides = None, [recipe, *overrides]
    config = build_config(recipe, overrides)
    origin = f"recipe {config.recipe} ({find_recipe(recipe or 'default')})"
    if overrides:
        origin += " with " + " ".join(overrides)
    print(describe_config(config, origin=origin), end="")
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
        overrides = ([args.recipe] if args.recipe else []) + args.overrides + _device_overrides(args)
        config = load_run_config(Path(args.resume))
        apply_overrides(config, overrides)
    else:
        recipe, overrides = args.recipe, list(args.overrides)
        if recipe is not None and "=" in recipe:  # `polyattn train key=value` with the default recipe
            recipe, overrides = None, [recipe, *overrides]
        config = build_config(recipe, overrides + _device_overrides(args))
    if args.nproc is not None:  # the config was checked here, so a bad key is one sentence, not one per process
        return _launch_torchrun(args.nproc, args.argv)
    train(config, resume_dir=Path(args.resume) if args.resume else None, force=args.force)
    return 0


def _launch_torchrun(nproc: int, argv: list[str]) -> int:
    """`polyattn train --nproc N ...`: the same command under `torchrun --standalone --nproc-per-node N` (one
    machine); its exit status is the run's."""
    import subprocess

    if nproc < 1:
        raise UserError(f"--nproc must be at least 1 process, got {nproc}.")
    rest = [a for i, a in enumerate(argv) if a != "--nproc" and not a.startswith("--nproc=")
            and (i == 0 or argv[i - 1] != "--nproc")]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "polyattn", *rest]
    return subprocess.call(command)


def _device_overrides(args) -> list[str]:
    """`train --device D` and `--precision P` as the overrides they stand for (they win over the recipe's)."""
    out = []
    if args.device is not None:
        out.append(f"train.device={args.device}")
    if args.precision is not None:
        out.append(f"train.precision={args.precision}")
    return out


def _cmd_eval(args) -> int:
    from .train.loop import evaluate_run

    evaluate_run(Path(args.run_dir), data_source=args.data, split=args.split, device_name=args.device,
                 precision=args.precision, ema=False if args.no_ema else None, overrides=args.overrides)
    return 0


def _cmd_generate(args) -> int:
    from .hardware import autocast_for, resolve_device
    from .registry import model_task
    from .tasks.causal_lm import stream_text
    from .train.loop import announce, inference_precision, load_run, load_run_config, run_header

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
    run = load_run(run_dir, ema=False if args.no_ema else None, device=device)
    model, tokenizer = run.model, run.tokenizer
    precision = inference_precision(args.precision, device, run.config)
    autocast = autocast_for(precision, device)
    n_params = parameter_count(model)
    if args.kv_cache == "int8" and args.no_cache:
        raise UserError("--kv-cache int8 stores the decoding cache; it has no effect with --no-cache, drop one.")
    cache_transform = None
    if args.kv_cache == "int8":
        import torch

        from .layers.kv_int8 import int8_kv_cache

        with torch.no_grad():  # one token: a model without a softmax KV cache is refused before any output
            int8_kv_cache(model.forward_cached(torch.zeros(1, 1, dtype=torch.long, device=device))[1])
        cache_transform = int8_kv_cache
    how = "recomputing every step" if args.no_cache else f"cached decoding ({args.kv_cache} KV cache)"
    announce(run_header("generating with", run.config, n_params, None, device, precision=precision,
                        weights=run.weights, extra=f"{how}, temperature {args.temperature:g}, top-k {args.top_k}"),
             precision)
    sys.stdout.write(args.prompt)
    sys.stdout.flush()
    with autocast():
        for piece in stream_text(model, tokenizer, args.prompt, args.max_new_tokens, temperature=args.temperature,
                                 top_k=args.top_k, top_p=args.top_p, use_cache=not args.no_cache, seed=args.seed,
                                 device=device, cache_transform=cache_transform):
            sys.stdout.write(piece)
            sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def _cmd_sample(args) -> int:
    from .hardware import autocast_for, resolve_device
    from .registry import model_task
    from .tasks.diffusion import sample_run
    from .train.loop import announce, inference_precision, load_run, load_run_config, load_run_model, run_header

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
    run = load_run(run_dir, ema=False if args.no_ema else None, device=device)
    model, config = run.model, run.config
    precision = inference_precision(args.precision, device, config)
    n_params = parameter_count(model)

    def say_what(out: Path) -> None:
        announce(run_header("sampling", config, n_params, None, device, precision=precision, weights=run.weights,
                            extra=f"into {out}"), precision)

    classifier = None
    if args.classifier is not None:
        classifier = (*load_run_model(Path(args.classifier), device=device), Path(args.classifier))
    result = sample_run(model, config.data, run_dir, out=Path(args.out) if args.out else None, classes=args.classes,
                        n=args.n, steps=args.steps, cfg=args.cfg, sampler=args.sampler, eta=args.eta, seed=args.seed,
                        batch_size=args.batch_size, weights=run.weights, device=device,
                        autocast=autocast_for(precision, device), classifier=classifier, announce=say_what)
    n = len(result["labels"])
    print(f"{n} images in {result['seconds']:.1f} s ({result['seconds'] / n:.3f} s per image, {args.steps} "
          f"{args.sampler} steps, cfg {args.cfg:g}); grid: {result['grid']}; images: {result['out'] / 'images'}")
    if classifier is not None:
        metrics = result["metrics"]
        print(f"classifier Fréchet distance {metrics['classifier_fd']:.4f} (real held-out images: "
              f"{metrics['real_classifier_fd']:.4f}); class accuracy {metrics['classifier_accuracy']:.4f} (real: "
              f"{metrics['real_classifier_accuracy']:.4f}); written to {result['quality']}")
    return 0


def _cmd_inspect(args) -> int:
    from .analysis import inspect_run

    inspect_run(Path(args.run_dir), n_images=args.n_images, rank_images=args.rank_images, split=args.split,
                out_dir=Path(args.out) if args.out else None, device_name=args.device,
                precision=args.precision, ema=False if args.no_ema else None)
    return 0


def _cmd_export(args) -> int:
    from .deploy.export import export_run

    path = export_run(Path(args.run_dir), args.format, decode_step=args.decode_step, out=args.out,
                      max_len=args.max_len)
    print(f"exported {path} (checked against the eager model; details in {path}.json)")
    return 0


def _cmd_quantize(args) -> int:
    from .deploy.quantize import quantize_run

    out = quantize_run(Path(args.run_dir), args.method, out=args.out)
    print(f"wrote {out}: a {args.method} run directory (eval, generate, sample, inspect and bench read it as any run)")
    return 0


def _cmd_prune(args) -> int:
    from .deploy.prune import prune_run

    pruned, *tuned = prune_run(Path(args.run_dir), args.heads, args.mlp, out=args.out,
                               finetune_steps=args.finetune_steps, finetune_overrides=args.overrides)
    print(f"wrote {pruned}: attention heads and MLP channels pruned ({args.heads:g}, {args.mlp:g} per layer)")
    for out in tuned:
        print(f"wrote {out}: the pruned model fine-tuned for {args.finetune_steps} steps with the run's recipe")
    return 0


def _add_deploy_commands(sub) -> None:
    """`polyattn export`, `polyattn quantize` and `polyattn prune` (polyattn.deploy)."""
    p = sub.add_parser("export", help="export a run to ONNX or a torch.export program, checked against PyTorch",
                       description="Export a run's model (classifier, LM, one DiT denoiser call) or, with "
                                   "--decode-step, a causal LM's single-token decoding step with its state as "
                                   "explicit inputs and outputs; the file is checked against the eager model.")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--format", default="onnx", choices=["onnx", "pt2"], help="onnx (onnxruntime) or pt2 "
                   "(torch.export ExportedProgram) (default: onnx)")
    p.add_argument("--decode-step", action="store_true", help="export the decoding step (LightNet recurrent "
                   "state, bounded softmax KV cache, Perceiver AR / LLP window) instead of the full forward")
    p.add_argument("--max-len", type=int, default=None, help="with --decode-step: slots of the bounded KV cache "
                   "(LLaMA-style) or LLP's window (default: the run's data.seq_len)")
    p.add_argument("--out", help="output folder (default: RUN_DIR/export)")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("quantize", help="quantize a run's linear layers into a new run directory",
                       description="Quantize a run's linear layers (int8 dynamic, int8 or int4 weight-only) and "
                                   "write a new self-describing run directory.")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--method", required=True, choices=["int8-dynamic", "int8-weight-only", "int4-weight-only"])
    p.add_argument("--out", help="the new run directory (default: RUN_DIR-METHOD beside the run)")
    p.set_defaults(func=_cmd_quantize)

    p = sub.add_parser("prune", help="remove the least important attention heads and MLP channels",
                       description="Structured pruning by weight magnitude (polyattn.deploy.prune): remove a share "
                                   "of the attention heads and MLP hidden channels of every layer, physically, "
                                   "into a new run directory.")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--heads", type=float, default=0.25, help="share of heads removed per layer (default: 0.25)")
    p.add_argument("--mlp", type=float, default=0.25, help="share of MLP channels removed per layer (default: 0.25)")
    p.add_argument("--out", help="the new run directory (default: RUN_DIR-pruned beside the run)")
    p.add_argument("--finetune-steps", type=int, default=0, metavar="N", help="then train the pruned model N steps "
                   "with the run's own recipe, into OUT-ftN beside it (default: 0, no fine-tune)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="changes to the fine-tune's recipe (task.*, "
                   "data.*, train.*), e.g. train.lr=1e-4")
    p.set_defaults(func=_cmd_prune)


def _cmd_hf(args) -> int:
    from .hardware import resolve_device
    from .hf.convert import convert_run  # polyattn.hf says which extra to install when transformers is missing

    out = convert_run(Path(args.run_dir), Path(args.out), ema=False if args.no_ema else None,
                      precision=args.precision, device=resolve_device(args.device))
    print(f"wrote {out}: a Hugging Face model folder (checked: reloaded, same logits); `import polyattn.hf`, then "
          f"transformers' Auto classes load it")
    return 0


def _cmd_bench(args) -> int:
    return args.bench_run(args)


RUN_PRECISION_HELP = ("auto (default): the precision the run trained in, or float32 where this device does not "
                      "compute that natively")


def _run_options(*, device_help: str = "", precision_help: str = RUN_PRECISION_HELP) -> argparse.ArgumentParser:
    """The parent parser of the commands that read a trained model (eval, generate, sample, inspect, hf): the run
    directory, where and in what precision it runs (a command may say what the two mean for it), and which of its
    weights."""
    from .hardware import PRECISIONS

    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--device", default="auto", help=f"auto, cpu, cuda or cuda:N (default: auto = cuda when "
                                                    f"available){device_help}")
    p.add_argument("--precision", default="auto", choices=PRECISIONS, help=precision_help)
    p.add_argument("--no-ema", action="store_true",
                   help="use the raw weights of a run that also kept averaged ones (train.ema_decay)")
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="polyattn", description="Efficient attention models: build, train, "
                                     "evaluate and benchmark.")
    from . import __version__
    from .hardware import PRECISIONS

    parser.add_argument("--version", action="version", version=f"polyattn {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    run_options = _run_options()

    p = sub.add_parser("models", help="list the registered models with their task and parameter count",
                       description="List the registered models with their task and parameter count.")
    p.add_argument("name", nargs="?", help="only models whose name contains this, e.g. lightnet or _tiny")
    p.add_argument("--task", choices=TASKS)
    p.add_argument("--recipe", metavar="RECIPE", help="count parameters at this recipe's shape (its data's classes, "
                   "image size, vocabulary and its model arguments), listing the models of its task")
    p.set_defaults(func=_cmd_models)

    p = sub.add_parser("config", help="print a recipe's resolved config with every key's type and help",
                       description="Print the config a training run of RECIPE (default: 'default') with these "
                                   "overrides would use, as YAML with every key commented with its type, its "
                                   "default where the recipe changed it, and its help; --keys lists every key.")
    p.add_argument("recipe", nargs="?", help="recipe name in configs/ or a path to a YAML file")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.lr=3e-4")
    p.add_argument("--keys", action="store_true", help="list every key with its type, default and help")
    p.add_argument("--markdown", action="store_true", help="with --keys: the list as a Markdown table")
    p.add_argument("--readme", type=Path, help="with --markdown: put the table between the <!-- table:config-keys "
                   "--> markers of this Markdown file")
    p.set_defaults(func=_cmd_config)

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
    p.add_argument("--nproc", type=int, default=None, metavar="N", help="train with N processes on this machine "
                   "(runs the same command under torchrun; gloo on CPUs, nccl on GPUs)")
    p.add_argument("--device", default=None, help="auto, cpu, cuda or cuda:N (default: the recipe's train.device, "
                   "auto = cuda when available)")
    p.add_argument("--precision", default=None, choices=PRECISIONS,
                   help="the recipe's train.precision, overridden (default: the recipe's, auto = bfloat16 where the "
                        "device computes it natively, else float32)")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("eval", help="evaluate a run directory", parents=[run_options],
                       description="Evaluate a run directory's final weights (or its latest checkpoint).")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="settings changed for this evaluation only, e.g. data.eval_stride=512 or an inference-time "
                        "model option such as model.s2_at_inference=true (the weights stay the run's)")
    p.add_argument("--data", help="evaluate on another data source of the same kind (folder or archive)")
    p.add_argument("--split", default="test", help="split to evaluate (default: test)")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("generate", help="generate text with a causal language model run", parents=[run_options],
                       description="Continue a prompt with a trained causal LM, streaming the text as it is "
                                   "generated (KV cache or recurrent state; --no-cache recomputes every step).")
    p.add_argument("--prompt", default="", help="text to continue (default: empty, start a new document)")
    p.add_argument("--max-new-tokens", type=int, default=200, help="tokens to generate (default: 200)")
    p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature; 0 = greedy (default: 0.8)")
    p.add_argument("--top-k", type=int, default=200, help="sample among the k most likely tokens (default: 200)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling threshold in (0, 1] (default: off)")
    p.add_argument("--seed", type=int, default=None, help="random seed for reproducible samples")
    p.add_argument("--no-cache", action="store_true", help="recompute the whole sequence at every step")
    p.add_argument("--kv-cache", default="float", choices=["float", "int8"], help="int8: store a softmax KV cache "
                   "in int8 with per-token, per-head scales (LLaMA-style runs; default: float)")
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser("sample", help="generate images with a diffusion run",
                       description="Sample class-conditional images from a diffusion run (its EMA weights when it "
                                   "has them) and write a PNG grid and the individual images; with --classifier, "
                                   "also measure them (see polyattn.tasks.sample_quality).",
                       parents=[run_options])
    p.add_argument("--classes", help="comma-separated class names or indices (default: all classes)")
    p.add_argument("--n", type=int, default=8, help="images per class (default: 8)")
    p.add_argument("--steps", type=int, default=50, help="sampler steps (default: 50)")
    p.add_argument("--cfg", type=float, default=1.0, help="classifier-free guidance scale; 1 = none (default: 1)")
    p.add_argument("--sampler", default="euler", choices=["euler", "heun", "ddim"], help="ODE sampler (default: "
                   "euler; heun: 2 model calls per step; ddim: with --eta > 0 adds noise)")
    p.add_argument("--eta", type=float, default=0.0, help="ddim only: 0 = deterministic, 1 = ancestral (default: 0)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--batch-size", type=int, default=64, help="images per model call (default: 64)")
    p.add_argument("--out", help="output directory, new or empty (default: RUN_DIR/samples/ named by every setting "
                   "that changes the images, e.g. euler-50steps-cfg2-seed0-0+7-n8-ema, numbered -2, -3 if taken)")
    p.add_argument("--classifier", metavar="CLS_RUN_DIR", help="an image-classifier run on the same dataset: write "
                   "quality.json with the classifier Fréchet distance and class accuracy of the samples and of "
                   "held-out real images")
    p.set_defaults(func=_cmd_sample)

    p = sub.add_parser("inspect", help="attention maps, attention-map ranks and calibration of a classifier run",
                       description="Write attention-map images of a few inputs, the attention-map rank per layer "
                                   "(iLLaMA paper: where the cumulative singular values reach 80%%), the ECE and a "
                                   "reliability diagram of an image-classifier run, with inspect.json holding "
                                   "every number.", parents=[run_options])
    p.add_argument("--n-images", type=int, default=4, help="inputs to draw attention maps for (default: 4)")
    p.add_argument("--rank-images", type=int, default=30,
                   help="inputs whose mean map gives the rank, as in the paper (default: 30)")
    p.add_argument("--split", default="test", help="split to use (default: test)")
    p.add_argument("--out", help="output directory (default: RUN_DIR/inspect)")
    p.set_defaults(func=_cmd_inspect)

    _add_deploy_commands(sub)

    p = sub.add_parser("hf", help="convert a language-model run into a Hugging Face model folder",
                       description="Write a causal or masked LM run as a transformers model folder (config.json, "
                                   "model.safetensors, the tokenizer), reloaded and checked before the command "
                                   "returns; `import polyattn.hf` registers the classes with the Auto classes "
                                   "(the hf extra: pip install 'polyattn[hf]').",
                       parents=[_run_options(device_help="; where the reloaded folder is checked",
                                             precision_help="dtype of the saved weights: auto (default) and fp32 = "
                                                            "float32, the run's own weights; bf16, fp16")])
    p.add_argument("out", metavar="OUT", help="the model folder to write (new or empty)")
    p.set_defaults(func=_cmd_hf)

    p = sub.add_parser("bench", help="run a benchmark suite", description="Benchmarks that print tables and write "
                       "plots and JSON. They measure; they never assert times.")
    bench = p.add_subparsers(dest="suite", metavar="SUITE")
    bench.required = True
    _add_bench_suites(bench)
    return parser


BENCH_SUITES = {"mixers": "time and peak memory of token mixers against sequence length and grid size",
                "training": "training-step throughput and model FLOPs utilisation of every model family",
                "peers": "polyattn's training step against x-transformers and perceiver-ar-pytorch at the same shapes",
                "dtypes": "the ops' internal dtype choices (bfloat16 or float32 products), measured both ways here",
                "decode": "per-token decoding latency against context length: KV cache, LightNet state, PerceiverAR",
                "compare": "train a comparison suite's models with one recipe and one time budget (or one step "
                           "count); rebuild its table",
                "reversible": "training memory against depth and step time, standard against reversible blocks",
                "adaptive": "early exit and Mixture-of-Depths: quality against blocks per input, with wall time"}


BENCH_COMMANDS = {"training": "train"}  # module → command where the command's name would shadow a package


def _add_bench_suites(bench) -> None:
    import importlib

    for module_name, help_text in BENCH_SUITES.items():
        module = importlib.import_module(f".bench.{module_name}", __package__)
        name = BENCH_COMMANDS.get(module_name, module_name)
        p = bench.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(p)
        p.set_defaults(func=_cmd_bench, bench_run=module.run)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # `train RECIPE --device cpu key=value`: argparse stops collecting positionals at the first option, so the
    # key=value items after one come back here; they are overrides, anything else is an error.
    unknown = [a for a in extra if a.startswith("-") or "=" not in a or not hasattr(args, "overrides")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return args.func(args)
    except Interrupted as err:
        print(str(err), file=sys.stderr)
        return err.exit_code
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `polyattn config --keys | head`: the reader left; say nothing more
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115  (stays open until exit, so the final flush is quiet)
        return 0
    except OSError as err:
        from .files import WRITE_ERRNOS, write_error

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
