"""The scripts in examples/ run, at tiny sizes, so they cannot rot; every script there is listed here."""

import importlib.util
import math
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
TINY = {
    "lightnet_block_in_your_model.py": {"steps": 3, "size": 8},
    "custom_dataset.py": {"steps": 4},
    "finetune_a_run.py": {"steps": 3, "base_steps": 2},
    "cross_attention.py": {"steps": 5},
}


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{Path(name).stem}", EXAMPLES / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_example_is_run_here():
    assert sorted(p.name for p in EXAMPLES.glob("*.py")) == sorted(TINY)


@pytest.mark.parametrize("name", sorted(TINY))
def test_example_runs(name, tmp_path, cache_dir, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    module = load(name)
    assert module.__doc__ and "python examples/" in module.__doc__  # says how to run it
    kwargs = dict(TINY[name])
    if name == "custom_dataset.py":
        kwargs["out"] = str(tmp_path)
    result = module.main(**kwargs)
    value = result["top1"] if isinstance(result, dict) else result
    assert math.isfinite(value)
    assert capsys.readouterr().out.strip()
