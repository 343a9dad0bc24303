"""Every command the README shows is run here, so no README example can fail again.

The commands are read from the README itself: lines of its shell code blocks and inline code spans that start
with `polyattn`, `make` or `.venv/bin/`. Each must have an entry in `HOW` (a new README command without one fails
`test_every_readme_command_is_mapped`), which says how it runs in seconds:

- `Train(extra)`: the README's own arguments, then overrides that make it tiny (one optimizer step, a few
  images or tokens, a tiny image folder or archive instead of CIFAR-10, the embedded text excerpt instead of
  ../shared/data), then `extra`;
- `Run(...)`: the README's command with its placeholders (`runs/<run>`) replaced by tiny runs made here, and
  settings shrunk where a command is heavy (`--steps 50` → 1);
- `Error(message)`: the README shows this command failing; it must fail with that message;
- `Help()`: a synopsis line (`polyattn eval RUN_DIR [--data SOURCE]`): its `--help` must work;
- `Covered(test)`: too heavy to run twice, and run in its tiny form by that test;
- `Skip(reason)`: not runnable from a test (`make test` is this suite itself).
"""

from __future__ import annotations

import re
import shlex
import shutil
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from polyattn.cli import main

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def readme_commands(text: str) -> list[str]:
    """The commands of the README, normalised (no `$ ` prompt, no trailing `# comment`), in order, once each."""
    found: list[str] = []
    in_block, language = False, ""
    for line in text.splitlines():
        if line.startswith("```"):
            in_block, language = not in_block, line[3:].strip()
            continue
        if in_block and language in ("", "bash", "sh", "console"):
            found.append(line)
    found += re.findall(r"`((?:polyattn|make|\.venv/bin/)[^`]*)`", text)
    out = []
    for command in found:
        command = re.sub(r"^\$ ", "", command.strip())
        if not re.match(r"(polyattn|make|\.venv/bin/)( |$)|\.venv/bin/\S", command):
            continue
        command = re.split(r"\s{2,}| # ", command)[0]  # a comment, or the synopsis block's description
        command = " ".join(command.split())
        if command not in out:
            out.append(command)
    return out


@dataclass
class Train:
    extra: list[str] = field(default_factory=list)


@dataclass
class Run:
    extra: str = ""
    """Arguments appended to the README's command."""
    run: str | None = None
    """The tiny run that `runs/<run>` stands for: cls, lm or dit."""
    replace: dict[str, str] = field(default_factory=dict)
    """Parts of the command replaced to shrink it (`--steps 50` → `--steps 1`) or to fill a placeholder. In every
    argument, {cls}, {lm}, {dit}, {s2}, {tmp}, {folder}, {archive} and {results} are then filled in."""
    first: tuple[str, list[str]] | None = None
    """A training command (and its extra overrides) run before it, into the folder of the tiny runs."""


@dataclass
class Error:
    message: str


@dataclass
class Help:
    pass


@dataclass
class Covered:
    test: str


@dataclass
class Skip:
    reason: str


SYNOPSIS = Help()
ADAPTIVE_BENCH = ("polyattn bench adaptive --vision runs/vit_early_exit --lm runs/lm_mod_0.125 runs/lm_mod_0.5 "
                  "runs/lm_plain --images 5000 --tokens 32768 --repeats 2 --threads 1")
HOW: dict[str, Train | Run | Error | Help | Covered | Skip] = {
    # Quickstart and Development
    "make train": Run(replace={"make train": "polyattn train"}),  # after the setup, make train is polyattn train
    "make test": Skip("the test suite itself, with ruff"),
    "make docs": Covered("tests/test_docs.py::test_api_reference_builds_strictly"),
    'make train ARGS="recipe key=value ..."': SYNOPSIS,
    ".venv/bin/python -m pytest tests/test_ops_lightnet.py -q": Skip("a file of this test suite, run by it"),
    ".venv/bin/polyattn bench mixers --quick":
        Covered("tests/test_bench_mixers.py::test_quick_run_writes_json_and_png"),
    # the synopsis of the command line
    "polyattn models [NAME] [--recipe R]": SYNOPSIS,
    "polyattn config [RECIPE] [key=value ...]": SYNOPSIS,
    "polyattn config --keys": Run(),
    "polyattn train [RECIPE] [key=value ...]": SYNOPSIS,
    "polyattn train --nproc N RECIPE ...": Covered(
        "tests/test_distributed.py::test_one_and_two_processes_give_the_same_run"),
    "polyattn train --nproc 2 --resume RUN_DIR": Covered(
        "tests/test_distributed.py::test_a_killed_process_stops_the_others_and_checkpoints_resume_across_world_sizes"),
    "polyattn train --nproc 2 default": Covered(
        "tests/test_distributed.py::test_one_and_two_processes_give_the_same_run"),
    "polyattn train --nproc 2 default train.fsdp=true": Covered(
        "tests/test_distributed.py::"
        "test_fsdp_gives_the_same_run_and_its_checkpoints_reshard_to_any_number_of_processes"),
    "polyattn train --nproc 2 --resume runs/<run>": Covered(
        "tests/test_distributed.py::test_a_killed_process_stops_the_others_and_checkpoints_resume_across_world_sizes"),
    "polyattn train --resume RUN_DIR": Covered("tests/test_train.py::test_kill_9_and_resume_reaches_the_same_metrics"),
    "polyattn eval RUN_DIR [--data SOURCE]": SYNOPSIS,
    "polyattn generate RUN_DIR --prompt TEXT": SYNOPSIS,
    "polyattn inspect RUN_DIR [--n-images N]": SYNOPSIS,
    "polyattn sample RUN_DIR [--classes C --n N]": SYNOPSIS,
    "polyattn bench train [--model NAME ...]": SYNOPSIS,
    "polyattn bench peers [--pairs P ...]": SYNOPSIS,
    "polyattn bench decode [--contexts N ...]": SYNOPSIS,
    "polyattn bench mixers [--quick] [--out DIR]": SYNOPSIS,
    "polyattn bench dtypes": Covered("tests/test_bench_perf.py::test_bench_dtypes_takes_each_internal_choice_both_"
                                     "ways"),
    "polyattn bench compare SUITE [--table]": SYNOPSIS,
    "polyattn bench reversible [--depths N ...]": SYNOPSIS,
    "polyattn bench adaptive [--vision RUN ...]": SYNOPSIS,
    "polyattn export RUN_DIR --format onnx|pt2": SYNOPSIS,
    "polyattn quantize RUN_DIR --method METHOD": SYNOPSIS,
    "polyattn hf RUN_DIR OUT": SYNOPSIS,
    "polyattn prune runs/lm --heads 0.25 --mlp 0.25":
        Covered("tests/test_deploy_prune.py::test_pruned_run_directory_loads_with_its_new_shapes"),
    "polyattn prune runs/lm --heads 0.25 --mlp 0.25 --finetune-steps 200":
        Covered("tests/test_deploy_prune.py::test_pruned_lightnet_fine_tunes_with_its_recipe_and_runs_everywhere"),
    "polyattn prune RUN_DIR --heads H --mlp M [--finetune-steps N]": SYNOPSIS,
    "polyattn prune runs/lm --finetune-steps 200 train.lr=1e-4":
        Covered("tests/test_deploy_prune.py::test_pruned_lightnet_fine_tunes_with_its_recipe_and_runs_everywhere"),
    # Deploy
    "polyattn export runs/lm --format onnx": Covered("tests/test_deploy_export.py::test_onnx_forward_matches_eager"),
    "polyattn export runs/lm --format pt2":
        Covered("tests/test_deploy_export.py::test_export_command_writes_a_checked_graph"),
    "polyattn export runs/lm --decode-step --max-len 512":
        Covered("tests/test_deploy_export.py::test_export_command_writes_a_checked_graph"),
    "polyattn quantize runs/lm --method int8-dynamic":
        Covered("tests/test_deploy_quantize.py::test_quantized_run_directory_loads_and_runs"),
    "polyattn eval runs/lm-int8-dynamic":
        Covered("tests/test_deploy_quantize.py::test_quantized_run_directory_loads_and_runs"),
    'polyattn generate runs/lm --prompt "ROMEO:" --kv-cache int8':
        Run("--max-new-tokens 4", replace={"runs/lm": "{lm}"}),
    "polyattn hf runs/lm runs/lm-hf": Run(replace={"runs/lm-hf": "{tmp}/lm-hf", "runs/lm": "{lm}"}),
    "polyattn train default train.lrr=1e-3": Error("Unknown key 'train.lrr' in the command line. Did you mean "
                                                   "'train.lr'?"),
    # images
    "polyattn train vit_tiny_cifar10 data.source=../shared/data/cifar10-jpg.tar.gz": Train(),
    "polyattn train vit_tiny_cifar10 model.reversible=true": Train(),
    "polyattn train vit_tiny_cifar10 data.source=/path/to/folder model=vit_small data.image_size=64": Train(),
    "polyattn train vit_tiny_cifar10 data.source=../shared/data/cifar10-jpg.tar.gz train.epochs=5 "
    "train.warmup_epochs=0.5": Train(),
    "polyattn train illama_cifar10_moonshot": Train(["train.compile=false"]),
    "polyattn train illama_cifar10_moonshot model.stem=patch train.time_budget_s=2374": Train(["train.compile=false"]),
    "polyattn eval runs/<run> task.eval_flip=true": Covered("tests/test_train.py::test_run_directory_describes_"
                                                            "itself"),
    # language models
    "polyattn train llama_lm_shakespeare": Train(),
    "polyattn train lightnet_lm_shakespeare data.source=shakespeare": Train(),
    'polyattn generate runs/<run> --prompt "ROMEO:" --max-new-tokens 200 --temperature 0.8':
        Run(run="lm", replace={"--max-new-tokens 200": "--max-new-tokens 8"}),
    "polyattn eval runs/<run> data.eval_stride=128": Run("data.eval_tokens=512", run="lm"),
    "polyattn train perceiver_ar_shakespeare": Train(),
    "polyattn train perceiver_double_shakespeare": Train(),
    "polyattn train llp_shakespeare model.faithful=true": Train(),
    "polyattn train s2attn_lm_shakespeare": Train(),
    "polyattn train bert_shakespeare": Train(),
    "polyattn eval runs/compare/lm/s2attn model.s2_at_inference=true":
        Run("data.eval_tokens=512", replace={"runs/compare/lm/s2attn": "{s2}"},
            first=("polyattn train s2attn_lm_shakespeare", ["train.run_name=s2"])),
    # image generation
    "polyattn train dit_digits": Train(),
    "polyattn train dit_cifar10": Train(),
    "polyattn train dit_lightnet_cifar10": Train(),
    "polyattn sample runs/<run> --classes 0,7 --n 8 --steps 50 --cfg 2 [--sampler euler|heun|ddim] [--seed S] "
    "[--out DIR]": Run(run="dit", replace={"--n 8": "--n 2", "--steps 50": "--steps 1", "[--sampler euler|heun|ddim] "
                                              "[--seed S] [--out DIR]": "--sampler heun --seed 1 --out {tmp}/s"}),
    "polyattn sample runs/<run> --n 100 --steps 50 --cfg 2 --classifier runs/<classifier run on the same data>":
        Run(run="dit", replace={"--n 100": "--n 2", "--steps 50": "--steps 1",
                                "runs/<classifier run on the same data>": "{cls}"}),
    # inline
    "polyattn train": Train(),
    "polyattn eval": Run("{cls}"),
    "polyattn inspect": Run("{cls} --n-images 1 --rank-images 2"),
    "polyattn inspect RUN_DIR": Run("--n-images 1 --rank-images 2 --out {tmp}/inspect", replace={"RUN_DIR": "{cls}"}),
    "polyattn sample": Run("{dit} --n 1 --steps 1"),
    "polyattn config RECIPE key=value ...": SYNOPSIS,
    "polyattn config --keys --markdown": Run(),
    "polyattn --version": Run(),
    "polyattn bench mixers": Covered("tests/test_bench_mixers.py::test_quick_run_writes_json_and_png"),
    "polyattn bench mixers --sides 16 32 64 128 --repeats 3 --time-cap 3":
        Covered("tests/test_bench_mixers.py::test_quick_run_writes_json_and_png"),
    "polyattn bench train": Covered("tests/test_bench_perf.py::test_bench_train_writes_table_json_and_plot"),
    "polyattn bench train --precisions native": Covered("tests/test_bench_perf.py::test_bench_train_writes_table_"
                                                        "json_and_plot"),
    "polyattn bench peers --precisions native": Covered("tests/test_bench_perf.py::test_bench_peers_times_both_"
                                                        "sides_of_a_pair"),
    "polyattn bench peers --precisions native --breakdown": Covered("tests/test_bench_perf.py::test_bench_peers_"
                                                                    "times_both_sides_of_a_pair"),
    "polyattn bench peers": Covered("tests/test_bench_perf.py::test_bench_peers_times_both_sides_of_a_pair"),
    "polyattn bench decode": Covered("tests/test_bench_perf.py::test_bench_decode_reports_latency_against_context"),
    "polyattn bench decode --models perceiver_ar perceiver_ar_recomputed --contexts 256 1024 4096 --batches 1":
        Covered("tests/test_bench_perf.py::test_bench_decode_times_perceiver_ar_with_and_without_its_cache"),
    "polyattn bench reversible --depths 4 8 16 --batch 8 --repeats 2 --threads 1":
        Covered("tests/test_bench_perf.py::test_bench_reversible_memory_is_flat_in_depth"),
    "polyattn train vit_reversible_cifar10": Train(),
    # adaptive computation
    "polyattn train vit_early_exit_cifar10": Train(),
    "polyattn eval runs/vit_early_exit model.exit_threshold=0.9":
        Run(replace={"runs/vit_early_exit": "{ee}"},
            first=("polyattn train vit_early_exit_cifar10", ["train.run_name=ee"])),
    "polyattn train llama_mod_shakespeare": Train(),
    "polyattn train llama_mod_shakespeare model.mod_capacity=0.5": Train(),
    ADAPTIVE_BENCH: Covered("tests/test_bench_adaptive.py::test_bench_adaptive_measures_both_curves"),
    "make gpu-check": Skip("needs a CUDA device; scripts/gpu_check.sh refuses without one"),
    "polyattn bench compare": SYNOPSIS,
    "polyattn bench compare SUITE": SYNOPSIS,
    "polyattn bench compare vision": Covered("tests/test_compare.py::test_rows_train_for_their_calibrated_budget_and_"
                                             "the_table_reads_the_saved_results"),
    "polyattn bench compare lm": Covered("tests/test_compare.py::test_rows_train_for_their_calibrated_budget_and_"
                                         "the_table_reads_the_saved_results"),
    "polyattn bench compare vision_mixers": Covered("tests/test_compare.py::test_rows_train_for_their_calibrated_"
                                                   "budget_and_the_table_reads_the_saved_results"),
    "polyattn bench compare lm_mixers": Covered("tests/test_compare.py::test_rows_train_for_their_calibrated_"
                                               "budget_and_the_table_reads_the_saved_results"),
    "polyattn bench compare vision_stem": Covered("tests/test_compare.py::test_lookup_and_suite_files"),
    "polyattn bench compare vision_ablations": Covered("tests/test_compare.py::test_lookup_and_suite_files"),
    "polyattn bench compare diffusion_cifar10": Covered("tests/test_compare.py::test_lookup_and_suite_files"),
    "polyattn bench compare diffusion": Covered("tests/test_compare.py::test_rows_train_for_their_calibrated_budget_"
                                                "and_the_table_reads_the_saved_results"),
    "polyattn bench compare vision --table": Run("--results {results}"),
    "polyattn bench compare lm_long": Covered("tests/test_compare.py::test_one_command_trains_a_row_and_scores_its_"
                                              "weights_a_second_way"),
    "polyattn bench compare lm_long --table": Run("--results {results}"),
    "polyattn bench compare vision_fine": Covered("tests/test_compare.py::test_rows_train_for_their_calibrated_budget_"
                                                  "and_the_table_reads_the_saved_results"),
    "polyattn bench compare vision_fine --table": Run("--results {results}"),
    "polyattn bench compare vision_stem --table": Run("--results {results}"),
    "polyattn bench compare vision_ablations --table": Run("--results {results}"),
    "polyattn bench compare lm_steps": Covered("tests/test_compare.py::test_a_suite_of_steps_trains_every_row_for_"
                                               "them_without_calibration"),
    "polyattn bench compare lm_reversible": Covered("tests/test_compare.py::test_rows_train_for_their_calibrated_"
                                                    "budget_and_the_table_reads_the_saved_results"),
}

SHRINK = ["train.max_steps=1", "train.progress=false", "train.log_every=1", "train.ema_decay=null"]
"""Appended to every training command: one optimizer step."""
SHRINK_IMAGES = ["train.batch_size=4", "data.eval_batch_size=64"]
SHRINK_TASK = {"diffusion": ["task.eval_images=4"]}
"""Shrinking overrides of one task's own section (another task's key is an error)."""
SHRINK_TEXT = ["data.source=shakespeare", "train.batch_size=2", "data.eval_batch_size=4", "data.eval_tokens=512"]


def _tiny_images(root: Path) -> tuple[Path, Path]:
    """A folder and a .tar.gz archive of it, each with train/ and test/ splits of 2 classes of 32 px JPEGs."""
    import numpy as np
    from PIL import Image

    folder = root / "images"
    rng = np.random.default_rng(0)
    for split, n in (("train", 4), ("test", 2)):
        for c in ("cat", "dog"):
            (folder / split / c).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(folder / split / c / f"{i}.jpg")
    archive = root / "images.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname="images")
    return folder, archive


@pytest.fixture(scope="module")
def places(tmp_path_factory):
    """The placeholders of `HOW`: tiny classifier, LM and diffusion runs, a tiny image folder and archive."""
    root = tmp_path_factory.mktemp("readme")
    folder, archive = _tiny_images(root)
    results = root / "results"
    shutil.copytree(ROOT / "results" / "vision", results / "vision")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("POLYATTN_CACHE", str(root / "cache"))
        common = [*SHRINK, f"train.out_dir={root}"]
        for argv in (["default", *common, *SHRINK_IMAGES, "train.run_name=cls", "train.max_steps=2"],
                     ["llama_lm_shakespeare", *common, *SHRINK_TEXT, "train.run_name=lm"],
                     ["dit_digits", *common, *SHRINK_IMAGES, *SHRINK_TASK["diffusion"], "model.depth=1",
                      "train.run_name=dit"]):
            assert main(["train", *argv]) == 0, argv
    return {"cls": root / "cls", "lm": root / "lm", "dit": root / "dit", "s2": root / "s2", "ee": root / "ee",
            "folder": folder,
            "archive": archive, "results": results, "root": root}


def test_every_readme_command_is_mapped():
    commands = readme_commands(README.read_text())
    assert len(commands) > 30
    unmapped = [c for c in commands if c not in HOW]
    assert not unmapped, ("the README shows commands that tests/test_readme.py does not run; add each to HOW "
                          f"(a tiny equivalent if it is heavy): {unmapped}")
    stale = [c for c in HOW if c not in commands]
    assert not stale, f"HOW maps commands the README no longer shows; remove them: {stale}"


def test_covered_commands_name_existing_tests():
    for how in HOW.values():
        if isinstance(how, Covered):
            path, _, name = how.test.partition("::")
            assert f"def {name}(" in (ROOT / path).read_text(), how.test


def _argv(command: str, how: Run, places: dict, tmp: Path) -> list[str]:
    """The README's command with its placeholders filled and `how`'s replacements and extra arguments applied."""
    for part, by in how.replace.items():
        assert part in command, f"{part!r} is no longer in the README command {command!r}; update HOW"
        command = command.replace(part, by)
    if how.run is not None:
        assert "runs/<run>" in command, command
        command = command.replace("runs/<run>", "{" + how.run + "}")
    argv = shlex.split(f"{command} {how.extra}")
    if argv[0] == "polyattn":
        argv = argv[1:]
    fill = {**{k: str(v) for k, v in places.items()}, "tmp": str(tmp)}
    return [a.format(**fill) for a in argv]


def _train_argv(command: str, how: Train, places: dict, tmp: Path) -> list[str]:
    """The README's training command with its data swapped for tiny local data, then the shrinking overrides."""
    argv = shlex.split(command)[1:]
    argv = [a.replace("../shared/data/cifar10-jpg.tar.gz", str(places["archive"]))
            .replace("/path/to/folder", str(places["folder"])) for a in argv]
    from polyattn.registry import model_task
    from polyattn.train.config import build_config

    config = build_config(argv[1] if len(argv) > 1 and "=" not in argv[1] else None,
                          [a for a in argv[1:] if "=" in a])
    task = model_task(config.model.name)
    text = task in ("causal_lm", "masked_lm")
    data = SHRINK_TASK.get(task, [])
    if not text and config.data.source.startswith("../shared/"):
        data = [*data, f"data.source={places['archive']}"]
    return [*argv, *data, *SHRINK, *(SHRINK_TEXT if text else SHRINK_IMAGES), f"train.out_dir={tmp}", *how.extra]


RUNNABLE = [c for c, how in HOW.items() if not isinstance(how, (Covered, Skip))]


@pytest.mark.parametrize("command", RUNNABLE)
def test_readme_command_runs(command, places, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("POLYATTN_CACHE", str(places["root"] / "cache"))
    monkeypatch.chdir(tmp_path)
    how = HOW[command]
    if isinstance(how, Help):
        words = [w for w in shlex.split(command.replace('"', "")) if re.fullmatch(r"[a-z][a-z-]*", w)]
        sub = [w for w in words[1:] if w in ("models", "config", "train", "eval", "generate", "inspect", "sample",
                                            "bench", "mixers", "compare", "train", "peers", "decode",
                                            "dtypes", "hf")]
        with pytest.raises(SystemExit) as exit_info:
            main([*sub, "--help"])
        assert exit_info.value.code == 0
        return
    if isinstance(how, Error):
        assert main(_argv(command, Run(), places, tmp_path)) == 2
        assert how.message in capsys.readouterr().err
        return
    if isinstance(how, Train):
        argv = _train_argv(command, how, places, tmp_path)
    else:
        if how.first is not None:
            command_first, extra = how.first
            assert main(_train_argv(command_first, Train(extra), places, places["root"])) == 0
        argv = _argv(command, how, places, tmp_path)
        if argv[0] == "train":
            argv = _train_argv("polyattn " + " ".join(argv), Train(), places, tmp_path)
    try:
        code = main(argv)
    except SystemExit as exit_info:  # --version and --help exit through argparse
        code = exit_info.code
    assert code == 0, argv


def test_readme_python_blocks_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert blocks
    for code in blocks:
        exec(compile(code, str(README), "exec"), {})
