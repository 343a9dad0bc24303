"""The API reference builds from the docstrings with mkdocs in strict mode (a warning is a failure), as `make docs`
does; the docs extra (part of `all`, which `make test` installs) provides mkdocs."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_api_reference_builds_strictly(tmp_path):
    pytest.importorskip("mkdocstrings", reason="the docs extra is not installed (pip install 'polyattn[docs]')")
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet", "--site-dir",
                             str(tmp_path / "site")], cwd=ROOT, capture_output=True, text=True,
                            env={"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stdout + result.stderr
    page = (tmp_path / "site" / "api" / "index.html").read_text()
    for name in ("polyattn.load_run", "polyattn.layers.LightNetAttention", "polyattn.layers.Attention",
                 "polyattn.train.TrainConfig", "polyattn.data.register_image_source", "polyattn.ops.lightnet_attn"):
        assert f'id="{name}"' in page, name
