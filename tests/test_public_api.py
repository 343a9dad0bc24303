"""The public API a researcher starts from: package exports, `polyattn.load_run`, `--version`, the config keys and
`polyattn config`, and `polyattn models` at a recipe's shape."""

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

import polyattn
from polyattn.cli import main
from polyattn.train.config import config_keys, field_docs, keys_markdown

ROOT = Path(__file__).resolve().parents[1]
PUBLIC = ("polyattn.layers", "polyattn.ops", "polyattn.models", "polyattn.train", "polyattn.data",
          "polyattn.analysis", "polyattn.deploy", "polyattn.hf")


@pytest.mark.parametrize("name", PUBLIC)
def test_packages_export_their_public_names(name):
    module = importlib.import_module(name)
    assert module.__all__, name
    missing = [n for n in module.__all__ if not hasattr(module, n)]
    assert not missing, f"{name}.__all__ names {missing}, which it does not define"
    assert len(set(module.__all__)) == len(module.__all__)


def test_the_names_a_tester_reached_for_import():
    from polyattn.data import BatchLoader, ImageDataset, load_image_split  # noqa: F401
    from polyattn.layers import Attention, LightNetAttention, LightNetBlock, TransformerBlock  # noqa: F401
    from polyattn.ops import lightnet_attn, softmax_attention  # noqa: F401
    from polyattn.ops.attention import attention  # the submodule stays the module

    assert attention is softmax_attention
    from polyattn.train import RunConfig, build_config, load_run, train  # noqa: F401


def test_import_polyattn_stays_light():
    code = ("import sys, polyattn; heavy = [m for m in ('torch', 'matplotlib', 'PIL', 'kornia', 'tokenizers', "
            "'tensorboard', 'sklearn', 'transformers') if m in sys.modules]; print(heavy); assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True, env={"PYTHONPATH": str(ROOT / "src")})


def test_version_flag(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"polyattn {polyattn.__version__}"


def test_housekeeping_files_exist():
    assert "Apache License" in (ROOT / "LICENSE").read_text()
    assert (ROOT / "src" / "polyattn" / "py.typed").is_file()
    changelog = (ROOT / "CHANGELOG.md").read_text()
    assert f"## {polyattn.__version__}" in changelog or "## Unreleased" in changelog
    design = (ROOT / "docs" / "design.md").read_text()
    assert "analysis/" in design
    assert "../shared/DESIGN.md" not in (ROOT / "README.md").read_text()


def test_load_run_gives_model_config_and_tokenizer(tmp_path, cache_dir):
    from polyattn.train import build_config, train

    tiny = ["model.embed_dim=16", "model.depth=1", "model.num_heads=2", "model.patch_size=4", "data.image_size=8",
            "train.batch_size=256", "train.progress=false", "train.max_steps=2", "train.ema_decay=0.9",
            f"train.out_dir={tmp_path}", "train.run_name=r"]
    train(build_config("default", tiny))
    run = polyattn.load_run(tmp_path / "r")
    assert run.tokenizer is None and run.weights == "ema" and run.source.name == "ema.safetensors"
    assert not run.model.training and run.config.model.name == "vit_nano"
    model, config, tokenizer = polyattn.load_run(tmp_path / "r", ema=False)
    assert config.data.image_size == 8 and sum(p.numel() for p in model.parameters()) > 0 and tokenizer is None
    assert polyattn.load_run(tmp_path / "r", ema=False).weights == "raw"


def test_every_config_key_is_documented_once_in_the_code():
    keys = config_keys()
    undocumented = [k.key for k in keys if not k.help]
    assert not undocumented, f"add an attribute docstring under these fields in train/config.py: {undocumented}"
    from polyattn.train.config import TrainConfig

    assert field_docs(TrainConfig)["precision"][1].startswith("auto: bfloat16 autocast")
    names = {k.key for k in keys}
    for key in ("train.precision", "train.device", "train.threads", "train.compile", "train.checkpoint_every",
                "train.run_name", "train.out_dir", "data.eval_tokens"):
        assert key in names


def test_readme_key_table_is_generated_from_the_code():
    readme = (ROOT / "README.md").read_text()
    start, end = "<!-- table:config-keys -->\n", "<!-- /table:config-keys -->"
    block = readme[readme.index(start) + len(start):readme.index(end)]
    assert block == keys_markdown(), ("the README's table of keys is stale; regenerate it with "
                                      "`polyattn config --keys --markdown --readme README.md`")


def test_config_command_prints_the_resolved_config(capsys):
    import yaml

    assert main(["config", "default", "train.lr=3e-4", "model.depth=2"]) == 0
    out = capsys.readouterr().out
    assert "lr: 0.0003  # float, default 0.001; Peak learning rate" in out
    assert "depth: 2  # int, default 6" in out
    assert "precision: auto" in out and "mean: null" in out
    assert "seq_len:" not in out  # an image run's data section has no text settings
    parsed = yaml.safe_load(out)  # the listing is itself a recipe
    assert parsed["train"]["lr"] == 3e-4 and parsed["model"]["depth"] == 2
    assert main(["config", "llama_lm_shakespeare"]) == 0
    out = capsys.readouterr().out
    assert "eval_tokens: null" in out and "crop:" not in out
    assert main(["config", "--keys"]) == 0
    out = capsys.readouterr().out
    assert all(k.key in out for k in config_keys())
    assert main(["config", "default", "train.lrr=1"]) == 2
    assert "Did you mean 'train.lr'" in capsys.readouterr().err


def test_models_filters_by_name_and_counts_at_a_recipes_shape(capsys, cache_dir):
    assert main(["models", "vit_"]) == 0
    out = capsys.readouterr().out
    assert "vit_tiny" in out and "illama" not in out and "5.72M" in out
    assert main(["models", "vit_tiny", "--recipe", "default"]) == 0
    out = capsys.readouterr().out
    assert "5.35M" in out and "num_classes=10" in out and "img_size=8" in out  # 8 px digits, 2×2 patches
    assert main(["models", "no_such_model"]) == 2


def test_registered_image_sources_are_data_sources(cache_dir):
    import torch

    from polyattn.data import ImageDataset, load_image_split, register_image_source
    from polyattn.errors import UserError

    def load(split):
        n = 6 if split == "train" else 2
        return ImageDataset(torch.zeros(n, 3, 4, 4, dtype=torch.uint8), torch.arange(n) % 2, ["a", "b"], "mine")

    register_image_source("mine_for_test", load)
    assert len(load_image_split("mine_for_test", "test")) == 2
    assert load_image_split("mine_for_test", "train", image_size=8).images.shape == (6, 3, 8, 8)
    with pytest.raises(UserError, match="looks like a path"):
        register_image_source("some/folder", load)


def test_config_keys_table_is_written_between_the_markers(tmp_path, capsys):
    page = tmp_path / "page.md"
    page.write_text("intro\n<!-- table:config-keys -->\nSTALE LINE\n<!-- /table:config-keys -->\nend\n")
    assert main(["config", "--keys", "--markdown", "--readme", str(page)]) == 0
    text = page.read_text()
    assert "STALE LINE" not in text and keys_markdown() in text and text.endswith("end\n")
    assert main(["config", "default", "--keys"]) == 2  # --keys takes no recipe


@pytest.mark.parametrize("command", ["eval", "generate", "sample", "inspect"])
def test_run_commands_share_their_options(command):
    from polyattn.cli import build_parser

    args = build_parser().parse_args([command, "runs/x", "--device", "cpu", "--precision", "fp32", "--no-ema"])
    assert (args.run_dir, args.device, args.precision, args.no_ema) == ("runs/x", "cpu", "fp32", True)


def test_models_task_choices_are_the_registry_tasks(capsys):
    from polyattn.cli import build_parser
    from polyattn.registry import TASKS

    parser = build_parser()
    for task in TASKS:
        assert parser.parse_args(["models", "--task", task]).task == task
    with pytest.raises(SystemExit):
        parser.parse_args(["models", "--task", "translation"])
    assert "invalid choice: 'translation'" in capsys.readouterr().err
